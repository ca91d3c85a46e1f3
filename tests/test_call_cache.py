"""The call cache of ``bn_forward`` / ``bn_backward``
(``bnkernels/call_cache.py``): which calls have a description, and that
CPU backends keep none (their replays on a GPU backend are tested under
the simulator: ``tests/cudasim/test_call_cache.py``)."""
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


def test_cpu_backends_keep_no_prepared_call(rng):
    """A CPU backend's calls are marked uncached: validated in full every time
    (a bad argument after good ones is still refused)."""
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for _ in range(2):
        y, saved = bn_forward(x, None, None, rm, rv, backend="numpy", return_saved=True)
        bn_backward(x, x, saved.mean, saved.invstd, backend="numpy")
    assert set(call_cache._entries.values()) == {call_cache.UNCACHED}
    with pytest.raises(ValueError, match="running_mean overlaps x"):
        bn_forward(x, None, None, x[0, 0, :3], rv, backend="numpy")


def test_the_cache_is_bounded(rng):
    for n in range(call_cache.MAX_ENTRIES + 5):
        bn_forward(rng.standard_normal((2, 1, n + 1)), backend="numpy")
    assert len(call_cache._entries) == call_cache.MAX_ENTRIES
