import zlib

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
