"""``bnkernels.torch``'s modules and ``convert`` against torch's own:
constructor, parameters, buffers and ``state_dict`` interchange, every
option of torch's layer, and a converted model training to torch's
losses in both memory formats."""
import copy

import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bnkernels.torch")
nn = torch.nn

pytestmark = pytest.mark.torch

PAIRS = [(nn.BatchNorm1d, bt.BatchNorm1d, (6, 5, 7)), (nn.BatchNorm1d, bt.BatchNorm1d, (9, 5)),
         (nn.BatchNorm2d, bt.BatchNorm2d, (4, 5, 6, 3)), (nn.BatchNorm3d, bt.BatchNorm3d, (2, 5, 3, 4, 2))]
OPTIONS = [dict(), dict(affine=False), dict(bias=False), dict(momentum=None), dict(track_running_stats=False),
           dict(eps=1e-3, momentum=0.3)]


def _close(a, b, what, tol=2e-5):
    assert a.shape == b.shape, what
    err = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
    assert err <= tol * (1 + float(b.detach().double().abs().max() if b.numel() else 0)), f"{what}: {err:.3g}"


@pytest.mark.parametrize("torch_cls,cls,shape", PAIRS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_module_matches_torch_layer_step_by_step(torch_cls, cls, shape, options):
    """Same state_dict keys and shapes; after loading torch's state,
    training steps then eval give torch's outputs, gradients, buffers."""
    torch.manual_seed(0)
    C = shape[1]
    ref = torch_cls(C, **options)
    mine = cls(C, **options)
    assert isinstance(mine, torch_cls)
    assert list(mine.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    mine.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(shape) * 2 + 3
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ym = ref(xr), mine(xm)
        _close(ym, yr, f"y step {step}")
        dy = torch.randn(shape)
        yr.backward(dy)
        ym.backward(dy)
        _close(xm.grad, xr.grad, f"dx step {step}", tol=1e-4)
        for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
            _close(q.grad, p.grad, f"{name}.grad step {step}", tol=1e-4)
    for name, buf in ref.named_buffers():
        _close(dict(mine.named_buffers())[name], buf, name)
    ref.eval()
    mine.eval()
    x = torch.randn(shape) * 2 + 3
    _close(mine(x), ref(x), "eval y")
    ref2 = torch_cls(C, **options)  # and back: torch's layer loads bnkernels' state
    ref2.load_state_dict(mine.state_dict())


def _model(fmt):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU()),
                      nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    return m.to(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_converted_model_trains_to_torchs_losses(fmt):
    ref = _model(fmt)
    mine = bt.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, (bt.BatchNorm1d, bt.BatchNorm2d)) for m in mine.modules()) == 3
    opt_r, opt_m = torch.optim.SGD(ref.parameters(), lr=0.05), torch.optim.SGD(mine.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for step in range(8):
        x = (torch.randn(16, 3, 8, 8, generator=gen) * 3 + 1).contiguous(memory_format=fmt)
        target = torch.randint(0, 3, (16,), generator=gen)
        losses = []
        for model, opt in ((ref, opt_r), (mine, opt_m)):
            loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * (1 + abs(losses[0])), (step, losses)
    ref.eval()
    mine.eval()
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=fmt)
    _close(mine(x), ref(x), "eval logits", tol=1e-4)
    assert mine[1](mine[0](x)).is_contiguous(memory_format=fmt)


def test_convert_keeps_the_same_tensors_mode_and_options():
    torch.manual_seed(0)
    root = nn.BatchNorm2d(4, eps=1e-3, momentum=0.2, bias=False)
    root.eval()
    root.weight.requires_grad_(False)
    new = bt.convert(root, backend="numpy")
    assert type(new) is bt.BatchNorm2d and new is not root
    assert new.weight is root.weight and new.bias is None and new.running_mean is root.running_mean
    assert new.num_batches_tracked is root.num_batches_tracked
    assert not new.training and not new.weight.requires_grad
    assert (new.eps, new.momentum, new.backend) == (1e-3, 0.2, "numpy")
    assert new.running_var.device.type == "cpu"
    tree = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.SyncBatchNorm(4))
    opt = torch.optim.SGD(tree.parameters(), lr=0.1)
    weight = tree[1].weight
    assert bt.convert(tree) is tree
    assert type(tree[1]) is bt.BatchNorm1d and tree[1].weight is weight
    assert type(tree[2]) is bt.SyncBatchNorm  # torch's SyncBatchNorm becomes bnkernels' (its process group kept)
    loss = tree[1](tree[0](torch.randn(5, 3))).sum()
    loss.backward()
    opt.step()  # the optimizer made before convert updates the same parameters
    assert bt.convert(tree) is tree and type(tree[1]) is bt.BatchNorm1d  # idempotent


def test_convert_refuses_an_uninitialized_lazy_batch_norm():
    with pytest.raises(ValueError, match="LazyBatchNorm2d has uninitialized parameters"):
        bt.convert(nn.Sequential(nn.LazyBatchNorm2d()))


def test_bad_input_to_the_module_raises_and_changes_nothing():
    m = bt.BatchNorm2d(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="expected 4D input"):  # torch's own input check
        m(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 1, 1))  # one value per channel in training
    for k, v in m.state_dict().items():
        if k != "num_batches_tracked":  # torch counts the batch before normalizing, as does the drop-in
            assert torch.equal(v, before[k]), k
