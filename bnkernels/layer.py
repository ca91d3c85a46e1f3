"""``BatchNorm``: a stateful layer owning gamma, beta and running statistics."""
from __future__ import annotations

import numbers

import numpy as np

from . import validation as v
from .batch_norm import bn_backward, bn_forward
from .backends import check_backend_name


class BatchNorm:
    """Batch normalization layer (PyTorch ``BatchNorm{1,2,3}d`` semantics).

    Args:
        num_features: number of channels C.
        eps, momentum: as in :func:`bnkernels.bn_forward`; ``momentum=None``
            is a cumulative average (the layer counts the batches).
        affine: learn ``gamma`` (init 1) and ``beta`` (init 0).
        track_running_stats: keep ``running_mean`` (init 0) and
            ``running_var`` (init 1). Without them, inference mode also
            normalizes with batch statistics, as in PyTorch.
        axis: channel axis of the inputs (1 for NCHW, -1 for channels-last).
        dtype: dtype of the parameters and running statistics, float32 or
            float64 (float16 inputs use float32 parameters).
        backend: as in :func:`bnkernels.bn_forward`.

    Attributes ``gamma``, ``beta`` (None without affine), ``running_mean``,
    ``running_var`` (None without tracking), ``num_batches_tracked``, and after
    :meth:`backward`, ``grad_gamma`` and ``grad_beta``.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 axis=1, dtype=np.float32, backend="auto"):
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be a positive int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in v.RUNNING_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if not isinstance(axis, numbers.Integral) or isinstance(axis, (bool, np.bool_)):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        check_backend_name(backend)
        self.num_features = int(num_features)
        self.eps = v.check_eps(eps)
        self.momentum = v.check_momentum(momentum)
        self.axis = int(axis)
        self.dtype = dtype
        self.backend = backend
        affine = v.check_flag(affine, "affine")
        #: Read on every call, as in PyTorch: False after construction stops
        #: the updates in training (eval still uses existing statistics).
        self.track_running_stats = v.check_flag(track_running_stats, "track_running_stats")
        self.gamma = np.ones(num_features, dtype) if affine else None
        self.beta = np.zeros(num_features, dtype) if affine else None
        self.reset_running_stats()
        self.training = True
        self.grad_gamma = self.grad_beta = None
        self._saved = None  # (x, SavedStats) of the last batch-statistics forward

    @property
    def affine(self) -> bool:
        """Whether the layer has ``gamma`` and ``beta`` (chosen at construction)."""
        return self.gamma is not None

    def reset_running_stats(self) -> None:
        """Running mean 0, running var 1, batch count 0."""
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
        layout = v.channel_layout(shape, self.axis)
        if layout.channels != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) expects {self.num_features} channels along axis "
                             f"{self.axis} of x, got x of shape {tuple(shape)} with {layout.channels}")

    def forward(self, x):
        """Normalize ``x`` (channels on ``self.axis``); returns y like x.

        As in PyTorch: training normalizes with the batch statistics and,
        while ``track_running_stats`` is true and running statistics exist,
        updates them; eval mode normalizes with the running statistics when
        they exist, else with the batch's. A batch-statistics forward
        remembers what :meth:`backward` needs.
        """
        self._check_channels(x)
        have_running = self.running_mean is not None
        batch = self.training or not have_running
        update = self.training and self.track_running_stats and have_running
        use_running = update or not batch
        y, saved = bn_forward(
            x, self.gamma, self.beta,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            training=batch, momentum=self.momentum, eps=self.eps, axis=self.axis,
            backend=self.backend, return_saved=True,
            num_batches_tracked=self.num_batches_tracked if update else None)
        if update:
            self.num_batches_tracked += 1
        self._saved = (x, saved) if batch else None
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient w.r.t. the input of the last batch-statistics forward.

        Returns ``dx``; stores ``grad_gamma`` and ``grad_beta`` (None without
        affine).
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() with batch statistics first "
                               "(in eval mode with running statistics there is nothing to differentiate here)")
        x, saved = self._saved
        dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, self.gamma, axis=self.axis,
                                        backend=self.backend)
        if self.affine:
            self.grad_gamma, self.grad_beta = dgamma.astype(self.dtype), dbeta.astype(self.dtype)
        return dx

    _STATE_KEYS = ("gamma", "beta", "running_mean", "running_var")

    def state_dict(self) -> dict:
        """Copies of the parameters and running statistics as plain arrays
        (keys ``gamma``, ``beta``, ``running_mean``, ``running_var``,
        ``num_batches_tracked``; absent ones are left out)."""
        state = {k: getattr(self, k).copy() for k in self._STATE_KEYS if getattr(self, k) is not None}
        if self.running_mean is not None:
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load arrays saved by :meth:`state_dict` (validated before anything
        changes; values are copied into this layer's dtype)."""
        expected = {k for k in self._STATE_KEYS if getattr(self, k) is not None}
        if self.running_mean is not None:
            expected.add("num_batches_tracked")
        if set(state) != expected:
            raise ValueError(f"state keys {sorted(state)} do not match this layer's {sorted(expected)}")
        new = {}
        for k in self._STATE_KEYS:
            if k in state:
                v.reject_masked(state[k], k)
                arr = np.asarray(state[k])
                if arr.dtype.kind != "f":
                    raise TypeError(f"{k} must be a float array, got dtype {arr.dtype}")
                if arr.shape != (self.num_features,):
                    raise ValueError(f"{k} must have shape ({self.num_features},), got {arr.shape}")
                new[k] = arr.astype(self.dtype, copy=True)
        if "num_batches_tracked" in expected:
            nbt = np.asarray(state["num_batches_tracked"])
            if nbt.shape != () or nbt.dtype.kind not in "iu" or nbt < 0:
                raise ValueError(f"num_batches_tracked must be a non-negative integer scalar, got {nbt!r}")
            self.num_batches_tracked = int(nbt)
        for k, arr in new.items():
            setattr(self, k, arr)

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}, backend={self.backend!r})")
