"""Communicator adapters: the engines bnkernels synchronizes over.

Each adapter makes two collectives of a 1-D float64 host buffer of the same
length on every rank: ``allgather(frame) -> (size, len)`` and
``allreduce(frame) -> (len,)`` (sum). ``protocol.Call`` decides what goes
in them. The adapter also keeps the protocol's state for its communicator
(``capacity``, ``calls``), the same on every rank because every rank makes
the same rounds; so make one adapter per communicator and keep it (a raw
mpi4py communicator is wrapped once, :func:`as_communicator`).

Nothing here imports mpi4py, torch or cupy before an adapter is made.
"""
from __future__ import annotations

import numpy as np

from . import protocol

MPI_INSTALL = 'pip install "bnkernels[mpi]" (mpi4py and an MPI library: mpich from PyPI, or your system\'s)'


def _need(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(f"{module} is needed for this communicator and cannot be imported ({exc}): {extra}") \
            from exc


class Communicator:
    """What ``comm=`` takes: ``rank``, ``size`` and the two collectives.

    Subclass it for another engine: implement :meth:`allgather` and
    :meth:`allreduce` on float64 host arrays; both must be called by every
    rank in the same order (bnkernels guarantees that for its own calls).
    One synchronized call at a time per communicator: threads that
    synchronize concurrently need one communicator each (as MPI and NCCL
    require of their own communicators).
    """

    def __init__(self, rank: int, size: int):
        self.rank, self.size = int(rank), int(size)
        #: payload capacity per operation (``protocol``): grows alike on every rank
        self.capacity = {protocol.FORWARD: protocol.INITIAL_CAPACITY, protocol.BACKWARD: protocol.INITIAL_CAPACITY}
        #: synchronized calls made so far on this communicator
        self.calls = 0

    def allgather(self, frame: np.ndarray) -> np.ndarray:
        """Every rank's ``frame`` (1-D float64, one length on every rank):
        ``(size, len)``, row r from rank r."""
        raise NotImplementedError

    def allreduce(self, frame: np.ndarray) -> np.ndarray:
        """The sum over the ranks of ``frame`` (1-D float64), on every rank."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class MPI(Communicator):
    """mpi4py: ``comm`` (default ``MPI.COMM_WORLD``), buffer collectives
    (``Allgather``, ``Allreduce``) on host memory.

    On a GPU backend the frames are host memory as well: the statistics
    stage has copied its reductions to the host, which synchronizes the
    stream, before the collective; MPI never sees device memory, so no
    CUDA-aware MPI is needed (and a few kilobytes gain nothing from it).
    """

    def __init__(self, comm=None):
        mpi = _need("mpi4py.MPI", MPI_INSTALL)
        self.comm = mpi.COMM_WORLD if comm is None else comm
        if not isinstance(self.comm, mpi.Intracomm):
            raise TypeError(f"comm must be an mpi4py intracommunicator, got {type(comm).__name__}")
        self._mpi = mpi
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())

    def allgather(self, frame):
        rows = np.empty((self.size, frame.size))
        self.comm.Allgather([frame, self._mpi.DOUBLE], [rows, self._mpi.DOUBLE])
        return rows

    def allreduce(self, frame):
        total = np.empty_like(frame)
        self.comm.Allreduce([frame, self._mpi.DOUBLE], [total, self._mpi.DOUBLE], op=self._mpi.SUM)
        return total


class Torch(Communicator):
    """``torch.distributed``: ``group`` (default the world), with its
    backend's device: host tensors on gloo (and any CPU backend), tensors on
    the current CUDA device on NCCL, copied back to the host (which waits
    for the collective on torch's current stream)."""

    def __init__(self, group=None):
        self._torch = _need("torch", 'pip install "bnkernels[torch]"')
        self._dist = self._torch.distributed
        if not self._dist.is_available() or not self._dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                               "first (torchrun does the environment)")
        self.group = group
        self.device = self._device(self._dist.get_backend(group))
        super().__init__(self._dist.get_rank(group), self._dist.get_world_size(group))

    def _device(self, backend: str):
        if "nccl" in str(backend).lower():
            return self._torch.device("cuda", self._torch.cuda.current_device())
        return self._torch.device("cpu")

    def _tensor(self, frame):
        return self._torch.from_numpy(frame).to(self.device)

    def allgather(self, frame):
        # into a flat (size * len,) tensor: gloo refuses a (size, len) output ("invalid tensor size"); torch
        # 2.13 names the collective all_gather_single (all_gather_into_tensor: deprecated, a FutureWarning)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        rows = self._torch.empty(self.size * frame.size, dtype=self._torch.float64, device=self.device)
        gather(rows, self._tensor(frame), group=self.group)
        return rows.cpu().numpy().reshape(self.size, frame.size)

    def allreduce(self, frame):
        t = self._tensor(frame.copy())
        self._dist.all_reduce(t, group=self.group)
        return t.cpu().numpy()


class NCCL(Communicator):
    """``cupy.cuda.nccl``: a ``NcclCommunicator`` (:meth:`from_mpi` makes
    one from an mpi4py communicator), collectives on CuPy's current stream
    (or ``stream``): the frame goes to the device, the collective is
    enqueued, and the result comes back with a copy on that stream (which
    waits for it)."""

    def __init__(self, comm, *, stream=None, _device=None):
        self.comm, self._stream = comm, stream
        self._dev = _device if _device is not None else _CupyDevice()
        super().__init__(comm.rank_id(), comm.size())

    @classmethod
    def from_mpi(cls, mpi_comm=None, **options) -> "NCCL":
        """An NCCL communicator over the ranks of an mpi4py one (rank 0's
        unique id broadcast by MPI), on the current CUDA device."""
        mpi = MPI(mpi_comm)
        nccl = _need("cupy.cuda.nccl", 'pip install "bnkernels[cuda13]" (cupy with NCCL)')
        uid = mpi.comm.bcast(nccl.get_unique_id() if mpi.rank == 0 else None, root=0)
        return cls(nccl.NcclCommunicator(mpi.size, uid, mpi.rank), **options)

    def _run(self, frame, rows: int, collective) -> np.ndarray:
        dev = self._dev
        stream = dev.stream(self._stream)
        send = dev.to_device(frame, stream)
        recv = dev.empty(rows * frame.size, stream)
        collective(dev.pointer(send), dev.pointer(recv), frame.size, dev.pointer(stream))
        return dev.to_host(recv, stream)

    def allgather(self, frame):
        nccl = self._dev.nccl
        return self._run(frame, self.size, lambda s, r, n, st: self.comm.allGather(
            s, r, n, nccl.NCCL_FLOAT64, st)).reshape(self.size, frame.size)

    def allreduce(self, frame):
        nccl = self._dev.nccl
        return self._run(frame, 1, lambda s, r, n, st: self.comm.allReduce(
            s, r, n, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, st))


class _CupyDevice:
    """What :class:`NCCL` does with device memory, through CuPy (a stand-in
    with these members records the sequence in the CPU tests)."""

    def __init__(self):
        self.cupy = _need("cupy", 'pip install "bnkernels[cuda13]"')
        self.nccl = _need("cupy.cuda.nccl", 'pip install "bnkernels[cuda13]" (cupy with NCCL)')

    def stream(self, stream):
        return self.cupy.cuda.get_current_stream() if stream is None else stream

    def to_device(self, frame, stream):
        a = self.cupy.empty(frame.shape, frame.dtype)
        a.set(frame, stream=stream)
        return a

    def empty(self, n, stream):
        return self.cupy.empty(n, np.float64)

    def pointer(self, a):
        return a.ptr if hasattr(a, "ptr") else a.data.ptr

    def to_host(self, a, stream):
        host = a.get(stream=stream)  # waits for the copy, enqueued after the collective
        stream.synchronize()
        return host


_WRAPPED: dict = {}


def as_communicator(comm) -> Communicator:
    """``comm`` as a :class:`Communicator`: itself, or a raw mpi4py
    intracommunicator wrapped in :class:`MPI` (once per communicator, so
    that its protocol state lasts)."""
    if isinstance(comm, Communicator):
        return comm
    if type(comm).__module__ == "mpi4py.MPI" and hasattr(comm, "Allgather"):
        key = comm.py2f()
        wrapped = _WRAPPED.get(key)
        if wrapped is None or wrapped.comm != comm:
            wrapped = _WRAPPED[key] = MPI(comm)
        return wrapped
    raise TypeError(f"comm must be a bnkernels.distributed communicator (MPI, Torch, NCCL) or an mpi4py "
                    f"communicator, got {type(comm).__name__}")
