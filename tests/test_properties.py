"""Property-based tests (hypothesis) of bn_forward, bn_backward,
channel_stats and merge_stats on the default CPU backend.

Inputs: 1-D to 5-D shapes with small sides (1 included), any valid channel
axis (negative too), float32 and float64, per-channel means up to 1e4 and
standard deviations from about 3e-3 to 300, so |mean| / std reaches ~1e6.

Tolerances: the dtype tolerances of ``helpers.TOLERANCES`` for O(1) results;
where a property only holds up to the rounding of the *data* (e.g.
``a * x + b`` rounded to float32), the bound adds that rounding's effect,
``unit roundoff * max|x| / std`` per channel.
"""
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from bnkernels import bn_backward, bn_forward, channel_stats, merge_stats
from bnkernels.reference import reference_forward, reference_stats
from helpers import TOLERANCES, assert_close

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = [np.float32, np.float64]
#: unit roundoff of each dtype
UNIT = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}


class Problem:
    """One drawn input: ``x``, the channel ``axis`` as drawn (negative or
    not) and the seed of ``rng``, the generator for a test's further random
    values (gamma, dy, ...). Its repr reproduces it exactly."""

    def __init__(self, x, axis: int, seed: int = 0):
        self.x, self.axis, self.seed = x, axis, seed
        self._rng = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def __repr__(self) -> str:
        return (f"Problem(np.array({self.x.tolist()!r}, dtype=np.{self.x.dtype.name}), "
                f"axis={self.axis}, seed={self.seed})")

    @property
    def ax(self) -> int:
        return self.axis % self.x.ndim

    @property
    def C(self) -> int:
        return self.x.shape[self.axis]

    @property
    def count(self) -> int:
        return self.x.size // self.C if self.C else 0

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    @property
    def bshape(self) -> tuple:
        return tuple(self.C if i == self.ax else 1 for i in range(self.x.ndim))

    def per_channel(self, a) -> np.ndarray:
        """``a`` (shaped like x) as float64 rows, one per channel: (C, count)."""
        return np.moveaxis(np.asarray(a, np.float64), self.ax, 0).reshape(self.C, -1)


def _shape_and_axis(draw, min_dims, max_dims, trainable):
    shape = list(draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=5)))
    ndim = len(shape)
    axis = draw(st.integers(-ndim, ndim - 1))
    if trainable:  # training needs >= 2 values per channel
        others = [i for i in range(ndim) if i != axis % ndim]
        if math.prod(shape[i] for i in others) < 2:
            shape[draw(st.sampled_from(others))] = draw(st.integers(2, 5))
    return tuple(shape), axis


@st.composite
def problems(draw, *, min_dims=1, max_dims=5, trainable=False, dtypes=FLOATS, max_abs_mean=1e4,
             log_std=(-2.0, 2.0)):
    """Random data: a common mean (0 or up to +-max_abs_mean) with per-channel
    offsets of a few std, and per-channel std within 10**+-0.5 of a common
    10**log_std."""
    if trainable:
        min_dims = max(min_dims, 2)  # 1-D data has one value per channel
    shape, axis = _shape_and_axis(draw, min_dims, max_dims, trainable)
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    mean = draw(st.just(0.0) | st.floats(-max_abs_mean, max_abs_mean))
    std = 10.0 ** draw(st.floats(*log_std))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="data_seed"))
    C = shape[axis]
    bshape = tuple(C if i == axis % len(shape) else 1 for i in range(len(shape)))
    ch_std = std * 10.0 ** rng.uniform(-0.5, 0.5, C)
    ch_mean = mean + std * rng.uniform(-3.0, 3.0, C)
    x = rng.standard_normal(shape) * ch_std.reshape(bshape) + ch_mean.reshape(bshape)
    return Problem(x.astype(dtype), axis, draw(st.integers(0, 2**32 - 1), label="seed"))


def nonconstant(p: Problem, x=None) -> bool:
    rows = p.per_channel(p.x if x is None else x)
    return bool((rows.max(axis=1) > rows.min(axis=1)).all())


def conditioning(p: Problem, x=None) -> np.ndarray:
    """Per channel ``max|x| / std``: how much rounding the data to its dtype
    (relative error u) can move the normalized values (in std units)."""
    rows = p.per_channel(p.x if x is None else x)
    return np.abs(rows).max(axis=1) / rows.std(axis=1)


def mean_slack(p: Problem) -> float:
    """``scale`` for assert_close on outputs of size O(1): 1, plus the effect
    of rounding a float64 mean, u64 * |mean| / std in y. A plain two-pass
    float64 computation (bnkernels.reference) has that error, and so does
    bnkernels today for float64 input (see
    test_float64_forward_is_exact_to_rounding); it depends on the order of
    summation, so it also separates results computed in different layouts."""
    _, mean, var = reference_stats(p.x, axis=p.axis)
    kappa = float((np.abs(mean) / np.sqrt(np.where(var > 0, var, np.inf))).max())
    return 1.0 + 4 * UNIT[np.dtype(np.float64)] * kappa / TOLERANCES[p.dtype]["atol"]


# --------------------------------------------------------------------------- forward

@SETTINGS
@given(p=problems(trainable=True), eps=st.sampled_from([0.0, 1e-5, 1e-3, 0.5]))
def test_training_output_is_standardized(p, eps):
    """No affine: per channel, mean(y) = 0 and var(y) = var / (var + eps);
    y equals the float64 reference; constant channels give 0 (eps > 0)."""
    constant = p.per_channel(p.x).std(axis=1) == 0
    if eps == 0:
        assume(not constant.any())  # 0 / 0
    y = bn_forward(p.x, axis=p.axis, eps=eps)
    assert y.shape == p.x.shape and y.dtype == p.dtype

    _, _, var = reference_stats(p.x, axis=p.axis)
    ref_y = reference_forward(p.x, axis=p.axis, eps=eps)[0]
    assert_close(y, ref_y, p.dtype, "y vs float64 reference", scale=mean_slack(p))

    rows = p.per_channel(y)
    assert_close(rows.mean(axis=1), np.zeros(p.C), p.dtype, "per-channel mean of y", scale=mean_slack(p))
    # var(y) has ~2x the relative error of y
    assert_close(rows.var(axis=1), var / (var + eps), p.dtype, "per-channel biased variance of y", scale=2)
    np.testing.assert_array_equal(rows[constant], 0.0, err_msg="a constant channel must normalize to 0")


def _exact_standardized(p: Problem, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) of x's values in exact rational
    arithmetic (the square root to 40 digits), rounded to float64 at the end."""
    import decimal
    from fractions import Fraction

    ctx = decimal.Context(prec=40)
    out = np.empty((p.C, p.count))
    for c, row in enumerate(p.per_channel(p.x)):
        vals = [Fraction(float(v)) for v in row]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals) + Fraction(eps)
        sd = ctx.sqrt(ctx.divide(decimal.Decimal(var.numerator), decimal.Decimal(var.denominator)))
        for i, v in enumerate(vals):
            dev = v - mean
            out[c, i] = float(ctx.divide(ctx.divide(decimal.Decimal(dev.numerator),
                                                    decimal.Decimal(dev.denominator)), sd))
    return out


#: 1e4 + 1e-2 * randn: |mean| / std = 1e6
LARGE_MEAN_ROW = [10000.00125730221, 9999.998678951368, 10000.006404226504, 10000.001049001172,
                  9999.994643306269, 10000.003615950549]


@SETTINGS
@given(p=problems(trainable=True, max_dims=3, dtypes=[np.float64]), eps=st.sampled_from([1e-5, 0.0]))
@example(p=Problem(np.array([LARGE_MEAN_ROW]), axis=0), eps=1e-5)
def test_float64_forward_is_exact_to_rounding(p, eps):
    """The shifted algorithm (module doc of numpy_backend: ``shift' = beta -
    (mean - k) * scale`` absorbs the rounding of k) gives float64 outputs
    within a few ulps of the exact result, however large |mean| / std: no
    error of order u * |mean| / std (which a plain two-pass float64
    computation, like bnkernels.reference, has)."""
    assume(p.x.size <= 60 and nonconstant(p))
    exact = _exact_standardized(p, eps)
    y = p.per_channel(bn_forward(p.x, axis=p.axis, eps=eps))
    err = np.abs(y - exact)
    bound = 64 * UNIT[np.dtype(np.float64)] * (1.0 + np.abs(exact))
    bad = ~(err <= bound)
    assert not bad.any(), (f"float64 y vs exact: {int(bad.sum())} of {bad.size} off, worst {err.max():.3g} "
                           f"(bound {bound.max():.3g}; max|x|/std up to {float(conditioning(p).max()):.3g}); "
                           f"first: got {y[bad][:3].tolist()!r}, exact {exact[bad][:3].tolist()!r}")


@SETTINGS
@given(p=problems(trainable=True, max_abs_mean=10.0), log_a=st.floats(-3, 3), negative=st.booleans(),
       log_c=st.floats(-2, 4), c_negative=st.booleans())
def test_affine_invariance_of_the_data(p, log_a, negative, log_c, c_negative):
    """eps=0: bn(a*x + b) = sign(a) * bn(x), up to the rounding of x and of
    a*x + b to the dtype (relative u of max|x|, i.e. u * max|x| / std in y)."""
    x64 = p.x.astype(np.float64)
    std = p.per_channel(x64).std(axis=1).min()
    a = (-1.0 if negative else 1.0) * 10.0**log_a
    b = a * (-1.0 if c_negative else 1.0) * 10.0**log_c * max(std, 1e-300)  # |b| up to 1e4 std of a*x
    x2 = (a * x64 + b).astype(p.dtype)
    assume(nonconstant(p) and nonconstant(p, x2))
    kappa = float(conditioning(p).max() + conditioning(p, x2).max())

    y = bn_forward(p.x, axis=p.axis, eps=0.0)
    y2 = bn_forward(x2, axis=p.axis, eps=0.0)
    expected = -y.astype(np.float64) if negative else y.astype(np.float64)
    u = UNIT[p.dtype]
    atol = TOLERANCES[p.dtype]["atol"]
    # perturbing the data by u*|x| moves y by ~ u*kappa*(1 + |y|) (mean, std and x itself)
    slack = 8 * u * kappa * (1.0 + float(np.abs(expected).max()))
    assert_close(y2, expected, p.dtype, f"bn(a*x + b) vs sign(a)*bn(x), a={a:.3g}, b={b:.3g}",
                 scale=2.0 + slack / atol)


@SETTINGS
@given(p=problems(trainable=True), affine=st.booleans(), activation=st.sampled_from([None, "relu"]))
def test_channel_permutation_equivariance(p, affine, activation):
    """Permuting the channels (and gamma, beta, running stats with them)
    permutes the output, saved statistics and running statistics."""
    C, rng = p.C, p.rng
    gamma = rng.uniform(0.5, 2.0, C).astype(p.dtype) if affine else None
    beta = rng.standard_normal(C).astype(p.dtype) if affine else None
    rm_old = rng.standard_normal(C)
    rv_old = rng.uniform(0.5, 2.0, C)
    perm = rng.permutation(C)
    take = (lambda v: None if v is None else v[perm])

    rm, rv = rm_old.copy(), rv_old.copy()
    y, saved = bn_forward(p.x, gamma, beta, rm, rv, axis=p.axis, activation=activation, return_saved=True)
    rmp, rvp = rm_old[perm], rv_old[perm]  # fancy indexing: fresh arrays
    xp = np.take(p.x, perm, axis=p.axis)
    yp, savedp = bn_forward(xp, take(gamma), take(beta), rmp, rvp, axis=p.axis, activation=activation,
                            return_saved=True)
    assert_close(yp, np.take(y, perm, axis=p.axis), p.dtype, "y of permuted channels", scale=mean_slack(p))
    assert_close(savedp.mean, saved.mean[perm], p.dtype, "saved.mean of permuted channels",
                 scale=float(np.abs(saved.mean).max()) + 1)
    assert_close(savedp.invstd, saved.invstd[perm], p.dtype, "saved.invstd of permuted channels",
                 scale=float(np.abs(saved.invstd).max()) + 1)
    assert_close(rmp, rm[perm], np.float64, "running_mean of permuted channels",
                 scale=float(np.abs(rm).max()) + 1)
    assert_close(rvp, rv[perm], np.float64, "running_var of permuted channels",
                 scale=float(np.abs(rv).max()) + 1)


@SETTINGS
@given(p=problems(), data=st.data(), contiguous=st.booleans())
def test_moving_the_channel_axis_moves_the_result(p, data, contiguous):
    """np.moveaxis(x, axis, new) with axis=new gives np.moveaxis(y, axis, new),
    in training (enough values per channel) or inference, and for backward."""
    ndim = p.x.ndim
    new = data.draw(st.integers(-ndim, ndim - 1), label="new_axis")
    xm = np.moveaxis(p.x, p.axis, new)
    if contiguous:
        xm = np.ascontiguousarray(xm)
    C, rng = p.C, p.rng
    gamma = rng.uniform(0.5, 2.0, C)
    beta = rng.standard_normal(C)
    rm = (np.mean(p.x, dtype=np.float64) + rng.standard_normal(C)).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, C).astype(np.float32)
    training = p.count >= 2
    rm2, rv2 = rm.copy(), rv.copy()

    y, saved = bn_forward(p.x, gamma, beta, rm, rv, training=training, axis=p.axis, return_saved=True)
    ym, savedm = bn_forward(xm, gamma, beta, rm2, rv2, training=training, axis=new, return_saved=True)
    assert ym.shape == xm.shape
    assert_close(ym, np.moveaxis(y, p.axis, new), p.dtype, f"y with the channel axis moved to {new}",
                 scale=mean_slack(p))
    assert_close(savedm.mean, saved.mean, p.dtype, "saved.mean", scale=float(np.abs(saved.mean).max()) + 1)
    assert_close(savedm.invstd, saved.invstd, p.dtype, "saved.invstd",
                 scale=float(np.abs(saved.invstd).max()) + 1)
    assert_close(rm2, rm, np.float32, "running_mean", scale=float(np.abs(rm).max()) + 1)
    assert_close(rv2, rv, np.float32, "running_var", scale=float(np.abs(rv).max()) + 1)

    if training:
        dy = rng.standard_normal(p.x.shape).astype(p.dtype)
        dx, dg, db = bn_backward(dy, p.x, saved.mean, saved.invstd, gamma, axis=p.axis)
        dxm, dgm, dbm = bn_backward(np.moveaxis(dy, p.axis, new), xm, saved.mean, saved.invstd, gamma,
                                    axis=new)
        sx = float(np.abs(dx).max()) + float(np.abs(dy).max() * np.abs(gamma * saved.invstd).max())
        assert_close(dxm, np.moveaxis(dx, p.axis, new), p.dtype, "dx", scale=sx)
        assert_close(dgm, dg, p.dtype, "dgamma", scale=float(np.abs(dg).max()) + 1)
        assert_close(dbm, db, p.dtype, "dbeta", scale=float(np.abs(db).max()) + 1)


# --------------------------------------------------------------------------- statistics

def _split(draw, p: Problem, allow_empty: bool):
    """Split x along a random non-channel axis at a random point."""
    others = [i for i in range(p.x.ndim) if i != p.ax]
    along = draw(st.sampled_from(others), label="split_axis")
    L = p.x.shape[along]
    if allow_empty:
        at = draw(st.sampled_from([0, L]), label="split_at")
    else:
        assume(L >= 2)
        at = draw(st.integers(1, L - 1), label="split_at")
    x1, x2 = np.split(p.x, [at], axis=along)
    return x1, x2, along


def _m2_bound(p: Problem, rtol: float) -> np.ndarray:
    """Per-channel bound on the error of an m2: ``rtol * m2`` plus the
    float64 rounding of means of size |mean| in a sum of squared deviations
    (~ u64 * |mean| / std relative; Chan's delta**2 term)."""
    n, mean, var = reference_stats(p.x, axis=p.axis)
    std = np.sqrt(np.where(var > 0, var, 1.0))
    return (rtol + 64 * UNIT[np.dtype(np.float64)] * (np.abs(mean) / std + 1)) * var * n + 1e-300


def _assert_stats(stats, p: Problem, what: str, m2_rtol: float):
    n, mean, var = reference_stats(p.x, axis=p.axis)
    assert stats.count == n == p.count, f"{what}: count {stats.count}, expected {n}"
    assert np.shape(stats.mean) == np.shape(stats.m2) == (p.C,)
    std = np.sqrt(var)
    # |mean| up to ~1e4 std: relative to the mean, plus a little of the std
    assert_close(stats.mean, mean, np.float64, f"{what}: mean", scale=float(std.max()) + 1e-300)
    err = np.abs(np.asarray(stats.m2, np.float64) - var * n)
    bound = _m2_bound(p, m2_rtol)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what} ({p.dtype} input): m2 off in channels {np.flatnonzero(bad)[:5].tolist()}: "
                           f"got {np.asarray(stats.m2)[bad][:5]!r}, expected {(var * n)[bad][:5]!r} "
                           f"(relative error {(err / (var * n + 1e-300))[bad][:5]!r})")


#: Tight float64 tolerance for statistics of float64 data.
STATS_RTOL = TOLERANCES[np.dtype(np.float64)]["rtol"]
#: channel_stats documents that for float16/float32 input "M2 is accurate to
#: about 1e-7 relative": worked in float32 (the GPU backends), d = x - k and
#: d**2 each round by u32, so up to ~3 u32 (the CPU backends, in float64, do better).
STATS_RTOL_FLOAT32_INPUT = 4 * UNIT[np.dtype(np.float32)]


def stats_rtol(dtype) -> float:
    return STATS_RTOL if np.dtype(dtype) == np.float64 else STATS_RTOL_FLOAT32_INPUT


@SETTINGS
@given(p=problems())
def test_channel_stats_matches_float64_reference(p):
    """channel_stats: float64 mean of the input's values (float64-accurate)
    and m2 to float64 accuracy for float64 input, ~1e-7 for float32 input."""
    _assert_stats(channel_stats(p.x, axis=p.axis), p, "channel_stats(x)", stats_rtol(p.dtype))


@SETTINGS
@given(p=problems(min_dims=2), data=st.data())
def test_merge_stats_equals_stats_of_the_whole(p, data):
    x1, x2, along = _split(data.draw, p, allow_empty=False)
    s1, s2 = channel_stats(x1, axis=p.axis), channel_stats(x2, axis=p.axis)
    assert (s1.count, s2.count) == (x1.size // p.C, x2.size // p.C)
    rtol = stats_rtol(p.dtype)
    _assert_stats(merge_stats(s1, s2), p, "merge_stats(x1, x2)", rtol)
    _assert_stats(merge_stats(s2, s1), p, "merge_stats(x2, x1)", rtol)
    # and against channel_stats of the concatenation, computed the same way
    whole = channel_stats(np.concatenate([x1, x2], axis=along), axis=p.axis)
    merged = merge_stats(s1, s2)
    assert merged.count == whole.count
    assert_close(merged.mean, whole.mean, np.float64, "merged mean vs channel_stats(whole)",
                 scale=float(np.sqrt(whole.var).max()) + 1e-300)
    bad = ~(np.abs(merged.m2 - whole.m2) <= 2 * _m2_bound(p, rtol))
    assert not bad.any(), (f"merged m2 vs channel_stats(whole): channels {np.flatnonzero(bad)[:5].tolist()}: "
                           f"{merged.m2[bad][:5]!r} != {whole.m2[bad][:5]!r}")


@SETTINGS
@given(p=problems(min_dims=2), data=st.data())
def test_merge_stats_with_an_empty_part(p, data):
    """A split at 0 or at the end leaves an empty part: its channel_stats has
    count 0, which merge_stats accepts ("contributes nothing")."""
    x1, x2, _ = _split(data.draw, p, allow_empty=True)
    s1, s2 = channel_stats(x1, axis=p.axis), channel_stats(x2, axis=p.axis)
    assert sorted((s1.count, s2.count)) == [0, p.count]
    rtol = stats_rtol(p.dtype)
    _assert_stats(merge_stats(s1, s2), p, "merge_stats with an empty part", rtol)
    _assert_stats(merge_stats(s2, s1), p, "merge_stats with an empty part (swapped)", rtol)


# --------------------------------------------------------------------------- backward

@SETTINGS
@given(p=problems(trainable=True), dy_offset=st.floats(-3, 3))
def test_backward_dx_sums_to_zero_per_channel(p, dy_offset):
    """gamma=None: sum(dx) = 0 per channel (y is invariant to adding a
    constant to a channel of x). dy has a non-zero mean so that dropping the
    mean(dy) term would show."""
    rng = p.rng
    dy = (rng.standard_normal(p.x.shape) + dy_offset).astype(p.dtype)
    _, saved = bn_forward(p.x, axis=p.axis, return_saved=True)
    dx, _, dbeta = bn_backward(dy, p.x, saved.mean, saved.invstd, axis=p.axis)
    assert dx.shape == p.x.shape and dx.dtype == p.dtype

    n, mean, var = reference_stats(p.x, axis=p.axis)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    xhat_max = np.abs(p.per_channel(p.x) - mean[:, None]).max(axis=1) * invstd
    dy_max = np.abs(p.per_channel(dy)).max(axis=1)
    # each dx element rounds relative to its terms ~ invstd*|dy|*(2 + |xhat|);
    # a saved mean rounded by delta makes sum(xhat) = n*delta*invstd, not 0.
    # (the reference mean itself is only good to ~u64 * |mean|)
    delta = np.abs(np.asarray(saved.mean, np.float64) - mean) + 2 * UNIT[np.dtype(np.float64)] * np.abs(mean)
    u = UNIT[p.dtype]
    bound = n * invstd * dy_max * (16 * u * (2 + xhat_max) + 2 * delta * invstd * xhat_max) + 1e-300
    sums = p.per_channel(dx).sum(axis=1)
    bad = ~(np.abs(sums) <= bound)
    assert not bad.any(), (f"sum of dx per channel ({p.dtype}) not ~0 in channels "
                           f"{np.flatnonzero(bad)[:5].tolist()}: got {sums[bad][:5]!r} (bound {bound[bad][:5]!r}); "
                           f"|sum(dy)| there: {np.abs(dbeta[bad][:5])!r}")


@SETTINGS
@given(p=problems(trainable=True, max_dims=3, dtypes=[np.float64], max_abs_mean=10.0, log_std=(-1.0, 1.0)),
       affine=st.booleans(), eps=st.sampled_from([1e-5, 0.1]))
def test_backward_matches_finite_differences(p, affine, eps):
    """float64, tiny shapes: dx, dgamma and dbeta of loss = sum(y * w) match
    central differences.

    |mean| / std stays below ~1e3 here: the loss must be smooth to ~u at the
    step size (see test_float64_forward_is_exact_to_rounding for larger
    ratios)."""
    assume(p.x.size <= 40)
    rng, C, shape = p.rng, p.C, p.x.shape
    gamma = rng.uniform(0.5, 2.0, C) if affine else None
    beta = rng.standard_normal(C) if affine else None
    w = rng.standard_normal(shape)

    def loss(x, g=gamma, b=beta):
        return math.fsum((bn_forward(x, g, b, axis=p.axis, eps=eps) * w).ravel())

    _, saved = bn_forward(p.x, gamma, beta, axis=p.axis, eps=eps, return_saved=True)
    dx, dgamma, dbeta = bn_backward(w, p.x, saved.mean, saved.invstd, gamma, axis=p.axis)

    _, mean, var = reference_stats(p.x, axis=p.axis)
    length = np.sqrt(var + eps)  # the scale on which y changes with x
    chan = np.broadcast_to(np.arange(C).reshape(p.bshape), shape).ravel()
    num = np.empty(p.x.size)
    for i in range(p.x.size):
        xp, xm = p.x.ravel().copy(), p.x.ravel().copy()
        xp[i] += 1e-4 * length[chan[i]]
        xm[i] -= 1e-4 * length[chan[i]]
        step = xp[i] - xm[i]  # the step actually taken (x +- h rounds)
        num[i] = (loss(xp.reshape(shape)) - loss(xm.reshape(shape))) / step
    num = num.reshape(shape)
    # truncation ~ (h / length)**2 = 1e-8, cancellation ~ u * kappa * n / 1e-4
    # (relative to |w| * gamma * invstd, the size of the terms of dx)
    g = np.ones(C) if gamma is None else gamma
    assert_close(dx, num, np.float32, "dx vs central differences",
                 scale=float(np.abs(w).max() * (np.abs(g) / length).max()) / 2)

    # the loss is linear in gamma and beta: differences with step 1 are exact
    # up to rounding, so these compare at float64 tolerance
    xhat_max = float((np.abs(p.per_channel(p.x) - mean[:, None]).max(axis=1) / length).max())
    scale = float(np.abs(p.per_channel(w)).sum(axis=1).max()) * (1 + xhat_max)
    g0 = np.ones(C) if gamma is None else gamma
    b0 = np.zeros(C) if beta is None else beta
    num_g, num_b = np.empty(C), np.empty(C)
    for c in range(C):
        e = np.zeros(C)
        e[c] = 1.0
        num_g[c] = (loss(p.x, g0 + e, b0) - loss(p.x, g0 - e, b0)) / 2
        num_b[c] = (loss(p.x, g0, b0 + e) - loss(p.x, g0, b0 - e)) / 2
    assert_close(dgamma, num_g, np.float64, "dgamma vs central differences", scale=scale * 100)
    assert_close(dbeta, num_b, np.float64, "dbeta vs central differences", scale=scale * 100)


# --------------------------------------------------------------------------- running statistics

@SETTINGS
@given(p=problems(trainable=True), momentum=st.none() | st.floats(0.0, 1.0),
       num_batches_tracked=st.integers(0, 1000), running_dtype=st.sampled_from(FLOATS))
def test_running_statistics_update(p, momentum, num_batches_tracked, running_dtype):
    """running = (1 - m) * old + m * batch, with the unbiased batch variance;
    m = 1 / (num_batches_tracked + 1) for momentum=None."""
    rng = p.rng
    n, mean, var = reference_stats(p.x, axis=p.axis)
    old_rm = (mean + rng.standard_normal(p.C) * 10).astype(running_dtype)
    old_rv = (var * rng.uniform(0.1, 10, p.C)).astype(running_dtype)
    rm, rv = old_rm.copy(), old_rv.copy()
    bn_forward(p.x, None, None, rm, rv, momentum=momentum, num_batches_tracked=num_batches_tracked,
               axis=p.axis)
    m = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
    exp_rm = (1 - m) * old_rm.astype(np.float64) + m * mean
    exp_rv = (1 - m) * old_rv.astype(np.float64) + m * var * n / (n - 1)
    assert rm.dtype == running_dtype and rv.dtype == running_dtype
    assert_close(rm, exp_rm, running_dtype, f"running_mean (m={m:.3g})", scale=float(np.abs(exp_rm).max()) + 1)
    # m2 of float32 data is good to ~1e-7 (see test_channel_stats_matches_float64_reference)
    var_tol_dtype = np.float32 if p.dtype == np.float32 else running_dtype
    assert_close(rv, exp_rv, var_tol_dtype, f"running_var (m={m:.3g})", scale=float(np.abs(exp_rv).max()) + 1)


@SETTINGS
@given(p=problems(max_dims=3))
def test_training_rejects_fewer_than_two_values_per_channel(p):
    """count < 2: ValueError, running statistics untouched; inference works."""
    assume(p.count < 2)
    rm = np.zeros(p.C, np.float32)
    rv = np.ones(p.C, np.float32)
    with pytest.raises(ValueError, match="per channel"):
        bn_forward(p.x, None, None, rm, rv, axis=p.axis)
    np.testing.assert_array_equal(rm, 0.0, err_msg="running_mean touched by a rejected call")
    np.testing.assert_array_equal(rv, 1.0, err_msg="running_var touched by a rejected call")
    y = bn_forward(p.x, None, None, rm, rv, training=False, axis=p.axis)
    assert_close(y, reference_forward(p.x, None, None, rm, rv, training=False, axis=p.axis)[0], p.dtype,
                 "inference y", scale=float(np.abs(p.x).max()) + 1)


@SETTINGS
@given(p=problems(trainable=True, max_dims=4, max_abs_mean=100.0), activation=st.sampled_from([None, "relu"]),
       z_scale=st.floats(0.0, 10.0))
def test_residual_is_added_before_the_activation(p, activation, z_scale):
    """``bn_forward(x, residual=z)`` equals the normalized x plus z (then
    the activation), within the dtype's tolerance of the result's size;
    ``relu(bn(x) + z) >= 0``; and its ``dz`` is dy where y > 0."""
    assume(nonconstant(p))
    z = (p.rng.standard_normal(p.x.shape) * z_scale).astype(p.dtype)
    y, saved = bn_forward(p.x, axis=p.axis, residual=z, activation=activation, return_saved=True)
    expected = reference_forward(p.x, axis=p.axis, residual=z, activation=activation)[0]
    # the result's size: |bn(x)| plus |z| (z rounded once more in the sum)
    assert_close(y, expected, p.dtype, "y", scale=mean_slack(p) + float(np.abs(z).max()))
    if activation:
        assert (y >= 0).all()
        dy = p.rng.standard_normal(p.x.shape).astype(p.dtype)
        *_, dz = bn_backward(dy, p.x, saved.mean, saved.invstd, axis=p.axis, activation="relu", y=y, residual=True)
        np.testing.assert_array_equal(dz, np.where(y <= 0, 0, dy))
