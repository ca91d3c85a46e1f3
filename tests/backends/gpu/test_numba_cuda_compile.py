"""Every numba-cuda kernel specialization compiles for real GPUs.

Runs in the normal (non-simulator) test process: ``numba.cuda.compile_ptx``
needs no GPU, and ptxas (from ``cuda-toolkit[nvcc]``) assembles the PTX for
sm_80 and sm_90 and reports registers and spills. The PTX comes from
``bnkernels.numba_report.ptx``, compiled once per process, so that
``tests/test_kernel_report.py`` (the SASS of the same kernels) in the same
run does not compile it again.
"""
import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile_ptx is not available under the CUDA simulator", allow_module_level=True)
pytest.importorskip("numba.cuda")

from bnkernels import numba_report, ptxas  # noqa: E402

ARCHS = ("sm_80", "sm_90")
#: Register budget per thread: with at most 128 registers a 256-thread block
#: always fits (65536 registers per SM) and 2 blocks are resident per SM.
MAX_REGISTERS = 128

TARGETS = numba_report.targets()
PTXAS = ptxas.find_ptxas()


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """All PTX at once, in parallel processes (``numba_report.compile_all``)."""
    if PTXAS is not None:
        numba_report.compile_all(ARCHS)


@pytest.fixture(scope="module")
def report():
    """Resource table collected by the tests, printed at the end."""
    rows = []
    yield rows
    print("\nnumba-cuda kernels: registers / spill bytes / shared bytes")
    for row in sorted(rows):
        print("  {:<13} {:<8} {:<6} regs={:<4} spills={:<3} smem={}".format(*row))


@pytest.mark.skipif(PTXAS is None, reason='ptxas not found: pip install "cuda-toolkit[nvcc]"')
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("target", TARGETS, ids=[f"{t.kernel}-{t.storage}" for t in TARGETS])
def test_kernel_compiles_without_spills(target, arch, report):
    name, storage = target.kernel, target.storage
    ptx = numba_report.ptx(target, arch)
    assert f".target {arch}" in ptx  # compiled for that compute capability
    entries = ptxas.assemble(ptx, arch, PTXAS)
    assert len(entries) == 1, f"expected one entry function, got {[e.kernel for e in entries]}"
    res = entries[0]
    report.append((name, storage, arch, res.registers, res.spills, res.shared_bytes))
    assert res.spills == 0, f"{name}[{storage}] spills {res.spills} bytes on {arch}"
    assert res.stack_bytes == 0, f"{name}[{storage}] uses {res.stack_bytes} bytes of stack on {arch}"
    assert res.registers <= MAX_REGISTERS, f"{name}[{storage}] uses {res.registers} registers on {arch}"


def test_ptxas_report_parser():
    """The parser reads what ptxas prints (a real report, abridged)."""
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 70 registers, used 1 barriers, 12292 bytes smem
"""
    (res,) = ptxas.parse_report(text)
    assert (res.kernel, res.arch, res.registers, res.shared_bytes) == ("_Z3fooPf", "sm_90", 70, 12292)
    assert (res.stack_bytes, res.spill_store_bytes, res.spill_load_bytes, res.spills) == (8, 4, 12, 16)


#: The kernels of issue 13 (the fused residual, relu_backward, bfloat16
#: storage) whose streaming loops are held to the project's bound on sm_90.
PER_BYTE = 3.0


def _issue13(target):
    """The 32-bit index variants (every tensor below 2^31 elements; the
    64-bit ones spend more on index arithmetic: about 3.1-3.5 instructions
    per byte for the 16-bit planes kernels, not held to the bound)."""
    return target.kernel.endswith("_i32") and (
        target.kernel.startswith(("apply_residual", "relu_backward"))
        or (target.storage == "bfloat16" and target.kernel.startswith(("apply", "dx"))))


@pytest.mark.skipif(numba_report.missing() is not None, reason=numba_report.missing() or "")
def test_residual_relu_backward_and_bfloat16_loops_per_byte():
    """On sm_90 the 16-byte loop (the first hot loop) of every apply_residual,
    relu_backward and bfloat16 elementwise kernel (:func:`_issue13`) runs at most
    :data:`PER_BYTE` instructions per loaded byte, or no more than the
    float16 kernel of the same code (bfloat16 apply: its float16 twin's
    level, the coefficient selects of the planes kernel). The table (every
    hot loop, the single-element ones too) is printed."""
    from bnkernels import kernel_report as kr, sass_loops

    def loops(target):
        compiled = numba_report.compile_target(target, "sm_90")
        sass = kr.disassemble(compiled.cubin)
        (r,) = kr.build_reports(compiled, sass, "sm_90", backend=numba_report.BACKEND)
        found = sass_loops.hot_loops(sass_loops.functions(sass)[r.lowered_name])
        return r, found

    by_name = {t.name_expression: t for t in TARGETS}
    print("\nsm_90 hot loops (instructions / loaded bytes per iteration):")
    for target in filter(_issue13, TARGETS):
        r, found = loops(target)
        print(f"  {target.name_expression:<36} regs={r.registers:<3} spills={r.spill_bytes} "
              + "; ".join(f"{lp.instructions}/{lp.load_bytes}={lp.per_byte:.2f}" for lp in found))
        assert found and found[0].loads.get(128, 0) > 0, target.name_expression  # the 16-byte loop
        bound = PER_BYTE
        if target.storage == "bfloat16":
            twin = by_name[target.name_expression.replace("[bfloat16]", "[float16]")]
            bound = max(bound, loops(twin)[1][0].per_byte)
        assert found[0].per_byte <= bound, (target.name_expression, found[0].per_byte, bound)
