"""``bnkernels bench``: choosing the implementations, the progress bar, the
printed report and its JSON; what is measured lives in :mod:`bnkernels.bench`."""
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


from .. import bench as bm
from ..bench.sync import SYNC_CASES
from .exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .tables import format_results_table, format_sync_table, format_table


DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
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


def _timing_text(t: bm.Timing, timer: str) -> str:
    more = f" and >= {t.min_time:g} s (at most {t.max_repeat} calls)" if t.min_time > 0 else ""
    return (f"{t.warmup} warm-up call{'s' if t.warmup != 1 else ''}, then >= {t.repeat} timed "
            f"calls{more}; {timer}")


def _para(text: str) -> None:
    """Print ``text`` wrapped at 100 columns, continuation lines indented."""
    print(textwrap.fill(text, width=100, subsequent_indent="  "))


def _print_machine(info: dict, date: str, torch_threads: int | None = None, what: str = "bench") -> None:
    """The first lines of a bench report: versions (``info``:
    ``bm.system_info()``), the date, torch's threads when used, the CPU."""
    torch_text = (f", torch {info['torch']} ({torch_threads} thread{'s' if torch_threads != 1 else ''})"
                  if torch_threads else "")
    print(f"bnkernels {info['bnkernels']} {what}, {date}: Python {info['python']}, NumPy {info['numpy']}"
          f"{torch_text}")
    caches = f"; caches: {info['caches']}" if info.get("caches") else ""
    print(f"CPU: {info['cpu']}, {info['cpu_count']} cores ({info['cpus_usable']} usable){caches}")


def _print_bench(results, ceilings: dict, devices: dict, timings: dict, args, info: dict,
                 torch_threads, cases, dtypes, date: str, gpu_note: str | None) -> None:
    para = _para
    _print_machine(info, date, torch_threads)
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
    tol = ", ".join(f"{d} {t:.0e}" for d, t in bm.TOLERANCE.items() if d in dtypes)
    para(f"Checked before timing against the float64 bnkernels.reference: max |error| / max |reference| "
         f"<= {tol}; a WRONG result is not timed.")
    para("vs textbook, vs torch: speed-up over textbook NumPy and the op's torch.nn.functional on the "
         "same device (textbook-cupy and torch-cuda on the GPU); above 1 is faster."
         + ("" if info.get("torch") else ' torch is not installed here, so "vs torch" stays empty: '
            'pip install "bnkernels[torch]".'))
    sizes = [math.prod(c.shape) * bm.bench_dtype(d).itemsize for c in cases for d in dtypes]
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
        "tolerance": dict(bm.TOLERANCE),
        "timing": {k: dataclasses.asdict(t) for k, t in timings.items()},
        "cold": bool(args.cold),
        "quick": bool(args.quick),
        "ceilings": {k: vars(c) for k, c in ceilings.items()},
        "results": [r.to_dict() for r in results],
    }


def _print_list() -> int:
    print("Named shapes (--shapes NAME[,NAME...] or all; any SHAPE[@AXIS] works too):")
    rows = [[name, c.shape_str, c.layout, f"axis={c.axis}",
             ", ".join(op for op in bm.ALL_OPS if name in bm.own_cases(op))] for name, c in bm.NAMED_CASES.items()]
    print(format_table(["name", "dims", "layout", "channel axis", "ops (--ops)"], rows, [False] * 5,
                       free_last=True))
    print()
    print("Implementations (--backends NAME[,NAME...]):")
    rows = [[e.name, e.device, e.role, "yes" if e.default else "when named",
             "yes" if e.problem is None else f"no: {e.problem}"]
            for e in bm.implementation_catalog().values()]
    print(format_table(["name", "device", "role", "default", "usable here"], rows, [False] * 5,
                        free_last=True))
    return EXIT_OK


def _dtypes_and_cases(args, parser, default_cases) -> tuple[list[str], list]:
    """``--dtype`` and ``--shapes`` (``default_cases`` without it), and the
    timing options' ranges checked: ``(dtype names, bm.Case list)``; a bad
    value is a usage error (``parser.error``)."""
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
        cases = list(default_cases)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.min_time is not None and args.min_time < 0:
        parser.error("--min-time must be >= 0")
    return dtypes, cases


def _timing(device, args) -> bm.Timing:
    """``device``'s timing (its quick one with ``--quick``) with
    ``--repeat``, ``--warmup`` and ``--min-time`` applied."""
    t = device.quick_timing if args.quick else device.default_timing
    over = {f: v for f, v in (("repeat", args.repeat), ("warmup", args.warmup),
                              ("min_time", args.min_time)) if v is not None}
    return dataclasses.replace(t, **over)


def _check_paths(parser, *options: tuple[str, str | None]) -> None:
    """A usage error unless the directory of each given ``(option, path)`` exists."""
    for option, path in options:
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{option}: no directory {os.path.dirname(os.path.abspath(path))!r} to write {path!r} in")


def _write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def run_bench(args, parser, implementations=None, argv=()) -> int:
    if args.sync:
        return run_sync_bench(args, parser, argv)
    if args.list:
        return _print_list()
    if args.host_overhead:
        from ..bench import host_overhead

        return host_overhead.run(args.json)
    ops = _split(args.ops)
    for op in ops:
        if op not in bm.ALL_OPS:
            parser.error(f"--ops: unknown op {op!r}; valid: {', '.join(bm.ALL_OPS)}")
    if not ops:
        parser.error("--ops: nothing to run")
    dtypes, cases = _dtypes_and_cases(args, parser, bm.default_cases(ops, args.quick))
    if args.ceiling_mib is not None and args.ceiling_mib <= 0:
        parser.error("--ceiling-mib must be > 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be >= 1")
    if args.plot:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            parser.error('--plot needs matplotlib: pip install "bnkernels[plot]"')
    _check_paths(parser, ("--json", args.json), ("--plot", args.plot))
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
    timings = {k: _timing(d, args) for k, d in devices.items()}

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
        _write_json(args.json, _bench_payload(results, ceilings, devices, timings, args, info, torch_threads, date,
                                              argv))
        print(f"\nAll figures: {args.json}")
    if args.plot:
        where = "; ".join(f"{d.name} ({k.upper()})" for k, d in devices.items())
        state = "cache-cold (--cold)" if args.cold else "hot (inputs in cache as in a training loop)"
        bm.plot_results(results, args.plot,
                        title=f"bnkernels bench, {date}: each implementation's speed as % of a same-size copy, "
                              f"{state}\n{where}")
        print(f"{'' if args.json else chr(10)}Plot: {args.plot}")
    return EXIT_FAILED if failed else EXIT_OK


class _QuietParser:
    """The parser of a rank other than 0 under ``--sync``: the same usage
    errors (exit status 2), printed by rank 0 only."""

    def __init__(self, parser):
        self._parser = parser

    def error(self, message: str):
        raise SystemExit(EXIT_USAGE)

    def __getattr__(self, name):
        return getattr(self._parser, name)


#: options of the bench that ``--sync`` does not take, with their defaults
_NOT_WITH_SYNC = {"--ops": ("ops", ",".join(bm.OPS)), "--cold": ("cold", False), "--plot": ("plot", None),
                  "--ceiling-mib": ("ceiling_mib", None), "--torch-threads": ("torch_threads", None),
                  "--list": ("list", False), "--host-overhead": ("host_overhead", False)}


def _sync_backends(args, parser) -> list[str]:
    """The bnkernels CPU backends ``--backends`` names (default: every
    usable one); anything else is a usage error saying why."""
    catalog = bm.implementation_catalog()
    usable = [n for n, e in catalog.items() if e.role == bm.CANDIDATE and e.device == "cpu" and e.default
              and e.problem is None]
    if not args.backends:
        return usable
    names = _split(args.backends)
    for name in names:
        e = catalog.get(name)
        if e is None or e.role != bm.CANDIDATE or name.endswith(bm.OUT_SUFFIX):
            parser.error(f"--sync --backends: {name!r} is not a bnkernels backend (--sync times bn_forward and "
                         f"bn_backward with comm=); usable here: {', '.join(usable)}")
        if e.device != "cpu":
            parser.error(f"--sync --backends {name}: runs on the GPU; --sync times CPU backends only so far")
        if e.problem:
            parser.error(f"--sync --backends {name}: not usable here: {e.problem}")
    return names


def run_sync_bench(args, parser, argv=()) -> int:
    """``bnkernels bench --sync`` on every rank of ``MPI.COMM_WORLD``: the
    options checked (usage errors printed by rank 0 only), the rows measured
    (``bm.sync.run_sync_benchmarks``), rank 0's report and ``--json``.
    Returns the exit status, the same on every rank: 1 when a row is wrong
    or raised, 2 for a usage error or without MPI."""
    from ..bench import sync

    try:
        comm = sync.world()
    except RuntimeError as exc:
        print(f"bnkernels bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    lead = comm.rank == 0
    if not lead:
        parser = _QuietParser(parser)
    for option, (name, default) in _NOT_WITH_SYNC.items():
        if getattr(args, name) != default:
            parser.error(f"--sync does not take {option}")
    if args.device in ("gpu", "all"):
        parser.error(f"--sync --device {args.device}: --sync times CPU backends only so far")
    dtypes, cases = _dtypes_and_cases(args, parser, sync.SYNC_CASES)
    for case in cases:
        try:
            sync.split_case(case, comm.size)
        except ValueError as exc:
            parser.error(f"--shapes: {exc} (each shape is the whole batch, split equally over the ranks)")
    backends = _sync_backends(args, parser)
    if not backends:
        parser.error("--backends: no bnkernels CPU backend to run")
    _check_paths(parser, ("--json", args.json))

    timing = _timing(bm.CpuDevice, args)
    info = bm.system_info()
    mpi = sync.mpi_description(comm)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    progress = Progress() if lead else None
    results = sync.run_sync_benchmarks(comm, cases, dtypes, backends, timing, progress)
    threads = {}
    if "numba" in backends:
        import numba

        threads["numba"] = numba.get_num_threads()
    failed = [r for r in results if r.status != "ok"]
    if lead:
        progress.close()
        _print_sync(results, comm.size, mpi, threads, timing, info, date, dtypes)
        if failed:
            print(f"\n{len(failed)} row(s) failed: " + "; ".join(
                f"{r.backend} {r.shape_name} {r.dtype} {r.status.upper()}" for r in failed))
        if args.json:
            _write_json(args.json, {
                "bnkernels": info["bnkernels"], "date": date, "command": "bnkernels " + " ".join(argv),
                "system": info, "ranks": comm.size, "mpi": mpi, "threads_per_rank": threads,
                "timing": dataclasses.asdict(timing), "tolerance": dict(bm.TOLERANCE),
                "protocol": {"forward_header_values": sync.protocol.H, "backward_header_values": 2 * sync.protocol.H,
                             "initial_capacity": sync.protocol.INITIAL_CAPACITY},
                "results": [r.to_dict() for r in results]})
            print(f"\nAll figures: {args.json}")
    return EXIT_FAILED if failed else EXIT_OK


def _print_sync(results, size: int, mpi: dict, threads: dict, timing: bm.Timing, info: dict, date: str,
                dtypes) -> None:
    """Rank 0's report of ``bnkernels bench --sync``: the machine, what was
    measured and how, then the table."""
    from ..bench import sync

    _print_machine(info, date, what="bench --sync")
    hosts = sorted(set(mpi["hosts"]))
    print(f"MPI: {mpi['library']} (mpi4py {mpi['mpi4py']}), {size} rank{'s' if size != 1 else ''} on "
          f"{len(hosts)} host{'s' if len(hosts) != 1 else ''} ({', '.join(hosts)})")
    if size == 1:
        _para(f"World size 1 (no mpiexec, or -n 1): every collective goes to this process alone, so the rows show "
              f"the protocol's own cost, no communication. Across processes: {sync.MPIEXEC_LINE}.")
    for name, n in threads.items():
        per_host = size // max(len(hosts), 1)
        _para(f"Threads: each rank's {name} backend uses {n} thread{'s' if n != 1 else ''}; {per_host} rank(s) per "
              f"host share its {info['cpus_usable']} usable cores"
              + (" (oversubscribed: the times include that contention)" if per_host * n > info["cpus_usable"]
                 else "") + ".")
    _para("Step: bn_forward (training, running statistics updated) then bn_backward, through the public "
          "functions: synchronized (comm= a bnkernels.distributed.MPI adapter inside a timing Communicator that "
          "keeps the protocol's state; a fresh one per row) and local (no comm, each rank on its part alone, "
          "all ranks at once). Each shape is the whole batch, split equally along its batch axis.")
    _para("Checked before timing against the float64 bnkernels.reference: the synchronized y and dx (each rank's "
          "part), saved and running statistics, and dgamma, dbeta summed over the ranks, against the whole "
          "batch; the local step against its part. max |error| / max |reference| <= "
          + ", ".join(f"{d} {bm.TOLERANCE[d]:.0e}" for d in dtypes) + "; a WRONG result is not timed and fails "
          "the command.")
    _para(f"Timing: {_timing_text(timing, bm.CpuDevice.timer)}; the number of timed calls is the same on every "
          "rank (from the slowest rank's pilot call). sync ms, local ms: the slowest rank's median; sync/local "
          "their ratio. in colls: of the time all ranks spent in synchronized steps, the share inside "
          "allgather/allreduce, waiting for the other ranks included; coll ms: that time per step and rank; "
          "colls: collectives per step (2 in the steady state).")
    _para(f"Bytes each rank sends per step, read from the frames: payload = 2C+1 values (forward: count, mean, "
          f"M2; backward: sum dy, sum dy*xhat, count), padded to the protocol's capacity (from "
          f"{sync.protocol.INITIAL_CAPACITY} values, grown to the largest payload); fwd B = ({sync.protocol.H} "
          f"header + capacity) float64 all-gathered (each rank receives ranks x that), bwd B = "
          f"({2 * sync.protocol.H} header values + capacity) float64 all-reduced. GB/s: per rank, "
          f"{bm.BYTES_FACTOR['train'] + bm.BYTES_FACTOR['backward']} sizes of the rank's x (training forward 3 "
          "+ backward 5) over the median.")
    print()
    print(format_sync_table(results))


def add_bench_parser(sub) -> None:
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
                         help="comma list of operations (default: %(default)s; also: "
                              + ", ".join(op for op in bm.ALL_OPS if op not in bm.OPS) + "). Without --shapes, "
                              "each op runs on the named shapes that belong to it (--list)")
    p_bench.add_argument("--dtype", "--dtypes", dest="dtype", default=None,
                         help="comma list of float16, bfloat16 (needs ml_dtypes), float32, float64 "
                              f"(default: {DEFAULT_DTYPES}; {QUICK_DTYPES} with --quick)")
    p_bench.add_argument("--shapes", default=None,
                         help=f"comma list of named shapes ({names}; 'all' for every batch-norm one) or "
                              "SHAPE[@AXIS] such as 8x32x28x28 or 8x28x28x32@-1 (axis default 1). "
                              "Default: the named shapes of the selected ops")
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
    p_bench.add_argument("--host-overhead", action="store_true",
                         help="bnkernels' own host cost per call (µs, allocations, launches) on each GPU backend "
                              "with stand-in devices whose kernels do nothing, against torch's tiny CPU "
                              "F.batch_norm in the same run (no GPU needed), and exit")
    p_bench.add_argument("--list", action="store_true",
                         help="list the named shapes and the implementations usable here, and exit")
    p_bench.add_argument("--sync", action="store_true",
                         help="synchronized batch norm across MPI processes, run as "
                              "'mpiexec -n 2 python -m bnkernels bench --sync' (needs mpi4py: "
                              'pip install "bnkernels[mpi]"; without mpiexec: one rank). Each --shapes entry '
                              "is the whole batch, split equally over the ranks (default: "
                              + ", ".join(c.label for c in SYNC_CASES) + "); per (shape, dtype, backend) a "
                              "training forward + backward with comm= and the same local step without, timed "
                              "in the same run, with the collectives' share of the time and the bytes each "
                              "rank sends. Takes --shapes, --dtype, --backends (bnkernels CPU backends), "
                              "--repeat, --warmup, --min-time, --quick and --json; only rank 0 prints")
    p_bench.set_defaults(subparser=p_bench)
