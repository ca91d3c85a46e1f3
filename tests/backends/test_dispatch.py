"""Backend registry, selection, fallback warnings and optional imports."""
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import bnkernels
import bnkernels.backends as backends
from bnkernels import BackendFallbackWarning, BackendUnavailableError, bn_forward
from bnkernels.reference import reference_forward


def _gpu_usable():
    return any(s.available for s in bnkernels.available_backends().values() if s.device == "gpu")


needs_no_gpu = pytest.mark.skipif("_gpu_usable()", reason="a GPU backend is usable here")


class FakeDeviceArray:
    """Stands in for a CuPy/torch CUDA array: only what dispatch looks at."""

    shape, dtype = (4, 3), np.dtype(np.float32)
    __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False), "version": 3}


def test_available_backends_reports_every_backend():
    status = bnkernels.available_backends()
    assert list(status) == ["cupy", "numba-cuda", "numba", "numpy"]
    assert status["numpy"].available and status["numpy"].reason is None
    for s in status.values():
        assert s.device in ("cpu", "gpu")
        assert s.available == (s.reason is None)
        if not s.available:
            assert s.reason and s.install


def _fallback_call(x):
    return bn_forward(x, backend="cuda")  # one calling line for every call in a test


@needs_no_gpu
def test_cuda_fallback_warning_says_what_happened_in_one_short_line(rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with pytest.warns(BackendFallbackWarning, match=r"^backend='cuda' fell back to the CPU backend '\w+': ") as rec:
        y = _fallback_call(x)
    assert len(rec) == 1
    message = str(rec[0].message)
    assert "\n" not in message and len(message) < 250, message
    assert "bnkernels info" in message and "BNKERNELS_NO_FALLBACK=1" in message
    np.testing.assert_allclose(y, reference_forward(x)[0], atol=2e-5)
    if backends.probes.driver_problem() and not backends.probes.missing_package("cupy"):
        # GPU packages are installed (CI has both) but the machine has no driver: say that, not
        # CuPy's "driver version is insufficient", and suggest no install
        assert "no usable GPU: no NVIDIA driver found" in message, message
        assert "insufficient" not in message and "pip install" not in message, message


@needs_no_gpu
def test_python_dedups_the_fallback_warning_so_filters_work_later(rng):
    """Shown once per calling line by Python's own registry; a filter set
    after a first fallback still sees every later one."""
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        for _ in range(3):
            _fallback_call(x)
    assert len(rec) == 1 and rec[0].category is BackendFallbackWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        for _ in range(2):
            with pytest.raises(BackendFallbackWarning):
                _fallback_call(x)


@needs_no_gpu
def test_fallback_can_be_made_fatal_and_stays_fatal(rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        for _ in range(2):  # not silently swallowed the second time
            with pytest.raises(BackendFallbackWarning):
                bn_forward(x, backend="cuda")


@needs_no_gpu
@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_no_fallback_switch_raises_instead(monkeypatch, rng, value):
    monkeypatch.setenv(backends.NO_FALLBACK_VAR, value)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raises, does not warn
        with pytest.raises(BackendUnavailableError, match=r"backend='cuda': .*BNKERNELS_NO_FALLBACK=1 forbids"):
            bn_forward(x, None, None, rm, rv, backend="cuda")
        monkeypatch.setenv(backends.ENV_VAR, "cuda")  # "auto" overridden to "cuda": the same
        with pytest.raises(BackendUnavailableError, match="forbids falling back"):
            bn_forward(x, None, None, rm, rv)
    np.testing.assert_array_equal(rm, 0)
    assert bn_forward(x, backend="numpy").shape == x.shape  # a CPU backend named is not a fallback


@pytest.mark.parametrize("value", ["0", "", "off"])
def test_no_fallback_switch_off(monkeypatch, value):
    monkeypatch.setenv(backends.NO_FALLBACK_VAR, value)
    assert backends._no_fallback() is False


def test_no_fallback_switch_bad_value(monkeypatch):
    monkeypatch.setenv(backends.NO_FALLBACK_VAR, "maybe")
    with pytest.raises(ValueError, match="BNKERNELS_NO_FALLBACK='maybe': expected 1"):
        backends._no_fallback()


def test_minus_w_with_the_class_name_is_ignored_by_python_as_documented(tmp_path):
    """Why the docs do not offer ``python -W error::bnkernels.BackendFallbackWarning``:
    Python resolves the category before bnkernels is importable, and drops
    the option (this checks the claim, on this Python)."""
    proc = subprocess.run([sys.executable, "-W", "error::bnkernels.BackendFallbackWarning", "-c", "pass"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "Invalid -W option ignored" in proc.stderr, proc.stderr


_FAKE_DRIVER = r"""
int cuInit(unsigned flags) { return CU_INIT; }
int cuDeviceGetCount(int *n) { *n = COUNT; return 0; }
"""


@pytest.mark.parametrize("init,count,expected", [
    (100, 0, "no CUDA device is visible (CUDA_VISIBLE_DEVICES='')"),
    (0, 0, "no CUDA device is visible (CUDA_VISIBLE_DEVICES='')"),
    (3, 0, "the NVIDIA driver failed to initialize (cuInit returned CUDA error 3)"),
    (0, 1, "None"),
])
def test_driver_probe_asks_the_driver_library(tmp_path, init, count, expected):
    """A real shared library named libcuda.so.1 (built here with the C
    compiler) answers the probe through ctypes, as the NVIDIA driver would."""
    if sys.platform != "linux" or not shutil.which("cc"):
        pytest.skip("needs Linux and a C compiler")
    src = tmp_path / "fake_cuda.c"
    src.write_text(_FAKE_DRIVER)
    subprocess.run(["cc", "-shared", "-fPIC", f"-DCU_INIT={init}", f"-DCOUNT={count}", "-o",
                    str(tmp_path / "libcuda.so.1"), str(src)], check=True, timeout=60)
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", "from bnkernels.backends import probes; "
                           "print(probes.driver_problem())"], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_numba_without_numba_cuda_is_not_called_numba_cuda(tmp_path):
    """numba bundles a numba.cuda of its own: with only numba installed
    (a site directory of numba, llvmlite, numpy and bnkernels, no
    numba-cuda), the reason says which one is there."""
    pytest.importorskip("numba")
    import numba, llvmlite

    site = tmp_path / "site"
    site.mkdir()
    for module in (numba, llvmlite, np, bnkernels):
        src = Path(module.__file__).parent
        (site / src.name).symlink_to(src)
        for extra in [*src.parent.glob(f"{src.name}-*.dist-info"), *src.parent.glob(f"{src.name}.libs")]:
            (site / extra.name).symlink_to(extra)
    proc = subprocess.run([sys.executable, "-S", "-c", "from bnkernels.backends import probes; "
                           "print(probes.numba_cuda_device_problem())"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    reason = proc.stdout.strip()
    assert reason.startswith("numba-cuda is not installed (numba's own numba.cuda is)"), reason


@needs_no_gpu
@pytest.mark.parametrize("name", ["cupy", "numba-cuda"])
def test_explicit_gpu_backend_unavailable(name, rng):
    """The error says why and what to get: the extra when the package is
    missing, the GPU and driver when only those are."""
    x = rng.standard_normal((8, 3)).astype(np.float32)
    spec = backends._BY_NAME[name]
    installed = not backends.probes.missing_package(spec.package)
    hint = "an NVIDIA GPU and its driver" if installed and backends.probes.driver_problem() else "pip install"
    with pytest.raises(BackendUnavailableError, match=rf"backend='{name}' is not available: .*To get it: {hint}"):
        bn_forward(x, backend=name)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu' .*'auto', 'cuda', 'cupy', 'numba-cuda', 'numba', 'numpy'"):
        bn_forward(np.ones((4, 2), np.float32), backend="tpu")
    with pytest.raises(TypeError, match="backend must be a string"):
        bn_forward(np.ones((4, 2), np.float32), backend=None)


def test_auto_uses_best_cpu_backend_for_host_arrays():
    spec, _ = backends._best("cpu")
    assert backends.resolve("auto", np.ones(3)).__name__ == spec.module


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "numpy")
    assert backends.resolve("auto", np.ones(3)).name == "numpy"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus' \(from BNKERNELS_BACKEND='bogus'\)"):
        bn_forward(np.ones((4, 2)))
    # an explicit backend is not overridden
    assert backends.resolve("numpy", np.ones(3)).name == "numpy"


@needs_no_gpu
def test_environment_variable_naming_missing_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cupy")
    with pytest.raises(BackendUnavailableError, match="BNKERNELS_BACKEND='cupy' is not available"):
        bn_forward(np.ones((4, 2)))


@needs_no_gpu
def test_gpu_array_without_gpu_backend_is_an_error():
    with pytest.raises(BackendUnavailableError, match="the input is a GPU array but no GPU backend is usable"):
        bn_forward(FakeDeviceArray())


def test_gpu_array_on_cpu_backend_is_an_error():
    with pytest.raises(TypeError, match="runs on the CPU but the input is a GPU array"):
        bn_forward(FakeDeviceArray(), backend="numpy")


def _run_isolated(code, tmp_path):
    """Run code in a fresh interpreter where the optional packages cannot be
    imported (a meta-path hook refuses them), like a NumPy-only install."""
    prelude = textwrap.dedent("""
        import sys
        BLOCKED = {"numba", "cupy", "torch", "cuda", "mpi4py", "matplotlib"}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)


def test_import_and_fallback_with_numpy_only(tmp_path):
    proc = _run_isolated("""
        import warnings
        import numpy as np
        import bnkernels
        st = bnkernels.available_backends()
        assert st["numpy"].available
        assert st["cupy"].reason == "cupy is not installed", st["cupy"].reason
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = bnkernels.bn_forward(np.arange(12.0).reshape(4, 3), backend="cuda")
        assert len(w) == 1 and issubclass(w[0].category, bnkernels.BackendFallbackWarning)
        assert "no GPU backend is installed (to get one: pip install" in str(w[0].message), w[0].message
        print("OK", y.shape)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OK (4, 3)" in proc.stdout


def test_broken_optional_package_is_reported_not_raised(tmp_path):
    """A GPU package that is present but fails to import (e.g. a missing CUDA
    library) makes that backend unavailable with the import error as reason."""
    pkg = tmp_path / "site" / "cupy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import bnkernels; print(bnkernels.available_backends()['cupy'].reason)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr
    assert "cupy is installed but fails to import: ImportError: libcudart.so.13" in proc.stdout


def test_cupy_without_driver_reason():
    """Where cupy is installed (CI installs it) but no driver/device exists,
    the reason says so (this is the real cupy, not a stand-in)."""
    pytest.importorskip("cupy")
    if _gpu_usable():
        pytest.skip("a GPU is usable here")
    reason = bnkernels.available_backends()["cupy"].reason
    assert reason.startswith("cupy is installed but the CUDA driver is not usable") or \
        reason.startswith("cupy is installed but no CUDA device"), reason


def test_probes_run_lazily_not_at_import(tmp_path):
    """Importing bnkernels imports no optional package (CI has cupy and torch
    installed, so an eager probe would show up here)."""
    code = ("import sys, bnkernels; "
            "print(sorted(m for m in ('cupy', 'numba', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_backend_whose_module_fails_to_load_is_unusable_not_fatal(tmp_path):
    """Requirements met (numba imports) but bnkernels' backend module raises
    on import: "auto" falls back to numpy, info reports why, no traceback."""
    pytest.importorskip("numba")
    code = textwrap.dedent("""
        import sys, types, importlib.abc
        class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "bnkernels.backends.numba_backend":
                    import importlib.util
                    return importlib.util.spec_from_loader(name, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise RuntimeError("cannot cache function 'block_sums': no locator available")
        sys.meta_path.insert(0, Broken())
        import numpy as np, bnkernels
        from bnkernels.cli import main
        st = bnkernels.available_backends()["numba"]
        assert not st.available and "fails to load: RuntimeError: cannot cache" in st.reason, st.reason
        y = bnkernels.bn_forward(np.arange(12.0).reshape(4, 3))
        assert main(["info"]) == 0
        print("OK", y.shape)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OK (4, 3)" in proc.stdout and "numba       cpu     no" in proc.stdout
