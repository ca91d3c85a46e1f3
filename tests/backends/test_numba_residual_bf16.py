"""The numba backend's fused residual (``y = relu(bn(x) + z)`` in the pass
that writes y), its ReLU gradient (``relu_backward``) and bfloat16 data
(int16 bits inside the kernels, ``numba_bf16``): against the float64
reference (y rounded once), the numpy backend and torch's bfloat16, on
boundary shapes of both kernel families (channel planes, fused per block or
not; channel fastest), strides and in place."""
import numpy as np
import pytest

pytest.importorskip("numba")
from bnkernels import bn_backward, bn_forward  # noqa: E402
from bnkernels.backends import numba_backend as nb  # noqa: E402
from bnkernels.backends import numpy_backend  # noqa: E402
from bnkernels.reference import reference_backward, reference_forward  # noqa: E402
from bnkernels.validation import ChannelLayout  # noqa: E402
from helpers import assert_close, bfloat16, make_input, make_params, strided  # noqa: E402

DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64"]
#: significand bits (with the implicit one) of each dtype
PRECISION = {"float16": 11, "bfloat16": 8, "float32": 24}
#: (shape, axis): channel planes fused per block (C >= 2 threads' worth),
#: planes with few channels (a pass over the outer dimension), channel
#: fastest (inner == 1); lengths 1, 15, 16, 17, 127, 129 and primes.
SHAPES = [((2, 17, 15), 1), ((3, 16, 17), 1), ((1, 127, 2), 1), ((129, 3, 7), 1), ((2, 1, 16), 1),
          ((4, 61, 3, 5), 1), ((129, 17), 1), ((16, 127), -1), ((3, 5, 31), -1), ((15, 1), 1)]


def _dtype(name):
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def assert_rounded_once(y, ref, name):
    """``y`` is ``ref`` (float64) rounded to y's dtype: within one unit of
    the last place everywhere (of 0.25 for values nearer 0, where the
    working type's absolute error after cancellation shows), and the
    nearest value but for near-ties (work in float32 for 16-bit data, float64
    for float32). Rounding twice (an intermediate 16-bit result, or z added
    after rounding) misses the nearest value for a quarter of the elements
    or more."""
    y64 = np.asarray(y, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 0.25))) - (PRECISION[name] - 1))
    assert (np.abs(y64 - ref) < ulp).all(), f"{name}: beyond one ulp, worst {np.max(np.abs(y64 - ref) / ulp):.3g}"
    nearest = ref.astype(y.dtype).astype(np.float64)
    missed = np.mean(y64 != nearest)
    assert missed <= 0.01, f"{name}: {missed:.2%} of the elements are not the nearest value"


def test_the_shapes_cover_every_kernel_family():
    layouts = [ChannelLayout(shape, axis % len(shape)) for shape, axis in SHAPES]
    assert any(nb._fused(lay) for lay in layouts)  # planes, one task per block of channels
    assert any(not nb._fused(lay) and lay.inner > 1 for lay in layouts)  # planes, passes over outer
    assert any(lay.inner == 1 for lay in layouts)  # channel fastest


def test_residual_is_viewed_without_a_copy_unless_its_strides_differ(rng):
    layout = ChannelLayout((4, 6, 5), 1)
    z = make_input((4, 6, 5), bfloat16(), rng)
    z3 = nb._view3(z, layout)
    assert z3.shape == (4, 6, 5) and z3.dtype == np.int16 and np.shares_memory(z3, z)  # bfloat16 as int16 bits
    assert nb._bits(z.astype(np.float16)).dtype == np.uint16
    zs = strided(z, rng)
    assert not np.shares_memory(nb._view3(zs, layout), zs)
    assert nb._view3(None, layout) is None


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_training_residual_relu_matches_reference(shape, axis, dtype, rng):
    name, dtype = dtype, _dtype(dtype)
    C = shape[axis]
    x = make_input(shape, dtype, rng, mean=20.0)
    z = make_input(shape, dtype, rng, mean=-1.0, std=3.0)
    gamma, beta = make_params(C, rng)  # float32 parameters also for 16-bit data (the mixed case)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rm_ref, rv_ref = reference_forward(x, gamma, beta, rm, rv, axis=axis)[3:]
    for relu in (None, "relu"):
        y, saved = bn_forward(x, gamma, beta, rm if relu else None, rv if relu else None, axis=axis,
                              activation=relu, residual=z, backend="numba", return_saved=True)
        ref, mean, invstd = reference_forward(x, gamma, beta, axis=axis, activation=relu, residual=z)[:3]
        assert y.dtype == dtype and y.shape == shape
        assert_close(y, ref, dtype, f"y {relu}", scale=np.abs(ref).max())
        if name in PRECISION:
            assert_rounded_once(y, ref, name)
        stat_dtype = np.float64 if dtype == np.float64 else np.float32
        assert saved.mean.dtype == stat_dtype and saved.invstd.dtype == stat_dtype
        assert_close(saved.mean, mean, stat_dtype, "mean", scale=np.abs(mean).max())
        assert_close(saved.invstd, invstd, stat_dtype, "invstd", scale=np.abs(invstd).max())
        y_np = bn_forward(x, gamma, beta, axis=axis, activation=relu, residual=z, backend="numpy")
        assert_close(y, np.asarray(y_np, np.float64), dtype, "y against numpy", scale=np.abs(ref).max())
    assert_close(rm, rm_ref, np.float32, "running_mean", scale=np.abs(rm_ref).max())
    assert_close(rv, rv_ref, np.float32, "running_var", scale=np.abs(rv_ref).max())


@pytest.mark.parametrize("shape,axis", SHAPES + [((1, 7, 1), 1), ((7,), 0)])  # one value per channel
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_inference_residual_relu_matches_reference(shape, axis, dtype, rng):
    name, dtype = dtype, _dtype(dtype)
    C = shape[axis]
    x = make_input(shape, dtype, rng, mean=5.0)
    z = make_input(shape, dtype, rng, mean=0.5)
    gamma, beta = make_params(C, rng)
    rm, rv = rng.uniform(3, 7, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    y = bn_forward(x, gamma, beta, rm, rv, training=False, axis=axis, activation="relu", residual=z,
                   backend="numba")
    ref = reference_forward(x, gamma, beta, rm, rv, training=False, axis=axis, activation="relu", residual=z)[0]
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "y", scale=np.abs(ref).max())
    if name in PRECISION:
        assert_rounded_once(y, ref, name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape,axis", [((4, 9, 6), 1), ((5, 7, 3, 4), 1), ((6, 5, 9), -1)])
@pytest.mark.parametrize("layout", ["strided x", "strided z", "fortran z", "both strided"])
def test_residual_of_any_strides(layout, shape, axis, dtype, rng):
    dtype = _dtype(dtype)
    base_x, base_z = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=-2.0)
    x = strided(base_x, rng) if layout in ("strided x", "both strided") else base_x
    z = strided(base_z, rng) if layout in ("strided z", "both strided") else base_z
    if layout == "fortran z":
        z = np.asfortranarray(base_z)
    z_before = np.array(z, copy=True)
    ref = reference_forward(base_x, axis=axis, activation="relu", residual=base_z)[0]
    for training in (True, False):
        if training:
            y = bn_forward(x, axis=axis, activation="relu", residual=z, backend="numba")
        else:
            rm, rv = np.full(shape[axis], 3.0, np.float32), np.full(shape[axis], 4.0, np.float32)
            y = bn_forward(x, None, None, rm, rv, training=False, axis=axis, activation="relu", residual=z,
                           backend="numba")
            ref = reference_forward(base_x, None, None, rm, rv, training=False, axis=axis, activation="relu",
                                    residual=base_z)[0]
        assert_close(y, ref, dtype, f"y training={training}", scale=np.abs(ref).max())
        np.testing.assert_array_equal(np.asarray(z, np.float64), np.asarray(z_before, np.float64))  # z only read


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape,axis", [((3, 16, 17), 1), ((129, 3, 7), 1), ((129, 17), 1)])
@pytest.mark.parametrize("strided_z", [False, True])
def test_out_is_the_residual_in_place(shape, axis, dtype, strided_z, rng):
    dtype = _dtype(dtype)
    x = make_input(shape, dtype, rng, mean=-4.0)
    base_z = make_input(shape, dtype, rng)
    gamma, beta = make_params(shape[axis], rng)
    rm, rv = rng.uniform(-5, -3, shape[axis]), rng.uniform(1, 3, shape[axis])
    for training in (True, False):
        z = strided(base_z, rng) if strided_z else base_z.copy()
        args = (x, gamma, beta) if training else (x, gamma, beta, rm, rv)
        expected = bn_forward(*args, training=training, axis=axis, activation="relu", residual=z.copy(),
                              backend="numba")
        y = bn_forward(*args, training=training, axis=axis, activation="relu", residual=z, out=z, backend="numba")
        assert y is z
        np.testing.assert_array_equal(np.asarray(z, np.float64), np.asarray(expected, np.float64))
        ref = reference_forward(*args, training=training, axis=axis, activation="relu", residual=base_z)[0]
        assert_close(z, ref, dtype, f"in place training={training}", scale=np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape,axis", [((2, 17, 15), 1), ((129, 3, 7), 1), ((16, 127), -1), ((4, 61, 3, 5), 1)])
def test_backward_through_relu_and_residual(shape, axis, dtype, rng):
    dtype = _dtype(dtype)
    C = shape[axis]
    x, z = make_input(shape, dtype, rng, mean=7.0), make_input(shape, dtype, rng, mean=0.0)
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    gamma, beta = make_params(C, rng)
    y, saved = bn_forward(x, gamma, beta, axis=axis, activation="relu", residual=z, backend="numba",
                          return_saved=True)
    assert (np.asarray(y, np.float64) == 0).any() and (np.asarray(y, np.float64) > 0).any()
    dx, dgamma, dbeta, dz = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, activation="relu", y=y,
                                        residual=True, backend="numba")
    g = np.where(np.asarray(y, np.float64) > 0, dy, np.zeros((), dtype)).astype(dtype)
    assert dz.dtype == dtype
    np.testing.assert_array_equal(dz.view(np.uint8), g.view(np.uint8))  # dy's bits where y > 0, +0 elsewhere
    rdx, rdg, rdb = reference_backward(g, x, saved.mean, saved.invstd, gamma, axis=axis)
    assert_close(dx, rdx, dtype, "dx", scale=np.abs(rdx).max())
    stat_dtype = np.float64 if dtype == np.float64 else np.float32
    assert_close(dgamma, rdg, stat_dtype, "dgamma", scale=np.abs(rdg).max())
    assert_close(dbeta, rdb, stat_dtype, "dbeta", scale=np.abs(rdb).max())
    np_dx = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, activation="relu", y=y, residual=True,
                        backend="numpy")[0]
    assert_close(dx, np.asarray(np_dx, np.float64), dtype, "dx against numpy", scale=np.abs(rdx).max())


def _special_values(dtype):
    """y values at the ReLU's edge: signed zeros, NaNs of both signs,
    infinities, the smallest subnormals, and ordinary values."""
    v = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0, 1e-30, -1e-30, 3.0, -2.5])
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        out = v.astype(dtype)
    tiny = np.array([1, 0x8001], np.uint16)  # smallest positive and negative subnormals (16-bit)
    if out.itemsize == 2:
        out = np.concatenate([out, tiny.view(dtype)])
    return out


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_relu_backward_at_the_edges_bit_for_bit(dtype):
    dtype = _dtype(dtype)
    y = _special_values(dtype)
    keep = {0: False, 1: False, 2: True, 3: True, 4: True, 5: False, 6: True, 7: False, 10: True, 11: False}
    dy = np.arange(1, y.size + 1).astype(dtype)
    dy[0] = np.array(np.nan).astype(dtype)  # a NaN gradient is kept as it is only where y > 0 or NaN
    g = nb.relu_backward(dy, y)
    assert g.dtype == dtype and g.shape == y.shape and g is not dy
    for i, kept in keep.items():
        expected = dy[i] if kept else np.zeros((), dtype)
        assert g[i:i + 1].view(np.uint8).tobytes() == np.asarray([expected], dtype).view(np.uint8).tobytes(), i
    np.testing.assert_array_equal(g.view(np.uint8), numpy_backend.relu_backward(dy, y).view(np.uint8))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("size", [1, 15, 16, 17, 127, 129, 10007])
def test_relu_backward_matches_numpy_on_sizes(size, dtype, rng):
    dtype = _dtype(dtype)
    dy, y = rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype)
    g = nb.relu_backward(dy, y)
    np.testing.assert_array_equal(g.view(np.uint8), numpy_backend.relu_backward(dy, y).view(np.uint8))
    assert ((np.asarray(g, np.float64) == 0) == (np.asarray(y, np.float64) <= 0)).all()


@pytest.mark.parametrize("layout", ["fortran dy", "strided dy", "strided y", "transposed y", "fortran both"])
def test_relu_backward_keeps_dy_memory_order(layout, rng):
    shape = (5, 4, 7)
    dy0 = make_input(shape, np.float32, rng, mean=0.0)
    y0 = make_input(shape, np.float32, rng, mean=0.0)
    dy, y = dy0, y0
    if layout in ("fortran dy", "fortran both"):
        dy = np.asfortranarray(dy0)
    if layout == "fortran both":
        y = np.asfortranarray(y0)
    if layout == "strided dy":
        dy = strided(dy0, rng)
    if layout == "strided y":
        y = strided(y0, rng)
    if layout == "transposed y":
        y = np.ascontiguousarray(y0.transpose(2, 0, 1)).transpose(1, 2, 0)
    g = nb.relu_backward(dy, y)
    np.testing.assert_array_equal(g, np.where(y0 > 0, dy0, np.float32(0)))
    assert g.flags.f_contiguous == dy.flags.f_contiguous and g.flags.c_contiguous == (not dy.flags.f_contiguous)


def test_bfloat16_statistics_and_plain_forward_backward(rng):
    """bfloat16 without a residual: statistics float32, y rounded once,
    backward against the reference, and the numpy backend agrees."""
    dtype = bfloat16()
    shape, axis = (6, 23, 19), 1
    x = make_input(shape, dtype, rng, mean=-30.0, std=4.0)
    dy = make_input(shape, dtype, rng, mean=0.0, std=1.0)
    gamma, beta = make_params(shape[axis], rng)
    y, saved = bn_forward(x, gamma, beta, axis=axis, backend="numba", return_saved=True)
    ref, mean, invstd = reference_forward(x, gamma, beta, axis=axis)[:3]
    assert saved.mean.dtype == np.float32
    assert_close(saved.mean, mean, np.float32, "mean", scale=np.abs(mean).max())
    assert_close(saved.invstd, invstd, np.float32, "invstd", scale=np.abs(invstd).max())
    assert_rounded_once(y, ref, "bfloat16")
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend="numba")
    rdx, rdg, rdb = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis)
    assert dx.dtype == dtype and dgamma.dtype == np.float32
    assert_rounded_once(dx, rdx, "bfloat16")
    assert_close(dgamma, rdg, np.float32, "dgamma", scale=np.abs(rdg).max())
    assert_close(dbeta, rdb, np.float32, "dbeta", scale=np.abs(rdb).max())
    np_dx = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend="numpy")[0]
    assert_close(dx, np.asarray(np_dx, np.float64), dtype, "dx against numpy", scale=np.abs(rdx).max())


@pytest.mark.parametrize("shape,axis", [((8, 6, 5, 7), 1), ((64, 17), 1)])
def test_bfloat16_against_torch(shape, axis, rng):
    """torch's own bfloat16 batch norm and add-ReLU on the same tensors,
    given to bn_forward as they are, and its autograd of the batch norm from
    the same gradient g (torch rounds bn(x) to bfloat16 before adding z, so
    its ReLU mask may differ where y is within rounding of 0): within a
    bfloat16 tolerance."""
    torch = pytest.importorskip("torch")
    dtype = bfloat16()
    C = shape[axis]
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)  # noqa: E731
    as64 = lambda t: t.detach().float().numpy().astype(np.float64)  # noqa: E731
    x, z = make_input(shape, dtype, rng, mean=2.0), make_input(shape, dtype, rng, mean=-0.5)
    dy = make_input(shape, dtype, rng, mean=0.0, std=1.0)
    gamma, beta = make_params(C, rng)
    gamma, beta = gamma.astype(dtype).astype(np.float32), beta.astype(dtype).astype(np.float32)  # exact in both
    y, saved = bn_forward(to_torch(x), gamma, beta, axis=axis, activation="relu", residual=to_torch(z),
                          backend="numba", return_saved=True)
    y = np.asarray(y)
    assert y.dtype == dtype
    xt = to_torch(x).requires_grad_()
    wt, bt = to_torch(gamma.astype(dtype)).requires_grad_(), to_torch(beta.astype(dtype)).requires_grad_()
    bn_t = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    y_t = as64(torch.relu(bn_t + to_torch(z)))
    assert_close(y, y_t, dtype, "y against torch", scale=np.abs(y_t).max())
    dx, dgamma, dbeta, dz = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, activation="relu", y=y,
                                        residual=True, backend="numba")
    np.testing.assert_array_equal(np.asarray(dz, np.float64), np.where(y.astype(np.float64) > 0,
                                                                       dy.astype(np.float64), 0))
    bn_t.backward(to_torch(dz))
    assert_close(dx, as64(xt.grad), dtype, "dx against torch", scale=np.abs(as64(xt.grad)).max())
    assert_close(dgamma, as64(wt.grad), dtype, "dgamma against torch", scale=np.abs(as64(wt.grad)).max())
    assert_close(dbeta, as64(bt.grad), dtype, "dbeta against torch", scale=np.abs(as64(bt.grad)).max())
