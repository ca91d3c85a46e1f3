"""Several parameter axes (``axis=(1, 2)``, Keras' axis lists, Chainer's
multi-axis parameters): the statistics are per element of those axes, taken
over all the others, and the parameters have the shape of those axes.

The public functions run them as one channel axis: x is viewed with the
channel axes moved together (a permutation, none when they are adjacent)
and merged (``(N, C1, C2, W)`` as ``(N, C1*C2, W)``), the parameters are
flattened, and the results are viewed back (y, dx: x's shape; statistics
and parameter gradients: the axes' shape). Arrays of any kind with
``reshape`` and a permutation (NumPy, CuPy, torch; Numba device arrays
only for adjacent axes, which need none).

What is written must be written through a view: the running statistics
(in training) and ``out`` must be C-contiguous (then merging is a view);
anything only read may be copied by the merge (a non-contiguous x).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .memory_order import inverse, permute
from .validation import is_numba_device_array, is_torch


def is_several(axis) -> bool:
    """Whether ``axis`` names several axes (a tuple or list)."""
    return isinstance(axis, (tuple, list))


def _contiguous(a) -> bool:
    if is_torch(a):
        return a.is_contiguous()
    if is_numba_device_array(a):
        return a.is_c_contiguous()
    flags = getattr(a, "flags", None)
    return bool(flags is not None and flags.c_contiguous)


@dataclass(frozen=True)
class MergedAxes:
    """How an input of ``shape`` with channel ``axes`` runs as one channel
    axis ``axis`` of the ``merged`` shape (``perm``: the permutation that
    makes the axes adjacent, identity when they are)."""

    shape: tuple
    axes: tuple
    perm: tuple
    merged: tuple
    axis: int

    @property
    def param_shape(self) -> tuple:
        """The shape of the parameters and statistics: the axes' sizes."""
        return tuple(self.shape[a] for a in self.axes)

    @property
    def adjacent(self) -> bool:
        return self.perm == tuple(range(len(self.shape)))

    def view(self, a, name: str):
        """``a`` (of ``shape``) as the merged shape: a view when ``a`` is
        C-contiguous and the axes adjacent, else possibly a copy."""
        if not hasattr(a, "reshape"):
            a = np.asarray(a)  # a list: read-only input
        if not self.adjacent:
            if is_numba_device_array(a):
                raise TypeError(f"{name} is a Numba device array, which cannot be permuted: give axis adjacent "
                                f"axes, or a CuPy/torch/NumPy array")
            a = permute(a, self.perm)
        return a.reshape(self.merged)

    def written_view(self, a, name: str):
        """``a`` as the merged shape through a view (what bnkernels writes
        into must be the caller's memory): C-contiguous and adjacent axes."""
        if not (self.adjacent and _contiguous(a)):
            raise TypeError(f"{name} must be C-contiguous and the axes {self.axes} adjacent: bnkernels writes "
                            f"into {name} through a view of it as shape {self.merged}")
        return a.reshape(self.merged)

    def unview(self, y):
        """A result of the merged shape back in ``shape``'s axis order."""
        permuted = tuple(self.shape[p] for p in self.perm)
        y = y.reshape(permuted)
        if self.adjacent:
            return y
        return permute(y, inverse(self.perm))

    def flat_param(self, p, name: str, written: bool = False):
        """A parameter or statistic of :attr:`param_shape` as (C,) (None
        stays None; a wrong shape is refused, naming ``name``)."""
        if p is None:
            return None
        if not hasattr(p, "reshape"):
            p = np.asarray(p)
        if tuple(p.shape) != self.param_shape:
            raise ValueError(f"{name} must have shape {self.param_shape} (the sizes of axes {self.axes}), "
                             f"got {tuple(p.shape)}")
        if written and not _contiguous(p):
            raise TypeError(f"{name} must be C-contiguous: it is updated in place through a flat view")
        return p.reshape(-1)

    def shaped(self, v):
        """A (C,) result as :attr:`param_shape`."""
        return None if v is None else v.reshape(self.param_shape)


def merge(shape, axis, name: str = "x") -> MergedAxes:
    """The :class:`MergedAxes` of several channel ``axis`` (a tuple or list of
    distinct ints, negative allowed) for an input of ``shape``."""
    ndim = len(shape)
    if len(axis) == 0:
        raise ValueError("axis must name at least one axis, got ()")
    axes = []
    for a in axis:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis must be an int or a tuple of ints, got {type(a).__name__} in {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} in {tuple(axis)} is out of range for {name} of shape {tuple(shape)} "
                             f"(ndim={ndim}; valid: {-ndim}..{ndim - 1})")
        axes.append(int(a) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {tuple(axis)} names an axis twice")
    axes = tuple(sorted(axes))
    first = axes[0]
    others = [i for i in range(ndim) if i not in axes]
    perm = tuple([i for i in others if i < first] + list(axes) + [i for i in others if i > first])
    permuted = [shape[p] for p in perm]
    k = len(axes)
    merged = tuple(permuted[:first]) + (math.prod(permuted[first:first + k]),) + tuple(permuted[first + k:])
    return MergedAxes(tuple(int(s) for s in shape), axes, perm, merged, first)
