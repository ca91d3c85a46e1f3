"""bnkernels inside PyTorch: a differentiable ``batch_norm`` with
``torch.nn.functional.batch_norm``'s signature (custom operators in the
``bnkernels`` namespace: ``torch.compile(fullgraph=True)`` traces through
them), drop-in ``BatchNorm1d/2d/3d`` modules, :class:`SyncBatchNorm` (synchronized
over ``torch.distributed``: gloo on the CPU, NCCL on the GPU) and
:func:`convert`.

Importing this module imports torch (``import bnkernels`` never does)::

    import torch, torchvision
    from bnkernels.torch import convert
    model = convert(torchvision.models.resnet18())   # every BatchNorm2d now runs on bnkernels

Kernels: ``bnkernels.torch.ops``; modules and ``convert``:
``bnkernels.torch.modules``; ``SyncBatchNorm``: ``bnkernels.torch.sync``.
"""
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from .ops import batch_norm
from .sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert"]
