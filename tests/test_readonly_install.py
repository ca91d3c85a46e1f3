"""A read-only install, as in an ordinary container image: the wheel (with
the numba extra) installed into a venv that is then made unwritable, run
by an unprivileged user whose HOME does not exist. Numba then has nowhere
to cache the kernels; every call must still work (compiled in memory),
and with ``NUMBA_CACHE_DIR`` the cache goes there.

Needs root (to drop to the user ``nobody`` with ``setpriv``) and pip's
access to the package index (or its cache): CI has both.
"""
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("numba")

NOBODY = 65534
SCRIPT = """
import warnings
import numpy as np
import bnkernels
from bnkernels import bn_backward, bn_forward

rng = np.random.default_rng(1)
x = (rng.standard_normal((8, 6, 5, 5)) + 3).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
y0, s0 = bn_forward(x, backend="numpy", return_saved=True)
dx0 = bn_backward(dy, x, s0.mean, s0.invstd, backend="numpy")[0]
for backend in ("auto", "numba", "cuda"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnkernels.BackendFallbackWarning)  # "cuda" on this CPU
        rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
        y, s = bn_forward(x, None, None, rm, rv, backend=backend, return_saved=True)
        dx = bn_backward(dy, x, s.mean, s.invstd, backend=backend)[0]
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx0, rtol=1e-4, atol=1e-4)
from bnkernels.backends import numba_backend
print("cache:", numba_backend.CACHE_DIR)
print("OK")
"""


def _can_drop_privileges() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv") is not None


def _python_for_nobody() -> str | None:
    """An interpreter the unprivileged user can run: this one, unless it
    lives under root's home (pyenv), else the system's python3."""
    for python in (sys.executable, "/usr/bin/python3"):
        if shutil.which(python) and _run_as_nobody([python, "-c", "import venv"]).returncode == 0:
            return python
    return None


@pytest.fixture(scope="module")
def readonly_venv(wheel):
    """A venv with the wheel and numba installed, then chmod -R a-w; in a
    world-readable folder so that ``nobody`` can run it."""
    if not _can_drop_privileges():
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with setpriv: this test must run there")
        pytest.skip("needs root and setpriv to run as an unprivileged user")
    python = _python_for_nobody()
    if python is None:
        pytest.fail("no Python interpreter here can be run by an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="bnkernels-ro-"))
    base.chmod(0o755)
    venv = base / "venv"
    # without PYTHONPATH: pip would take a bnkernels found there as installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[numba]"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run(["chmod", "-R", "a-w", str(venv)], check=True)
    yield venv
    subprocess.run(["chmod", "-R", "u+w", str(base)], check=True)
    shutil.rmtree(base)


def _run_as_nobody(args, extra_env=None):
    """``args`` as the user nobody, with a HOME that does not exist."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent/home", **(extra_env or {})}
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *args],
                          capture_output=True, text=True, timeout=600, cwd="/")


def test_the_install_is_really_read_only(readonly_venv):
    site = next(readonly_venv.glob("lib/python*/site-packages/bnkernels/backends"))
    proc = _run_as_nobody(["sh", "-c", f"touch {site}/probe || echo refused"])
    assert "refused" in proc.stdout
    assert not (site / "probe").exists()
    assert not os.path.exists("/nonexistent/home")
    assert not any(site.glob("__pycache__/*.nbi")), "nothing compiled into the install as root"


def test_calls_work_with_nowhere_to_cache(readonly_venv):
    proc = _run_as_nobody([str(readonly_venv / "bin" / "python"), "-c", SCRIPT])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "cache: None" in proc.stdout and "OK" in proc.stdout


def test_info_says_kernels_are_compiled_in_memory(readonly_venv):
    proc = _run_as_nobody([str(readonly_venv / "bin" / "bnkernels"), "info"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "kernels compiled in memory on first use" in proc.stdout


def test_numba_cache_dir_is_used_when_set(readonly_venv):
    cache = Path(tempfile.mkdtemp(prefix="bnkernels-cache-"))
    try:
        os.chown(cache, NOBODY, NOBODY)
        cache.chmod(stat.S_IRWXU)
        proc = _run_as_nobody([str(readonly_venv / "bin" / "python"), "-c", SCRIPT],
                              {"NUMBA_CACHE_DIR": str(cache)})
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        assert f"cache: {cache}" in proc.stdout
        assert list(cache.rglob("*.nbi")), "the kernels were cached in NUMBA_CACHE_DIR"
    finally:
        shutil.rmtree(cache)
