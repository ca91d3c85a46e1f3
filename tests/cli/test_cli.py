"""The ``bnkernels`` command line (``bnkernels.cli``) and the measurement code
behind ``bnkernels bench`` (the package ``bnkernels.bench``).

Benchmarks run on tiny shapes with one repeat and a small copy buffer, so
these tests take seconds; no test looks at how fast anything is.
"""
import dataclasses
import importlib.util
import io
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from bnkernels import bench as bm
from bnkernels.cli import Progress, build_parser, main, select_implementations


def patch_bench(monkeypatch, name, value):
    """Replace a harness function everywhere it is looked up: the package
    ``bnkernels.bench`` (what the CLI calls) and each of its modules."""
    import sys

    monkeypatch.setattr(bm, name, value)
    for module in [m for k, m in sys.modules.items() if k.startswith("bnkernels.bench.")]:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)

ROOT = Path(__file__).resolve().parents[2]
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
#: the same-size copy the CPU device uses here
CPU_COPY = "numba-copy" if HAVE_NUMBA else "np.copyto"
SYSTEM_INFO = bm.system_info()

# NCHW, the same data channels-last, and 2-D: tiny, but every layout.
TINY_SHAPES = "4x8x5x5,4x5x5x8@-1,64x16"
FAST = ["--repeat", "1", "--warmup", "0", "--min-time", "0", "--ceiling-mib", "4", "--shapes", TINY_SHAPES]
RESULT_FIELDS = {"op", "shape_name", "shape", "axis", "layout", "dtype", "implementation", "role", "device",
                 "device_name", "bytes", "status", "max_err", "tolerance", "timer", "copies", "times_s",
                 "median_s", "min_s", "max_s", "q1_s", "q3_s", "gbps", "ceiling_gbps", "pct_of_ceiling",
                 "copy_gbps", "pct_of_copy", "copy_time_ratio", "speedup_vs_textbook", "speedup_vs_torch"}


def _info_json(capsys):
    assert main(["info", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------

def test_info_lists_numpy_as_usable(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bnkernels" in out and f"NumPy      {np.__version__}" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("numpy ")}
    assert rows["numpy"][1:3] == ["cpu", "yes"]


def test_info_reports_unimportable_cupy_as_unusable_with_reason(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now fails
    data = _info_json(capsys)
    cupy = next(b for b in data["backends"] if b["name"] == "cupy")
    assert cupy["available"] is False
    assert "cupy" in cupy["reason"] and "not installed" in cupy["reason"]
    assert "pip install" in cupy["install"]

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("cupy "))
    assert cupy["reason"] in lines[i]
    assert lines[i].split()[1:3] == ["gpu", "no"]
    assert cupy["install"] in lines[i + 1]


def test_info_json_matches_available_backends(capsys):
    import bnkernels

    data = _info_json(capsys)
    assert data["bnkernels"] == bnkernels.__version__
    assert data["numpy"] == np.__version__
    assert data["cpu"] and data["cpu_count"] >= 1
    statuses = bnkernels.available_backends()
    assert [b["name"] for b in data["backends"]] == list(statuses)
    for b in data["backends"]:
        s = statuses[b["name"]]
        assert (b["device"], b["available"], b["reason"], b["install"]) == (
            s.device, s.available, s.reason, s.install)
        assert b["available"] == (b["reason"] is None)


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "bnkernels", "info"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:3] == ["numpy", "cpu", "yes"] for line in proc.stdout.splitlines())


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("bnkernels")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (package not pip-installed here)")
    proc = subprocess.run([str(script), "info", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backends"]

# --------------------------------------------------------------------------
# bench: the command
# --------------------------------------------------------------------------

def _run_json(argv, tmp_path, implementations=None, expect=0):
    out = tmp_path / "out.json"
    assert main([*argv, "--json", str(out)], implementations=implementations) == expect
    return json.loads(out.read_text())


def test_bench_quick_writes_json_with_all_fields(tmp_path, capsys):
    data = _run_json(["bench", "--quick", "--ops", "train", "--backends", "numpy,textbook-numpy", *FAST],
                     tmp_path)
    captured = capsys.readouterr()
    for text in ("Bytes model", "Ceiling (cpu)", "Timing (cpu)", "Allocation: outputs are not preallocated",
                 "WRONG result is not timed", "vs textbook", "Same-size copy: % copy = GB/s / GB/s of a copy"):
        assert text in captured.out
    # stderr is not a terminal here: plain progress lines, no bar; the copy is counted
    assert "[ceiling] cpu" in captured.err
    assert f"[1/9] copy 4x8x5x5 float32 {CPU_COPY}" in captured.err
    assert "[2/9] train 4x8x5x5 float32 numpy" in captured.err and "[9/9]" in captured.err
    assert "\r" not in captured.err

    cpu = data["devices"]["cpu"]
    assert cpu["name"].startswith(bm.cpu_model()) and cpu["timer"].startswith("time.perf_counter")
    ceiling = data["ceilings"]["cpu"]
    assert ceiling["gbps"] > 0 and ceiling["bytes"] == 2 * ceiling["buffer_bytes"] == 2 * 4 * bm.MiB
    assert ceiling["method"] in ceiling["variants"]
    assert data["quick"] is True and data["cold"] is False
    assert data["command"].startswith("bnkernels bench --quick")
    assert data["timing"]["cpu"]["repeat"] == 1 and data["bytes_model"] == bm.BYTES_MODEL
    assert data["same_size_copy"] == bm.SAME_SIZE_COPY_NOTE
    assert len(data["results"]) == 3 * 3
    copies = data["results"][::3]  # each shape: the copy, then the two implementations
    for c in copies:
        assert (c["op"], c["role"], c["implementation"], c["status"]) == ("copy", "copy", CPU_COPY, "ok")
        assert c["bytes"] == 2 * 4 * int(np.prod(c["shape"])) and c["max_err"] is None
        assert c["copy_gbps"] == c["gbps"] and c["pct_of_copy"] == pytest.approx(100)
        assert c["copy_time_ratio"] == pytest.approx(1)
        assert c["speedup_vs_textbook"] is None and c["speedup_vs_torch"] is None
    results = [r for r in data["results"] if r["op"] != "copy"]
    assert len(results) == 3 * 2
    assert [r["implementation"] for r in results[:2]] == ["numpy", "textbook-numpy"]
    assert {r["layout"] for r in results} == {"NCHW", "NHWC", "2-D"}
    for i, r in enumerate(results):
        assert RESULT_FIELDS <= r.keys()
        assert r["status"] == "ok" and r["op"] == "train" and r["dtype"] == "float32"
        assert r["device"] == "cpu" and r["device_name"] == cpu["name"] and r["copies"] == 1
        assert r["shape_name"] == "x".join(map(str, r["shape"]))
        assert r["bytes"] == 3 * 4 * int(np.prod(r["shape"]))
        assert r["median_s"] > 0 and r["gbps"] > 0 and r["pct_of_ceiling"] > 0
        assert r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]
        assert r["median_s"] == pytest.approx(float(np.median(r["times_s"])))
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert r["pct_of_ceiling"] == pytest.approx(100 * r["gbps"] / ceiling["gbps"])
        copy = copies[i // 2]
        assert copy["shape"] == r["shape"] and r["copy_gbps"] == copy["gbps"]
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / copy["gbps"])
        assert r["copy_time_ratio"] == pytest.approx(r["median_s"] / copy["median_s"])
        assert r["max_err"] <= r["tolerance"]
        assert r["speedup_vs_torch"] is None
        if r["implementation"] == "textbook-numpy":
            assert r["speedup_vs_textbook"] == pytest.approx(1.0) and r["role"] == "textbook"
        else:
            assert r["role"] == "candidate"


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_bench_every_op_and_dtype_is_correct(dtype, tmp_path):
    results = _run_json(["bench", "--backends", "numpy", "--dtype", dtype, *FAST], tmp_path)["results"]
    assert {(r["op"], r["layout"]) for r in results} == {
        (op, layout) for op in ("copy", *bm.OPS) for layout in ("NCHW", "NHWC", "2-D")}
    factor = {"train": 3, "infer": 2, "backward": 5, "train-add-relu": 4, "copy": 2}
    for r in results:
        assert r["status"] == "ok", r
        assert r["bytes"] == factor[r["op"]] * np.dtype(dtype).itemsize * int(np.prod(r["shape"]))


def test_table_has_one_row_per_result_and_both_speedups(capsys):
    assert main(["bench", "--backends", "numpy,textbook-numpy", "--ops", "infer", *FAST]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for col in ("shape", "dims", "layout", "dtype", "implementation", "median ms", "min-max ms", "GB/s",
                "% ceil", "% copy", "x copy", "vs textbook", "vs torch"):
        assert col in header
    assert header.index("% ceil") < header.index("% copy") < header.index("x copy") < header.index("vs textbook")
    rows = [line.split() for line in out.splitlines() if line.startswith("infer ")]
    assert len(rows) == 3 * 2 * 2  # shapes x implementations x the default dtypes
    assert [row[4] for row in rows[::6]] == ["float32", "float16"]
    assert all(row[-1] == "-" and row[-2].endswith("x") and row[-3].endswith("x") and row[-4].endswith("%")
               and row[-5].endswith("%") for row in rows)


@pytest.mark.torch
def test_bench_torch_when_installed(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    data = _run_json(["bench", "--backends", "torch,textbook-numpy", "--dtype", "float32", *FAST], tmp_path)
    results = data["results"]
    # a copy per shape, then each op of each shape for each implementation
    assert len(results) == 3 + 3 * len(bm.OPS) * 2 and all(r["status"] == "ok" for r in results)
    results = [r for r in results if r["op"] != "copy"]
    assert data["torch_threads"] == torch.get_num_threads()
    assert f"({torch.get_num_threads()} thread" in capsys.readouterr().out
    by = {(r["op"], r["shape_name"], r["implementation"]): r for r in results}
    for (op, shape, name), r in by.items():
        assert r["role"] == ("torch" if name == "torch" else "textbook")
        t, b = by[(op, shape, "torch")], by[(op, shape, "textbook-numpy")]
        assert r["speedup_vs_torch"] == pytest.approx(t["median_s"] / r["median_s"])
        assert r["speedup_vs_textbook"] == pytest.approx(b["median_s"] / r["median_s"])


def test_cold_rotates_copies_of_the_inputs(tmp_path, capsys, monkeypatch):
    # A 64 KiB "cache": x (3200 bytes) then needs ceil(2 * 64 KiB / 3200) + 1 = 42 copies.
    patch_bench(monkeypatch, "last_level_cache_bytes", lambda: 64 << 10)
    data = _run_json(["bench", "--cold", "--backends", "numpy", "--ops", "train,backward", "--repeat", "3",
                      "--ceiling-mib", "4", "--shapes", "4x8x5x5", "--dtype", "float32"], tmp_path)
    assert data["cold"] is True
    copy, train, backward = data["results"]
    assert copy["status"] == train["status"] == backward["status"] == "ok"
    assert copy["op"] == "copy" and copy["pct_of_copy"] == pytest.approx(100)
    assert copy["copies"] == train["copies"] == math.ceil(2 * (64 << 10) / 3200) + 1 == 42  # x only
    assert backward["copies"] == math.ceil(2 * (64 << 10) / 6400) + 1  # x and dy
    assert "Caches: cold (--cold)" in capsys.readouterr().out


def test_rotation_count():
    assert bm.rotation_count(1 * bm.MiB, 4 * bm.MiB, 1 << 40) == (9, 9)
    assert bm.rotation_count(1 * bm.MiB, None, 1 << 40) == (129, 129)  # 64 MiB assumed
    assert bm.rotation_count(1 * bm.MiB, 4 * bm.MiB, 6 * bm.MiB) == (2, 9)  # bounded by memory
    assert bm.rotation_count(1, 4 * bm.MiB, 1 << 40) == (bm.MAX_COPIES, 8 * bm.MiB + 1)
    assert bm.rotation_count(1 << 30, 4 * bm.MiB, 1 << 20) == (1, 2)


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["bench", "--ops", "train,nope"],
    ["bench", "--ops", "copy"],  # the copy reference is not an op to select
    ["bench", "--dtype", "int8"],
    ["bench", "--backends", "no-such-backend"],
    ["bench", "--shapes", "4xQ"],
    ["bench", "--shapes", "resnet-57"],
    ["bench", "--shapes", "4x8@5"],
    ["bench", "--repeat", "0"],
    ["bench", "--warmup", "-1"],
    ["bench", "--min-time", "-1"],
    ["bench", "--device", "tpu"],
    ["bench", "--torch-threads", "0"],
    ["bench", "--backends", "textbook-numpy", "--device", "gpu"],
    ["bench", "--json", "/no/such/dir/out.json"],
    ["bench", "--plot", "/no/such/dir/out.png"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


no_gpu = pytest.mark.skipif(bm.gpu_problem() is None, reason="a GPU is usable here")


@no_gpu
@pytest.mark.parametrize("argv,message", [
    (["bench", "--device", "gpu"], "--device gpu: no bnkernels GPU backend is usable here (cupy: "),
    (["bench", "--device", "all"], "--device all: no bnkernels GPU backend is usable here"),
    (["bench", "--backends", "cupy"], "--backends cupy: not usable here: "),
    (["bench", "--backends", "numba-cuda"], "--backends numba-cuda: not usable here: "),
    (["bench", "--backends", "textbook-cupy"], "--backends textbook-cupy: not usable here: "),
    (["bench", "--backends", "numpy,torch-cuda"], "--backends torch-cuda: not usable here: "),
])
def test_gpu_without_a_gpu_is_a_clear_usage_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "pip install" in err or "torch" in err


@no_gpu
def test_default_device_without_a_gpu_is_the_cpu():
    impls = select_implementations(None, build_parser())
    names = [i.name for i in impls]
    assert {i.device for i in impls} == {"cpu"}
    assert "numpy" in names and "textbook-numpy" in names
    assert names.index("numpy") < names.index("textbook-numpy")


def test_torch_that_does_not_import_is_left_out_or_a_usage_error(monkeypatch, capsys):
    patch_bench(monkeypatch, "import_torch", lambda: None)  # as if installed but broken
    names = [i.name for i in select_implementations(None, build_parser(), device="cpu")]
    assert "torch" not in names and "numpy" in names
    assert main(["bench", "--backends", "torch", *FAST]) == 2
    assert "--backends torch: could not be set up here" in capsys.readouterr().err


def test_without_torch_the_table_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails, find_spec says missing
    patch_bench(monkeypatch, "system_info", lambda: {**SYSTEM_INFO, "torch": None})
    assert main(["bench", "--device", "cpu", "--ops", "infer", *FAST]) == 0
    out = capsys.readouterr().out
    assert "torch is not installed here" in out and 'pip install "bnkernels[torch]"' in out
    assert not any(line.split()[5:6] == ["torch"] for line in out.splitlines() if line.startswith("infer"))


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["bench", "--backends", "numpy", *FAST, "--plot", str(tmp_path / "p.png")]) == 2
    assert 'pip install "bnkernels[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    argv = ["bench", "--backends", "numpy,textbook-numpy", *FAST, "--dtype", "float32,float16",
            "--plot", str(png)]
    assert main(argv) == 0
    assert f"Plot: {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_marks_results_that_were_not_timed(tmp_path):
    pytest.importorskip("matplotlib")
    results = bm.run_benchmarks([bm.TEXTBOOK_NUMPY, _wrong_implementation([])], [bm.parse_case("4x8x5x5")],
                                timing=bm.Timing(repeat=1, warmup=0))
    bm.add_derived(results, bm.measure_copy_ceiling(1 * bm.MiB, repeat=1))
    bm.plot_results(results, str(tmp_path / "p.png"), title="test")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_help_and_list_exit_0(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--shapes", "--device", "--cold", "--json", "--plot", "--backends"):
        assert option in out
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name, case in bm.NAMED_CASES.items():
        assert any(line.split()[:2] == [name, case.shape_str] for line in out.splitlines())
    for name in ("numpy", "textbook-numpy", "torch", "cupy", "textbook-cupy", "torch-cuda"):
        assert any(line.split()[:1] == [name] for line in out.splitlines())


# --------------------------------------------------------------------------
# the progress bar
# --------------------------------------------------------------------------

def test_progress_on_a_terminal_is_one_line_redrawn():
    stream = io.StringIO()
    progress = Progress(stream, tty=True, width=10)
    progress.note("[ceiling] cpu")
    for i in range(1, 5):
        progress(i, 4, f"step {i}")
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 2  # the note and the finished bar
    assert "\r[..........] 1/4 0:00  step 1" in text
    assert "[#####.....] 3/4" in text and "eta" in text
    assert text.endswith("[##########] 4/4 done in 0:00\x1b[K\n")


def test_progress_elsewhere_is_plain_lines():
    stream = io.StringIO()
    progress = Progress(stream)  # StringIO is not a terminal
    progress(1, 2, "a")
    progress(2, 2, "b")
    progress.close()
    assert stream.getvalue() == "[1/2] a\n[2/2] b\n"


# --------------------------------------------------------------------------
# the correctness check catches wrong implementations
# --------------------------------------------------------------------------

def _wrong_implementation(calls):
    """Classic mistakes: y scaled by 1.01 (off by 1 %), and a backward that
    forgets the terms through the batch mean and variance."""

    def prepare(op, inp):
        good = bm.TEXTBOOK_NUMPY.prepare(op, inp)
        if op == "backward":
            bshape = [1] * inp.x.ndim
            bshape[inp.axis] = -1
            _, _, var = bm.textbook_forward_train(inp.x, inp.gamma, inp.beta, inp.axis)

            def run():
                calls.append(op)
                dx, dgamma, dbeta = good()
                return inp.dy * inp.gamma.reshape(bshape) / np.sqrt(var + bm.EPS), dgamma, dbeta
        else:
            def run():
                calls.append(op)
                (y,) = good()
                return (y * 1.01,)
        return run

    return bm.Implementation("wrong", prepare)


def test_check_catches_wrong_implementation_and_does_not_time_it():
    calls = []
    results = bm.run_benchmarks([bm.TEXTBOOK_NUMPY, _wrong_implementation(calls)],
                                [bm.parse_case("4x8x5x5"), bm.parse_case("64x16")],
                                timing=bm.Timing(repeat=2, warmup=1))
    wrong = [r for r in results if r.implementation == "wrong"]
    assert len(wrong) == 2 * len(bm.OPS)
    for r in wrong:
        assert r.status == "wrong" and r.max_err > r.tolerance
        assert r.median_s is None and r.times_s == [] and r.gbps is None
    assert len(calls) == len(wrong)  # called once for the check, never timed
    assert all(r.status == "ok" and len(r.times_s) == 2 for r in results if r.implementation != "wrong")


def test_bench_exits_1_and_prints_wrong(capsys, tmp_path):
    data = _run_json(["bench", "--ops", "train", "--dtype", "float32", *FAST], tmp_path,
                     implementations=[bm.TEXTBOOK_NUMPY, _wrong_implementation([])], expect=1)
    text = capsys.readouterr().out
    assert text.count("WRONG (max err") == 3
    assert "3 result(s) failed: wrong train 4x8x5x5 float32 WRONG" in text
    assert [r["status"] for r in data["results"] if r["implementation"] == "wrong"] == ["wrong"] * 3


def test_wrong_comparison_point_is_shown_but_does_not_fail(capsys):
    wrong_textbook = dataclasses.replace(_wrong_implementation([]), name="bad-textbook", role=bm.TEXTBOOK)
    assert main(["bench", "--ops", "infer", *FAST], implementations=[bm.bnkernels_implementation("numpy"),
                                                                       wrong_textbook]) == 0
    out = capsys.readouterr().out
    assert out.count("WRONG (max err") == 3 and "failed" not in out


def test_nan_output_and_bad_shape_are_wrong():
    ref = (np.ones((2, 3)),)
    assert bm.check_outputs((np.ones((2, 3)),), ref) == 0.0
    assert bm.check_outputs((np.full((2, 3), np.nan),), ref) == np.inf
    assert bm.check_outputs((np.ones((3, 2)),), ref) == np.inf
    assert bm.check_outputs((), ref) == np.inf


def test_implementation_that_raises_is_an_error_not_a_crash(capsys):
    def prepare(op, inp):
        raise RuntimeError("boom")

    assert main(["bench", "--ops", "infer", *FAST], implementations=[bm.Implementation("broken", prepare)]) == 1
    assert "ERROR (RuntimeError: boom)" in capsys.readouterr().out


def test_textbook_float16_is_wrong_without_warnings():
    """The textbook code sums float16 in float16 and overflows on the named
    shapes' data (means 1..4): shown as WRONG, with no RuntimeWarning (which
    pytest would turn into an error here)."""
    inp = bm.make_inputs(bm.Case((2048, 64)), np.float16)
    run = bm.TEXTBOOK_NUMPY.prepare("train", inp)
    assert bm.check_outputs(run(), bm.reference_outputs("train", inp)) > bm.TOLERANCE["float16"]


# --------------------------------------------------------------------------
# the GPU path, with a stand-in for CuPy (no GPU needed)
# --------------------------------------------------------------------------

class _FakeCupy:
    """Just enough of CuPy for CudaDevice: NumPy arrays, and events that
    read a fake clock advanced by 1 ms per call of the timed function."""

    def __init__(self):
        self.clock_ms = 0.0
        self.syncs = 0
        fake = self

        class Event:
            def record(self):
                self.t = fake.clock_ms

            def synchronize(self):
                pass

        class Device:
            id = 0

            def synchronize(self):
                fake.syncs += 1

        self.cuda = types.SimpleNamespace(
            Device=Device, Event=Event,
            get_elapsed_time=lambda start, stop: stop.t - start.t,
            runtime=types.SimpleNamespace(
                getDeviceProperties=lambda i: {"name": b"Fake GPU", "l2CacheSize": 1 << 20},
                memGetInfo=lambda: (8 << 30, 16 << 30)))
        self.float64 = np.float64
        self.ones, self.empty_like, self.asarray = np.ones, np.empty_like, np.asarray

    def copyto(self, dst, src):
        self.clock_ms += 1.0
        np.copyto(dst, src)


def test_event_timer_brackets_each_call_with_events():
    fake = _FakeCupy()
    calls = []

    def fn():
        calls.append(1)
        fake.clock_ms += 2.5

    timer = bm.EventTimer(fake.cuda.Event, fake.cuda.get_elapsed_time, fake.cuda.Device().synchronize)
    times = timer.time(fn, bm.Timing(repeat=4, warmup=3))
    assert len(calls) == 7 and fake.syncs == 1  # warm-up calls, then one synchronize
    assert times == [0.0025] * 4


def test_cuda_device_with_a_stand_in_for_cupy():
    fake = _FakeCupy()
    dev = bm.CudaDevice(fake)
    assert (dev.kind, dev.name, dev.cache_bytes) == ("gpu", "Fake GPU (device 0)", 1 << 20)
    assert dev.memory_budget_bytes() == 2 << 30
    c = dev.measure_ceiling(1 * bm.MiB, repeat=3, warmup=1)
    assert (c.device, c.buffer_bytes, c.bytes) == ("gpu", bm.MiB, 2 * bm.MiB)
    assert c.times_s == [0.001] * 3 and c.gbps == pytest.approx(2 * bm.MiB / 1e-3 / 1e9)

    # A GPU implementation is timed by the device's events, ceiling and speed-ups per device.
    def prepare(op, inp):
        run = bm.TEXTBOOK_NUMPY.prepare(op, inp)

        def timed():
            fake.clock_ms += 0.5
            return run()
        return timed

    gpu_impl = bm.Implementation("fake-gpu", prepare, device="gpu")
    results = bm.run_benchmarks([gpu_impl, bm.TEXTBOOK_NUMPY], [bm.parse_case("4x8x5x5")], ops=["infer"],
                                devices={"gpu": dev}, timing=bm.Timing(repeat=3, warmup=1))
    gpu_copy, cpu_copy, gpu, cpu = results  # one same-size copy per device first
    assert gpu.status == "ok" and gpu.device == "gpu" and gpu.device_name == "Fake GPU (device 0)"
    assert gpu.timer.startswith("CUDA events") and gpu.times_s == [0.0005] * 3
    assert (gpu_copy.implementation, gpu_copy.device, gpu_copy.op, gpu_copy.status) == (
        "cupy.copyto", "gpu", "copy", "ok")
    assert gpu_copy.times_s == [0.001] * 3 and gpu_copy.bytes == 2 * 3200  # fake cupy.copyto: 1 ms
    assert (cpu_copy.implementation, cpu_copy.device, cpu_copy.status) == (CPU_COPY, "cpu", "ok")
    bm.add_derived(results, {"gpu": c})
    assert gpu.pct_of_ceiling == pytest.approx(100 * gpu.gbps / c.gbps)
    assert cpu.pct_of_ceiling is None  # no CPU ceiling given
    assert gpu.speedup_vs_textbook is None  # the textbook result ran on the other device
    # infer moves 2 x in 0.5 ms, the copy 2 x in 1 ms: 200 % of the GPU copy; the CPU row uses the CPU copy
    assert gpu.copy_gbps == gpu_copy.gbps and gpu.pct_of_copy == pytest.approx(200)
    assert cpu.copy_gbps == cpu_copy.gbps and cpu.pct_of_copy == pytest.approx(100 * cpu.gbps / cpu_copy.gbps)


# --------------------------------------------------------------------------
# the same-size copy reference (% copy)
# --------------------------------------------------------------------------

def test_copy_leads_each_group_once_per_device_without_importing_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now fails: the CPU path must not need it
    cases = [bm.parse_case("4x8x5x5"), bm.parse_case("64x16")]
    seen = []
    results = bm.run_benchmarks([bm.bnkernels_implementation("numpy"), bm.TEXTBOOK_NUMPY], cases,
                                ops=["infer", "backward"], dtypes=["float32", "float16"],
                                timing=bm.Timing(repeat=2, warmup=0),
                                progress=lambda i, total, label: seen.append((i, total, label)))
    per_group = 1 + 2 * 2  # the copy, then 2 ops x 2 implementations
    assert len(results) == 2 * 2 * per_group
    assert seen == [(i + 1, len(results), label) for i, (_, _, label) in enumerate(seen)]
    assert seen[0][2] == f"copy 4x8x5x5 float32 {CPU_COPY}"
    groups = [results[i:i + per_group] for i in range(0, len(results), per_group)]
    assert [(g[0].dtype, g[0].shape) for g in groups] == [
        (d, c.shape) for d in ("float32", "float16") for c in cases]
    for g in groups:
        copy, *ops = g
        assert (copy.op, copy.role, copy.implementation, copy.device, copy.status) == (
            "copy", bm.COPY, CPU_COPY, "cpu", "ok")
        assert copy.bytes == 2 * int(np.prod(copy.shape)) * np.dtype(copy.dtype).itemsize
        assert copy.max_err is None and copy.tolerance is None and len(copy.times_s) == 2
        assert copy.gbps == pytest.approx(copy.bytes / copy.median_s / 1e9)
        assert [r.op for r in ops] == ["infer", "infer", "backward", "backward"]
        assert all(r.role != bm.COPY and (r.shape, r.dtype) == (copy.shape, copy.dtype) for r in ops)


def test_same_size_copy_can_be_left_out():
    seen = []
    results = bm.run_benchmarks([bm.TEXTBOOK_NUMPY], [bm.parse_case("64x16")], ops=["infer"],
                                timing=bm.Timing(repeat=1, warmup=0), same_size_copy=False,
                                progress=lambda i, total, label: seen.append(total))
    assert [r.op for r in results] == ["infer"] and seen == [1]
    bm.add_derived(results, None)
    assert results[0].pct_of_copy is None and results[0].copy_gbps is None


def _timed(op, role, gbps, shape=(64, 16), axis=1, dtype="float32", device="cpu", name="impl"):
    """A hand-made timed Result: 1 GB moved in 1 / gbps seconds."""
    return bm.Result(op, "x".join(map(str, shape)), shape, axis, bm.layout_label(shape, axis), dtype, name,
                     role, device, device, 10**9, "ok", median_s=1.0 / gbps, gbps=gbps)


def test_add_derived_pct_of_copy_from_hand_made_results():
    copy = _timed("copy", bm.COPY, 20.0, name="np.copyto")
    cand = _timed("train", bm.CANDIDATE, 5.0)
    text = _timed("train", bm.TEXTBOOK, 2.5, name="textbook-numpy")
    other_dtype = _timed("train", bm.CANDIDATE, 5.0, dtype="float16")  # no float16 copy
    other_axis = _timed("train", bm.CANDIDATE, 5.0, axis=0)  # same shape, other channel axis
    other_device = _timed("train", bm.CANDIDATE, 5.0, device="gpu")
    gpu_copy = _timed("copy", bm.COPY, 40.0, device="gpu", name="cupy.copyto")
    other_shape = _timed("infer", bm.CANDIDATE, 30.0, shape=(32, 16))
    wrong = dataclasses.replace(cand, status="wrong", median_s=None, gbps=None)
    failed_copy = dataclasses.replace(copy, shape=(32, 16), status="error", median_s=None, gbps=None)
    results = [copy, cand, text, other_dtype, other_axis, other_device, gpu_copy, other_shape, wrong,
               failed_copy]
    bm.add_derived(results, None)
    assert (cand.copy_gbps, cand.pct_of_copy) == (20.0, pytest.approx(25.0))
    # the time ratio: the op's median over the copy's (a train counts 3 passes of x, a copy 2)
    assert cand.copy_time_ratio == pytest.approx(cand.median_s / copy.median_s) and copy.copy_time_ratio == 1
    assert other_device.copy_time_ratio == pytest.approx(other_device.median_s / gpu_copy.median_s)
    assert text.pct_of_copy == pytest.approx(12.5)
    assert copy.pct_of_copy == pytest.approx(100.0) and gpu_copy.pct_of_copy == pytest.approx(100.0)
    assert (other_device.copy_gbps, other_device.pct_of_copy) == (40.0, pytest.approx(12.5))
    for r in (other_dtype, other_axis, other_shape, wrong, failed_copy):  # no timed copy of theirs
        assert r.copy_gbps is None and r.pct_of_copy is None and r.copy_time_ratio is None
    # speed-ups as before; the copy rows have none
    assert cand.speedup_vs_textbook == pytest.approx(2.0) and text.speedup_vs_textbook == pytest.approx(1.0)
    assert copy.speedup_vs_textbook is None and copy.speedup_vs_torch is None
    assert bm.min_bytes("copy", 100) == 200


def test_table_pct_copy_column_matches_the_json(tmp_path, capsys):
    data = _run_json(["bench", "--backends", "numpy", "--ops", "infer,backward", "--dtype", "float32", *FAST],
                     tmp_path)
    out = capsys.readouterr().out
    assert "Same-size copy: % copy = GB/s / GB/s of a copy of x into a preallocated buffer" in out
    lines = out[out.index("\nop "):out.index("\nAll figures:")].strip().splitlines()
    header = lines[0].split("  ")
    assert [h.strip() for h in header if h.strip()][9:12] == ["% ceil", "% copy", "x copy"]
    rows = [line.split() for line in lines[2:] if line]
    assert len(rows) == len(data["results"]) == 3 * 3
    assert [row[0] for row in rows] == ["copy", "infer", "backward"] * 3
    for row, r in zip(rows, data["results"]):
        assert (row[0], row[5]) == (r["op"], r["implementation"])
        assert row[-4] == f"{r['pct_of_copy']:.0f}%" and row[-5] == f"{r['pct_of_ceiling']:.0f}%"
        assert row[-3] == f"{r['copy_time_ratio']:.2f}x"
        if r["op"] == "copy":
            assert row[-4] == "100%" and row[-3] == "1.00x" and row[-2:] == ["-", "-"]


def test_cold_rotates_the_copy_too():
    prepared = []

    class SmallCache(bm.CpuDevice):
        def __init__(self):
            super().__init__()
            self.cache_bytes = 16 << 10  # 16 KiB: 3200-byte inputs need 12 copies

        def copy_implementation(self):
            impl = super().copy_implementation()
            return dataclasses.replace(impl, prepare=lambda op, inp: prepared.append(inp.x) or impl.prepare(op, inp))

    case = bm.parse_case("4x8x5x5")
    for cold, copies in ((False, 1), (True, 12)):
        prepared.clear()
        (copy, infer) = bm.run_benchmarks([bm.TEXTBOOK_NUMPY], [case], ops=["infer"], devices={"cpu": SmallCache()},
                                          timing=bm.Timing(repeat=2, warmup=0), cold=cold)
        assert copy.op == "copy" and copy.status == "ok"
        assert copy.copies == infer.copies == copies
        assert len({id(x) for x in prepared}) == copies  # a copy of x per rotation slot


def test_sliced_copy_in_slices_and_whole():
    from concurrent.futures import ThreadPoolExecutor

    src = np.arange(2 * 3 * 7, dtype=np.float32).reshape(2, 3, 7)  # 42 values in 4 uneven slices
    with ThreadPoolExecutor(max_workers=4) as pool:
        for args in ((), (pool, 4)):
            dst = np.zeros_like(src)
            assert bm.sliced_copy(dst, src, *args)() is None
            np.testing.assert_array_equal(dst, src)
    with pytest.raises(ValueError):
        bm.sliced_copy(np.zeros((7, 6), np.float32), src.reshape(6, 7).T)  # not contiguous: no silent copy


# --------------------------------------------------------------------------
# benchmark helpers
# --------------------------------------------------------------------------

def test_bytes_model():
    assert [bm.min_bytes(op, 100) for op in bm.OPS] == [300, 200, 500, 400]


def test_named_shapes_are_the_issue_shapes():
    assert {(c.shape, c.axis % len(c.shape)) for c in bm.DEFAULT_CASES} == {
        ((32, 64, 56, 56), 1), ((256, 256, 14, 14), 1), ((32, 56, 56, 64), 3), ((256, 14, 14, 256), 3),
        ((8192, 1024), 1), ((100000, 32), 1), ((64, 3, 224, 224), 1)}
    assert [c.shape for c in bm.QUICK_CASES][:2] == [(8, 64, 56, 56), (8, 56, 56, 64)]
    assert [c.name for c in bm.QUICK_CASES][:2] == ["resnet-56/4", "resnet-56-nhwc/4"]
    assert bm.parse_cases("all") == list(bm.DEFAULT_CASES)
    assert bm.parse_cases("dense, 4x8@0") == [bm.NAMED_CASES["dense"], bm.Case((4, 8), 0)]
    assert bm.NAMED_CASES["resnet-14"].tiny().shape == (4, 256, 4, 4)
    assert bm.NAMED_CASES["tall-skinny"].tiny().shape == (64, 32)


@pytest.mark.parametrize("text,shape,axis,layout", [
    ("8x32x28x28", (8, 32, 28, 28), 1, "NCHW"),
    ("8x28x28x32@-1", (8, 28, 28, 32), -1, "NHWC"),
    ("2048x256", (2048, 256), 1, "2-D"),
    ("4x5x6@2", (4, 5, 6), 2, "3-D axis=2"),
    ("resnet-56-nhwc", (32, 56, 56, 64), -1, "NHWC"),
])
def test_parse_case(text, shape, axis, layout):
    case = bm.parse_case(text)
    assert (case.shape, case.axis, case.layout) == (shape, axis, layout)


def test_channels_last_case_holds_the_same_data():
    nchw = bm.make_inputs(bm.Case((2, 3, 4, 5), 1), np.float32)
    nhwc = bm.make_inputs(bm.Case((2, 4, 5, 3), -1), np.float32)
    np.testing.assert_array_equal(nhwc.x, nchw.x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nhwc.dy, nchw.dy.transpose(0, 2, 3, 1))
    assert nhwc.x.flags.c_contiguous
    np.testing.assert_array_equal(nhwc.gamma, nchw.gamma)


def test_default_ceiling_buffer_is_beyond_the_cache(monkeypatch):
    patch_bench(monkeypatch, "available_memory_bytes", lambda: 64 << 30)
    for llc, expected in [(None, 256 * bm.MiB), (32 * bm.MiB, 256 * bm.MiB), (480 * bm.MiB, 960 * bm.MiB),
                          (4 << 30, 2 << 30)]:
        patch_bench(monkeypatch, "last_level_cache_bytes", lambda llc=llc: llc)
        assert bm.default_ceiling_bytes() == expected
    patch_bench(monkeypatch, "available_memory_bytes", lambda: 1 << 30)  # an eighth of the memory
    assert bm.default_ceiling_bytes() == 128 * bm.MiB


def test_cpu_ceiling_tries_one_and_several_threads_and_numba():
    c = bm.measure_copy_ceiling(2 * bm.MiB, repeat=2, threads=2)
    expected = {"np.copyto, 1 thread", "np.copyto, 2 threads"} | ({"numba parallel copy"} if HAVE_NUMBA else set())
    assert set(c.variants) == expected
    assert c.gbps == max(c.variants.values()) and c.method in c.variants


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_numba_copy_copies_every_dtype(dtype):
    if not HAVE_NUMBA:
        pytest.skip("numba is not installed")
    src = np.arange(1001).astype(dtype)
    dst = np.full_like(src, np.nan)
    bm.numba_copy(dst, src)()
    np.testing.assert_array_equal(dst, src)
    with pytest.raises(ValueError, match="C-contiguous"):
        bm.numba_copy(dst[::2], src[::2])


# --------------------------------------------------------------------------
# the pytest-benchmark suite (bench/), run as documented
# --------------------------------------------------------------------------

def _pytest_bench(tmp_path, *args):
    cmd = [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-p", "no:cacheprovider",
           "-k", "tall-skinny and float32 and infer and numpy and not textbook and not out",
           "--benchmark-max-time=0.02", "--benchmark-min-rounds=2", "--bench-ceiling-mib=8",
           f"--benchmark-storage=file://{tmp_path}/storage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_pytest_bench_benchmark_only_records_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    proc = _pytest_bench(tmp_path, f"--benchmark-json={out}", "--benchmark-save=first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (b,) = json.loads(out.read_text())["benchmarks"]
    info = b["extra_info"]
    assert b["group"] == "infer tall-skinny float32" and b["stats"]["rounds"] >= 2
    assert (info["op"], info["implementation"], info["device"], info["dtype"], info["layout"]) == (
        "infer", "numpy", "cpu", "float32", "2-D")
    assert info["shape"] == [100000, 32]  # timed: the full shape
    assert info["bytes"] == 2 * 4 * 100000 * 32
    assert info["gbps"] == pytest.approx(info["bytes"] / b["stats"]["median"] / 1e9)
    assert info["pct_of_ceiling"] == pytest.approx(100 * info["gbps"] / info["ceiling_gbps"])
    assert info["copy_gbps"] > 0
    assert info["pct_of_copy"] == pytest.approx(100 * info["gbps"] / info["copy_gbps"])
    assert info["device_name"].startswith(bm.cpu_model())

    proc = _pytest_bench(tmp_path, "--benchmark-compare")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Comparing against benchmarks from: Linux" in proc.stderr and "0001_first" in proc.stderr
    assert "(0001_first)" in proc.stdout and "(NOW)" in proc.stdout


def test_cold_timing_uses_a_different_copy_on_each_call(monkeypatch):
    seen = []

    def prepare(op, inp):
        buf = inp.x
        return lambda: (seen.append(buf) or bm.TEXTBOOK_NUMPY.prepare(op, inp)())

    class SmallCache(bm.CpuDevice):
        def __init__(self):
            super().__init__()
            self.cache_bytes = 16 << 10  # 16 KiB: 3200-byte inputs need 12 copies

    case = bm.parse_case("4x8x5x5")
    inp = bm.make_inputs(case, np.float32)
    res = bm.run_one(bm.Implementation("rec", prepare), "infer", case, inp, bm.reference_outputs("infer", inp),
                     SmallCache(), bm.Timing(repeat=24, warmup=0), cold=True)
    assert res.status == "ok" and res.copies == 12 and len(res.times_s) == 24
    checked, timed = seen[0], seen[1:]
    assert checked is inp.x
    assert len({id(b) for b in timed}) == 12
    assert all(timed[i] is timed[i + 12] for i in range(12))  # a fixed rotation
    assert timed[11] is inp.x  # the checked (hot) inputs come last
    for b in timed:
        np.testing.assert_array_equal(b, inp.x)


# --------------------------------------------------------------------------
# <backend>+out: the API with a preallocated out=
# --------------------------------------------------------------------------

def test_out_variants_run_when_named_and_write_into_their_buffer(tmp_path, capsys):
    data = _run_json(["bench", "--backends", "numpy,numpy+out", "--dtype", "float32", *FAST], tmp_path)
    rows = [r for r in data["results"] if r["role"] == bm.CANDIDATE]
    assert {r["implementation"] for r in rows} == {"numpy", "numpy+out"}
    assert all(r["status"] == "ok" and r["max_err"] <= r["tolerance"] for r in rows)
    impl = bm.bnkernels_implementation("numpy", preallocated=True)
    inp = bm.make_inputs(bm.parse_case("4x8x5x5"), np.float32)
    run = impl.prepare("train", inp)
    first, second = run()[0], run()[0]
    assert first is second  # the same preallocated buffer every call
    parser = build_parser()
    names = [i.name for i in select_implementations(None, parser, device="cpu")]
    assert "numpy" in names and not any(n.endswith(bm.OUT_SUFFIX) for n in names)  # not by default
    assert main(["bench", "--list"]) == 0
    assert "numpy+out" in capsys.readouterr().out


def test_info_says_how_numba_runs_here(capsys):
    if not HAVE_NUMBA:
        pytest.skip("numba is not installed")
    import numba

    from bnkernels.backends import numba_half

    data = _info_json(capsys)
    details = next(b for b in data["backends"] if b["name"] == "numba")["details"]
    assert f"{numba.get_num_threads()} threads" in details
    assert ("F16C" in details) == numba_half.NATIVE_HALF
    assert next(b for b in data["backends"] if b["name"] == "numpy")["details"] == ""
    assert main(["info"]) == 0
    assert details in capsys.readouterr().out


def test_cpu_copy_without_numba_is_np_copyto_and_copies(monkeypatch):
    patch_bench(monkeypatch, "_numba_copy_kernel", lambda: None)  # as if numba were not installed
    made = []  # the destinations the real sliced_copy is given, and its runners

    def recording(dst, src, pool=None, threads=1):
        run = real(dst, src, pool, threads)
        made.append((dst, run))
        return run

    real = bm.sliced_copy
    patch_bench(monkeypatch, "sliced_copy", recording)
    device = bm.CpuDevice()
    impl = device.copy_implementation()
    assert impl.name == "np.copyto" and impl.role == bm.COPY and not impl.checked
    for shape in [(7,), (3, 1000, 17)]:
        made.clear()
        inp = bm.make_inputs(bm.Case(shape, 0 if len(shape) == 1 else 1), np.float32)
        run = impl.prepare(bm.COPY, inp)
        assert len(made) == (2 if device.threads > 1 else 1)  # one thread and all of them were tried
        (dst,) = [d for d, r in made if r is run]  # the chosen one
        dst[...] = np.nan
        run()
        np.testing.assert_array_equal(dst, inp.x)
    with pytest.raises(bm.Unsupported):
        impl.prepare("train", inp)


def test_plot_shows_percent_of_the_same_size_copy_with_titled_panels(tmp_path):
    """Bars are pct_of_copy (the same run's copy of x in the same cache
    state), not % of the large-copy ceiling, and each panel says so."""
    pytest.importorskip("matplotlib")
    results = bm.run_benchmarks([bm.TEXTBOOK_NUMPY], [bm.parse_case("4x8x5x5")],
                                timing=bm.Timing(repeat=1, warmup=0))
    bm.add_derived(results, bm.measure_copy_ceiling(1 * bm.MiB, repeat=1))
    fig = bm.plot_results(results, str(tmp_path / "p.png"))
    timed = {r.op: r for r in results if r.role != bm.COPY}
    assert all(r.pct_of_copy is not None and r.pct_of_copy != r.pct_of_ceiling for r in timed.values())
    for ax, op in zip(fig.axes, [op for op in bm.OPS if op in timed]):
        title = " ".join(ax.get_title(loc="left").split())
        assert title.startswith(bm.OP_TITLES[op]) and "as % of a copy of x timed in the same run" in title
        heights = [p.get_height() for p in ax.patches]
        assert heights == pytest.approx([timed[op].pct_of_copy])
        assert ax.get_ylabel() == "% of same-size copy"
