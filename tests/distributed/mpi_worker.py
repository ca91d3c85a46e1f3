"""One rank of the MPI tests (``test_distributed_mpi.py`` starts it under
``mpiexec -n N``): ``python mpi_worker.py OUT_DIR MODE``.

Every rank runs the same calls and saves what it got to
``OUT_DIR/<name>.<rank>.npz``; pytest compares. Modes:

- ``cases``: every ``sync_cases.CASES`` case, forward (with running
  statistics) and backward on this rank's part; the number of collectives
  each made; then ``SyncBatchNorm`` for two training steps and an eval;
- ``mismatch``: ranks that disagree, one scenario after the other, each
  followed by a good call (which must still work: no rank left behind);
- ``simulated-gpu`` (with ``NUMBA_ENABLE_CUDASIM=1``): the
  ``SIMULATED_GPU_CASES`` on numba-cuda device arrays, as ``cases``;
- ``gpu``: the ``GPU_CASES`` on a real GPU (CuPy and numba-cuda device
  arrays; rank r on device r % devices), over MPI;
- ``gpu-nccl``: the first cupy case over an NCCL communicator made from
  MPI (``NCCL.from_mpi``; one rank per device).
"""
from __future__ import annotations

import os
import sys
import traceback

import numpy as np

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

import bnkernels  # noqa: E402
from bnkernels import distributed  # noqa: E402
from sync_cases import CASES, GPU_CASES, SIMULATED_GPU_CASES  # noqa: E402


class Counting(distributed.MPI):
    """The real MPI adapter, counting its collectives."""

    gathers = reduces = 0

    def allgather(self, frame):
        self.gathers += 1
        return super().allgather(frame)

    def allreduce(self, frame):
        self.reduces += 1
        return super().allreduce(frame)


def run_cases(out: str, comm: Counting, cases=CASES, device=lambda a: a, host=np.asarray) -> None:
    """Each case's forward and backward on this rank's part: the arrays
    through ``device`` first, the results back through ``host``."""
    P, r = comm.size, comm.rank
    for case in cases.values():
        x, dy, gamma, beta, rm, rv = case.data(P)
        part, dpart = device(np.ascontiguousarray(case.part(x, P, r))), device(case.part(dy, P, r))
        gamma, beta, rm_given, rv_given = (device(a) for a in (gamma, beta, rm, rv))
        counts = []
        for step in range(2):  # the second call: the steady state (the capacity has grown, if it had to)
            g0, r0 = getattr(comm, "gathers", 0), getattr(comm, "reduces", 0)
            y, saved = bnkernels.bn_forward(part, gamma, beta, rm_given, rv_given, axis=case.axis,
                                            backend=case.backend, return_saved=True, comm=comm)
            dx, dgamma, dbeta = bnkernels.bn_backward(dpart, part, saved.mean, saved.invstd, gamma,
                                                      axis=case.axis, backend=case.backend, comm=comm)
            counts.append((getattr(comm, "gathers", 0) - g0, getattr(comm, "reduces", 0) - r0))
        results = dict(y=y, dx=dx, dgamma=dgamma, dbeta=dbeta, running_mean=rm_given, running_var=rv_given,
                       mean=saved.mean, invstd=saved.invstd)  # (after two steps: the test makes two too)
        np.savez(f"{out}/{case.name}.{r}.npz", counts=np.array(counts), **{k: host(v) for k, v in results.items()})


def run_layer(out: str, comm: Counting) -> None:
    """Two training steps of ``bnkernels.SyncBatchNorm`` and an eval call
    (which must make no collective)."""
    case = CASES["numba-nchw-float32"]
    P, r = comm.size, comm.rank
    x, dy, *_ = case.data(P)
    layer = bnkernels.SyncBatchNorm(3, comm=comm, backend="numba")
    layer.gamma[:] = [1.5, 0.5, -1.0]
    for _ in range(2):
        y = layer.forward(case.part(x, P, r))
        dx = layer.backward(case.part(dy, P, r))
    before = (comm.gathers, comm.reduces)
    layer.eval()
    y_eval = layer.forward(case.part(x, P, r))
    np.savez(f"{out}/layer.{r}.npz", y=y, dx=dx, dgamma=layer.grad_gamma, dbeta=layer.grad_beta,
             running_mean=layer.running_mean, running_var=layer.running_var, y_eval=y_eval,
             eval_collectives=np.array([comm.gathers - before[0], comm.reduces - before[1]]))


def scenarios(comm):
    """``name -> call`` run by every rank; rank 1 disagrees in each."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 3, 4)) + 2).astype(np.float32)
    one = comm.rank == 1

    def forward(**kw):
        return bnkernels.bn_forward(kw.pop("x", x), comm=comm, backend="numpy", **kw)

    y, saved = forward(return_saved=True)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    layer, trained = (bnkernels.SyncBatchNorm(3, comm=comm, backend="numpy") for _ in range(2))
    trained.forward(x)
    return {
        "channels": lambda: forward(x=x[:, :2] if one else x),
        "dtype": lambda: forward(x=x.astype(np.float64) if one else x),
        "training": lambda: forward(running_mean=rm, running_var=rv, training=not one),
        "refused": lambda: forward(gamma=np.ones(4 if one else 3, np.float32)),
        "refused-backward": lambda: bnkernels.bn_backward(x, x, saved.mean, saved.invstd,
                                                          axis=7 if one else 1, comm=comm, backend="numpy"),
        "channels-backward": lambda: bnkernels.bn_backward(x[:, :2] if one else x, x[:, :2] if one else x,
                                                           saved.mean[:2] if one else saved.mean,
                                                           saved.invstd[:2] if one else saved.invstd,
                                                           comm=comm, backend="numpy"),
        # beyond the capacity on one rank only: the round is repeated, and the channels still disagree
        "wide-channels": lambda: forward(x=np.tile(x, (1, 50, 1)) if one else x),
        # the layer's own check of x (before bn_forward) is part of the synchronized call
        "layer-channels": lambda: layer.forward(x[:, :2] if one else x),
        "layer-backward-first": lambda: (layer if one else trained).backward(x),
        # one value per channel over all ranks together: every rank raises the ValueError a local call would
        "one-value-in-all": lambda: forward(x=x[:1, :, 0] if comm.rank == 0 else x[:0, :, 0]),
    }, (rm, rv)


def run_mismatch(out: str, comm) -> None:
    calls, (rm, rv) = scenarios(comm)
    for name, call in calls.items():
        rm_before, rv_before = rm.copy(), rv.copy()
        try:
            call()
            got = ("none", "")
        except Exception as exc:  # what each rank raised is the result
            got = (type(exc).__name__, str(exc))
        y = bnkernels.bn_forward(np.full((2, 3), float(comm.rank)), comm=comm, backend="numpy")  # still in step
        np.savez(f"{out}/{name}.{comm.rank}.npz", error=np.array(got), after=y,
                 untouched=np.array([np.array_equal(rm, rm_before) and np.array_equal(rv, rv_before)]))


def run_simulated_gpu(out: str, comm: Counting) -> None:
    import cudasim_shuffles
    from numba import cuda

    cudasim_shuffles.install()
    sys.setswitchinterval(2e-4)  # (as tests/cudasim/conftest.py: the simulator's threads hand over faster)
    run_cases(out, comm, SIMULATED_GPU_CASES, cuda.to_device,
              lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a))


def run_gpu(out: str, comm: Counting, nccl: bool) -> None:
    import cupy
    from numba import cuda

    cupy.cuda.Device(comm.rank % cupy.cuda.runtime.getDeviceCount()).use()

    def host(a):
        return cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else (
            a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a))

    if nccl:
        case = GPU_CASES["cupy-nchw-float32"]
        run_cases(out, distributed.NCCL.from_mpi(comm.comm), {case.name: case}, cupy.asarray, host)
        return
    for backend, device in (("cupy", cupy.asarray), ("numba-cuda", cuda.to_device)):
        run_cases(out, comm, {n: c for n, c in GPU_CASES.items() if c.backend == backend}, device, host)


def main() -> int:
    out, mode = sys.argv[1], sys.argv[2]
    comm = Counting()
    try:
        if mode == "cases":
            run_cases(out, comm)
            run_layer(out, comm)
        elif mode == "simulated-gpu":
            run_simulated_gpu(out, comm)
        elif mode in ("gpu", "gpu-nccl"):
            run_gpu(out, comm, nccl=mode == "gpu-nccl")
        else:
            run_mismatch(out, comm)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        comm.comm.Abort(1)  # the others would wait forever in their next collective
    return 0


if __name__ == "__main__":
    sys.exit(main())
