"""Synchronized batch norm across processes: the communicators ``comm=``
takes, and how a public function runs as one synchronized call.

``bn_forward(x, ..., comm=c)`` normalizes with the statistics of the global
batch (every rank's x together) and ``bn_backward(..., comm=c)`` returns the
exact gradient of that normalization; see ``protocol`` for what is sent
and how disagreeing ranks are told. Communicators (``adapters``):

- :class:`MPI` (``mpi4py``; a raw mpi4py communicator is wrapped for you),
- :class:`Torch` (``torch.distributed``: gloo on the CPU, NCCL on the GPU),
- :class:`NCCL` (``cupy.cuda.nccl``, on the current stream),
- or any :class:`Communicator` subclass.

Run ``mpiexec -n 2 python train.py`` with ``comm=bnkernels.distributed.MPI()``,
or ``torchrun --nproc-per-node 2 train.py`` with ``Torch()``.
"""
from __future__ import annotations

from ..errors import SyncError
from .adapters import MPI, NCCL, Communicator, Torch, as_communicator
from .protocol import BACKWARD, FORWARD, Call


def synchronized(comm, op: int, run):
    """``run(call)`` as one synchronized call on ``comm`` (a
    :class:`Communicator`, a raw mpi4py one, or already a ``Call``: a public
    function calling itself on a view passes its call on). Whatever ``run``
    does, this rank takes part in exactly one round: the round of the
    reduction, or the header alone (a call that needed none), or a failure
    frame when ``run`` raised before the round, so that no other rank is
    left waiting."""
    if isinstance(comm, Call):
        return run(comm)
    call = Call(as_communicator(comm), op)
    try:
        result = run(call)
    except SyncError:
        raise
    except Exception as exc:
        call.abandon(exc)
        raise
    call.finish()
    return result


__all__ = ["BACKWARD", "FORWARD", "MPI", "NCCL", "Call", "Communicator", "SyncError", "Torch", "as_communicator",
           "synchronized"]
