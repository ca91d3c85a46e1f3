"""Drop-ins for ``torch.nn.BatchNorm1d/2d/3d`` on bnkernels' kernels, and
:func:`convert`, which swaps them (and ``bnkernels.torch.SyncBatchNorm``,
``bnkernels.torch.sync``, and the norm family's drop-ins,
``bnkernels.torch.norms``) into a model.

Each class subclasses torch's own (so ``isinstance(m, nn.BatchNorm2d)``
holds, and the constructor, parameters, buffers, ``state_dict`` keys,
``_check_input_dim`` and ``extra_repr`` are torch's: torchvision weights
load unchanged) and replaces only ``forward``, which is torch's with
``F.batch_norm`` replaced by :func:`bnkernels.torch.batch_norm`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import norms
from .ops import batch_norm


class _BnkernelsForward:
    """``forward`` of torch's ``_BatchNorm`` (torch 2.x, same decisions,
    same order), on bnkernels. ``backend``: which bnkernels backend runs
    (``"auto"``: by the tensor's device); a class default, settable per
    module."""

    backend = "auto"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: (N, C, *) as torch's layer takes; returns y like input."""
        self._check_input_dim(input)
        return self._bnkernels_forward(input)

    def _bnkernels_forward(self, input: torch.Tensor, comm=None) -> torch.Tensor:
        """The forward after the input checks; ``comm``: a communicator to
        normalize with the statistics of every rank's batch (``SyncBatchNorm``)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum None: the cumulative average, as torch
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Batch statistics in training, and in eval when no buffers exist;
        # buffers passed only where they are read or updated (as torch).
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if pass_buffers else None,
                          self.running_var if pass_buffers else None, self.weight, self.bias, use_batch, factor,
                          self.eps, backend=self.backend, comm=comm)


class BatchNorm1d(_BnkernelsForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` ((N, C) or (N, C, L) input) on bnkernels."""


class BatchNorm2d(_BnkernelsForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` ((N, C, H, W), any memory format) on bnkernels."""


class BatchNorm3d(_BnkernelsForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` ((N, C, D, H, W)) on bnkernels."""


#: torch's classes (exactly these: not subclasses) and their drop-ins; ``nn.SyncBatchNorm``'s,
#: ``bnkernels.torch.SyncBatchNorm``, is looked up by :func:`_drop_in` (its module imports this one).
_DROP_INS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
             nn.InstanceNorm1d: norms.InstanceNorm1d, nn.InstanceNorm2d: norms.InstanceNorm2d,
             nn.InstanceNorm3d: norms.InstanceNorm3d, nn.LayerNorm: norms.LayerNorm, nn.GroupNorm: norms.GroupNorm,
             nn.RMSNorm: norms.RMSNorm}


def _constructor_args(m: nn.Module) -> tuple[tuple, dict]:
    """The positional and keyword arguments that construct a module like
    the norm ``m`` (its options; the tensors are put in afterwards)."""
    if isinstance(m, nn.LayerNorm):
        return (m.normalized_shape, m.eps, m.elementwise_affine), {"bias": m.bias is not None}
    if isinstance(m, nn.RMSNorm):
        return (m.normalized_shape, m.eps, m.elementwise_affine), {}
    if isinstance(m, nn.GroupNorm):
        return (m.num_groups, m.num_channels, m.eps, m.affine), {"bias": m.bias is not None or not m.affine}
    # batch and instance norm (torch's _NormBase)
    return ((m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats),
            {"bias": m.bias is not None or not m.affine})


def _drop_in(kind: type):
    """bnkernels' class for a module of exactly the type ``kind``, or None."""
    if kind is nn.SyncBatchNorm:
        from .sync import SyncBatchNorm

        return SyncBatchNorm
    return _DROP_INS.get(kind)


def convert(module: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Return ``module`` with every ``torch.nn.BatchNorm1d/2d/3d``,
    ``torch.nn.SyncBatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``
    and ``InstanceNorm1d/2d/3d`` in it (itself included; exactly these
    types, not subclasses) replaced by bnkernels' drop-in (a
    ``SyncBatchNorm`` keeps its ``process_group``),
    as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does: the same parameter
    and buffer tensors (not copies: an optimizer made before still
    updates them), the same training mode, ``requires_grad``, device and
    dtype. Submodules are replaced in place; the returned module is
    ``module`` itself unless ``module`` is one of those norms.

    Args:
        module: any ``torch.nn.Module``.
        backend: the bnkernels backend the new layers use (``"auto"``).
    Raises:
        ValueError: a lazy batch norm whose parameters are not yet
            initialized (run one forward first).
    """
    def replace(m):
        drop_in = _drop_in(type(m))
        if drop_in is None:
            return None
        options = {"process_group": m.process_group} if isinstance(m, nn.SyncBatchNorm) else {}
        return rebuild(m, drop_in, backend, **options)

    return replace_modules(module, replace)


def rebuild(module: nn.Module, cls: type, backend: str, **options) -> nn.Module:
    """A ``cls`` (bnkernels' drop-in) made from the norm ``module`` (batch,
    instance, layer, RMS or group norm) with its options, its Parameter and
    buffer tensors themselves (or None), its training mode and
    ``qconfig``; ``options``: more constructor arguments
    (``process_group``)."""
    args, kwargs = _constructor_args(module)
    # made on "meta": nothing is allocated for tensors replaced at once
    new = cls(*args, device="meta", **kwargs, **options)
    for name, p in module._parameters.items():  # the same Parameters (or None)
        setattr(new, name, p)
    for name, b in module._buffers.items():
        new.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    new.train(module.training)
    new.backend = backend
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def replace_modules(module: nn.Module, replace) -> nn.Module:
    """``module`` with each submodule (itself included, outermost first)
    for which ``replace(m)`` returns a module replaced by it, in place;
    what a replacement holds is not looked into. Returns ``module``, or its
    replacement.

    Raises:
        ValueError: a lazy module with uninitialized parameters (its
            options, ``num_features``, are not known yet).
    """
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"convert: {type(module).__name__} has uninitialized parameters; "
                         "run one forward pass before converting")
    new = replace(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        converted = replace_modules(child, replace)
        if converted is not child:
            setattr(module, name, converted)
    return module
