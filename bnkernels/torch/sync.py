"""``bnkernels.torch.SyncBatchNorm``: ``torch.nn.SyncBatchNorm`` on
bnkernels' kernels, synchronized by ``torch.distributed`` through
``bnkernels.distributed.Torch``: gloo on the CPU (where torch's own layer
refuses CPU tensors), NCCL on the GPU.

It makes torch's decisions: it synchronizes only in training, with
``torch.distributed`` initialized and more than one rank in its process
group; otherwise (eval, one rank, no process group) it is exactly
``bnkernels.torch.BatchNorm*d`` and makes no collective, so a model can be
validated on one rank alone. When it synchronizes, every rank of the
group must call it in the same order (as for torch's): the forward makes
one all-gather, the backward one all-reduce, and ranks that disagree
(channels, dtype, training flag, the number of calls) all raise
``bnkernels.SyncError`` instead of hanging. A rank may hold an empty
batch. Eager only: under ``torch.compile`` the synchronized forward runs
outside the graph (``torch.compiler.disable``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..distributed import Torch
from .modules import _BnkernelsForward, rebuild, replace_modules

#: One ``bnkernels.distributed.Torch`` adapter per process group (the group
#: object itself is the key; None: the default group at the time). An
#: adapter keeps the protocol's state, the same on every rank since every
#: rank makes the same calls: the number of calls so far (checked in each
#: header, so ranks that fall out of step are told) and the payload
#: capacity, which grows once to fit the widest layer; a fresh adapter per
#: call would be consistent too, but would lose that check and repeat the
#: growth round (a second collective) on every call of a layer with more
#: than 64 channels. Every layer on one group shares its adapter, which is
#: right: all ranks call the layers in the same order. (The entry of a destroyed
#: group stays; a re-initialized world is a new group object, so a new entry.)
_ADAPTERS: dict = {}


def communicator(process_group=None) -> Torch:
    """The (cached) ``bnkernels.distributed.Torch`` adapter of
    ``process_group`` (None: the default group), for ``comm=``."""
    group = torch.distributed.group.WORLD if process_group is None else process_group
    adapter = _ADAPTERS.get(group)
    if adapter is None:
        adapter = _ADAPTERS[group] = Torch(group)
    return adapter


class SyncBatchNorm(_BnkernelsForward, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on bnkernels: the same constructor
    (``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None,
    dtype=None``, keyword ``bias``), parameters, buffers and ``state_dict``
    keys (it is an ``nn.SyncBatchNorm``); ``backend`` as the ``BatchNorm*d``
    drop-ins' (class default ``"auto"``).

    Input: (N, C, *), any number of dimensions >= 2, channels at axis 1,
    float16, bfloat16, float32 or float64, CPU or CUDA, any memory format
    (``channels_last`` stays so); N may differ between ranks, 0 included.
    Output: like the input. Training normalizes with the statistics of the
    whole batch of the process group (exact for any counts) and updates the
    running statistics alike on every rank; the input's gradient is that
    of the global normalization and the weight/bias gradients are this
    rank's shares, which ``DistributedDataParallel`` (or an all-reduce)
    sums into the whole batch's.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input: (N, C, *) with C > 0; returns y like input."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._sync_group()
        if group is None:  # eval, one rank or no torch.distributed: a plain batch norm, no collective
            return self._bnkernels_forward(input)
        return self._synchronized_forward(input, group)

    @torch.compiler.disable
    def _synchronized_forward(self, input: torch.Tensor, group) -> torch.Tensor:
        # (outside any compiled graph: the protocol numbers each call, a graph could not replay them)
        return self._bnkernels_forward(input, communicator(group))

    def _sync_group(self) -> Optional[object]:
        """The process group to synchronize over, or None: torch's rule,
        training with ``torch.distributed`` initialized and more than one
        rank in the group (eval never synchronizes)."""
        dist = torch.distributed
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` to bnkernels:
        ``module`` with every batch norm in it (itself included: any
        ``torch.nn.modules.batchnorm._BatchNorm``, torch's ``BatchNorm1d/2d/3d``
        and ``SyncBatchNorm`` and bnkernels' drop-ins) replaced by a
        :class:`SyncBatchNorm` on ``process_group`` (None: the default
        group), holding the same Parameter and buffer tensors (not copies),
        training mode, ``requires_grad`` and ``qconfig``; a bnkernels
        layer's ``backend`` is kept. Submodules are replaced in place;
        returns ``module``, or its replacement if it is a batch norm.

        Raises:
            ValueError: a lazy batch norm not yet initialized (torch's
                would fail on its unknown ``num_features``).
        """
        def replace(m):
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                return None
            return rebuild(m, cls, getattr(m, "backend", cls.backend), process_group=process_group)

        return replace_modules(module, replace)
