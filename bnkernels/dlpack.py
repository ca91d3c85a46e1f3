"""Arrays of other libraries through DLPack (JAX arrays, and any object with
``__dlpack__`` and ``__dlpack_device__``): the one place they are converted.

The public functions (``bn_forward``, ``bn_backward``, ``channel_stats``)
hand a call with such arguments (:func:`any_foreign`) to :func:`call`
right after their call-cache lookup (the cache never keeps such a call, so
its hits pay nothing for this module). :func:`call` views each as a NumPy
array (DLPack device kDLCPU: ``np.from_dlpack``, no copy) or as a CuPy array
(kDLCUDA: ``cupy.from_dlpack``, for the GPU backends), runs the function on
those, and gives the results back in the library of ``x`` (``from_dlpack``
of its top-level module, ``jax.numpy``'s for JAX), or as they are (NumPy,
CuPy) when that library has none. Statistics objects (``SavedStats``,
``ChannelStats``) stay NumPy/CuPy: ChannelStats are float64, which JAX
truncates to float32 unless ``jax_enable_x64`` is set, and both feed
bnkernels again (``bn_backward``, ``merge_stats``).

NumPy arrays, torch tensors, CuPy and Numba device arrays export DLPack too,
but keep their own paths (:data:`NATIVE`): this module only sees the rest.

Read-only exports (JAX arrays are immutable: their DLPack buffers are
read-only) are refused where bnkernels writes (``out``, the running
statistics in training) before anything is computed, so a refused call
changes nothing.
"""
from __future__ import annotations

import importlib

import numpy as np

from . import validation  # (its own import of this module comes first: used at call time only)
from .errors import BackendUnavailableError

#: DLPack device types (``__dlpack_device__()[0]``) bnkernels takes.
KDLCPU, KDLCUDA = 1, 2
#: Libraries whose arrays have paths of their own (not converted here).
NATIVE = frozenset({"numpy", "torch", "cupy", "numba", "numba_cuda"})
#: Where a library's ``from_dlpack`` lives when not in its top-level module
#: (a JAX array's type is ``jaxlib._jax.ArrayImpl``).
_FROM_DLPACK_MODULE = {"jax": "jax.numpy", "jaxlib": "jax.numpy"}

# Types decided once each: any_foreign's common case is one set test in C.
_PLAIN: set = {type(None), np.ndarray}
_FOREIGN: set = set()


def _is_jax(a) -> bool:
    return validation.library(a) in ("jax", "jaxlib")


def _is_foreign_type(kind) -> bool:
    if kind in _FOREIGN:
        return True
    if kind in _PLAIN:
        return False
    # ndarray subclasses (a user's MaskedArray) keep NumPy's path, whose checks they need
    foreign = (hasattr(kind, "__dlpack__") and hasattr(kind, "__dlpack_device__")
               and not issubclass(kind, np.ndarray) and kind.__module__.split(".")[0] not in NATIVE)
    (_FOREIGN if foreign else _PLAIN).add(kind)
    return foreign


def is_foreign(a) -> bool:
    """Whether ``a`` is converted here: an array of another library with DLPack."""
    return _is_foreign_type(type(a))


def any_foreign(arrays) -> bool:
    """Whether any of ``arrays`` (a tuple; None allowed) :func:`is_foreign`."""
    if _PLAIN.issuperset(map(type, arrays)):  # the common case, decided in C
        return False
    return any(_is_foreign_type(type(a)) for a in arrays)


def _what(obj, readonly: str = "") -> str:
    """``a [read-only ]JAX array (ArrayImpl)``: an argument for messages."""
    return f"a {readonly}{'JAX' if _is_jax(obj) else validation.library(obj)} array ({type(obj).__name__})"


def host(obj, name: str = "the array"):
    """A kDLCPU DLPack array as a NumPy array of its memory (shape, dtype and
    strides its own; read-only when the producer exports it so, as JAX
    does). bfloat16, which NumPy's DLPack lacks, is read through the array
    protocol (``np.asarray``: a view for a JAX CPU array; a copy where a
    producer makes one, refused by :func:`check_writable`)."""
    try:
        return np.from_dlpack(obj)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        if getattr(getattr(obj, "dtype", None), "name", None) == "bfloat16" and hasattr(obj, "__array__"):
            return np.asarray(obj)
        raise TypeError(f"{name} is {_what(obj)} that NumPy cannot view through DLPack: "
                        f"{' '.join(str(exc).split())}") from None


def _cuda(obj, name: str):
    """A kDLCUDA DLPack array as a CuPy array of its memory: what the GPU
    backends take (the numba-cuda backend too, through its CUDA array
    interface)."""
    from .backends import probes

    problem = probes.cupy_device_problem()
    if problem:
        raise BackendUnavailableError(f"{name} is {_what(obj)} on a CUDA device, which bnkernels takes through "
                                      f"CuPy (cupy.from_dlpack), and no GPU backend can use it: {problem} "
                                      f"(to get it: {probes.CUDA_EXTRA})")
    import cupy

    try:
        return cupy.from_dlpack(obj)
    except Exception as exc:  # CuPy's own error (another device's context, an unsupported dtype)
        raise TypeError(f"{name} is {_what(obj)} on a CUDA device that CuPy cannot view "
                        f"(cupy.from_dlpack): {' '.join(str(exc).split())}") from None


def to_native(obj, name: str):
    """``obj`` as a NumPy array (kDLCPU) or a CuPy array (kDLCUDA) sharing
    its memory; a TypeError naming ``name`` for other devices."""
    try:
        kind = int(obj.__dlpack_device__()[0])
    except Exception as exc:  # a producer's own failure, or not a (type, id) pair
        raise TypeError(f"{name} is {_what(obj)} whose __dlpack_device__() fails: {exc}") from None
    if kind == KDLCPU:
        return host(obj, name)
    if kind == KDLCUDA:
        return _cuda(obj, name)
    raise TypeError(f"{name} is {_what(obj)} on DLPack device type {kind}: bnkernels takes CPU (kDLCPU, 1) "
                    "and CUDA (kDLCUDA, 2) arrays")


def _why_written(name: str) -> tuple[str, str]:
    """What bnkernels writes into ``name``, and what to do instead."""
    if name == "out":
        return "writes the result into out", "Leave out=None: the result comes back as a new array of x's library"
    return ("updates running statistics in place in training",
            "Pass NumPy arrays for running_mean and running_var (np.array(...) copies), or none and take the "
            "new values from s = channel_stats(x): (1 - momentum) * running_mean + momentum * s.mean, and "
            "s.unbiased_var for running_var")


def check_writable(native, obj, name: str) -> None:
    """Refuse to write into ``obj`` (its converted form ``native``) unless
    ``native`` is its memory and may be written; nothing has been written
    yet when this raises."""
    what, instead = _why_written(name)
    if not isinstance(native, np.ndarray):
        # cupy.from_dlpack does not say whether the producer allows writes (JAX's GPU buffers do not)
        raise TypeError(f"{name} is {_what(obj)} on a CUDA device: bnkernels {what} and cannot tell whether "
                        f"its buffer may be written. {instead} (CuPy arrays or torch tensors on the GPU)")
    if not native.flags.writeable:
        why = "JAX arrays are immutable" if _is_jax(obj) else "its DLPack export is read-only"
        raise ValueError(f"{name} is {_what(obj, 'read-only ')}: bnkernels {what}, and {why}. {instead}")
    if native.flags.owndata:  # host()'s np.asarray copied: the result would go to the copy
        raise TypeError(f"{name} is {_what(obj)} that NumPy reads only as a copy: bnkernels {what}. {instead}")


def _importer(x):
    """The module whose ``from_dlpack`` makes arrays of ``x``'s library, or
    None (then results stay NumPy/CuPy)."""
    top = validation.library(x)
    try:
        module = importlib.import_module(_FROM_DLPACK_MODULE.get(top, top))
    except ImportError:  # a type defined in __main__ or a module gone since
        return None
    return module if callable(getattr(module, "from_dlpack", None)) else None


def _to_library(result, module):
    """A NumPy/CuPy result as ``module``'s array (it may copy: JAX wants its
    own alignment)."""
    try:
        return module.from_dlpack(result)
    except (BufferError, RuntimeError, TypeError, ValueError):
        # what DLPack cannot carry: NumPy exports no bfloat16, JAX imports no gapped strides
        asarray = getattr(module, "asarray", None)
        return asarray(result) if callable(asarray) else result


def call(function, args: dict, written=(), like=("x",)):
    """``function(**args)`` with every foreign array of ``args`` converted
    (:func:`to_native`), those named in ``written`` checked writable first;
    array results come back in the library of the first foreign argument
    named in ``like`` (none: as they are), and a result that is an argument
    (``out``, ``dz = dy``) as the caller's own object."""
    native = {}
    for name, a in args.items():
        if is_foreign(a):
            native[name] = to_native(a, name)
    for name in written:  # every conversion first: a bad x is reported as today, before any write check
        if name in native:
            check_writable(native[name], args[name], name)
    result = function(**{**args, **native})
    own = {id(a): a for a in args.values() if a is not None}
    own.update((id(native[name]), args[name]) for name in native)
    source = next((args[name] for name in like if name in native), None)
    module = None if source is None else _importer(source)

    def back(r):
        if id(r) in own:
            return own[id(r)]
        if module is not None and (isinstance(r, np.ndarray) or hasattr(r, "__cuda_array_interface__")):
            return _to_library(r, module)
        return r  # SavedStats, ChannelStats; results of a library without from_dlpack

    return tuple(back(r) for r in result) if isinstance(result, tuple) else back(result)
