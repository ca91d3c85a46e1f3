"""The ``bnkernels`` command line (``bnkernels.cli``) and the measurement code
behind ``bnkernels bench`` (``bnkernels.benchmark``).

Benchmarks run on tiny shapes with one repeat and a small copy buffer, so
these tests take seconds; no test looks at how fast anything is.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnkernels import benchmark as bm
from bnkernels.cli import main

# NCHW, the same data channels-last, and 2-D: tiny, but every layout.
TINY_SHAPES = "4x8x5x5,4x5x5x8@-1,64x16"
FAST = ["--repeat", "1", "--ceiling-mib", "4", "--shapes", TINY_SHAPES]
RESULT_FIELDS = {"op", "shape", "dtype", "implementation", "median_s", "gbps", "pct_of_ceiling", "bytes"}


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
    if cupy["implemented"]:
        assert lines[i].split()[1:3] == ["gpu", "no"]
        assert cupy["install"] in lines[i + 1]
    else:
        assert lines[i].split()[1:3] == ["gpu", "planned"]


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
# bench
# --------------------------------------------------------------------------

def test_bench_quick_writes_json_with_all_fields(tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = ["bench", "--quick", "--ops", "train", "--backends", "numpy,textbook-numpy", *FAST,
            "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Bytes model" in captured.out and "Ceiling" in captured.out
    assert "[1/6] train NCHW" in captured.err and "[6/6]" in captured.err

    data = json.loads(out.read_text())
    assert data["ceiling"]["gbps"] > 0 and data["ceiling"]["bytes"] == 2 * data["ceiling"]["buffer_bytes"]
    results = data["results"]
    assert len(results) == 3 * 2
    assert {r["implementation"] for r in results} == {"numpy", "textbook-numpy"}
    assert {r["layout"] for r in results} == {"NCHW", "NHWC", "2-D"}
    for r in results:
        assert RESULT_FIELDS <= r.keys()
        assert r["status"] == "ok" and r["op"] == "train" and r["dtype"] == "float32"
        assert r["bytes"] == 3 * 4 * int(np.prod(r["shape"]))
        assert r["median_s"] > 0 and r["gbps"] > 0 and r["pct_of_ceiling"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert r["max_err"] <= r["tolerance"]
        if r["implementation"] == "textbook-numpy":
            assert r["speedup_vs_textbook"] == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_bench_every_op_and_dtype_is_correct(dtype, tmp_path):
    out = tmp_path / "out.json"
    assert main(["bench", "--backends", "numpy", "--dtype", dtype, *FAST, "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["op"], r["layout"]) for r in results} == {
        (op, layout) for op in bm.OPS for layout in ("NCHW", "NHWC", "2-D")}
    factor = {"train": 3, "infer": 2, "backward": 5}
    for r in results:
        assert r["status"] == "ok", r
        assert r["bytes"] == factor[r["op"]] * np.dtype(dtype).itemsize * int(np.prod(r["shape"]))


@pytest.mark.torch
def test_bench_torch_when_installed(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out.json"
    assert main(["bench", "--backends", "torch", *FAST, "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 9 and all(r["status"] == "ok" for r in results)


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["bench", "--ops", "train,nope"],
    ["bench", "--dtype", "int8"],
    ["bench", "--backends", "no-such-backend"],
    ["bench", "--backends", "cupy"],  # GPU backends are not benchmarked yet
    ["bench", "--shapes", "4xQ"],
    ["bench", "--shapes", "4x8@5"],
    ["bench", "--repeat", "0"],
    ["bench", "--torch-threads", "0"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["bench", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


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
                                [bm.parse_case("4x8x5x5"), bm.parse_case("64x16")], repeat=2)
    wrong = [r for r in results if r.implementation == "wrong"]
    assert len(wrong) == 2 * len(bm.OPS)
    for r in wrong:
        assert r.status == "wrong" and r.max_err > r.tolerance
        assert r.median_s is None and r.times_s == [] and r.gbps is None
    assert len(calls) == len(wrong)  # called once for the check, never timed
    assert all(r.status == "ok" and len(r.times_s) == 2 for r in results if r.implementation != "wrong")


def test_bench_exits_1_and_prints_wrong(capsys, tmp_path):
    out = tmp_path / "out.json"
    argv = ["bench", "--ops", "train", *FAST, "--json", str(out)]
    assert main(argv, implementations=[bm.TEXTBOOK_NUMPY, _wrong_implementation([])]) == 1
    text = capsys.readouterr().out
    assert text.count("WRONG (max err") == 3
    results = json.loads(out.read_text())["results"]
    assert [r["status"] for r in results if r["implementation"] == "wrong"] == ["wrong"] * 3


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


# --------------------------------------------------------------------------
# benchmark helpers
# --------------------------------------------------------------------------

def test_bytes_model():
    assert [bm.min_bytes(op, 100) for op in bm.OPS] == [300, 200, 500]


@pytest.mark.parametrize("text,shape,axis,layout", [
    ("8x32x28x28", (8, 32, 28, 28), 1, "NCHW"),
    ("8x28x28x32@-1", (8, 28, 28, 32), -1, "NHWC"),
    ("2048x256", (2048, 256), 1, "2-D"),
    ("4x5x6@2", (4, 5, 6), 2, "3-D axis=2"),
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


def test_default_ceiling_size_is_between_64_and_256_mib():
    assert 64 * bm.MiB <= bm.default_ceiling_bytes() <= 256 * bm.MiB
