"""Launch configuration of the GPU kernels (numba-cuda and cupy): plain Python, no GPU.

Every kernel works on the canonical view ``(outer, C, inner)`` of a
contiguous input. Both GPU backends use these plans. The formulas (all sizes in threads or
blocks):

Reductions (statistics, backward sums): 2-D blocks ``(tx, ty)``, ``tx``
channels side by side and ``ty`` lanes walking the values of each channel.

- channel planes (``inner > 1``, NCHW-like): ``tx = 1``,
  ``ty = block_threads``: one channel per block, consecutive lanes read
  consecutive addresses of a plane.
- channel fastest (``inner == 1``, NHWC and 2-D): ``tx = min(32, 2^ceil(log2 C))``,
  ``ty = block_threads / tx``: a warp reads ``tx`` neighbouring channels of
  ``32 / tx`` rows.
- ``groups = ceil(C / tx)`` channel groups along ``gridDim.y`` (capped at
  65535; blocks loop over groups beyond that).
- ``gx`` blocks per group along ``gridDim.x``, so that small C still fills
  the GPU (``blocks_per_sm``: the compiled kernel's occupancy by its
  registers and shared memory, :func:`resident_blocks`, when the backend
  knows it; else by threads alone):
  ``gx = clamp(min(ceil(waves * sm_count * blocks_per_sm / groups),
  ceil(n / (ty * min_values_per_thread))), 1, max_splits)`` with ``n`` the
  values per channel. Each block writes a partial result per channel to a
  staging buffer ``(C, gx)``; the last block of a group to finish merges them.

Elementwise passes (apply, inference, dx): 1-D grid-stride loops,
``block = block_threads``, ``grid = min(ceil(total / (block * unroll)),
waves * sm_count * blocks_per_sm)``.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

#: Debugging switch of both GPU backends: ``BNKERNELS_POISON=1`` fills every
#: buffer they allocate with NaN, so an element no kernel writes shows up
#: (the kernel tests run this way).
POISON_ENV = "BNKERNELS_POISON"


def poison_requested() -> bool:
    return os.environ.get(POISON_ENV) == "1"


MAX_GRID_Y = 65535
WARP = 32


@dataclass(frozen=True)
class DeviceLimits:
    """What the launch formulas need to know about a device."""

    sm_count: int
    max_threads_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_grid_x: int = 2**31 - 1
    max_grid_y: int = MAX_GRID_Y
    # what bounds resident blocks besides threads (H100/H200 values by default)
    registers_per_sm: int = 65536
    shared_per_sm: int = 228 * 1024
    max_blocks_per_sm: int = 32

    @classmethod
    def from_device(cls, device) -> "DeviceLimits":
        """From a ``numba.cuda`` device (attributes the driver reports);
        missing attributes (the simulator) fall back to a one-SM device."""
        def attr(name, default):
            value = getattr(device, name, None)
            return int(value) if value else default

        return cls(
            sm_count=attr("MULTIPROCESSOR_COUNT", 1),
            max_threads_per_block=attr("MAX_THREADS_PER_BLOCK", 1024),
            max_threads_per_sm=attr("MAX_THREADS_PER_MULTIPROCESSOR", 2048),
            max_grid_x=attr("MAX_GRID_DIM_X", 2**31 - 1),
            max_grid_y=attr("MAX_GRID_DIM_Y", MAX_GRID_Y),
            registers_per_sm=attr("MAX_REGISTERS_PER_MULTIPROCESSOR", 65536),
            shared_per_sm=attr("MAX_SHARED_MEMORY_PER_MULTIPROCESSOR", 228 * 1024),
            max_blocks_per_sm=attr("MAX_BLOCKS_PER_MULTIPROCESSOR", 32),
        )


#: Shared memory the system reserves per resident block (sm_80 and later).
RESERVED_SHARED_PER_BLOCK = 1024
#: Registers are allocated per warp in units of this many.
REGISTER_UNIT = 256


def resident_blocks(limits: DeviceLimits, threads: int, registers: int, shared_bytes: int) -> int:
    """Blocks of ``threads`` threads of a kernel using ``registers`` per
    thread and ``shared_bytes`` of static shared memory that fit on one SM
    at once (what ``cudaOccupancyMaxActiveBlocksPerMultiprocessor``
    computes, from the same rules: registers per warp in units of 256,
    1 KiB of shared memory reserved per block). At least 1."""
    warps = -(-threads // WARP)
    per_warp = -(-max(registers, 1) * WARP // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = limits.registers_per_sm // (per_warp * warps)
    by_shared = (limits.shared_per_sm // (shared_bytes + RESERVED_SHARED_PER_BLOCK) if shared_bytes
                 else limits.max_blocks_per_sm)
    return max(1, min(by_registers, by_shared, limits.max_threads_per_sm // threads, limits.max_blocks_per_sm))


@dataclass(frozen=True)
class Tuning:
    """Knobs of the formulas (defaults are what the backend uses)."""

    block_threads: int = 256  # multiple of 32, power of two
    waves: int = 2  # target resident blocks per SM times this
    min_values_per_thread: int = 16  # at least this much work per reduction thread
    max_splits: int = 1024  # bounds the staging buffer and the last-block merge
    unroll: int = 4  # values per thread per grid-stride iteration


@dataclass(frozen=True)
class ReducePlan:
    """A reduction launch: ``grid = (splits, grid_groups)``, ``block = (tx, ty)``."""

    tx: int
    ty: int
    groups: int  # channel groups of tx channels
    splits: int  # blocks per group (gridDim.x)
    grid_groups: int  # gridDim.y (<= max_grid_y; blocks loop over the rest)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.splits, self.grid_groups)

    @property
    def block(self) -> tuple[int, int]:
        return (self.tx, self.ty)


@dataclass(frozen=True)
class ElementwisePlan:
    grid: int
    block: int


def _blocks_per_sm(limits: DeviceLimits, threads: int) -> int:
    return max(1, limits.max_threads_per_sm // threads)


@functools.lru_cache(maxsize=1024)  # every call of a training loop asks the same
def reduce_plan(outer: int, channels: int, inner: int, limits: DeviceLimits,
                tuning: Tuning = Tuning(), blocks_per_sm: int | None = None) -> ReducePlan:
    """Plan a per-channel reduction over an ``(outer, C, inner)`` view.
    ``blocks_per_sm``: the compiled kernel's occupancy
    (:func:`resident_blocks`), None when unknown (then from threads alone)."""
    if channels < 1:
        raise ValueError("a reduction needs at least one channel")
    threads = min(tuning.block_threads, limits.max_threads_per_block)
    if inner > 1:
        tx = 1
    else:
        tx = min(WARP, 1 << max(0, math.ceil(math.log2(channels))))
    ty = threads // tx
    groups = math.ceil(channels / tx)
    n = outer * inner
    target_blocks = tuning.waves * limits.sm_count * (blocks_per_sm or _blocks_per_sm(limits, threads))
    by_occupancy = math.ceil(target_blocks / groups)
    by_work = math.ceil(n / (ty * tuning.min_values_per_thread))
    splits = max(1, min(by_occupancy, by_work, tuning.max_splits, limits.max_grid_x))
    return ReducePlan(tx, ty, groups, splits, min(groups, limits.max_grid_y))


@functools.lru_cache(maxsize=1024)
def elementwise_plan(total: int, limits: DeviceLimits, tuning: Tuning = Tuning(),
                     blocks_per_sm: int | None = None) -> ElementwisePlan:
    """Plan a grid-stride elementwise pass over ``total`` values
    (``blocks_per_sm`` as in :func:`reduce_plan`)."""
    block = min(tuning.block_threads, limits.max_threads_per_block)
    resident = tuning.waves * limits.sm_count * (blocks_per_sm or _blocks_per_sm(limits, block))
    grid = max(1, min(math.ceil(total / (block * tuning.unroll)), resident, limits.max_grid_x))
    return ElementwisePlan(grid, block)
