"""The warp intrinsics that ``cudasim_shuffles`` adds to Numba's CUDA
simulator, checked against a NumPy model of their semantics.

Runs only under NUMBA_ENABLE_CUDASIM=1 (see conftest.py). The kernels are
ordinary CUDA Python (``cuda.<name>`` calls, as the simulator requires);
blocks are small because every simulated thread is a Python thread.
"""
import sys
import threading
import time

import numpy as np
import pytest
from numba import cuda
from numba.cuda.simulator.kernel import BlockThread

import cudasim_shuffles
from cudasim_shuffles import WarpSyncError

FULL = 0xFFFFFFFF
WARP = 32


# --------------------------------------------------------------------------
# NumPy model


def warp_slices(nthreads):
    """Slices of the linear thread ids of each warp of a block."""
    return [slice(s, min(s + WARP, nthreads)) for s in range(0, nthreads, WARP)]


def model_shfl(mode, vals, b):
    """One shuffle of a warp: ``vals`` holds its existing lanes (len <= 32);
    ``b`` the source lane / offset, a scalar or one per lane."""
    n = len(vals)
    out = vals.copy()
    for lane in range(n):
        bb = int(np.broadcast_to(b, n)[lane]) & 31
        if mode == "idx":
            src = bb
        elif mode == "up":
            src = lane - bb if lane - bb >= 0 else lane
        elif mode == "down":
            src = lane + bb if lane + bb <= 31 else lane
        else:
            src = lane ^ bb
        if src < n:
            out[lane] = vals[src]
    return out


def model_blocks(x, block, fn):
    """Apply ``fn(warp values) -> warp values`` to every warp of every block
    of the flat array ``x`` (blocks of ``block`` threads)."""
    out = x.copy()
    for b0 in range(0, len(x), block):
        for s in warp_slices(block):
            sl = slice(b0 + s.start, b0 + s.stop)
            out[sl] = fn(x[sl].copy())
    return out


def tree(mode):
    def fn(v):
        for off in (16, 8, 4, 2, 1):
            v = v + model_shfl(mode, v, off)
        return v
    return fn


def launch(kernel, grid, block, *args):
    kernel[grid, block](*args)


# --------------------------------------------------------------------------
# Kernels


@cuda.jit
def k_tree_down(x, out):
    i = cuda.grid(1)
    v = x[i]
    offset = 16
    while offset > 0:
        v += cuda.shfl_down_sync(FULL, v, offset)
        offset //= 2
    out[i] = v


@cuda.jit
def k_tree_xor(x, out):
    i = cuda.grid(1)
    v = x[i]
    mask = 16
    while mask > 0:
        v += cuda.shfl_xor_sync(FULL, v, mask)
        mask //= 2
    out[i] = v


@cuda.jit
def k_shfl_idx(x, src, out):
    i = cuda.grid(1)
    out[i] = cuda.shfl_sync(FULL, x[i], src[i])


@cuda.jit
def k_broadcast_lane0(x, out):
    i = cuda.grid(1)
    out[i] = cuda.shfl_sync(FULL, x[i], 0)


@cuda.jit
def k_scan_up(x, out):
    i = cuda.grid(1)
    lane = cuda.laneid
    v = x[i]
    d = 1
    while d < 32:
        n = cuda.shfl_up_sync(FULL, v, d)
        if lane >= d:
            v += n
        d *= 2
    out[i] = v


@cuda.jit
def k_single_steps(x, delta, up, down, xor):
    # One shuffle of each kind with a per-lane offset: the source lane may
    # fall off either end of the warp (own value) or be >= 32 (mod 32).
    i = cuda.grid(1)
    up[i] = cuda.shfl_up_sync(FULL, x[i], delta[i])
    down[i] = cuda.shfl_down_sync(FULL, x[i], delta[i])
    xor[i] = cuda.shfl_xor_sync(FULL, x[i], delta[i])


@cuda.jit
def k_syncwarp_rotate(x, out):
    # Each lane reads its right neighbour's slot (cyclic within the warp's
    # existing lanes), three times, with the slots rewritten in between:
    # without syncwarp this races.
    sh = cuda.shared.array(64, np.float64)
    tid = cuda.threadIdx.x
    i = cuda.grid(1)
    lane = tid % 32
    base = tid - lane
    nlanes = min(32, cuda.blockDim.x - base)
    v = x[i]
    for _ in range(3):
        sh[tid] = v
        cuda.syncwarp(FULL)
        v = sh[base + (lane + 1) % nlanes]
        cuda.syncwarp()
    out[i] = v


@cuda.jit
def k_warp_info(active, laneid, lt, warpsize):
    tid = cuda.threadIdx.x + cuda.blockDim.x * (
        cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
    i = cuda.blockIdx.x * cuda.blockDim.x * cuda.blockDim.y * cuda.blockDim.z + tid
    active[i] = cuda.activemask()
    laneid[i] = cuda.laneid
    lt[i] = cuda.lanemask_lt()
    warpsize[i] = cuda.warpsize


@cuda.jit
def k_votes(x, ballot, all_, any_, eq, match_any, match_all_mask, match_all_pred):
    i = cuda.grid(1)
    p = x[i] > 0
    ballot[i] = cuda.ballot_sync(FULL, p)
    all_[i] = cuda.all_sync(FULL, p)
    any_[i] = cuda.any_sync(FULL, p)
    eq[i] = cuda.eq_sync(FULL, p)
    match_any[i] = cuda.match_any_sync(FULL, x[i])
    m, pred = cuda.match_all_sync(FULL, x[i] * 0)
    match_all_mask[i] = m
    match_all_pred[i] = pred


@cuda.jit
def k_block_sum(x, out):
    # Block reduction in a 3-D block whose size is a multiple of 32:
    # per-warp shuffle reduction, warp leaders to shared memory,
    # syncthreads, the first warp reduces the leaders' values.
    sh = cuda.shared.array(32, np.float64)
    nthreads = cuda.blockDim.x * cuda.blockDim.y * cuda.blockDim.z
    tid = cuda.threadIdx.x + cuda.blockDim.x * (
        cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
    b = cuda.blockIdx.x
    lane = tid % 32
    warp = tid // 32
    nwarps = nthreads // 32
    v = x[b * nthreads + tid]
    offset = 16
    while offset > 0:
        v += cuda.shfl_down_sync(FULL, v, offset)
        offset //= 2
    if lane == 0:
        sh[warp] = v
    cuda.syncthreads()
    if warp == 0:
        v = sh[lane] if lane < nwarps else 0.0
        offset = 16
        while offset > 0:
            v += cuda.shfl_down_sync(FULL, v, offset)
            offset //= 2
        if lane == 0:
            out[b] = v
    cuda.syncthreads()


_seen_types = []


@cuda.jit
def k_record_types(x, out):
    # Simulator-only: records the type the shuffle returns.
    i = cuda.grid(1)
    r = cuda.shfl_xor_sync(FULL, x[i], 1)
    if i == 0:
        _seen_types.append(type(r))
    out[i] = r


@cuda.jit
def k_early_exit_read(x, out):
    i = cuda.grid(1)
    if cuda.laneid >= 20:
        return
    out[i] = cuda.shfl_down_sync(FULL, x[i], 16)  # lanes 4..15 read exited lanes


@cuda.jit
def k_early_exit_ok(x, out):
    i = cuda.grid(1)
    if cuda.laneid >= 16:
        return
    out[i] = cuda.shfl_xor_sync(FULL, x[i], 1)  # sources all alive


@cuda.jit
def k_mixed_ops(x, out):
    i = cuda.grid(1)
    if cuda.laneid < 16:
        out[i] = cuda.shfl_down_sync(FULL, x[i], 1)
    else:
        cuda.syncwarp(FULL)


@cuda.jit
def k_warp_vs_block_barrier(x, out):
    i = cuda.grid(1)
    if cuda.laneid < 16:
        cuda.syncthreads()
        out[i] = cuda.shfl_down_sync(FULL, x[i], 1)
    else:
        out[i] = cuda.shfl_down_sync(FULL, x[i], 1)
        cuda.syncthreads()


@cuda.jit
def k_fail_then_shuffle(x, out):
    i = cuda.grid(1)
    v = x[i]
    if cuda.laneid == 5:
        v = x[i + 1000]  # out of bounds: raises in the simulator
    out[i] = cuda.shfl_xor_sync(FULL, v, 1)


@cuda.jit
def k_sub_masks(x, out):
    # Two halves of the warp shuffle concurrently with disjoint masks.
    i = cuda.grid(1)
    lane = cuda.laneid
    if lane < 16:
        out[i] = cuda.shfl_sync(0x0000FFFF, x[i], 3)
    else:
        out[i] = cuda.shfl_sync(0xFFFF0000, x[i], 20)


# --------------------------------------------------------------------------
# Tests


def wait_for_simulator_threads(timeout=10.0):
    """All simulator threads end (none stays blocked in a barrier)."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if isinstance(t, BlockThread):
            t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threading.enumerate() if isinstance(t, BlockThread)]


def test_installed_and_idempotent():
    assert cudasim_shuffles.is_installed()
    cudasim_shuffles.install()
    cudasim_shuffles.install()
    from numba.cuda.simulator.kernelapi import FakeCUDAModule
    assert FakeCUDAModule.shfl_down_sync is not None


@pytest.mark.parametrize("block", [64, 48], ids=["block64", "block48-partial-warp"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.float64])
def test_warp_sum_shfl_down(block, dtype):
    grid = 2
    rng = np.random.default_rng(block)
    x = rng.integers(-100, 100, grid * block).astype(dtype)
    out = np.zeros_like(x)
    launch(k_tree_down, grid, block, x, out)
    expected = model_blocks(x, block, tree("down"))
    np.testing.assert_array_equal(out, expected)
    # Lane 0 of each full warp holds the warp's sum.
    for b0 in range(0, grid * block, block):
        for s in warp_slices(block):
            if s.stop - s.start == WARP:
                assert out[b0 + s.start] == x[b0 + s.start:b0 + s.stop].sum()


@pytest.mark.parametrize("block", [64, 48], ids=["block64", "block48-partial-warp"])
def test_butterfly_shfl_xor(block):
    grid = 2
    x = np.random.default_rng(1).standard_normal(grid * block)
    out = np.zeros_like(x)
    launch(k_tree_xor, grid, block, x, out)
    np.testing.assert_array_equal(out, model_blocks(x, block, tree("xor")))
    if block == 64:  # every lane of a full warp gets the warp's sum
        sums = np.add.reduceat(x, np.arange(0, len(x), WARP))
        np.testing.assert_allclose(out, np.repeat(sums, WARP), rtol=1e-12)


def test_broadcast_from_lane0():
    block, grid = 48, 2
    x = np.arange(grid * block, dtype=np.float32) * 1.5
    out = np.zeros_like(x)
    launch(k_broadcast_lane0, grid, block, x, out)
    np.testing.assert_array_equal(out, model_blocks(x, block, lambda v: model_shfl("idx", v, 0)))
    np.testing.assert_array_equal(out[:32], np.full(32, x[0]))
    np.testing.assert_array_equal(out[32:48], np.full(16, x[32]))


def test_shfl_sync_arbitrary_source_lanes():
    block, grid = 48, 2
    rng = np.random.default_rng(7)
    x = rng.integers(0, 1 << 40, grid * block).astype(np.int64)
    # Per-lane sources, including >= 32 (taken mod 32) and, in the partial
    # warp, lanes that do not exist (own value).
    src = rng.integers(0, 70, grid * block).astype(np.int32)
    out = np.zeros_like(x)
    launch(k_shfl_idx, grid, block, x, src, out)
    expected = x.copy()
    for b0 in range(0, len(x), block):
        for s in warp_slices(block):
            sl = slice(b0 + s.start, b0 + s.stop)
            expected[sl] = model_shfl("idx", x[sl], src[sl])
    np.testing.assert_array_equal(out, expected)
    assert (src % 32 != np.arange(len(src)) % 32).any()


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_prefix_sum_shfl_up(dtype):
    block, grid = 48, 2
    x = np.random.default_rng(3).integers(-50, 50, grid * block).astype(dtype)
    out = np.zeros_like(x)
    launch(k_scan_up, grid, block, x, out)
    expected = model_blocks(x, block, np.cumsum)
    np.testing.assert_array_equal(out, expected)


def test_single_up_down_xor_steps_with_per_lane_offsets():
    block, grid = 48, 2
    rng = np.random.default_rng(9)
    x = rng.standard_normal(grid * block).astype(np.float32)
    delta = rng.integers(0, 40, grid * block).astype(np.int32)
    up, down, xor = (np.zeros_like(x) for _ in range(3))
    launch(k_single_steps, grid, block, x, delta, up, down, xor)
    for mode, out in (("up", up), ("down", down), ("xor", xor)):
        expected = x.copy()
        for b0 in range(0, len(x), block):
            for s in warp_slices(block):
                sl = slice(b0 + s.start, b0 + s.stop)
                expected[sl] = model_shfl(mode, x[sl], delta[sl])
        np.testing.assert_array_equal(out, expected, err_msg=mode)
    assert (up == x).any() and (up != x).any() and (down == x).any() and (down != x).any()


def test_values_keep_their_type():
    for dtype in (np.float32, np.int32, np.float64, np.int64):
        _seen_types.clear()
        x = np.arange(32, dtype=dtype)
        out = np.zeros_like(x)
        launch(k_record_types, 1, 32, x, out)
        assert _seen_types == [dtype]
        np.testing.assert_array_equal(out, x.reshape(-1, 2)[:, ::-1].ravel())


def test_syncwarp_orders_shared_memory():
    block, grid = 48, 2
    x = np.arange(grid * block, dtype=np.float64)
    out = np.zeros_like(x)
    launch(k_syncwarp_rotate, grid, block, x, out)
    expected = model_blocks(x, block, lambda v: np.roll(v, -3))
    np.testing.assert_array_equal(out, expected)


def test_activemask_laneid_lanemask_lt_warpsize():
    block, grid = (8, 3, 2), 2       # 48 threads: warps of 32 and 16 lanes
    n = 48 * grid
    active, laneid, lt, ws = (np.zeros(n, np.int64) for _ in range(4))
    launch(k_warp_info, grid, block, active, laneid, lt, ws)
    lanes = np.tile(np.arange(48) % 32, grid)
    np.testing.assert_array_equal(laneid, lanes)
    np.testing.assert_array_equal(lt, (1 << lanes) - 1)
    np.testing.assert_array_equal(ws, 32)
    np.testing.assert_array_equal(
        active, np.tile(np.r_[np.full(32, 0xFFFFFFFF), np.full(16, 0xFFFF)], grid))


def test_votes_and_match():
    block = 48
    x = np.random.default_rng(5).integers(-2, 3, block).astype(np.int32)
    x[32:] = np.abs(x[32:]) + 1     # partial warp: predicate true everywhere
    outs = [np.zeros(block, np.int64) for _ in range(7)]
    launch(k_votes, 1, block, x, *outs)
    ballot, all_, any_, eq, match_any, ma_mask, ma_pred = outs
    for s in warp_slices(block):
        v = x[s]
        bits = sum(1 << l for l in range(len(v)) if v[l] > 0)
        existing = (1 << len(v)) - 1
        np.testing.assert_array_equal(ballot[s], bits)
        np.testing.assert_array_equal(all_[s], int(bits == existing))
        np.testing.assert_array_equal(any_[s], int(bits != 0))
        np.testing.assert_array_equal(eq[s], int(bits in (0, existing)))
        for l in range(len(v)):
            assert match_any[s][l] == sum(1 << k for k in range(len(v)) if v[k] == v[l])
        np.testing.assert_array_equal(ma_mask[s], existing)
        np.testing.assert_array_equal(ma_pred[s], 1)
    assert all_[32] == 1 and all_[0] == 0


def test_block_reduction_with_syncthreads_and_shared_memory_repeated():
    block, grid = (16, 2, 3), 3      # 96 threads = 3 warps, linear ids over x, y, z
    nthreads = 96
    rng = np.random.default_rng(11)
    for _ in range(3):               # fresh warp state on every launch
        x = rng.standard_normal(grid * nthreads)
        out = np.zeros(grid)
        launch(k_block_sum, grid, block, x, out)
        np.testing.assert_allclose(out, x.reshape(grid, nthreads).sum(axis=1), rtol=1e-12, atol=1e-12)


def test_disjoint_masks_in_one_warp():
    x = np.arange(32, dtype=np.int32) * 10
    out = np.zeros_like(x)
    launch(k_sub_masks, 1, 32, x, out)
    np.testing.assert_array_equal(out, np.r_[np.full(16, 30), np.full(16, 200)])


def test_early_exit_not_read_is_fine():
    x = np.arange(32, dtype=np.float64)
    out = np.full(32, -1.0)
    launch(k_early_exit_ok, 1, 32, x, out)
    np.testing.assert_array_equal(out[:16], x[:16].reshape(-1, 2)[:, ::-1].ravel())
    np.testing.assert_array_equal(out[16:], -1.0)
    assert not wait_for_simulator_threads()


def test_reading_an_exited_lane_raises_instead_of_hanging():
    x = np.arange(32, dtype=np.float64)
    out = np.zeros(32)
    with pytest.raises(WarpSyncError, match="has exited"):
        launch(k_early_exit_read, 1, 32, x, out)
    assert not wait_for_simulator_threads()
    # The next launch starts from a clean state.
    out2 = np.zeros(64)
    launch(k_tree_down, 2, 32, np.ones(64), out2)
    assert out2[0] == 32 and out2[32] == 32


def test_lanes_in_different_warp_operations_raise():
    x = np.arange(32, dtype=np.float64)
    with pytest.raises(WarpSyncError, match="different warp operations"):
        launch(k_mixed_ops, 1, 32, x, np.zeros(32))
    assert not wait_for_simulator_threads()


def test_warp_barrier_against_syncthreads_times_out_with_diagnosis():
    saved = cudasim_shuffles.timeout
    cudasim_shuffles.install(timeout_s=1.0)
    try:
        with pytest.raises(WarpSyncError, match="syncthreads"):
            launch(k_warp_vs_block_barrier, 1, 32, np.arange(32.0), np.zeros(32))
    finally:
        cudasim_shuffles.install(timeout_s=saved)
    assert not wait_for_simulator_threads()


def test_exception_in_a_lane_does_not_hang_the_warp():
    x = np.arange(64, dtype=np.float64)
    # Either the lane's own IndexError or its partner's WarpSyncError (which
    # quotes it) comes first, depending on the simulator's polling order.
    with pytest.raises((IndexError, WarpSyncError), match="out of bounds"):
        launch(k_fail_then_shuffle, 1, 64, x, np.zeros(64))
    assert not wait_for_simulator_threads()


class _SlowLookups(dict):
    """A block's shared-allocation table whose lookups take long enough
    that two threads both look before either stores (the simulator's race,
    made certain instead of rare)."""

    def get(self, key, default=None):
        value = super().get(key, default)
        time.sleep(0.05)
        return value


def _allocate_from_two_threads(array_fn):
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    shared = FakeCUDAShared(0)
    shared._allocations = _SlowLookups()
    got = [None, None]

    def allocate(slot):
        got[slot] = array_fn(shared, (8,), np.float32)  # both from this one line: one call site

    threads = [threading.Thread(target=allocate, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return got


def test_shared_array_is_one_array_per_block():
    """Two threads declaring the same shared array get the same array (the
    simulator's own check-then-store gives each its own when they
    interleave, so that one thread's writes never reach the other)."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    a, b = _allocate_from_two_threads(FakeCUDAShared.array.__wrapped__)
    assert a is not b, "the provocation no longer interleaves: the test would prove nothing"
    a, b = _allocate_from_two_threads(FakeCUDAShared.array)
    assert a is b and a.shape == (8,) and a.dtype == np.float32


@cuda.jit
def k_shared_sum(out):
    sh = cuda.shared.array(64, np.float32)
    t = cuda.threadIdx.x
    sh[t] = t + 1
    cuda.syncthreads()
    if t == 0:
        s = np.float32(0)
        for j in range(64):
            s += sh[j]
        out[cuda.blockIdx.x] = s


def test_shared_memory_reduction_with_frequent_thread_switches():
    """Each thread's write to shared memory reaches thread 0, also when
    Python switches threads as often as it can (where the unpatched
    simulator loses one about once in a hundred blocks)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(10):
            out = np.zeros(4, np.float32)
            k_shared_sum[4, 64](out)
            np.testing.assert_array_equal(out, np.full(4, 64 * 65 / 2, np.float32))
    finally:
        sys.setswitchinterval(previous)
