"""What the synchronized tests share: starting ``mpi_worker.py`` under
``mpiexec``, reading what each rank saved, and checking it against one
process holding the whole batch (``tests/test_distributed_mpi.py``,
``tests/cudasim/test_distributed_simulated.py``)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import bnkernels
from bnkernels.reference import reference_backward, reference_forward
from helpers import assert_close
from launch import mpiexec, run

WORKER = Path(__file__).parent / "mpi_worker.py"
RANKS = (1, 2, 3)
TIMEOUT = 300  # seconds for a whole job (numba compiles in every rank the first time)


def job(tmp_path_factory, ranks: int, mode: str, env=None) -> Path:
    """Run ``mpi_worker.py OUT mode`` under ``mpiexec -n ranks``; returns OUT."""
    if mpiexec() is None:
        pytest.fail("mpi4py is installed but no mpiexec was found (pip install mpich)")
    out = tmp_path_factory.mktemp(f"{mode}{ranks}")
    proc = run([mpiexec(), "-n", str(ranks), sys.executable, str(WORKER), str(out), mode], TIMEOUT, env)
    assert proc.returncode == 0, f"mpiexec -n {ranks} failed:\n{proc.stdout}"
    return out


def ranks_of(folder: Path, name: str, ranks: int) -> list[dict]:
    """What each rank of a job saved for ``name``."""
    return [dict(np.load(folder / f"{name}.{r}.npz")) for r in range(ranks)]


def whole_batch(case, ranks: int, steps: int = 2, backend=None):
    """One process, the whole batch, ``steps`` training steps (on the
    case's backend, or ``backend``)."""
    x, dy, gamma, beta, rm, rv = case.data(ranks)
    backend = backend or case.backend
    for _ in range(steps):
        y, s = bnkernels.bn_forward(x, gamma, beta, rm, rv, axis=case.axis, backend=backend, return_saved=True)
    dx, dgamma, dbeta = bnkernels.bn_backward(dy, x, s.mean, s.invstd, gamma, axis=case.axis, backend=backend)
    return dict(x=x, dy=dy, gamma=gamma, beta=beta, y=y, mean=s.mean, invstd=s.invstd, dx=dx, dgamma=dgamma,
                dbeta=dbeta, running_mean=rm, running_var=rv)


def check_against_whole_batch(got: list[dict], case, ranks: int, whole_backend=None):
    """Every rank's saved results ``got`` against one process with the
    whole batch (``case``'s backend, or ``whole_backend``) and the
    float64 reference."""
    whole = whole_batch(case, ranks, backend=whole_backend)
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
