"""``BatchNorm``: a stateful layer owning gamma, beta and running statistics."""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import axes
from . import renorm as renormalization
from . import validation as v
from . import distributed
from .batch_norm import bn_backward, bn_forward, channel_stats
from .backends import check_backend_name


#: The layer's parameter dtypes (float16 data computes in float32; float16
#: running statistics passed to bn_forward are accepted, not made here).
_LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class LoadResult(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` did not load (torch's
    ``_IncompatibleKeys``): keys the layer has that the state lacks, and
    keys of the state the layer has no use for."""

    missing_keys: list
    unexpected_keys: list


class BatchNorm:
    """Batch normalization layer (PyTorch ``BatchNorm{1,2,3}d`` semantics).

    Args:
        num_features: number of channels C (with several ``axis``: the
            shape of those axes, a tuple), or None to take it from the
            first input (torch's ``LazyBatchNorm*``, Keras, Chainer); the
            parameters and running statistics exist from then on (or from a
            :meth:`load_state_dict`).
        eps, momentum: as in :func:`bnkernels.bn_forward`; ``momentum=None``
            is a cumulative average (the layer counts the batches).
        affine: learn a scale ``gamma`` (init 1) and a shift ``beta`` (init
            0); False: neither.
        bias: torch's spelling of ``center`` (``BatchNorm(C, bias=False)``:
            a gamma but no beta).
        scale, center: Keras' (and Chainer's ``use_gamma``, ``use_beta``):
            whether gamma, and beta, exist, independently. Each defaults to
            ``affine``; asking for one while ``affine=False`` is an error.
        track_running_stats: keep ``running_mean`` (init 0) and
            ``running_var`` (init 1). Without them, inference mode also
            normalizes with batch statistics, as in PyTorch.
        axis: channel axis of the inputs (1 for NCHW, -1 for channels-last),
            or several (a tuple, Keras' axis lists): parameters and
            statistics of those axes' shape.
        dtype: dtype of the parameters and running statistics, float32 or
            float64 (float16 inputs use float32 parameters).
        backend: as in :func:`bnkernels.bn_forward`.
        renorm: batch renormalization (Ioffe 2017, Keras' ``renorm``;
            ``bnkernels.renorm``), with ``renorm_clipping`` (a dict of
            ``rmin``, ``rmax``, ``dmax``; missing: 0, inf, inf) and
            ``renorm_momentum`` (the weight of the new batch in the moving
            ``renorm_mean`` and ``renorm_stddev``: Keras' 0.99 is 0.01).

    Attributes ``gamma``, ``beta`` (None where absent), ``running_mean``,
    ``running_var`` (None without tracking), ``num_batches_tracked``, and after
    :meth:`backward`, ``grad_gamma`` and ``grad_beta``.
    """

    def __init__(self, num_features=None, *, eps=1e-5, momentum=0.1, affine=True, bias=None, scale=None,
                 center=None, track_running_stats=True, axis=1, dtype=np.float32, backend="auto", renorm=False,
                 renorm_clipping=None, renorm_momentum=0.01):
        several = axes.is_several(axis)
        if several:
            for a in axis:
                if not isinstance(a, numbers.Integral) or isinstance(a, (bool, np.bool_)):
                    raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
        if num_features is not None:
            num_features = _check_num_features(num_features, several)
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in _LAYER_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if not several and (not isinstance(axis, numbers.Integral) or isinstance(axis, (bool, np.bool_))):
            raise TypeError(f"axis must be an int or a tuple of ints, got {type(axis).__name__}")
        check_backend_name(backend)
        self.eps = v.check_eps(eps)
        self.momentum = v.check_momentum(momentum)
        self.axis = tuple(int(a) for a in axis) if several else int(axis)
        self.dtype = dtype
        self.backend = backend
        affine = v.check_flag(affine, "affine")
        self._has_gamma, self._has_beta = _affine_parts(affine, bias, scale, center)
        self.renorm = v.check_flag(renorm, "renorm")
        self.renorm_clipping = renormalization.check_clipping(renorm_clipping)
        if renorm_momentum is None:
            raise ValueError("renorm_momentum must be a number in [0, 1] (a moving average), got None")
        self.renorm_momentum = v.check_momentum(renorm_momentum)
        #: Read on every call, as in PyTorch: False after construction stops
        #: the updates in training (eval still uses existing statistics).
        self.track_running_stats = v.check_flag(track_running_stats, "track_running_stats")
        self.num_features = None
        self.gamma = self.beta = self.running_mean = self.running_var = None
        self.renorm_mean = self.renorm_stddev = None
        self.num_batches_tracked = 0
        if num_features is not None:
            self._materialize(num_features)
        self.training = True
        self.grad_gamma = self.grad_beta = None
        self._saved = None  # (x, SavedStats, batch statistics?) of the last forward

    def _materialize(self, num_features) -> None:
        """Make the parameters and running statistics for C channels (or
        the axes' shape P)."""
        self.num_features = num_features
        self.gamma = np.ones(num_features, self.dtype) if self._has_gamma else None
        self.beta = np.zeros(num_features, self.dtype) if self._has_beta else None
        self.reset_running_stats()

    def _features_of(self, shape):
        """x's channel count (several axes: their shape), checking the axis."""
        if axes.is_several(self.axis):
            return axes.merge(shape, self.axis).param_shape
        return v.channel_layout(shape, self.axis).channels

    @property
    def lazy(self) -> bool:
        """Whether the channel count is still to come from the first input."""
        return self.num_features is None

    @property
    def affine(self) -> bool:
        """Whether the layer has a ``gamma`` or a ``beta`` (chosen at construction)."""
        return self._has_gamma or self._has_beta

    def reset_running_stats(self) -> None:
        """Running mean 0, running var 1, batch count 0 (and, with renorm,
        the moving renorm mean 0 and stddev 1)."""
        if self.lazy:
            self.num_batches_tracked = 0
            return
        if self.renorm:
            self.renorm_mean = np.zeros(self.num_features, self.dtype)
            self.renorm_stddev = np.ones(self.num_features, self.dtype)
        if self.track_running_stats:
            self.running_mean = np.zeros(self.num_features, self.dtype)
            self.running_var = np.ones(self.num_features, self.dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0

    def train(self, mode: bool = True) -> "BatchNorm":
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    def _check_channels(self, x) -> None:
        """The layer's own message for an input of the wrong channel count
        (bn_forward would blame gamma, which the caller never passed)."""
        shape = np.shape(x)
        got = self._features_of(shape)
        if self.lazy:
            return
        if got != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) expects {self.num_features} channels along axis "
                             f"{self.axis} of x, got x of shape {tuple(shape)} with {got}")

    def forward(self, x, mask=None):
        """Normalize ``x`` (channels on ``self.axis``); returns y like x.
        ``mask``: Keras masking (``bn_forward``'s), in training.

        As in PyTorch: training normalizes with the batch statistics and,
        while ``track_running_stats`` is true and running statistics exist,
        updates them; eval mode normalizes with the running statistics when
        they exist, else with the batch's. A batch-statistics forward
        remembers what :meth:`backward` needs. A lazy layer takes its
        channel count from x (and stays lazy if the call fails).
        """
        self._check_channels(x)
        lazy = self.lazy
        if lazy:
            self._materialize(self._features_of(np.shape(x)))
        try:
            return self._forward(x, mask)
        except BaseException:
            if lazy:
                self.num_features = self.gamma = self.beta = self.running_mean = self.running_var = None
                self.renorm_mean = self.renorm_stddev = None
            raise

    def _forward(self, x, mask):
        have_running = self.running_mean is not None
        batch = self.training or not have_running
        update = self.training and self.track_running_stats and have_running
        use_running = update or not batch
        gamma, beta, corrections = self.gamma, self.beta, None
        if self.renorm and self.training:
            stats = channel_stats(x, axis=self.axis, backend=self.backend)
            if stats.count:  # (an empty batch has no corrections: r = 1, d = 0)
                corrections = renormalization.corrections(stats.mean, stats.var, self.renorm_mean, self.renorm_stddev,
                                                 self.eps, self.renorm_clipping)
                gamma, beta = renormalization.affine(self.gamma, self.beta, *corrections, stats.mean.shape, self.dtype)
        y, saved = bn_forward(
            x, gamma, beta,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            training=batch, momentum=self.momentum, eps=self.eps, axis=self.axis,
            backend=self.backend, return_saved=True,
            num_batches_tracked=self.num_batches_tracked if update else None, mask=mask if batch else None,
            comm=self._communicator() if batch and self.training else None)
        if update:
            self.num_batches_tracked += 1
        if corrections is not None:
            renormalization.update(self.renorm_mean, self.renorm_stddev, stats.mean, stats.var, self.eps,
                          self.renorm_momentum)
        self._saved = (x, saved, batch, gamma, corrections, mask if batch else None, batch and self.training)
        return y

    def _communicator(self):
        """Whom a training forward and its backward synchronize with: nobody
        (:class:`SyncBatchNorm` says otherwise)."""
        return None

    __call__ = forward

    def backward(self, dy):
        """Gradient w.r.t. the input of the last forward: of the batch
        statistics', or after ``eval()`` of the running statistics' (held
        constant: ``dx = dy * gamma * invstd``, as frozen batch norm is
        fine-tuned).

        Returns ``dx``; stores ``grad_gamma`` and ``grad_beta`` (None where
        the layer has no gamma, or no beta).
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        x, saved, batch, gamma, corrections, mask, synced = self._saved
        dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=self.axis,
                                        training=batch, backend=self.backend, mask=mask,
                                        comm=self._communicator() if synced else None)
        if corrections is not None:  # renorm: y = (xhat * r + d) * gamma + beta, r and d constants
            r, d = corrections
            dgamma = r * np.asarray(dgamma, np.float64) + d * np.asarray(dbeta, np.float64)
        self.grad_gamma = None if self.gamma is None else dgamma.astype(self.dtype)
        self.grad_beta = None if self.beta is None else dbeta.astype(self.dtype)
        return dx

    _STATE_KEYS = ("gamma", "beta", "running_mean", "running_var", "renorm_mean", "renorm_stddev")

    def state_dict(self) -> dict:
        """Copies of the parameters and running statistics as plain arrays
        (keys ``gamma``, ``beta``, ``running_mean``, ``running_var``,
        ``num_batches_tracked``; absent ones are left out)."""
        state = {k: getattr(self, k).copy() for k in self._STATE_KEYS if getattr(self, k) is not None}
        if self.running_mean is not None:
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def _expected_keys(self) -> set:
        """The keys of this layer's state (a lazy one's: those it will have)."""
        if self.lazy:
            have = {"gamma": self._has_gamma, "beta": self._has_beta,
                    "running_mean": self.track_running_stats, "running_var": self.track_running_stats,
                    "renorm_mean": self.renorm, "renorm_stddev": self.renorm}
        else:
            have = {k: getattr(self, k) is not None for k in self._STATE_KEYS}
        keys = {k for k, present in have.items() if present}
        return keys | {"num_batches_tracked"} if "running_mean" in keys else keys

    def load_state_dict(self, state: dict, strict: bool = True) -> LoadResult:
        """Load arrays saved by :meth:`state_dict` (validated before anything
        changes; values are copied into this layer's dtype). ``strict``: the
        keys must be exactly this layer's (a ``ValueError`` names the
        missing and unexpected ones); with ``strict=False`` what is there is
        loaded, the rest kept, as torch does. A lazy layer takes its channel
        count from the state's arrays. Returns the keys not loaded
        (:class:`LoadResult`)."""
        strict = v.check_flag(strict, "strict")
        expected = self._expected_keys()
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise ValueError(f"state keys {sorted(state)} do not match this layer's {sorted(expected)}: "
                             f"missing {missing}, unexpected {unexpected}")
        arrays = {}
        for k in self._STATE_KEYS:
            if k in state and k in expected:
                v.reject_masked(state[k], k)
                arr = np.asarray(state[k])
                if arr.dtype.kind != "f":
                    raise TypeError(f"{k} must be a float array, got dtype {arr.dtype}")
                arrays[k] = arr
        features = self.num_features
        if features is None and arrays:  # a lazy layer: from the state (its first array's shape)
            first = next(iter(arrays.values())).shape
            ndim = len(self.axis) if axes.is_several(self.axis) else 1
            if len(first) != ndim or 0 in first:
                raise ValueError(f"{next(iter(arrays))} must have {ndim} non-empty dimension(s) (one value per "
                                 f"channel of axis {self.axis}), got shape {first}")
            features = tuple(int(n) for n in first) if axes.is_several(self.axis) else int(first[0])
        expected_shape = tuple(features) if isinstance(features, tuple) else (features,)
        for k, arr in arrays.items():
            if arr.shape != expected_shape:
                raise ValueError(f"{k} must have shape {expected_shape}, got {arr.shape}")
        nbt = None
        if "num_batches_tracked" in state and "num_batches_tracked" in expected:
            nbt = np.asarray(state["num_batches_tracked"])
            if nbt.shape != () or nbt.dtype.kind not in "iu" or nbt < 0:
                raise ValueError(f"num_batches_tracked must be a non-negative integer scalar, got {nbt!r}")
        if self.lazy and features is not None:
            self._materialize(features)
        if nbt is not None:
            self.num_batches_tracked = int(nbt)
        for k, arr in arrays.items():
            setattr(self, k, arr.astype(self.dtype, copy=True))
        return LoadResult(missing, unexpected)

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"scale={self._has_gamma}, center={self._has_beta}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}, backend={self.backend!r})")


def _check_num_features(num_features, several: bool):
    """A positive int (a tuple of them: the shape of several axes)."""
    if several:
        if not isinstance(num_features, (tuple, list)):
            raise TypeError(f"num_features must be the shape of the axes (a tuple) with several axes, "
                            f"got {type(num_features).__name__}")
        return tuple(_check_num_features(n, False) for n in num_features)
    if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be a positive int (or None: from the first input), "
                        f"got {type(num_features).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    return int(num_features)


def _affine_parts(affine: bool, bias, scale, center) -> tuple[bool, bool]:
    """``(has gamma, has beta)`` from torch's ``affine``/``bias`` and Keras'
    ``scale``/``center`` (None: as ``affine``). ``bias`` and ``center`` are
    the same switch; asking for a part ``affine=False`` rules out, or
    giving ``bias`` and ``center`` different values, is an error."""
    for name, flag in (("bias", bias), ("scale", scale), ("center", center)):
        if flag is not None:
            v.check_flag(flag, name)
            if flag and not affine:
                raise ValueError(f"{name}=True asks for a parameter that affine=False rules out")
    if bias is not None and center is not None and bool(bias) != bool(center):
        raise ValueError(f"bias={bias} and center={center} contradict each other (they are the same switch)")
    shift = center if center is not None else bias
    return (affine if scale is None else bool(scale)), (affine if shift is None else bool(shift))


class SyncBatchNorm(BatchNorm):
    """Synchronized batch normalization: :class:`BatchNorm` whose training
    forward normalizes with the statistics of every rank's batch together,
    and whose backward is the gradient of that (``bn_forward(...,
    comm=)``, ``bnkernels.distributed``). As torch's ``SyncBatchNorm``:
    eval mode communicates nothing (each rank uses its running statistics,
    which training kept identical on every rank), so one rank may validate
    alone.

    Args:
        num_features: as :class:`BatchNorm`.
        comm: a ``bnkernels.distributed`` communicator or an mpi4py one;
            None: ``MPI()`` over ``COMM_WORLD``, made at the first training
            call. Every rank must call forward (and backward) in training
            in the same order; a rank's batch may be empty.
        The other arguments: as :class:`BatchNorm`, except ``renorm`` (its
        corrections are per-rank statistics) and forward's ``mask``.

    ``grad_gamma``, ``grad_beta`` after :meth:`backward` are this rank's
    contributions: sum them over the ranks (as data-parallel training does
    for every parameter) for the gradient of the global batch.
    """

    def __init__(self, num_features=None, *, comm=None, **options):
        if options.get("renorm"):
            raise ValueError("SyncBatchNorm does not support renorm (its corrections use one rank's statistics)")
        super().__init__(num_features, **options)
        self.comm = None if comm is None else distributed.as_communicator(comm)
        self._call = None  # the synchronized call in progress (the layer's own checks are part of it)

    def forward(self, x, mask=None):
        """As :meth:`BatchNorm.forward`; in training one synchronized call,
        the layer's own checks included (a rank whose x is refused still
        takes part, and the others raise ``SyncError`` naming it)."""
        if not self.training:
            return super().forward(x, mask)
        return self._synchronized(distributed.FORWARD, super().forward, x, mask)

    def backward(self, dy):
        """As :meth:`BatchNorm.backward`; synchronized after a training
        forward (``grad_gamma``, ``grad_beta``: this rank's part)."""
        if self._saved is not None and not self._saved[-1]:  # the last forward was not synchronized
            return super().backward(dy)
        return self._synchronized(distributed.BACKWARD, super().backward, dy)

    def _synchronized(self, op, method, *args):
        if self.comm is None:
            self.comm = distributed.MPI()

        def run(call):
            self._call = call
            try:
                return method(*args)
            finally:
                self._call = None

        return distributed.synchronized(self.comm, op, run)

    def _communicator(self):
        return self._call
