"""``bnkernels bench --host-overhead``: bnkernels' own host cost per call on
each GPU backend, with stand-in devices whose kernels do nothing
(``standin.py``), against torch's dispatch of a tiny CPU
``F.batch_norm`` measured in the same run: what a real GPU adds to the
kernels of every call, and what it has to stay under for a framework's
layers (a training forward on an H100 moves resnet-56's 38 MB in ~12 µs).

It runs in a process of its own (:func:`run`), since the stand-ins replace
CuPy and ``numba.cuda`` in the process that imports them. Figures per call:
the best of :data:`ROUNDS` rounds of ``calls`` calls in each of :data:`PASSES`
interleaved passes (µs; as ``timeit``
reports, since what varies between rounds is the machine, not the code),
device allocations and kernel launches.
"""
from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import time

import numpy as np

ROUNDS = 7
PASSES = 3
SHAPE = (32, 64, 56, 56)
OPS = ("train", "infer", "backward", "train (prepared)", "infer (prepared)", "backward (prepared)")


def _best_us(fn, calls: int) -> float:
    fn()
    rounds = []
    gc.disable()  # as timeit does: a collection in a round is the machine's cost, not the call's
    try:
        for _ in range(ROUNDS):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds.append((time.perf_counter() - t) / calls * 1e6)
    finally:
        gc.enable()
    return min(rounds)


def _calls(backend: str, to_device, shape, dtype):
    """The timed calls of each op through the public functions, on device
    arrays made by ``to_device``."""
    from ..batch_norm import bn_backward, bn_forward
    from ..prepared import prepare_backward, prepare_forward

    C = shape[1]
    x = to_device(np.random.default_rng(0).standard_normal(shape).astype(dtype))
    g, b = to_device(np.ones(C, np.float32)), to_device(np.zeros(C, np.float32))
    rm, rv = to_device(np.zeros(C, np.float32)), to_device(np.ones(C, np.float32))
    _, saved = bn_forward(x, g, b, backend=backend, return_saved=True)
    forward = prepare_forward(x, g, b, rm, rv, backend=backend)
    infer = prepare_forward(x, g, b, rm, rv, training=False, backend=backend)
    backward = prepare_backward(x, x, saved.mean, saved.invstd, g, backend=backend)
    return {
        "train": lambda: bn_forward(x, g, b, rm, rv, backend=backend, return_saved=True),
        "infer": lambda: bn_forward(x, g, b, rm, rv, training=False, backend=backend),
        "backward": lambda: bn_backward(x, x, saved.mean, saved.invstd, g, backend=backend),
        "train (prepared)": lambda: forward(x, g, b, rm, rv),
        "infer (prepared)": lambda: infer(x, g, b, rm, rv),
        "backward (prepared)": lambda: backward(x, x, saved.mean, saved.invstd, g),
    }


def _floor_us(backend: str, shape, dtype, calls: int) -> float:
    """What the stand-in itself costs in a call: 3 allocations (y, two
    per-channel vectors) and 2 launches of 20 arguments, made directly.
    The rest of a call's time is bnkernels' own."""
    C = shape[1]
    if backend == "cupy":
        import cupy as cp

        kernel = cp.RawModule().get_function("floor")
        args = (cp.empty(1, np.float32),) * 20

        def call():
            cp.empty(shape, dtype), cp.empty(C, np.float32), cp.empty(C, np.float32)
            kernel((1, 1, 1), (256, 1, 1), args, shared_mem=0)
            kernel((1, 1, 1), (256, 1, 1), args, shared_mem=0)
    else:
        cuda = sys.modules["numba.cuda"]
        kernel = cuda.jit(lambda: None)
        args = (cuda.device_array(1, np.float32),) * 20
        stream = cuda.default_stream()

        def call():
            cuda.device_array(shape, dtype), cuda.device_array(C, np.float32), cuda.device_array(C, np.float32)
            kernel[(1, 1, 1), (256, 1, 1), stream](*args)
            kernel[(1, 1, 1), (256, 1, 1), stream](*args)
    return _best_us(call, calls)


def _torch_us(calls: int) -> float | None:
    try:
        import torch
        import torch.nn.functional as F
    except (ImportError, OSError):
        return None
    # one thread: the figure is dispatch, which is what bnkernels' Python is
    # compared with (intra-op threads only add their wake-ups, and on a busy
    # machine turn a 15 µs call into hundreds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(2, 4, 1, 1)
        return _best_us(lambda: F.batch_norm(x, None, None, training=True), calls)
    finally:
        torch.set_num_threads(threads)


def measure(shape=SHAPE, dtype="float16", calls: int = 200, passes: int = PASSES) -> dict:
    """In this process: install the stand-ins, then time every op on both
    GPU backends, torch's dispatch and the stand-ins' own cost, in
    ``passes`` interleaved passes (each figure the best over all of them:
    what a busy machine adds comes and goes, the code's cost stays).
    Returns the JSON-ready figures."""
    from . import standin

    standin.install()
    import cupy

    backends = [("cupy", cupy.asarray)]
    if "numba.cuda" in sys.modules:
        backends.append(("numba-cuda", sys.modules["numba.cuda"].to_device))
    ops = {backend: _calls(backend, to_device, shape, np.dtype(dtype)) for backend, to_device in backends}
    best: dict = {}

    def keep(key, us):
        best[key] = min(us, best.get(key, math.inf))

    for _ in range(passes):
        for backend, calls_ in ops.items():
            for op, fn in calls_.items():
                keep((backend, op), _best_us(fn, calls))
            keep(("floor", backend), _floor_us(backend, shape, np.dtype(dtype), calls))
        torch_us = _torch_us(calls * 5)
        if torch_us is not None:
            keep(("torch",), torch_us)
    rows = []
    for backend, calls_ in ops.items():
        for op, fn in calls_.items():
            standin.COUNTS.clear()
            fn()
            rows.append({"backend": backend, "op": op, "us_per_call": best[(backend, op)],
                         "allocations": standin.COUNTS["allocations"], "launches": standin.COUNTS["launches"]})
    return {"standin_floor_us": {b: best[("floor", b)] for b in ops}, "shape": list(shape), "dtype": dtype,
            "calls": calls, "rounds": ROUNDS, "passes": passes, "torch_cpu_tiny_us": best.get(("torch",)),
            "rows": rows}


def format_table(doc: dict) -> str:
    torch_us = doc["torch_cpu_tiny_us"]
    head = (f"host cost per call with stand-in devices (kernels do nothing), {doc['dtype']} "
            f"{'x'.join(map(str, doc['shape']))}, best of {doc['rounds']} rounds of {doc['calls']} calls "
            f"in each of {doc.get('passes', 1)} interleaved passes;\n"
            f"torch's tiny CPU F.batch_norm dispatch in the same run: "
            + ("not measured (torch missing)" if torch_us is None else f"{torch_us:.1f} µs"))
    floors = doc.get("standin_floor_us", {})
    head += ("\nof which the stand-in's own 3 allocations and 2 launches (made directly, same run): "
             + ", ".join(f"{b} {us:.1f} µs" for b, us in floors.items()))
    lines = [head, f"{'backend':11} {'op':19} {'µs/call':>8} {'x torch':>8} {'bnkernels µs':>12} "
                   f"{'allocations':>11} {'launches':>8}"]
    for r in doc["rows"]:
        ratio = "-" if torch_us is None else f"{r['us_per_call'] / torch_us:.1f}x"
        own = r["us_per_call"] - floors.get(r["backend"], 0.0)
        lines.append(f"{r['backend']:11} {r['op']:19} {r['us_per_call']:8.1f} {ratio:>8} {own:12.1f} "
                     f"{r['allocations']:11d} {r['launches']:8d}")
    return "\n".join(lines)


def run(json_path: str | None = None, timeout: float = 600) -> int:
    """Measure in a fresh interpreter and print the table (and write the
    JSON to ``json_path``). Returns the exit status."""
    proc = subprocess.run([sys.executable, "-m", "bnkernels.bench.host_overhead", "--json-stdout"],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return 1
    doc = json.loads(proc.stdout)
    print(format_table(doc))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--json-stdout"]:
        print(json.dumps(measure()))
    else:
        sys.exit(run())
