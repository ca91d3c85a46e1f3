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
    """No test sees another's probe results, fallback-warning memory or
    BNKERNELS_BACKEND."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    probes.clear_probe_cache()
    backends._warned_reasons.clear()
    yield
    probes.clear_probe_cache()
    backends._warned_reasons.clear()
