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
from bnkernels.reference import reference_backward, reference_forward  # noqa: E402
from helpers import assert_close  # noqa: E402
from launch import mpiexec, run  # noqa: E402
from sync_cases import CASES, GPU_CASES, SIMULATED_GPU_CASES  # noqa: E402

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py and an MPI library (CI installs both)")

WORKER = Path(__file__).parent / "distributed" / "mpi_worker.py"
RANKS = (1, 2, 3)
TIMEOUT = 300  # seconds for a whole job (numba compiles in every rank the first time)


def _job(tmp_path_factory, ranks: int, mode: str, env=None) -> Path:
    if mpiexec() is None:
        pytest.fail("mpi4py is installed but no mpiexec was found (pip install mpich)")
    out = tmp_path_factory.mktemp(f"{mode}{ranks}")
    proc = run([mpiexec(), "-n", str(ranks), sys.executable, str(WORKER), str(out), mode], TIMEOUT, env)
    assert proc.returncode == 0, f"mpiexec -n {ranks} failed:\n{proc.stdout}"
    return out


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
    return {n: _job(tmp_path_factory, n, "cases") for n in RANKS}


def _ranks(folder: Path, name: str, ranks: int) -> list[dict]:
    return [dict(np.load(folder / f"{name}.{r}.npz")) for r in range(ranks)]


def _whole(case, ranks: int, steps: int = 2, backend=None):
    """One process, the whole batch, ``steps`` training steps (on the
    case's backend, or ``backend``)."""
    x, dy, gamma, beta, rm, rv = case.data(ranks)
    backend = backend or case.backend
    for _ in range(steps):
        y, s = bnkernels.bn_forward(x, gamma, beta, rm, rv, axis=case.axis, backend=backend, return_saved=True)
    dx, dgamma, dbeta = bnkernels.bn_backward(dy, x, s.mean, s.invstd, gamma, axis=case.axis, backend=backend)
    return dict(x=x, dy=dy, gamma=gamma, beta=beta, y=y, mean=s.mean, invstd=s.invstd, dx=dx, dgamma=dgamma,
                dbeta=dbeta, running_mean=rm, running_var=rv)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("name", list(CASES))
def test_synchronized_equals_one_process_with_the_whole_batch(jobs, name, ranks):
    check_against_whole_batch(_ranks(jobs[ranks], name, ranks), CASES[name], ranks)


@pytest.fixture(scope="module")
def simulated_gpu_job(tmp_path_factory):
    """Two ranks on numba-cuda under the CUDA simulator."""
    pytest.importorskip("numba.cuda", reason="the simulated GPU path needs numba-cuda")
    return _job(tmp_path_factory, 2, "simulated-gpu", {"NUMBA_ENABLE_CUDASIM": "1"})


@pytest.mark.parametrize("name", list(SIMULATED_GPU_CASES))
def test_synchronized_gpu_backend_under_the_simulator(simulated_gpu_job, name):
    """The GPU path: device statistics to the host, the MPI collective,
    finalize and normalize on the device, against the whole batch (on
    numpy: the simulator's own backend is checked elsewhere)."""
    case = SIMULATED_GPU_CASES[name]
    check_against_whole_batch(_ranks(simulated_gpu_job, name, 2), case, 2, whole_backend="numpy")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_synchronized_on_the_gpu(tmp_path_factory, name):
    """Two MPI ranks on the GPU backends (device arrays; sharing one GPU
    where there is one), against the whole batch on numpy."""
    job = _gpu_job(tmp_path_factory, "gpu", 2)
    check_against_whole_batch(_ranks(job, name, 2), GPU_CASES[name], 2, whole_backend="numpy")


@pytest.mark.gpu
def test_synchronized_over_nccl(tmp_path_factory):
    """An NCCL communicator from MPI (one rank per GPU: NCCL refuses two
    ranks on one device), the frames on CuPy's current stream."""
    import cupy

    ranks = min(2, cupy.cuda.runtime.getDeviceCount())
    job = _gpu_job(tmp_path_factory, "gpu-nccl", ranks)
    check_against_whole_batch(_ranks(job, "cupy-nchw-float32", ranks), GPU_CASES["cupy-nchw-float32"], ranks,
                              whole_backend="numpy")


_GPU_JOBS: dict = {}


def _gpu_job(tmp_path_factory, mode: str, ranks: int) -> Path:
    if mode not in _GPU_JOBS:
        _GPU_JOBS[mode] = _job(tmp_path_factory, ranks, mode)
    return _GPU_JOBS[mode]


def check_against_whole_batch(got: list[dict], case, ranks: int, whole_backend=None):
    """Every rank's saved results ``got`` against one process with the
    whole batch (``case``'s backend, or ``whole_backend``) and the
    float64 reference."""
    whole = _whole(case, ranks, backend=whole_backend)
    x, dy, gamma = whole["x"], whole["dy"], whole["gamma"]
    ref = reference_forward(x, gamma, whole["beta"], *case.data(ranks)[4:], axis=case.axis)
    # the global statistics and the running ones: identical on every rank (one merge, in rank order)
    for key in ("mean", "invstd", "running_mean", "running_var"):
        for r in range(1, ranks):
            np.testing.assert_array_equal(got[r][key], got[0][key], err_msg=f"{key}: rank {r} differs from rank 0")
    assert_close(got[0]["mean"], ref[1], case.dtype, "saved.mean", scale=np.abs(ref[1]).max() + 1)
    assert_close(got[0]["invstd"], ref[2], case.dtype, "saved.invstd")
    for key in ("mean", "invstd", "running_mean", "running_var"):
        assert_close(got[0][key], whole[key], np.float32, key, scale=np.abs(whole[key]).max() + 1)
    y = np.concatenate([g["y"] for g in got])
    assert y.dtype == np.dtype(case.dtype) and y.shape == x.shape
    ref_y = reference_forward(x, gamma, whole["beta"], axis=case.axis)[0]
    assert_close(y, ref_y, case.dtype, "y")
    assert_close(y, whole["y"].astype(np.float64), case.dtype, "y against one process")
    dx = np.concatenate([g["dx"] for g in got])
    rdx, rdg, rdb = reference_backward(dy, x, got[0]["mean"], got[0]["invstd"], gamma, axis=case.axis)
    assert_close(dx, rdx, case.dtype, "dx")
    assert_close(dx, whole["dx"].astype(np.float64), case.dtype, "dx against one process")
    # dgamma, dbeta: each rank's own part; their sum is the whole batch's
    dgamma, dbeta = sum(g["dgamma"].astype(np.float64) for g in got), sum(g["dbeta"].astype(np.float64) for g in got)
    assert_close(dgamma, rdg, case.dtype, "sum of dgamma", scale=np.abs(rdg).max() + 1)
    assert_close(dbeta, rdb, case.dtype, "sum of dbeta", scale=np.abs(rdb).max() + 1)
    for r, size in enumerate(case.parts(ranks)):
        part = case.part(x, ranks, r)
        _, _, rdg_r, rdb_r = (None, *reference_backward(case.part(dy, ranks, r), part, got[0]["mean"],
                                                        got[0]["invstd"], gamma, axis=case.axis))
        assert_close(got[r]["dgamma"], rdg_r, case.dtype, f"rank {r}'s dgamma", scale=np.abs(rdg).max() + 1)
        assert_close(got[r]["dbeta"], rdb_r, case.dtype, f"rank {r}'s dbeta", scale=np.abs(rdb).max() + 1)
        assert got[r]["y"].shape[0] == size  # an empty part gets an empty y


@pytest.mark.parametrize("ranks", RANKS)
def test_one_collective_per_call_and_two_when_the_capacity_grows(jobs, ranks):
    # the first case with more than 64 channels is the first to need more than the initial capacity
    grows = "numpy-wide-150-channels"
    for name in CASES:
        counts = [g["counts"].tolist() for g in _ranks(jobs[ranks], name, ranks)]
        first = [2, 2] if name == grows else [1, 1]
        assert all(c == [first, [1, 1]] for c in counts), (name, counts)


@pytest.mark.parametrize("ranks", RANKS)
def test_sync_batch_norm_layer(jobs, ranks):
    case = CASES["numba-nchw-float32"]
    got = _ranks(jobs[ranks], "layer", ranks)
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
}


@pytest.fixture(scope="module")
def mismatch_jobs(tmp_path_factory):
    return {n: _job(tmp_path_factory, n, "mismatch") for n in (2, 3)}


@pytest.mark.parametrize("ranks", (2, 3))
@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_ranks_that_disagree_all_raise_and_stay_in_step(mismatch_jobs, scenario, ranks):
    got = _ranks(mismatch_jobs[ranks], scenario, ranks)
    rank1, others, words = EXPECTED[scenario]
    for r, g in enumerate(got):
        kind, message = g["error"].tolist()
        assert kind == (rank1 if r == 1 else others), (r, kind, message)
        for word in words:
            assert word in message, (r, message)
        if kind == "SyncError" and scenario.startswith("refused"):
            assert "refused" in message and ("[1]" in message or "1 rank" in message), message
        assert g["untouched"].all(), f"rank {r}: the running statistics changed"
    # the good call after it: normalized over every rank's (constant) values, so the ranks are still in step
    values = np.repeat(np.arange(ranks, dtype=np.float64), 2)
    expected = (values - values.mean()) / np.sqrt(values.var() + 1e-5)
    assert_close(np.concatenate([g["after"][:, 0] for g in got]), expected, np.float64, "y after the scenario")
