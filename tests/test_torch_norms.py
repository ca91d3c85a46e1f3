"""``bnkernels.torch``'s layer, RMS, group and instance norm (``norms``):
the functions against torch's own functional ops and autograd (float64
tight; float32, float16, bfloat16 to the dtype's tolerance), gradcheck
through the shared autograd.Function, the modules against torch's with
every option, ``convert``, a small model trained against torch's, the custom operators
(``torch.library.opcheck``) and ``torch.compile(fullgraph=True)``.

Data have a non-zero mean; shapes include 1, 15, 17 and primes; group and
instance norm also take channels_last inputs. Every test runs on the
numpy backend and on numba (skipped while the numba backend has no
norm-family kernels)."""
import copy
import zlib

import numpy as np
import pytest

from helpers import TOLERANCES, bfloat16

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bnkernels.torch")
import bnkernels.backends  # noqa: E402

F = torch.nn.functional
nn = torch.nn
pytestmark = pytest.mark.torch


def _has_norm_kernels(name):
    try:
        return hasattr(bnkernels.backends.resolve(name), "norm_forward")
    except Exception:  # (the backend cannot run here)
        return False


BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    not _has_norm_kernels("numba"), reason="the numba backend has no norm-family kernels yet"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NP_TOL = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _tol(dtype):
    return TOLERANCES[np.dtype(bfloat16())] if dtype == torch.bfloat16 else TOLERANCES[np.dtype(NP_TOL[dtype])]


def _close(actual, expected, dtype, what, scale=None):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = _tol(dtype)
    expected = expected.detach().double()
    scale = (float(expected.abs().max()) if expected.numel() else 0.0) + 1 if scale is None else scale
    err = (actual.detach().double() - expected).abs()
    bad = ~(err <= tol["atol"] * scale + tol["rtol"] * expected.abs())
    assert not bad.any(), f"{what} ({dtype}): {int(bad.sum())} of {bad.numel()} off, worst {float(err.max()):.3g}"


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _data(shape, gen, dtype=torch.float64, mean=3.0):
    """Fresh data with a non-zero mean, and an offset per last-axis index."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + mean
    return (x + torch.rand(shape[-1:], generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)


def _param(shape, gen, low=0.5):
    return torch.rand(shape, generator=gen, dtype=torch.float64) + low


# (name, shape, options, param shape): each case calls ours as CALL[name](x, w, b, backend, **options) and
# torch's as REF[name](x, w, b, **options), running statistics (instance norm) made fresh by _call.
CASES = [
    ("layer", (4, 17), dict(normalized_shape=17), (17,)),
    ("layer", (3, 5, 7), dict(normalized_shape=(5, 7)), (5, 7)),
    ("layer", (2, 3, 1), dict(normalized_shape=[1]), (1,)),
    ("layer", (1, 15), dict(normalized_shape=torch.Size([15])), (15,)),
    ("rms", (4, 17), dict(normalized_shape=17), (17,)),
    ("rms", (3, 5, 7), dict(normalized_shape=(5, 7), eps=1e-4), (5, 7)),
    ("rms", (1, 1), dict(normalized_shape=1), (1,)),
    ("group", (2, 6, 5, 3), dict(num_groups=3), (6,)),
    ("group", (3, 15, 7), dict(num_groups=5), (15,)),
    ("group", (1, 17, 2, 3), dict(num_groups=17), (17,)),
    ("group", (2, 4, 3, 2), dict(num_groups=1, eps=1e-3), (4,)),
    ("group", (5, 6), dict(num_groups=2), (6,)),
    ("instance", (2, 3, 17), dict(), (3,)),
    ("instance", (3, 5, 4, 3), dict(), (5,)),
    ("instance", (1, 7, 2, 3, 2), dict(eps=1e-3), (7,)),
    ("instance", (2, 4, 5, 3), dict(running=True, momentum=0.3), (4,)),
]


def _call(name, x, w, b, options, norm_backend=None, running=None):
    """Ours (backend given) or torch's (None); ``running``: (mean, var)
    tensors for instance norm's ``running=True`` cases, updated in place."""
    options = dict(options)
    kw = {} if norm_backend is None else {"backend": norm_backend}
    if norm_backend is None and isinstance(options.get("normalized_shape"), int):  # (torch's takes no int; ours does)
        options["normalized_shape"] = (options["normalized_shape"],)
    if name == "layer":
        f = F.layer_norm if norm_backend is None else bt.layer_norm
        return f(x, options.pop("normalized_shape"), w, b, **options, **kw)
    if name == "rms":
        f = F.rms_norm if norm_backend is None else bt.rms_norm
        return f(x, options.pop("normalized_shape"), w, **options, **kw)
    if name == "group":
        f = F.group_norm if norm_backend is None else bt.group_norm
        return f(x, options.pop("num_groups"), w, b, **options, **kw)
    f = F.instance_norm if norm_backend is None else bt.instance_norm
    options.pop("running", None)
    rm, rv = running if running is not None else (None, None)
    return f(x, rm, rv, w, b, **options, **kw)


def _layouts(name, x):
    yield "contiguous", x
    if name in ("group", "instance") and x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if name in ("group", "instance") and x.dim() == 5:
        yield "channels_last_3d", x.contiguous(memory_format=torch.channels_last_3d)
    yield "strided", torch.cat([x, x], dim=0)[::2]


def _run(name, x, w, b, options, dy, norm_backend=None, running=None):
    """y and the gradients (x, w, b: those that require one) of one call."""
    y = _call(name, x, w, b, options, norm_backend, running)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    return y, torch.autograd.grad(y, leaves, dy)


def _laid_out_like(result, x):
    """result has the strides of torch.empty_like(x) (one value: any)."""
    return result.numel() <= 1 or result.stride() == torch.empty_like(x).stride()


def _case_id(case):
    return f"{case[0]}-{'x'.join(map(str, case[1]))}-{case[2]}"


@pytest.mark.parametrize("norm_backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_functions_and_their_gradients_match_torch_float64(case, affine, norm_backend, gen):
    """y, dx, dweight, dbias (and instance norm's running statistics)
    against torch's functional op and autograd in float64, in every
    layout; y and dx keep the input's memory format."""
    name, shape, options, pshape = case
    x0 = _data(shape, gen)
    w0 = _param(pshape, gen) if affine != "none" else None
    b0 = torch.randn(pshape, generator=gen, dtype=torch.float64) if affine == "weight_bias" and name != "rms" else None
    dy = _data(shape, gen, mean=0.5)
    C = shape[1]
    for layout, x in _layouts(name, x0):
        run_r = (torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64))
        run_m = tuple(t.clone() for t in run_r)
        leaves_r = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w0, b0)]
        leaves_m = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w0, b0)]
        leaves_m[0] = x.detach().requires_grad_()  # (ours on the layout itself)
        yr, gr = _run(name, *leaves_r, options, dy, running=run_r if options.get("running") else None)
        ym, gm = _run(name, *leaves_m, options, dy, norm_backend, running=run_m if options.get("running") else None)
        what = f"{name} {layout}"
        _close(ym, yr, torch.float64, f"{what} y")
        assert ym.dtype == x.dtype and _laid_out_like(ym, x), what
        for g, r, n in zip(gm, gr, ("dx", "dweight", "dbias")):
            _close(g, r, torch.float64, f"{what} {n}")
        assert _laid_out_like(gm[0], x), what
        if options.get("running"):
            _close(run_m[0], run_r[0], torch.float64, f"{what} running_mean")
            _close(run_m[1], run_r[1], torch.float64, f"{what} running_var")


@pytest.mark.parametrize("norm_backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c[1] in ((4, 17), (3, 15, 7), (3, 5, 4, 3), (3, 5, 7))],
                         ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functions_in_low_precision_match_a_float64_reference(case, dtype, norm_backend, gen):
    """float32/float16/bfloat16 input, float32 parameters: y and dx within
    the dtype's tolerance of torch's float64 result on the same (rounded)
    values; parameter gradients (float32) to float32's tolerance scaled
    by the input's rounding. Results keep the input's dtype, parameter
    gradients the parameters'."""
    name, shape, options, pshape = case
    x = _data(shape, gen, dtype)
    w = _param(pshape, gen).float()
    b = torch.randn(pshape, generator=gen).float() if name != "rms" else None
    dy = _data(shape, gen, dtype, mean=0.5)
    xr, wr, br = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    yr, gr = _run(name, xr, wr, br, options, dy.double())
    xm, wm, bm = (None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b))
    ym, gm = _run(name, xm, wm, bm, options, dy, norm_backend)
    assert ym.dtype == dtype and gm[0].dtype == dtype and gm[1].dtype == torch.float32
    _close(ym, yr, dtype, f"{name} y")
    _close(gm[0], gr[0], dtype, f"{name} dx")
    for g, r, n in zip(gm[1:], gr[1:], ("dweight", "dbias")):
        # a sum over many rows of dtype-rounded products: the dtype's tolerance, scaled by the count
        rows = x.numel() // g.numel()
        _close(g, r, dtype, f"{name} {n}", scale=(float(r.abs().max()) + 1) * max(1.0, rows ** 0.5))


@pytest.mark.parametrize("norm_backend", BACKENDS)
@pytest.mark.parametrize("name,shape,options,pshape", [CASES[1], CASES[5], CASES[7], CASES[13]],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_gradcheck_through_the_autograd_function(name, shape, options, pshape, norm_backend, gen):
    x = _data(shape, gen).requires_grad_()
    w = _param(pshape, gen).requires_grad_()
    b = torch.randn(pshape, generator=gen, dtype=torch.float64).requires_grad_()
    if name == "rms":
        assert torch.autograd.gradcheck(lambda x, w: _call(name, x, w, None, options, norm_backend), (x, w))
    else:
        assert torch.autograd.gradcheck(lambda x, w, b: _call(name, x, w, b, options, norm_backend), (x, w, b))


def test_double_backward_raises(gen):
    x = _data((3, 5), gen).requires_grad_()
    y = bt.layer_norm(x, 5, backend="numpy")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_cpu_tensors_reach_the_kernels_without_a_copy(gen, monkeypatch):
    """The kernels see the tensor's own memory (contiguous and channels_last
    input, bfloat16 included), and instance norm updates the running
    statistics' own tensors."""
    from bnkernels.torch import norms

    seen = []
    real = norms._np_group_norm

    def spy(x, *args, **kwargs):
        seen.append(x)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(norms, "_np_group_norm", spy)
    x = _data((2, 4, 3, 5), gen, torch.float32).contiguous(memory_format=torch.channels_last)
    for t in (x, x.to(torch.bfloat16)):
        bt.group_norm(t, 2, backend="numpy")
        assert seen[-1].__array_interface__["data"][0] == t.data_ptr()
    rm, rv = torch.zeros(4), torch.ones(4)
    ptrs = rm.data_ptr(), rv.data_ptr()
    bt.instance_norm(x, rm, rv, backend="numpy")
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs and not torch.equal(rm, torch.zeros(4))


@pytest.mark.parametrize("norm_backend", BACKENDS)
def test_instance_norm_with_running_statistics_in_eval_matches_torch(norm_backend, gen):
    """use_input_stats=False normalizes with the running statistics (batch
    norm inference), gradients included, and leaves them unchanged."""
    x = _data((3, 4, 5, 2), gen).requires_grad_()
    rm, rv = torch.randn(4, generator=gen, dtype=torch.float64), _param(4, gen)
    w, b = _param(4, gen).requires_grad_(), torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    before = rm.clone(), rv.clone()
    y = bt.instance_norm(x, rm, rv, w, b, use_input_stats=False, backend=norm_backend)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yr = F.instance_norm(xr, rm.clone(), rv.clone(), wr, br, use_input_stats=False)
    _close(y, yr, torch.float64, "y")
    dy = _data(x.shape, gen, mean=0.2)
    for g, r in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(yr, (xr, wr, br), dy)):
        _close(g, r, torch.float64, "grad")
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    with pytest.raises(ValueError, match="running_mean and running_var"):
        bt.instance_norm(x, None, None, use_input_stats=False, backend=norm_backend)


def test_bad_input_raises_bnkernels_errors():
    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="num_groups"):
        bt.group_norm(x, 4, backend="numpy")
    with pytest.raises(ValueError, match="trailing dimensions"):
        bt.layer_norm(x, (6,), backend="numpy")
    rm, rv = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        bt.instance_norm(torch.randn(2, 6, 1), rm, rv, backend="numpy")
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))


# --- modules -----------------------------------------------------------------

MODULES = [
    (nn.LayerNorm, bt.LayerNorm, ((5, 7),), [dict(), dict(elementwise_affine=False), dict(bias=False),
                                             dict(eps=1e-3)], (3, 4, 5, 7)),
    (nn.LayerNorm, bt.LayerNorm, (17,), [dict()], (1, 17)),
    (nn.RMSNorm, bt.RMSNorm, ((5, 7),), [dict(), dict(eps=1e-4), dict(elementwise_affine=False)], (3, 4, 5, 7)),
    (nn.GroupNorm, bt.GroupNorm, (3, 15), [dict(), dict(affine=False), dict(bias=False), dict(eps=1e-3)],
     (4, 15, 3, 2)),
    (nn.GroupNorm, bt.GroupNorm, (13, 13), [dict()], (2, 13, 5)),
    (nn.InstanceNorm1d, bt.InstanceNorm1d, (5,), None, (3, 5, 17)),
    (nn.InstanceNorm1d, bt.InstanceNorm1d, (5,), None, (5, 17)),  # unbatched
    (nn.InstanceNorm2d, bt.InstanceNorm2d, (7,), None, (2, 7, 3, 5)),
    (nn.InstanceNorm2d, bt.InstanceNorm2d, (7,), None, (7, 3, 5)),  # unbatched
    (nn.InstanceNorm3d, bt.InstanceNorm3d, (3,), None, (2, 3, 2, 3, 2)),
]
INSTANCE_OPTIONS = [dict(), dict(affine=True), dict(affine=True, bias=False), dict(track_running_stats=True),
                    dict(affine=True, track_running_stats=True, momentum=None),
                    dict(track_running_stats=True, momentum=0.5, eps=1e-3)]
MODULE_CASES = [pytest.param(ref, cls, args, opt, shape, id=f"{ref.__name__}-{'x'.join(map(str, shape))}-{opt}")
                for ref, cls, args, options, shape in MODULES for opt in (options or INSTANCE_OPTIONS)]


@pytest.mark.parametrize("norm_backend", BACKENDS)
@pytest.mark.parametrize("torch_cls,cls,args,options,shape", MODULE_CASES)
def test_module_matches_torch_layer_step_by_step(torch_cls, cls, args, options, shape, norm_backend):
    """Same state_dict keys; after loading torch's state, training steps
    then eval give torch's outputs, gradients and buffers (float64), and
    torch's layer loads ours back."""
    torch.manual_seed(0)
    ref = torch_cls(*args, **options, dtype=torch.float64)
    mine = cls(*args, **options, dtype=torch.float64)
    mine.backend = norm_backend
    assert isinstance(mine, torch_cls) and type(mine).backend == "auto"
    assert list(mine.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    mine.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(3)
    for mode in ("train", "train", "eval"):
        ref.train(mode == "train")
        mine.train(mode == "train")
        x = _data(shape, gen)
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ym = ref(xr), mine(xm)
        _close(ym, yr, torch.float64, f"{mode} y")
        dy = _data(shape, gen, mean=0.3)
        yr.backward(dy)
        ym.backward(dy)
        _close(xm.grad, xr.grad, torch.float64, f"{mode} dx")
        for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
            _close(q.grad, p.grad, torch.float64, f"{mode} {name}.grad")
        for name, buf in ref.named_buffers():
            _close(dict(mine.named_buffers())[name], buf, torch.float64, f"{mode} {name}")
    torch_cls(*args, **options, dtype=torch.float64).load_state_dict(mine.state_dict())


@pytest.mark.parametrize("cls,torch_cls", [(bt.GroupNorm, nn.GroupNorm), (bt.InstanceNorm2d, nn.InstanceNorm2d)])
def test_channels_last_module_keeps_its_format(cls, torch_cls, gen):
    args = (2, 6) if cls is bt.GroupNorm else (6,)
    mine, ref = cls(*args), torch_cls(*args)
    mine.backend = "numpy"
    x = _data((3, 6, 5, 4), gen, torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = mine(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, ref(x), torch.float32, "y")
    y.sum().backward()  # (a stride-0 expanded gradient)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("module", [bt.LayerNorm(4), bt.RMSNorm(4), bt.GroupNorm(2, 4), bt.InstanceNorm1d(4),
                                    bt.InstanceNorm1d(4, track_running_stats=True).eval()], ids=repr)
def test_modules_run_on_bnkernels(module):
    """forward is bnkernels' (its backend is used: an unknown one raises)."""
    module.backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        module(torch.randn(2, 4, 4))


def test_instance_norm_module_checks_its_input_as_torch():
    m = bt.InstanceNorm2d(4, affine=True)
    with pytest.raises(ValueError, match="expected 3D or 4D input"):
        m(torch.randn(2, 4))
    with pytest.raises(ValueError, match="to match num_features"):
        m(torch.randn(2, 5, 3, 3))
    m = bt.InstanceNorm1d(4)
    m.backend = "numpy"
    with pytest.warns(UserWarning, match="does not match num_features"):
        m(torch.randn(2, 5, 3))


def test_convert_keeps_the_same_tensors_keys_and_options():
    torch.manual_seed(0)
    tree = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8, eps=1e-3, bias=False), nn.RMSNorm(8, eps=1e-4),
                         nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4, affine=False), nn.InstanceNorm1d(4),
                         nn.InstanceNorm1d(4, affine=True, track_running_stats=True, momentum=0.2),
                         nn.BatchNorm1d(4))
    tree[6].eval()
    keys = list(tree.state_dict())
    tensors = {k: v for k, v in tree.state_dict(keep_vars=True).items()}
    opt = torch.optim.SGD(tree.parameters(), lr=0.1)
    assert bt.convert(tree, backend="numpy") is tree
    assert [type(m) for m in tree[1:]] == [bt.LayerNorm, bt.RMSNorm, nn.Unflatten, bt.GroupNorm,
                                           bt.InstanceNorm1d, bt.InstanceNorm1d, bt.BatchNorm1d]
    assert list(tree.state_dict()) == keys
    for k, v in tree.state_dict(keep_vars=True).items():
        assert v is tensors[k], k
    assert tree[1].bias is None and tree[1].eps == 1e-3 and tree[1].normalized_shape == (8,)
    assert tree[2].eps == 1e-4 and tree[4].weight is None and tree[4].num_groups == 2
    assert tree[6].momentum == 0.2 and tree[6].track_running_stats and not tree[6].training
    assert all(m.backend == "numpy" for m in tree[1:] if hasattr(m, "backend"))
    before = tree[1].weight.detach().clone()
    y = tree(torch.randn(5, 3) * 2 + 1)
    (y * torch.randn(y.shape)).sum().backward()
    opt.step()  # the optimizer made before convert updates the same parameters
    assert not torch.equal(tree[1].weight, before)
    assert type(bt.convert(nn.LayerNorm(3))) is bt.LayerNorm  # the root itself


def test_convert_leaves_subclasses_alone():
    class MyNorm(nn.LayerNorm):
        pass

    m = MyNorm(4)
    assert bt.convert(m) is m


def _small_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3), nn.InstanceNorm2d(6, affine=True), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 5 * 5, 16), nn.LayerNorm(16), nn.RMSNorm(16), nn.Linear(16, 3))


@pytest.mark.parametrize("norm_backend", BACKENDS)
def test_converted_model_trains_to_torchs_losses(norm_backend):
    ref = _small_model()
    mine = bt.convert(copy.deepcopy(ref), backend=norm_backend)
    assert sum(isinstance(m, (bt.GroupNorm, bt.LayerNorm, bt.RMSNorm, bt.InstanceNorm2d))
               for m in mine.modules()) == 4
    opt_r, opt_m = torch.optim.SGD(ref.parameters(), lr=0.05), torch.optim.SGD(mine.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        x = torch.randn(8, 3, 7, 7, generator=gen) * 3 + 1
        target = torch.randint(0, 3, (8,), generator=gen)
        losses = []
        for model, opt in ((ref, opt_r), (mine, opt_m)):
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * (1 + abs(losses[0])), (step, losses)
    for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
        _close(q, p, torch.float32, name)


# torch's inductor itself touches torch.jit.script_method while compiling (torch 2.13); nothing of bnkernels does.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_torch_compile_fullgraph_model_trains_like_eager(compiler, gen):
    """Every drop-in compiled with fullgraph=True (the custom operators):
    torch's outputs, gradients and running statistics, step by step."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.RMSNorm(12), nn.Unflatten(1, (4, 3)),
                        nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True, track_running_stats=True))
    model = bt.convert(copy.deepcopy(ref), backend="numpy")
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    for _ in range(2):
        x = _data((6, 5), gen, torch.float32)
        y, yr = compiled(x), ref(x)
        _close(y, yr, torch.float32, "y")
        y.square().mean().backward()
        yr.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        _close(q.grad, p.grad, torch.float32, f"{name}.grad")
    for name, buf in ref.named_buffers():
        _close(dict(model.named_buffers())[name], buf, torch.float32, name)
    model.eval()
    ref.eval()
    x = _data((3, 5), gen, torch.float32)
    _close(compiled(x), ref(x), torch.float32, "eval y")


OPCHECK = [("layer", (3, 4, 5), (4, 5), 0), ("rms", (3, 7), (7,), 0), ("group", (2, 6, 3, 2), (), 3),
           ("instance", (2, 3, 5), (), 0)]


@pytest.mark.parametrize("kind,shape,nshape,groups", OPCHECK, ids=[c[0] for c in OPCHECK])
def test_opcheck(kind, shape, nshape, groups, gen):
    """torch.library.opcheck: schema, fake kernel and autograd registration
    of bnkernels::norm (the backward operator with it)."""
    from bnkernels.torch import norms

    x = _data(shape, gen).requires_grad_()
    pshape = nshape or shape[1:2]
    w = _param(pshape, gen).requires_grad_()
    b = None if kind == "rms" else torch.randn(pshape, generator=gen, dtype=torch.float64).requires_grad_()
    eps = None if kind == "rms" else 1e-5
    torch.library.opcheck(norms.norm_op, (kind, x, w, b, list(nshape), groups, eps, "numpy"))
    if kind == "group":
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.library.opcheck(norms.norm_op, (kind, xc, None, None, [], groups, 1e-5, "numpy"))
