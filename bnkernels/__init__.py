"""bnkernels: fast, exact batch normalization for GPUs with a CPU fallback.

Quick start::

    import numpy as np
    from bnkernels import bn_forward, bn_backward

    x = np.random.randn(32, 64, 56, 56).astype(np.float32)
    y, saved = bn_forward(x, backend="cuda", return_saved=True)
    dx, dgamma, dbeta = bn_backward(np.ones_like(y), x, saved.mean, saved.invstd)

Importing bnkernels never needs more than NumPy; optional backends are
probed when they are first asked for.
"""
from .batch_norm import ChannelStats, SavedStats, bn_backward, bn_forward, channel_stats, merge_stats
from .backends import BackendStatus, available_backends
from .errors import BackendFallbackWarning, BackendUnavailableError, SyncError
from .group_norm import group_norm, group_norm_backward, instance_norm, instance_norm_backward
from .layer import BatchNorm, SyncBatchNorm
from .layer_norm import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from .norm_family import NormSaved, RMSSaved
from .norm_layers import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from .prepared import PreparedBackward, PreparedForward, prepare_backward, prepare_forward

__version__ = "0.1.0"

__all__ = [
    "BackendFallbackWarning",
    "BackendStatus",
    "BackendUnavailableError",
    "BatchNorm",
    "PreparedBackward",
    "SyncBatchNorm",
    "SyncError",
    "PreparedForward",
    "ChannelStats",
    "SavedStats",
    "available_backends",
    "bn_backward",
    "bn_forward",
    "channel_stats",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "merge_stats",
    "NormSaved",
    "RMSSaved",
    "rms_norm",
    "rms_norm_backward",
    "prepare_backward",
    "prepare_forward",
    "__version__",
]
