import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import bnkernels.backends as backends
from bnkernels.backends import probes


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's id so that a
    failure reproduces, while different tests get different data."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _isolated_backend_state(monkeypatch):
    """No test sees another's probe results, BNKERNELS_BACKEND or
    BNKERNELS_NO_FALLBACK."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv(backends.NO_FALLBACK_VAR, raising=False)
    probes.clear_probe_cache()
    yield
    probes.clear_probe_cache()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """bnkernels built as a wheel from this checkout (once per test run)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(root)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("bnkernels-*.whl")
    return path
