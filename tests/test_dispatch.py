"""Backend registry, selection, fallback warnings and optional imports."""
import subprocess
import sys
import textwrap
import warnings

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


@needs_no_gpu
def test_cuda_falls_back_with_one_warning_per_reason(rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with pytest.warns(BackendFallbackWarning, match=r"backend='cuda' fell back to the CPU backend .*cupy: ") as rec:
        y = bn_forward(x, backend="cuda")
    assert len(rec) == 1
    assert "pip install" in str(rec[0].message)
    np.testing.assert_allclose(y, reference_forward(x)[0], atol=2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn_forward(x, backend="cuda")  # same reason: no second warning


@needs_no_gpu
def test_fallback_can_be_made_fatal_and_stays_fatal(rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        for _ in range(2):  # not silently swallowed the second time
            with pytest.raises(BackendFallbackWarning):
                bn_forward(x, backend="cuda")


@needs_no_gpu
@pytest.mark.parametrize("name", ["cupy", "numba-cuda"])
def test_explicit_gpu_backend_unavailable(name, rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with pytest.raises(BackendUnavailableError, match=rf"backend='{name}' is not available: .*pip install"):
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
