"""The numba-cuda backend's fused residual and bfloat16 (issue 13, items 1
and 11) against the float64 reference, under the CUDA simulator (and,
unchanged, on a GPU, marked ``gpu``).

- the residual: ``bn_forward(..., residual=z)`` [ReLU] (the
  ``apply_residual`` kernels) and ``bn_backward(..., activation="relu",
  y=y, residual=True)`` (the ``relu_backward`` kernel), through the public
  functions on Numba device arrays and on host arrays, and through the
  members on unaligned (offset) device arrays (the single-element paths);
- bfloat16: torch CUDA tensors cannot exist here, so the members take
  Numba device arrays of its bits marked bfloat16 (``numba_cuda.as_bfloat16``)
  and the public functions NumPy bfloat16 arrays (ml_dtypes; the adapter
  moves their bits); the conversions themselves against ml_dtypes, bit for
  bit, by a kernel of the same load/store helpers.

Shapes straddle the kernels' vector of 8 elements: totals 1, 15, 16, 17,
127, 129 elements, planes of 16, 17, 127, 129 values (unaligned from the
second channel on) and channel-fastest rows (``inner == 1``).
Launches are shrunk and buffers poisoned as in ``test_numba_cuda_backend``.
"""
import numpy as np
import pytest
from numba import config, cuda

from bnkernels import bn_backward, bn_forward
from bnkernels.backends import numba_cuda as nc
from bnkernels.reference import reference_backward, reference_forward
from bnkernels.validation import channel_layout
from helpers import assert_close, bfloat16, gpu_tunings, make_input, make_params, tiny_device

BACKEND = "numba-cuda"
TUNING = gpu_tunings()["2warps"]

#: (shape, axis): rows (inner 1, channel-fastest) and planes around VEC = 8.
SHAPES = [((2, 1), 1), ((3, 5), 1), ((2, 8), 1), ((5, 16, 3), -1), ((4, 3, 16), 1), ((2, 3, 17), 1),
          ((2, 2, 127), 1), ((2, 129), 0)]
SIZES = [1, 15, 16, 17, 127, 129]


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    limits = tiny_device(TUNING)
    monkeypatch.setattr(nc, "TUNING", TUNING)
    monkeypatch.setattr(nc, "_limits", lambda: limits)
    monkeypatch.setenv(nc.POISON_ENV, "1")


def _dtype(name):
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def _bits_to_device(a):
    """A host bfloat16 array as a bfloat16 operand of the members (its bits on the device)."""
    return nc.as_bfloat16(cuda.to_device(np.ascontiguousarray(a).view(np.int16)))


def _host(a):
    """A members' result on the host (int16 device arrays: bfloat16 bits)."""
    h = a.copy_to_host() if cuda.devicearray.is_cuda_ndarray(a) else np.asarray(a)
    return h.view(bfloat16()) if h.dtype == np.int16 else h


def _offset(a):
    """``a`` on the device at an address 1 element past a 16-byte boundary
    (the kernels' single-element paths)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    bits = flat.view(np.int16) if flat.dtype.name == "bfloat16" else flat
    base = cuda.to_device(np.concatenate([bits[:1], bits]))
    return base[1:].reshape(a.shape)


# --- the residual ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
def test_residual_forward_on_device_arrays(shape, axis, dtype, training, rng):
    dtype = _dtype(dtype)
    C = shape[axis]
    x, z = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=-2.0, std=3.0)
    gamma, beta = make_params(C, rng)
    sdt = np.float64 if dtype == np.float64 else np.float32  # (float32 statistics: float32 coefficients)
    rm0, rv0 = rng.standard_normal(C).astype(sdt), rng.uniform(0.5, 2, C).astype(sdt)
    for relu in (None, "relu"):
        rm, rv = cuda.to_device(rm0), cuda.to_device(rv0)
        y, saved = bn_forward(cuda.to_device(x), gamma, beta, rm, rv, training=training, axis=axis,
                              activation=relu, residual=cuda.to_device(z), backend=BACKEND, return_saved=True)
        assert cuda.devicearray.is_cuda_ndarray(y) and y.dtype == dtype and y.shape == shape
        y_ref, _, _, rm_ref, rv_ref = reference_forward(x, gamma, beta, rm0, rv0, training=training, axis=axis,
                                                        activation=relu, residual=z)
        y = y.copy_to_host()
        assert_close(y, y_ref, dtype, "y", scale=np.abs(y_ref).max())
        if relu:
            assert (y >= 0).all()
        assert_close(rm.copy_to_host(), rm_ref, np.float32, "running_mean", scale=np.abs(rm_ref).max() + 1)
        assert_close(rv.copy_to_host(), rv_ref, np.float32, "running_var", scale=np.abs(rv_ref).max() + 1)


@pytest.mark.parametrize("shape,axis", [((4, 3, 16), 1), ((2, 3, 17), 1), ((5, 16, 3), -1), ((3, 5), 1)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_residual_forward_unaligned_through_the_members(shape, axis, dtype, rng):
    """x, z offset by one element from 16-byte alignment (the scalar loop);
    also z alone offset (the vector path needs every pointer aligned)."""
    dtype = _dtype(dtype)
    C = shape[axis]
    lay = channel_layout(shape, axis)
    x, z = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=-2.0, std=3.0)
    gamma, beta = make_params(C, rng)
    wrap = nc.as_bfloat16 if dtype.name == "bfloat16" else (lambda a: a)
    y_ref = reference_forward(x, gamma, beta, axis=axis, activation="relu", residual=z)[0]
    for xd, zd in ((_offset(x), _offset(z)), (cuda.to_device(_bits(x)), _offset(z))):
        y, mean, invstd = nc.forward_train(wrap(xd), lay, gamma, beta, 1e-5, True, None, residual=wrap(zd))
        assert_close(_host(y), y_ref, dtype, "y", scale=np.abs(y_ref).max())


def _bits(a):
    return a.view(np.int16) if a.dtype.name == "bfloat16" else a


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("aligned", [True, False])
def test_relu_backward_nan_zero_negative(size, dtype, aligned, rng):
    """g = dy where not y <= 0: NaN y passes dy, +-0 and negative y give +0;
    dy itself (NaN, -0 included) goes through unchanged."""
    dtype = _dtype(dtype)
    dy = rng.standard_normal(size).astype(dtype)
    y = rng.standard_normal(size).astype(dtype)
    specials = [np.nan, 0.0, -0.0, -1.5, 2.0, np.inf, -np.inf]
    y[:min(size, len(specials))] = np.array(specials[:size], np.float64).astype(dtype)
    dy[size // 2] = np.array(-0.0).astype(dtype)
    if size > 3:
        dy[-1] = np.array(np.nan).astype(dtype)
        y[-1] = np.array(1.0).astype(dtype)
    move = (lambda a: cuda.to_device(_bits(a))) if aligned else _offset
    wrap = nc.as_bfloat16 if dtype.name == "bfloat16" else (lambda a: a)
    g = _host(nc.relu_backward(wrap(move(dy)), wrap(move(y))))
    want = dy.copy()
    want[np.asarray(y, np.float64) <= 0] = 0
    assert g.dtype == dtype and g.shape == (size,)
    np.testing.assert_array_equal(np.isnan(np.asarray(g, np.float64)), np.isnan(np.asarray(want, np.float64)))
    ok = ~np.isnan(np.asarray(want, np.float64))
    np.testing.assert_array_equal(_bits(g)[ok].view(np.uint8), _bits(want)[ok].view(np.uint8))


@pytest.mark.parametrize("shape,axis", [((4, 3, 16), 1), ((2, 3, 17), 1), ((5, 16, 3), -1), ((2, 1), 1)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
def test_residual_backward_on_device_arrays(shape, axis, dtype, training, rng):
    dtype = _dtype(dtype)
    C = shape[axis]
    x, z = make_input(shape, dtype, rng), make_input(shape, dtype, rng, mean=-0.5)
    dy = make_input(shape, dtype, rng, mean=0.2, std=1.0)
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    y, saved = bn_forward(cuda.to_device(x), gamma, beta, cuda.to_device(rm), cuda.to_device(rv),
                          training=training, axis=axis, activation="relu", residual=cuda.to_device(z),
                          backend=BACKEND, return_saved=True)
    y_host = y.copy_to_host()
    y[:1] = np.zeros(1, dtype)  # a zero output: its gradient stops
    y_host[:1] = 0
    dx, dgamma, dbeta, dz = bn_backward(cuda.to_device(dy), cuda.to_device(x), saved.mean, saved.invstd, gamma,
                                        axis=axis, training=training, activation="relu", y=y, residual=True,
                                        backend=BACKEND)
    g = np.where(y_host <= 0, 0, dy).astype(dtype)
    np.testing.assert_array_equal(dz.copy_to_host(), g)
    mean, invstd = saved.mean.copy_to_host(), saved.invstd.copy_to_host()
    rdx, rdgamma, rdbeta = reference_backward(g, x, mean, invstd, gamma, axis=axis, training=training)
    assert_close(dx.copy_to_host(), rdx, dtype, "dx", scale=np.abs(rdx).max() + 1)
    assert_close(dgamma.copy_to_host(), rdgamma, dtype, "dgamma", scale=np.abs(rdgamma).max() + 1)
    assert_close(dbeta.copy_to_host(), rdbeta, dtype, "dbeta", scale=np.abs(rdbeta).max() + 1)


# --- bfloat16 ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", SHAPES)
def test_bf16_stats_apply_backward_through_the_members(shape, axis, rng):
    bf16 = bfloat16()
    C = shape[axis]
    lay = channel_layout(shape, axis)
    x = make_input(shape, bf16, rng)
    dy = make_input(shape, bf16, rng, mean=0.5, std=1.0)
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    y_ref, mean_ref, invstd_ref, rm_ref, rv_ref = reference_forward(x, gamma, beta, rm, rv, axis=axis)
    run = (cuda.to_device(rm), cuda.to_device(rv), 0.1)
    y, mean, invstd = nc.forward_train(_bits_to_device(x), lay, gamma, beta, 1e-5, False, run)
    assert y.dtype == np.int16 and mean.dtype == invstd.dtype == np.float32
    assert_close(_host(y).reshape(shape), y_ref, bf16, "y", scale=np.abs(y_ref).max())
    mean, invstd = mean.copy_to_host(), invstd.copy_to_host()
    assert_close(mean, mean_ref, np.float32, "mean", scale=np.abs(mean_ref).max() + 1)
    assert_close(invstd, invstd_ref, np.float32, "invstd", scale=np.abs(invstd_ref).max())
    assert_close(run[0].copy_to_host(), rm_ref, np.float32, "running_mean", scale=np.abs(rm_ref).max() + 1)
    assert_close(run[1].copy_to_host(), rv_ref, np.float32, "running_var", scale=np.abs(rv_ref).max() + 1)
    moments = nc.statistics(_bits_to_device(x), lay)
    assert_close(moments.mean, mean_ref, np.float32, "statistics.mean", scale=np.abs(mean_ref).max() + 1)
    assert moments.count == x.size // C

    dx, dgamma, dbeta = nc.backward(_bits_to_device(dy), _bits_to_device(x), lay, mean, invstd, gamma)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, mean, invstd, gamma, axis=axis)
    assert dx.dtype == np.int16 and dgamma.dtype == np.float32
    assert_close(_host(dx).reshape(shape), rdx, bf16, "dx", scale=np.abs(rdx).max() + 1)
    assert_close(dgamma.copy_to_host(), rdgamma, np.float32, "dgamma", scale=np.abs(rdgamma).max() + 1)
    assert_close(dbeta.copy_to_host(), rdbeta, np.float32, "dbeta", scale=np.abs(rdbeta).max() + 1)


@pytest.mark.parametrize("shape,axis", [((4, 3, 16), 1), ((2, 3, 17), 1), ((5, 16, 3), -1), ((2, 129), 0)])
@pytest.mark.parametrize("training", [True, False])
def test_bf16_public_functions_on_host_arrays(shape, axis, training, rng):
    """NumPy bfloat16 through bn_forward/bn_backward (residual and ReLU
    too): the adapter moves the bits and returns bfloat16 arrays."""
    bf16 = bfloat16()
    C = shape[axis]
    x, z = make_input(shape, bf16, rng), make_input(shape, bf16, rng, mean=-2.0, std=3.0)
    dy = make_input(shape, bf16, rng, mean=0.2, std=1.0)
    gamma, beta = make_params(C, rng)
    rm0, rv0 = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    rm, rv = rm0.copy(), rv0.copy()
    y, saved = bn_forward(x, gamma, beta, rm, rv, training=training, axis=axis, activation="relu", residual=z,
                          backend=BACKEND, return_saved=True)
    y_ref, _, _, rm_ref, rv_ref = reference_forward(x, gamma, beta, rm0, rv0, training=training, axis=axis,
                                                    activation="relu", residual=z)
    assert y.dtype == bf16 and y.shape == shape and saved.mean.dtype == np.float32
    assert_close(y, y_ref, bf16, "y", scale=np.abs(y_ref).max())
    assert_close(rm, rm_ref, np.float32, "running_mean", scale=np.abs(rm_ref).max() + 1)
    assert_close(rv, rv_ref, np.float32, "running_var", scale=np.abs(rv_ref).max() + 1)
    dx, dgamma, dbeta, dz = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, training=training,
                                        activation="relu", y=y, residual=True, backend=BACKEND)
    g = np.where(np.asarray(y, np.float64) <= 0, 0, dy).astype(bf16)
    assert dz.dtype == bf16 and dx.dtype == bf16
    np.testing.assert_array_equal(dz.view(np.int16), g.view(np.int16))
    rdx, rdgamma, rdbeta = reference_backward(g, x, saved.mean, saved.invstd, gamma, axis=axis, training=training)
    assert_close(dx, rdx, bf16, "dx", scale=np.abs(rdx).max() + 1)
    assert_close(dgamma, rdgamma, np.float32, "dgamma", scale=np.abs(rdgamma).max() + 1)
    assert_close(dbeta, rdbeta, np.float32, "dbeta", scale=np.abs(rdbeta).max() + 1)


def _conversion_kernel():
    from bnkernels.backends.numba_cuda.vectors import VEC, load1, load8, store1, store8

    @cuda.jit
    def convert(src, dst, back):  # float32 -> bfloat16 bits (vectors, then singles) -> float32
        v = cuda.grid(1)
        n = src.size // VEC
        if v < n:
            a0, a1, a2, a3, a4, a5, a6, a7 = load8(src, v)
            store8(dst, v, a0, a1, a2, a3, a4, a5, a6, a7)
            b0, b1, b2, b3, b4, b5, b6, b7 = load8(dst, v)
            store8(back, v, b0, b1, b2, b3, b4, b5, b6, b7)
        elif v == n:
            for i in range(n * VEC, src.size):
                store1(dst, i, load1(src, i))
                store1(back, i, load1(dst, i))

    return convert


def test_bf16_conversions_match_ml_dtypes_bit_for_bit(rng):
    """Rounding to nearest even (ties both ways), overflow to Inf, the
    largest finite value, subnormals, signed zeros, NaN (quiet), by the
    16-byte and the single-element paths."""
    bf16 = bfloat16()
    u = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F800000,
                  0xFF800000, 0x7F800001, 0xFFC00001, 0x7FC00000, 0x00000001, 0x00008000, 0x00018000,
                  0x80000000, 0x00000000, 0xBF808000, 0x80010001], np.uint32)
    values = np.concatenate([u.view(np.float32), rng.standard_normal(40).astype(np.float32) * 1e3,
                             rng.standard_normal(5).astype(np.float32)])
    src = cuda.to_device(values)
    dst = cuda.to_device(np.zeros(values.size, np.int16))
    back = cuda.to_device(np.zeros(values.size, np.float32))
    _conversion_kernel()[1, 64](src, dst, back)
    got = dst.copy_to_host()
    with np.errstate(invalid="ignore"):  # ml_dtypes warns about NaN
        want = values.astype(bf16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want.view(np.int16)[~nan])
    # NaN: a quiet NaN (simulator: that of its sign, as ml_dtypes gives; the
    # device's cvt.rn.bf16x2.f32: the canonical 0x7FFF)
    assert ((got[nan].view(np.uint16) & 0x7FC0) == 0x7FC0).all(), got[nan].view(np.uint16)
    if config.ENABLE_CUDASIM:
        np.testing.assert_array_equal(got[nan].view(np.uint16), np.where(np.signbit(values[nan]), 0xFFC0, 0x7FC0))
    np.testing.assert_array_equal(back.copy_to_host()[~nan], want.astype(np.float32)[~nan])


@pytest.mark.parametrize("idx", ["uint32", "uint64"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("outer,C,inner", [(3, 5, 11), (2, 3, 8), (4, 6, 1), (1, 1, 37)])
@pytest.mark.parametrize("offset", [0, 1])
def test_apply_residual_kernels_straight(outer, C, inner, offset, dtype, idx, rng):
    """``apply_residual_planes``/``_rows`` of both index widths: 16-byte
    aligned arrays take the vector path, arrays one element off alignment
    (``offset``) single elements only."""
    import numba
    from bnkernels.backends.numba_cuda import kernels

    dtype = _dtype(dtype)
    ks = kernels.get_kernels(numba.float64 if dtype == np.float64 else numba.float32, getattr(numba, idx))
    acc_np = np.float64 if dtype == np.float64 else np.float32
    total = outer * C * inner
    x, z = make_input((total,), dtype, rng), make_input((total,), dtype, rng, mean=-3.0)
    k, scale, shift = (rng.standard_normal(C).astype(acc_np) for _ in range(3))
    kernel = ks.apply_residual_planes if inner >= kernels.VEC else ks.apply_residual_rows
    move = (lambda a: cuda.to_device(_bits(a))) if not offset else _offset
    for relu in (0, 1):
        y = move(np.full(total, np.nan, dtype))
        kernel[2, 32](move(x), move(z), y, C, inner, *(cuda.to_device(a) for a in (k, scale, shift)), relu)
        xs = np.asarray(x, np.float64).reshape(-1, C, inner)
        want = (xs - k[None, :, None]) * scale[None, :, None] + shift[None, :, None]
        want = want.reshape(-1) + np.asarray(z, np.float64)
        want = np.where(want < 0, 0, want) if relu else want
        assert_close(_host(y), want, dtype, "y", scale=np.abs(want).max())
