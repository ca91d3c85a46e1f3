"""Small calls of the numba backend run on the calling thread alone
(``bnkernels/backends/numba_threads.py``): the same plans and results, bit
for bit, as on Numba's whole pool, and the thread count given back."""
import threading

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from bnkernels import bn_backward, bn_forward, channel_stats, layer_norm  # noqa: E402
from bnkernels.backends import numba_threads  # noqa: E402

# planes with channels for two tasks per thread (the fused kernels), too few
# channels (statistics, then the apply pass), channel-fastest rows, 16 bits
CASES = [((4, 8, 5, 5), 1, np.float32), ((4, 3, 5, 5), 1, np.float32), ((6, 1, 7, 3), 1, np.float64), ((50, 17), 1, np.float32),
         ((3, 5, 4, 8), -1, np.float16)]


def _all_results(x, axis):
    C = x.shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, saved = bn_forward(x, None, None, rm, rv, axis=axis, backend="numba", return_saved=True)
    dx, dgamma, dbeta = bn_backward(y, x, saved.mean, saved.invstd, axis=axis, backend="numba")
    yi = bn_forward(x, None, None, rm, rv, training=False, axis=axis, backend="numba")
    stats = channel_stats(x, axis=axis, backend="numba")
    ln = layer_norm(x, x.shape[-1:], backend="numba")
    return y, saved.mean, saved.invstd, dx, dgamma, dbeta, yi, rm, rv, stats.mean, stats.m2, ln


@pytest.mark.parametrize("shape, axis, dtype", CASES)
def test_a_small_call_on_one_thread_gives_the_pools_results_bit_for_bit(shape, axis, dtype, rng, monkeypatch):
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: nothing to compare")
    x = (rng.standard_normal(shape) + 3).astype(dtype)
    assert x.nbytes < numba_threads.SERIAL_BYTES
    one = _all_results(x, axis)
    monkeypatch.setattr(numba_threads, "SERIAL_BYTES", 0)  # every call on the pool
    pool = _all_results(x, axis)
    for a, b in zip(one, pool):
        np.testing.assert_array_equal(a, b)


def test_plans_are_made_for_the_pool_while_a_call_runs_on_one_thread():
    """Inside a small call Numba runs one thread, yet threads() answers the
    pool's count (so the kernels, chunks and blocks are the same), and
    both are given back afterwards, also when the call raises."""
    seen = []

    @numba_threads.thread_safe
    def entry(x, fail=False):
        seen.append((numba.get_num_threads(), numba_threads.threads()))
        if fail:
            raise ValueError("inside")

    n = numba.get_num_threads()
    entry(np.zeros(4))
    with pytest.raises(ValueError, match="inside"):
        entry(np.zeros(4), fail=True)
    entry(np.zeros(numba_threads.SERIAL_BYTES))  # 8 bytes each: a large one, on the pool
    assert seen == [(1, n), (1, n), (n, n)]
    assert numba.get_num_threads() == n and numba_threads.threads() == n


def test_another_python_thread_keeps_its_thread_count_meanwhile():
    """Numba's thread count is per Python thread: a small call in one does
    not shrink another's pool."""
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: nothing to compare")
    n = numba.get_num_threads()
    inside, release, counts = threading.Event(), threading.Event(), []

    @numba_threads.thread_safe
    def entry(x):
        inside.set()
        release.wait(30)

    worker = threading.Thread(target=entry, args=(np.zeros(4),))
    worker.start()
    assert inside.wait(30)
    counts.append(numba.get_num_threads())
    release.set()
    worker.join(30)
    assert counts == [n]
