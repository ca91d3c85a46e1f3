"""The ``bnkernels`` command: ``bnkernels info`` and ``bnkernels bench``.

Argument parsing and printing only; what is measured and how lives in
:mod:`bnkernels.benchmark`. Exit codes: 0 success, 2 usage error, 1 when an
implementation produced a wrong result (or raised) in ``bench``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from typing import Sequence

import numpy as np

from . import benchmark as bm

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------

def info_data() -> dict:
    """What ``bnkernels info --json`` prints: :func:`bnkernels.benchmark.system_info`
    plus ``backends``, a list of ``{name, device, available, implemented, reason,
    install}``."""
    from . import available_backends

    data = bm.system_info()
    data["backends"] = [
        {"name": s.name, "device": s.device, "available": s.available, "implemented": s.implemented,
         "reason": s.reason, "install": s.install}
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
            rows.append([b["name"], b["device"], "yes", ""])
        elif not b["implemented"]:
            rows.append([b["name"], b["device"], "planned", "not in this release"
                         + ("" if "not implemented" in b["reason"] else f" (and here: {b['reason']})")])
        else:
            rows.append([b["name"], b["device"], "no", f"why: {b['reason']}"])
            rows.append(["", "", "", f"to get it: {b['install']}"])
    print(_format_table(["backend", "device", "usable", "why not / what to install"], rows,
                        [False] * 4, free_last=True))
    return EXIT_OK


# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------

DTYPE_NAMES = ("float16", "float32", "float64")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def select_implementations(names: list[str] | None, parser: argparse.ArgumentParser,
                           torch_threads: int | None = None):
    """Implementations for ``--backends`` (None: every usable CPU backend,
    textbook-numpy, and torch when it imports). Unknown or unusable names
    are usage errors."""
    from . import available_backends

    statuses = available_backends()
    if names is None:
        impls = [bm.bnkernels_implementation(s.name) for s in statuses.values()
                 if s.device == "cpu" and s.available]
        impls.append(bm.TEXTBOOK_NUMPY)
        torch_impl = bm.torch_implementation(torch_threads)
        if torch_impl is not None:
            impls.append(torch_impl)
        return impls
    impls = []
    for name in names:
        if name == bm.BASELINE:
            impls.append(bm.TEXTBOOK_NUMPY)
        elif name == "torch":
            torch_impl = bm.torch_implementation(torch_threads)
            if torch_impl is None:
                parser.error("--backends torch: torch does not import here "
                             '(pip install "bnkernels[torch]")')
            impls.append(torch_impl)
        elif name in statuses:
            s = statuses[name]
            if s.device != "cpu":
                parser.error(f"--backends {name}: GPU backends are not benchmarked by this version")
            if not s.available:
                parser.error(f"--backends {name}: not usable here: {s.reason}; to get it: {s.install}")
            impls.append(bm.bnkernels_implementation(name))
        else:
            valid = ", ".join([*statuses, bm.BASELINE, "torch"])
            parser.error(f"--backends: unknown name {name!r}; valid: {valid}")
    return impls


def _fmt_ms(s):
    return f"{s * 1e3:.3f}" if s is not None else "-"


def _result_row(r: bm.Result) -> list[str]:
    base = [r.op, "x".join(map(str, r.shape)), r.layout, r.dtype, r.implementation]
    if r.status == "ok":
        return base + [
            _fmt_ms(r.median_s),
            f"{r.min_s * 1e3:.3f}-{r.max_s * 1e3:.3f}",
            f"{r.gbps:.2f}",
            f"{r.pct_of_ceiling:.0f}%" if r.pct_of_ceiling is not None else "-",
            f"{r.speedup_vs_textbook:.2f}x" if r.speedup_vs_textbook is not None else "-",
        ]
    if r.status == "wrong":
        text = f"WRONG (max err {r.max_err:.2e}, tolerance {r.tolerance:.0e})"
    elif r.status == "unsupported":
        text = f"n/a ({r.message})"
    else:
        text = f"ERROR ({r.message})"
    return base + [text]


def _print_bench(results, ceiling: bm.Ceiling, args, info: dict, torch_threads, cases, dtypes) -> None:
    def para(text):
        print(textwrap.fill(text, width=100, subsequent_indent="  "))

    torch_text = f", torch {info['torch']} ({torch_threads} thread{'s' if torch_threads != 1 else ''})" if torch_threads else ""
    print(f"bnkernels {info['bnkernels']} bench | Python {info['python']}, NumPy {info['numpy']}{torch_text}")
    print(f"CPU: {info['cpu']}, {info['cpu_count']} cores ({info['cpus_usable']} usable)")
    para(f"Bytes model: {bm.BYTES_MODEL}.")
    para(f"Ceiling: np.copyto of a {ceiling.buffer_bytes / bm.MiB:.0f} MiB buffer, read + write "
         f"counted: {ceiling.median_s * 1e3:.2f} ms median = {ceiling.gbps:.2f} GB/s.")
    para(f"Timing: {args.warmup} warm-up + {args.repeat} timed calls (time.perf_counter); "
         "median and min-max spread in ms.")
    tol = ", ".join(f"{d.name} {t:.0e}" for d, t in bm.TOLERANCE.items())
    para(f"Checked before timing against the float64 bnkernels.reference: max |error| / max |reference| "
         f"<= {tol}; a WRONG result is not timed.")
    llc = info.get("last_level_cache_bytes")
    largest = max(math.prod(c.shape) * np.dtype(d).itemsize for c in cases for d in dtypes)
    if llc and 2 * largest <= llc:
        para(f"Note: the inputs (largest {largest / bm.MiB:.1f} MiB) fit in the "
             f"{llc / bm.MiB:.0f} MiB last-level cache, so GB/s can exceed the copy ceiling.")
    print()
    headers = ["op", "shape", "layout", "dtype", "implementation", "median ms", "min-max ms", "GB/s",
               "% ceil", f"vs {bm.BASELINE}"]
    right = [False] * 5 + [True] * 5
    print(_format_table(headers, [_result_row(r) for r in results], right))


def _cmd_bench(args, parser, implementations=None) -> int:
    ops = _split(args.ops)
    for op in ops:
        if op not in bm.OPS:
            parser.error(f"--ops: unknown op {op!r}; valid: {', '.join(bm.OPS)}")
    dtypes = _split(args.dtype)
    for d in dtypes:
        if d not in DTYPE_NAMES:
            parser.error(f"--dtype: unsupported {d!r}; valid: {', '.join(DTYPE_NAMES)}")
    if args.shapes:
        try:
            cases = [bm.parse_case(s) for s in _split(args.shapes)]
        except ValueError as exc:
            parser.error(f"--shapes: {exc}")
    else:
        cases = list(bm.QUICK_CASES if args.quick else bm.DEFAULT_CASES)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    if args.ceiling_mib is not None and args.ceiling_mib <= 0:
        parser.error("--ceiling-mib must be > 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be >= 1")
    if implementations is not None:
        impls = list(implementations)
    else:
        impls = select_implementations(_split(args.backends) if args.backends else None, parser,
                                       args.torch_threads)
    if not impls:
        parser.error("--backends: nothing to run")

    def progress(i, total, label):
        print(f"[{i}/{total}] {label}", file=sys.stderr, flush=True)

    info = bm.system_info()
    torch = bm.import_torch() if any(i.name == "torch" for i in impls) else None
    torch_threads = torch.get_num_threads() if torch is not None else None

    print("[ceiling] np.copyto", file=sys.stderr, flush=True)
    ceiling_bytes = int(args.ceiling_mib * bm.MiB) if args.ceiling_mib is not None else None
    ceiling = bm.measure_copy_ceiling(ceiling_bytes, repeat=args.repeat, warmup=args.warmup)
    results = bm.run_benchmarks(impls, cases, ops, dtypes, repeat=args.repeat, warmup=args.warmup,
                                progress=progress)
    bm.add_derived(results, ceiling)
    _print_bench(results, ceiling, args, info, torch_threads, cases, dtypes)

    # A wrong comparison point (e.g. textbook NumPy accumulating float16) is
    # shown, but only a wrong bnkernels result fails the command.
    failed = [r for r in results if r.status in ("wrong", "error") and r.implementation not in bm.COMPARISONS]
    if failed:
        print(f"\n{len(failed)} result(s) failed: "
              + "; ".join(f"{r.implementation} {r.op} {r.layout} {r.dtype} {r.status.upper()}"
                          for r in failed))
    if args.json:
        payload = {
            "system": info,
            "torch_threads": torch_threads,
            "bytes_model": bm.BYTES_MODEL,
            "tolerance": {d.name: t for d, t in bm.TOLERANCE.items()},
            "repeat": args.repeat,
            "warmup": args.warmup,
            "ceiling": vars(ceiling),
            "baseline": bm.BASELINE,
            "results": [r.to_dict() for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return EXIT_FAILED if failed else EXIT_OK


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

    p_bench = sub.add_parser(
        "bench", help="check and time every CPU implementation",
        description="Check every implementation against the float64 reference, then time it. "
                    "Exit status 1 if a bnkernels result is wrong.")
    p_bench.add_argument("--quick", action="store_true",
                         help="small shapes and 3 repeats (well under a minute)")
    p_bench.add_argument("--ops", default=",".join(bm.OPS),
                         help="comma list of operations (default: %(default)s)")
    p_bench.add_argument("--dtype", default="float32",
                         help="comma list of float16, float32, float64 (default: %(default)s)")
    p_bench.add_argument("--backends", default=None,
                         help="comma list of implementations: CPU backend names, "
                              f"{bm.BASELINE}, torch (default: all usable)")
    p_bench.add_argument("--shapes", default=None,
                         help="comma list of SHAPE[@AXIS], e.g. 8x32x28x28,8x28x28x32@-1,2048x256 "
                              "(axis default 1; default: NCHW, NHWC and 2-D shapes)")
    p_bench.add_argument("--repeat", type=int, default=None,
                         help="timed calls per measurement (default 5, 3 with --quick)")
    p_bench.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p_bench.add_argument("--ceiling-mib", type=float, default=None,
                         help="copy buffer for the bandwidth ceiling in MiB "
                              "(default: 4x last-level cache, clamped to 64..256)")
    p_bench.add_argument("--torch-threads", type=int, default=None,
                         help="torch.set_num_threads for the torch comparison (default: torch's own)")
    p_bench.add_argument("--json", metavar="FILE", default=None, help="write all figures to FILE")
    p_bench.set_defaults(subparser=p_bench)

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
    :class:`bnkernels.benchmark.Implementation` objects instead of the ones
    ``--backends`` selects (for scripts and tests).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "info":
            return _cmd_info(args)
        if args.command == "kernels":
            return _cmd_kernels(args)
        return _cmd_bench(args, args.subparser, implementations)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
