"""Arrays that bnkernels writes (``out``, running statistics in training)
must not share memory with any other argument: every such pair is rejected
with both names in the message, and nothing changes. Exactly ``x`` (or
``dy``) as ``out`` is the one allowed alias (in place)."""
import itertools

import numpy as np
import pytest

from bnkernels import bn_backward, bn_forward
from helpers import assert_close, make_input

SHAPE, C = (4, 3, 5), 3
SIZE = int(np.prod(SHAPE))

FORWARD_ARGS = ("x", "gamma", "beta", "running_mean", "running_var", "out")
BACKWARD_ARGS = ("dy", "x", "saved_mean", "saved_invstd", "gamma", "out")
#: (written, other) pairs that must be rejected
FORWARD_TRAIN_PAIRS = [(w, o) for w in ("out", "running_mean", "running_var") for o in FORWARD_ARGS if o != w]
FORWARD_INFER_PAIRS = [("out", o) for o in ("gamma", "beta", "running_mean", "running_var")]
BACKWARD_PAIRS = [("out", o) for o in ("dy", "x", "saved_mean", "saved_invstd", "gamma")]


def _arguments(names, rng, sharing=None):
    """Fresh float32 arguments (x-shaped or per-channel); the two names in
    ``sharing`` are views of one buffer that overlap by a few elements."""
    def size(name):
        return SIZE if name in ("x", "dy", "out") else C

    args = {}
    for name in names:
        args[name] = make_input((size(name),), np.float32, rng) + (2.0 if name == "running_var" else 0.0)
    if sharing:
        a, b = sharing
        buf = make_input((size(a) + size(b),), np.float32, rng) + 2.0
        start_b = size(a) - 2  # the last two elements of a are the first two of b
        args[a], args[b] = buf[:size(a)], buf[start_b:start_b + size(b)]
    return {name: (a.reshape(SHAPE) if a.size == SIZE else a) for name, a in args.items()}


def _must_fail(call, args, match):
    before = {name: a.copy() for name, a in args.items()}
    with pytest.raises(ValueError, match=match):
        call(**args)
    for name, a in args.items():
        np.testing.assert_array_equal(a, before[name], err_msg=f"{name} changed by a rejected call")


def _match(written, other):
    if written == "out" and other in ("x", "dy"):
        return f"out overlaps {other} without being {other} itself"
    return f"({written} overlaps {other}|{other} overlaps {written})"


@pytest.mark.parametrize("written,other", FORWARD_TRAIN_PAIRS)
def test_training_forward_rejects_every_overlap(backend, rng, written, other):
    args = _arguments(FORWARD_ARGS, rng, sharing=(written, other))
    _must_fail(lambda **a: bn_forward(backend=backend, **a), args, _match(written, other))


@pytest.mark.parametrize("written,other", FORWARD_INFER_PAIRS)
def test_inference_forward_rejects_out_over_any_input(backend, rng, written, other):
    args = _arguments(FORWARD_ARGS, rng, sharing=(written, other))
    _must_fail(lambda **a: bn_forward(training=False, backend=backend, **a), args, _match(written, other))


@pytest.mark.parametrize("written,other", BACKWARD_PAIRS)
def test_backward_rejects_out_over_any_input(backend, rng, written, other):
    args = _arguments(BACKWARD_ARGS, rng, sharing=(written, other))
    _must_fail(lambda **a: bn_backward(backend=backend, **a), args, _match(written, other))


def test_same_array_as_both_running_statistics(backend, rng):
    args = _arguments(FORWARD_ARGS[:4], rng)
    args["running_var"] = args["running_mean"]
    _must_fail(lambda **a: bn_forward(backend=backend, **a), args, "running_mean overlaps running_var")


@pytest.mark.parametrize("name", ["running_mean", "running_var", "out"])
def test_written_array_with_a_zero_stride(backend, rng, name):
    """A writable broadcast (zero stride) would receive every channel's
    value in one element."""
    args = _arguments(FORWARD_ARGS, rng)
    one = args[name].reshape(-1)[:1]
    args[name] = np.lib.stride_tricks.as_strided(one, args[name].shape, (0,) * args[name].ndim)
    assert args[name].flags.writeable
    _must_fail(lambda **a: bn_forward(backend=backend, **a), args, f"{name} has elements that share memory")


def test_interleaved_views_do_not_overlap(backend, rng):
    """Views that share a buffer but no element are fine, and correct."""
    buf = np.full(2 * SIZE, np.nan, np.float32)
    x = buf[0::2].reshape(SHAPE)
    x[...] = make_input(SHAPE, np.float32, rng)
    out = buf[1::2].reshape(SHAPE)
    stats = np.full(2 * C, np.nan, np.float32)
    rm, rv = stats[0::2], stats[1::2]
    rm[...], rv[...] = 0.0, 1.0
    expected = bn_forward(x.copy(), backend=backend)
    y = bn_forward(x, None, None, rm, rv, backend=backend, out=out)
    assert y is out
    assert_close(out, expected, np.float32, "y into an interleaved out")
    assert np.isfinite(rm).all() and np.isfinite(rv).all()


@pytest.mark.parametrize("in_place", ["x", "dy"])
def test_out_may_be_an_input_itself(backend, rng, in_place):
    args = _arguments(BACKWARD_ARGS[:5], rng)
    expected = bn_backward(backend=backend, **{k: a.copy() for k, a in args.items()})[0]
    dx = bn_backward(backend=backend, out=args[in_place], **args)[0]
    assert dx is args[in_place]
    np.testing.assert_allclose(dx, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_every_pair_is_covered():
    """The pair lists above are complete: every array written, against
    every other array argument of each call."""
    assert len(FORWARD_TRAIN_PAIRS) == len(set(FORWARD_TRAIN_PAIRS)) == 3 * 5
    assert {o for _, o in BACKWARD_PAIRS} == set(BACKWARD_ARGS) - {"out"}
    assert set(itertools.chain(*FORWARD_INFER_PAIRS)) | {"x"} == set(FORWARD_ARGS)
