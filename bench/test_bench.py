"""pytest-benchmark suite: every operation of :data:`bnkernels.bench.OPERATIONS`
(batch norm's training forward, inference forward, backward, the training
forward with a residual and ReLU and the torch-module step; layer, RMS, group
and instance norm forward and backward) of every implementation usable here
(the bnkernels backends, textbook NumPy, ``torch.nn.functional``; with a GPU
also the GPU backends, textbook CuPy and torch CUDA), each op on the named
shapes of :data:`bnkernels.bench.NAMED_CASES` that belong to it
(:func:`bnkernels.bench.own_cases`), float32, float16 and bfloat16 (with
ml_dtypes)::

    pytest bench --benchmark-only                            # everything, a few minutes on 2 cores
    pytest bench --benchmark-only -k "resnet-56 and float32"
    pytest bench --benchmark-only --benchmark-autosave       # keep the run in .benchmarks/
    pytest bench --benchmark-only --benchmark-compare        # ... and compare with the last kept run

Groups are ``op shape dtype``, so each table compares the implementations
of one case. Each output is checked against the float64 reference before
it is timed (that call is also the warm-up); a comparison point that is
wrong on a case (textbook NumPy's float16 sums overflow) is skipped with
the reason instead of being timed, a wrong bnkernels result fails. A
bnkernels backend without kernels for an op (the GPU backends for the norm
family, so far) is skipped with the reason.

``benchmark.extra_info`` holds op, implementation, role, device,
device_name, shape_name, shape, axis, layout, dtype, bytes (the minimum
bytes the op must move, :data:`bnkernels.bench.BYTES_MODEL`),
bytes_model, max_err, timer, allocation and, when timed, gbps (from the
median), ceiling_gbps and ceiling_method (a large copy on the same device,
measured once per session), pct_of_ceiling, copy_gbps and pct_of_copy (a
copy of x into a preallocated buffer of its size on the same device, hot,
timed with the device's ``quick_timing`` once per shape, dtype and device;
:data:`bnkernels.bench.SAME_SIZE_COPY_NOTE`); torch_threads for torch. On
a GPU, pytest-benchmark's wall clock includes a device synchronize after
each call, and ``cuda_event_median_s``/``gbps`` come from CUDA events.
Outputs are not preallocated (no API here takes one), so allocation is part
of every time. Cache-cold timing is ``bnkernels bench --cold``.

With timing off (the normal test run, see ``bench/conftest.py``) every
benchmark runs once on a tiny version of its shape, as a smoke test.
"""
import statistics

import pytest

from bnkernels import bench as bm

CATALOG = bm.implementation_catalog()
DTYPES = ("float32", "float16", "bfloat16")


def _impl_params(usable: bool):
    params = []
    for e in CATALOG.values():
        if (e.problem is None) != usable:
            continue
        marks = [pytest.mark.gpu] if e.device == "gpu" else []
        params.append(pytest.param(e.name, marks=marks, id=e.name))
    return params


@pytest.fixture(scope="session")
def implementations():
    """name -> Implementation, built once (torch imports once)."""
    return {}


@pytest.fixture(scope="session")
def devices():
    return {}


@pytest.fixture(scope="session")
def ceilings():
    """kind -> Ceiling, measured once, on first use, when timing is on."""
    return {}


@pytest.fixture(scope="session")
def copies():
    """(case, dtype, kind) -> Result of the same-size copy, timed on first use."""
    return {}


@pytest.fixture(scope="module")
def case(request, timed):
    """The named shape of the test's parameters (indirect), tiny unless timed."""
    c = bm.NAMED_CASES[request.param]
    return c if timed else c.tiny()


@pytest.fixture(scope="module", params=DTYPES)
def dtype(request):
    if request.param == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes: pip install ml_dtypes")
    return bm.bench_dtype(request.param)


@pytest.fixture(scope="module")
def inputs(case, dtype):
    return bm.make_inputs(case, dtype)


@pytest.fixture(scope="module")
def expected(inputs):
    """op -> float64 reference outputs, computed on first use."""
    cache = {}

    def get(op):
        if op not in cache:
            cache[op] = bm.reference_outputs(op, inputs)
        return cache[op]

    return get


def _get(cache, key, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _op_impl_params():
    """(op, implementation, named shape) triples: every op with every usable
    implementation on each named shape that belongs to it, but the ``+out``
    rows only for ops that take an ``out=`` (not the torch-module step, whose
    layer allocates its own output, nor the norm family's backward) and the
    torch-module step not with the textbook code (no layer)."""
    return [pytest.param(op, p.values[0], shape, marks=p.marks, id=f"{p.id}-{op}-{shape}")
            for op in bm.ALL_OPS for shape in bm.own_cases(op) for p in _impl_params(usable=True)
            if (bm.OPERATIONS[op].out or not p.values[0].endswith(bm.OUT_SUFFIX))
            and (op != "torch-module" or CATALOG[p.values[0]].role != bm.TEXTBOOK)]


#: What a bnkernels backend without norm-family kernels says (bnkernels.norm_family.backend_for).
NO_KERNELS = "has no kernels for"


@pytest.mark.parametrize("op,name,case", _op_impl_params(), indirect=["case"])
def test_bench(benchmark, name, op, case, dtype, inputs, expected, implementations, devices, ceilings,
               copies, timed, ceiling_bytes):
    impl = _get(implementations, name, CATALOG[name].make)
    device = _get(devices, impl.device, lambda: bm.make_device(impl.device))
    tol = bm.TOLERANCE[dtype.name]
    try:
        run = impl.prepare(op, inputs)
    except bm.Unsupported as exc:
        assert impl.role != bm.CANDIDATE or NO_KERNELS in str(exc), f"{name} cannot run {op}: {exc}"
        pytest.skip(f"{name} does not run {op}: {exc}")

    # Correctness first; this call is also the warm-up.
    err = bm.check_outputs(run(), expected(op), impl.to_host)
    info = benchmark.extra_info
    info.update(op=op, implementation=impl.name, role=impl.role, device=impl.device,
                device_name=device.name, shape_name=case.label, shape=list(case.shape), axis=case.axis,
                layout=case.layout, dtype=dtype.name, bytes=bm.min_bytes(op, inputs.x.nbytes),
                bytes_model=bm.BYTES_MODEL, max_err=err, allocation=bm.ALLOCATION_NOTE,
                timer="pytest-benchmark wall clock" + (
                    ", device synchronized after each call; gbps from CUDA events"
                    if impl.device == "gpu" else ""),
                gbps=None, ceiling_gbps=None, pct_of_ceiling=None, copy_gbps=None, pct_of_copy=None)
    if impl.role == bm.TORCH:
        info["torch_threads"] = bm.import_torch().get_num_threads()
    if not err <= tol:
        assert impl.role != bm.CANDIDATE, f"{name} {op}: max relative error {err:.3g} > {tol:.0e}"
        pytest.skip(f"{name} is wrong on {op} {case.label} {dtype.name} "
                    f"(max relative error {err:.3g} > {tol:.0e}): not timed")
    benchmark.group = f"{op} {case.label} {dtype.name}"

    def call():
        out = run()
        device.synchronize()
        return out

    outputs = benchmark(call)

    if not timed:  # the smoke run: check what the benchmark call returned too
        err = bm.check_outputs(outputs, expected(op), impl.to_host)
        assert err <= tol, f"{name} {op}: max relative error {err:.3g}"
        return
    median = benchmark.stats.stats.median
    if impl.device == "gpu":  # the wall clock includes launch and sync overhead: use events
        median = statistics.median(device.time(run, device.quick_timing))
        info["cuda_event_median_s"] = median
    ceiling = _get(ceilings, impl.device, lambda: device.measure_ceiling(ceiling_bytes))
    info.update(gbps=info["bytes"] / median / 1e9, ceiling_gbps=ceiling.gbps, ceiling_method=ceiling.method)
    info["pct_of_ceiling"] = 100.0 * info["gbps"] / ceiling.gbps
    copy = _get(copies, (case, dtype.name, impl.device),
                lambda: bm.run_one(device.copy_implementation(), bm.COPY, case, inputs, None, device,
                                   device.quick_timing))
    if copy.gbps:
        info.update(copy_gbps=copy.gbps, pct_of_copy=100.0 * info["gbps"] / copy.gbps)


if _impl_params(usable=False):
    @pytest.mark.parametrize("name", _impl_params(usable=False))
    def test_not_benchmarked_here(name):
        """One skip per implementation that cannot run here, with the reason."""
        pytest.skip(f"{name} not benchmarked here: {CATALOG[name].problem}")
