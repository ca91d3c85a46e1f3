"""The launch sequences of both GPU backends (cupy's CUDA C++, numba-cuda's
Numba kernels), in plain Python: which kernel, grid, block and arguments
each stage launches, the workspace and counters it needs, and the edge
cases (no channels, no values).

Nothing here imports a GPU package. A :class:`Launch` names its kernel by
stage (``"stats"``, ``"apply"``, ``"infer_coeffs"``, ``"bwd_reduce"``,
``"dx"``) and its arguments by name; each backend's ``bind`` maps it to its
own kernel and argument order (cupy: ``cupy_backend/bind.py``;
numba-cuda: ``numba_cuda/bind.py``). An absent optional array is None.

The sequences run on any *device* object providing:

- ``alloc(shape, dtype)``: a buffer (NaN-filled when ``BNKERNELS_POISON=1``);
- ``zeros(shape, dtype)``: a zeroed buffer;
- ``scratch(key, specs)``: the workspace ``{name: buffer}`` for ``specs``
  ``{name: (shape, dtype)}``, kept per key (and stream) and reused by the
  next call of the same plan: only what a call returns is allocated;
- ``counters(n)``: zeroed integer counters the reductions leave zeroed;
- ``run(launch)``: launch on the device's stream;
- ``aligned(*arrays)``: whether all are 16-byte aligned;
- ``limits``, ``tuning``: of ``geometry``;
- for :class:`Program`: ``bind(launch) -> (fn, args)``, the launch bound to
  the backend's kernel (``fn(args)`` launches it with positional ``args``).

Both backends, and the tests (the host harness runs cupy's kernels on the
CPU with NumPy arrays: ``tests/host_cuda``), run exactly these.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np

from ...validation import compute_dtype
from ..interface import ChannelLayout
from . import geometry

#: Threads per block of the per-channel coefficient kernel.
COEFF_THREADS = 128


@dataclass(frozen=True)
class Launch:
    """One kernel launch, independent of the backend.

    ``storage``: the dtype of x (selects the kernel's instantiation);
    ``rows``: the channel-fastest variant of a reduction; ``stats_dtype``:
    the dtype of the per-channel statistics it reads or updates (stats: the
    running statistics; infer_coeffs: mean and variance; bwd_reduce: the
    saved mean and invstd), None if there are none."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: dict = field(hash=False)
    storage: np.dtype = np.dtype(np.float32)
    rows: bool = False
    stats_dtype: np.dtype | None = None


def stats_dtype(*dtypes) -> np.dtype:
    """The one dtype the kernels take for a pair of per-channel statistics
    (running, or mean and variance) of these dtypes: float64 if either is,
    else float32."""
    return np.dtype(np.float64 if any(np.dtype(d) == np.float64 for d in dtypes) else np.float32)


def saved_dtype(mean_dtype, invstd_dtype) -> np.dtype:
    """The dtype the backward reads the saved statistics in: their own when
    both are float32 or both float64 (what the forward returns: no cast),
    else float64."""
    same = np.dtype(mean_dtype) == np.dtype(invstd_dtype) and np.dtype(mean_dtype) in (np.float32, np.float64)
    return np.dtype(mean_dtype) if same else np.dtype(np.float64)


def _reduce_geometry(layout: ChannelLayout, limits, tuning, blocks_per_sm=None):
    plan = geometry.reduce_plan(layout.outer, layout.channels, layout.inner, limits, tuning, blocks_per_sm)
    return plan, (plan.splits, plan.grid_groups, 1), (plan.tx, plan.ty, 1)


def _elementwise_geometry(total: int, limits, tuning, blocks_per_sm=None):
    plan = geometry.elementwise_plan(total, limits, tuning, blocks_per_sm)
    return (plan.grid, 1, 1), (plan.block, 1, 1)


def occupancy(dev, kernel: str, layout: ChannelLayout, storage, stats_dtype=None) -> int | None:
    """Resident blocks per SM of the compiled kernel a launch of ``kernel``
    over ``layout`` will run: the device's ``resident_blocks(launch)`` for a
    probe launch (the instantiation's choices: dtypes, layout, sizes; a grid
    by threads alone), from the kernel's registers and shared memory
    (``geometry.resident_blocks``). None when the device has no such method
    or cannot tell yet: then grids are sized by threads alone."""
    ask = getattr(dev, "resident_blocks", None)
    if ask is None:
        return None
    n = layout.count * layout.channels
    if kernel in ("stats", "bwd_reduce"):
        _, grid, block = _reduce_geometry(layout, dev.limits, dev.tuning)
    else:
        grid, block = _elementwise_geometry(n, dev.limits, dev.tuning)
    probe = Launch(kernel, grid, block, {**_view_args(layout), "total": np.int64(n)}, np.dtype(storage),
                   layout.inner == 1, None if stats_dtype is None else np.dtype(stats_dtype))
    return ask(probe)


def counters_needed(layout: ChannelLayout, limits, tuning=geometry.Tuning()) -> int:
    """Length of the zeroed counter array the reductions need."""
    return geometry.reduce_plan(layout.outer, layout.channels, layout.inner, limits, tuning).groups


def _flag(value):
    """An int flag argument; a prepared sequence's per-call decision
    (:class:`_Aligned`) stays as it is until the call."""
    return value if isinstance(value, _Aligned) else np.int32(value)


def _view_args(layout: ChannelLayout) -> dict:
    return {"outer": np.int64(layout.outer), "channels": np.int64(layout.channels),
            "inner": np.int64(layout.inner), "inv_count": np.float64(1.0 / layout.count)}


#: What each per-channel kernel writes: (new arrays, returned by the call;
#: workspace, reused by the next call of the plan).
STATS_OUTPUTS = (("mean", "invstd"), ("k", "scale", "shift", "dmean", "m2"))
COEFF_OUTPUTS = (("k", "invstd"), ("scale", "shift"))
BWD_OUTPUTS = (("dgamma", "dbeta"), ("k", "a", "b", "c"))


def _outputs(kind: str, names, C: int, acc, alloc, scratch, stages: int = 0, splits: int = 1) -> dict:
    """A kernel's (C,) compute-dtype outputs ``names`` (:data:`STATS_OUTPUTS`
    ...), with ``stages`` staging buffers (C, splits) among the workspace:
    the new ones from ``alloc``, the workspace from the device's ``scratch``
    (keyed by kind and sizes), or from ``alloc`` without one."""
    new, work = names
    specs = {**{name: ((C,), acc) for name in work}, **{f"stage{i}": ((C, splits), acc) for i in range(stages)}}
    if scratch is not None:
        workspace = scratch((kind, C, splits, np.dtype(acc).str), specs)
    else:
        workspace = {name: alloc(shape, dtype) for name, (shape, dtype) in specs.items()}
    return {**{name: alloc((C,), acc) for name in new}, **workspace}


def _zeros(dev, names, C: int, acc) -> dict:
    """Every output of ``names`` zeroed: what a sequence returns when
    there is nothing to launch."""
    return {name: dev.zeros((C,), acc) for group in names for name in group}


def stats(x, layout: ChannelLayout, gamma, beta, running, eps: float, alloc, counters, limits,
          tuning=geometry.Tuning(), scratch=None, blocks_per_sm=None):
    """The statistics launch (with the finalize stage fused: coefficients
    and the running-statistics update). ``x``: flat contiguous input;
    ``gamma``, ``beta``: (C,) device arrays or None; ``running``:
    ``(running_mean, running_var, factor)`` with both arrays of one dtype
    (float32 or float64), or None; ``counters``: zeroed; ``scratch``: the
    device's ``scratch`` (None: every buffer from ``alloc``);
    ``blocks_per_sm``: the kernel's occupancy (:func:`occupancy`).

    Returns ``(launch, out)`` with ``out`` the dict of (C,) compute-dtype
    arrays ``k, scale, shift, mean, invstd, dmean, m2`` the kernel writes;
    ``mean`` and ``invstd`` are new, the others workspace.
    """
    acc = compute_dtype(x.dtype)
    C, n = layout.channels, layout.count
    plan, grid, block = _reduce_geometry(layout, limits, tuning, blocks_per_sm)
    # stages: count, mean and M2 per block
    out = _outputs("stats", STATS_OUTPUTS, C, acc, alloc, scratch, stages=3, splits=plan.splits)
    rm, rv, factor = running if running is not None else (None, None, 0.0)
    args = {"x": x, **_view_args(layout), "unbias": np.float64(n / (n - 1) if n > 1 else 0.0),
            "eps": np.float64(eps), "factor": factor if isinstance(factor, Slot) else np.float64(factor), "gamma": gamma, "beta": beta,
            "running_mean": rm, "running_var": rv, **out, "counters": counters}
    stats_dtype = None if rm is None else np.dtype(rm.dtype)
    return Launch("stats", grid, block, args, np.dtype(x.dtype), layout.inner == 1, stats_dtype), out


def apply(x, y, layout: ChannelLayout, k, scale, shift, relu: bool, vectorized: bool, limits,
          tuning=geometry.Tuning(), blocks_per_sm=None, residual=None) -> Launch:
    """``y = (x - k) * scale + shift [+ residual]`` [ReLU] over flat
    contiguous x, y (and residual, like x, or None: the ``apply_residual``
    kernel then takes it). ``vectorized``: every pointer is 16-byte
    aligned."""
    grid, block = _elementwise_geometry(x.size, limits, tuning, blocks_per_sm)
    args = {"x": x, "y": y, "total": np.int64(x.size), "channels": np.int64(layout.channels),
            "inner": np.int64(layout.inner), "k": k, "scale": scale, "shift": shift, "relu": np.int32(relu),
            "vectorized": _flag(vectorized)}
    if residual is None:
        return Launch("apply", grid, block, args, np.dtype(x.dtype))
    return Launch("apply_residual", grid, block, {**args, "residual": residual}, np.dtype(x.dtype))


def relu_backward(dy, y, g, vectorized: bool, limits, tuning=geometry.Tuning(), blocks_per_sm=None) -> Launch:
    """``g = dy`` where not ``y <= 0``, else 0, over flat contiguous dy, y,
    g (the gradient through a fused ReLU). ``vectorized``: every pointer is
    16-byte aligned."""
    grid, block = _elementwise_geometry(dy.size, limits, tuning, blocks_per_sm)
    args = {"dy": dy, "y": y, "g": g, "total": np.int64(dy.size), "vectorized": _flag(vectorized)}
    return Launch("relu_backward", grid, block, args, np.dtype(dy.dtype))


def infer_coeffs(x_dtype, mean, var, gamma, beta, eps: float, alloc, scratch=None) -> tuple[Launch, dict]:
    """Per-channel ``k, scale, shift, invstd`` (compute dtype) from a mean
    and a biased variance (both of one dtype, float32 or float64): the
    finalize stage on the device, from running statistics (inference) or
    from merged batch statistics. ``k`` (the mean) and ``invstd`` are new,
    ``scale`` and ``shift`` workspace."""
    acc = compute_dtype(x_dtype)
    C = mean.shape[0]
    out = _outputs("infer_coeffs", COEFF_OUTPUTS, C, acc, alloc, scratch)
    args = {"running_mean": mean, "running_var": var, "channels": np.int64(C), "eps": np.float64(eps),
            "gamma": gamma, "beta": beta, **out}
    grid = (max(1, math.ceil(C / COEFF_THREADS)), 1, 1)
    return Launch("infer_coeffs", grid, (COEFF_THREADS, 1, 1), args, np.dtype(x_dtype),
                  stats_dtype=np.dtype(mean.dtype)), out


def bwd_reduce(dy, x, layout: ChannelLayout, gamma, saved_mean, saved_invstd, alloc, counters, limits,
               tuning=geometry.Tuning(), scratch=None, blocks_per_sm=None):
    """Backward sums (with the dx coefficients fused). ``saved_mean``,
    ``saved_invstd``: (C,) of one dtype, float32 or float64, read as they
    are; ``gamma``: (C,) or None. Returns ``(launch, out)``, ``out``:
    ``dgamma, dbeta`` (new) and ``k, a, b, c`` (workspace), (C,) arrays."""
    acc = compute_dtype(x.dtype)
    C = layout.channels
    plan, grid, block = _reduce_geometry(layout, limits, tuning, blocks_per_sm)
    # stages: sum(dy) and sum(dy * (x - k)) per block
    out = _outputs("bwd_reduce", BWD_OUTPUTS, C, acc, alloc, scratch, stages=2, splits=plan.splits)
    args = {"dy": dy, "x": x, **_view_args(layout), "gamma": gamma, "saved_mean": saved_mean,
            "saved_invstd": saved_invstd, **out, "counters": counters}
    return (Launch("bwd_reduce", grid, block, args, np.dtype(x.dtype), layout.inner == 1,
                   np.dtype(saved_mean.dtype)), out)


def dx(dy, x, out, layout: ChannelLayout, coeffs: dict, vectorized: bool, limits,
       tuning=geometry.Tuning(), blocks_per_sm=None) -> Launch:
    """``dx = dy * a + (x - k) * b + c`` over flat contiguous arrays."""
    grid, block = _elementwise_geometry(x.size, limits, tuning, blocks_per_sm)
    args = {"dy": dy, "x": x, "dx": out, "total": np.int64(x.size), "channels": np.int64(layout.channels),
            "inner": np.int64(layout.inner), **{n: coeffs[n] for n in BWD_OUTPUTS[1]},
            "vectorized": _flag(vectorized)}
    return Launch("dx", grid, block, args, np.dtype(x.dtype))


# --------------------------------------------------------------------------
# The sequences of the stages and fused forms, with their edge cases.
# Inputs are flat contiguous device arrays; per-channel vectors (C,).
# --------------------------------------------------------------------------

def run_stats(dev, x, layout: ChannelLayout, gamma, beta, running, eps: float) -> dict:
    """Statistics (and coefficients, and the running-statistics update) of
    flat ``x``: 1 read. Returns :func:`stats`' ``out``; with no values
    (``count == 0``) it is all zeros and nothing is launched."""
    if layout.count == 0 or layout.channels == 0:
        return _zeros(dev, STATS_OUTPUTS, layout.channels, compute_dtype(x.dtype))
    counters = dev.counters(counters_needed(layout, dev.limits, dev.tuning))
    stats_dtype = None if running is None else running[0].dtype
    launch_, out = stats(x, layout, gamma, beta, running, eps, dev.alloc, counters, dev.limits, dev.tuning,
                         dev.scratch, occupancy(dev, "stats", layout, x.dtype, stats_dtype))
    dev.run(launch_)
    return out


def run_apply(dev, x, layout: ChannelLayout, coeffs: dict, relu: bool, residual=None):
    """The normalize stage: ``y`` (flat, like x) from ``coeffs['k']``,
    ``['scale']``, ``['shift']`` (plus a flat ``residual`` like x): 1 read
    (2 with a residual) + 1 write. With no channels, y is an (empty) copy
    of x."""
    y = dev.alloc(x.shape, x.dtype)
    if x.size:
        kernel = "apply" if residual is None else "apply_residual"
        aligned = dev.aligned(x, y) if residual is None else dev.aligned(x, y, residual)
        dev.run(apply(x, y, layout, coeffs["k"], coeffs["scale"], coeffs["shift"], relu, aligned,
                      dev.limits, dev.tuning, occupancy(dev, kernel, layout, x.dtype), residual))
    return y


def run_relu_backward(dev, dy, y):
    """``g`` (flat, like dy): dy, and 0 where y <= 0 (2 reads + 1 write)."""
    g = dev.alloc(dy.shape, dy.dtype)
    if dy.size:
        dev.run(relu_backward(dy, y, g, dev.aligned(dy, y, g), dev.limits, dev.tuning,
                              occupancy(dev, "relu_backward", ChannelLayout(tuple(dy.shape), 0), dy.dtype)))
    return g


def run_forward_train(dev, x, layout: ChannelLayout, gamma, beta, running, eps: float, relu: bool,
                      residual=None):
    """Training forward: statistics, then apply (2 reads + 1 write of x;
    and 1 read of the residual). Returns ``(y, out)`` with ``out`` from
    :func:`run_stats`."""
    out = run_stats(dev, x, layout, gamma, beta, running, eps)
    return run_apply(dev, x, layout, out, relu, residual), out


def run_finalize(dev, x_dtype, mean, var, gamma, beta, eps: float, scratch=None) -> dict:
    """The finalize stage from a (C,) mean and biased variance: ``out``
    with ``k``, ``scale``, ``shift``, ``invstd``. ``scratch``: the device's,
    for scale and shift, only where they are used within the same call
    (the staged path returns them to the engine)."""
    if mean.shape[0] == 0:
        return _zeros(dev, COEFF_OUTPUTS, 0, compute_dtype(x_dtype))
    launch_, out = infer_coeffs(x_dtype, mean, var, gamma, beta, eps, dev.alloc, scratch)
    dev.run(launch_)
    return out


def run_forward_infer(dev, x, layout: ChannelLayout, running_mean, running_var, gamma, beta, eps: float,
                      relu: bool, residual=None):
    """Inference: coefficients, then apply (1 read + 1 write; and 1 read
    of the residual). Returns ``(y, out)`` with ``out`` holding ``k`` and
    ``invstd``."""
    out = run_finalize(dev, x.dtype, running_mean, running_var, gamma, beta, eps, dev.scratch)
    return run_apply(dev, x, layout, out, relu, residual), out


def run_bwd_reduce(dev, dy, x, layout: ChannelLayout, gamma, saved_mean, saved_invstd) -> dict:
    """Backward sums and dx coefficients (:func:`bwd_reduce`'s ``out``):
    2 reads. With no values the sums are zeros and nothing is launched."""
    if layout.count == 0 or layout.channels == 0:
        return _zeros(dev, BWD_OUTPUTS, layout.channels, compute_dtype(x.dtype))
    counters = dev.counters(counters_needed(layout, dev.limits, dev.tuning))
    launch_, out = bwd_reduce(dy, x, layout, gamma, saved_mean, saved_invstd, dev.alloc, counters, dev.limits,
                              dev.tuning, dev.scratch,
                              occupancy(dev, "bwd_reduce", layout, x.dtype, saved_mean.dtype))
    dev.run(launch_)
    return out


def run_dx(dev, dy, x, layout: ChannelLayout, coeffs: dict):
    """The backward apply stage: flat dx from ``coeffs`` (``k, a, b, c``):
    2 reads + 1 write; zeros when there are no values."""
    if x.size == 0:
        return dev.zeros(x.shape, x.dtype)
    result = dev.alloc(x.shape, x.dtype)
    dev.run(dx(dy, x, result, layout, coeffs, dev.aligned(dy, x, result), dev.limits, dev.tuning,
               occupancy(dev, "dx", layout, x.dtype)))
    return result


def run_backward(dev, dy, x, layout: ChannelLayout, gamma, saved_mean, saved_invstd):
    """Backward: sums, then dx (4 reads + 1 write). ``saved_*``: (C,)
    float32 or float64. Returns ``(dx, out)`` with ``out['dgamma']``, ``out['dbeta']``."""
    out = run_bwd_reduce(dev, dy, x, layout, gamma, saved_mean, saved_invstd)
    return run_dx(dev, dy, x, layout, out), out


# --------------------------------------------------------------------------
# Prepared sequences (plan once, execute many times): a sequence above is
# run once on a Recorder, with Slot placeholders for the arrays that change
# from call to call; what it launches is bound to the backend's kernels
# once, and a call only allocates its outputs, fills the slots and launches.
# --------------------------------------------------------------------------

class Slot:
    """A placeholder for an array given or allocated at each call: what the
    sequences read of an array (shape, dtype, size); or, ``scalar``, for a
    number given at each call (a kernel argument of ``dtype``)."""

    def __init__(self, name: str, shape, dtype, fill=None, scalar: bool = False):
        self.name, self.shape, self.dtype, self.fill = name, tuple(shape), np.dtype(dtype), fill
        self.scalar = scalar
        self.size = math.prod(self.shape)

    def reshape(self, *shape):  # what the sequences may ask of an output; a call reshapes it
        return self

    def __repr__(self):
        return f"Slot({self.name!r}, {self.shape}, {self.dtype})"


class _Aligned:
    """The ``vectorized`` argument of a launch, decided per call from the
    alignment of the arrays in its slots."""

    def __init__(self, arrays):
        self.arrays = arrays


class Recorder:
    """A device for the sequences above that records instead of launching:
    ``alloc``/``zeros`` make output :class:`Slot` s, ``counters`` and
    ``scratch`` are the real device's (bound once), ``run`` binds each
    launch with ``dev.bind``."""

    def __init__(self, dev):
        self.dev, self.limits, self.tuning = dev, dev.limits, dev.tuning
        self.outputs: list[Slot] = []
        self.steps: list = []

    def alloc(self, shape, dtype):
        slot = Slot(f"out{len(self.outputs)}", shape, dtype)
        self.outputs.append(slot)
        return slot

    def zeros(self, shape, dtype):
        slot = Slot(f"out{len(self.outputs)}", shape, dtype, fill=0)
        self.outputs.append(slot)
        return slot

    def counters(self, n):
        return self.dev.counters(n)

    def scratch(self, key, specs):
        return self.dev.scratch(key, specs)

    def resident_blocks(self, launch):
        ask = getattr(self.dev, "resident_blocks", None)
        return None if ask is None else ask(launch)

    def aligned(self, *arrays):
        return _Aligned(arrays)

    def run(self, launch):
        self.steps.append(self.dev.bind(launch))


class Program:
    """The recorded launches of one sequence, on positions: the ``inputs``
    slots (in the order a call passes their arrays), then the recorder's
    outputs. ``program(dev, arrays)`` with ``arrays`` the inputs' device
    arrays allocates the outputs on ``dev`` (in ``shapes[slot]`` where
    given: a result allocated in the caller's shape needs no reshape, for
    kernels that take pointers), launches, and returns a list whose first
    entries are every slot's array (:meth:`position` says where a slot is).

    A call's values are one list: the slots' arrays, then the per-call
    ``vectorized`` flags (``_Aligned``), then every launch's constant
    arguments; each launch takes its arguments from it with one
    ``operator.itemgetter`` (a replay does no per-argument Python work)."""

    def __init__(self, recorder: Recorder, inputs, shapes: dict | None = None):
        shapes = shapes or {}
        slots = list(inputs) + recorder.outputs
        self._position = {slot: i for i, slot in enumerate(slots)}
        self.outputs = [(shapes.get(slot, slot.shape), slot.dtype, slot.fill is not None)
                        for slot in recorder.outputs]
        self._aligned: list[list[int]] = []  # per flag: the positions of the arrays it tests
        self._constants: list = []
        picks = []  # per step: ("slot" | "aligned" | "constant", index)
        for _, args in recorder.steps:
            step = []
            for a in args:
                if type(a) is Slot:
                    step.append(("slot", self._position[a]))
                elif type(a) is _Aligned:
                    step.append(("aligned", len(self._aligned)))
                    self._aligned.append([self._position[s] for s in a.arrays])
                else:
                    step.append(("constant", len(self._constants)))
                    self._constants.append(a)
            picks.append(step)
        base = {"slot": 0, "aligned": len(slots), "constant": len(slots) + len(self._aligned)}
        self.steps = [(fn, _getter([base[kind] + i for kind, i in step]))
                      for (fn, _), step in zip(recorder.steps, picks)]

    def position(self, slot: Slot) -> int:
        return self._position[slot]

    def __call__(self, dev, arrays: list) -> list:
        values = list(arrays)
        for shape, dtype, zeroed in self.outputs:
            values.append(dev.zeros(shape, dtype) if zeroed else dev.alloc(shape, dtype))
        for positions in self._aligned:
            values.append(np.int32(dev.aligned(*[values[p] for p in positions])))
        values += self._constants
        for fn, pick in self.steps:
            fn(pick(values))
        return values


def _getter(positions: list):
    """``values -> tuple of values[p] for p in positions``."""
    if len(positions) == 1:  # itemgetter of one position returns the item, not a tuple
        p = positions[0]
        return lambda values: (values[p],)
    return operator.itemgetter(*positions)
