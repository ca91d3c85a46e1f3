"""The call cache of ``bn_forward`` / ``bn_backward``
(``bnkernels/call_cache.py``): which calls have a description, and the
replays of CPU backends (those of a GPU backend are tested under the
simulator: ``tests/cudasim/test_call_cache.py``)."""
import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward, call_cache
from bnkernels.backends import ENV_VAR


@pytest.fixture(autouse=True)
def fresh():
    call_cache.clear()
    yield
    call_cache.clear()


def _key(x, **kw):
    args = dict(training=True, momentum=0.1, eps=1e-5, axis=1, activation=None, backend="auto",
                num_batches_tracked=None, return_saved=False, out=None)
    args.update(kw)
    return call_cache.forward_key((x, None, None, None, None), **args)


def test_a_description_is_everything_validation_reads(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    assert _key(x) == _key(x.copy())
    assert _key(x) != _key(np.asfortranarray(x))  # strides
    assert _key(x) != _key(x.astype(np.float64))
    assert _key(x) != _key(x[:2])
    frozen = x.copy()
    frozen.flags.writeable = False
    assert _key(x) != _key(frozen)
    assert _key(x) != _key(x, eps=1e-3) and _key(x) != _key(x, axis=-1) and _key(x) != _key(x, momentum=None)
    assert _key(x) != _key(x, num_batches_tracked=3)  # given or not; its value is checked per call
    assert _key(x) != _key(x, training=False)


@pytest.mark.parametrize("change", [
    dict(out=np.zeros(1)), dict(training=1), dict(return_saved=None), dict(activation=["relu"])])
def test_calls_without_a_description(change, rng):
    """``out``, flags that are not bools, unhashable options: never kept."""
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    assert call_cache.lookup(_key(x, **change)) is call_cache.UNCACHED


def test_non_arrays_have_no_description():
    assert call_cache.forward_key(([[1.0, 2.0], [3.0, 4.0]], None, None, None, None), True, 0.1, 1e-5, 1, None,
                                  "auto", None, False, None) is None


def test_the_backend_variable_is_part_of_an_auto_key(monkeypatch, rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    monkeypatch.setenv(ENV_VAR, "numpy")
    first = _key(x)
    monkeypatch.setenv(ENV_VAR, "numba")
    assert _key(x) != first
    assert _key(x, backend="numpy") == _key(x, backend="numpy")


def test_cpu_backends_replay_their_checked_calls(backend, rng):
    """(``backend``: every CPU backend, conftest.) A CPU backend keeps a prepared call per description too: a repeat
    gives the full path's results, and an argument refused by the full path
    is still refused, with its message, when it is described like a good one
    (a running_mean of x's memory: same shape, strides, dtype), and changes
    nothing."""
    x = rng.standard_normal((4, 3, 5)).astype(np.float32) + 3
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    first = bn_forward(x, None, None, rm.copy(), rv.copy(), backend=backend, return_saved=True)
    y, saved = bn_forward(x, None, None, rm, rv, backend=backend, return_saved=True)
    dx = bn_backward(x, x, saved.mean, saved.invstd, backend=backend)
    assert len(call_cache._entries) == 2 and call_cache.UNCACHED not in call_cache._entries.values()
    y2, saved2 = bn_forward(x, None, None, rm2 := np.zeros(3, np.float32), rv2 := np.ones(3, np.float32),
                            backend=backend, return_saved=True)
    np.testing.assert_array_equal(y2, first[0])
    np.testing.assert_array_equal(saved2.mean, first[1].mean)
    np.testing.assert_array_equal(rm2, rm)
    np.testing.assert_array_equal(rv2, rv)
    np.testing.assert_array_equal(bn_backward(x, x, saved2.mean, saved2.invstd, backend=backend)[0], dx[0])
    before = x.copy()
    with pytest.raises(ValueError, match="running_mean overlaps x"):
        bn_forward(x, None, None, x[0, 0, :3], rv, backend=backend)
    np.testing.assert_array_equal(x, before)


def test_a_tensor_that_requires_grad_is_described_apart():
    """The full path refuses a CPU tensor that requires grad with its own
    message; a repeat of a good call must not replay onto one."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, 5)
    assert call_cache.describe(x) != call_cache.describe(x.clone().requires_grad_())


def test_the_cache_is_bounded(rng):
    for n in range(call_cache.MAX_ENTRIES + 5):
        bn_forward(rng.standard_normal((2, 1, n + 1)), backend="numpy")
    assert len(call_cache._entries) == call_cache.MAX_ENTRIES


@pytest.mark.parametrize("asked", ["cuda", "env"])
def test_a_cuda_call_that_fell_back_is_never_replayed(asked, monkeypatch, rng):
    """Its fallback warning belongs to every call (tests/backends/test_dispatch.py
    checks what Python's registry then shows)."""
    import bnkernels

    x = rng.standard_normal((4, 3)).astype(np.float32)
    if asked == "env":
        monkeypatch.setenv(ENV_VAR, "cuda")
    if any(s.available and s.device == "gpu" for s in bnkernels.available_backends().values()):
        pytest.skip("a GPU backend is usable here: nothing falls back")
    for _ in range(2):
        with pytest.warns(bnkernels.BackendFallbackWarning):
            bn_forward(x, backend="auto" if asked == "env" else "cuda")
    assert set(call_cache._entries.values()) == {call_cache.UNCACHED}


@pytest.mark.parametrize("axis", [True, 1.0, np.float64(1)])
def test_an_option_equal_to_a_good_one_but_refused_is_refused_after_it(axis, rng):
    """``axis=True`` and ``axis=1.0`` equal 1 and hash alike; validation
    refuses them, so a cached ``axis=1`` call must not answer for them."""
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    bn_forward(x, axis=1, backend="numpy")
    bn_forward(x, axis=1, backend="numpy")
    with pytest.raises(TypeError, match="axis"):
        bn_forward(x, axis=axis, backend="numpy")
    assert _key(x, axis=1) != _key(x, axis=axis)
