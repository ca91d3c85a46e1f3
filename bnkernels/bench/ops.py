"""What ``bnkernels bench`` measures: the operations (:data:`OPS`, from
``operations.OPERATIONS``; the bytes each must move, :func:`min_bytes`),
the shapes (:class:`Case`,
:data:`NAMED_CASES`; which ops run on which, :func:`default_cases`,
:func:`ops_for`), their inputs (:func:`make_inputs`) and the check of
every output against the float64 reference before anything is timed
(:func:`reference_outputs`, :func:`check_outputs`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from .operations import OPERATIONS

#: Operations measured by default (``operations.OPERATIONS``), in the order they are reported;
#: :data:`ALL_OPS` adds those run only when named (``--ops torch-module``).
OPS = tuple(name for name, op in OPERATIONS.items() if op.default)
ALL_OPS = tuple(OPERATIONS)
OP_TITLES = {op.name: op.title for op in OPERATIONS.values()}

#: Minimum traffic of each operation in units of ``x.nbytes`` (see
#: :func:`min_bytes`); ``"copy"`` is the same-size copy reference (:data:`COPY`).
BYTES_FACTOR = {**{op.name: op.bytes_factor for op in OPERATIONS.values()}, "copy": 2}

BYTES_MODEL = (
    "minimum bytes an operation must move, in sizes of x (storage dtype), for a two-pass method: "
    "training forward 3 (read x for the statistics, read x again and write y), inference 2 "
    "(read x, write y), backward 5 (read x and dy for the sums, read x and dy again and write dx), "
    "the torch-module step 8 (a training forward, then a backward); "
    "the norm family (layer, RMS, group, instance norm), whose rows fit in cache, in one pass: "
    "forward 2 (read x, write y), backward 3 (read dy and x, write dx); "
    "per-channel vectors and saved statistics are ignored; "
    "the same-size copy 2 (read x, write a buffer of its size). "
    "GB/s = bytes / median time / 1e9"
)

ALLOCATION_NOTE = (
    "outputs are not preallocated (textbook NumPy/CuPy and torch.nn.functional.batch_norm return new "
    "arrays, and so do bn_forward and bn_backward unless given out=), so those times include "
    "allocating the outputs, as in real use; the <backend>+out rows pass a preallocated out= instead, "
    "as the copy ceiling and the same-size copy write into preallocated buffers"
)

SAME_SIZE_COPY_NOTE = (
    "% copy = GB/s / GB/s of a copy of x into a preallocated buffer of the same size on the same "
    "device, with the same threads and in the same cache state (hot, or rotated through copies with "
    "--cold), read + write counted; 100 % means the op moved its bytes as fast as that copy. "
    "x copy = the op's median time / that copy's median time: an op that must read x and write y "
    "cannot beat 1.00x, whatever passes the bytes model credits it with. The copy rows show that copy"
)

#: Roles: candidates are what is being measured (a wrong candidate fails
#: ``bnkernels bench``); the two comparison points give the speed-ups.
CANDIDATE, TEXTBOOK, TORCH = "candidate", "textbook", "torch"

#: The same-size copy reference: both its role and its op (not one of
#: :data:`OPS`; users do not select it). A copy of ``x`` into a preallocated
#: buffer of the same size on the device of the ops, timed like them
#: (``CpuDevice.copy_implementation``, ``CudaDevice.copy_implementation``);
#: ``pct_of_copy`` is relative to it.
COPY = "copy"

#: Name of the CPU textbook baseline.
BASELINE = "textbook-numpy"

#: Allowed error of each output, by dtype name: ``max |out - ref| / max |ref|`` (ref float64).
TOLERANCE = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 1e-3, "float64": 1e-9}


def bench_dtype(name) -> np.dtype:
    """The dtype of a name (or dtype): bfloat16 is ml_dtypes' (a clear
    error says what to install without it)."""
    if str(name) == "bfloat16":
        from ..validation import bfloat16_dtype

        return bfloat16_dtype()
    return np.dtype(name)

EPS = 1e-5

MiB = 1 << 20
GiB = 1 << 30


class Unsupported(Exception):
    """Raised by ``Implementation.prepare`` for an op/dtype it does not do."""



def layout_label(shape: Sequence[int], axis: int) -> str:
    """Short layout name: ``NCHW``/``NHWC`` for 4-D, ``2-D`` for (N, C),
    else ``<n>-D axis=<a>``."""
    nd = len(shape)
    ax = axis % nd
    if nd == 4 and ax == 1:
        return "NCHW"
    if nd == 4 and ax == 3:
        return "NHWC"
    if nd == 2 and ax == 1:
        return "2-D"
    return f"{nd}-D axis={ax}"


@dataclass(frozen=True)
class Case:
    """One shape to measure, its channel axis and (optionally) its name."""

    shape: tuple[int, ...]
    axis: int = 1
    name: str = ""

    @property
    def layout(self) -> str:
        return layout_label(self.shape, self.axis)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def label(self) -> str:
        """The name when there is one, else the dimensions."""
        return self.name or self.shape_str

    def _batch_axis(self) -> int:
        return 1 if self.axis % len(self.shape) == 0 else 0

    def scaled(self, divisor: int) -> "Case":
        """The same case with the batch (first non-channel) dimension divided
        by ``divisor``; the name gets a ``/divisor`` suffix."""
        b = self._batch_axis()
        shape = list(self.shape)
        shape[b] = max(shape[b] // divisor, 2)
        return Case(tuple(shape), self.axis, f"{self.name}/{divisor}" if self.name else "")

    def tiny(self) -> "Case":
        """A few-KB version for smoke tests: every non-channel dimension cut
        to at most 4 (the batch of a 2-D case to 64), same axis and name."""
        nd, ax = len(self.shape), self.axis % len(self.shape)
        cap = 64 if nd == 2 else 4
        shape = tuple(d if i == ax else min(d, cap) for i, d in enumerate(self.shape))
        return Case(shape, self.axis, self.name)


#: The batch-norm named shapes: what ``bnkernels bench`` and ``pytest bench``
#: measure the batch-norm ops on by default. ResNet-like activations (stage
#: conv2_x at 56x56, batch 32; stage conv4_x at 14x14, batch 256), the same
#: data channels-last, a dense layer, tall-skinny (many rows, few channels)
#: and small-C (an RGB image batch).
DEFAULT_CASES = (
    Case((32, 64, 56, 56), 1, "resnet-56"),
    Case((32, 56, 56, 64), -1, "resnet-56-nhwc"),
    Case((256, 256, 14, 14), 1, "resnet-14"),
    Case((256, 14, 14, 256), -1, "resnet-14-nhwc"),
    Case((8192, 1024), 1, "dense"),
    Case((100000, 32), 1, "tall-skinny"),
    Case((64, 3, 224, 224), 1, "small-c"),
)
#: The norm family's named shapes (``Operation.cases``), from their users:
#: layer and RMS norm over the last axis of transformer activations (8192
#: tokens x 1024 features, 4096 x 4096, a batch of 16 sequences of 512
#: tokens x 768), group norm with G = 32 of a ResNet-like activation, instance
#: norm of 128x128 feature maps (style transfer).
NORM_CASES = (
    Case((8192, 1024), -1, "ln-8192x1024"),
    Case((4096, 4096), -1, "ln-4096x4096"),
    Case((16, 512, 768), -1, "ln-16x512x768"),
    Case((32, 256, 28, 28), 1, "gn-resnet"),
    Case((8, 64, 128, 128), 1, "in-128"),
)
#: Every named shape (``--shapes NAME``); each belongs to the ops it was named
#: for (:func:`ops_for`).
NAMED_CASES: dict[str, Case] = {c.name: c for c in (*DEFAULT_CASES, *NORM_CASES)}
#: ``--quick`` runs every named case with the batch divided by this.
QUICK_DIVISOR = 4
QUICK_CASES = tuple(c.scaled(QUICK_DIVISOR) for c in DEFAULT_CASES)


def own_cases(op: str) -> tuple[str, ...]:
    """Names of the named shapes that belong to ``op``: its
    ``Operation.cases``, else the batch-norm ones (:data:`DEFAULT_CASES`)."""
    return OPERATIONS[op].cases or tuple(c.name for c in DEFAULT_CASES)


def default_cases(ops: Sequence[str], quick: bool = False) -> tuple[Case, ...]:
    """The shapes ``ops`` are measured on when none are given: the named
    shapes that belong to any of them, in :data:`NAMED_CASES` order; with
    ``quick`` the batch divided by :data:`QUICK_DIVISOR`. For the
    batch-norm ops: :data:`DEFAULT_CASES` (:data:`QUICK_CASES`)."""
    names = {name for op in ops for name in own_cases(op)}
    cases = tuple(c for name, c in NAMED_CASES.items() if name in names)
    return tuple(c.scaled(QUICK_DIVISOR) for c in cases) if quick else cases


def ops_for(case: Case, ops: Sequence[str]) -> tuple[str, ...]:
    """Which of ``ops`` are measured on ``case``. A named shape (also
    scaled or tiny: its name is kept, ``/divisor`` aside) belongs to the
    ops it was named for: those of ``ops`` it belongs to, or all of ``ops``
    when it belongs to none of them (it was asked for by name). Any other
    shape: all of ``ops`` (each refuses, as unsupported, a layout it
    cannot take)."""
    name = case.name.partition("/")[0]
    own = tuple(op for op in ops if name in own_cases(op))
    return own or tuple(ops)


def parse_case(text: str) -> Case:
    """A named shape (``resnet-56``, see :data:`NAMED_CASES`) or
    ``SHAPE[@AXIS]``: ``"8x32x28x28"``, ``"8x28x28x32@-1"`` (axis default 1).
    Raises ``ValueError`` with a readable message."""
    text = text.strip()
    if text in NAMED_CASES:
        return NAMED_CASES[text]
    dims, _, axis_text = text.partition("@")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        axis = int(axis_text) if axis_text else 1
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected a name ({', '.join(NAMED_CASES)}) "
                         "or e.g. 8x32x28x28 or 8x28x28x32@-1") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"bad shape {text!r}: dimensions must be positive integers")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"bad shape {text!r}: axis {axis} out of range for {len(shape)} dimensions")
    if math.prod(shape) // shape[axis] < 2:
        raise ValueError(f"bad shape {text!r}: training needs at least 2 values per channel")
    return Case(shape, axis)


def parse_cases(text: str) -> list[Case]:
    """Comma list of :func:`parse_case` items; ``all`` is every batch-norm
    named shape (:data:`DEFAULT_CASES`)."""
    cases: list[Case] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        cases.extend(DEFAULT_CASES if item == "all" else [parse_case(item)])
    if not cases:
        raise ValueError("no shape given")
    return list(dict.fromkeys(cases))


@dataclass
class Inputs:
    """Host arrays of one case: ``x``, ``dy`` in the benchmark dtype;
    ``gamma``, ``beta``, ``running_mean``, ``running_var`` float32 (C,)."""

    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    axis: int
    eps: float = EPS

    def copy(self) -> "Inputs":
        """New ``x`` and ``dy`` buffers with the same values (the per-channel
        vectors are shared: nothing benchmarked writes them)."""
        return replace(self, x=self.x.copy(), dy=self.dy.copy())


def make_inputs(case: Case, dtype, seed: int = 0) -> Inputs:
    """Deterministic data for a case: per-channel means in [1, 4] and standard
    deviations in [0.5, 2] (a non-zero mean, as real activations have).

    The values are drawn in channels-first order, so a channels-last case
    (channel axis last, ndim > 2) holds exactly the same data as the
    channels-first case of the transposed shape.
    """
    shape, nd = case.shape, len(case.shape)
    ax = case.axis % nd
    C = shape[ax]
    channels_last = nd > 2 and ax == nd - 1
    gen_shape = (shape[0], C, *shape[1:-1]) if channels_last else shape
    gen_axis = 1 if channels_last else ax
    rng = np.random.default_rng(seed)
    pshape = [1] * nd
    pshape[gen_axis] = C
    mean_c = rng.uniform(1.0, 4.0, C).astype(np.float32)
    std_c = rng.uniform(0.5, 2.0, C).astype(np.float32)
    x = rng.standard_normal(gen_shape, dtype=np.float32)
    x *= std_c.reshape(pshape)
    x += mean_c.reshape(pshape)
    dy = rng.standard_normal(gen_shape, dtype=np.float32)
    if channels_last:
        x = np.moveaxis(x, 1, -1)
        dy = np.moveaxis(dy, 1, -1)
    dtype = bench_dtype(dtype)
    x = np.ascontiguousarray(x, dtype=dtype)
    dy = np.ascontiguousarray(dy, dtype=dtype)
    gamma = rng.uniform(0.5, 2.0, C).astype(np.float32)
    beta = rng.standard_normal(C).astype(np.float32)
    running_mean = (mean_c + 0.1 * rng.standard_normal(C)).astype(np.float32)
    running_var = (std_c**2 * rng.uniform(0.8, 1.25, C)).astype(np.float32)
    return Inputs(x, dy, gamma, beta, running_mean, running_var, case.axis)


def min_bytes(op: str, x_nbytes: int) -> int:
    """Minimum bytes ``op`` must move for an input of ``x_nbytes`` bytes
    (see :data:`BYTES_MODEL`)."""
    return BYTES_FACTOR[op] * int(x_nbytes)



def _host(a) -> np.ndarray:
    """An output as NumPy (a torch tensor detached, bfloat16 as float32: exact)."""
    if type(a).__module__.split(".")[0] == "torch":
        a = a.detach().cpu()
        return (a.float() if str(a.dtype) == "torch.bfloat16" else a).numpy()
    return np.asarray(a)


def reference_outputs(op: str, inp: Inputs) -> tuple[np.ndarray, ...]:
    """Float64 outputs of ``op`` from :mod:`bnkernels.reference`, in the
    order implementations return them."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown op {op!r}")
    return OPERATIONS[op].reference(inp)


def check_outputs(outputs: Sequence[Any], expected: Sequence[np.ndarray],
                  to_host: Callable[[Any], np.ndarray] = _host) -> float:
    """Worst relative error over all outputs: ``max |out - ref| / max |ref|``
    per output. ``inf`` for a wrong count or shape, or any NaN/inf."""
    if len(outputs) != len(expected):
        return math.inf
    worst = 0.0
    for out, ref in zip(outputs, expected):
        a = np.asarray(to_host(out))
        if a.shape != ref.shape:
            return math.inf
        err = np.abs(a.astype(np.float64) - ref)
        if err.size == 0:
            continue
        e = float(err.max())
        if not math.isfinite(e):
            return math.inf
        scale = float(np.abs(ref).max()) or 1.0
        worst = max(worst, e / scale)
    return worst


__all__ = [
    'ALLOCATION_NOTE', 'ALL_OPS', 'BASELINE', 'BYTES_FACTOR', 'BYTES_MODEL', 'CANDIDATE', 'COPY', 'Case',
    'DEFAULT_CASES', 'EPS', 'GiB', 'Inputs', 'MiB', 'NAMED_CASES', 'NORM_CASES', 'OPS', 'OP_TITLES',
    'QUICK_CASES', 'QUICK_DIVISOR', 'bench_dtype', 'SAME_SIZE_COPY_NOTE', 'TEXTBOOK', 'TOLERANCE', 'TORCH',
    'Unsupported', '_host', 'check_outputs', 'default_cases', 'layout_label', 'make_inputs', 'min_bytes',
    'ops_for', 'own_cases', 'parse_case', 'parse_cases', 'reference_outputs',
]
