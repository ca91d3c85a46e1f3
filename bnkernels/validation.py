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

import numpy as np

from . import dlpack
from .backends.interface import ChannelLayout

#: Input dtypes accepted for ``x`` and ``dy`` (and bfloat16: :func:`is_bfloat16`).
INPUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: What to install for bfloat16 data (NumPy's bfloat16 dtype is ml_dtypes').
BFLOAT16_INSTALL = "pip install ml_dtypes (or bnkernels[bf16])"
_TORCH_DTYPES = {"torch.float16": "float16", "torch.float32": "float32", "torch.float64": "float64",
                 "torch.bfloat16": "bfloat16"}
#: dtypes accepted for running statistics (updated in place, computed in
#: float64 on the CPU and float32 or better on the GPU, stored rounded to
#: their own dtype: float16 ones, as torch's ``model.half()`` makes, overflow
#: to inf beyond 65504 there as in torch).
RUNNING_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: Activations that can be fused after the affine transform.
ACTIVATIONS = (None, "relu")


def bfloat16_dtype() -> np.dtype:
    """NumPy's bfloat16 (``ml_dtypes.bfloat16``), imported only when asked
    for (bfloat16 data was given); a clear error without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(f"bfloat16 data needs ml_dtypes (NumPy's bfloat16 dtype): {BFLOAT16_INSTALL}") from None
    return np.dtype(ml_dtypes.bfloat16)


#: is_bfloat16's answers per dtype (NumPy's ``dtype.name`` is computed in
#: Python, ~1.5 µs: more than a GPU backend's whole allocation; a program
#: meets a handful of dtypes).
_BFLOAT16_ANSWERS: dict = {}


def is_bfloat16(dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16 (without importing it)."""
    try:
        return _BFLOAT16_ANSWERS[dtype]
    except (KeyError, TypeError):  # not seen yet, or unhashable
        pass
    answer = getattr(dtype, "name", None) == "bfloat16"
    if isinstance(dtype, (np.dtype, type)) and len(_BFLOAT16_ANSWERS) < 256:
        _BFLOAT16_ANSWERS[dtype] = answer
    return answer


_TORCH_BFLOAT16: dict = {}  # per torch dtype: whether it is bfloat16 (str() of a dtype costs a call)


def _is_torch_bfloat16(dtype) -> bool:
    answer = _TORCH_BFLOAT16.get(dtype)
    if answer is None:
        answer = _TORCH_BFLOAT16[dtype] = str(dtype) == "torch.bfloat16"
    return answer


def host_array(obj):
    """``np.asarray(obj)``, and a CPU torch bfloat16 tensor as a NumPy
    bfloat16 view of its memory (NumPy has no bfloat16 of its own, so
    torch's ``numpy()`` refuses it), and another library's DLPack array
    (JAX's) as ``np.from_dlpack`` views it (``dlpack.host``; the public
    functions convert those first, this serves every other caller)."""
    if is_torch(obj):  # (numpy() directly: np.asarray goes through torch's Python-level __array__)
        if obj.is_cpu and _is_torch_bfloat16(obj.dtype):
            import torch

            return obj.view(torch.int16).numpy().view(bfloat16_dtype())
        return obj.numpy()  # torch's own error for a tensor that requires grad, or is not on the CPU
    if dlpack.is_foreign(obj):
        return dlpack.host(obj)
    return np.asarray(obj)


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
        if is_torch(a) and str(a.dtype) in _TORCH_DTYPES:
            name = _TORCH_DTYPES[str(a.dtype)]
            return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)
        cai = getattr(a, "__cuda_array_interface__", None)
        if cai is None:
            raise TypeError(f"cannot tell the dtype of {type(a).__name__}") from None
        return np.dtype(cai["typestr"])


def _describe(value) -> str:
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def reject_masked(a, name: str) -> None:
    """Masks are not supported yet: a masked array would silently be used
    as if every value were valid, so it is refused."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a numpy.ma.MaskedArray: bnkernels does not support masks yet and would "
                        f"use the masked values too; pass {name}.filled(value) or np.asarray({name}) "
                        "to use every value")


def convert(obj, name: str, asarray=host_array):
    """A read-only array argument through the backend's ``asarray``; any
    failure to convert is a TypeError that names the argument. None stays
    None."""
    if obj is None:
        return None
    reject_masked(obj, name)
    try:
        return asarray(obj)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} cannot be used as an array ({type(obj).__name__}): {_one_line(exc)}") from None


def writable_view(obj, name: str, *, gpu_backend: bool):
    """An argument that bnkernels writes into (``out``, running statistics
    in training), as an array whose memory is the caller's.

    A GPU array is returned as it is (only for a GPU backend,
    ``gpu_backend``, which handles it). Anything else must be a NumPy array or
    something NumPy can view without a copy (a CPU torch tensor): a copy
    would take the result and drop it. Returns the NumPy view or the GPU
    array."""
    if hasattr(obj, "__cuda_array_interface__"):
        if not gpu_backend:
            raise TypeError(f"{name} is a GPU array ({type(obj).__name__}) but x is on the host and runs on "
                            f"a CPU backend: pass a NumPy {name}, or use a GPU backend")
        return obj
    view = convert(obj, name)  # None stays None; masked arrays refused
    if view is None:
        return None
    if view is not obj and view.flags.owndata:
        raise TypeError(f"{name} must be an array (it is updated in place): a NumPy ndarray, or an object "
                        f"NumPy views without a copy such as a CPU torch tensor; got {type(obj).__name__}, "
                        "whose copy would receive the result instead")
    if dlpack.is_foreign(obj):
        dlpack.check_writable(view, obj, name)  # its own messages (a read-only JAX array)
    if not view.flags.writeable:
        raise ValueError(f"{name} is read-only, but it is updated in place")
    return view


def check_input(x, name: str = "x"):
    """Check that ``x`` is an array of a supported float dtype with ndim >= 1."""
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    dtype = array_dtype(x)
    if dtype not in INPUT_DTYPES and not is_bfloat16(dtype):
        raise TypeError(
            f"{name} must have dtype float16, bfloat16, float32 or float64, got {dtype}"
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


def check_per_channel(p, name: str, channels: int, *, asarray=None, dtypes=None, required: str = ""):
    """Check a per-channel vector: 1-D, length ``channels``, an accepted
    floating dtype. It is converted by ``asarray`` first (:func:`convert`)
    unless that is None (arrays written in place come from
    :func:`writable_view`). ``None`` stays ``None`` unless ``required``
    says why the argument is needed."""
    if asarray is not None:
        p = convert(p, name, asarray)
    if p is None:
        if required:
            raise ValueError(f"{name} is required: {required}")
        return None
    if not (hasattr(p, "dtype") and hasattr(p, "shape")):
        raise TypeError(f"{name} must be an array, got {type(p).__name__}")
    dtype = array_dtype(p)
    allowed = dtypes if dtypes is not None else INPUT_DTYPES
    if dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {_describe(p)}"
                        + (" (cast it, e.g. .astype(np.float64))" if dtype.kind in "fc" else ""))
    if tuple(p.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), got {tuple(p.shape)}")
    return p


def check_flag(value, name: str) -> bool:
    """A bool argument: True/False (NumPy bools too), nothing merely truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _as_float(value, name: str, expected: str) -> float:
    """A real number as a float; ints beyond the float range become inf
    (then rejected as not finite) instead of raising OverflowError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_eps(eps) -> float:
    eps = _as_float(eps, "eps", "a real number")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def check_momentum(momentum):
    """``None`` (cumulative average) or a finite real in [0, 1]."""
    if momentum is None:
        return None
    momentum = _as_float(momentum, "momentum", "a real number in [0, 1] or None")
    if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] (or None for a cumulative average), got {momentum}")
    return momentum


def check_num_batches_tracked(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"num_batches_tracked must be an int >= 0, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"num_batches_tracked must be >= 0, got {n}")
    return int(n)


def running_factor(momentum, num_batches_tracked, used: bool = True):
    """Weight of the new batch in ``running = (1 - f) * running + f * batch``
    (None when no running statistics are ``used``; ``num_batches_tracked``
    is checked all the same).

    ``momentum=None`` means a cumulative average over all batches: the batch
    about to be added is number ``num_batches_tracked + 1``.
    """
    if num_batches_tracked is not None:
        num_batches_tracked = check_num_batches_tracked(num_batches_tracked)
    if not used:
        return None
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_batches_tracked, the number of "
            "batches already averaged into the running statistics (BatchNorm tracks it for you)"
        )
    return 1 / (num_batches_tracked + 1)  # int / int: no OverflowError for huge counts


def check_activation(activation) -> bool:
    """Return True for a fused ReLU."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def check_training_count(layout: ChannelLayout, name: str = "x") -> None:
    """Training needs at least 2 values per channel, or none at all (an
    empty batch, as torch: an empty result, no statistics)."""
    n = layout.count
    if n == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {name} of shape "
            f"{layout.shape} with channel axis {layout.axis}"
        )


def _interface(a):
    """An array's NumPy or CUDA array interface dict, or None."""
    return getattr(a, "__array_interface__", None) or getattr(a, "__cuda_array_interface__", None)


def _strides(iface) -> tuple[int, ...]:
    shape, itemsize = tuple(iface["shape"]), np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides")
    if strides is None:  # C-contiguous
        strides = tuple(itemsize * math.prod(shape[i + 1:]) for i in range(len(shape)))
    return tuple(strides)


def _byte_extent(iface):
    """``(lo, hi)``: the byte addresses an array can touch."""
    start, shape = iface["data"][0], tuple(iface["shape"])
    if 0 in shape:
        return start, start
    strides = _strides(iface)
    lo = start + sum(st * (n - 1) for st, n in zip(strides, shape) if st < 0)
    hi = start + sum(st * (n - 1) for st, n in zip(strides, shape) if st > 0)
    return lo, hi + np.dtype(iface["typestr"]).itemsize


def _same_view(ia, ib) -> bool:
    return (ia["data"][0], tuple(ia["shape"]), _strides(ia), ia["typestr"]) == (
        ib["data"][0], tuple(ib["shape"]), _strides(ib), ib["typestr"])


def _overlap(a, b, extent_a, extent_b) -> bool:
    """Whether two arrays share a byte: exactly for NumPy arrays (interleaved
    views do not overlap), by their address ranges otherwise
    (``extent_*()``: :func:`_byte_extent`, computed once per array)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if not np.may_share_memory(a, b):  # the common case, decided in C
            return False
        try:
            return bool(np.shares_memory(a, b, max_work=10_000))
        except np.exceptions.TooHardError:
            return True
    lo_a, hi_a = extent_a()
    lo_b, hi_b = extent_b()
    return lo_a < hi_b and lo_b < hi_a and hi_a > lo_a and hi_b > lo_b


def _self_overlapping(iface) -> bool:
    """Whether two elements of an array share memory (a zero stride from
    ``np.broadcast_to``/``as_strided``): written, it would receive several
    results at once. Sufficient test: sorted by stride, each axis steps
    past everything the smaller axes span."""
    if iface.get("strides") is None:
        return False
    itemsize = np.dtype(iface["typestr"]).itemsize
    span = itemsize
    for st, n in sorted((abs(st), n) for st, n in zip(iface["strides"], iface["shape"]) if n > 1):
        if st < span:
            return True
        span += st * (n - 1)
    return False


_LIBRARIES: dict = {}  # per type: library() is asked on every prepared call


def library(a) -> str:
    """The top-level module of an array's type (``"numpy"``, ``"cupy"``, ``"torch"``, ``"numba"``...)."""
    kind = type(a)
    name = _LIBRARIES.get(kind)
    if name is None:
        name = _LIBRARIES[kind] = kind.__module__.split(".")[0]
    return name


def is_torch(a) -> bool:
    return library(a) == "torch"


def is_numba_device_array(a) -> bool:
    """A Numba device array (the simulator's too): no permutation, no
    boolean indexing."""
    return hasattr(a, "is_c_contiguous") and not is_torch(a)


def _pointer_reader(kind):
    module = kind.__module__.split(".")[0]
    if module == "cupy":
        return lambda a: a.data.ptr
    if module == "torch":
        return lambda a: a.data_ptr()
    return lambda a: _interface(a)["data"][0]


_POINTER_READERS: dict = {}


def data_pointer(a) -> int:
    """The address of an array's first element: a NumPy, CuPy or torch
    array, or anything with ``__cuda_array_interface__`` (how to read it is
    decided once per type: prepared calls read it on every call)."""
    read = _POINTER_READERS.get(type(a))
    if read is None:
        read = _POINTER_READERS[type(a)] = _pointer_reader(type(a))
    return read(a)


def extent_offsets(a) -> tuple[int, int]:
    """``(lo, hi)``: the bytes an array can touch, relative to
    :func:`data_pointer` (fixed by its shape, strides and dtype)."""
    if is_torch(a):  # its array interfaces are refused for tensors that require grad
        itemsize = a.element_size()
        iface = {"data": (0, False), "shape": tuple(a.shape), "typestr": f"<f{itemsize}",
                 "strides": tuple(st * itemsize for st in a.stride())}
    else:
        iface = dict(_interface(a), data=(0, False))
    return _byte_extent(iface)


def memory_of(converted, given):
    """What :func:`check_aliasing` looks at for an argument: the NumPy array
    a CPU backend works on, else the caller's own array, GPU or NumPy (a
    GPU backend's wrapper has no array interface; host arrays there are
    copied to the device, but the running statistics are written back into
    them), else None (a fresh copy such as a list made into an array, which
    cannot alias anything)."""
    if isinstance(converted, np.ndarray):
        return converted
    return given if isinstance(given, np.ndarray) or hasattr(given, "__cuda_array_interface__") else None


def check_aliasing(written: dict, read: dict, in_place=()) -> None:
    """Reject any memory shared between an array bnkernels writes (name ->
    array or None: ``out``, the running statistics in training) and any
    other argument array, and written arrays whose elements share memory.
    Only ``out`` may be one of the ``in_place`` inputs exactly (every
    kernel reads an element before writing it). Arrays are NumPy arrays
    or objects with ``__cuda_array_interface__``; others (e.g. a backend's
    host copy) cannot alias and are skipped."""
    every = {name: a for name, a in {**read, **written}.items() if a is not None}
    faces = {name: _interface(a) for name, a in every.items()}
    extents: dict = {}

    def extent(name):
        return lambda: extents[name] if name in extents else extents.setdefault(name, _byte_extent(faces[name]))

    checked = set()
    for wname, w in written.items():
        iw = faces.get(wname)
        if iw is None:
            continue
        checked.add(wname)
        if _self_overlapping(iw):
            raise ValueError(f"{wname} has elements that share memory (a zero or overlapping stride, as from "
                             f"np.broadcast_to): bnkernels writes into {wname}, so pass an array of its own")
        for aname, a in every.items():
            ia = faces[aname]
            if aname in checked or ia is None or not _overlap(w, a, extent(wname), extent(aname)):
                continue
            if wname == "out" and aname in in_place:
                if _same_view(iw, ia):
                    continue
                raise ValueError(f"out overlaps {aname} without being {aname} itself: pass {aname} for an "
                                 "in-place result, or a separate buffer")
            raise ValueError(f"{wname} overlaps {aname}: bnkernels writes into {wname}, so it must not share "
                             f"memory with {aname} (pass separate arrays)")


def check_out(out, x, given):
    """Check an output buffer against the input ``x`` (as converted by the
    backend; ``given``: what the caller passed as x): writable, the shape
    and dtype of x. For a backend that works on NumPy arrays any array
    NumPy views without a copy (a CPU torch tensor too); for the others
    (GPU backends) an array of the caller's type of x. Returns ``(out,
    view)``: the caller's object (what the public function returns) and
    the array the backend writes (its NumPy view on the host); ``(None,
    None)`` without ``out``. Overlap is :func:`check_aliasing`'s job."""
    if out is None:
        return None, None
    view = writable_view(out, "out", gpu_backend=not isinstance(x, np.ndarray))
    if not isinstance(x, np.ndarray) and type(out) is not type(given):
        raise TypeError(f"out must be a {type(given).__name__} like x (the result is written into it), "
                        f"got {type(out).__name__}")
    if tuple(view.shape) != tuple(x.shape):
        raise ValueError(f"out must have the shape of x {tuple(x.shape)}, got {tuple(view.shape)}")
    if array_dtype(view) != array_dtype(x):
        raise TypeError(f"out must have the dtype of x ({array_dtype(x)}), got {array_dtype(view)}")
    return out, view


def check_like_x(a, name: str, x, asarray):
    """An input read like ``x`` (a residual ``z`` added to the output): the
    shape and dtype of x, any strides; None stays None. Returns the
    backend's view of it."""
    if a is None:
        return None
    a = check_input(convert(a, name, asarray), name)
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(a.shape)}")
    if array_dtype(a) != array_dtype(x):
        raise TypeError(f"{name} must have the dtype of x ({array_dtype(x)}), got {array_dtype(a)}")
    return a


def check_same_shape(dy, x) -> None:
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if array_dtype(dy) != array_dtype(x):
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
