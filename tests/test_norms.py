"""Layer, RMS, group and instance norm (``bnkernels.layer_norm`` ...) on
every CPU backend that has the norm-family members, against the float64
references (``bnkernels.reference``) and, where torch is installed, torch's
own functions and autograd."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkernels as bk
from bnkernels import reference as ref
from bnkernels.backends import resolve
from helpers import assert_close, make_input, strided

DTYPES = ["float16", "float32", "float64"]


def _has_norms(name: str) -> bool:
    try:
        return hasattr(resolve(name), "norm_forward")
    except Exception:  # not installed here
        return False


@pytest.fixture(params=["numpy", "numba"])
def norm_backend(request):
    if not _has_norms(request.param):
        pytest.skip(f"the {request.param} backend has no norm-family kernels here")
    return request.param


def _params(shape, rng, bias=True):
    w = rng.uniform(0.5, 1.5, shape).astype(np.float32) * rng.choice([-1, 1], shape).astype(np.float32)
    return w, (rng.standard_normal(shape).astype(np.float32) if bias else None)


def _scale(a):
    return float(np.abs(a).max(initial=0)) + 1


# --- layer norm and RMS norm ----------------------------------------------------

LAYER_CASES = [((4, 17), (17,)), ((3, 5, 16), (16,)), ((2, 3, 15), (3, 15)), ((1, 129), 129), ((7, 1), (1,)),
               ((2, 3, 127), (127,)), ((0, 8), (8,))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized", LAYER_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_forward_and_backward(norm_backend, shape, normalized, dtype, affine, rng):
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5)
    pshape = (normalized,) if isinstance(normalized, int) else normalized
    w, b = _params(pshape, rng) if affine else (None, None)
    y, saved = bk.layer_norm(x, normalized, w, b, backend=norm_backend, return_saved=True)
    ry, rmean, rinv = ref.reference_layer_norm(x, normalized, w, b)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert saved.mean.shape == rmean.shape and saved.mean.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_close(y, ry, dtype, "y", scale=_scale(ry))
    assert_close(saved.mean, rmean, dtype, "saved.mean", scale=_scale(rmean))
    assert_close(saved.invstd, rinv, dtype, "saved.invstd", scale=_scale(rinv))
    dx, dw, db = bk.layer_norm_backward(dy, x, saved.mean, saved.invstd, normalized, w, backend=norm_backend)
    rdx, rdw, rdb = ref.reference_layer_norm_backward(dy, x, saved.mean, saved.invstd, normalized, w)
    assert dx.dtype == x.dtype and dw.shape == db.shape == pshape
    assert_close(dx, rdx, dtype, "dx", scale=_scale(rdx))
    assert_close(dw, rdw, dtype, "dweight", scale=_scale(rdw))
    assert_close(db, rdb, dtype, "dbias", scale=_scale(rdb))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized", LAYER_CASES)
def test_rms_norm_forward_and_backward(norm_backend, shape, normalized, dtype, rng):
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5)
    pshape = (normalized,) if isinstance(normalized, int) else normalized
    w, _ = _params(pshape, rng, bias=False)
    y, saved = bk.rms_norm(x, normalized, w, backend=norm_backend, return_saved=True)
    eps = float(np.finfo(dtype).eps)  # None: torch's default, the dtype's machine epsilon
    ry, _, rinv = ref.reference_layer_norm(x, normalized, w, None, eps, rms=True)
    assert_close(y, ry, dtype, "y", scale=_scale(ry))
    assert_close(saved.invrms, rinv, dtype, "saved.invrms", scale=_scale(rinv))
    dx, dw = bk.rms_norm_backward(dy, x, saved.invrms, normalized, w, backend=norm_backend)
    rdx, rdw, _ = ref.reference_layer_norm_backward(dy, x, None, saved.invrms, normalized, w, rms=True)
    assert_close(dx, rdx, dtype, "dx", scale=_scale(rdx))
    assert_close(dw, rdw, dtype, "dweight", scale=_scale(rdw))


def test_layer_norm_is_exact_far_from_zero(norm_backend, rng):
    """float32 rows of 1e4 + randn: E[x^2] - E[x]^2 loses every digit of
    the variance there; the two-pass statistics keep y within 1e-4."""
    x = (1e4 + rng.standard_normal((64, 1024))).astype(np.float32)
    y = bk.layer_norm(x, 1024, backend=norm_backend)
    ry = ref.reference_layer_norm(x, 1024)[0]
    assert np.abs(y - ry).max() < 1e-4
    x64 = x.astype(np.float64)  # what the textbook formula gets, in float32 as torch's naive kernels would
    naive_var = (x * x).mean(axis=1, dtype=np.float32) - x.mean(axis=1, dtype=np.float32) ** 2
    assert np.abs(naive_var - x64.var(axis=1)).max() > 1e-1  # (the failure the exact statistics avoid)


# --- group norm and instance norm ---------------------------------------------------

GROUP_CASES = [((2, 6, 4, 5), 3), ((3, 4, 17), 2), ((1, 8, 3, 3), 8), ((2, 5, 7), 1), ((4, 16, 1, 1), 4),
               ((0, 6, 2, 2), 3), ((2, 4), 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", GROUP_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_group_norm_forward_and_backward(norm_backend, shape, groups, dtype, layout, rng):
    x = make_input(shape, dtype, rng)
    if layout == "channels_last" and x.ndim == 4:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "strided":
        x = strided(x, rng)
    dy = make_input(shape, dtype, rng, mean=0.5)
    w, b = _params((shape[1],), rng)
    y, saved = bk.group_norm(x, groups, w, b, backend=norm_backend, return_saved=True)
    ry, rmean, rinv = ref.reference_group_norm(x, groups, w, b)
    assert saved.mean.shape == (shape[0], groups)
    assert_close(y, ry, dtype, "y", scale=_scale(ry))
    assert_close(saved.invstd, rinv, dtype, "saved.invstd", scale=_scale(rinv))
    dx, dw, db = bk.group_norm_backward(dy, x, saved.mean, saved.invstd, groups, w, backend=norm_backend)
    rdx, rdw, rdb = ref.reference_group_norm_backward(dy, x, saved.mean, saved.invstd, groups, w)
    assert_close(dx, rdx, dtype, "dx", scale=_scale(rdx))
    assert_close(dw, rdw, dtype, "dweight", scale=_scale(rdw))
    assert_close(db, rdb, dtype, "dbias", scale=_scale(rdb))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 2, 17), (1, 4, 2, 2, 2)])
def test_instance_norm_with_running_statistics(norm_backend, shape, dtype, rng):
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5)
    C = shape[1]
    w, b = _params((C,), rng)
    rm, rv = rng.uniform(-1, 1, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y, saved = bk.instance_norm(x, w, b, running_mean=rm, running_var=rv, momentum=0.3, backend=norm_backend,
                                return_saved=True)
    ry, rmean, rinv, rrm, rrv = ref.reference_instance_norm(x, w, b, 1e-5, rm0, rv0, momentum=0.3)
    assert saved.mean.shape == (shape[0], C)
    assert_close(y, ry, dtype, "y", scale=_scale(ry))
    assert_close(rm, rrm, np.float32, "running_mean", scale=_scale(rrm))
    assert_close(rv, rrv, np.float32, "running_var", scale=_scale(rrv))
    dx, dw, db = bk.instance_norm_backward(dy, x, saved.mean, saved.invstd, w, backend=norm_backend)
    rdx, rdw, rdb = ref.reference_instance_norm_backward(dy, x, saved.mean, saved.invstd, w)
    assert_close(dx, rdx, dtype, "dx", scale=_scale(rdx))
    assert_close(dw, rdw, dtype, "dweight", scale=_scale(rdw))
    # with the running statistics: batch norm's inference (each sample alike)
    y2 = bk.instance_norm(x, w, b, running_mean=rm, running_var=rv, use_input_stats=False, backend=norm_backend)
    ry2 = ref.reference_forward(x, w, b, rm, rv, training=False)[0]
    assert_close(y2, ry2, dtype, "y with running statistics", scale=_scale(ry2))


# --- out=, in place, poisoned outputs ----------------------------------------------------

@pytest.mark.parametrize("op", ["layer", "rms", "group", "instance"])
@pytest.mark.parametrize("where", ["out", "in place", "strided out"])
def test_out_and_in_place(norm_backend, op, where, rng):
    x = make_input((4, 6, 10), "float32", rng)
    run = {"layer": lambda a, **kw: bk.layer_norm(a, 10, backend=norm_backend, **kw),
           "rms": lambda a, **kw: bk.rms_norm(a, 10, backend=norm_backend, **kw),
           "group": lambda a, **kw: bk.group_norm(a, 3, backend=norm_backend, **kw),
           "instance": lambda a, **kw: bk.instance_norm(a, backend=norm_backend, **kw)}[op]
    expected = run(x.copy())
    if where == "out":
        out = np.full_like(x, np.nan)
    elif where == "strided out":
        out = np.full((4, 6, 20), np.nan, np.float32)[:, :, ::2]
    else:
        out = x
    got = run(x, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)


# --- bad input: a clear error naming the argument, nothing written ---------------------------

def test_bad_arguments_are_named(rng):
    x = make_input((2, 6, 5), "float32", rng)
    cases = [
        (lambda: bk.group_norm(x, 4), ValueError, "num_groups=4 must divide"),
        (lambda: bk.group_norm(x, 0), ValueError, "num_groups must be positive"),
        (lambda: bk.group_norm(x, True), TypeError, "num_groups must be an int"),
        (lambda: bk.layer_norm(x, (6,)), ValueError, "normalized_shape"),
        (lambda: bk.layer_norm(x, (2, 6, 5, 1)), ValueError, "trailing dimensions"),
        (lambda: bk.layer_norm(x, "5"), TypeError, "normalized_shape"),
        (lambda: bk.layer_norm(x, 5, weight=np.ones(4)), ValueError, "weight must have shape (5,)"),
        (lambda: bk.layer_norm(x, (6, 5), bias=np.ones(30)), ValueError, "bias must have shape (6, 5)"),
        (lambda: bk.layer_norm(x, 5, eps=-1.0), ValueError, "eps"),
        (lambda: bk.rms_norm(x, 5, eps=float("nan")), ValueError, "eps"),
        (lambda: bk.layer_norm(x.astype(np.int32), 5), TypeError, "cast integer"),
        (lambda: bk.group_norm(x, 2, weight=np.ones(5)), ValueError, "weight must have shape (6,)"),
        (lambda: bk.layer_norm_backward(x, x, np.zeros(2), np.ones((2, 6)), 5), ValueError, "saved_mean"),
        (lambda: bk.rms_norm_backward(x, x, None, 5), ValueError, "saved_invrms"),
        (lambda: bk.instance_norm(x[:, :, :1]), ValueError, "more than 1 spatial element"),
        (lambda: bk.instance_norm(x, return_saved=True, use_input_stats=False, running_mean=np.zeros(6),
                                  running_var=np.ones(6)), ValueError, "return_saved"),
        (lambda: bk.layer_norm(x, 5, out=np.empty((2, 6, 4), np.float32)), ValueError, "out must have the shape"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_a_refused_call_writes_nothing(rng):
    x = make_input((2, 6, 5), "float32", rng)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError):
        bk.instance_norm(x, np.ones(5), running_mean=rm, running_var=rv, out=out)
    with pytest.raises(ValueError, match="out overlaps"):
        bk.layer_norm(x, 5, out=x[:, ::-1], backend="numpy")
    assert (rm == 0).all() and (rv == 1).all() and (out == 7).all()


# --- hypothesis: any shape ------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(0, 5), max_size=2), features=st.lists(st.integers(1, 9), min_size=1, max_size=2),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
def test_layer_norm_any_shape(lead, features, dtype, seed):
    rng = np.random.default_rng(seed)
    x = make_input((*lead, *features), dtype, rng)
    for backend in [b for b in ("numpy", "numba") if _has_norms(b)]:
        y, saved = bk.layer_norm(x, tuple(features), backend=backend, return_saved=True)
        assert_close(y, ref.reference_layer_norm(x, tuple(features))[0], dtype, f"y ({backend})")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 3), groups=st.integers(1, 4), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 5), max_size=2), seed=st.integers(0, 2**16))
def test_group_norm_any_shape(n, groups, per_group, spatial, seed):
    rng = np.random.default_rng(seed)
    x = make_input((n, groups * per_group, *spatial), "float64", rng)
    dy = make_input(x.shape, "float64", rng)
    for backend in [b for b in ("numpy", "numba") if _has_norms(b)]:
        y, s = bk.group_norm(x, groups, backend=backend, return_saved=True)
        assert_close(y, ref.reference_group_norm(x, groups)[0], "float64", f"y ({backend})")
        dx = bk.group_norm_backward(dy, x, s.mean, s.invstd, groups, backend=backend)[0]
        assert_close(dx, ref.reference_group_norm_backward(dy, x, s.mean, s.invstd, groups)[0], "float64", "dx")


# --- against torch -------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("op", ["layer", "rms", "group", "instance"])
def test_against_torch_and_its_autograd(norm_backend, op, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = make_input((3, 6, 5, 4), "float64", rng)
    dy = make_input(x.shape, "float64", rng)
    C = 6
    pshape = {"layer": (5, 4), "rms": (5, 4), "group": (C,), "instance": (C,)}[op]
    w, b = (rng.uniform(0.5, 1.5, pshape), rng.standard_normal(pshape))
    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    if op == "layer":
        yt = F.layer_norm(xt, (5, 4), wt, bt)
        y, s = bk.layer_norm(x, (5, 4), w, b, backend=norm_backend, return_saved=True)
        grads = bk.layer_norm_backward(dy, x, s.mean, s.invstd, (5, 4), w, backend=norm_backend)
    elif op == "rms":
        yt = F.rms_norm(xt, (5, 4), wt) + 0 * bt.sum()
        y, s = bk.rms_norm(x, (5, 4), w, backend=norm_backend, return_saved=True)
        grads = (*bk.rms_norm_backward(dy, x, s.invrms, (5, 4), w, backend=norm_backend), np.zeros(pshape))
    elif op == "group":
        yt = F.group_norm(xt, 3, wt, bt)
        y, s = bk.group_norm(x, 3, w, b, backend=norm_backend, return_saved=True)
        grads = bk.group_norm_backward(dy, x, s.mean, s.invstd, 3, w, backend=norm_backend)
    else:
        yt = F.instance_norm(xt, weight=wt, bias=bt)
        y, s = bk.instance_norm(x, w, b, backend=norm_backend, return_saved=True)
        grads = bk.instance_norm_backward(dy, x, s.mean, s.invstd, w, backend=norm_backend)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    for got, want, name in zip(grads, (xt.grad, wt.grad, bt.grad), ("dx", "dweight", "dbias")):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-9, err_msg=name)
