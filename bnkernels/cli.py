"""The ``bnkernels`` command: ``bnkernels info`` and ``bnkernels bench``.

Argument parsing and printing only; what is measured and how lives in
:mod:`bnkernels.bench`. Exit codes: 0 success, 2 usage error, 1 when an
implementation produced a wrong result (or raised) in ``bench``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import shutil
import sys
import textwrap
import time
from typing import Sequence

import numpy as np

from . import bench as bm

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------

def info_data() -> dict:
    """What ``bnkernels info --json`` prints: :func:`bnkernels.bench.system_info`
    plus ``backends``, a list of ``{name, device, available, implemented, reason,
    install, details}`` (``details``: how a usable backend runs here)."""
    from . import available_backends
    from .backends import backend_details

    data = bm.system_info()
    data["backends"] = [
        {"name": s.name, "device": s.device, "available": s.available, "implemented": s.implemented,
         "reason": s.reason, "install": s.install, "details": backend_details(s.name) if s.available else ""}
        for s in available_backends().values()
    ]
    return data


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool],
                  free_last: bool = False) -> str:
    """Fixed-width text table. A row shorter than ``headers`` ends in a free
    text cell that spans the remaining columns and does not widen them; with
    ``free_last`` the last column is always such free text."""
    n = len(headers)
    fixed = n - 1 if free_last else n
    widths = [len(h) for h in headers]
    for r in rows:
        k = min(fixed, len(r) if len(r) == n else len(r) - 1)
        for i in range(k):
            widths[i] = max(widths[i], len(r[i]))

    def line(cells):
        k = min(fixed, len(cells) if len(cells) == n else len(cells) - 1)
        out = [c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(cells[:k], widths, right)]
        out += cells[k:]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _cmd_info(args) -> int:
    data = info_data()
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"bnkernels  {data['bnkernels']}")
    print(f"Python     {data['python']} ({data['python_implementation']}, {data['python_executable']})")
    print(f"NumPy      {data['numpy']}")
    print(f"torch      {data['torch'] or 'not installed'} (optional, compared against in bench)")
    print(f"Platform   {data['platform']}")
    print(f"CPU        {data['cpu']}")
    print(f"Cores      {data['cpu_count']} ({data['cpus_usable']} usable by this process)")
    print()
    rows = []
    for b in data["backends"]:
        if b["available"]:
            rows.append([b["name"], b["device"], "yes", b["details"]])
        elif not b["implemented"]:
            rows.append([b["name"], b["device"], "planned", "not in this release"
                         + ("" if "not implemented" in b["reason"] else f" (and here: {b['reason']})")])
        else:
            rows.append([b["name"], b["device"], "no", f"why: {b['reason']}"])
            rows.append(["", "", "", f"to get it: {b['install']}"])
    print(_format_table(["backend", "device", "usable", "details / why not / what to install"], rows,
                        [False] * 4, free_last=True))
    return EXIT_OK


# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------

DTYPE_NAMES = ("float16", "float32", "float64")
#: dtypes of a default run and of a --quick run.
DEFAULT_DTYPES, QUICK_DTYPES = "float32,float16", "float32"
DEVICE_CHOICES = ("auto", "cpu", "gpu", "all")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def select_implementations(names: list[str] | None, parser: argparse.ArgumentParser,
                           torch_threads: int | None = None, device: str | None = None):
    """Implementations for ``--backends`` and ``--device``.

    ``names`` None: every usable implementation on the chosen device(s):
    bnkernels backends, the textbook baseline and torch. ``device``:
    ``"auto"``/None (the GPU when a bnkernels GPU backend is usable there,
    else the CPU), ``"cpu"``, ``"gpu"`` or ``"all"``. Unknown or unusable
    names, and a GPU request without a usable GPU, are usage errors whose
    message says why and what to install.
    """
    catalog = bm.implementation_catalog(torch_threads)
    gpu_candidates = [e for e in catalog.values() if e.device == "gpu" and e.role == bm.CANDIDATE]
    if names is not None:
        chosen = []
        for name in names:
            e = catalog.get(name)
            if e is None:
                parser.error(f"--backends: unknown name {name!r}; valid: {', '.join(catalog)}")
            if e.problem:
                parser.error(f"--backends {name}: not usable here: {e.problem}")
            if device in ("cpu", "gpu") and e.device != device:
                parser.error(f"--backends {name} runs on the {e.device.upper()}, not with --device {device}")
            chosen.append(e)
    else:
        if device in (None, "auto"):
            device = "gpu" if any(e.problem is None for e in gpu_candidates) else "cpu"
        kinds = ("cpu", "gpu") if device == "all" else (device,)
        if "gpu" in kinds and not any(e.problem is None for e in gpu_candidates):
            why = "; ".join(f"{e.name}: {e.problem}" for e in gpu_candidates)
            parser.error(f"--device {device}: no bnkernels GPU backend is usable here ({why})")
        chosen = [e for e in catalog.values() if e.device in kinds and e.problem is None and e.default]
    impls = []
    for e in chosen:
        impl = e.make()  # None: e.g. torch is installed but does not import
        if impl is None and names is not None:
            parser.error(f"--backends {e.name}: could not be set up here")
        if impl is not None:
            impls.append(impl)
    return impls


class Progress:
    """Progress of ``bnkernels bench`` on stderr: a one-line bar redrawn in
    place when the stream is a terminal, plain ``[i/total] label`` lines
    otherwise (logs, CI, pipes)."""

    def __init__(self, stream=None, tty: bool | None = None, width: int = 24):
        self.stream = sys.stderr if stream is None else stream
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty, self.width = tty, width
        self.start: float | None = None
        self.total = 0

    @staticmethod
    def _clock(seconds: float) -> str:
        s = int(round(seconds))
        return f"{s // 60}:{s % 60:02d}"

    def note(self, text: str) -> None:
        """A message on a line of its own (the bar is redrawn by the next update)."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def __call__(self, i: int, total: int, label: str) -> None:
        self.total = total
        if not self.tty:
            self.stream.write(f"[{i}/{total}] {label}\n")
            self.stream.flush()
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        done = i - 1
        elapsed = now - self.start
        filled = self.width * done // max(total, 1)
        eta = f" eta {self._clock(elapsed / done * (total - done))}" if done else ""
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {i}/{total} "
                f"{self._clock(elapsed)}{eta}  {label}")
        cols = shutil.get_terminal_size((100, 24)).columns
        self.stream.write("\r" + line[: max(cols - 1, 20)] + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Leave the finished bar on its own line."""
        if self.tty and self.start is not None:
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r[{'#' * self.width}] {self.total}/{self.total} done in "
                              f"{self._clock(elapsed)}\x1b[K\n")
            self.stream.flush()


def _fmt_ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _fmt_x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _fmt_pct(v: float | None) -> str:
    return f"{v:.0f}%" if v is not None else "-"


def _result_row(r: bm.Result) -> list[str]:
    base = [r.op, r.shape_name, "x".join(map(str, r.shape)), r.layout, r.dtype, r.implementation]
    if r.status == "ok":
        return base + [
            _fmt_ms(r.median_s),
            f"{_fmt_ms(r.min_s)}-{_fmt_ms(r.max_s)}",
            f"{r.gbps:.2f}",
            _fmt_pct(r.pct_of_ceiling),
            _fmt_pct(r.pct_of_copy),
            _fmt_x(r.speedup_vs_textbook),
            _fmt_x(r.speedup_vs_torch),
        ]
    if r.status == "wrong":
        text = f"WRONG (max err {r.max_err:.2e} > tolerance {r.tolerance:.0e}; not timed)"
    elif r.status == "unsupported":
        text = f"n/a ({r.message})"
    else:
        text = f"ERROR ({r.message})"
    return base + [text]


TABLE_HEADERS = ["op", "shape", "dims", "layout", "dtype", "implementation", "median ms", "min-max ms",
                 "GB/s", "% ceil", "% copy", "vs textbook", "vs torch"]


def format_results_table(results: Sequence[bm.Result]) -> str:
    """The bench table; a blank line between (dtype, shape) groups, each
    led by its same-size copy rows (op ``copy``)."""
    right = [False] * 6 + [True] * 7
    text = _format_table(TABLE_HEADERS, [_result_row(r) for r in results], right).split("\n")
    lines, prev = text[:2], None
    for r, line in zip(results, text[2:]):
        group = (r.dtype, r.shape_name, r.shape, r.device)
        if prev is not None and group != prev:
            lines.append("")
        lines.append(line)
        prev = group
    return "\n".join(lines)


def _timing_text(t: bm.Timing, timer: str) -> str:
    more = f" and >= {t.min_time:g} s (at most {t.max_repeat} calls)" if t.min_time > 0 else ""
    return (f"{t.warmup} warm-up call{'s' if t.warmup != 1 else ''}, then >= {t.repeat} timed "
            f"calls{more}; {timer}")


def _print_bench(results, ceilings: dict, devices: dict, timings: dict, args, info: dict,
                 torch_threads, cases, dtypes, date: str, gpu_note: str | None) -> None:
    def para(text):
        print(textwrap.fill(text, width=100, subsequent_indent="  "))

    torch_text = (f", torch {info['torch']} ({torch_threads} thread{'s' if torch_threads != 1 else ''})"
                  if torch_threads else "")
    print(f"bnkernels {info['bnkernels']} bench, {date}: Python {info['python']}, NumPy {info['numpy']}"
          f"{torch_text}")
    llc = info.get("last_level_cache_bytes")
    llc_text = f", last-level cache {llc / bm.MiB:.0f} MiB" if llc else ""
    print(f"CPU: {info['cpu']}, {info['cpu_count']} cores ({info['cpus_usable']} usable){llc_text}")
    if "gpu" in devices:
        print(f"GPU: {devices['gpu'].name}")
    elif gpu_note:
        para(f"GPU: none used ({gpu_note}); on a machine with one: bnkernels bench --device gpu")
    for kind, c in ceilings.items():
        others = ", ".join(f"{m}: {g:.2f} GB/s" for m, g in c.variants.items() if m != c.method)
        para(f"Ceiling ({kind}): {c.method}, {c.buffer_bytes / bm.MiB:.0f} MiB into a preallocated "
             f"buffer, read + write counted: {c.median_s * 1e3:.2f} ms median = {c.gbps:.2f} GB/s"
             + (f" ({others})" if others else "") + ".")
    para(f"Bytes model: {bm.BYTES_MODEL}. % ceil = GB/s / ceiling of the same device.")
    para(f"Same-size copy: {bm.SAME_SIZE_COPY_NOTE}.")
    for kind, t in timings.items():
        para(f"Timing ({kind}): {_timing_text(t, devices[kind].timer)}; median and min-max in ms.")
    if args.cold:
        copies = sorted({r.copies for r in results if r.status == "ok"}) or [0]
        para("Caches: cold (--cold): each timed call uses the next of several copies of its inputs "
             f"({copies[0]}-{copies[-1]} copies per measurement; between two uses of a copy the others "
             "move over twice the cache, unless a quarter of the memory does not hold that many).")
    else:
        para("Caches: hot: every call reuses the same inputs (--cold rotates copies of them).")
    para(f"Allocation: {bm.ALLOCATION_NOTE}.")
    tol = ", ".join(f"{d.name} {t:.0e}" for d, t in bm.TOLERANCE.items())
    para(f"Checked before timing against the float64 bnkernels.reference: max |error| / max |reference| "
         f"<= {tol}; a WRONG result is not timed.")
    para("vs textbook, vs torch: speed-up over textbook NumPy and torch.nn.functional.batch_norm on the "
         "same device (textbook-cupy and torch-cuda on the GPU); above 1 is faster."
         + ("" if info.get("torch") else ' torch is not installed here, so "vs torch" stays empty: '
            'pip install "bnkernels[torch]".'))
    sizes = [math.prod(c.shape) * np.dtype(d).itemsize for c in cases for d in dtypes]
    for kind, d in devices.items():
        cache = d.cache_bytes
        if cache and not args.cold and 2 * min(sizes) <= cache:
            which = "the inputs" if 2 * max(sizes) <= cache else "some inputs"
            para(f"Note: {which} (x of {min(sizes) / bm.MiB:.1f} to {max(sizes) / bm.MiB:.1f} MiB) fit in "
                 f"the {cache / bm.MiB:.0f} MiB {'last-level' if kind == 'cpu' else 'L2'} cache of the "
                 f"{kind.upper()}, so GB/s can exceed the copy ceiling there (% copy compares with a copy "
                 "in the same cache); --cold measures from memory.")
    if args.quick:
        para(f"--quick: the named shapes with the batch divided by {bm.QUICK_DIVISOR}, "
             f"{', '.join(dtypes)}, fewer calls.")
    print()
    print(format_results_table(results))


def _bench_payload(results, ceilings, devices, timings, args, info, torch_threads, date, argv) -> dict:
    return {
        "bnkernels": info["bnkernels"],
        "date": date,
        "command": "bnkernels " + " ".join(argv),
        "system": info,
        "devices": {k: {"name": d.name, "timer": d.timer, "cache_bytes": d.cache_bytes}
                    for k, d in devices.items()},
        "torch_threads": torch_threads,
        "bytes_model": bm.BYTES_MODEL,
        "allocation": bm.ALLOCATION_NOTE,
        "same_size_copy": bm.SAME_SIZE_COPY_NOTE,
        "tolerance": {d.name: t for d, t in bm.TOLERANCE.items()},
        "timing": {k: dataclasses.asdict(t) for k, t in timings.items()},
        "cold": bool(args.cold),
        "quick": bool(args.quick),
        "ceilings": {k: vars(c) for k, c in ceilings.items()},
        "results": [r.to_dict() for r in results],
    }


def _print_list() -> int:
    print("Named shapes (--shapes NAME[,NAME...] or all; any SHAPE[@AXIS] works too):")
    rows = [[name, c.shape_str, c.layout, f"axis={c.axis}"] for name, c in bm.NAMED_CASES.items()]
    print(_format_table(["name", "dims", "layout", "channel axis"], rows, [False] * 4))
    print()
    print("Implementations (--backends NAME[,NAME...]):")
    rows = [[e.name, e.device, e.role, "yes" if e.default else "when named",
             "yes" if e.problem is None else f"no: {e.problem}"]
            for e in bm.implementation_catalog().values()]
    print(_format_table(["name", "device", "role", "default", "usable here"], rows, [False] * 5,
                        free_last=True))
    return EXIT_OK


def _cmd_bench(args, parser, implementations=None, argv=()) -> int:
    if args.list:
        return _print_list()
    ops = _split(args.ops)
    for op in ops:
        if op not in bm.OPS:
            parser.error(f"--ops: unknown op {op!r}; valid: {', '.join(bm.OPS)}")
    if not ops:
        parser.error("--ops: nothing to run")
    dtypes = _split(args.dtype if args.dtype is not None else QUICK_DTYPES if args.quick else DEFAULT_DTYPES)
    for d in dtypes:
        if d not in DTYPE_NAMES:
            parser.error(f"--dtype: unsupported {d!r}; valid: {', '.join(DTYPE_NAMES)}")
    if args.shapes:
        try:
            cases = bm.parse_cases(args.shapes)
        except ValueError as exc:
            parser.error(f"--shapes: {exc}")
    else:
        cases = list(bm.QUICK_CASES if args.quick else bm.DEFAULT_CASES)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.min_time is not None and args.min_time < 0:
        parser.error("--min-time must be >= 0")
    if args.ceiling_mib is not None and args.ceiling_mib <= 0:
        parser.error("--ceiling-mib must be > 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be >= 1")
    if args.plot:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            parser.error('--plot needs matplotlib: pip install "bnkernels[plot]"')
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{option}: no directory {os.path.dirname(os.path.abspath(path))!r} to write {path!r} in")
    if implementations is not None:
        impls = list(implementations)
    else:
        impls = select_implementations(_split(args.backends) if args.backends else None, parser,
                                       args.torch_threads, args.device)
    if not impls:
        parser.error("--backends: nothing to run")

    info = bm.system_info()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch = bm.import_torch() if any(i.role == bm.TORCH for i in impls) else None
    torch_threads = torch.get_num_threads() if torch is not None else None
    kinds = list(dict.fromkeys(i.device for i in impls))
    devices = {k: bm.make_device(k) for k in kinds}
    gpu_note = None if "gpu" in devices else bm.gpu_problem()
    timings = {}
    for k, d in devices.items():
        t = d.quick_timing if args.quick else d.default_timing
        over = {f: v for f, v in (("repeat", args.repeat), ("warmup", args.warmup),
                                  ("min_time", args.min_time)) if v is not None}
        timings[k] = dataclasses.replace(t, **over)

    progress = Progress()
    ceilings = {}
    for k, d in devices.items():
        progress.note(f"[ceiling] {k}: large copy on {d.name}")
        nbytes = int(args.ceiling_mib * bm.MiB) if args.ceiling_mib is not None else None
        ceilings[k] = d.measure_ceiling(nbytes, repeat=max(timings[k].repeat, 5),
                                        warmup=max(timings[k].warmup, 1))
    results = bm.run_benchmarks(impls, cases, ops, dtypes, devices=devices, timing=timings,
                                cold=args.cold, progress=progress)
    progress.close()
    bm.add_derived(results, ceilings)
    _print_bench(results, ceilings, devices, timings, args, info, torch_threads, cases, dtypes, date,
                 gpu_note)

    # A wrong comparison point (e.g. textbook NumPy summing float16) is
    # shown, but only a wrong bnkernels result fails the command.
    failed = [r for r in results if r.status in ("wrong", "error") and r.role == bm.CANDIDATE]
    if failed:
        print(f"\n{len(failed)} result(s) failed: "
              + "; ".join(f"{r.implementation} {r.op} {r.shape_name} {r.dtype} {r.status.upper()}"
                          for r in failed))
    if args.json:
        payload = _bench_payload(results, ceilings, devices, timings, args, info, torch_threads, date, argv)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        print(f"\nAll figures: {args.json}")
    if args.plot:
        where = "; ".join(f"{d.name} ({k.upper()})" for k, d in devices.items())
        state = "cache-cold (--cold)" if args.cold else "hot (inputs in cache as in a training loop)"
        bm.plot_results(results, args.plot,
                        title=f"bnkernels bench, {date}: each implementation's speed as % of a same-size copy, "
                              f"{state}\n{where}")
        print(f"{'' if args.json else chr(10)}Plot: {args.plot}")
    return EXIT_FAILED if failed else EXIT_OK


def _add_bench_parser(sub) -> None:
    """The ``bench`` subcommand's arguments."""
    names = ", ".join(bm.NAMED_CASES)
    p_bench = sub.add_parser(
        "bench", help="check and time batch norm: bnkernels vs textbook NumPy vs PyTorch",
        description="Check every implementation against the float64 reference, then time it "
                    "(training forward, inference forward, backward) and compare its GB/s with a "
                    "copy ceiling measured in the same run. Exit status 1 if a bnkernels result is "
                    "wrong.")
    p_bench.add_argument("--quick", action="store_true",
                         help=f"the named shapes with the batch divided by {bm.QUICK_DIVISOR}, "
                              f"{QUICK_DTYPES} only, fewer calls (under a minute on 2 cores)")
    p_bench.add_argument("--ops", default=",".join(bm.OPS),
                         help="comma list of operations (default: %(default)s)")
    p_bench.add_argument("--dtype", "--dtypes", dest="dtype", default=None,
                         help="comma list of float16, float32, float64 "
                              f"(default: {DEFAULT_DTYPES}; {QUICK_DTYPES} with --quick)")
    p_bench.add_argument("--shapes", default=None,
                         help=f"comma list of named shapes ({names}; 'all' for every one) or "
                              "SHAPE[@AXIS] such as 8x32x28x28 or 8x28x28x32@-1 (axis default 1). "
                              "Default: all named shapes")
    p_bench.add_argument("--device", choices=DEVICE_CHOICES, default=None,
                         help="where to run: auto (the GPU when a bnkernels GPU backend is usable, "
                              "else the CPU; the default), cpu, gpu, or all")
    p_bench.add_argument("--backends", default=None,
                         help="comma list of implementations: bnkernels backend names, the same with "
                              "+out (writing into a preallocated out=, e.g. numba+out), textbook-numpy, "
                              "textbook-cupy, torch, torch-cuda (default: every usable one on the "
                              "device except the +out ones; --list shows them)")
    p_bench.add_argument("--cold", action="store_true",
                         help="cache-cold timing: rotate through copies of the inputs whose total "
                              "exceeds twice the last-level cache (bounded by a quarter of the memory)")
    p_bench.add_argument("--repeat", type=int, default=None,
                         help="at least this many timed calls (default: CPU 5, GPU 20; fewer with --quick)")
    p_bench.add_argument("--warmup", type=int, default=None,
                         help="untimed calls first (default: CPU 1, GPU 3)")
    p_bench.add_argument("--min-time", type=float, default=None, metavar="S",
                         help="keep timing until S seconds have passed (default: CPU 0.25, GPU 0.2; "
                              "0.05 with --quick)")
    p_bench.add_argument("--ceiling-mib", type=float, default=None,
                         help="copy buffer for the bandwidth ceiling in MiB (default: CPU twice the "
                              "last-level cache, at least 256; GPU 1024)")
    p_bench.add_argument("--torch-threads", type=int, default=None,
                         help="torch.set_num_threads for the torch comparison (default: torch's own; "
                              "the count used is printed)")
    p_bench.add_argument("--json", metavar="FILE", default=None, help="write all figures to FILE")
    p_bench.add_argument("--plot", metavar="FILE.png", default=None,
                         help='bar chart of %% of the same-size copy per implementation (needs matplotlib: '
                              'pip install "bnkernels[plot]")')
    p_bench.add_argument("--list", action="store_true",
                         help="list the named shapes and the implementations usable here, and exit")
    p_bench.set_defaults(subparser=p_bench)


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------

def _cmd_kernels(args) -> int:
    """``bnkernels kernels``: compile the CuPy kernels with NVRTC as CuPy
    would, for each ``--arch``, and print each instantiation's resources and
    global/local memory instructions (:mod:`bnkernels.kernel_report`).
    Exit 1 when a tool is missing or the sources do not compile."""
    from . import kernel_report as kr

    archs = list(dict.fromkeys(args.arch or kr.DEFAULT_ARCHS))
    try:
        archs = [kr.normalize_arch(a) for a in archs]
        reports = [r for arch in archs for r in kr.inspect(arch)]
        version = "%d.%d" % kr.nvrtc_version()
    except ValueError as exc:
        print(f"bnkernels kernels: --arch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (kr.KernelToolError, kr.KernelCompileError) as exc:
        print(f"bnkernels kernels: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        options = kr.bnkernels_sources().options
        print(json.dumps({"nvrtc_version": version, "archs": archs,
                          "nvrtc_options": {a: list(kr.compile_options(options, a)) for a in archs},
                          "kernels": [r.to_dict() for r in reports]}, indent=2))
        return EXIT_OK
    print(f"NVRTC {version}, options as cupy.RawModule passes them; resources from ptxas, "
          "memory instructions from cuobjdump -sass")
    rows = [[r.name_expression, r.arch, str(r.registers), str(r.shared_bytes), str(r.stack_bytes),
             str(r.spill_bytes), str(r.local_memory_ops), f"{r.vector_loads}/{r.vector_stores}",
             f"{r.scalar_global_loads}/{r.scalar_global_stores}", "yes" if r.vectorized else "no"]
            for r in reports]
    print(_format_table(["kernel", "arch", "regs", "smem B", "stack B", "spill B", "LDL/STL",
                         "128-bit ld/st", "narrower ld/st", "vectorized"],
                        rows, [False, False] + [True] * 7 + [False]))
    return EXIT_OK


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the ``info``, ``bench`` and ``kernels`` subcommands."""
    parser = argparse.ArgumentParser(prog="bnkernels", description="bnkernels command-line tool")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_info = sub.add_parser("info", help="versions, CPU and which backends are usable here")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(subparser=p_info)

    _add_bench_parser(sub)

    p_kernels = sub.add_parser(
        "kernels", help="compile the CUDA kernels (no GPU needed) and report their resources",
        description="Compile every CuPy kernel instantiation with NVRTC and CuPy's options, then "
                    "print registers, shared memory, stack, spills, local-memory instructions "
                    "(LDL/STL) and 128-bit global loads/stores from cuobjdump -sass. Needs "
                    '"cuda-bindings==13.*" and "cuda-toolkit[nvrtc,cudart,cuobjdump,nvdisasm]==13.*".')
    p_kernels.add_argument("--arch", action="append", metavar="SM",
                           help="real architecture, repeatable (default: sm_80 and sm_90)")
    p_kernels.add_argument("--json", action="store_true", help="print as JSON")
    p_kernels.set_defaults(subparser=p_kernels)
    return parser


def main(argv: Sequence[str] | None = None, *,
         implementations: Sequence[bm.Implementation] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the
    exit code (0 ok, 1 wrong results, 2 usage error) instead of exiting.

    ``implementations``: for ``bench``, run exactly these
    :class:`bnkernels.bench.Implementation` objects instead of the ones
    ``--backends`` selects (for scripts and tests).
    """
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        if args.command == "info":
            return _cmd_info(args)
        if args.command == "kernels":
            return _cmd_kernels(args)
        return _cmd_bench(args, args.subparser, implementations, argv)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
