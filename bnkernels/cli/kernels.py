"""``bnkernels kernels``: the NVRTC compile and SASS resource report of the CUDA C++ kernels."""
from __future__ import annotations

import json
import sys

from .exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .tables import format_table


def run_kernels(args) -> int:
    """``bnkernels kernels``: compile the CuPy kernels with NVRTC as CuPy
    would, for each ``--arch``, and print each instantiation's resources and
    global/local memory instructions (:mod:`bnkernels.kernel_report`).
    Exit 1 when a tool is missing or the sources do not compile."""
    from .. import kernel_report as kr

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
    print(format_table(["kernel", "arch", "regs", "smem B", "stack B", "spill B", "LDL/STL",
                         "128-bit ld/st", "narrower ld/st", "vectorized"],
                        rows, [False, False] + [True] * 7 + [False]))
    return EXIT_OK
