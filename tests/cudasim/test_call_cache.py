"""``bn_forward`` / ``bn_backward`` calls kept per argument description
(``bnkernels/call_cache.py``) on the numba-cuda backend under the CUDA
simulator: a repeated call skips validation and planning and replays the
recorded launches (``gpu/prepared.py``), with the reference's results on
new data every call, and still rejects what changes between calls."""
import numpy as np
import pytest
from numba import cuda

from bnkernels import bn_backward, bn_forward, call_cache
from bnkernels.backends.gpu import plans
from bnkernels.reference import reference_backward, reference_forward
from helpers import assert_close, make_input, make_params

BACKEND = "numba-cuda"


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """An empty cache, and a record of the recorded launches replayed."""
    call_cache.clear()
    replayed = []
    run = plans.Program.__call__
    monkeypatch.setattr(plans.Program, "__call__", lambda self, *a: replayed.append(self) or run(self, *a))
    yield replayed
    call_cache.clear()


def _entries():
    return [e for e in call_cache._entries.values() if e is not call_cache.UNCACHED]


@pytest.mark.parametrize("shape,axis", [((6, 3, 5), 1), ((9, 4), -1)])
def test_repeated_calls_replay_the_recorded_launches(shape, axis, rng, fresh_cache):
    """The first call validates and runs the fused members; the next ones
    (new data, a cumulative average's changing factor) replay; every result
    is the reference's."""
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    d_g, d_b, d_rm, d_rv = (cuda.to_device(a) for a in (gamma, beta, rm, rv))
    for n in range(3):
        x = make_input(shape, np.float32, rng)
        ref = reference_forward(x, gamma, beta, d_rm.copy_to_host(), d_rv.copy_to_host(), momentum=None,
                                num_batches_tracked=n, axis=axis)
        y, saved = bn_forward(cuda.to_device(x), d_g, d_b, d_rm, d_rv, momentum=None, num_batches_tracked=n,
                              axis=axis, backend=BACKEND, return_saved=True)
        assert_close(y.copy_to_host(), ref[0], np.float32, "y")
        assert_close(d_rm.copy_to_host(), ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
        assert_close(d_rv.copy_to_host(), ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)
        assert len(fresh_cache) == n  # the first call ran the members; the others replayed
    assert len(_entries()) == 1

    for n in range(2):
        y, _ = bn_forward(cuda.to_device(x), d_g, d_b, d_rm, d_rv, training=False, axis=axis, backend=BACKEND,
                          return_saved=True)
        ref = reference_forward(x, gamma, beta, d_rm.copy_to_host(), d_rv.copy_to_host(), training=False,
                                axis=axis)
        assert_close(y.copy_to_host(), ref[0], np.float32, "y")
    assert len(fresh_cache) == 2 + 1  # inference's second call replayed

    for n in range(2):
        dy = make_input(shape, np.float32, rng, mean=0.5)
        dx, dg, db = bn_backward(cuda.to_device(dy), cuda.to_device(x), saved.mean, saved.invstd, d_g, axis=axis,
                                 backend=BACKEND)
        rdx, rdg, rdb = reference_backward(dy, x, saved.mean.copy_to_host(), saved.invstd.copy_to_host(), gamma,
                                           axis=axis)
        assert_close(dx.copy_to_host(), rdx, np.float32, "dx", scale=10)
        assert_close(dg.copy_to_host(), rdg, np.float32, "dgamma", scale=np.abs(rdg).max() + 1)
        assert_close(db.copy_to_host(), rdb, np.float32, "dbeta", scale=np.abs(rdb).max() + 1)
    assert len(fresh_cache) == 3 + 1  # and backward's second call
    assert len(_entries()) == 3


def test_a_repeated_call_still_rejects_overlap_and_changes_nothing(rng):
    """Running statistics and gamma as views of one buffer: apart, then (same
    description) running_mean on gamma's memory, then on x's: refused,
    nothing written. (Host arrays: the simulator's device arrays have no
    ``__cuda_array_interface__``, so no address to compare.)"""
    C = 3
    buf = np.arange(3 * C, dtype=np.float32)
    gamma, rm, rv = buf[:C], buf[C:2 * C], buf[2 * C:]
    x = make_input((6, C, 5), np.float32, rng)
    bn_forward(x, gamma, None, rm, rv, backend=BACKEND)
    bn_forward(x, gamma, None, rm, rv, backend=BACKEND)  # from the cache
    assert len(_entries()) == 1
    before = buf.copy()
    with pytest.raises(ValueError, match="running_mean overlaps gamma"):
        bn_forward(x, gamma, None, buf[:C], rv, backend=BACKEND)
    np.testing.assert_array_equal(buf, before)
    x_before = x.copy()
    with pytest.raises(ValueError, match="running_var overlaps x"):
        bn_forward(x, gamma, None, rm, x.reshape(-1)[:C], backend=BACKEND)
    call_cache.clear()  # and on the full path (host arrays on a GPU backend are checked there too)
    with pytest.raises(ValueError, match="running_mean overlaps gamma"):
        bn_forward(x, gamma, None, buf[:C], rv, backend=BACKEND)
    np.testing.assert_array_equal(buf, before)
    np.testing.assert_array_equal(x, x_before)


def test_host_arrays_on_the_gpu_backend(rng, fresh_cache):
    """NumPy arguments on the GPU backend: kept too (the fused members run
    each time, no replay), with right results; a read-only running_mean of
    the same shape is still refused."""
    C = 3
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    for _ in range(2):
        x = make_input((6, C, 5), np.float32, rng)
        ref = reference_forward(x, None, None, rm, rv)
        y = bn_forward(x, None, None, rm, rv, backend=BACKEND)
        assert_close(y, ref[0], np.float32, "y")
        assert_close(rm, ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
    assert not fresh_cache and len(_entries()) == 1
    frozen = rm.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is read-only"):
        bn_forward(x, None, None, frozen, rv, backend=BACKEND)


def test_another_description_is_planned_anew(rng, fresh_cache):
    """A strided x (same shape, other strides) is another description: its
    own checks and entry, right results."""
    x = make_input((6, 3, 10), np.float32, rng)
    bn_forward(cuda.to_device(np.ascontiguousarray(x[..., ::2])), backend=BACKEND)
    strided = x[..., ::2]
    y = bn_forward(strided, backend=BACKEND)
    assert_close(y, reference_forward(strided)[0], np.float32, "y")
    assert len(_entries()) == 2


def test_calls_captured_into_a_graph_own_their_counters(rng, fresh_cache, monkeypatch):
    """While the stream is being captured (here: said to be), a call neither
    replays a recording nor uses the stream's counters and workspace: each
    gets its own, kept alive; results stay right."""
    from bnkernels.backends import numba_cuda as nc

    x = cuda.to_device(make_input((6, 3, 5), np.float32, rng))
    bn_forward(x, backend=BACKEND)
    monkeypatch.setattr(nc, "_capturing", lambda kind: True)
    kept = len(nc.CAPTURED)
    for _ in range(2):
        xh = make_input((6, 3, 5), np.float32, rng)
        y = bn_forward(cuda.to_device(xh), backend=BACKEND)
        assert_close(y.copy_to_host(), reference_forward(xh)[0], np.float32, "y")
    assert not fresh_cache  # no replay
    per_call = 1 + 5 + 3  # counters, 5 workspace vectors, 3 staging buffers
    assert len(nc.CAPTURED) == kept + 2 * per_call
    counters = nc.CAPTURED[kept::per_call]
    assert counters[0] is not counters[1]
