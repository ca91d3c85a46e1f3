"""Compile CUDA C++ as cupy.RawModule would and inspect the SASS
(``bnkernels.kernel_report``, ``bnkernels kernels``). No GPU needed.

Needs NVRTC with its Python binding and the CUDA headers, plus cuobjdump and
the nvdisasm it runs::

    pip install "cuda-bindings==13.*" \\
        "cuda-toolkit[nvrtc,cudart,cuobjdump,nvdisasm]==13.*"

Tests that need them skip with that reason when they are missing. Each
architecture is compiled once per module (module-scoped fixtures).

Two sets of sources:

- ``tests/kernel_inspect_data/vec_kernels.cu``, a small fixture whose
  kernels are known to have 16-byte accesses, shared memory, local memory or
  spills: checks that the report sees each of them (always);
- bnkernels' own CuPy kernels (``bnkernels.backends.cupy_backend.sources``,
  skipped when that module is absent): every instantiation compiles for
  sm_80 and sm_90 with no spills and no LDL/STL, and the float32 and half
  apply kernels use 128-bit global loads and stores.
"""
import json
import re
import sys
import subprocess
from pathlib import Path

import pytest

from bnkernels import kernel_report as kr
from bnkernels import numba_report as nr
from bnkernels.ptxas import parse_report
from bnkernels.cli import main

ARCHS = ("sm_80", "sm_90")
DATA = Path(__file__).parent / "kernel_inspect_data"
TEST_SOURCE = DATA / "vec_kernels.cu"
TEST_OPTIONS = ("--std=c++17", f"-I{DATA}")
TEST_NAMES = ["scale_vec<float>", "scale_vec<__half>", "scale_scalar<float>", "scale_scalar<__half>",
              "block_sum<float>", "local_array", "spill_prone"]


def _missing(check) -> str | None:
    try:
        check()
    except kr.KernelToolError as exc:
        return str(exc)
    return None


NVRTC_MISSING = _missing(kr.nvrtc_version)  # compiling and ptxas' report
SASS_MISSING = _missing(kr.find_cuobjdump)  # cuobjdump -sass
MISSING = NVRTC_MISSING or SASS_MISSING
needs_nvrtc = pytest.mark.skipif(NVRTC_MISSING is not None, reason=NVRTC_MISSING or "")
needs_tools = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def _by_name(reports):
    return {r.name_expression: r for r in reports}


# --------------------------------------------------------------------------
# SASS parsing (no tools needed)
# --------------------------------------------------------------------------

SASS_SNIPPET = """
	code for sm_90
		Function : _Z1fPKfPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
        /*0110*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;  /* 0x0000000402087981 */
        /*0120*/               @!P0 LDG.E.LTC128B.128 R12, desc[UR4][R2.64] ;  /* 0x0000000402087981 */
        /*0130*/                   LDG.E.64 R4, desc[UR4][R2.64] ;           /* 0x0000000402087981 */
        /*0140*/                   LDG.E R6, desc[UR4][R2.64] ;              /* 0x0000000402087981 */
        /*0150*/               @P1 STG.E.128 desc[UR4][R4.64], R8 ;           /* 0x0000000804007986 */
        /*0160*/                   STG.E.U16 desc[UR4][R4.64], R8 ;           /* 0x0000000804007986 */
		Function : _Z1gv
        /*0000*/                   STL.128 [R1], RZ ;                         /* 0x000000ff01007387 */
        /*0010*/                   LDL R3, [R1+0x4] ;                         /* 0x000000ff01007387 */
        /*0020*/                   LD.E R3, desc[UR4][R2.64] ;                /* 0x000000ff01007387 */
        /*0030*/                   LDGSTS.E.128 [R1], desc[UR4][R2.64] ;      /* 0x000000ff01007387 */
        /*0040*/                   EXIT ;                                     /* 0x000000000000794d */
"""


def test_parse_sass_counts_global_accesses_by_width_and_local_memory():
    counts = kr.parse_sass(SASS_SNIPPET)
    f, g = counts["_Z1fPKfPf"], counts["_Z1gv"]
    # LTC128B is an L2 prefetch hint, not the width; predicates are skipped.
    assert dict(f.global_loads) == {128: 2, 64: 1, 32: 1}
    assert dict(f.global_stores) == {128: 1, 16: 1}
    assert (f.local_loads, f.local_stores, f.generic_loads) == (0, 0, 0)
    # STL.128 is local, not a vector global store; LDGSTS is not an LDG.
    assert (g.local_loads, g.local_stores, g.generic_loads) == (1, 1, 1)
    assert not g.global_loads and not g.global_stores


def test_normalize_arch():
    assert kr.normalize_arch("sm_90") == kr.normalize_arch("90") == kr.normalize_arch(90) == "sm_90"
    assert kr.normalize_arch("sm_90a") == "sm_90a"
    with pytest.raises(ValueError):
        kr.normalize_arch("compute_90")


def test_cupy_nvrtc_options_order_and_defaults():
    opts = kr.cupy_nvrtc_options(["-I/k", "-DX=1"], "sm_90", nvrtc_version=(13, 0),
                                 cupy_include="/c", cuda_include="/cuda/include")
    assert opts == ("-I/c/cupy/_cccl/cub", "-I/c/cupy/_cccl/thrust", "-I/c/cupy/_cccl/libcudacxx",
                    "-I/k", "-DX=1", "--std=c++17", "-I/c", "-I/cuda/include",
                    "-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")
    own_std = kr.cupy_nvrtc_options(["--std=c++20"], 80, nvrtc_version=(12, 1), cupy_include="/c",
                                    cuda_include="")
    assert "--std=c++17" not in own_std and "--std=c++20" in own_std
    assert "-I/c/cupy/_cuda/cuda-12" in own_std and "-arch=sm_80" in own_std
    with pytest.raises(ValueError, match="PTX"):  # CuPy would not ask for a cubin
        kr.cupy_nvrtc_options([], "sm_100", nvrtc_version=(12, 4), cupy_include="", cuda_include="")


@needs_nvrtc
def test_options_are_those_cupy_hands_to_nvrtc(monkeypatch):
    """Run CuPy's own RawModule compile path (``compile_with_cache`` with
    ``prepend_cupy_headers=False``, as RawModule calls it) with NVRTC replaced
    by a recorder; only the device query behind the arch option is stubbed."""
    pytest.importorskip("cupy")
    compiler = pytest.importorskip("cupy.cuda.compiler")
    from cupy._core import core

    calls = []

    class Recorded(Exception):
        pass

    class RecordingProgram:
        def __init__(self, src, name="", headers=(), include_names=(), name_expressions=None,
                     method="ptx"):
            self.name_expressions, self.method = name_expressions, method

        def compile(self, options=(), log_stream=None):
            calls.append((self.name_expressions, self.method, tuple(options)))
            if self.name_expressions:
                raise Recorded
            return b"", None  # CuPy's empty-file preprocessing step

    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    for var in ("CUPY_CUDA_COMPILE_WITH_DEBUG", "CUPY_COMPILE_WITH_PTX", "CUPY_NVRTC_USE_PCH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(compiler, "_NVRTCProgram", RecordingProgram)
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                        lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    monkeypatch.setattr(compiler, "_empty_file_preprocess_cache", {})
    for user in [("-I/k", "-DX=1"), ("--std=c++20", "-I/k")]:
        calls.clear()
        with pytest.raises(Recorded):
            core.compile_with_cache("__global__ void k() {}", user, arch="90",
                                    prepend_cupy_headers=False, name_expressions=("k",))
        names, method, cupy_options = calls[-1]
        assert method == "cubin"
        assert kr.cupy_nvrtc_options(user, "sm_90") == cupy_options


# --------------------------------------------------------------------------
# The test kernels
# --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=ARCHS)
def test_build(request):
    """(arch, compiled module, SASS, reports) of the test kernels."""
    if MISSING:
        pytest.skip(MISSING)
    arch = request.param
    compiled = kr.compile_cubin(TEST_SOURCE, TEST_NAMES, TEST_OPTIONS, arch)
    sass = kr.disassemble(compiled.cubin)
    return arch, compiled, sass, kr.build_reports(compiled, sass, arch)


@needs_tools
def test_compile_cubin_maps_name_expressions_to_lowered_names(test_build):
    arch, compiled, sass, reports = test_build
    cubin, lowered, log = compiled
    assert cubin[:4] == b"\x7fELF"
    assert set(lowered) == set(TEST_NAMES)
    assert lowered["scale_vec<float>"] == "_Z9scale_vecIfEvPKT_PS0_fx"
    assert lowered["scale_vec<__half>"] == "_Z9scale_vecI6__halfEvPKT_PS1_fx"
    assert f"for '{arch}'" in log
    assert [r.name_expression for r in reports] == TEST_NAMES
    assert all(r.arch == arch for r in reports)
    options = kr.compile_options(TEST_OPTIONS, arch)
    assert options[-4:] == ("-ftz=true", f"-arch={arch}", "--device-as-default-execution-space",
                            kr.PTXAS_VERBOSE)
    assert options[:-1] == kr.cupy_nvrtc_options(TEST_OPTIONS, arch)


@needs_tools
def test_sixteen_byte_accesses_are_seen(test_build):
    r = _by_name(test_build[3])
    for name in ("scale_vec<float>", "scale_vec<__half>"):
        assert (r[name].vector_loads, r[name].vector_stores) == (1, 1), name
        assert r[name].scalar_global_loads == r[name].scalar_global_stores == 0
        assert r[name].vectorized
    assert "LDG.E.128.CONSTANT" in test_build[2] and "STG.E.128" in test_build[2]
    assert r["scale_scalar<float>"].global_load_widths == {32: 1}
    assert r["scale_scalar<__half>"].global_store_widths == {16: 1}
    assert not r["scale_scalar<float>"].vectorized


@needs_tools
def test_shared_memory_local_memory_and_spills_are_seen(test_build):
    r = _by_name(test_build[3])
    assert r["block_sum<float>"].shared_bytes == 256 * 4
    clean = [r[n] for n in ("scale_vec<float>", "scale_vec<__half>", "scale_scalar<float>",
                            "block_sum<float>")]
    assert all(k.spill_bytes == 0 and k.local_memory_ops == 0 and k.stack_bytes == 0 for k in clean)
    local = r["local_array"]
    assert local.stack_bytes == 64 * 4 and local.spill_bytes == 0
    assert local.local_stores > 0 and local.local_loads > 0
    spill = r["spill_prone"]
    assert spill.spill_bytes > 0 and spill.local_memory_ops > 0
    assert spill.resources.spill_store_bytes > 0 and spill.resources.spill_load_bytes > 0


@needs_tools
def test_resources_agree_with_cuobjdump_res_usage(test_build, tmp_path_factory):
    """ptxas' figures, as attributed per kernel, are those in the cubin."""
    _, compiled, _, reports = test_build
    path = tmp_path_factory.mktemp("cubin") / "m.cubin"
    path.write_bytes(compiled.cubin)
    out = subprocess.run([kr.find_cuobjdump()[0], "-res-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", out))
    for r in reports:
        fields = dict(kv.split(":", 1) for kv in usage[r.lowered_name].split())
        assert int(fields["REG"]) == r.registers, r.name_expression
        # sm_90 cubins add the 1 KiB of shared memory the system reserves per
        # block to the kernel's shared section; ptxas reports the kernel's own.
        assert int(fields["SHARED"]) in (r.shared_bytes, r.shared_bytes + 1024), r.name_expression
        assert int(fields["STACK"]) == r.stack_bytes, r.name_expression


@needs_tools
def test_resource_report_option_leaves_machine_code_unchanged(test_build):
    arch, compiled, sass, _ = test_build
    quiet = kr.compile_cubin(TEST_SOURCE, TEST_NAMES, TEST_OPTIONS, arch, resource_report=False)
    assert "ptxas info" not in quiet.log
    assert quiet.lowered_names == compiled.lowered_names
    assert kr.disassemble(quiet.cubin) == sass


@needs_nvrtc
def test_quoted_includes_resolve_only_through_include_options():
    # As under CuPy, the program is not compiled from its own folder.
    with pytest.raises(kr.KernelCompileError, match="vec_common.cuh") as info:
        kr.compile_cubin(TEST_SOURCE, ["scale_vec<float>"], ["--std=c++17"], "sm_90")
    assert "vec_common.cuh" in info.value.log and "-arch=sm_90" in info.value.options


@needs_nvrtc
def test_compile_error_carries_the_log():
    with pytest.raises(kr.KernelCompileError, match="undefined_thing") as info:
        kr.compile_cubin("__global__ void k() { undefined_thing(); }", [], [], "sm_80")
    assert "error" in info.value.log


def test_missing_cuobjdump_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kr, "_find_tool", lambda name: None)
    with pytest.raises(kr.KernelToolError, match=re.escape(kr.SASS_INSTALL)):
        kr.find_cuobjdump()


def test_missing_nvrtc_binding_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kr, "_NVRTC_CACHE", [])
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)  # import now fails
    bindings = sys.modules.get("cuda.bindings")
    if bindings is not None and hasattr(bindings, "nvrtc"):
        monkeypatch.delattr(bindings, "nvrtc")
    with pytest.raises(kr.KernelToolError, match=re.escape(kr.NVRTC_INSTALL)):
        kr.nvrtc_version()


# --------------------------------------------------------------------------
# bnkernels kernels (CLI), on the test kernels
# --------------------------------------------------------------------------

@pytest.fixture
def test_sources(monkeypatch):
    """The CLI on the test kernels only: the numba-cuda kernels are left out
    as when numba-cuda is not installed (they are tested below)."""
    monkeypatch.setattr(kr, "bnkernels_sources",
                        lambda: kr.KernelSources(TEST_SOURCE, TEST_NAMES, TEST_OPTIONS))
    monkeypatch.setattr(nr, "numba_cuda_missing", lambda: "left out by the test")


@needs_tools
def test_cli_kernels_json(test_sources, capsys):
    assert main(["kernels", "--arch", "sm_90", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["archs"] == ["sm_90"] and re.fullmatch(r"\d+\.\d+", data["nvrtc_version"])
    assert data["nvrtc_options"]["sm_90"] == list(kr.compile_options(TEST_OPTIONS, "sm_90"))
    k = {d["name_expression"]: d for d in data["kernels"]}
    assert list(k) == TEST_NAMES
    assert k["scale_vec<float>"]["vector_loads"] == 1 and k["scale_vec<float>"]["vectorized"]
    assert k["spill_prone"]["spill_bytes"] > 0 and k["local_array"]["local_memory_ops"] > 0
    assert k["block_sum<float>"]["shared_bytes"] == 1024
    assert {"registers", "shared_bytes", "spill_bytes", "local_memory_ops", "vector_stores",
            "lowered_name"} <= set(k["local_array"])


@needs_tools
def test_cli_kernels_table_for_both_default_archs(test_sources, capsys):
    assert main(["kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["kernel", "arch", "regs", "smem"]
    rows = [line.split() for line in lines if line.startswith("scale_vec<float>")]
    assert [row[1] for row in rows] == list(ARCHS)
    assert all(row[-1] == "yes" and row[-3] == "1/1" for row in rows)
    assert "numba-cuda kernels: not inspected: left out by the test" in lines


def test_cli_kernels_reports_a_missing_tool(test_sources, monkeypatch, capsys):
    monkeypatch.setattr(kr, "_find_tool", lambda name: None)
    assert main(["kernels", "--arch", "sm_90"]) == 1
    assert "pip install" in capsys.readouterr().err


def test_cli_kernels_rejects_a_virtual_arch(capsys):
    assert main(["kernels", "--arch", "compute_90"]) == 2
    assert "compute_90" in capsys.readouterr().err


# --------------------------------------------------------------------------
# bnkernels' own CuPy kernels
# --------------------------------------------------------------------------

_REAL_BUILDS = {}


def _real_build(arch):
    """bnkernels' own kernels compiled for ``arch`` (once): the compiled
    module and ptxas' report by name expression."""
    arch = kr.normalize_arch(arch)
    if arch not in _REAL_BUILDS:
        compiled = kr.own_build(arch)  # (the same build as the command's below)
        by_symbol = {r.kernel: r for r in parse_report(compiled.log)}
        resources = {ne: by_symbol[sym] for ne, sym in compiled.lowered_names.items()}
        _REAL_BUILDS[arch] = compiled, resources
    return _REAL_BUILDS[arch]


def _real_inspect(arch):
    """What ``kr.inspect(arch)`` returns for bnkernels' own kernels, from
    the build above."""
    compiled, _ = _real_build(arch)
    return kr.build_reports(compiled, kr.disassemble(compiled.cubin), kr.normalize_arch(arch))


@pytest.fixture(scope="module", params=ARCHS)
def real_build(request):
    """(arch, name expressions, ptxas' report by name expression)."""
    sources = pytest.importorskip("bnkernels.backends.cupy_backend.sources")
    if NVRTC_MISSING:
        pytest.skip(NVRTC_MISSING)
    return request.param, list(sources.name_expressions()), _real_build(request.param)[1]


@pytest.fixture(scope="module", params=ARCHS)
def real_reports(request):
    """(arch, name expressions, KernelReports)."""
    sources = pytest.importorskip("bnkernels.backends.cupy_backend.sources")
    if MISSING:
        pytest.skip(MISSING)
    return request.param, list(sources.name_expressions()), _real_inspect(request.param)


def test_every_instantiation_compiles_without_spills(real_build):
    arch, names, resources = real_build
    assert set(resources) == set(names)
    spills = {ne: r.spills for ne, r in resources.items() if r.spills}
    assert not spills, f"{arch}: spill bytes (stores + loads) per kernel: {spills}"
    assert all(r.registers > 0 for r in resources.values())


def test_no_kernel_touches_local_memory(real_reports):
    arch, names, reports = real_reports
    assert set(names) <= {r.name_expression for r in reports}
    bad = {r.name_expression: (r.local_loads, r.local_stores, r.stack_bytes) for r in reports
           if r.local_memory_ops}
    assert not bad, f"{arch}: (LDL, STL, stack bytes) per kernel: {bad}"


@pytest.mark.parametrize("prefix", ["bn_apply<float,", "bn_apply<__half,"])
def test_apply_kernels_use_128_bit_loads_and_stores(real_reports, prefix):
    arch, names, reports = real_reports
    apply = [r for r in reports if r.name_expression.replace(" ", "").startswith(prefix)]
    assert apply, f"no {prefix}...> instantiation among {names}"
    for r in apply:
        assert r.vector_loads > 0 and r.vector_stores > 0, (
            f"{r.name_expression} on {arch}: global loads by width {r.global_load_widths}, "
            f"stores {r.global_store_widths}")


@pytest.fixture(scope="module")
def cli_sm90(tmp_path_factory):
    """``bnkernels kernels --arch sm_90 --json --sass DIR`` run once (it
    compiles every kernel of both backends: minutes on a small machine) for
    the tests of what it prints and writes: ``(json, DIR)``."""
    import contextlib
    import io

    if MISSING:
        pytest.skip(MISSING)
    folder = tmp_path_factory.mktemp("sass")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["kernels", "--arch", "sm_90", "--json", "--sass", str(folder)]) == 0
    return json.loads(out.getvalue()), folder


def test_cli_kernels_json_on_the_real_kernels(cli_sm90):
    sources = pytest.importorskip("bnkernels.backends.cupy_backend.sources")
    data, _ = cli_sm90
    assert data["archs"] == ["sm_90"]
    names = list(sources.name_expressions())
    assert [k["name_expression"] for k in data["kernels"]][:len(names)] == names
    assert all(k["spill_bytes"] == 0 and k["local_memory_ops"] == 0 for k in data["kernels"])


def test_cli_kernels_sass_hot_loops_and_geometry_on_the_real_kernels(cli_sm90):
    """``--sass DIR`` writes one file per kernel; the JSON gives each
    kernel's hot loops (``sass_loops``), its blocks per SM, and the launch
    geometry on an H100 for every named batch-norm bench shape."""
    sources = pytest.importorskip("bnkernels.backends.cupy_backend.sources")
    from bnkernels.bench.ops import DEFAULT_CASES

    data, tmp_path = cli_sm90
    files = sorted(p.name for p in (tmp_path / "sm_90").iterdir())
    assert len(files) == len(sources.name_expressions())
    assert all((tmp_path / "sm_90" / f).read_text().lstrip().startswith("Function :") for f in files)
    k = {d["name_expression"]: d for d in data["kernels"]}
    stats = k["bn_stats<float, float, float, false>"]
    assert stats["hot_loops"] and all(lp["load_bytes"] > 0 and lp["instructions"] > 0 for lp in stats["hot_loops"])
    assert k["bn_infer_coeffs<float, float>"]["hot_loops"] == []  # no loop: one channel per thread
    assert all(1 <= d["blocks_per_sm"] <= 8 for d in data["kernels"] if d.get("backend", "cupy") == "cupy")
    assert [g["shape"] for g in data["h100_geometry"]] == [c.name for c in DEFAULT_CASES]


# --------------------------------------------------------------------------
# bnkernels' own numba-cuda kernels (PTX from Numba, ptxas, cuobjdump)
# --------------------------------------------------------------------------

NUMBA_MISSING = nr.missing()  # numba-cuda, ptxas or cuobjdump/nvdisasm absent, or the simulator on
needs_numba = pytest.mark.skipif(NUMBA_MISSING is not None, reason=NUMBA_MISSING or "")


def test_numba_target_names_and_compute_capabilities():
    assert nr._cc("sm_90") == (9, 0) and nr._cc("80") == (8, 0) and nr._cc("sm_100") == (10, 0)
    assert nr._cc("sm_90a") == (9, 0)
    if nr.numba_cuda_missing() is None:
        targets = nr.targets()
        names = [t.name_expression for t in targets]
        # 12 kernels (the 9 of batch norm, apply_residual_planes/_rows, relu_backward) x 4 storage
        # dtypes (bfloat16 too, but not for infer_coeffs, which reads the compute dtype), all but
        # infer_coeffs also with 32-bit indices: 11 x 4 x 2 + 3
        assert len(set(names)) == len(names) == 91
        assert {"stats_planes[float16]", "stats_planes_i32[float16]", "dx_rows[float64]",
                "infer_coeffs[float32]"} <= set(names) and "infer_coeffs_i32[float32]" not in names


@pytest.fixture(scope="module", params=ARCHS)
def numba_reports(request):
    """(arch, KernelReports, the SASS of each) of every numba-cuda specialization."""
    if NUMBA_MISSING:
        pytest.skip(NUMBA_MISSING)
    return request.param, *nr.inspect_with_sass(request.param)


@needs_numba
def test_every_numba_kernel_is_reported_without_spills_or_local_memory(numba_reports):
    arch, reports, texts = numba_reports
    assert [r.name_expression for r in reports] == [t.name_expression for t in nr.targets()]
    assert all(r.backend == "numba-cuda" and r.arch == arch for r in reports)
    assert all(r.registers > 0 for r in reports)
    bad = {r.name_expression: (r.spill_bytes, r.local_loads, r.local_stores, r.stack_bytes) for r in reports
           if r.spill_bytes or r.local_memory_ops or r.stack_bytes}
    assert not bad, f"{arch}: (spill bytes, LDL, STL, stack bytes) per kernel: {bad}"
    # Each kernel's SASS: one function, under its symbol.
    for r, sass in zip(reports, texts):
        assert sass.count("Function : ") == 1 and f"Function : {r.lowered_name}" in sass, r.name_expression
        assert r.scalar_global_loads + r.vector_loads > 0, r.name_expression
    shared = {r.name_expression: r.shared_bytes for r in reports}
    # 3 (32 x 32) accumulator arrays + the last-block flag, in the reducing kernels only
    assert shared["stats_planes[float32]"] == shared["bwd_rows_i32[float16]"] == 3 * 32 * 32 * 4 + 4
    assert shared["stats_rows[float64]"] == 3 * 32 * 32 * 8 + 4
    assert shared["apply_planes[float32]"] == shared["dx_rows_i32[float64]"] == shared["infer_coeffs[float16]"] == 0


@needs_numba
def test_numba_kernel_resources_agree_with_cuobjdump_res_usage(numba_reports, tmp_path):
    """The report's registers are those recorded in the cubin (one kernel
    of each kind, float32)."""
    arch, reports, _ = numba_reports
    for r in reports:
        if not r.name_expression.endswith("[float32]"):
            continue
        target = next(t for t in nr.targets() if t.name_expression == r.name_expression)
        path = tmp_path / f"{target.kernel}.cubin"
        path.write_bytes(nr.compile_target(target, arch).cubin)
        out = subprocess.run([kr.find_cuobjdump()[0], "-res-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
        assert re.search(rf"Function {re.escape(r.lowered_name)}:\s*\n\s*REG:{r.registers} ", out), out


@needs_numba
def test_numba_hot_loops(numba_reports):
    """The streaming loops are found in the SASS, with the bytes they load."""
    from bnkernels import sass_loops

    arch, reports, texts = numba_reports
    loops = {r.name_expression: sass_loops.hot_loops(sass_loops.functions(sass)[r.lowered_name])
             for r, sass in zip(reports, texts)}
    for name, found in loops.items():
        if name.startswith("infer_coeffs"):
            assert found == [], name  # one channel per thread: no loop
        else:
            assert found and all(lp.instructions > 0 and lp.load_bytes > 0 for lp in found), name


@needs_numba
def test_numba_elementwise_kernels_use_16_byte_accesses(numba_reports):
    """apply and dx move their data by 16-byte loads and stores (the vector
    intrinsics of ``kernels.py``), in every dtype, layout and index width;
    the 32-bit index reductions spend fewer instructions per iteration of
    their streaming loop than the 64-bit ones."""
    from bnkernels import sass_loops

    arch, reports, texts = numba_reports
    elementwise = [r for r in reports if r.name_expression.startswith(("apply_", "dx_"))]
    assert len(elementwise) == 6 * 2 * 4  # apply, apply_residual, dx; planes and rows; index widths; dtypes
    for r in elementwise:
        assert r.vector_loads > 0 and r.vector_stores > 0, (r.name_expression, r.global_load_widths)
        assert r.global_store_widths.get(128, 0) >= 1
    first = {r.name_expression: sass_loops.hot_loops(sass_loops.functions(sass)[r.lowered_name])[0]
             for r, sass in zip(reports, texts) if r.name_expression.startswith(("stats_", "bwd_"))}
    for name, loop in first.items():
        if "_i32" in name:
            wide = first[name.replace("_i32", "")]
            assert loop.load_bytes == wide.load_bytes and loop.instructions < wide.instructions, name


@needs_numba
def test_cli_kernels_reports_the_numba_kernels(cli_sm90, capsys):
    """``--json --sass DIR``: every numba-cuda kernel has a row (backend,
    registers, hot loops, blocks per SM) and a SASS file in
    ``DIR/numba-cuda/<arch>/`` holding its function; the table has a
    numba-cuda section with a row per kernel."""
    data, tmp_path = cli_sm90
    assert data["numba_cuda"]["skipped"] is None and data["numba_cuda"]["ptxas"]
    numba = [k for k in data["kernels"] if k["backend"] == "numba-cuda"]
    assert [k["name_expression"] for k in numba] == [t.name_expression for t in nr.targets()]
    folder = tmp_path / "numba-cuda" / "sm_90"
    for k in numba:
        assert k["registers"] > 0 and k["spill_bytes"] == 0 and 1 <= k["blocks_per_sm"] <= 8
        if not k["name_expression"].startswith("infer_coeffs"):
            assert k["hot_loops"] and all(lp["instructions_per_byte"] > 0 for lp in k["hot_loops"])
        sass = (folder / (k["name_expression"].replace("[", "_").rstrip("]") + ".sass")).read_text()
        assert sass.lstrip().startswith(f"Function : {k['lowered_name']}")
        assert "EXIT" in sass
    assert len(list(folder.iterdir())) == len(numba)

    assert main(["kernels", "--arch", "sm_90"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("numba-cuda "))
    rows = {line.split()[0]: line.split() for line in lines[start + 3:start + 3 + len(numba)]}
    assert list(rows) == [k["name_expression"] for k in numba]
    assert all(row[1] == "sm_90" and int(row[2]) > 0 for row in rows.values())


def test_cli_kernels_says_when_ptxas_for_the_numba_kernels_is_missing(test_sources, monkeypatch, capsys):
    if MISSING:
        pytest.skip(MISSING)
    if nr._numba_cuda_missing():
        pytest.skip(nr._numba_cuda_missing())
    monkeypatch.setattr(nr, "numba_cuda_missing", lambda: None)  # undo the fixture's
    monkeypatch.setattr(nr, "inspect_with_sass", nr.inspect_with_sass.__wrapped__)  # no cached result
    monkeypatch.setattr(nr.ptxas, "find_ptxas", lambda: None)
    assert main(["kernels", "--arch", "sm_90"]) == 1
    assert "ptxas not found" in capsys.readouterr().err
