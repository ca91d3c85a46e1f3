"""Tests that run kernels on Numba's CUDA simulator, with the warp
intrinsics it lacks added by ``tests/cudasim_shuffles.py``.

They run only in a process started with NUMBA_ENABLE_CUDASIM=1 (the
variable must be set before numba is imported, so it cannot be set from
here)::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/cudasim -p no:cacheprovider

Without it, on a machine with a usable GPU the same tests run on the GPU
and are marked ``gpu`` (``pytest -m gpu``); without simulator and GPU this
directory is not collected at all, so the normal test run (a separate
process) is unaffected; run alone, ``pytest tests/cudasim`` then reports
"no tests collected" (exit code 5).
"""
import os


def _simulator_enabled():
    value = os.environ.get("NUMBA_ENABLE_CUDASIM", "").strip()
    try:
        return int(value) != 0   # numba reads the variable as an int
    except ValueError:
        return False


def _gpu_usable():
    try:
        from numba import cuda

        return cuda.is_available()
    except Exception:
        return False


SIMULATOR = _simulator_enabled()

if SIMULATOR:
    import sys

    import cudasim_shuffles  # tests/ is on sys.path (rootdir conftest.py)

    cudasim_shuffles.install()
    # The simulator runs one Python thread per CUDA thread and hands control
    # between them at every barrier and shuffle; with CPython's default 5 ms
    # switch interval each hand-off waits, with 0.2 ms the suite runs ~4x
    # faster (measured here).
    sys.setswitchinterval(2e-4)
elif _gpu_usable():
    # On a real GPU the same tests run unchanged, marked ``gpu`` (so that
    # ``pytest -m gpu`` selects them and CPU-only runs deselect them).
    import pytest

    collect_ignore = ["test_shuffle_patch.py"]  # tests of the simulator patch itself

    def pytest_collection_modifyitems(config, items):
        for item in items:
            if "tests/cudasim/" in item.nodeid:
                item.add_marker(pytest.mark.gpu)
else:
    # Every path under this directory (this conftest's folder).
    collect_ignore_glob = ["*"]
