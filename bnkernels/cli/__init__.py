"""The ``bnkernels`` command: ``info``, ``bench`` and ``kernels``, one module each.

Argument parsing and printing only; what is measured and how lives in
:mod:`bnkernels.bench`. Exit codes: 0 success, 2 usage error, 1 when an
implementation produced a wrong result (or raised) in ``bench``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import bench as bm
from .exits import EXIT_USAGE
from .bench import Progress, add_bench_parser, run_bench, select_implementations
from .info import info_data, run_info
from .kernels import run_kernels
from .tables import format_results_table

__all__ = ["Progress", "build_parser", "format_results_table", "info_data", "main", "select_implementations"]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the ``info``, ``bench`` and ``kernels`` subcommands."""
    parser = argparse.ArgumentParser(prog="bnkernels", description="bnkernels command-line tool")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_info = sub.add_parser("info", help="versions, CPU and which backends are usable here")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(subparser=p_info)

    add_bench_parser(sub)

    p_kernels = sub.add_parser(
        "kernels", help="compile the CUDA kernels (no GPU needed) and report their resources",
        description="Compile every CuPy kernel instantiation with NVRTC and CuPy's options, then "
                    "print registers, shared memory, stack, spills, local-memory instructions "
                    "(LDL/STL) and 128-bit global loads/stores from cuobjdump -sass. Needs "
                    '"cuda-bindings==13.*" and "cuda-toolkit[nvrtc,cudart,cuobjdump,nvdisasm]==13.*".')
    p_kernels.add_argument("--arch", action="append", metavar="SM",
                           help="real architecture, repeatable (default: sm_80 and sm_90)")
    p_kernels.add_argument("--json", action="store_true", help="print as JSON")
    p_kernels.add_argument("--sass", metavar="DIR", default=None,
                           help="also write the SASS of every kernel, one file per kernel and arch, into DIR")
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
            return run_info(args)
        if args.command == "kernels":
            return run_kernels(args)
        return run_bench(args, args.subparser, implementations, argv)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

