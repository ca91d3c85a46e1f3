"""bnkernels inside PyTorch: a differentiable ``batch_norm`` with
``torch.nn.functional.batch_norm``'s signature (custom operators in the
``bnkernels`` namespace: ``torch.compile(fullgraph=True)`` traces through
them), drop-in ``BatchNorm1d/2d/3d`` modules, :class:`SyncBatchNorm` (synchronized
over ``torch.distributed``: gloo on the CPU, NCCL on the GPU), the norm family
(``layer_norm``, ``rms_norm``, ``group_norm``, ``instance_norm`` and the
``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d`` drop-ins,
on the CPU backends; custom operators too) and :func:`convert`.

Importing this module imports torch (``import bnkernels`` never does)::

    import torch, torchvision
    from bnkernels.torch import convert
    model = convert(torchvision.models.resnet18())   # every BatchNorm2d now runs on bnkernels

Kernels: ``bnkernels.torch.ops``; modules and ``convert``:
``bnkernels.torch.modules``; ``SyncBatchNorm``: ``bnkernels.torch.sync``;
the norm family: ``bnkernels.torch.norms``.
"""
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from .norms import (GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm, group_norm,
                    instance_norm, layer_norm, rms_norm)
from .ops import batch_norm
from .sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "LayerNorm", "RMSNorm", "SyncBatchNorm", "batch_norm", "convert", "group_norm",
           "instance_norm", "layer_norm", "rms_norm"]
