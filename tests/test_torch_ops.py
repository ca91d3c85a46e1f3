"""``bnkernels.torch``: the custom operators and the differentiable
``batch_norm`` against ``torch.nn.functional.batch_norm`` and its autograd
(in float64, the comparison point), ``torch.library.opcheck``,
``torch.autograd.gradcheck`` and ``torch.compile(fullgraph=True)``.

Data have a non-zero mean; shapes include one and two values per channel,
prime and boundary channel counts; inputs contiguous, channels_last and
strided (a slice)."""
import numpy as np
import pytest

from helpers import TOLERANCES, bfloat16

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bnkernels.torch")
from bnkernels.torch import ops  # noqa: E402

F = torch.nn.functional
pytestmark = pytest.mark.torch

SHAPES = [(2, 5), (16, 3), (7, 4, 9), (3, 17, 5, 4), (2, 3, 4, 3, 5), (1, 16, 1, 2), (5, 127, 1, 1)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NP_TOL = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _tol(dtype):
    return TOLERANCES[np.dtype(bfloat16())] if dtype == torch.bfloat16 else TOLERANCES[np.dtype(NP_TOL[dtype])]


def _close(actual, expected, dtype, what, scale=None):
    tol = _tol(dtype)
    expected = expected.detach().double()
    scale = float(expected.abs().max()) + 1 if scale is None else scale
    err = (actual.detach().double() - expected).abs()
    bound = tol["atol"] * scale + tol["rtol"] * expected.abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{what} ({dtype}): {int(bad.sum())} of {bad.numel()} off, worst {float(err.max()):.3g}"


def _data(shape, dtype, gen, mean=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + mean).to(dtype)


def _params(C, gen):
    return (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).float(), \
        torch.randn(C, generator=gen, dtype=torch.float64).float()


@pytest.fixture
def gen(request):
    import zlib
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _layouts(x):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    wide = torch.cat([x, x], dim=0)[::2]  # a strided view (every other sample)
    yield "strided", wide


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_and_its_gradients_match_torch_float64(shape, dtype, training, affine, gen):
    """y, the running statistics and dx, dweight, dbias against torch's own
    batch norm and autograd in float64, in every memory layout; y keeps
    the input's dtype and strides."""
    C = shape[1]
    x0 = _data(shape, dtype, gen)
    w, b = _params(C, gen) if affine else (None, None)
    rm0, rv0 = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    dy0 = _data(shape, dtype, gen, mean=0.3)
    for layout, x in _layouts(x0):
        xr = x.detach().double().requires_grad_()
        wr, br = (w.double().requires_grad_(), b.double().requires_grad_()) if affine else (None, None)
        rmr, rvr = rm0.double(), rv0.double()
        yr = F.batch_norm(xr, rmr, rvr, wr, br, training=training, momentum=0.1, eps=1e-5)
        xa = x.detach().clone().requires_grad_() if layout != "strided" else x.detach().requires_grad_()
        wa, ba = (w.clone().requires_grad_(), b.clone().requires_grad_()) if affine else (None, None)
        rm, rv = rm0.clone(), rv0.clone()
        y = bt.batch_norm(xa, rm, rv, wa, ba, training=training, momentum=0.1, eps=1e-5)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.stride() == torch.empty_like(xa).stride(), layout
        _close(y, yr, dtype, f"y {layout}")
        _close(rm, rmr, torch.float32, f"running_mean {layout}")
        _close(rv, rvr, torch.float32, f"running_var {layout}")
        dy = dy0 if layout != "channels_last" else dy0.contiguous(memory_format=torch.channels_last)
        yr.backward(dy.double())
        y.backward(dy)
        # dx cancels (two values per channel: ~0 up to eps): its error is
        # that of its terms, of the size |dy| * gamma * invstd
        dims = [d for d in range(x.dim()) if d != 1]
        var = xr.detach().var(dim=dims, unbiased=False) if training else rvr
        gain = (var + 1e-5).rsqrt().max() * (w.abs().max() if affine else 1)
        _close(xa.grad, xr.grad, dtype, f"dx {layout}", scale=float(dy.double().abs().max() * gain) + 1)
        assert xa.grad.dtype == dtype
        if affine:
            _close(wa.grad, wr.grad, torch.float32, f"dweight {layout}")
            _close(ba.grad, br.grad, torch.float32, f"dbias {layout}")
            assert wa.grad.dtype == ba.grad.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training, gen):
    x = _data((4, 3, 5), torch.float64, gen).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(3, generator=gen, dtype=torch.float64), torch.rand(3, generator=gen, dtype=torch.float64) + 1
    assert torch.autograd.gradcheck(lambda x, w, b: bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training),
                                    (x, w, b))
    assert torch.autograd.gradcheck(lambda x: bt.batch_norm(x, rm.clone(), rv.clone(), None, None, training=training),
                                    (x,))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_both_operators(training, gen):
    """Schemas, fake kernels (shapes, dtypes, strides), autograd
    registration and AOT dispatch, by torch's own checker."""
    x = _data((4, 3, 5, 2), torch.float32, gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = (p.requires_grad_() for p in _params(3, gen))
    args = (x, w, b, torch.zeros(3), torch.ones(3), training, 0.1, 1e-5, 1, "auto")
    torch.library.opcheck(ops.batch_norm_op, args)
    y, mean, invstd, _, _ = ops.batch_norm_op(*args)
    # (the backward operator has no autograd formula of its own: no double backward)
    torch.library.opcheck(ops.batch_norm_backward_op,
                          (torch.randn_like(y), x.detach(), w.detach(), mean.detach(), invstd.detach(), training, 1,
                           "auto"))


# torch's inductor itself touches torch.jit.script_method while compiling
# (torch 2.13); nothing of bnkernels does.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_model_trains_like_eager(gen):
    """A model with the drop-in compiled with fullgraph=True (inductor):
    the same outputs, gradients and running statistics as eager torch."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
    import copy
    model = bt.convert(copy.deepcopy(ref))
    compiled = torch.compile(model, fullgraph=True)
    x = _data((8, 3, 7, 7), torch.float32, gen)
    for _ in range(2):
        y, yr = compiled(x), ref(x)
        _close(y, yr, torch.float32, "y")
        y.square().mean().backward()
        yr.square().mean().backward()
    _close(model[0].weight.grad, ref[0].weight.grad, torch.float32, "conv weight grad")
    _close(model[1].weight.grad, ref[1].weight.grad, torch.float32, "bn weight grad")
    _close(model[1].running_var, ref[1].running_var, torch.float32, "running_var")
    assert int(model[1].num_batches_tracked) == 2


def test_cpu_tensors_reach_the_kernels_without_a_copy(gen):
    x = _data((4, 3, 5, 5), torch.float32, gen).contiguous(memory_format=torch.channels_last)
    for t in (x, x.to(torch.bfloat16)):
        view = ops._to_kernel(t)
        assert view.__array_interface__["data"][0] == t.data_ptr()
        assert view.strides == tuple(s * t.element_size() for s in t.stride())


def test_empty_batch_matches_torch():
    x = torch.empty(0, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = bt.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_bad_input_raises_and_changes_nothing(gen):
    x = _data((4, 3, 5), torch.float32, gen)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="running_mean"):
        bt.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        bt.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="value"):  # one value per channel cannot be normalized in training
        bt.batch_norm(x[:1, :, :1], rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("cpu_backend", ["numpy", "numba"])
def test_backend_is_chosen_per_call(cpu_backend, gen):
    if cpu_backend == "numba":
        pytest.importorskip("numba")
    x = _data((6, 3, 4), torch.float64, gen).requires_grad_()
    y = bt.batch_norm(x, None, None, training=True, backend=cpu_backend)
    yr = F.batch_norm(x, None, None, training=True)
    _close(y, yr, torch.float64, "y")
    y.sum().backward()


@pytest.mark.gpu
def test_cuda_tensors_run_on_a_gpu_backend_on_the_current_stream(gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = _data((8, 16, 9, 9), torch.float32, gen).cuda().contiguous(memory_format=torch.channels_last)
    w, b = (p.cuda().requires_grad_() for p in _params(16, gen))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xa = x.clone().requires_grad_()
        rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
        y = bt.batch_norm(xa, rm, rv, w, b, training=True)
        y.square().sum().backward()
    stream.synchronize()
    xr = x.double().requires_grad_()
    wr, br = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    rmr, rvr = torch.zeros(16, device="cuda", dtype=torch.float64), torch.ones(16, device="cuda", dtype=torch.float64)
    yr = F.batch_norm(xr, rmr, rvr, wr, br, training=True)
    yr.square().sum().backward()
    assert y.is_cuda and y.is_contiguous(memory_format=torch.channels_last)
    _close(y.cpu(), yr.cpu(), torch.float32, "y")
    _close(xa.grad.cpu(), xr.grad.cpu(), torch.float32, "dx")
    _close(rv.cpu(), rvr.cpu(), torch.float32, "running_var")
