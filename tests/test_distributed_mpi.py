"""Synchronized batch norm on real MPI processes (mpi4py + PyPI's mpich):
``mpiexec -n 1``, ``-n 2`` and ``-n 3`` (oversubscribed on 2 cores) run
``distributed/mpi_worker.py``; each rank holds a part of one global batch
(5, 0 and 17 samples at 3 ranks) and its results are compared with one
process holding the whole batch, and with the float64 reference.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "distributed"))

import bnkernels  # noqa: E402
from helpers import assert_close  # noqa: E402
from sync_cases import CASES, GPU_CASES  # noqa: E402
from sync_checks import check_against_whole_batch, job, ranks_of  # noqa: E402

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py and an MPI library (CI installs both)")

RANKS = (1, 2, 3)


@pytest.fixture(scope="module")
def warm():
    """Compile the numba kernels the workers use here first (their on-disk
    cache then serves every rank, instead of three compiling at once)."""
    for case in CASES.values():
        x, dy, gamma, beta, rm, rv = case.data(1)
        y, s = bnkernels.bn_forward(x, gamma, beta, rm.copy(), rv.copy(), axis=case.axis, backend=case.backend,
                                    return_saved=True)
        bnkernels.bn_backward(dy, x, s.mean, s.invstd, gamma, axis=case.axis, backend=case.backend)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, warm):
    """The ``cases`` job's output folder per number of ranks (run once)."""
    return {n: job(tmp_path_factory, n, "cases") for n in RANKS}


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("name", list(CASES))
def test_synchronized_equals_one_process_with_the_whole_batch(jobs, name, ranks):
    check_against_whole_batch(ranks_of(jobs[ranks], name, ranks), CASES[name], ranks)




@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_synchronized_on_the_gpu(tmp_path_factory, name):
    """Two MPI ranks on the GPU backends (device arrays; sharing one GPU
    where there is one), against the whole batch on numpy."""
    out = _gpu_job(tmp_path_factory, "gpu", 2)
    check_against_whole_batch(ranks_of(out, name, 2), GPU_CASES[name], 2, whole_backend="numpy")


@pytest.mark.gpu
def test_synchronized_over_nccl(tmp_path_factory):
    """An NCCL communicator from MPI (one rank per GPU: NCCL refuses two
    ranks on one device), the frames on CuPy's current stream."""
    import cupy

    ranks = min(2, cupy.cuda.runtime.getDeviceCount())
    out = _gpu_job(tmp_path_factory, "gpu-nccl", ranks)
    check_against_whole_batch(ranks_of(out, "cupy-nchw-float32", ranks), GPU_CASES["cupy-nchw-float32"], ranks,
                              whole_backend="numpy")


_GPU_JOBS: dict = {}


def _gpu_job(tmp_path_factory, mode: str, ranks: int) -> Path:
    if mode not in _GPU_JOBS:
        _GPU_JOBS[mode] = job(tmp_path_factory, ranks, mode)
    return _GPU_JOBS[mode]


@pytest.mark.parametrize("ranks", RANKS)
def test_one_collective_per_call_and_two_when_the_capacity_grows(jobs, ranks):
    # the first case with more than 64 channels is the first to need more than the initial capacity
    grows = "numpy-wide-150-channels"
    for name in CASES:
        counts = [g["counts"].tolist() for g in ranks_of(jobs[ranks], name, ranks)]
        first = [2, 2] if name == grows else [1, 1]
        assert all(c == [first, [1, 1]] for c in counts), (name, counts)


@pytest.mark.parametrize("ranks", RANKS)
def test_sync_batch_norm_layer(jobs, ranks):
    case = CASES["numba-nchw-float32"]
    got = ranks_of(jobs[ranks], "layer", ranks)
    x, dy, *_ = case.data(ranks)
    whole = bnkernels.BatchNorm(3, backend="numba")
    whole.gamma[:] = [1.5, 0.5, -1.0]
    for _ in range(2):
        y = whole.forward(x)
        dx = whole.backward(dy)
    assert_close(np.concatenate([g["y"] for g in got]), y, case.dtype, "y")
    assert_close(np.concatenate([g["dx"] for g in got]), dx, case.dtype, "dx")
    for key, value in (("dgamma", whole.grad_gamma), ("dbeta", whole.grad_beta)):
        assert_close(sum(g[key].astype(np.float64) for g in got), value, case.dtype, key, scale=np.abs(value).max() + 1)
    for key in ("running_mean", "running_var"):
        assert all(np.array_equal(g[key], got[0][key]) for g in got), key
        assert_close(got[0][key], getattr(whole, key), np.float32, key)
    whole.eval()
    assert_close(np.concatenate([g["y_eval"] for g in got]), whole.forward(x), case.dtype, "eval y")
    assert all(g["eval_collectives"].tolist() == [0, 0] for g in got), "eval mode must not communicate"


#: scenario -> (what rank 1 raises, what the others raise, words in every message)
EXPECTED = {
    "channels": ("SyncError", "SyncError", ["number of channels", "rank 1: 2"]),
    "dtype": ("SyncError", "SyncError", ["dtype", "rank 1: float64"]),
    "training": ("SyncError", "SyncError", ["training flag", "rank 1: False"]),
    "refused": ("ValueError", "SyncError", ["gamma"]),
    "refused-backward": ("ValueError", "SyncError", []),
    "channels-backward": ("SyncError", "SyncError", ["number of channels"]),
    "wide-channels": ("SyncError", "SyncError", ["number of channels", "rank 1: 150"]),
    "one-value-in-all": ("ValueError", "ValueError", ["Expected more than 1 value per channel"]),
    "layer-channels": ("ValueError", "SyncError", ["expects 3 channels"]),
    "layer-backward-first": ("RuntimeError", "SyncError", []),
}


@pytest.fixture(scope="module")
def mismatch_jobs(tmp_path_factory):
    return {n: job(tmp_path_factory, n, "mismatch") for n in (2, 3)}


@pytest.mark.parametrize("ranks", (2, 3))
@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_ranks_that_disagree_all_raise_and_stay_in_step(mismatch_jobs, scenario, ranks):
    got = ranks_of(mismatch_jobs[ranks], scenario, ranks)
    rank1, others, words = EXPECTED[scenario]
    for r, g in enumerate(got):
        kind, message = g["error"].tolist()
        assert kind == (rank1 if r == 1 else others), (r, kind, message)
        for word in words:
            assert word in message, (r, message)
        if kind == "SyncError" and scenario.startswith(("refused", "layer")):
            assert "refused" in message and ("[1]" in message or "1 rank" in message), message
        assert g["untouched"].all(), f"rank {r}: the running statistics changed"
    # the good call after it: normalized over every rank's (constant) values, so the ranks are still in step
    values = np.repeat(np.arange(ranks, dtype=np.float64), 2)
    expected = (values - values.mean()) / np.sqrt(values.var() + 1e-5)
    assert_close(np.concatenate([g["after"][:, 0] for g in got]), expected, np.float64, "y after the scenario")
