"""The numba backend's norm-family kernels (``backends/numba_norms``):
layer, RMS, group and instance norm forward and backward through the public
functions, against the NumPy backend (the reference implementation,
``numpy_norms``) and the float64 oracles of ``bnkernels.reference``, on
boundary shapes, every dtype, strided inputs, ``out=`` and in place, empty
inputs; the two-pass statistics' exactness and the backward's determinism
across thread counts."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

numba = pytest.importorskip("numba")
import bnkernels  # noqa: E402
from bnkernels import reference as ref  # noqa: E402
from bnkernels.backends import numba_backend as nb  # noqa: E402  (imports numba_norms at its end)
from bnkernels.backends import numba_norms as nn  # noqa: E402
from bnkernels.backends.interface import Affine, ChannelLayout  # noqa: E402
from helpers import assert_close, bfloat16, make_input, make_params, strided  # noqa: E402

KINDS = ["layer", "rms", "group", "instance"]


# --- the four norms behind one interface ----------------------------------------------

def _param_shape(kind, shape, arg):
    return tuple(arg) if kind in ("layer", "rms") else (shape[1],)


def forward(kind, x, w, b, arg, backend, out=None):
    """``(y, mean, invstd)`` of a norm through its public function (mean
    None for RMS norm)."""
    if kind == "layer":
        y, s = bnkernels.layer_norm(x, arg, w, b, backend=backend, return_saved=True, out=out)
    elif kind == "rms":
        y, s = bnkernels.rms_norm(x, arg, w, 1e-5, backend=backend, return_saved=True, out=out)
        return y, None, s.invrms
    elif kind == "group":
        y, s = bnkernels.group_norm(x, arg, w, b, backend=backend, return_saved=True, out=out)
    else:
        y, s = bnkernels.instance_norm(x, w, b, backend=backend, return_saved=True, out=out)
    return y, s.mean, s.invstd


def backward(kind, dy, x, mean, inv, w, arg, backend):
    """``(dx, dweight, dbias)`` (dbias None for RMS norm)."""
    if kind == "layer":
        return bnkernels.layer_norm_backward(dy, x, mean, inv, arg, w, backend=backend)
    if kind == "rms":
        return (*bnkernels.rms_norm_backward(dy, x, inv, arg, w, backend=backend), None)
    if kind == "group":
        return bnkernels.group_norm_backward(dy, x, mean, inv, arg, w, backend=backend)
    return bnkernels.instance_norm_backward(dy, x, mean, inv, w, backend=backend)


def reference_forward(kind, x, w, b, arg):
    if kind in ("layer", "rms"):
        return ref.reference_layer_norm(x, arg, w, None if kind == "rms" else b, 1e-5, rms=kind == "rms")
    if kind == "group":
        return ref.reference_group_norm(x, arg, w, b)
    return ref.reference_instance_norm(x, w, b)[:3]


def reference_backward(kind, dy, x, mean, inv, w, arg):
    if kind in ("layer", "rms"):
        return ref.reference_layer_norm_backward(dy, x, mean, inv, arg, w, rms=kind == "rms")
    if kind == "group":
        return ref.reference_group_norm_backward(dy, x, mean, inv, arg, w)
    return ref.reference_instance_norm_backward(dy, x, mean, inv, w)


def _scale(a):
    a = np.asarray(a, np.float64)
    return max(float(np.abs(a).max()), 1.0) if a.size else 1.0


def check_against_oracles(kind, shape, arg, dtype, rng, *, affine=True):
    """numba's forward and backward against the float64 reference and the
    NumPy backend; returns numba's results."""
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    pshape = _param_shape(kind, shape, arg)
    w, b = make_params(int(np.prod(pshape)), rng) if affine else (None, None)
    if affine:
        w, b = w.reshape(pshape), b.reshape(pshape)
    cdt = np.float64 if dtype == np.float64 else np.float32
    y, mean, inv = forward(kind, x, w, b, arg, "numba")
    assert y.dtype == x.dtype and y.shape == x.shape
    assert inv.dtype == cdt and (mean is None) == (kind == "rms")
    y_ref, mean_ref, inv_ref = reference_forward(kind, x, w, b, arg)
    assert_close(y, y_ref, dtype, "y", scale=_scale(y_ref))
    # statistics are float32 or float64, exact to their own dtype even for 16-bit data
    stat_dt = cdt
    assert_close(inv, inv_ref, stat_dt, "invstd", scale=_scale(inv_ref))
    if mean is not None:
        assert_close(mean, mean_ref, stat_dt, "mean", scale=_scale(mean_ref))
    y_np, mean_np, inv_np = forward(kind, x, w, b, arg, "numpy")
    assert_close(y, y_np.astype(np.float64), dtype, "y vs numpy", scale=_scale(y_np.astype(np.float64)))
    assert_close(inv, inv_np, stat_dt, "invstd vs numpy", scale=_scale(inv_np))

    dx, dw, db = backward(kind, dy, x, mean, inv, w, arg, "numba")
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dw.dtype == cdt and dw.shape == pshape
    rdx, rdw, rdb = reference_backward(kind, dy, x, mean, inv, w, arg)
    assert_close(dx, rdx, dtype, "dx", scale=_scale(rdx))
    assert_close(dw, rdw, stat_dt, "dweight", scale=_scale(rdw))
    ndx, ndw, ndb = backward(kind, dy, x, mean, inv, w, arg, "numpy")
    assert_close(dx, ndx.astype(np.float64), dtype, "dx vs numpy", scale=_scale(rdx))
    assert_close(dw, ndw, stat_dt, "dweight vs numpy", scale=_scale(rdw))
    if kind != "rms":
        assert db.dtype == cdt and db.shape == pshape
        assert_close(db, rdb, stat_dt, "dbias", scale=_scale(rdb))
        assert_close(db, ndb, stat_dt, "dbias vs numpy", scale=_scale(rdb))
    return y, mean, inv, dx, dw, db


def _dtype(name):
    return bfloat16() if name == "bfloat16" else np.dtype(name)


ALL_DTYPES = ["float16", "bfloat16", "float32", "float64"]

# (kind, shape, arg): arg is normalized_shape (layer, RMS) or num_groups (group)
FEATURES = [1, 15, 16, 17, 127, 129, 131]  # vector-width boundaries and a prime
ROW_CASES = [(kind, (G, F), (F,)) for kind in ("layer", "rms") for F in FEATURES for G in (1, 7, 300)]
CASES = [
    ("layer", (3, 4, 5, 6), (5, 6)),  # several normalized dimensions
    ("rms", (2, 3, 33), (3, 33)),
    ("group", (2, 6, 5, 7), 3),  # span 2, divisor 35
    ("group", (3, 8, 17), 4),
    ("group", (2, 12, 3, 5), 1),  # one group: a whole sample
    ("group", (2, 12, 3, 5), 12),  # a channel a group (instance norm)
    ("group", (5, 6), 3),  # no spatial axes: divisor 1
    ("group", (3, 4, 1, 1), 2),
    ("group", (1, 32, 129), 8),
    ("instance", (2, 3, 5, 7), None),
    ("instance", (1, 5, 17), None),
    ("instance", (3, 4, 2), None),
    ("instance", (7, 3, 131), None),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kind,shape,arg", ROW_CASES)
def test_layer_and_rms_rows(kind, shape, arg, dtype, rng):
    check_against_oracles(kind, shape, arg, _dtype(dtype), rng)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("kind,shape,arg", CASES)
def test_every_norm(kind, shape, arg, dtype, rng):
    check_against_oracles(kind, shape, arg, _dtype(dtype), rng)


@pytest.mark.parametrize("kind,shape,arg", [("layer", (7, 17), (17,)), ("rms", (5, 16), (16,)),
                                            ("group", (2, 6, 5), 3), ("instance", (2, 3, 9), None)])
def test_without_weights(kind, shape, arg, rng):
    for dtype in (np.float32, bfloat16()):
        check_against_oracles(kind, shape, arg, dtype, rng, affine=False)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), rows=st.integers(1, 9), channels=st.integers(1, 6),
       groups_idx=st.integers(0, 5), spatial=st.integers(2, 40), dtype=st.sampled_from(["float32", "float64"]),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes(kind, rows, channels, groups_idx, spatial, dtype, seed):
    rng = np.random.default_rng(seed)
    if kind in ("layer", "rms"):
        shape, arg = (rows, channels * spatial), (channels * spatial,)
    else:
        divisors = [g for g in range(1, channels + 1) if channels % g == 0]
        shape = (rows, channels, spatial)
        arg = divisors[groups_idx % len(divisors)] if kind == "group" else None
    check_against_oracles(kind, shape, arg, np.dtype(dtype), rng)


# --- weight dtypes, strides, out= -------------------------------------------------------

@pytest.mark.parametrize("wdtype", ["float16", "bfloat16", "float32", "float64"])
def test_weight_dtypes(wdtype, rng):
    x = make_input((9, 24), np.float32, rng)
    w, b = (p.astype(_dtype(wdtype)) for p in make_params(24, rng))
    for kind, arg in (("layer", (24,)), ("group", 4)):
        xx = x.reshape(9, 24) if kind == "layer" else x.reshape(3, 8, 9)
        pw, pb = (w, b) if kind == "layer" else (w[:8], b[:8])
        y, mean, inv = forward(kind, xx, pw, pb, arg, "numba")
        y_np, _, _ = forward(kind, xx, pw, pb, arg, "numpy")
        assert_close(y, y_np, np.float32, f"{kind} y, {wdtype} weights", scale=_scale(y_np))


@pytest.mark.parametrize("kind,shape,arg", [("layer", (6, 17), (17,)), ("rms", (3, 4, 16), (4, 16)),
                                            ("group", (2, 6, 5, 3), 2), ("instance", (2, 3, 7), None)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_strided_inputs_match_contiguous(kind, shape, arg, dtype, rng):
    dtype = _dtype(dtype)
    x, dy = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=0.0)
    pshape = _param_shape(kind, shape, arg)
    w, b = (p.reshape(pshape) for p in make_params(int(np.prod(pshape)), rng))
    y, mean, inv = forward(kind, x, w, b, arg, "numba")
    ys, means, invs = forward(kind, strided(x, rng), w, b, arg, "numba")
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_array_equal(invs, inv)
    dx, dw, db = backward(kind, dy, x, mean, inv, w, arg, "numba")
    dxs, dws, dbs = backward(kind, strided(dy, rng), strided(x, rng), mean, inv, w, arg, "numba")
    np.testing.assert_array_equal(dxs, dx)
    np.testing.assert_array_equal(dws, dw)
    if db is not None:
        np.testing.assert_array_equal(dbs, db)


def test_read_only_and_broadcast_inputs(rng):
    """Read-only arrays (a memory map opened "r", a frozen buffer) and a
    broadcast view (zero strides: copied) work as writable ones."""
    x = make_input((6, 16), np.float32, rng)
    dy = make_input((6, 16), np.float32, rng, mean=0.0)
    w, b = make_params(16, rng)
    y, mean, inv = forward("layer", x, w, b, (16,), "numba")
    grads = backward("layer", dy, x, mean, inv, w, (16,), "numba")
    frozen = [a.copy() for a in (x, dy, w, b, mean, inv)]
    for a in frozen:
        a.setflags(write=False)
    fx, fdy, fw, fb, fmean, finv = frozen
    np.testing.assert_array_equal(forward("layer", fx, fw, fb, (16,), "numba")[0], y)
    for got, want in zip(backward("layer", fdy, fx, fmean, finv, fw, (16,), "numba"), grads):
        np.testing.assert_array_equal(got, want)
    row = np.broadcast_to(x[0], (6, 16))
    y_row = forward("layer", row, w, b, (16,), "numba")[0]
    np.testing.assert_array_equal(y_row, np.broadcast_to(y_row[0], (6, 16)))
    assert_close(y_row, reference_forward("layer", row, w, b, (16,))[0], np.float32, "broadcast y", scale=4.0)


@pytest.mark.parametrize("kind,shape,arg", [("layer", (6, 17), (17,)), ("rms", (5, 33), (33,)),
                                            ("group", (2, 6, 5, 3), 3), ("instance", (2, 3, 7), None)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_out_and_in_place(kind, shape, arg, dtype, rng):
    dtype = _dtype(dtype)
    x = make_input(shape, dtype, rng)
    pshape = _param_shape(kind, shape, arg)
    w, b = (p.reshape(pshape) for p in make_params(int(np.prod(pshape)), rng))
    y, _, _ = forward(kind, x, w, b, arg, "numba")
    out = np.full(shape, np.nan, dtype)  # poisoned: every element must be written
    got, _, _ = forward(kind, x, w, b, arg, "numba", out=out)
    assert got is out
    np.testing.assert_array_equal(out, y)
    big = np.full(shape[:-1] + (2 * shape[-1],), np.nan, dtype)  # a strided out: copied into
    got, _, _ = forward(kind, x, w, b, arg, "numba", out=big[..., ::2])
    np.testing.assert_array_equal(big[..., ::2], y)
    assert np.isnan(big[..., 1::2].astype(np.float64)).all()
    xc = x.copy()
    got, _, _ = forward(kind, xc, w, b, arg, "numba", out=xc)
    assert got is xc
    np.testing.assert_array_equal(xc, y)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_backward_member_out_and_in_place(dtype, rng):
    """The backend member's ``out``: a poisoned buffer, and dy or x itself
    (each element is read before dx's is written)."""
    dtype = _dtype(dtype)
    for period, span, divisor, G in ((1, 19, 1, 6), (3, 2, 10, 6)):
        layout = ChannelLayout((1, G, span * divisor), 1, Affine(period * span, period, span, divisor))
        x = make_input(layout.shape, dtype, rng)
        dy = make_input(layout.shape, dtype, rng, mean=0.0)
        w = rng.uniform(0.5, 2, period * span).astype(np.float32)
        _, mean, inv = nn.norm_forward(x, layout, w, None, 1e-5, False)
        dx, dw, db = nn.norm_backward(dy, x, layout, mean, inv, w, False)
        out = np.full(layout.shape, np.nan, dtype)
        got = nn.norm_backward(dy, x, layout, mean, inv, w, False, out=out)
        assert got[0] is out
        np.testing.assert_array_equal(out, dx)
        dy_in = dy.copy()
        got = nn.norm_backward(dy_in, x, layout, mean, inv, w, False, out=dy_in)
        assert got[0] is dy_in
        x_in = x.copy()
        got_x = nn.norm_backward(dy, x_in, layout, mean, inv, w, False, out=x_in)
        for result in (got, got_x):
            np.testing.assert_array_equal(result[0], dx)
            np.testing.assert_array_equal(result[1], dw)
            np.testing.assert_array_equal(result[2], db)


def test_members_are_exported():
    assert nb.norm_forward is nn.norm_forward and nb.norm_backward is nn.norm_backward


def test_numba_norms_imports_first():
    """Imported before numba_backend (which imports it at its end), the
    module still loads, as the one numba_backend exports from."""
    code = ("import bnkernels.backends.numba_norms as m, bnkernels.backends.numba_backend as nb; "
            "assert nb.norm_forward is m.norm_forward and nb.norm_backward is m.norm_backward")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --- empty inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("kind,shape,arg", [("layer", (0, 5), (5,)), ("layer", (3, 0), (0,)),
                                            ("rms", (0, 4), (4,)), ("rms", (2, 3, 0), (3, 0)),
                                            ("group", (0, 4, 3), 2), ("group", (2, 4, 0), 2),
                                            ("instance", (0, 3, 5), None)])
def test_empty_inputs_match_numpy(kind, shape, arg, rng):
    """Empty inputs: zero mean, ``invstd = 1/sqrt(eps)`` (the statistics of
    empty rows), zero dweight/dbias; as the NumPy backend."""
    x = np.zeros(shape, np.float32)
    pshape = _param_shape(kind, shape, arg)
    w, b = np.ones(pshape, np.float32), np.zeros(pshape, np.float32)
    got = forward(kind, x, w, b, arg, "numba")
    gb = backward(kind, x, x, got[1], got[2], w, arg, "numba")
    rows = got[2].shape
    assert got[0].shape == shape and got[2].dtype == np.float32
    np.testing.assert_array_equal(got[2], np.full(rows, 1 / np.sqrt(1e-5), np.float32))
    if kind == "rms":
        assert got[1] is None and gb[2] is None
    else:
        np.testing.assert_array_equal(got[1], np.zeros(rows, np.float32))
        np.testing.assert_array_equal(gb[2], np.zeros(pshape, np.float32))
    assert gb[0].shape == shape
    np.testing.assert_array_equal(gb[1], np.zeros(pshape, np.float32))
    want = forward(kind, x, w, b, arg, "numpy")
    eb = backward(kind, x, x, want[1], want[2], w, arg, "numpy")
    for g, e in zip(got + gb, want + eb):
        if e is None:
            assert g is None
        else:
            assert g.shape == e.shape and g.dtype == e.dtype
            np.testing.assert_array_equal(g, e)


# --- accuracy, special values, determinism ---------------------------------------------

def test_two_pass_statistics_are_exact_far_from_zero(rng):
    """float32 rows of ``1e4 + randn``: where the one-pass variance
    ``E[x^2] - E[x]^2`` cancels (shown below in float32), the two-pass
    float64 statistics give y to 1e-4."""
    x = (1e4 + rng.standard_normal((64, 1000))).astype(np.float32)
    naive_var = (x * x).mean(axis=1, dtype=np.float32) - x.mean(axis=1, dtype=np.float32) ** 2
    true_var = x.astype(np.float64).var(axis=1)
    assert np.abs(naive_var - true_var).max() > 0.1, "the case must defeat the one-pass formula"
    for kind in ("layer", "group"):
        xx, arg = (x, (1000,)) if kind == "layer" else (x.reshape(32, 2, 1000), 1)
        y, mean, inv = forward(kind, xx, None, None, arg, "numba")
        y_ref, mean_ref, inv_ref = reference_forward(kind, xx, None, None, arg)
        assert np.abs(y.astype(np.float64) - y_ref).max() <= 1e-4, kind
        assert np.abs(inv.astype(np.float64) / inv_ref.reshape(inv.shape) - 1).max() <= 1e-6, kind


def test_special_values_match_numpy(rng):
    """A NaN or Inf poisons its own row only; eps=0 on a constant row gives
    NaN (0 * Inf), as the reference."""
    x = make_input((5, 19), np.float32, rng)
    x[1, 3], x[2, 7] = np.nan, np.inf
    x[3] = 2.5
    w, b = make_params(19, rng)
    for eps in (1e-5, 0.0):
        y = bnkernels.layer_norm(x, 19, w, b, eps, backend="numba")
        y_np = bnkernels.layer_norm(x, 19, w, b, eps, backend="numpy")
        np.testing.assert_allclose(y, y_np, rtol=2e-6, atol=2e-6, equal_nan=True)
        assert np.isfinite(y[[0, 4]]).all() and np.isnan(y[1]).all()


def _threads_available():
    return numba.config.NUMBA_NUM_THREADS >= 2


@pytest.mark.skipif(not _threads_available(), reason="needs NUMBA_NUM_THREADS >= 2")
@pytest.mark.parametrize("kind,shape,arg", [("layer", (512, 512), (512,)), ("rms", (300, 257), (257,)),
                                            ("group", (16, 32, 16, 16), 8), ("instance", (32, 32, 8, 8), None)])
def test_backward_is_deterministic_across_thread_counts(kind, shape, arg, rng):
    """Bitwise the same results on 1 and 2 threads. float64 data: float32
    results would round most summation-order differences away."""
    x = make_input(shape, np.float64, rng)
    dy = make_input(shape, np.float64, rng, mean=0.3)
    pshape = _param_shape(kind, shape, arg)
    w, b = (p.reshape(pshape) for p in make_params(int(np.prod(pshape)), rng))
    G = int(np.prod(shape[:-len(arg)])) if kind in ("layer", "rms") else shape[0] * (arg or shape[1])
    chunks = nn._grad_chunks(G, int(np.prod(shape)) // G, int(np.prod(pshape)))
    assert chunks > 2, "the case must have several partials"
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            numba.set_num_threads(threads)
            y, mean, inv = forward(kind, x, w, b, arg, "numba")
            results.append((y, *backward(kind, dy, x, mean, inv, w, arg, "numba")))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            if e is not None:
                np.testing.assert_array_equal(a, e)


def test_grad_chunks_depend_on_the_shape_only():
    assert nn._grad_chunks(1, 10**6, 1) == 1  # one row: one partial
    assert nn._grad_chunks(4096, 1024, 32) == nn.MAX_GRAD_CHUNKS
    assert nn._grad_chunks(4096, 4096, 4096) * 4096 * 16 <= nn.GRAD_PARTIAL_BYTES  # partials' memory bounded
    assert nn._grad_chunks(64, 64, 64) == 1  # too small to split
    # layer norm: at least GRAD_ROWS_PER_WEIGHT_ROW rows per partial row of F weights
    assert 64 // nn._grad_chunks(64, 16384, 16384) >= nn.GRAD_ROWS_PER_WEIGHT_ROW

