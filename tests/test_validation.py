"""Bad input: a clear error naming the argument, and nothing changed."""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward
from helpers import make_input

C = 3


@pytest.fixture
def good(rng):
    """A valid training call's arguments; each test breaks one."""
    return dict(
        x=make_input((4, C, 5), np.float32, rng),
        gamma=np.ones(C, np.float32), beta=np.zeros(C, np.float32),
        running_mean=np.full(C, 0.25, np.float32), running_var=np.full(C, 2.0, np.float32),
    )


def _call_must_fail(backend, good, exc, match, **overrides):
    """Run bn_forward with one argument broken; check the error and that the
    running statistics and the input are exactly as before."""
    args = {**good, **overrides}
    rm, rv = good["running_mean"], good["running_var"]
    before = (rm.copy(), rv.copy(), good["x"].copy())
    x = args.pop("x")
    with pytest.raises(exc, match=match):
        bn_forward(x, backend=backend, **args)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    np.testing.assert_array_equal(good["x"], before[2])


def test_valid_call_does_update(backend, good):
    """Control: the fixture's call is valid and does change the running stats
    (so the 'unchanged' checks below are meaningful)."""
    rm = good["running_mean"].copy()
    bn_forward(backend=backend, **good)
    assert not np.array_equal(rm, good["running_mean"])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64, object])
def test_non_float_input_is_type_error(backend, good, dtype):
    _call_must_fail(backend, good, TypeError, "x must have dtype float16, bfloat16, float32 or float64",
                    x=np.ones((4, C, 5), dtype))


def test_zero_d_input(backend, good):
    _call_must_fail(backend, good, ValueError, "at least 1 dimension", x=np.float32(1.0))


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_axis_out_of_range(backend, good, axis):
    _call_must_fail(backend, good, ValueError, rf"axis={axis} is out of range .* valid: -3\.\.2", axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", None, True])
def test_axis_not_int(backend, good, axis):
    _call_must_fail(backend, good, TypeError, "axis must be an int", axis=axis)


@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
@pytest.mark.parametrize("length", [C - 1, C + 1, 0])
def test_wrong_parameter_length(backend, good, name, length):
    _call_must_fail(backend, good, ValueError, rf"{name} must have shape \({C},\)",
                    **{name: np.ones(length, np.float32)})


@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
def test_parameter_must_be_1d(backend, good, name):
    _call_must_fail(backend, good, ValueError, rf"{name} must have shape \({C},\)",
                    **{name: np.ones((1, C), np.float32)})


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_integer_affine_parameters(backend, good, name):
    _call_must_fail(backend, good, TypeError, f"{name} must have dtype", **{name: np.ones(C, np.int64)})


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_dtype(backend, good, name):
    _call_must_fail(backend, good, TypeError, f"{name} must have dtype float16, float32, float64",
                    **{name: np.ones(C, np.int32)})


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_must_be_arrays_in_training(backend, good, name):
    _call_must_fail(backend, good, TypeError, f"{name} must be an array .*updated in place",
                    **{name: [0.0] * C})


def test_read_only_running_stats_in_training(backend, good):
    ro = good["running_var"].copy()
    ro.flags.writeable = False
    _call_must_fail(backend, good, ValueError, "running_var is read-only", running_var=ro)


def test_running_stats_come_in_pairs(backend, good):
    _call_must_fail(backend, good, ValueError, "running_mean and running_var must be given together",
                    running_var=None)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-5])
def test_bad_eps_value(backend, good, eps):
    _call_must_fail(backend, good, ValueError, "eps must be finite and >= 0", eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True])
def test_bad_eps_type(backend, good, eps):
    _call_must_fail(backend, good, TypeError, "eps must be a real number", eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_momentum_value(backend, good, momentum):
    _call_must_fail(backend, good, ValueError, r"momentum must be in \[0, 1\]", momentum=momentum)


@pytest.mark.parametrize("momentum", ["0.1", True])
def test_bad_momentum_type(backend, good, momentum):
    _call_must_fail(backend, good, TypeError, "momentum must be a real number", momentum=momentum)


def test_cumulative_average_needs_batch_count(backend, good):
    _call_must_fail(backend, good, ValueError, "momentum=None .* needs num_batches_tracked", momentum=None)


@pytest.mark.parametrize("nbt,exc", [(-1, ValueError), (1.5, TypeError)])
def test_bad_num_batches_tracked(backend, good, nbt, exc):
    _call_must_fail(backend, good, exc, "num_batches_tracked must be", momentum=None,
                    num_batches_tracked=nbt)


@pytest.mark.parametrize("name", ["training", "return_saved"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_flags_must_be_bool(backend, good, name, value):
    _call_must_fail(backend, good, TypeError, f"{name} must be True or False", **{name: value})


def test_bad_activation(backend, good):
    _call_must_fail(backend, good, ValueError, "activation must be None or 'relu'", activation="gelu")


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (C,)])
def test_one_value_per_channel_in_training(backend, good, shape):
    axis = 0 if len(shape) == 1 else 1
    _call_must_fail(backend, good, ValueError, "Expected more than 1 value per channel when training",
                    x=np.ones(shape, np.float32), axis=axis)


def test_one_value_per_channel_is_fine_in_inference(backend, good):
    y = bn_forward(np.ones((1, C), np.float32), None, None, good["running_mean"], good["running_var"],
                   training=False, backend=backend)
    expected = (1 - 0.25) / np.sqrt(2.0 + 1e-5)
    np.testing.assert_allclose(y, np.full((1, C), expected), rtol=1e-6)


@pytest.mark.parametrize("shape", [(0, C), (0, C, 5), (4, C, 0)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_empty_batch_in_training_as_torch(backend, good, shape, dtype):
    """No values per channel: an empty y, zero saved statistics, the running
    statistics untouched (torch's module does the same; compared where it
    is installed), and a backward of empty dx and zero sums."""
    x = np.ones(shape, dtype)
    rm, rv = good["running_mean"].copy(), good["running_var"].copy()
    y, saved = bn_forward(x, good["gamma"], good["beta"], rm, rv, backend=backend, return_saved=True)
    assert y.shape == shape and y.dtype == dtype
    np.testing.assert_array_equal(rm, good["running_mean"])
    np.testing.assert_array_equal(rv, good["running_var"])
    np.testing.assert_array_equal(saved.mean, 0)
    dx, dgamma, dbeta = bn_backward(x, x, saved.mean, saved.invstd, good["gamma"], backend=backend)
    assert dx.shape == shape
    np.testing.assert_array_equal(dgamma, 0)
    np.testing.assert_array_equal(dbeta, 0)
    torch = pytest.importorskip("torch")
    module = torch.nn.BatchNorm1d(C)
    module.running_mean.copy_(torch.from_numpy(good["running_mean"]))
    assert module(torch.from_numpy(x.astype(np.float32))).shape == shape
    np.testing.assert_array_equal(module.running_mean.numpy(), good["running_mean"])


def test_inference_needs_running_stats(backend, good):
    _call_must_fail(backend, good, ValueError, "pass running_mean and running_var", training=False,
                    running_mean=None, running_var=None)


def test_inference_accepts_read_only_running_stats(backend, good):
    rm, rv = good["running_mean"].copy(), good["running_var"].copy()
    rm.flags.writeable = rv.flags.writeable = False
    bn_forward(good["x"], None, None, rm, rv, training=False, backend=backend)


def test_x_not_an_array(backend, good):
    _call_must_fail(backend, good, TypeError, "x must have dtype", x=["a", "b"])


# --- backward ----------------------------------------------------------------

@pytest.fixture
def saved(good, backend):
    return bn_forward(good["x"], backend=backend, return_saved=True)[1]


def test_backward_shape_mismatch(backend, good, saved):
    x = good["x"]
    with pytest.raises(ValueError, match=r"dy must have the shape of x \(4, 3, 5\), got \(4, 3, 4\)"):
        bn_backward(np.ones((4, C, 4), np.float32), x, saved.mean, saved.invstd, backend=backend)


def test_backward_dtype_mismatch(backend, good, saved):
    x = good["x"]
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        bn_backward(x.astype(np.float64), x, saved.mean, saved.invstd, backend=backend)


def test_backward_bad_dy_dtype(backend, good, saved):
    x = good["x"]
    with pytest.raises(TypeError, match="dy must have dtype float16"):
        bn_backward(np.ones(x.shape, np.int32), x, saved.mean, saved.invstd, backend=backend)


@pytest.mark.parametrize("name", ["saved_mean", "saved_invstd", "gamma"])
def test_backward_parameter_length(backend, good, saved, name):
    args = dict(saved_mean=saved.mean, saved_invstd=saved.invstd, gamma=None)
    args[name] = np.ones(C + 1, np.float32)
    with pytest.raises(ValueError, match=rf"{name} must have shape \({C},\)"):
        bn_backward(good["x"], good["x"], backend=backend, **args)


def test_backward_axis(backend, good, saved):
    with pytest.raises(ValueError, match="axis=5 is out of range"):
        bn_backward(good["x"], good["x"], saved.mean, saved.invstd, axis=5, backend=backend)


@pytest.mark.parametrize("name", ["saved_mean", "saved_invstd"])
def test_backward_needs_the_saved_statistics(backend, good, saved, name):
    args = dict(saved_mean=saved.mean, saved_invstd=saved.invstd)
    args[name] = None
    with pytest.raises(ValueError, match=f"{name} is required: pass saved.mean and saved.invstd"):
        bn_backward(good["x"], good["x"], backend=backend, **args)


# --- the fuzzing findings: numbers beyond float, unused arguments, array kinds ---

@pytest.mark.parametrize("name,value", [("eps", 10**400), ("eps", -10**400), ("momentum", 10**400)])
def test_integers_beyond_the_float_range(backend, good, name, value):
    _call_must_fail(backend, good, ValueError, f"{name} must be", **{name: value})


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("nbt", ["junk", 2.0, object()])
def test_num_batches_tracked_is_checked_even_when_unused(backend, good, training, nbt):
    """momentum is a number, so the count is not needed: still a bad one is
    an error, not silently ignored."""
    _call_must_fail(backend, good, TypeError, "num_batches_tracked must be an int", training=training,
                    num_batches_tracked=nbt)


def test_huge_batch_count_is_a_tiny_factor(backend, good):
    rm = good["running_mean"].copy()
    bn_forward(backend=backend, momentum=None, num_batches_tracked=10**400, **good)
    np.testing.assert_array_equal(good["running_mean"], rm)  # 1 / (10**400 + 1) == 0.0


@pytest.mark.parametrize("name", ["x", "gamma", "beta", "running_mean", "running_var", "out"])
def test_masked_arrays_are_refused(backend, good, name):
    args = {**good, "out": np.empty_like(good["x"])}
    args[name] = np.ma.masked_array(args[name], mask=np.zeros(np.shape(args[name]), bool))
    _call_must_fail(backend, args, TypeError, f"{name} is a numpy.ma.MaskedArray", **{name: args[name]})


@pytest.mark.parametrize("name", ["dy", "x", "saved_mean", "saved_invstd", "gamma", "out"])
def test_masked_arrays_are_refused_in_backward(backend, good, saved, name):
    x = good["x"]
    args = dict(dy=x.copy(), x=x, saved_mean=saved.mean, saved_invstd=saved.invstd, gamma=good["gamma"],
                out=np.empty_like(x))
    args[name] = np.ma.masked_array(args[name])
    with pytest.raises(TypeError, match=f"{name} is a numpy.ma.MaskedArray"):
        bn_backward(backend=backend, **args)


def test_list_input_with_an_array_out(backend, good):
    x = good["x"].astype(np.float64)
    out = np.full_like(x, np.nan)
    assert bn_forward(x.tolist(), backend=backend, out=out) is out
    np.testing.assert_allclose(out, bn_forward(x, backend=backend), rtol=1e-12, atol=1e-12)


def test_longdouble_parameters_name_the_cast(backend, good):
    _call_must_fail(backend, good, TypeError, r"gamma must have dtype .* float128.*cast it",
                    gamma=np.ones(C, np.longdouble))


def test_device_array_running_stats_with_host_x(backend, good):
    """A GPU array where x is on the host: named, not a crash inside."""
    class FakeDevice:
        shape, dtype = (C,), np.dtype(np.float32)
        __cuda_array_interface__ = {"shape": (C,), "typestr": "<f4", "data": (0, False), "version": 3}

    _call_must_fail(backend, good, TypeError, "running_mean is a GPU array .* x is on the host",
                    running_mean=FakeDevice())


def test_torch_cpu_tensors_are_updated_in_place(backend, good):
    """CPU torch tensors as running statistics and out: NumPy views them
    without a copy, so the results land in the tensors."""
    torch = pytest.importorskip("torch")
    expected_rm, expected_rv = good["running_mean"].copy(), good["running_var"].copy()
    expected = bn_forward(good["x"], good["gamma"], good["beta"], expected_rm, expected_rv, backend=backend)
    rm, rv = torch.tensor(good["running_mean"]), torch.tensor(good["running_var"])
    out = torch.full(good["x"].shape, float("nan"))
    y = bn_forward(good["x"], good["gamma"], good["beta"], rm, rv, backend=backend, out=out)
    assert y is out
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(rm.numpy(), expected_rm)
    np.testing.assert_array_equal(rv.numpy(), expected_rv)
    with pytest.raises(TypeError, match="x cannot be used as an array .*requires grad"):
        bn_forward(torch.ones(4, C, requires_grad=True), backend=backend)
