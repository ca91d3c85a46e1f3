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
