"""The NumPy-level norm layers (``bnkernels.LayerNorm``, ``RMSNorm``,
``GroupNorm``, ``InstanceNorm``) step by step against torch's modules:
forward, backward (input and parameter gradients), running statistics, eval."""
from __future__ import annotations

import numpy as np
import pytest

import bnkernels as bk
from helpers import make_input

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _pair(kind, rng):
    nn = torch.nn
    if kind == "layer":
        return bk.LayerNorm((5, 4), dtype=np.float64), nn.LayerNorm((5, 4), dtype=torch.float64)
    if kind == "layer-nobias":
        return bk.LayerNorm(4, bias=False, dtype=np.float64), nn.LayerNorm(4, bias=False, dtype=torch.float64)
    if kind == "rms":
        return bk.RMSNorm((5, 4), eps=1e-6, dtype=np.float64), nn.RMSNorm((5, 4), eps=1e-6, dtype=torch.float64)
    if kind == "group":
        return bk.GroupNorm(3, 6, dtype=np.float64), nn.GroupNorm(3, 6, dtype=torch.float64)
    if kind == "instance":
        return (bk.InstanceNorm(6, affine=True, track_running_stats=True, dtype=np.float64),
                nn.InstanceNorm2d(6, affine=True, track_running_stats=True, dtype=torch.float64))
    return bk.InstanceNorm(6, dtype=np.float64), nn.InstanceNorm2d(6, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["layer", "layer-nobias", "rms", "group", "instance", "instance-plain"])
def test_layer_steps_like_torch(kind, rng):
    mine, theirs = _pair(kind, rng)
    with torch.no_grad():  # the same non-trivial parameters in both
        for name in ("weight", "bias"):
            p = getattr(theirs, name, None)
            if p is not None:
                p.copy_(torch.tensor(rng.uniform(0.5, 1.5, tuple(p.shape))))
                getattr(mine, name)[...] = p.numpy()
    assert set(mine.state_dict()) == {k for k in theirs.state_dict() if k != "num_batches_tracked"}
    for step in range(2):
        x = make_input((3, 6, 5, 4), "float64", rng)
        dy = make_input(x.shape, "float64", rng)
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(dy))
        y = mine.forward(x)
        dx = mine.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-9)
        for name in ("weight", "bias"):
            p = getattr(theirs, name, None)
            if p is not None:
                np.testing.assert_allclose(getattr(mine, "grad_" + name), p.grad.numpy(), rtol=1e-9, atol=1e-9)
                p.grad = None
        for name in ("running_mean", "running_var"):
            if getattr(theirs, name, None) is not None:
                np.testing.assert_allclose(getattr(mine, name), getattr(theirs, name).numpy(), rtol=1e-10)
    mine.eval(), theirs.eval()
    x = make_input((2, 6, 5, 4), "float64", rng)
    dy = make_input(x.shape, "float64", rng)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(mine.forward(x), yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mine.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-9)


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="must divide num_channels"):
        bk.GroupNorm(4, 6)
    with pytest.raises(TypeError, match="normalized_shape"):
        bk.LayerNorm("4")
    with pytest.raises(TypeError, match="dtype"):
        bk.LayerNorm(4, dtype=np.int32)
    with pytest.raises(RuntimeError, match="forward"):
        bk.RMSNorm(4).backward(np.ones((2, 4), np.float32))
