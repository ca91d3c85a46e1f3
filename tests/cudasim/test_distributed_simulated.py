"""Synchronized batch norm on the numba-cuda backend under Numba's CUDA
simulator, in two real MPI processes: the GPU path (device statistics
copied to the host, which waits for the stream; the MPI collective;
finalize and normalize on the device) against the whole batch on numpy.
Here rather than beside the other MPI tests: this process runs beside the
main one in CI (its minute of simulation costs no wall time)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))

from sync_cases import SIMULATED_GPU_CASES  # noqa: E402
from sync_checks import check_against_whole_batch, job, ranks_of  # noqa: E402

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py and an MPI library (CI installs both)")


@pytest.fixture(scope="module")
def simulated_gpu_job(tmp_path_factory):
    """Two ranks on numba-cuda under the CUDA simulator."""
    return job(tmp_path_factory, 2, "simulated-gpu", {"NUMBA_ENABLE_CUDASIM": "1"})


@pytest.mark.parametrize("name", list(SIMULATED_GPU_CASES))
def test_synchronized_gpu_backend_under_the_simulator(simulated_gpu_job, name):
    check_against_whole_batch(ranks_of(simulated_gpu_job, name, 2), SIMULATED_GPU_CASES[name], 2,
                              whole_backend="numpy")
