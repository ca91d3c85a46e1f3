"""The engine's staged path checked on any backend: a batch split into parts
(as processes would hold it), each part's reductions merged with the
others' through an exchange (``bnkernels.engine``), must give what the
float64 reference gives for the whole batch. Used by ``test_engine.py``
(CPU backends) and ``cudasim/test_numba_cuda_backend.py`` (numba-cuda).
"""
from __future__ import annotations

import numpy as np

from bnkernels import engine
from bnkernels.backends import resolve
from bnkernels.backends.interface import GradSums
from bnkernels.reference import reference_backward, reference_forward
from bnkernels.validation import channel_layout
from helpers import assert_close, make_input, make_params


class OtherParts:
    """An exchange that merges a part's reductions with those of the other
    parts (computed beforehand): what an all-gather between processes
    followed by ``engine.merge`` does."""

    def __init__(self, moments=(), sums=(), counts=()):
        self.others, self.other_sums, self.other_counts = list(moments), list(sums), list(counts)

    def moments(self, mine):
        return engine.merge([mine, *self.others])

    def grad_sums(self, mine, count):
        sum_dy = mine.sum_dy + sum(s.sum_dy for s in self.other_sums)
        sum_dy_xhat = mine.sum_dy_xhat + sum(s.sum_dy_xhat for s in self.other_sums)
        return GradSums(sum_dy, sum_dy_xhat), count + sum(self.other_counts)


def host(a):
    """A backend result as a NumPy array (numba device arrays included)."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def check_split_batch(backend, shape, axis: int, dtype, cuts, rng, relu=False):
    """Split x along axis 0 at ``cuts`` (axis must not be 0), run the staged
    forward (with running statistics) and backward on each part, and
    compare the concatenated results with the reference of the whole.
    ``backend``: a name, or an object with the ``interface.Backend``
    members."""
    x = make_input(shape, dtype, rng)
    dy = make_input(shape, dtype, rng, mean=0.5)
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    rm0, rv0 = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    impl = resolve(backend, x) if isinstance(backend, str) else backend
    a = impl.asarray
    xs, dys = np.split(x, cuts), np.split(dy, cuts)
    layouts = [channel_layout(p.shape, axis) for p in xs]
    moments = [impl.statistics(a(p), lay) for p, lay in zip(xs, layouts)]
    ys, saved = [], None
    for i, (p, lay) in enumerate(zip(xs, layouts)):
        rm, rv = rm0.copy(), rv0.copy()
        exchange = OtherParts(moments[:i] + moments[i + 1:])
        y, mean, invstd = engine.forward_train(impl, a(p), lay, a(gamma), a(beta), 1e-5, relu, (rm, rv, 0.1),
                                               exchange=exchange)
        ys.append(host(y))
        saved = saved or (host(mean), host(invstd), rm, rv)
    ref = reference_forward(x, gamma, beta, rm0, rv0, axis=axis, activation="relu" if relu else None)
    assert_close(np.concatenate(ys), ref[0], dtype, "y")
    assert_close(saved[0], ref[1], dtype, "saved.mean", scale=np.abs(ref[1]).max() + 1)
    assert_close(saved[1], ref[2], dtype, "saved.invstd")
    assert_close(saved[2], ref[3], np.float32, "running_mean", scale=np.abs(ref[3]).max() + 1)
    assert_close(saved[3], ref[4], np.float32, "running_var", scale=np.abs(ref[4]).max() + 1)

    mean, invstd = a(saved[0]), a(saved[1])
    sums = [impl.backward_reduce(a(d), a(p), lay, mean, invstd) for d, p, lay in zip(dys, xs, layouts)]
    dxs, grads = [], []
    for i, (d, p, lay) in enumerate(zip(dys, xs, layouts)):
        others = [j for j in range(len(xs)) if j != i]
        exchange = OtherParts(sums=[sums[j] for j in others], counts=[layouts[j].count for j in others])
        dx, dgamma, dbeta = engine.backward(impl, a(d), a(p), lay, mean, invstd, a(gamma), exchange=exchange)
        dxs.append(host(dx))
        grads.append((host(dgamma).astype(np.float64), host(dbeta).astype(np.float64)))
    rdx, rdg, rdb = reference_backward(dy, x, saved[0], saved[1], gamma, axis=axis)
    assert_close(np.concatenate(dxs), rdx, dtype, "dx")
    # dgamma, dbeta: each part's own (torch's SyncBatchNorm convention); their sum is the whole batch's
    assert_close(sum(g[0] for g in grads), rdg, dtype, "sum of dgamma", scale=np.abs(rdg).max() + 1)
    assert_close(sum(g[1] for g in grads), rdb, dtype, "sum of dbeta", scale=np.abs(rdb).max() + 1)
    part_dg = reference_backward(dys[0], xs[0], saved[0], saved[1], gamma, axis=axis)[1]
    assert_close(grads[0][0], part_dg, dtype, "the first part's dgamma", scale=np.abs(rdg).max() + 1)
