"""channel_stats and merge_stats."""
import numpy as np
import pytest

from bnkernels import ChannelStats, channel_stats, merge_stats
from bnkernels.reference import reference_stats
from helpers import DTYPES, make_input
from test_forward import CASES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_channel_stats_match_reference(backend, shape, axis, dtype, rng):
    x = make_input(shape, dtype, rng)
    stats = channel_stats(x, axis=axis, backend=backend)
    n, mean, var = reference_stats(x, axis)
    assert stats.count == n
    assert stats.mean.dtype == np.float64 and stats.m2.dtype == np.float64
    # float64 sums; for float16/32 input the deviations are squared in
    # float32 (relative error 6e-8 per square), which bounds M2's accuracy.
    rtol = 1e-10 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var, var, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(stats.unbiased_var, var * n / (n - 1), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("axis", [0, -1])
def test_channel_stats_large_mean_float32(backend, axis, rng):
    x = (1e6 + rng.standard_normal((2000, 3) if axis == -1 else (3, 2000))).astype(np.float32)
    stats = channel_stats(x, axis=axis, backend=backend)
    _, mean, var = reference_stats(x, axis)
    np.testing.assert_allclose(stats.var, var, rtol=1e-6)


def _split_stats(x, cut):
    return merge_stats(channel_stats(x[:cut]), channel_stats(x[cut:]))


@pytest.mark.parametrize("cut", [0, 1, 7, 63, 64])
def test_merge_equals_whole(cut, rng):
    x = make_input((64, 5), np.float64, rng, mean=1e3)
    whole = channel_stats(x)
    merged = _split_stats(x, cut)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-10)


def test_merge_of_many_uneven_parts(rng):
    """Chan's formula is associative: merging uneven chunks (as ranks of a
    synchronized batch norm would) gives the whole batch's statistics."""
    x = make_input((97, 4, 3), np.float32, rng, mean=50.0)
    cuts = [0, 1, 13, 13, 40, 97]
    total = ChannelStats(0, np.zeros(4), np.zeros(4))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        total = merge_stats(total, channel_stats(x[lo:hi]))
    n, mean, var = reference_stats(x, 1)
    assert total.count == n
    np.testing.assert_allclose(total.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(total.var, var, rtol=1e-6)


def test_merge_rejects_mismatched_channels():
    a = ChannelStats(2, np.zeros(3), np.ones(3))
    b = ChannelStats(2, np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="3 and 4 channels"):
        merge_stats(a, b)
    with pytest.raises(TypeError, match="ChannelStats"):
        merge_stats(a, (2, np.zeros(3), np.ones(3)))


def test_channel_stats_validates(rng):
    with pytest.raises(TypeError, match="dtype"):
        channel_stats(np.ones((3, 2), np.int32))
    with pytest.raises(ValueError, match="axis=2"):
        channel_stats(np.ones((3, 2)), axis=2)


def test_stats_of_half_input_with_huge_sum(rng):
    x = (1000 + rng.standard_normal((256, 2))).astype(np.float16)  # sum ~ 2.6e5 > 65504
    stats = channel_stats(x)
    n, mean, var = reference_stats(x, 1)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.var, var, rtol=1e-6)
