"""Synchronized batch norm over threads as ranks (a ``Communicator`` whose
collectives meet at a barrier), for hypothesis to try many partitions
quickly: any number of ranks, any part sizes (empty ones included), channel
counts on both sides of the first capacity. The real transports are tested
in ``test_distributed_mpi.py`` (MPI) and ``test_torch_sync.py`` (gloo)."""
from __future__ import annotations

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkernels
from bnkernels import distributed
from bnkernels.reference import reference_backward, reference_forward
from helpers import assert_close, make_input


class ThreadWorld(distributed.Communicator):
    """Rank ``rank`` of ``size`` threads sharing ``board``."""

    def __init__(self, board, rank, size):
        super().__init__(rank, size)
        self.board = board

    def _meet(self, frame):
        b = self.board
        b["frames"][self.rank] = frame.copy()
        b["barrier"].wait(timeout=30)
        rows = np.stack(b["frames"])
        b["barrier"].wait(timeout=30)  # nobody overwrites a frame before everyone has read them
        return rows

    def allgather(self, frame):
        return self._meet(frame)

    def allreduce(self, frame):
        return self._meet(frame).sum(axis=0)


def run_ranks(size, work):
    """``work(comm) -> result`` on ``size`` thread ranks; the results (or
    what each raised) by rank."""
    board = {"frames": [None] * size, "barrier": threading.Barrier(size)}
    results = [None] * size

    def rank(r):
        try:
            results[r] = work(ThreadWorld(board, r, size))
        except Exception as exc:  # each rank's outcome is the result
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4), channels=st.sampled_from([1, 3, 64, 65, 90]),
       spatial=st.sampled_from([1, 2]), channels_last=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2**16))
def test_any_partition_equals_the_whole_batch(sizes, channels, spatial, channels_last, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (sum(sizes), spatial, channels) if channels_last else (sum(sizes), channels, spatial)
    axis = -1 if channels_last else 1
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5)
    rm0, rv0 = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    bounds = np.cumsum([0, *sizes])

    def work(comm):
        part, dpart = x[bounds[comm.rank]:bounds[comm.rank + 1]], dy[bounds[comm.rank]:bounds[comm.rank + 1]]
        rm, rv = rm0.copy(), rv0.copy()
        y, s = bnkernels.bn_forward(part, running_mean=rm, running_var=rv, axis=axis, return_saved=True, comm=comm,
                                    backend="numpy")
        return (y, s, rm, rv, *bnkernels.bn_backward(dpart, part, s.mean, s.invstd, axis=axis, comm=comm,
                                                     backend="numpy"))

    results = run_ranks(len(sizes), work)
    if sum(sizes) * spatial == 1:  # one value per channel over all ranks: every rank raises what a local call raises
        assert all(isinstance(r, ValueError) and "more than 1 value" in str(r) for r in results), results
        return
    assert not any(isinstance(r, Exception) for r in results), results
    if sum(sizes) == 0:  # every part empty: empty results, running statistics untouched (as a local empty batch)
        assert all(r[0].shape == (0, *shape[1:]) and (r[2] == 0).all() and (r[3] == 1).all() for r in results)
        return
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference_forward(x, running_mean=rm0, running_var=rv0, axis=axis)
    assert_close(np.concatenate([r[0] for r in results]), ref_y, dtype, "y")
    for r in results:
        np.testing.assert_array_equal(r[2], results[0][2])  # the same running statistics on every rank
        np.testing.assert_array_equal(r[1].invstd, results[0][1].invstd)
    assert_close(results[0][2], ref_rm, np.float32, "running_mean", scale=np.abs(ref_rm).max() + 1)
    assert_close(results[0][3], ref_rv, np.float32, "running_var", scale=np.abs(ref_rv).max() + 1)
    rdx, rdg, rdb = reference_backward(dy, x, results[0][1].mean, results[0][1].invstd, axis=axis)
    assert_close(np.concatenate([r[4] for r in results]), rdx, dtype, "dx")
    assert_close(sum(r[5].astype(np.float64) for r in results), rdg, dtype, "dgamma", scale=np.abs(rdg).max() + 1)
    assert_close(sum(r[6].astype(np.float64) for r in results), rdb, dtype, "dbeta", scale=np.abs(rdb).max() + 1)


def test_the_capacity_grows_alike_on_every_rank_and_stays():
    """C = 100 needs 201 payload values (> 129): the first call repeats its
    round at the grown capacity, the next ones fit; a smaller C later fits
    too (the capacity never shrinks: one collective a call from then on)."""
    counts = []

    def work(comm):
        made = []
        gather = comm.allgather

        def counted(frame):
            made.append(frame.size)
            return gather(frame)

        comm.allgather = counted
        for C in (100, 100, 3):
            bnkernels.bn_forward(np.random.default_rng(C).standard_normal((4, C)), comm=comm, backend="numpy")
        counts.append(made)
        return comm.capacity[distributed.FORWARD]

    capacities = run_ranks(3, work)
    H, first = distributed.protocol.H, distributed.protocol.INITIAL_CAPACITY
    assert capacities == [201] * 3
    assert all(c == [H + first, H + 201, H + 201, H + 201] for c in counts), counts
