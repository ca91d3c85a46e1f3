"""The stateful BatchNorm layer."""
import numpy as np
import pytest

from bnkernels import BatchNorm, bn_forward
from bnkernels.reference import reference_backward, reference_forward
from helpers import assert_close, make_input


def test_training_steps_then_eval(backend, rng):
    layer = BatchNorm(4, backend=backend, momentum=0.2)
    layer.gamma[:] = rng.uniform(0.5, 2, 4)
    layer.beta[:] = rng.standard_normal(4)
    rm, rv = np.zeros(4), np.ones(4)
    for _ in range(3):
        x = make_input((6, 4, 5), np.float32, rng)
        y = layer(x)
        ref = reference_forward(x, layer.gamma, layer.beta, rm, rv, momentum=0.2)
        rm, rv = ref[3], ref[4]
        assert_close(y, ref[0], np.float32, "y")
    assert layer.num_batches_tracked == 3
    assert_close(layer.running_mean, rm, np.float32, "running_mean")
    assert_close(layer.running_var, rv, np.float32, "running_var")
    layer.eval()
    x = make_input((2, 4, 5), np.float32, rng)
    y = layer(x)
    ref = reference_forward(x, layer.gamma, layer.beta, rm, rv, training=False)
    assert_close(y, ref[0], np.float32, "eval y")
    assert layer.num_batches_tracked == 3, "eval does not count batches"


def test_cumulative_average(backend, rng):
    """momentum=None: running stats are the plain average of the batches'."""
    layer = BatchNorm(3, momentum=None, dtype=np.float64, backend=backend)
    batches = [make_input((8, 3), np.float64, rng, mean=m) for m in (1.0, 5.0, -2.0)]
    for x in batches:
        layer(x)
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches], 0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, np.mean([b.var(0, ddof=1) for b in batches], 0),
                               rtol=1e-12)


def test_backward_gradients(backend, rng):
    layer = BatchNorm(5, axis=-1, dtype=np.float64, backend=backend)
    layer.gamma[:] = rng.uniform(0.5, 2, 5)
    x = make_input((7, 3, 5), np.float64, rng)
    dy = rng.standard_normal(x.shape)
    layer(x)
    dx = layer.backward(dy)
    ref = reference_forward(x, axis=-1)
    rdx, rdg, rdb = reference_backward(dy, x, ref[1], ref[2], layer.gamma, axis=-1)
    assert_close(dx, rdx, np.float64, "dx")
    assert_close(layer.grad_gamma, rdg, np.float64, "grad_gamma")
    assert_close(layer.grad_beta, rdb, np.float64, "grad_beta")


def test_no_running_stats_uses_batch_stats_in_eval(backend, rng):
    layer = BatchNorm(3, track_running_stats=False, affine=False, backend=backend).eval()
    x = make_input((6, 3), np.float32, rng)
    assert_close(layer(x), reference_forward(x)[0], np.float32, "y")
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()
    layer.backward(np.ones_like(x))  # batch statistics: differentiable
    assert layer.grad_gamma is None


def test_backward_needs_a_forward(backend):
    layer = BatchNorm(3, backend=backend)
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(np.ones((4, 3), np.float32))


def test_backward_after_eval_is_the_frozen_gradient_as_torch(backend, rng):
    """eval(): the running statistics are constants (frozen batch norm
    fine-tuning): dx = dy * gamma * invstd; compared with torch's autograd."""
    layer = BatchNorm(3, backend=backend, dtype=np.float64)
    layer.gamma[:] = rng.uniform(0.5, 2, 3)
    layer(make_input((6, 3, 4), np.float64, rng))  # running statistics of one batch
    x, dy = make_input((5, 3, 4), np.float64, rng), rng.standard_normal((5, 3, 4))
    layer.eval()(x)
    dx = layer.backward(dy)
    invstd = 1 / np.sqrt(layer.running_var + layer.eps)
    rdx, rdg, rdb = reference_backward(dy, x, layer.running_mean, invstd, layer.gamma, training=False)
    assert_close(dx, rdx, np.float64, "dx")
    assert_close(layer.grad_gamma, rdg, np.float64, "grad_gamma")
    assert_close(layer.grad_beta, rdb, np.float64, "grad_beta")
    torch = pytest.importorskip("torch")
    module = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.gamma))
        module.running_mean.copy_(torch.from_numpy(layer.running_mean))
        module.running_var.copy_(torch.from_numpy(layer.running_var))
    xt = torch.from_numpy(x).requires_grad_()
    module.eval()(xt).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_gamma, module.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grad_beta, module.bias.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_state_round_trip(backend, rng, tmp_path):
    layer = BatchNorm(4, backend=backend)
    layer.gamma[:] = rng.uniform(0.5, 2, 4)
    layer(make_input((5, 4, 3), np.float32, rng))
    state = layer.state_dict()
    np.savez(tmp_path / "bn.npz", **state)
    other = BatchNorm(4, backend=backend)
    with np.load(tmp_path / "bn.npz") as f:
        other.load_state_dict(dict(f))
    for k, v in state.items():
        np.testing.assert_array_equal(getattr(other, k), v)
    assert other.num_batches_tracked == 1
    x = make_input((2, 4, 3), np.float32, rng)
    np.testing.assert_array_equal(layer.eval()(x), other.eval()(x))
    state["gamma"][:] = 0  # state_dict returns copies
    assert not np.array_equal(layer.gamma, state["gamma"])


@pytest.mark.parametrize("change,exc,match", [
    (lambda s: s.pop("beta"), ValueError, "do not match"),
    (lambda s: s.update(gamma=np.ones(5)), ValueError, r"gamma must have shape \(4,\)"),
    (lambda s: s.update(running_var=np.ones(4, np.int32)), TypeError, "running_var must be a float array"),
    (lambda s: s.update(num_batches_tracked=np.array(-1)), ValueError, "num_batches_tracked"),
])
def test_bad_state_changes_nothing(backend, change, exc, match):
    layer = BatchNorm(4, backend=backend)
    state = layer.state_dict()
    state["running_mean"] = np.full(4, 9.0)  # a valid change that must not land either
    change(state)
    with pytest.raises(exc, match=match):
        layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.running_mean, np.zeros(4))


@pytest.mark.parametrize("kwargs,exc", [
    (dict(num_features=0), ValueError), (dict(num_features=-3), ValueError),
    # not an int at all: a TypeError, as Python's own functions raise
    (dict(num_features=2.5), TypeError), (dict(num_features={}), TypeError), (dict(num_features="3"), TypeError),
    (dict(num_features=True), TypeError), (dict(num_features=3, dtype="junk"), TypeError),
    (dict(num_features=3, affine="yes"), TypeError), (dict(num_features=3, track_running_stats=1), TypeError),
    (dict(num_features=3, dtype=np.float16), TypeError), (dict(num_features=3, eps=-1), ValueError),
    (dict(num_features=3, momentum=2), ValueError), (dict(num_features=3, axis="1"), TypeError),
])
def test_bad_constructor_arguments(backend, kwargs, exc):
    with pytest.raises(exc):
        BatchNorm(backend=backend, **kwargs)


@pytest.mark.parametrize("name,exc", [("cuda-ish", ValueError), (None, TypeError), (1, TypeError)])
def test_bad_backend_is_caught_at_construction(name, exc):
    with pytest.raises(exc, match="backend"):
        BatchNorm(3, backend=name)


def test_failed_forward_changes_nothing(backend, rng):
    layer = BatchNorm(3, backend=backend)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((1, 3), np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_var, np.ones(3))


def test_layer_matches_functional(backend, rng):
    x = make_input((4, 3, 2, 2), np.float16, rng)
    layer = BatchNorm(3, backend=backend)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    np.testing.assert_array_equal(layer(x), bn_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32),
                                                       rm, rv, backend=backend))
    np.testing.assert_array_equal(layer.running_var, rv)
    assert "BatchNorm(3" in repr(layer)


@pytest.mark.parametrize("shape,axis", [((4, 5, 3), 1), ((4, 3, 5), -1), ((5,), 0)])
def test_wrong_channel_count_names_the_layer_not_gamma(backend, rng, shape, axis):
    layer = BatchNorm(6, axis=axis, backend=backend)
    with pytest.raises(ValueError, match=rf"BatchNorm\(6\) expects 6 channels along axis {axis} of x, "
                                         rf"got x of shape \({shape[0]},"):
        layer(make_input(shape, np.float32, rng))
    np.testing.assert_array_equal(layer.running_mean, 0)
    assert layer.num_batches_tracked == 0


def test_affine_is_fixed_at_construction(backend):
    layer = BatchNorm(3, affine=False, backend=backend)
    assert layer.affine is False and layer.gamma is None
    with pytest.raises(AttributeError):
        layer.affine = True


def test_track_running_stats_can_be_turned_off_later_as_in_torch(backend, rng):
    """Read on every call: training stops updating, eval still uses the
    statistics that exist. Compared with torch where it is installed."""
    x = make_input((8, 3, 5), np.float32, rng)
    layer = BatchNorm(3, backend=backend)
    layer(x)
    rm, rv, count = layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked
    layer.track_running_stats = False
    y_train = layer(x + 1)
    np.testing.assert_array_equal(layer.running_mean, rm)
    np.testing.assert_array_equal(layer.running_var, rv)
    assert layer.num_batches_tracked == count
    y_eval = layer.eval()(x)
    np.testing.assert_allclose(y_eval, (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5), rtol=1e-5, atol=1e-5)
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm1d(3)
    ref(torch.from_numpy(x))
    ref.track_running_stats = False
    np.testing.assert_allclose(ref(torch.from_numpy(x + 1)).detach().numpy(), y_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.running_mean.numpy(), rm, rtol=1e-6)
    assert int(ref.num_batches_tracked) == count
    np.testing.assert_allclose(ref.eval()(torch.from_numpy(x)).detach().numpy(), y_eval, rtol=1e-5, atol=1e-5)


def test_load_state_dict_refuses_masked_arrays(backend):
    layer = BatchNorm(3, backend=backend)
    state = layer.state_dict()
    state["running_mean"] = np.ma.masked_array(np.full(3, 7.0), mask=[True, False, False])
    with pytest.raises(TypeError, match="running_mean is a numpy.ma.MaskedArray"):
        layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.running_mean, 0)


# --- affine parts, lazy channel count, non-strict loading (issue 13) ------

@pytest.mark.parametrize("kwargs,gamma,beta", [
    (dict(), True, True), (dict(affine=False), False, False),
    (dict(bias=False), True, False),                          # torch's spelling
    (dict(center=False), True, False), (dict(scale=False), False, True),  # Keras' (Chainer's use_beta/use_gamma)
    (dict(scale=False, center=False), False, False), (dict(bias=True, center=True), True, True),
])
def test_gamma_and_beta_independently(backend, rng, kwargs, gamma, beta):
    """Each part exists or not; forward, backward and the state follow."""
    layer = BatchNorm(3, backend=backend, dtype=np.float64, **kwargs)
    assert (layer.gamma is not None, layer.beta is not None) == (gamma, beta)
    if gamma:
        layer.gamma[:] = rng.uniform(0.5, 2, 3)
    if beta:
        layer.beta[:] = rng.standard_normal(3)
    x = make_input((6, 3, 4), np.float64, rng)
    y = layer(x)
    ref = reference_forward(x, layer.gamma, layer.beta)
    assert_close(y, ref[0], np.float64, "y")
    dy = rng.standard_normal(x.shape)
    layer.backward(dy)
    _, rdg, rdb = reference_backward(dy, x, ref[1], ref[2], layer.gamma)
    assert (layer.grad_gamma is not None, layer.grad_beta is not None) == (gamma, beta)
    if gamma:
        assert_close(layer.grad_gamma, rdg, np.float64, "grad_gamma")
    if beta:
        assert_close(layer.grad_beta, rdb, np.float64, "grad_beta")
    keys = {"running_mean", "running_var", "num_batches_tracked"} | ({"gamma"} if gamma else set()) | (
        {"beta"} if beta else set())
    assert set(layer.state_dict()) == keys


@pytest.mark.parametrize("kwargs,match", [
    (dict(affine=False, center=True), "center=True asks for a parameter that affine=False rules out"),
    (dict(affine=False, bias=True), "bias=True"), (dict(affine=False, scale=True), "scale=True"),
    (dict(bias=False, center=True), "contradict"), (dict(scale="yes"), "scale must be True or False"),
])
def test_contradictory_affine_parts_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BatchNorm(3, **kwargs)


@pytest.mark.parametrize("shape,axis", [((6, 3, 4), 1), ((5, 4, 7), -1)])
def test_lazy_channel_count_from_the_first_input(backend, rng, shape, axis):
    """As torch's LazyBatchNorm and Keras: C from the first input; the layer
    then behaves as one made with it."""
    lazy, eager = BatchNorm(axis=axis, backend=backend), BatchNorm(shape[axis], axis=axis, backend=backend)
    assert lazy.lazy and lazy.gamma is None and lazy.state_dict() == {}
    for _ in range(2):
        x = make_input(shape, np.float32, rng)
        np.testing.assert_array_equal(lazy(x), eager(x))
    assert lazy.num_features == shape[axis] and not lazy.lazy
    for k, val in eager.state_dict().items():
        np.testing.assert_array_equal(lazy.state_dict()[k], val)
    with pytest.raises(ValueError, match=f"BatchNorm\\({shape[axis]}\\) expects"):
        lazy(make_input((6, shape[axis] + 1, 4) if axis == 1 else (5, 4, shape[axis] + 1), np.float32, rng))


def test_a_failed_first_call_leaves_the_layer_lazy(backend):
    layer = BatchNorm(backend=backend)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((1, 3), np.float32))
    assert layer.lazy and layer.gamma is None and layer.num_batches_tracked == 0
    layer(np.arange(10, dtype=np.float32).reshape(2, 5))
    assert layer.num_features == 5


def test_a_lazy_layer_takes_its_channels_from_a_loaded_state(backend, rng):
    source = BatchNorm(4, backend=backend)
    source(make_input((5, 4, 3), np.float32, rng))
    lazy = BatchNorm(backend=backend)
    assert lazy.load_state_dict(source.state_dict()) == ([], [])
    assert lazy.num_features == 4 and lazy.num_batches_tracked == 1
    x = make_input((2, 4, 3), np.float32, rng)
    np.testing.assert_array_equal(lazy.eval()(x), source.eval()(x))


def test_non_strict_loading_loads_what_is_there(backend):
    """torch's load_state_dict(strict=False): missing keys keep their
    values, unexpected ones are ignored; both are reported."""
    layer = BatchNorm(3, backend=backend)
    state = {"running_mean": np.full(3, 2.0), "weight": np.ones(3)}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert missing == ["beta", "gamma", "num_batches_tracked", "running_var"] and unexpected == ["weight"]
    np.testing.assert_array_equal(layer.running_mean, 2.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    with pytest.raises(ValueError, match=r"missing \['beta', 'gamma', 'num_batches_tracked', 'running_var'\], "
                                         r"unexpected \['weight'\]"):
        layer.load_state_dict(state)
    with pytest.raises(ValueError, match="gamma must have shape"):  # what is there is still checked
        layer.load_state_dict({"gamma": np.ones(4)}, strict=False)
    np.testing.assert_array_equal(layer.gamma, 1.0)


def test_lazy_layer_against_torchs_lazy_batch_norm(rng):
    torch = pytest.importorskip("torch")
    ours, ref = BatchNorm(), torch.nn.LazyBatchNorm1d()
    for _ in range(2):
        x = make_input((6, 3, 4), np.float32, rng)
        np.testing.assert_allclose(ours(x), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), rtol=1e-6)
    assert ours.num_batches_tracked == int(ref.num_batches_tracked) == 2


def test_an_empty_batch_counts_but_changes_no_statistic_as_in_torch(backend):
    layer = BatchNorm(3, backend=backend)
    y = layer(np.ones((0, 3, 4), np.float32))
    assert y.shape == (0, 3, 4) and layer.num_batches_tracked == 1
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    torch = pytest.importorskip("torch")
    module = torch.nn.BatchNorm1d(3)
    module(torch.ones(0, 3, 4))
    assert int(module.num_batches_tracked) == 1 and float(module.running_var.sum()) == 3
