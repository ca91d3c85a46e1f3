"""The numba-cuda backend against the float64 reference.

Runs under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, its own pytest
process: see ci/test.sh) and, unchanged, on a real GPU (marked ``gpu``).
Launches are shrunk (``TUNING``) so that every reduction uses several blocks
per channel group: the staging buffer and the last-block merge really run.
Every buffer the backend allocates is poisoned with NaN first
(``BNKERNELS_POISON=1``), so an element no kernel writes fails the test.
"""
import numpy as np
import pytest
from numba import cuda

from bnkernels import bn_backward, bn_forward, channel_stats
from bnkernels.backends import numba_cuda as nc
from bnkernels.backends.gpu import geometry
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from bnkernels.validation import channel_layout
from engine_checks import check_split_batch
from helpers import DTYPES, GPU_CASES, assert_close, gpu_tunings, make_input, make_params, tiny_device

BACKEND = "numba-cuda"

TUNINGS = gpu_tunings()
CASES = GPU_CASES


@pytest.fixture(params=list(TUNINGS), autouse=True)
def small_launches(request, monkeypatch):
    """Shrunk launches on a tiny device (see ``helpers.tiny_device``)."""
    tuning = TUNINGS[request.param]
    limits = tiny_device(tuning)
    monkeypatch.setattr(nc, "TUNING", tuning)
    monkeypatch.setattr(nc, "_limits", lambda: limits)
    monkeypatch.setenv(nc.POISON_ENV, "1")
    return tuning


def _splits(shape, axis, tuning):
    lay = channel_layout(shape, axis)
    return geometry.reduce_plan(lay.outer, lay.channels, lay.inner, nc._limits(), tuning).splits


@pytest.mark.parametrize("shape,axis", CASES)
def test_plans_use_several_blocks_per_channel(shape, axis, small_launches):
    assert _splits(shape, axis, small_launches) > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_training_forward_and_backward(shape, axis, dtype, rng):
    x = make_input(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    ref = reference_forward(x, gamma, beta, rm, rv, axis=axis)
    y, saved = bn_forward(x, gamma, beta, rm, rv, axis=axis, backend=BACKEND, return_saved=True)
    assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref[0], dtype, "y")
    assert_close(saved.mean, ref[1], dtype, "saved.mean", scale=np.abs(ref[1]).max() + 1)
    assert_close(saved.invstd, ref[2], dtype, "saved.invstd")
    assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
    assert_close(rv, ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)

    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=BACKEND)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis)
    n = x.size // C
    term = float(np.abs(dy.astype(np.float64)).max() * gamma.max() * saved.invstd.astype(np.float64).max())
    assert_close(dx, rdx, dtype, "dx", scale=3 * term)
    assert_close(dbeta, rdbeta, dtype, "dbeta", scale=np.abs(dy.astype(np.float64)).max() * n)
    assert_close(dgamma, rdgamma, dtype, "dgamma", scale=4 * np.abs(dy.astype(np.float64)).max() * n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [CASES[0], CASES[3]])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_inference(shape, axis, dtype, activation, rng):
    x = make_input(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm = (3 + rng.standard_normal(C)).astype(np.float64)  # float64 running stats too
    rv = rng.uniform(0.5, 8, C)
    y, saved = bn_forward(x, gamma, beta, rm, rv, training=False, axis=axis, activation=activation,
                          backend=BACKEND, return_saved=True)
    ref = reference_forward(x, gamma, beta, rm, rv, training=False, axis=axis, activation=activation)
    assert_close(y, ref[0], dtype, "y")
    assert_close(saved.invstd, ref[2], dtype, "saved.invstd")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum,activation", [(0.1, "relu"), (None, None), (1.0, None)])
def test_options(affine, momentum, activation, rng):
    x = make_input((4, 3, 6), np.float32, rng)
    gamma, beta = make_params(3, rng) if affine else (None, None)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    nbt = 2 if momentum is None else None
    ref = reference_forward(x, gamma, beta, rm, rv, momentum=momentum, activation=activation,
                            num_batches_tracked=nbt)
    y = bn_forward(x, gamma, beta, rm, rv, momentum=momentum, activation=activation, backend=BACKEND,
                   num_batches_tracked=nbt)
    assert_close(y, ref[0], np.float32, "y")
    assert_close(rm, ref[3], np.float32, "running_mean")
    assert_close(rv, ref[4], np.float32, "running_var")


@pytest.mark.parametrize("shape,axis", [((16, 3, 8), 1), ((64, 3), 1)])
def test_large_mean_float32_is_exact(shape, axis, rng):
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    y = bn_forward(x, axis=axis, backend=BACKEND)
    err = np.abs(y.astype(np.float64) - reference_forward(x, axis=axis)[0]).max()
    assert err <= 1e-4, f"max error {err:.3g} batch stds"


def test_device_arrays_in_place_and_returned_as_device_arrays(rng):
    x = make_input((6, 3, 5), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ref = reference_forward(x, None, None, rm, rv)
    d_x, d_rm, d_rv = cuda.to_device(x), cuda.to_device(rm), cuda.to_device(rv)
    y, saved = bn_forward(d_x, None, None, d_rm, d_rv, backend=BACKEND, return_saved=True)
    assert cuda.devicearray.is_cuda_ndarray(y) and cuda.devicearray.is_cuda_ndarray(saved.mean)
    assert_close(y.copy_to_host(), ref[0], np.float32, "y")
    assert_close(d_rm.copy_to_host(), ref[3], np.float32, "running_mean (device, in place)")
    assert_close(d_rv.copy_to_host(), ref[4], np.float32, "running_var (device, in place)")
    np.testing.assert_array_equal(d_x.copy_to_host(), x)


def test_out_host_and_device(rng):
    """``out=``: a host buffer for host input, a device array for device
    input (written by a device-to-device copy), and dx in place into dy."""
    x = make_input((6, 3, 5), np.float32, rng)
    dy = make_input(x.shape, np.float32, rng)
    ref = reference_forward(x)
    out = np.full_like(x, np.nan)
    y, saved = bn_forward(x, backend=BACKEND, out=out, return_saved=True)
    assert y is out
    assert_close(out, ref[0], np.float32, "y (host out)")
    d_x, d_out = cuda.to_device(x), cuda.to_device(np.full_like(x, np.nan))
    assert bn_forward(d_x, backend=BACKEND, out=d_out) is d_out
    assert_close(d_out.copy_to_host(), ref[0], np.float32, "y (device out)")
    rdx = reference_backward(dy, x, saved.mean, saved.invstd)[0]
    dx = bn_backward(dy, x, saved.mean, saved.invstd, backend=BACKEND, out=dy)[0]
    assert dx is dy
    assert_close(dy, rdx, np.float32, "dx (in place into dy)", scale=np.abs(rdx).max())
    with pytest.raises(TypeError, match=f"out must be a {type(d_x).__name__} like x"):
        bn_forward(d_x, backend=BACKEND, out=out)


def test_strided_host_input(rng):
    base = make_input((5, 3, 8), np.float32, rng)
    x = base[:, :, ::2]
    y = bn_forward(x, backend=BACKEND)
    assert_close(y, reference_forward(x)[0], np.float32, "y")


def test_repeated_launches_reset_the_counters(rng):
    """The last block of each group zeroes its counter: a second launch
    must find them zero again (else no block would finalize)."""
    x = make_input((9, 3, 4), np.float32, rng)
    for _ in range(2):
        assert_close(bn_forward(x, backend=BACKEND), reference_forward(x)[0], np.float32, "y")
    counters = next(iter(nc._counters.values())).copy_to_host()
    assert not counters.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_stats(dtype, rng):
    x = make_input((7, 4, 5), dtype, rng, mean=50.0)
    s = channel_stats(x, backend=BACKEND)
    n, mean, var = reference_stats(x)
    assert s.count == n
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(s.mean, mean, rtol=rtol)
    np.testing.assert_allclose(s.var, var, rtol=100 * rtol)


def test_empty_inference_batch():
    y = bn_forward(np.zeros((0, 3), np.float32), None, None, np.zeros(3), np.ones(3), training=False,
                   backend=BACKEND)
    assert y.shape == (0, 3)


ON_SIMULATOR = cuda.jit.__module__.startswith("numba.cuda.simulator")
real_gpu_only = pytest.mark.skipif(ON_SIMULATOR, reason="CuPy arrays and torch CUDA tensors need a real GPU")


@real_gpu_only
def test_cupy_in_cupy_out(rng):
    cp = pytest.importorskip("cupy")
    x = make_input((8, 3, 5, 5), np.float32, rng)
    rm, rv = cp.zeros(3, cp.float32), cp.ones(3, cp.float32)
    y, saved = bn_forward(cp.asarray(x), None, None, rm, rv, backend=BACKEND, return_saved=True)
    assert isinstance(y, cp.ndarray) and isinstance(saved.mean, cp.ndarray)
    ref = reference_forward(x, None, None, np.zeros(3), np.ones(3))
    assert_close(cp.asnumpy(y), ref[0], np.float32, "y")
    assert_close(cp.asnumpy(rm), ref[3], np.float32, "running_mean (CuPy, in place)")
    # channels-last view of the same data: non-contiguous on the device
    yl = bn_forward(cp.asarray(x).transpose(0, 2, 3, 1), axis=-1, backend=BACKEND)
    assert_close(cp.asnumpy(yl).transpose(0, 3, 1, 2), ref[0], np.float32, "y (transposed CuPy)")


@real_gpu_only
def test_torch_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    x = make_input((8, 3, 5, 5), np.float32, rng)
    y = bn_forward(torch.from_numpy(x).cuda(), backend="auto")  # auto: a GPU array goes to a GPU backend
    assert isinstance(y, torch.Tensor) and y.is_cuda
    assert_close(y.cpu().numpy(), reference_forward(x)[0], np.float32, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,cuts", [((6, 3, 5), 1, [2]), ((9, 17), -1, [4, 5]), ((4, 3), 1, [])])
def test_staged_path_of_a_split_batch(shape, axis, cuts, dtype, rng):
    """The engine's stages (statistics, exchange, finalize, normalize;
    backward reduce, exchange, backward apply) on parts of a batch give
    the whole batch's result (``tests/engine_checks.py``)."""
    check_split_batch(BACKEND, shape, axis, dtype, cuts, rng)


def test_workspace_reuse_across_calls_and_shapes(rng):
    """The workspace of a plan is kept between calls: calls with new data,
    other shapes in between and back, each give their own right result."""
    for shape in [(6, 3, 5), (4, 5, 3), (6, 3, 5), (6, 3, 5)]:
        x = make_input(shape, np.float32, rng)
        dy = make_input(shape, np.float32, rng, mean=0.5)
        y, saved = bn_forward(x, axis=1, backend=BACKEND, return_saved=True)
        ref = reference_forward(x)
        assert_close(y, ref[0], np.float32, "y")
        dx, dg, db = bn_backward(dy, x, saved.mean, saved.invstd, axis=1, backend=BACKEND)
        rdx, rdg, rdb = reference_backward(dy, x, saved.mean, saved.invstd)
        assert_close(dx, rdx, np.float32, "dx", scale=10)
        assert_close(db, rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepared_calls_on_device_arrays(dtype, rng, monkeypatch):
    """``prepare_forward`` / ``prepare_backward`` on Numba device arrays:
    the bound launches (``gpu.plans.Program``) give the reference's results
    call after call (float64 input with float32 gamma is unlike the
    kernels' dtype: those calls take the plain path)."""
    from bnkernels import prepare_backward, prepare_forward
    from bnkernels.backends.gpu import plans

    programs = []
    run = plans.Program.__call__
    monkeypatch.setattr(plans.Program, "__call__", lambda self, *a: programs.append(self) or run(self, *a))

    shape, C = (6, 3, 5), 3
    gamma, beta = make_params(C, rng)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    d_g, d_b, d_rm, d_rv = (cuda.to_device(a) for a in (gamma, beta, rm, rv))
    forward = prepare_forward(cuda.to_device(make_input(shape, dtype, rng)), d_g, d_b, d_rm, d_rv,
                              backend=BACKEND)
    for _ in range(2):
        x = make_input(shape, dtype, rng)
        ref = reference_forward(x, gamma, beta, d_rm.copy_to_host(), d_rv.copy_to_host())
        y, saved = forward(cuda.to_device(x), d_g, d_b, d_rm, d_rv)
        assert_close(y.copy_to_host(), ref[0], dtype, "y")
        assert_close(d_rm.copy_to_host(), ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
    dy = make_input(shape, dtype, rng, mean=0.5)
    backward = prepare_backward(cuda.to_device(dy), cuda.to_device(x), saved.mean, saved.invstd, d_g,
                                backend=BACKEND)
    dx, dg, db = backward(cuda.to_device(dy), cuda.to_device(x), saved.mean, saved.invstd, d_g)
    rdx, _, rdb = reference_backward(dy, x, saved.mean.copy_to_host(), saved.invstd.copy_to_host(), gamma)
    assert_close(dx.copy_to_host(), rdx, dtype, "dx", scale=10)
    assert_close(db.copy_to_host(), rdb, dtype, "dbeta", scale=np.abs(rdb).max() + 1)
    assert len(programs) == (0 if dtype == np.float64 else 3)


# --------------------------------------------------------------------------
# The kernel variants bind.py chooses among: index width, vector paths
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [CASES[0], CASES[2], CASES[3]])
def test_64_bit_index_kernels(shape, axis, dtype, rng, monkeypatch):
    """The uint64-index kernels, which bind.py takes for tensors near or
    over 2^31 elements only, give the same results (here forced on small
    data: every launch then exceeds the limit)."""
    from bnkernels.backends.numba_cuda import bind

    chosen = []
    index_type = bind.index_type
    monkeypatch.setattr(bind, "INDEX32_LIMIT", 0)
    monkeypatch.setattr(bind, "index_type", lambda launch: chosen.append(index_type(launch)) or chosen[-1])
    x = make_input(shape, dtype, rng)
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    ref = reference_forward(x, gamma, beta, axis=axis)
    y, saved = bn_forward(x, gamma, beta, axis=axis, backend=BACKEND, return_saved=True)
    assert_close(y, ref[0], dtype, "y")
    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend=BACKEND)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis)
    term = float(np.abs(dy.astype(np.float64)).max() * gamma.max() * saved.invstd.astype(np.float64).max())
    n = x.size // C
    assert_close(dx, rdx, dtype, "dx", scale=3 * term)
    assert_close(dbeta, rdbeta, dtype, "dbeta", scale=np.abs(dy.astype(np.float64)).max() * n)
    import numba

    assert chosen and set(chosen) == {numba.uint64}


def test_index_width_follows_the_launch_size():
    from bnkernels.backends.gpu.plans import Launch
    from bnkernels.backends.numba_cuda import bind
    import numba

    def stats(outer, C, inner, grid=(64, 1, 1), block=(1, 256, 1)):
        args = {"outer": np.int64(outer), "channels": np.int64(C), "inner": np.int64(inner)}
        return Launch("stats", grid, block, args)

    def apply(total, grid=(2112, 1, 1), block=(256, 1, 1)):
        return Launch("apply", grid, block, {"total": np.int64(total), "inner": np.int64(1)})

    assert bind.index_type(stats(128, 64, 56 * 56)) == numba.uint32  # a ResNet activation
    assert bind.index_type(stats(1, 1, 2**31)) == numba.uint64
    assert bind.index_type(stats(2**20, 2**10, 1)) == numba.uint32  # 2^30 values + the steps past the end
    assert bind.index_type(stats(2**21 - 1, 2**10, 1)) == numba.uint64  # just under 2^31 values: the steps
    assert bind.index_type(apply(2**30)) == numba.uint32
    assert bind.index_type(apply(2**31 - 1000)) == numba.uint64


def _apply_reference(x, C, inner, k, scale, shift, relu):
    xs = x.astype(np.float64).reshape(-1, C, inner)
    y = (xs - k[None, :, None]) * scale[None, :, None] + shift[None, :, None]
    return (np.where(y < 0, 0, y) if relu else y).reshape(-1)


@pytest.mark.parametrize("idx", ["uint32", "uint64"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outer,C,inner", [(3, 5, 11), (2, 3, 8), (4, 6, 1), (3, 2, 5), (1, 1, 37)])
@pytest.mark.parametrize("offset", [0, 1])
def test_apply_and_dx_vector_and_scalar_paths(outer, C, inner, offset, dtype, idx, rng):
    """The elementwise kernels straight: 16-byte aligned arrays take the
    vector path (a vector's elements in one or two channels, or tracked one
    by one when ``inner < VEC``) and the rest single elements; arrays one
    element off alignment (``offset``) take single elements only."""
    import numba
    from bnkernels.backends.numba_cuda import kernels

    idx = getattr(numba, idx)
    acc = numba.float64 if dtype == np.float64 else numba.float32
    acc_np = np.float64 if dtype == np.float64 else np.float32
    ks = kernels.get_kernels(acc, idx)
    planes = inner >= kernels.VEC
    total = outer * C * inner
    x = make_input((total + offset,), dtype, rng)
    dy = make_input((total + offset,), dtype, rng, mean=0.5)
    k, scale, shift = (rng.standard_normal(C).astype(acc_np) for _ in range(3))
    b, cc = rng.standard_normal(C).astype(acc_np), rng.standard_normal(C).astype(acc_np)
    d_x, d_dy = cuda.to_device(x)[offset:], cuda.to_device(dy)[offset:]
    xv, dyv = x[offset:], dy[offset:]
    for relu in (0, 1):
        d_y = cuda.to_device(np.full(total + offset, np.nan, dtype))[offset:]
        apply = ks.apply_planes if planes else ks.apply_rows
        apply[2, 32](d_x, d_y, C, inner, cuda.to_device(k), cuda.to_device(scale), cuda.to_device(shift), relu)
        assert_close(d_y.copy_to_host(), _apply_reference(xv, C, inner, k, scale, shift, relu), dtype, "y")
    d_out = cuda.to_device(np.full(total + offset, np.nan, dtype))[offset:]
    dx = ks.dx_planes if planes else ks.dx_rows
    dx[2, 32](d_dy, d_x, d_out, C, inner, *(cuda.to_device(a) for a in (k, scale, b, cc)))
    expected = (dyv.astype(np.float64).reshape(-1, C, inner) * scale[None, :, None]
                + _apply_reference(xv, C, inner, k, b, cc, 0).reshape(-1, C, inner))
    assert_close(d_out.copy_to_host(), expected.reshape(-1), dtype, "dx", scale=10)


def test_vector_path_alignment_check():
    """``aligned16`` reads the data pointers (in the simulator: the NumPy
    arrays' addresses, as on the device)."""
    from bnkernels.backends.numba_cuda import kernels

    if not ON_SIMULATOR:
        pytest.skip("the simulator's Python alignment check")
    a = np.zeros(64, np.float32)
    base = a.__array_interface__["data"][0]
    view = a[(-base % 16) // 4:]
    assert kernels.aligned16(view, view)
    assert not kernels.aligned16(view[1:], view)
