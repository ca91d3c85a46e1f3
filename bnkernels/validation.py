"""Argument validation shared by every public entry point and every backend.

All checks live here so that each public function validates the same way
whatever backend runs it, and so that a call that fails is rejected before
anything (running statistics included) is touched.

Functions look only at ``.shape`` and ``.dtype`` of arrays, so the same checks
serve NumPy arrays and GPU arrays.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

#: Input dtypes accepted for ``x`` and ``dy``.
INPUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: dtypes accepted for running statistics (updated in place; float16 would
#: overflow above 65504, so, as in PyTorch's mixed precision, they stay wide).
RUNNING_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Activations that can be fused after the affine transform.
ACTIVATIONS = (None, "relu")


@dataclass(frozen=True)
class ChannelLayout:
    """Where the channels are in an input of a given shape.

    Any channel axis of an array is the canonical view ``(outer, C, inner)``:
    ``outer = prod(shape[:axis])``, ``inner = prod(shape[axis+1:])``.
    ``inner > 1`` is NCHW-like (channel planes), ``inner == 1`` is NHWC or 2-D
    (channel fastest).
    """

    shape: tuple[int, ...]
    axis: int  # non-negative channel axis

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.axis])

    @property
    def inner(self) -> int:
        return math.prod(self.shape[self.axis + 1 :])

    @property
    def count(self) -> int:
        """Number of values reduced per channel (``outer * inner``)."""
        return self.outer * self.inner

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape)) if i != self.axis)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against the input."""
        return tuple(self.channels if i == self.axis else 1 for i in range(len(self.shape)))


def compute_dtype(dtype) -> np.dtype:
    """Accumulation/statistics dtype for an input dtype: float64 stays
    float64, float16 and float32 compute (and save statistics) in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def array_dtype(a) -> np.dtype:
    """NumPy dtype of any array: NumPy, CuPy, Numba, or a torch CUDA tensor
    (whose dtype NumPy cannot read, but whose CUDA array interface says it)."""
    try:
        return np.dtype(a.dtype)
    except TypeError:
        cai = getattr(a, "__cuda_array_interface__", None)
        if cai is None:
            raise TypeError(f"cannot tell the dtype of {type(a).__name__}") from None
        return np.dtype(cai["typestr"])


def _describe(value) -> str:
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def check_input(x, name: str = "x"):
    """Check that ``x`` is an array of a supported float dtype with ndim >= 1."""
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    dtype = array_dtype(x)
    if dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64, got {dtype}"
            + (" (cast integer/bool data to a float dtype first)" if dtype.kind in "biu" else "")
        )
    if len(x.shape) == 0:
        raise ValueError(f"{name} must have at least 1 dimension (a channel axis), got a 0-d array")
    return x


def channel_layout(shape, axis, name: str = "x") -> ChannelLayout:
    """Normalize ``axis`` (negative allowed) against ``shape``."""
    ndim = len(shape)
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis={axis} is out of range for {name} of shape {tuple(shape)} "
            f"(ndim={ndim}; valid: {-ndim}..{ndim - 1})"
        )
    return ChannelLayout(tuple(int(s) for s in shape), int(axis) % ndim)


def check_per_channel(p, name: str, channels: int, *, dtypes=None, writable: bool = False,
                      asarray=np.asarray):
    """Check a per-channel vector: 1-D, length ``channels``, floating dtype.

    Returns ``None`` for ``None``, otherwise the array (converted with
    ``asarray`` unless it must be writable, in which case it must already be
    an array so that an in-place update reaches the caller).
    """
    if p is None:
        return None
    if writable:
        if not (hasattr(p, "dtype") and hasattr(p, "shape")):
            raise TypeError(f"{name} must be an array (it is updated in place), got {type(p).__name__}")
        if isinstance(p, np.ndarray) and not p.flags.writeable:
            raise ValueError(f"{name} is read-only, but training updates it in place")
    else:
        p = asarray(p)
    dtype = array_dtype(p)
    allowed = dtypes if dtypes is not None else INPUT_DTYPES
    if dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {_describe(p)}")
    if tuple(p.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), got {tuple(p.shape)}")
    return p


def check_flag(value, name: str) -> bool:
    """A bool argument: True/False (NumPy bools too), nothing merely truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_eps(eps) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_momentum(momentum):
    """``None`` (cumulative average) or a finite real in [0, 1]."""
    if momentum is None:
        return None
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number in [0, 1] or None, got {type(momentum).__name__}")
    momentum = float(momentum)
    if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] (or None for a cumulative average), got {momentum}")
    return momentum


def check_num_batches_tracked(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"num_batches_tracked must be an int >= 0, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"num_batches_tracked must be >= 0, got {n}")
    return int(n)


def running_factor(momentum, num_batches_tracked) -> float:
    """Weight of the new batch in ``running = (1 - f) * running + f * batch``.

    ``momentum=None`` means a cumulative average over all batches: the batch
    about to be added is number ``num_batches_tracked + 1``.
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_batches_tracked, the number of "
            "batches already averaged into the running statistics (BatchNorm tracks it for you)"
        )
    return 1.0 / (check_num_batches_tracked(num_batches_tracked) + 1)


def check_activation(activation) -> bool:
    """Return True for a fused ReLU."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def check_training_count(layout: ChannelLayout, name: str = "x") -> None:
    n = layout.count
    if n == 0:
        raise ValueError(f"{name} of shape {layout.shape} has an empty batch (0 values per channel); "
                         "training needs at least 2")
    if n == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {name} of shape "
            f"{layout.shape} with channel axis {layout.axis}"
        )


def _interface(a):
    """An array's NumPy or CUDA array interface dict, or None."""
    return getattr(a, "__array_interface__", None) or getattr(a, "__cuda_array_interface__", None)


def _byte_extent(a):
    """``(lo, hi)``: the byte addresses an array can touch, from its NumPy
    or CUDA array interface; None when it has neither."""
    iface = _interface(a)
    if iface is None:
        return None
    start, shape = iface["data"][0], tuple(iface["shape"])
    itemsize = np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides")
    if strides is None:  # C-contiguous
        strides = tuple(itemsize * math.prod(shape[i + 1:]) for i in range(len(shape)))
    if 0 in shape:
        return start, start
    lo = start + sum(st * (n - 1) for st, n in zip(strides, shape) if st < 0)
    hi = start + sum(st * (n - 1) for st, n in zip(strides, shape) if st > 0) + itemsize
    return lo, hi


def _same_view(a, b) -> bool:
    ia, ib = _interface(a), _interface(b)
    return (ia["data"][0], tuple(ia["shape"]), ia.get("strides")) == (
        ib["data"][0], tuple(ib["shape"]), ib.get("strides"))


def check_out(out, like, inputs: dict):
    """Check an output buffer: an array of the same kind (type), shape and
    dtype as ``like``, writable, and either one of ``inputs`` (name ->
    array) itself (in place: every kernel reads an element before it
    writes it) or overlapping none of them. Returns ``out`` (None stays
    None)."""
    if out is None:
        return None
    if type(out) is not type(like):
        raise TypeError(f"out must be a {type(like).__name__} like x (the result is written into it), "
                        f"got {type(out).__name__}")
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"out must have the shape of x {tuple(like.shape)}, got {tuple(out.shape)}")
    if array_dtype(out) != array_dtype(like):
        raise TypeError(f"out must have the dtype of x ({array_dtype(like)}), got {array_dtype(out)}")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, a in inputs.items():
        if isinstance(out, np.ndarray) and isinstance(a, np.ndarray) and not np.may_share_memory(out, a):
            continue  # the common case, decided in C
        o, e = _byte_extent(out), _byte_extent(a)
        if o is None or e is None or o[0] >= e[1] or e[0] >= o[1] or _same_view(out, a):
            continue
        raise ValueError(f"out overlaps {name} without being {name} itself: pass {name} for an in-place "
                         "result, or a separate buffer")
    return out


def check_same_shape(dy, x) -> None:
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if array_dtype(dy) != array_dtype(x):
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
