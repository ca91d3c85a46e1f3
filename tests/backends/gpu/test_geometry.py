"""Launch plans of the GPU kernels (numba-cuda and cupy): plain Python, checked without a GPU."""
import math

import pytest

from bnkernels.backends.gpu.geometry import (DeviceLimits, Tuning, elementwise_plan, reduce_plan,
                                             resident_blocks)

H100 = DeviceLimits(sm_count=132)
A100 = DeviceLimits(sm_count=108)

SHAPES = [  # (outer, C, inner)
    (32, 64, 56 * 56), (256, 256, 14 * 14), (64, 3, 224 * 224),  # NCHW
    (32 * 56 * 56, 64, 1), (8192, 1024, 1), (100000, 32, 1), (5, 3, 1),  # channel fastest
    (1, 1, 2), (2, 70000, 1), (2, 70000, 3),  # C beyond the 65535 grid.y limit
]


@pytest.mark.parametrize("limits", [H100, A100, DeviceLimits(sm_count=1)], ids=["h100", "a100", "1sm"])
@pytest.mark.parametrize("outer,C,inner", SHAPES)
def test_reduce_plan_is_valid(outer, C, inner, limits):
    plan = reduce_plan(outer, C, inner, limits)
    tx, ty = plan.block
    assert tx & (tx - 1) == 0 and tx <= 32, "tx is a power of two <= 32 (the shuffle tree needs it)"
    assert (tx * ty) % 32 == 0 and tx * ty <= limits.max_threads_per_block
    assert tx == 1 if inner > 1 else tx >= min(C, 32), "planes: one channel per block; rows: a warp spans channels"
    assert plan.groups == math.ceil(C / tx)
    assert 1 <= plan.grid_groups <= min(plan.groups, limits.max_grid_y)
    assert 1 <= plan.splits <= Tuning().max_splits
    n = outer * inner
    assert plan.splits <= max(1, math.ceil(n / ty)), "no block without values to reduce"


def test_small_c_still_fills_the_gpu():
    """3 channels of 64*224*224 values: many blocks per channel, not 3."""
    plan = reduce_plan(64, 3, 224 * 224, H100)
    assert plan.splits * plan.groups >= 2 * H100.sm_count


def test_many_channels_need_no_splits():
    plan = reduce_plan(2, 100000, 3, H100)
    assert plan.splits == 1 and plan.grid_groups == 65535 < plan.groups


def test_small_reductions_stay_in_one_block():
    assert reduce_plan(2, 8, 3, H100).splits == 1


@pytest.mark.parametrize("total", [1, 31, 32 * 64 * 56 * 56, 2**31 + 5, 2**40])
def test_elementwise_plan(total):
    plan = elementwise_plan(total, H100)
    assert plan.block == 256
    assert 1 <= plan.grid <= Tuning().waves * H100.sm_count * (H100.max_threads_per_sm // 256)
    assert plan.grid <= max(1, math.ceil(total / (256 * Tuning().unroll)))


def test_limits_from_a_device_like_object():
    class Dev:
        MULTIPROCESSOR_COUNT = 132
        MAX_THREADS_PER_BLOCK = 1024
        MAX_THREADS_PER_MULTIPROCESSOR = 2048
        MAX_GRID_DIM_X = 2**31 - 1
        MAX_GRID_DIM_Y = 65535

    assert DeviceLimits.from_device(Dev()) == H100
    assert DeviceLimits.from_device(object()) == DeviceLimits(sm_count=1)


def test_zero_channels_is_an_error():
    with pytest.raises(ValueError):
        reduce_plan(4, 0, 1, H100)


@pytest.mark.parametrize("registers,shared,threads,expected", [
    (60, 12292, 256, 4),   # bn_stats<float>: 1920 registers per warp, 8 warps -> 4 (shared memory allows 17)
    (40, 0, 256, 6),       # bn_apply: 1280 per warp -> 6
    (32, 0, 256, 8),       # threads bound it: 2048 / 256
    (24, 0, 64, 32),       # the 32-block limit
    (32, 100 * 1024, 256, 2),  # shared memory bounds it: 228 KiB / (100 KiB + 1 KiB)
    (255, 0, 1024, 1),     # never less than one
])
def test_resident_blocks_by_registers_shared_memory_and_threads(registers, shared, threads, expected):
    """The occupancy rules (registers per warp in units of 256, 1 KiB of
    shared memory reserved per block), worked by hand for an H100."""
    assert resident_blocks(H100, threads, registers, shared) == expected


def test_grids_follow_the_kernels_occupancy():
    """A kernel resident 4 times per SM gets half the splits and
    elementwise blocks of one resident 8 times (threads alone)."""
    by_threads = reduce_plan(4096, 4, 3136, H100)
    by_kernel = reduce_plan(4096, 4, 3136, H100, Tuning(), 4)
    assert by_kernel.splits == math.ceil(by_threads.splits / 2)
    assert elementwise_plan(1 << 26, H100, Tuning(), 4).grid == elementwise_plan(1 << 26, H100).grid // 2
