"""Tests of the host CUDA harness itself (cuda_host.h, harness.cpp, runner.py)
with the small kernels of testdata/: that the CUDA built-ins behave as on a
GPU, that misuse is reported, and that ThreadSanitizer finds a missing
__syncthreads at its source line."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from host_cuda import runner

HERE = Path(__file__).resolve().parent
KERNELS = HERE / "testdata" / "harness_kernels.cu"
RACE = HERE / "testdata" / "race_kernel.cu"

NAMES = [
    "block_sum<float>", "block_sum<double>", "block_sum<int>",
    "shuffle_lanes<float>", "shuffle_lanes<double>", "shuffle_lanes<int>",
    "shuffle_lanes<unsigned int>", "shuffle_lanes<long long>",
    "half_warp_groups", "count_blocks", "half_to_float", "float_to_half", "swap_half2",
    "axpb_float4", "vector_copy", "scalars", "divergent_barrier", "bad_mask", "deadlock",
    "read_uninitialised_shared",
]

pytestmark = pytest.mark.skipif(shutil.which(runner.CXX) is None,
                                reason=f"no C++ compiler ({runner.CXX}) to build the harness")

# Deselect with -k "not tsan" to save the ~5 s they take.
needs_tsan = pytest.mark.skipif(not runner.tsan_available(),
                                reason="g++ has no libtsan (g++ -print-file-name=libtsan.so)")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Same shape as the library's launch plans."""
    kernel: str
    grid: tuple
    block: tuple
    args: tuple
    shared_mem: int = 0


@pytest.fixture(scope="module")
def so():
    return runner.build(KERNELS, NAMES)


@pytest.fixture(scope="module")
def dev():
    return runner.HostDevice()


POISON = {4: np.uint32(0xFFFFFFFF), 8: np.uint64(0xFFFFFFFFFFFFFFFF)}


def bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


# ---------------------------------------------------------------------------
# Reductions, shuffles, built-ins, atomics
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("block", [256, 80, 20, 1024])
def test_block_sum(so, dev, rng, dtype, block):
    """Shuffles + shared memory + __syncthreads over 2 blocks; 80 and 20
    threads leave a partial last warp (20: the only warp is partial)."""
    grid, n = 2, 3001
    x = rng.integers(-1000, 1000, n).astype(dtype)  # integer values: exact sums
    partial = np.zeros(grid, dtype)
    name = {np.float32: "block_sum<float>", np.float64: "block_sum<double>",
            np.int32: "block_sum<int>"}[dtype]
    dev.launch(so, name, grid, block, (x, partial, np.int64(n)))
    owner = (np.arange(n) % (grid * block)) // block  # grid-stride loop
    expected = [x[owner == b].sum() for b in range(grid)]
    np.testing.assert_array_equal(partial, np.array(expected, dtype))


def _expected_shuffles(values: np.ndarray, delta: int) -> np.ndarray:
    """What each lane receives, per the CUDA Programming Guide; lanes that
    read an absent lane get the poison (all-one bits)."""
    n = values.size
    raw = bits(values)
    out = np.empty((7, n), raw.dtype)
    for t in range(n):
        warp, lane = divmod(t, 32)
        present = min(32, n - 32 * warp)

        def src(kind, width):
            seg = lane - lane % width
            if kind == "down":
                return lane + delta if lane % width + delta < width else lane
            if kind == "up":
                return lane - delta if lane % width >= delta else lane
            if kind == "xor":
                s = lane ^ delta
                return s if s < seg + width else lane
            return seg + delta % width  # idx

        for k, (kind, width) in enumerate([("down", 32), ("up", 32), ("xor", 32), ("idx", 32),
                                           ("down", 8), ("xor", 8), ("idx", 8)]):
            s = src(kind, width)
            out[k, t] = raw[32 * warp + s] if s < present else POISON[raw.itemsize]
    return out


@pytest.mark.parametrize("ctype,dtype", [
    ("float", np.float32), ("double", np.float64), ("int", np.int32),
    ("unsigned int", np.uint32), ("long long", np.int64)])
@pytest.mark.parametrize("block", [64, 48])
@pytest.mark.parametrize("delta", [1, 3, 16])
def test_shuffle_semantics(so, dev, rng, ctype, dtype, block, delta):
    values = (rng.standard_normal(block) * 1e6).astype(dtype) if dtype in (
        np.float32, np.float64) else rng.integers(-2**31, 2**31 - 1, block).astype(dtype)
    out = np.zeros((7, block), dtype)
    dev.launch(so, f"shuffle_lanes<{ctype}>", 1, block, (values, out, np.int32(delta)))
    np.testing.assert_array_equal(bits(out), _expected_shuffles(values, delta))


def test_disjoint_half_warp_masks(so, dev):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros_like(x)
    dev.launch(so, "half_warp_groups", 1, 64, (x, out))
    np.testing.assert_array_equal(out, np.repeat(np.arange(0, 64, 16), 16).astype(np.float32))


def test_builtins_and_atomics(so, dev):
    grid, block = (3, 2, 2), (4, 2, 3)
    nblocks, per_block = 12, 24
    ids = np.zeros(nblocks * per_block, np.uint32)
    counters = np.zeros(2, np.uint32)
    order = np.zeros(nblocks, np.uint32)
    last = np.zeros(1, np.uint32)
    dims = np.zeros(6, np.uint32)
    dev.launch(so, "count_blocks", grid, block, (ids, counters, order, last, dims))
    b, t = np.divmod(np.arange(nblocks * per_block), per_block)
    np.testing.assert_array_equal(ids, (b << 16) | t)
    assert counters.tolist() == [nblocks, nblocks * per_block]
    np.testing.assert_array_equal(order, np.arange(nblocks))  # blocks run in order, x fastest
    assert last[0] == nblocks - 1
    assert dims.tolist() == [*grid, *block]


# ---------------------------------------------------------------------------
# Half precision, vector types, scalars
# ---------------------------------------------------------------------------

def test_half_to_float_all_bit_patterns(so, dev):
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = np.zeros(65536, np.float32)
    dev.launch(so, "half_to_float", 4, 256, (h, out, np.uint32(h.size)))
    ref = h.astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(bits(out)[~nan], bits(ref)[~nan])


def _float_to_half_inputs(rng) -> np.ndarray:
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    finite = np.unique(finite)
    mid = (finite[:-1] + finite[1:]) / 2  # exact ties (12 significant bits)
    edges = np.array([
        0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504, 65519.996, 65520, 65536, 1e30,
        2.0**-24, 2.0**-25, 2.0**-25 * (1 + 2**-23), 2.0**-26, 1.5 * 2.0**-24, 2.5 * 2.0**-24,
        2.0**-14, 2.0**-14 * (1 - 2**-11), 2.0**-14 * (1 - 2**-12), 1.0 + 2**-11,
        1.0 + 3 * 2**-11, 3.4028234663852886e38, 1.1754943508222875e-38, 1e-45,
    ])
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([
        finite.astype(np.float32), mid.astype(np.float32),
        np.nextafter(mid.astype(np.float32), np.float32(np.inf)),
        np.nextafter(mid.astype(np.float32), np.float32(-np.inf)),
        edges.astype(np.float32), random_bits.view(np.float32),
    ]).astype(np.float32)
    return np.concatenate([values, -values])


def test_float_to_half_rounding(so, dev, rng):
    x = _float_to_half_inputs(rng)
    out = np.zeros(x.size, np.float16)
    dev.launch(so, "float_to_half", 8, 256, (x, out, np.uint32(x.size)))
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(np.float16)  # IEEE round to nearest even
    nan = np.isnan(x)
    np.testing.assert_array_equal(bits(out)[nan], np.uint16(0x7FFF))  # CUDA's canonical NaN
    mismatch = np.flatnonzero(bits(out)[~nan] != bits(ref)[~nan])
    assert mismatch.size == 0, [(float(x[~nan][i]), hex(bits(out)[~nan][i]),
                                 hex(bits(ref)[~nan][i])) for i in mismatch[:10]]


def test_half2_pack_unpack(so, dev, rng):
    h = rng.standard_normal(2 * 100).astype(np.float16)
    out = np.zeros_like(h)
    dev.launch(so, "swap_half2", 1, 128, (h, out, np.uint32(100)))
    np.testing.assert_array_equal(bits(out), bits(h.reshape(-1, 2)[:, ::-1].reshape(-1)))


def test_float4_loads_and_stores(so, dev, rng):
    n = 1003  # ragged: 250 float4 + 3 scalars
    x = rng.standard_normal(n).astype(np.float32)
    out = np.full(n, np.nan, np.float32)
    a, b = np.float32(1.5), np.float32(-0.25)
    dev.launch(so, "axpb_float4", 2, 64, (x, out, a, b, np.uint32(n)))
    ref = (np.float64(a) * x.astype(np.float64) + np.float64(b)).astype(np.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-7, atol=0)


def test_vector_types_copy_bytes(so, dev, rng):
    n16 = 37
    src = rng.integers(0, 2**32, 4 * n16, dtype=np.uint64).astype(np.uint32)
    dst = np.zeros_like(src)
    dev.launch(so, "vector_copy", 2, 32, (src, dst, np.uint32(n16)))
    np.testing.assert_array_equal(dst, src)


def test_scalar_arguments_null_pointer_and_math(so, dev):
    out = np.zeros(10, np.float64)
    args = [np.int64(-(2**40)), np.int32(-7), np.uint32(2**32 - 1), np.float64(2.25),
            np.float32(0.5), out, np.uint64(0)]
    dev.launch(so, "scalars", 1, 1, args)
    assert out[:6].tolist() == [-(2**40), -7, 2**32 - 1, 2.25, 0.5, -1.0]
    assert out[6] == 1 / 1.5 and out[8] == 1.5
    assert out[7] == np.float32(1 / np.sqrt(0.5)) and out[9] == 2.0
    args[6] = np.array([42.0], np.float32)
    dev.launch(so, "scalars", 1, 1, args)
    assert out[5] == 42.0


# ---------------------------------------------------------------------------
# Launch plans and argument checking
# ---------------------------------------------------------------------------

def test_run_accepts_a_launch_plan(so, dev):
    x = np.arange(64, dtype=np.float32)
    partial = np.zeros(1, np.float32)
    dev.run(so, Launch("block_sum< float >", (1, 1, 1), (64, 1, 1),
                       (x, partial, np.int64(64))))
    assert partial[0] == x.sum()
    with pytest.raises(NotImplementedError, match="dynamic shared memory"):
        dev.run(so, Launch("block_sum<float>", (1, 1, 1), (64, 1, 1),
                           (x, partial, np.int64(64)), shared_mem=256))


def test_kernel_signatures_are_exported(so, dev):
    assert dev.kernels(so)["scalars"] == (
        "long long, int, unsigned int, double, float, double*, const float*")
    assert dev.kernels(so)["half_to_float"] == "const __half*, float*, unsigned int"


@pytest.mark.parametrize("args,message", [
    ((np.zeros(4, np.float32), np.zeros(1, np.float32), np.int32(4)), r"np\.int64"),
    ((np.zeros(4, np.float32), np.zeros(1, np.float32), 4), "numpy scalar"),
    ((np.zeros(4, np.float64), np.zeros(1, np.float32), np.int64(4)), "float64 array"),
    ((np.zeros(8, np.float32)[::2], np.zeros(1, np.float32), np.int64(4)), "C-contiguous"),
    ((np.zeros(4, np.float32), np.zeros(1, np.float32)), "takes 3 arguments"),
    ((np.zeros(4, np.float32), np.uint64(7), np.int64(4)), "null"),
])
def test_bad_arguments_are_refused(so, dev, args, message):
    with pytest.raises(TypeError, match=message):
        dev.launch(so, "block_sum<float>", 1, 32, args)


def test_read_only_array_for_a_written_pointer(so, dev):
    out = np.zeros(1, np.float32)
    out.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        dev.launch(so, "block_sum<float>", 1, 32, (np.zeros(4, np.float32), out, np.int64(4)))


def test_unknown_kernel_and_bad_configuration(so, dev):
    with pytest.raises(KeyError, match="not in"):
        dev.launch(so, "block_sum<long>", 1, 32, ())
    with pytest.raises(runner.KernelError, match="invalid launch configuration"):
        dev.launch(so, "bad_mask", 1, 2048, (np.zeros(2048, np.float32),))


def test_compile_error_is_reported(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(float* x) { x[0] = __no_such_intrinsic(); }\n")
    with pytest.raises(runner.BuildError, match="__no_such_intrinsic"):
        runner.build(bad, ["k"])


def test_builds_are_cached(so):
    # same inputs -> same library, found without compiling (blanks in
    # names do not matter)
    assert runner.build(KERNELS, [n.replace("<", "< ") for n in NAMES]) == so


def test_two_libraries_in_one_process(so, dev, rng):
    """Each library has its own runtime and its own __shared__ statics, even
    for a template kernel both contain (nothing is shared through the
    dynamic linker)."""
    other = runner.build(KERNELS, ["block_sum<float>", "read_uninitialised_shared"])
    assert other != so
    nm = shutil.which("nm")
    if nm:  # only bn_host_* (and libstdc++'s inline functions) are exported
        table = subprocess.run([nm, "-D", "--defined-only", str(other)], capture_output=True,
                               text=True, check=True).stdout.split("\n")
        rows = [line.split() for line in table if line.strip()]
        ours = [r for r in rows if not r[2].startswith(("_ZNSt", "_ZNKSt", "_ZSt", "_ZZNSt"))]
        assert {r[2] for r in ours} == {
            "bn_host_launch", "bn_host_last_error", "bn_host_kernel_count",
            "bn_host_kernel_name", "bn_host_kernel_signature", "bn_host_shared_bytes"}
    assert 0 < dev.shared_bytes(other) < dev.shared_bytes(so)
    x = rng.integers(-100, 100, 1000).astype(np.float32)
    for lib in (so, other, so):
        partial = np.zeros(1, np.float32)
        dev.launch(lib, "block_sum<float>", 1, 96, (x, partial, np.int64(x.size)))
        assert partial[0] == x.sum()


# ---------------------------------------------------------------------------
# Misuse, shared memory poisoning, deadlock
# ---------------------------------------------------------------------------

def test_divergent_syncthreads_is_reported(so, dev):
    with pytest.raises(runner.KernelError, match=r"__syncthreads\(\) #1 was passed"):
        dev.launch(so, "divergent_barrier", 1, 64, (np.zeros(64, np.float32),))


def test_shuffle_mask_without_caller_is_reported(so, dev):
    with pytest.raises(runner.KernelError, match="does not contain the calling lane"):
        dev.launch(so, "bad_mask", 1, 32, (np.zeros(32, np.float32),))


def test_shared_memory_starts_poisoned_in_every_block(so, dev):
    assert dev.shared_bytes(so) > 0
    out = np.zeros(3 * 64, np.uint32)
    for _ in range(2):  # and again in a second launch
        dev.launch(so, "read_uninitialised_shared", 3, 64, (out,))
        np.testing.assert_array_equal(out, np.uint32(0xFFFFFFFF))


def test_deadlock_is_diagnosed(so, tmp_path):
    """In a subprocess: the watchdog ends the process it runs in."""
    script = (
        "import numpy as np, runner\n"
        f"runner.HostDevice().launch({str(so)!r}, 'deadlock', 1, 32,"
        " (np.zeros(32, np.float32),))\n")
    env = dict(os.environ, BNHOST_DEADLOCK_SECONDS="0.5", PYTHONPATH=str(HERE))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 134, proc.stderr
    assert "deadlock in deadlock, block (0,0,0) of 32 threads" in proc.stderr
    assert "waiting in __syncthreads: 0\n" in proc.stderr
    assert "waiting in a warp shuffle: 1-31\n" in proc.stderr


# ---------------------------------------------------------------------------
# ThreadSanitizer
# ---------------------------------------------------------------------------

def _marked_line(path: Path, marker: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in {path}")


RACE_NAMES = ["reverse_block<float>", "block_total<float>"]


@needs_tsan
@pytest.mark.parametrize("kernel,marker", [("reverse_block<float>", "shared"),
                                           ("block_total<float>", "totals")])
def test_tsan_reports_missing_syncthreads_at_its_line(kernel, marker):
    so = runner.build(RACE, RACE_NAMES, tsan=True, defines=["DROP_BARRIER"])
    x = np.arange(512, dtype=np.float32)
    result = runner.tsan_launch(so, kernel, 2, 256, (x, np.zeros_like(x)))
    assert result.returncode == 66, result.report  # TSAN's exit code after a report
    assert "WARNING: ThreadSanitizer: data race" in result.report
    write = f"race_kernel.cu:{_marked_line(RACE, f'MARK: {marker} write')}"
    read = f"race_kernel.cu:{_marked_line(RACE, f'MARK: {marker} read')}"
    # both sides of the race: the current access and the previous one
    assert write in result.report and read in result.report, result.report
    summary = next(line for line in result.report.splitlines() if line.startswith("SUMMARY"))
    assert kernel.split("<")[0] in summary and (write in summary or read in summary)
    variable = "buf" if marker == "shared" else "totals"
    assert f"Location is global '{kernel}(float const*, float*)::{variable}'" in result.report


@needs_tsan
def test_tsan_clean_with_the_barrier_and_for_the_harness_itself(so):
    """The correct kernel, and the shuffle/atomic/shared-memory kernels (which
    exercise every synchronisation path of the runtime), raise no report."""
    so_race = runner.build(RACE, RACE_NAMES, tsan=True)
    result = runner.tsan_run(so_race, Launch(
        "reverse_block<float>", (2, 1, 1), (256, 1, 1),
        (np.arange(512, dtype=np.float32), np.zeros(512, np.float32))))
    assert result.clean, result.report
    np.testing.assert_array_equal(
        result.args[1], np.arange(512, dtype=np.float32).reshape(2, 256)[:, ::-1].reshape(-1))

    so_tsan = runner.build(KERNELS, NAMES, tsan=True)
    script = f"""
import numpy as np, runner
dev, so = runner.HostDevice(), {str(so_tsan)!r}
x = np.arange(300, dtype=np.float32); p = np.zeros(2, np.float32)
dev.launch(so, "block_sum<float>", 2, 80, (x, p, np.int64(300)))
assert p.sum() == x.sum(), p
v = np.arange(48, dtype=np.int64); out = np.zeros((7, 48), np.int64)
dev.launch(so, "shuffle_lanes<long long>", 1, 48, (v, out, np.int32(3)))
h = np.arange(64, dtype=np.float32); o = np.zeros(64, np.float32)
dev.launch(so, "half_warp_groups", 1, 64, (h, o))
u = [np.zeros(n, np.uint32) for n in (4 * 24, 2, 4, 1, 6)]
dev.launch(so, "count_blocks", (2, 2, 1), (4, 2, 3), u)
assert u[1].tolist() == [4, 96], u[1]
s = np.zeros(128, np.uint32)
dev.launch(so, "read_uninitialised_shared", 2, 64, (s,))
"""
    returncode, report = runner.run_tsan(script)
    assert returncode == 0 and "ThreadSanitizer" not in report, report
