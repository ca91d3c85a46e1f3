"""The stage-level engine (``bnkernels/engine.py``): the staged path gives the whole batch's result when the batch is split into
parts whose reductions are exchanged (what synchronized batch norm does
between processes), and ``engine.merge`` is exact."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnkernels import engine
from bnkernels.backends import resolve
from bnkernels.backends.interface import Affine, Moments
from bnkernels.reference import reference_forward, reference_stats
from bnkernels.validation import channel_layout
from engine_checks import OtherParts, check_split_batch
from helpers import DTYPES, assert_close, make_input


SPLITS = [  # shape, channel axis, cuts along axis 0
    ((6, 3, 5), 1, [2]),
    ((7, 4), 1, [1, 4]),
    ((5, 3, 2, 2), 1, []),  # one part: the staged path alone
    ((6, 2, 3, 5), 3, [3]),  # channels last
    ((9, 17), -1, [4, 5]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,cuts", SPLITS)
def test_split_batch_matches_the_whole(backend, shape, axis, cuts, dtype, rng):
    check_split_batch(backend, shape, axis, dtype, cuts, rng)


def test_split_batch_with_relu(backend, rng):
    check_split_batch(backend, (8, 3, 4), 1, np.float32, [3], rng, relu=True)


def test_staged_and_fused_agree(backend, rng):
    """No exchange: the fused form; an exchange that adds nothing: the
    stages. Both give the same result to rounding."""
    x = make_input((6, 5, 7), np.float32, rng)
    impl, lay = resolve(backend, x), channel_layout(x.shape, 1)
    fused = engine.forward_train(impl, x, lay, None, None, 1e-5, False, None)
    staged = engine.forward_train(impl, x, lay, None, None, 1e-5, False, None, exchange=OtherParts())
    for f, s, what in zip(fused, staged, ("y", "mean", "invstd")):
        assert_close(s, np.asarray(f, np.float64), np.float32, what, scale=np.abs(f).max() + 1)


def test_inference_runs_finalize_running_then_normalize(backend, rng):
    x = make_input((4, 3, 5), np.float64, rng)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    impl, lay = resolve(backend, x), channel_layout(x.shape, 1)
    norm = impl.finalize_running(x, lay, rm, rv, None, None, 1e-5)
    y = impl.normalize(x, lay, norm, False)
    assert_close(y, reference_forward(x, None, None, rm, rv, training=False)[0], np.float64, "y")
    assert_close(norm.invstd, 1 / np.sqrt(rv + 1e-5), np.float64, "invstd")


def test_groups_other_than_channels(backend, rng):
    """Instance norm's view (1, N*C, H*W): statistics per (sample, channel)
    on the same stages, without affine parameters."""
    x = make_input((3, 4, 5, 6), np.float32, rng)
    view = x.reshape(1, 12, 30)
    lay = channel_layout(view.shape, 1)
    lay = type(lay)(lay.shape, 1, Affine(channels=4, period=4, span=1, divisor=30))
    impl = resolve(backend, view)
    y, mean, invstd = engine.forward_train(impl, view, lay, None, None, 1e-5, False, None)
    flat = x.reshape(12, 30).astype(np.float64)
    expect = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
    assert_close(np.asarray(y).reshape(12, 30), expect, np.float32, "y")
    assert lay.affine_channels == 4 and lay.affine.index(5, 29) == 1


def test_affine_across_groups_is_refused(rng):
    x = make_input((1, 6, 4), np.float32, rng)
    lay = channel_layout(x.shape, 1)
    lay = type(lay)(lay.shape, 1, Affine(channels=3, period=3, span=1, divisor=4))
    with pytest.raises(NotImplementedError, match="gamma and beta"):
        engine.forward_train(resolve("numpy", x), x, lay, np.ones(3, np.float32), None, 1e-5, False, None)


def _moments(parts):
    out = []
    for p in parts:
        if len(p) == 0:
            out.append(Moments(0, np.zeros(3), np.zeros(3)))
            continue
        n, mean, var = reference_stats(p, axis=1)
        out.append(Moments(n, mean, var * n))
    return out


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=9),
       offset=st.sampled_from([0.0, 1e3, -1e6, 1e9]), seed=st.integers(0, 2**16))
def test_merge_matches_the_whole(sizes, offset, seed):
    """Any number of parts (empty ones included), means far from 0: the
    merged moments are those of the whole, to float64 rounding."""
    rng = np.random.default_rng(seed)
    if sum(sizes) == 0:
        sizes = sizes + [1]
    whole = rng.standard_normal((sum(sizes), 3)) + offset + rng.uniform(-5, 5, 3)
    parts = np.split(whole, np.cumsum(sizes)[:-1])
    merged = engine.merge(_moments(parts))
    n, mean, var = reference_stats(whole, axis=1)
    assert merged.count == n
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-14, atol=1e-14 * abs(offset))
    np.testing.assert_allclose(merged.m2, var * n, rtol=1e-9 * (1 + abs(offset)) ** 0.5, atol=1e-12)


def test_merge_needs_a_part():
    with pytest.raises(ValueError, match="at least one"):
        engine.merge([])
