"""The CuPy backend's CUDA C++ kernels (``kernels/*.cu``), unchanged,
executed on the CPU by the host harness (``cuda_host.h``), driven by the very
launch sequences the backend runs (``plans.run_*``), against the float64
reference.

Every buffer the plans allocate is poisoned with NaN (an element no kernel
writes fails), and launches are shrunk (1 SM, 2 resident blocks, 32- and
64-thread blocks) so that every reduction uses several blocks per channel
group: the staging buffer and the last-block merge really run. A few cases
run again under ThreadSanitizer, which must find no data race.
"""
import threading
from pathlib import Path

import numpy as np
import pytest

from bnkernels.backends.gpu import geometry
from bnkernels.backends.cupy_backend import bind, sources
from bnkernels.backends.gpu import plans
from bnkernels.backends.gpu.members import GpuBackend, Operand
from bnkernels.reference import reference_backward, reference_forward, reference_stats
from bnkernels.validation import channel_layout, compute_dtype
from engine_checks import check_split_batch
from helpers import DTYPES, GPU_CASES, assert_close, gpu_tunings, make_input, make_params, tiny_device
from host_cuda import runner

KERNEL_FILE = Path(sources.source_dir()) / sources.MAIN_FILE
TUNINGS = gpu_tunings()
CASES = GPU_CASES


@pytest.fixture(scope="module")
def library():
    return runner.build(KERNEL_FILE, sources.name_expressions())


class HostGPU:
    """The device interface of ``gpu.plans.run_*``, on the host harness."""

    def __init__(self, so, tuning):
        self.so, self.tuning = so, tuning
        self.limits = tiny_device(tuning)
        self.host = runner.HostDevice()
        self.counter_array = None
        self.launches = []

    def alloc(self, shape, dtype):
        return np.full(shape, np.nan, dtype)  # poison

    def counters(self, n):
        if self.counter_array is None or self.counter_array.size < n:
            self.counter_array = np.zeros(max(n, 64), np.uint32)
        return self.counter_array

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def __enter__(self):  # the members make the device current for a call
        return self

    def __exit__(self, *exc):
        return False

    def scratch(self, key, specs):
        """No workspace kept: every buffer new, and poisoned."""
        return {name: self.alloc(shape, dtype) for name, (shape, dtype) in specs.items()}

    def aligned(self, *arrays):
        return all(a.ctypes.data % 16 == 0 for a in arrays)

    def bind(self, plan):
        bound = bind.bind(plan)  # as the cupy backend launches it

        def launch(args):
            b = bind.BoundLaunch(bound.kernel, bound.grid, bound.block, args, bound.shared_mem)
            self.launches.append(b)
            self.host.run(self.so, b)

        return launch, bound.args

    def run(self, plan):
        fn, args = self.bind(plan)
        fn(args)


@pytest.fixture(params=list(TUNINGS))
def gpu(request, library):
    return HostGPU(library, TUNINGS[request.param])


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


@pytest.mark.parametrize("shape,axis", CASES)
def test_plans_use_several_blocks_per_channel(shape, axis, gpu):
    lay = channel_layout(shape, axis)
    assert geometry.reduce_plan(lay.outer, lay.channels, lay.inner, gpu.limits, gpu.tuning).splits > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_training_forward_and_backward(shape, axis, dtype, gpu, rng):
    x = make_input(shape, dtype, rng)
    lay = channel_layout(shape, axis)
    C, acc = lay.channels, compute_dtype(dtype)
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    ref = reference_forward(x, gamma, beta, rm, rv, axis=axis)
    y, out = plans.run_forward_train(gpu, _flat(x), lay, gamma.astype(acc), beta.astype(acc), (rm, rv, 0.1),
                                     1e-5, False)
    assert_close(y.reshape(shape), ref[0], dtype, "y")
    assert_close(out["mean"], ref[1], dtype, "mean", scale=np.abs(ref[1]).max() + 1)
    assert_close(out["invstd"], ref[2], dtype, "invstd")
    assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
    assert_close(rv, ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)
    assert not gpu.counter_array.any(), "the last blocks reset their counters"

    dy = make_input(shape, dtype, rng, mean=0.5, std=1.0)
    mean64, invstd64 = out["mean"].astype(np.float64), out["invstd"].astype(np.float64)
    dx, bout = plans.run_backward(gpu, _flat(dy), _flat(x), lay, gamma.astype(acc), mean64, invstd64)
    rdx, rdgamma, rdbeta = reference_backward(dy, x, mean64, invstd64, gamma, axis=axis)
    n = x.size // C
    dymax = float(np.abs(dy.astype(np.float64)).max())
    assert_close(dx.reshape(shape), rdx, dtype, "dx", scale=3 * dymax * gamma.max() * invstd64.max())
    assert_close(bout["dbeta"], rdbeta, dtype, "dbeta", scale=dymax * n)
    assert_close(bout["dgamma"], rdgamma, dtype, "dgamma", scale=4 * dymax * n)
    assert not gpu.counter_array.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("running_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_inference(dtype, running_dtype, relu, gpu, rng):
    shape, axis = (6, 5, 9), 1
    x = make_input(shape, dtype, rng)
    lay = channel_layout(shape, axis)
    acc = compute_dtype(dtype)
    gamma, beta = make_params(5, rng)
    rm = (3 + rng.standard_normal(5)).astype(running_dtype)
    rv = rng.uniform(0.5, 8, 5).astype(running_dtype)
    y, out = plans.run_forward_infer(gpu, _flat(x), lay, rm, rv, gamma.astype(acc), beta.astype(acc), 1e-5, relu)
    ref = reference_forward(x, gamma, beta, rm, rv, training=False, activation="relu" if relu else None)
    assert_close(y.reshape(shape), ref[0], dtype, "y")
    assert_close(out["invstd"], ref[2], dtype, "invstd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, 8, 9, 31, 67])
@pytest.mark.parametrize("offset", [0, 1])
def test_apply_vector_and_scalar_paths(dtype, size, offset, gpu, rng):
    """Sizes that are not a multiple of the vector width (tail), and an input
    one element off 16-byte alignment (scalar path), give the same result."""
    C = 3 if size % 3 == 0 else 1  # channel tracking inside the vectors where possible
    layout = channel_layout((size // C, C), 1)
    buf = make_input((size + 1,), dtype, rng)
    x = buf[offset:offset + size]
    acc = compute_dtype(dtype)
    k, scale, shift = (rng.standard_normal(C).astype(acc) for _ in range(3))
    y = gpu.alloc(size, dtype)
    aligned = gpu.aligned(x, y)
    assert aligned == (offset == 0)
    gpu.run(plans.apply(x, y, layout, k, scale, shift, False, aligned, gpu.limits, gpu.tuning))
    xs = x.astype(np.float64).reshape(-1, C)
    expected = (xs - k.astype(np.float64)) * scale.astype(np.float64) + shift.astype(np.float64)
    assert_close(y.reshape(-1, C), expected, dtype, "y", scale=float(np.abs(expected).max()) + 1)


@pytest.mark.parametrize("shape,axis", [((16, 3, 8), 1), ((64, 3), 1)])
def test_large_mean_float32_is_exact(shape, axis, gpu, rng):
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    y, _ = plans.run_forward_train(gpu, _flat(x), channel_layout(shape, axis), None, None, None, 1e-5, False)
    err = np.abs(y.reshape(shape).astype(np.float64) - reference_forward(x, axis=axis)[0]).max()
    assert err <= 1e-4, f"max error {err:.3g} batch stds"


@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_stats_outputs(dtype, gpu, rng):
    x = make_input((7, 4, 5), dtype, rng, mean=50.0)
    out = plans.run_stats(gpu, _flat(x), channel_layout(x.shape, 1), None, None, None, 0.0)
    n, mean, var = reference_stats(x)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(out["k"].astype(np.float64) + out["dmean"], mean, rtol=rtol)
    np.testing.assert_allclose(out["m2"] / n, var, rtol=100 * rtol)


def test_each_operation_launches_what_the_docs_say(gpu, rng):
    """Training forward = stats + apply (2 reads + 1 write of x), backward =
    sums + dx, inference = coefficients + apply."""
    x = make_input((4, 3, 5), np.float32, rng)
    lay = channel_layout(x.shape, 1)
    y, out = plans.run_forward_train(gpu, _flat(x), lay, None, None, None, 1e-5, False)
    plans.run_forward_infer(gpu, _flat(x), lay, np.zeros(3, np.float32), np.ones(3, np.float32), None, None,
                            1e-5, False)
    plans.run_backward(gpu, _flat(x), _flat(x), lay, None, out["mean"].astype(np.float64),
                       out["invstd"].astype(np.float64))
    kinds = [p.kernel.split("<")[0] for p in gpu.launches]
    assert kinds == ["bn_stats", "bn_apply", "bn_infer_coeffs", "bn_apply", "bn_bwd_reduce", "bn_dx"]


# --- ThreadSanitizer --------------------------------------------------------

tsan = pytest.mark.skipif(not runner.tsan_available(), reason="g++ has no libtsan here")


@tsan
@pytest.mark.parametrize("shape,axis", [((8, 3, 17), 1), ((33, 7), 1)], ids=["planes", "rows"])
def test_reductions_are_race_free(shape, axis, rng):
    """Statistics and backward sums of several blocks per channel, with
    2-warp blocks: ThreadSanitizer reports no data race."""
    so = runner.build(KERNEL_FILE, sources.name_expressions(), tsan=True)
    gpu = HostGPU(None, TUNINGS["2warps"])
    lay = channel_layout(shape, axis)
    x = _flat(make_input(shape, np.float32, rng))
    counters = np.zeros(64, np.uint32)
    stats_plan, out = plans.stats(x, lay, None, None, None, 1e-5, gpu.alloc, counters, gpu.limits, gpu.tuning)
    mean = np.zeros(lay.channels)
    bwd_plan, _ = plans.bwd_reduce(x, x, lay, None, mean, np.ones(lay.channels), gpu.alloc, counters,
                                   gpu.limits, gpu.tuning)
    for plan in (stats_plan, bwd_plan):
        result = runner.tsan_run(so, bind.bind(plan))
        assert result.clean, result.report


# --- the GPU backends' members, on the host harness ------------------------

class HostArrays:
    """The arrays adapter of ``gpu.members`` with NumPy arrays as the
    device's: the members the cupy backend runs, unchanged, launching
    cupy's kernels on the host harness. ``stream`` stands for the stream
    current at a call: each one gets a device of its own (its counters),
    as the real backends keep them per stream."""

    shaped_outputs = True  # as cupy's: kernels take pointers

    def __init__(self, gpu):
        self.gpu = gpu
        self.stream = 0
        self.devices = {0: gpu}

    def operand(self, x):
        return x if isinstance(x, Operand) else Operand("host-device", x, device=np.asarray(x))

    def device(self, x_op):
        if self.stream not in self.devices:
            self.devices[self.stream] = HostGPU(self.gpu.so, self.gpu.tuning)
        return self.devices[self.stream]

    def context(self, x):
        return (self.stream,)

    def needs_entering(self, dev):
        return False

    def direct(self, a, dtype):
        return isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous

    def kernel_array(self, a):
        return a

    def flat(self, op, dev, dtype=None):
        return np.ascontiguousarray(op.array, dtype=dtype).reshape(-1)

    def vector(self, op, dev, dtype):
        return np.ascontiguousarray(op.array, dtype=dtype)

    def contiguous(self, op):
        return op.device.flags.c_contiguous

    def result(self, x_op, a, dev):
        return a

    def to_host(self, a, dev):
        return np.asarray(a)

    def to_device(self, host, dev):
        return np.array(host)

    def write_back(self, op, a, dev):
        op.device[...] = a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,cuts", [((6, 3, 5), 1, [2]), ((9, 17), -1, [4, 5]), ((5, 4), 1, [])])
def test_members_staged_path_of_a_split_batch(shape, axis, cuts, dtype, gpu, rng):
    """Statistics, finalize (bn_infer_coeffs from merged moments),
    normalize; backward reduce and apply: the parts' results are the whole
    batch's (``tests/engine_checks.py``)."""
    check_split_batch(GpuBackend(HostArrays(gpu)), shape, axis, dtype, cuts, rng)


@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 17), 1)])
def test_members_fused_forms(shape, axis, gpu, rng):
    """forward_train and backward of ``gpu.members`` (with running
    statistics of two dtypes: one goes through a temporary and back)."""
    x = make_input(shape, np.float32, rng)
    dy = make_input(shape, np.float32, rng, mean=0.5)
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm, rv = rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C)
    ref = reference_forward(x, gamma, beta, rm, rv, axis=axis)
    impl = GpuBackend(HostArrays(gpu))
    lay = channel_layout(shape, axis)
    y, mean, invstd = impl.forward_train(x, lay, gamma, beta, 1e-5, False, (rm, rv, 0.1))
    assert_close(y, ref[0], np.float32, "y")
    assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
    assert_close(rv, ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)
    dx, dgamma, dbeta = impl.backward(dy, x, lay, mean, invstd, gamma)
    rdx, rdg, rdb = reference_backward(dy, x, mean, invstd, gamma, axis=axis)
    assert_close(dx, rdx, np.float32, "dx", scale=10)
    assert_close(dbeta, rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)
    assert_close(dgamma, rdg, np.float32, "dgamma", scale=np.abs(rdg).max() + 1)


@pytest.mark.parametrize("saved_dtype", [np.float32, np.float64])
def test_backward_reads_the_saved_statistics_as_they_are(saved_dtype, gpu, rng):
    """The forward's float32 statistics go to bn_bwd_reduce without a cast
    (the instantiation for float), float64 ones with the one for double."""
    shape = (6, 3, 5)
    x, dy = make_input(shape, np.float32, rng), make_input(shape, np.float32, rng, mean=0.5)
    lay = channel_layout(shape, 1)
    _, out = plans.run_forward_train(gpu, _flat(x), lay, None, None, None, 1e-5, False)
    mean, invstd = out["mean"].astype(saved_dtype), out["invstd"].astype(saved_dtype)
    gpu.launches.clear()
    dx, bout = plans.run_backward(gpu, _flat(dy), _flat(x), lay, None, mean, invstd)
    s = "double" if saved_dtype == np.float64 else "float"
    assert gpu.launches[0].kernel == f"bn_bwd_reduce<float, float, {s}, false>"
    assert gpu.launches[0].args[7] is mean  # the caller's array itself
    rdx, _, rdb = reference_backward(dy, x, mean, invstd)
    assert_close(dx.reshape(shape), rdx, np.float32, "dx", scale=10)
    assert_close(bout["dbeta"], rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)


@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 17), 1)])
def test_prepared_calls_launch_the_recorded_kernels(shape, axis, gpu, rng):
    """``prepare_forward_train`` / ``prepare_forward_infer`` /
    ``prepare_backward`` of ``gpu.members``: launches recorded once
    (``gpu/prepared.py``), then per call only the outputs are allocated (y
    in x's shape) and the two kernels launched, on the caller's arrays
    themselves, with right results on new data each call; a new running
    factor (cumulative average) records nothing new."""
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    impl = GpuBackend(HostArrays(gpu))
    lay = channel_layout(shape, axis)
    x = make_input(shape, np.float32, rng)
    forward = impl.prepare_forward_train(x, lay, gamma, beta, 1e-5, False, (rm, rv, 0.1))
    assert not gpu.launches  # preparing launches nothing
    for factor in (0.1, 0.5, 1 / 3):
        x = make_input(shape, np.float32, rng)
        ref = reference_forward(x, gamma, beta, rm, rv, momentum=factor, axis=axis)
        gpu.launches.clear()
        y, mean, invstd = forward(x, gamma, beta, (rm, rv, factor))
        assert [b.kernel.split("<")[0] for b in gpu.launches] == ["bn_stats", "bn_apply"]
        assert gpu.launches[0].args[0] is x and gpu.launches[1].args[1] is y  # no copies, y allocated as x
        assert y.shape == shape
        assert_close(y, ref[0], np.float32, "y")
        assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
        assert_close(rv, ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)

    infer = impl.prepare_forward_infer(x, lay, rm, rv, gamma, beta, 1e-5, True)
    for _ in range(2):
        x = make_input(shape, np.float32, rng)
        gpu.launches.clear()
        y, _, _ = infer(x, rm, rv, gamma, beta)
        assert [b.kernel.split("<")[0] for b in gpu.launches] == ["bn_infer_coeffs", "bn_apply"]
        ref = reference_forward(x, gamma, beta, rm, rv, training=False, axis=axis)[0]
        assert_close(y, np.maximum(ref, 0), np.float32, "y")

    dy = make_input(shape, np.float32, rng, mean=0.5)
    backward = impl.prepare_backward(dy, x, lay, mean, invstd, gamma)
    for _ in range(2):
        dy = make_input(shape, np.float32, rng, mean=0.5)
        gpu.launches.clear()
        dx, dgamma, dbeta = backward(dy, x, mean, invstd, gamma)
        assert [b.kernel.split("<")[0] for b in gpu.launches] == ["bn_bwd_reduce", "bn_dx"]
        rdx, rdg, rdb = reference_backward(dy, x, mean, invstd, gamma, axis=axis)
        assert_close(dx, rdx, np.float32, "dx", scale=10)
        assert_close(dgamma, rdg, np.float32, "dgamma", scale=np.abs(rdg).max() + 1)
        assert_close(dbeta, rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)


def test_prepared_call_records_once_per_context(gpu, rng):
    """A call in another context (stream, device or host thread) gets a
    recording of its own, bound to that context's counters and workspace
    (sharing them between streams would race); back in the first context,
    the first recording runs again."""
    shape = (6, 3, 5)
    arrays = HostArrays(gpu)
    impl = GpuBackend(arrays)
    lay = channel_layout(shape, 1)
    x = make_input(shape, np.float32, rng)
    forward = impl.prepare_forward_train(x, lay, None, None, 1e-5, False, None)
    for stream in (0, 7, 0, 7):
        arrays.stream = stream
        x = make_input(shape, np.float32, rng)
        y, _, _ = forward(x, None, None, None)
        assert_close(y, reference_forward(x)[0], np.float32, "y")
        assert arrays.devices[stream].counter_array is not None
    assert set(arrays.devices) == {0, 7}
    assert arrays.devices[0].counter_array is not arrays.devices[7].counter_array

    done = []

    def other_thread():  # same stream handle, another thread: its own recording
        y, _, _ = forward(x, None, None, None)
        done.append(y)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert_close(done[0], reference_forward(x)[0], np.float32, "y")
    assert forward.sequence.contexts == 3


def test_prepared_call_on_arrays_it_cannot_bind_runs_the_fused_member(gpu, rng):
    """Prepared with parameters in another dtype than the kernels read
    (a cast per call): every call runs the fused member, with right results."""
    shape = (6, 3, 5)
    impl = GpuBackend(HostArrays(gpu))
    lay = channel_layout(shape, 1)
    gamma, beta = (p.astype(np.float64) for p in make_params(3, rng))
    x = make_input(shape, np.float32, rng)
    forward = impl.prepare_forward_train(x, lay, gamma, beta, 1e-5, False, None)
    for _ in range(2):
        x = make_input(shape, np.float32, rng)
        y, _, _ = forward(x, gamma, beta, None)
        assert_close(y, reference_forward(x, gamma, beta)[0], np.float32, "y")


@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 17), -1)])
def test_members_backward_of_the_inference_forward(shape, axis, gpu, rng):
    """bn_bwd_reduce for the sums, bn_dx with the frozen coefficients
    (``engine.backward(training=False)``) on cupy's kernels."""
    from bnkernels import engine

    C = shape[axis]
    x, dy = make_input(shape, np.float32, rng), make_input(shape, np.float32, rng, mean=0.5)
    gamma, _ = make_params(C, rng)
    mean = rng.standard_normal(C).astype(np.float32)
    invstd = rng.uniform(0.5, 2, C).astype(np.float32)
    impl = GpuBackend(HostArrays(gpu))
    dx, dgamma, dbeta = engine.backward(impl, dy, x, channel_layout(shape, axis), mean, invstd, gamma,
                                        training=False)
    rdx, rdg, rdb = reference_backward(dy, x, mean, invstd, gamma, axis=axis, training=False)
    assert_close(dx, rdx, np.float32, "dx", scale=np.abs(rdx).max())
    assert_close(dgamma, rdg, np.float32, "dgamma", scale=np.abs(rdg).max() + 1)
    assert_close(dbeta, rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)
