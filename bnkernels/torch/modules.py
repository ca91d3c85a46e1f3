"""Drop-ins for ``torch.nn.BatchNorm1d/2d/3d`` on bnkernels' kernels, and
:func:`convert`, which swaps them into a model.

Each class subclasses torch's own (so ``isinstance(m, nn.BatchNorm2d)``
holds, and the constructor, parameters, buffers, ``state_dict`` keys,
``_check_input_dim`` and ``extra_repr`` are torch's: torchvision weights
load unchanged) and replaces only ``forward``, which is torch's with
``F.batch_norm`` replaced by :func:`bnkernels.torch.batch_norm`.
"""
from __future__ import annotations

import torch
from torch import nn

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
                          self.eps, backend=self.backend)


class BatchNorm1d(_BnkernelsForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` ((N, C) or (N, C, L) input) on bnkernels."""


class BatchNorm2d(_BnkernelsForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` ((N, C, H, W), any memory format) on bnkernels."""


class BatchNorm3d(_BnkernelsForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` ((N, C, D, H, W)) on bnkernels."""


#: torch's classes (exactly these: not subclasses, nor SyncBatchNorm) and their drop-ins.
_DROP_INS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert(module: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Return ``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` in it
    (itself included) replaced by bnkernels' drop-in, as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does: the same parameter
    and buffer tensors (not copies: an optimizer made before still
    updates them), the same training mode, ``requires_grad``, device and
    dtype. Submodules are replaced in place; the returned module is
    ``module`` itself unless ``module`` is a batch norm.

    Args:
        module: any ``torch.nn.Module``.
        backend: the bnkernels backend the new layers use (``"auto"``).
    Raises:
        ValueError: a lazy batch norm whose parameters are not yet
            initialized (run one forward first).
    """
    drop_in = _DROP_INS.get(type(module))
    if drop_in is not None:
        new = drop_in(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      device="meta", bias=module.bias is not None or not module.affine)
        for name in ("weight", "bias"):  # the same Parameters (or None)
            setattr(new, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new.register_buffer(name, getattr(module, name))
        new.train(module.training)
        new.backend = backend
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"convert: {type(module).__name__} has uninitialized parameters; "
                         "run one forward pass before converting")
    for name, child in module.named_children():
        converted = convert(child, backend=backend)
        if converted is not child:
            setattr(module, name, converted)
    return module
