"""pytest-benchmark suite: training forward, inference and backward of every
CPU backend on one NCHW float32 shape.

With the default ``--benchmark-disable`` (pyproject addopts) each benchmark
runs once as a smoke test and is checked against the float64 reference. To
time them::

    pytest bench --benchmark-enable --benchmark-only

``benchmark.extra_info`` records op, backend, dtype, layout, shape, bytes
(the minimum-bytes model of :mod:`bnkernels.benchmark`) and, when timed, gbps
(from the median).
"""
import numpy as np
import pytest

import bnkernels
from bnkernels import benchmark as bm

CASE = bm.Case((16, 64, 28, 28), 1)  # 3.2 MB of float32
DTYPE = np.dtype(np.float32)


@pytest.fixture(scope="module")
def inputs():
    return bm.make_inputs(CASE, DTYPE)


@pytest.mark.parametrize("op", bm.OPS)
def test_bench(benchmark, backend, op, inputs):
    run = bm.bnkernels_implementation(backend).prepare(op, inputs)
    nbytes = bm.min_bytes(op, inputs.x.nbytes)
    benchmark.group = f"{op} {CASE.layout} {CASE.shape_str} {DTYPE.name}"
    benchmark.extra_info.update(op=op, backend=backend, dtype=DTYPE.name, layout=CASE.layout,
                                shape=list(CASE.shape), bytes=nbytes, gbps=None)

    outputs = benchmark(run)

    # benchmark.stats is None when benchmarks are disabled (a single plain call).
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats else None
    if median:
        benchmark.extra_info["gbps"] = nbytes / median / 1e9
    err = bm.check_outputs(outputs, bm.reference_outputs(op, inputs))
    assert err <= bm.TOLERANCE[DTYPE], f"{backend} {op}: max relative error {err:.3g}"
