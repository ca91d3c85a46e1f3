"""``bnkernels kernels``: the compile and SASS resource report of the GPU
kernels, the CUDA C++ ones (NVRTC, as CuPy compiles them) and the numba-cuda
ones (Numba's PTX, ptxas): resources, memory instructions, the hot loops'
instructions per byte (``sass_loops``), blocks per SM, and the launch
geometry the plans choose for the named bench shapes on an H100."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .tables import format_table


def run_kernels(args) -> int:
    """``bnkernels kernels``: compile the CuPy kernels with NVRTC as CuPy
    would, and the numba-cuda kernels with Numba and ptxas, for each
    ``--arch``, and print each kernel's resources, global/local memory
    instructions and hot loops (:mod:`bnkernels.kernel_report`,
    :mod:`bnkernels.numba_report`, :mod:`bnkernels.sass_loops`). Without
    numba-cuda installed its kernels are left out with a note. Exit 1 when a
    tool is missing or a kernel does not compile."""
    from .. import kernel_report as kr
    from .. import numba_report as nr

    archs = list(dict.fromkeys(args.arch or kr.DEFAULT_ARCHS))
    numba_skipped = nr.numba_cuda_missing()
    try:
        archs = [kr.normalize_arch(a) for a in archs]
        inspected = [("cupy", arch, *kr.inspect_with_sass(arch)) for arch in archs]
        version = "%d.%d" % kr.nvrtc_version()
        if numba_skipped is None:  # one cubin per kernel, so one SASS text each
            inspected += [(nr.BACKEND, arch, [r], sass) for arch in archs
                          for r, sass in zip(*nr.inspect_with_sass(arch))]
    except ValueError as exc:
        print(f"bnkernels kernels: --arch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (kr.KernelToolError, kr.KernelCompileError) as exc:
        print(f"bnkernels kernels: {exc}", file=sys.stderr)
        return EXIT_FAILED
    reports, loops = _hot_loops(inspected, args.sass)
    numba_info = {"version": nr.numba_cuda_version(), "ptxas": nr.ptxas_version(), "skipped": numba_skipped}
    if args.json:
        options = kr.bnkernels_sources().options
        kernels = [{**r.to_dict(), "hot_loops": [lp.to_dict() for lp in loops[(r.backend, r.arch, r.name_expression)]],
                    "blocks_per_sm": blocks_per_sm(r)} for r in reports]
        print(json.dumps({"nvrtc_version": version, "archs": archs,
                          "nvrtc_options": {a: list(kr.compile_options(options, a)) for a in archs},
                          "numba_cuda": numba_info, "kernels": kernels, "h100_geometry": h100_geometry()},
                         indent=2))
        return EXIT_OK
    print(f"NVRTC {version}, options as cupy.RawModule passes them; resources from ptxas, "
          "memory instructions from cuobjdump -sass")
    _print_table([r for r in reports if r.backend == "cupy"], loops)
    print()
    if numba_skipped:
        print(f"numba-cuda kernels: not inspected: {numba_skipped}")
    else:
        print(f"numba-cuda {numba_info['version']}: PTX from numba.cuda.compile_ptx, assembled by ptxas "
              f"{numba_info['ptxas']} (the driver JIT-compiles the same PTX at run time), "
              "memory instructions from cuobjdump -sass")
        _print_table([r for r in reports if r.backend == nr.BACKEND], loops)
    print("hot loop instr/B: the innermost loop with global loads that spends the most instructions per byte "
          "(instructions per iteration / bytes loaded per iteration; budget about 10 on an H100, 7 on an H200). "
          f"blocks/SM: resident blocks of {BLOCK_THREADS} threads by registers, shared memory and threads.")
    print()
    print(f"launch geometry on an H100 ({H100_SMS} SMs), default tuning:")
    geo = h100_geometry()
    print(format_table(["shape", "layout", "reduce grid", "reduce block", "elementwise grid", "elementwise block"],
                       [[g["shape"], g["layout"], str(tuple(g["reduce_grid"])), str(tuple(g["reduce_block"])),
                         str(g["elementwise_grid"]), str(g["elementwise_block"])] for g in geo],
                       [False, False, True, True, True, True]))
    if args.sass:
        where = f"{args.sass}/<arch>/" + ("" if numba_skipped else f" and {args.sass}/{nr.BACKEND}/<arch>/")
        print(f"\nSASS written to {where}")
    return EXIT_OK


def _hot_loops(inspected, sass_dir):
    """All reports, in order, and the hot loops of each by (backend, arch,
    name expression); writes the SASS files when ``sass_dir`` is given: the CuPy
    kernels' to ``DIR/<arch>/``, the numba-cuda ones' to ``DIR/numba-cuda/<arch>/``."""
    from .. import sass_loops

    reports, loops = [], {}
    for backend, arch, arch_reports, sass in inspected:
        fns = sass_loops.functions(sass)
        for r in arch_reports:
            reports.append(r)
            loops[(backend, arch, r.name_expression)] = sass_loops.hot_loops(fns.get(r.lowered_name, []))
        if sass_dir:
            folder = Path(sass_dir) / arch if backend == "cupy" else Path(sass_dir) / backend / arch
            _write_sass(folder, arch_reports, sass_loops.function_texts(sass))
    return reports, loops


def _print_table(reports, loops) -> None:
    from .. import sass_loops

    rows = []
    for r in reports:
        w = sass_loops.worst(loops[(r.backend, r.arch, r.name_expression)])
        hot = "-" if w is None else f"{w.instructions}/{w.load_bytes}={w.per_byte:.1f}"
        rows.append([r.name_expression, r.arch, str(r.registers), str(r.shared_bytes), str(r.stack_bytes),
                     str(r.spill_bytes), str(r.local_memory_ops), str(blocks_per_sm(r)), hot,
                     f"{r.vector_loads}/{r.vector_stores}", f"{r.scalar_global_loads}/{r.scalar_global_stores}",
                     "yes" if r.vectorized else "no"])
    print(format_table(["kernel", "arch", "regs", "smem B", "stack B", "spill B", "LDL/STL", "blocks/SM",
                        "hot loop instr/B", "128-bit ld/st", "narrower ld/st", "vectorized"],
                       rows, [False, False] + [True] * 9 + [False]))


#: What the plans launch (``gpu.geometry.Tuning().block_threads``) and the
#: per-SM limits of sm_80 / sm_90 (registers, shared memory usable by blocks,
#: threads, blocks).
BLOCK_THREADS = 256
H100_SMS = 132
_SM_LIMITS = {"sm_80": (65536, 164 * 1024, 2048, 32), "sm_90": (65536, 228 * 1024, 2048, 32)}


def blocks_per_sm(report) -> int | None:
    """Resident blocks of :data:`BLOCK_THREADS` threads per SM for a kernel,
    by the rules the plans size grids with (``gpu.geometry.resident_blocks``:
    registers per warp in units of 256, static shared memory plus 1 KiB per
    block); None for an architecture without limits here."""
    from ..backends.gpu import geometry

    limits = _SM_LIMITS.get(report.arch)
    if limits is None:
        return None
    registers, shared, threads, blocks = limits
    device = geometry.DeviceLimits(sm_count=1, max_threads_per_sm=threads, registers_per_sm=registers,
                                   shared_per_sm=shared, max_blocks_per_sm=blocks)
    return geometry.resident_blocks(device, BLOCK_THREADS, report.registers, report.shared_bytes)


def h100_geometry() -> list[dict]:
    """The reduction and elementwise launches the plans choose for each
    named bench shape on an H100 (132 SMs)."""
    from ..backends.gpu import geometry
    from ..bench.ops import DEFAULT_CASES

    limits = geometry.DeviceLimits(sm_count=H100_SMS)
    out = []
    for case in DEFAULT_CASES:  # the batch-norm shapes (the norm family has no GPU kernels yet)
        name = case.name
        shape, axis = case.shape, case.axis % len(case.shape)
        outer = 1
        for n in shape[:axis]:
            outer *= n
        inner = 1
        for n in shape[axis + 1:]:
            inner *= n
        r = geometry.reduce_plan(outer, shape[axis], inner, limits)
        e = geometry.elementwise_plan(outer * shape[axis] * inner, limits)
        out.append({"shape": name, "layout": case.layout, "reduce_grid": list(r.grid), "reduce_block": list(r.block),
                    "elementwise_grid": e.grid, "elementwise_block": e.block})
    return out


def _write_sass(folder: Path, reports, texts: dict) -> None:
    """One ``.sass`` file per kernel, named after its name expression."""
    folder.mkdir(parents=True, exist_ok=True)
    for r in reports:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", r.name_expression).strip("_")
        (folder / f"{name}.sass").write_text(texts.get(r.lowered_name, ""))
