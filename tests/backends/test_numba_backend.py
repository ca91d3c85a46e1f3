"""The numba backend's own choices (channel blocks of the plane kernels),
checked against the float64 reference where they change the work split."""
import numba
import numpy as np
import pytest

pytest.importorskip("numba")
from bnkernels import bn_backward, bn_forward, channel_stats  # noqa: E402
from bnkernels.backends import numba_backend as nb  # noqa: E402
from bnkernels.reference import reference_backward, reference_forward  # noqa: E402
from bnkernels.validation import ChannelLayout  # noqa: E402
from helpers import DTYPES, assert_close, make_input, make_params  # noqa: E402


@pytest.mark.parametrize("shape", [(32, 64, 3136), (256, 256, 196), (64, 3, 50176), (5, 37, 9), (1, 1000, 2),
                                   (4096, 8, 7)])
@pytest.mark.parametrize("itemsize,arrays", [(4, 1), (2, 1), (4, 2)])
def test_channel_block_choice(shape, itemsize, arrays):
    layout = ChannelLayout(shape, 1)
    outer, C, inner = shape
    block = nb._block(layout, itemsize, arrays)
    row = inner * itemsize
    assert 1 <= block <= max(C, 1)
    assert block == 1 or C // block >= 2 * numba.get_num_threads()  # every thread gets >= 2 tasks
    assert block == 1 or block * arrays * row * outer <= nb.BLOCK_BYTES  # the slabs fit the budget
    # runs of at least RUN_BYTES unless a limit above stops the block from growing
    if block * row < nb.RUN_BYTES:
        grown = block + 1
        assert (grown * arrays * row * outer > nb.BLOCK_BYTES or C // grown < 2 * numba.get_num_threads())


# (shape, axis) whose channel planes are split into blocks of several
# channels with a shorter last block (checked in the test).
BLOCKED = [((5, 37, 9), 1), ((2, 61, 3, 5), 1), ((3, 45, 2), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", BLOCKED)
def test_blocked_planes_match_reference(shape, axis, dtype, rng):
    x = make_input(shape, dtype, rng, mean=50.0)
    layout = ChannelLayout(shape, axis)
    for arrays in (1, 2):
        block = nb._block(layout, x.itemsize, arrays)
        assert block > 1 and layout.channels % block, "the case must have several blocks, the last one short"
    C = shape[axis]
    gamma, beta = make_params(C, rng)
    for relu in (None, "relu"):
        ref = reference_forward(x, gamma, beta, axis=axis, activation=relu)
        y, saved = bn_forward(x, gamma, beta, axis=axis, activation=relu, backend="numba", return_saved=True)
        assert_close(y, ref[0], dtype, f"y {relu}")
        assert_close(saved.mean, ref[1], dtype, "mean", scale=np.abs(ref[1]).max())
        assert_close(saved.invstd, ref[2], dtype, "invstd")
    stats = channel_stats(x, axis=axis, backend="numba")
    assert_close(stats.mean, ref[1], dtype, "stats.mean", scale=np.abs(ref[1]).max())
    assert_close(stats.var, 1 / ref[2] ** 2 - 1e-5, dtype, "stats.var")
    dy = make_input(shape, dtype, rng, mean=0.0, std=1.0)
    dx, dgamma, dbeta = bn_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis, backend="numba")
    rdx, rdg, rdb = reference_backward(dy, x, saved.mean, saved.invstd, gamma, axis=axis)
    assert_close(dx, rdx, dtype, "dx", scale=np.abs(rdx).max())
    assert_close(dgamma, rdg, dtype, "dgamma", scale=np.abs(rdg).max())
    assert_close(dbeta, rdb, dtype, "dbeta", scale=np.abs(rdb).max())
