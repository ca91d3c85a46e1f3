"""The communicator adapters in one process: the NCCL adapter's launch
sequence (with a recording stand-in for CuPy's device memory and two
threads as ranks: NCCL cannot run without GPUs), mpi4py's ``COMM_SELF``
(a real one-rank communicator), what ``comm=`` accepts and refuses."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import bnkernels
from bnkernels import distributed
from bnkernels.reference import reference_backward, reference_forward
from helpers import OneRank, assert_close, make_input


class _Memory:
    """Stand-in device memory and stream for :class:`distributed.NCCL`,
    recording each step (what ``adapters._CupyDevice`` does with CuPy)."""

    class nccl:  # the constants the adapter passes
        NCCL_FLOAT64, NCCL_SUM = "ncclFloat64", "ncclSum"

    class Stream:
        ptr = 0x5EED

    def __init__(self):
        self.buffers, self.log = {}, []
        self.current = self.Stream()

    def stream(self, stream):
        self.log.append(("stream", "given" if stream is not None else "current"))
        return self.current if stream is None else stream

    def to_device(self, frame, stream):
        ptr = 0x1000 + len(self.buffers)
        self.buffers[ptr] = frame.copy()
        self.log.append(("to_device", frame.size, stream.ptr))
        return ptr

    def empty(self, n, stream):
        ptr = 0x1000 + len(self.buffers)
        self.buffers[ptr] = np.full(n, np.nan)
        self.log.append(("empty", n))
        return ptr

    def pointer(self, a):
        return a.ptr if isinstance(a, self.Stream) else a

    def to_host(self, ptr, stream):
        self.log.append(("to_host", ptr, stream.ptr))
        return self.buffers[ptr].copy()


class _ThreadNccl:
    """A stand-in ``NcclCommunicator`` of one of ``size`` threads: its
    collectives meet the other threads' at a barrier and read their send
    buffers."""

    def __init__(self, world, rank):
        self.world, self.rank = world, rank

    def rank_id(self):
        return self.rank

    def size(self):
        return self.world["size"]

    def _meet(self, op, send, recv, n, stream):
        w = self.world
        memory = w["memory"][self.rank]
        memory.log.append((op, send, recv, n, stream))
        w["sends"][self.rank] = memory.buffers[send][:n].copy()
        w["barrier"].wait(timeout=30)
        rows = np.stack(w["sends"])
        memory.buffers[recv][:] = rows.ravel() if op == "allGather" else rows.sum(axis=0)
        w["barrier"].wait(timeout=30)

    def allGather(self, send, recv, n, dtype, stream):
        assert dtype == "ncclFloat64"
        self._meet("allGather", send, recv, n, stream)

    def allReduce(self, send, recv, n, dtype, op, stream):
        assert (dtype, op) == ("ncclFloat64", "ncclSum")
        self._meet("allReduce", send, recv, n, stream)


def test_nccl_adapter_sequence_and_results_across_two_ranks(rng):
    x = make_input((9, 4, 3), np.float32, rng)
    dy = make_input(x.shape, np.float32, rng, mean=0.5)
    parts = [slice(0, 2), slice(2, 9)]
    world = {"size": 2, "barrier": threading.Barrier(2), "sends": [None, None],
             "memory": [_Memory(), _Memory()]}
    results, errors = [None, None], []

    def rank(r):
        try:
            comm = distributed.NCCL(_ThreadNccl(world, r), _device=world["memory"][r])
            y, s = bnkernels.bn_forward(x[parts[r]], return_saved=True, comm=comm, backend="numpy")
            grads = bnkernels.bn_backward(dy[parts[r]], x[parts[r]], s.mean, s.invstd, comm=comm, backend="numpy")
            results[r] = (y, s, *grads)
        except BaseException as exc:  # reported below (a thread's exception is otherwise lost)
            errors.append(exc)
            world["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    ref = reference_forward(x, axis=1)
    assert_close(np.concatenate([r[0] for r in results]), ref[0], np.float32, "y")
    rdx, rdg, rdb = reference_backward(dy, x, results[0][1].mean, results[0][1].invstd, axis=1)
    assert_close(np.concatenate([r[2] for r in results]), rdx, np.float32, "dx")
    assert_close(results[0][3] + results[1][3], rdg, np.float32, "dgamma summed", scale=np.abs(rdg).max() + 1)
    # the sequence: frame to the device on the current stream, the collective on that stream, the copy back on
    # it (which waits for the collective); per call, one collective
    for memory in world["memory"]:
        log = memory.log
        collectives = [e for e in log if e[0] in ("allGather", "allReduce")]
        assert [e[0] for e in collectives] == ["allGather", "allReduce"]
        for start in range(0, len(log), 5):
            stream, to_device, empty, collective, to_host = log[start:start + 5]
            assert stream == ("stream", "current")
            assert to_device[2] == _Memory.Stream.ptr and collective[4] == _Memory.Stream.ptr
            assert to_host == ("to_host", collective[2], _Memory.Stream.ptr)  # the collective's receive buffer
            n = to_device[1]
            assert collective[3] == n and empty[1] == (2 * n if collective[0] == "allGather" else n)


def test_nccl_adapter_on_a_given_stream():
    memory = _Memory()
    world = {"size": 1, "barrier": threading.Barrier(1), "sends": [None], "memory": [memory]}
    stream = _Memory.Stream()
    comm = distributed.NCCL(_ThreadNccl(world, 0), stream=stream, _device=memory)
    np.testing.assert_array_equal(comm.allreduce(np.arange(4.0)), np.arange(4.0))
    assert memory.log[0] == ("stream", "given")


def test_one_rank_mpi_comm_self_equals_a_local_call(rng):
    MPI = pytest.importorskip("mpi4py.MPI", reason="needs mpi4py (CI installs it)")
    x = make_input((6, 3, 5), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    y, s = bnkernels.bn_forward(x, running_mean=rm, running_var=rv, return_saved=True, comm=MPI.COMM_SELF,
                                backend="numpy")
    y2, s2 = bnkernels.bn_forward(x, running_mean=rm2, running_var=rv2, return_saved=True, backend="numpy")
    np.testing.assert_allclose(y, y2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, rv2, rtol=1e-6)
    # a raw mpi4py communicator is wrapped once: its protocol state (calls made) lasts
    wrapped = distributed.as_communicator(MPI.COMM_SELF)
    assert wrapped is distributed.as_communicator(MPI.COMM_SELF) and wrapped.calls >= 1


def test_every_synchronized_call_takes_part_once_inference_included(rng):
    comm = OneRank()
    x = make_input((4, 3), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, s = bnkernels.bn_forward(x, running_mean=rm, running_var=rv, return_saved=True, comm=comm)
    bnkernels.bn_forward(x, running_mean=rm, running_var=rv, training=False, comm=comm)
    bnkernels.bn_backward(x, x, s.mean, s.invstd, comm=comm)
    bnkernels.bn_backward(x, x, s.mean, s.invstd, training=False, comm=comm)
    H, cap = distributed.protocol.H, distributed.protocol.INITIAL_CAPACITY
    assert comm.frames == [("gather", H + cap), ("gather", H + cap), ("reduce", 2 * H + cap),
                           ("reduce", 2 * H + cap)]
    assert comm.calls == 4


def test_bad_comm_and_mask_with_comm_are_refused_and_change_nothing(rng):
    x = make_input((4, 3), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="comm must be"):
        bnkernels.bn_forward(x, running_mean=rm, running_var=rv, comm="world")
    comm = OneRank()
    with pytest.raises(ValueError, match="mask and comm"):
        bnkernels.bn_forward(x, running_mean=rm, running_var=rv, comm=comm, mask=np.ones(4, bool))
    assert (rm == 0).all() and (rv == 1).all()
    assert comm.frames == [("gather", distributed.protocol.H + distributed.protocol.INITIAL_CAPACITY)]  # failure frame


def test_torch_adapter_needs_an_initialized_process_group():
    torch = pytest.importorskip("torch")
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.Torch()
