"""The norm-family operations of ``bnkernels bench`` (layer, RMS, group and
instance norm, forward and backward): each checked against the float64
reference before it is timed, a wrong result reported WRONG, a case or
backend an op does not take shown as unsupported, and each op measured by
default on its own named shapes only.

Tiny shapes, one timed call, no warm-up; no test looks at how fast anything is.
"""
import json
import types

import numpy as np

import bnkernels.norm_family
from bnkernels import bench as bm
from bnkernels.backends import resolve
from bnkernels.cli import main

NORM_OPS = tuple(op for op in bm.ALL_OPS if bm.OPERATIONS[op].cases)
ONE_CALL = bm.Timing(repeat=1, warmup=0)
#: one tiny named shape per kind of norm
TINY = [bm.NAMED_CASES[name].tiny() for name in ("ln-16x512x768", "gn-resnet", "in-128")]
CATALOG = bm.implementation_catalog()
FAST = ["--repeat", "1", "--warmup", "0", "--min-time", "0", "--ceiling-mib", "4", "--dtype", "float32"]
#: one shape the layer and RMS norm ops take (channels last), one group and instance norm take (axis 1)
MIXED_SHAPES = "4x3x64@-1,2x64x3x3"


def _implementations():
    """numpy (also with out=), numba when it has the norm kernels, the
    textbook code and torch when they are usable here."""
    impls = [bm.bnkernels_implementation("numpy"), bm.bnkernels_implementation("numpy", preallocated=True),
             bm.TEXTBOOK_NUMPY]
    if CATALOG["numba"].problem is None and hasattr(resolve("numba"), "norm_forward"):
        impls.append(bm.bnkernels_implementation("numba"))
    if CATALOG["torch"].problem is None:
        impls.append(bm.torch_implementation())
    return impls


def test_the_norm_ops_and_their_shapes():
    assert NORM_OPS == ("layer-norm", "layer-norm-backward", "rms-norm", "rms-norm-backward", "group-norm",
                        "group-norm-backward", "instance-norm", "instance-norm-backward")
    assert not set(NORM_OPS) & set(bm.OPS)  # run only when named
    assert [bm.min_bytes(op, 100) for op in NORM_OPS] == [200, 300] * 4
    named = {name: (c.shape, c.axis % len(c.shape)) for name, c in bm.NAMED_CASES.items() if c in bm.NORM_CASES}
    assert named == {
        "ln-8192x1024": ((8192, 1024), 1), "ln-4096x4096": ((4096, 4096), 1), "ln-16x512x768": ((16, 512, 768), 2),
        "gn-resnet": ((32, 256, 28, 28), 1), "in-128": ((8, 64, 128, 128), 1)}
    assert bm.GROUPS == 32


def test_each_op_runs_by_default_on_its_own_shapes():
    assert bm.default_cases(bm.OPS) == bm.DEFAULT_CASES
    assert bm.default_cases(bm.OPS, quick=True) == bm.QUICK_CASES
    assert [c.name for c in bm.default_cases(("layer-norm", "rms-norm-backward"))] == [
        "ln-8192x1024", "ln-4096x4096", "ln-16x512x768"]
    assert bm.default_cases(("group-norm-backward", "train")) == (*bm.DEFAULT_CASES, bm.NAMED_CASES["gn-resnet"])
    (quick,) = bm.default_cases(("instance-norm",), quick=True)
    assert quick.name == "in-128/4" and quick.shape == (2, 64, 128, 128)
    ops = ("train", "layer-norm", "group-norm")
    assert bm.ops_for(bm.NAMED_CASES["gn-resnet"].tiny(), ops) == ("group-norm",)
    assert bm.ops_for(bm.NAMED_CASES["resnet-56"].scaled(4), ops) == ("train",)
    assert bm.ops_for(bm.NAMED_CASES["ln-4096x4096"].scaled(4), ops) == ("layer-norm",)
    assert bm.ops_for(bm.NAMED_CASES["ln-8192x1024"], ("train",)) == ("train",)  # asked for by name
    assert bm.ops_for(bm.Case((4, 8)), ops) == ops  # any other shape: every op


def test_every_norm_op_is_checked_then_timed():
    results = bm.run_benchmarks(_implementations(), TINY, NORM_OPS, timing=ONE_CALL, same_size_copy=False)
    assert {(r.op, r.shape_name) for r in results} == {
        (op, c.name) for c in TINY for op in NORM_OPS if c.name in bm.own_cases(op)}
    names = {r.implementation for r in results}
    assert {"numpy", "numpy+out", "textbook-numpy"} <= names
    for r in results:
        if r.implementation == "numpy+out" and r.op.endswith("-backward"):
            assert r.status == "unsupported" and "takes no out=" in r.message, r
            continue
        assert r.status == "ok" and r.max_err <= r.tolerance and len(r.times_s) == 1, r
        assert r.bytes == (3 if r.op.endswith("-backward") else 2) * 4 * int(np.prod(r.shape))


def _off_by_one_percent(impl):
    """``impl`` with its first output (y, or dx) scaled by 1.01."""
    def prepare(op, inp):
        run = impl.prepare(op, inp)

        def wrong():
            first, *rest = run()
            return (first * 1.01, *rest)
        return wrong

    return bm.Implementation("wrong", prepare)


def test_a_wrong_norm_result_is_reported_wrong_and_fails_the_command(capsys, tmp_path):
    wrong = _off_by_one_percent(bm.bnkernels_implementation("numpy"))
    results = bm.run_benchmarks([wrong], TINY, NORM_OPS, timing=ONE_CALL, same_size_copy=False)
    assert len(results) == len(NORM_OPS)
    assert all(r.status == "wrong" and r.max_err > r.tolerance and r.times_s == [] for r in results)

    out = tmp_path / "out.json"
    argv = ["bench", "--ops", ",".join(NORM_OPS), "--shapes", MIXED_SHAPES, *FAST, "--json", str(out)]
    assert main(argv, implementations=[bm.TEXTBOOK_NUMPY, wrong]) == 1
    text = capsys.readouterr().out
    assert text.count("WRONG (max err") == len(NORM_OPS)  # each op on the one shape it takes
    assert f"\n{len(NORM_OPS)} result(s) failed: wrong layer-norm 4x3x64 float32 WRONG" in text
    statuses = {(r["op"], r["shape_name"], r["implementation"]): r["status"]
                for r in json.loads(out.read_text())["results"] if r["op"] != "copy"}
    for op in NORM_OPS:
        takes = "4x3x64" if op.startswith(("layer", "rms")) else "2x64x3x3"
        for shape in ("4x3x64", "2x64x3x3"):
            expect = ("ok", "wrong") if shape == takes else ("unsupported", "unsupported")
            assert (statuses[(op, shape, "textbook-numpy")], statuses[(op, shape, "wrong")]) == expect


def test_cases_an_op_does_not_take_are_unsupported():
    cases = [bm.Case((4, 8, 5, 5), 1), bm.Case((2, 5, 64), -1)]
    results = bm.run_benchmarks(_implementations(), cases, NORM_OPS, timing=ONE_CALL, same_size_copy=False)
    status = {(r.op, r.shape_name, r.implementation): (r.status, r.message) for r in results}
    for (op, shape, name), (st, message) in status.items():
        if name == "numpy+out" and op.endswith("-backward"):
            assert st == "unsupported"
        elif op.startswith(("layer", "rms")):
            assert (st == "ok") == (shape == "2x5x64")
            assert shape == "2x5x64" or "normalizes the last axis" in message
        elif op.startswith("group"):  # C = 8 is not a multiple of 32, and C last is not (N, C, *spatial)
            assert st == "unsupported"
            assert ("C divisible by G = 32" if shape == "4x8x5x5" else "channels at axis 1") in message
        else:  # instance norm takes the first
            assert (st == "ok") == (shape == "4x8x5x5"), (op, shape, name, st, message)


def test_a_backend_without_norm_kernels_is_unsupported(monkeypatch, capsys):
    """As the GPU backends (no norm-family kernels yet): their rows say so,
    the others run, and the command does not fail."""
    stub = types.SimpleNamespace(name="stub")
    monkeypatch.setattr(bnkernels.norm_family, "resolve", lambda backend, x=None: stub)
    candidate = bm.bnkernels_implementation("numpy")
    results = bm.run_benchmarks([candidate, bm.TEXTBOOK_NUMPY], TINY[1:2], ("group-norm", "group-norm-backward"),
                                timing=ONE_CALL, same_size_copy=False)
    assert [(r.implementation, r.status) for r in results] == [
        ("numpy", "unsupported"), ("textbook-numpy", "ok")] * 2
    assert all("the stub backend has no kernels for" in r.message for r in results if r.status != "ok")

    assert main(["bench", "--ops", "layer-norm", "--shapes", MIXED_SHAPES, *FAST],
                implementations=[candidate, bm.TEXTBOOK_NUMPY]) == 0
    assert "n/a (the stub backend has no kernels for" in capsys.readouterr().out


def test_the_command_runs_a_norm_op_on_its_own_shapes(monkeypatch, tmp_path, capsys):
    """Without --shapes: only the named shapes of the op (here made tiny)."""
    monkeypatch.setitem(bm.NAMED_CASES, "gn-resnet", bm.Case((2, 64, 3, 3), 1, "gn-resnet"))
    out = tmp_path / "out.json"
    assert main(["bench", "--ops", "group-norm", "--backends", "numpy,textbook-numpy", *FAST,
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["op"], r["shape_name"], tuple(r["shape"])) for r in results} == {
        ("copy", "gn-resnet", (2, 64, 3, 3)), ("group-norm", "gn-resnet", (2, 64, 3, 3))}
    assert all(r["status"] == "ok" for r in results)
    capsys.readouterr()
    assert main(["bench", "--list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "layer-norm, layer-norm-backward, rms-norm, rms-norm-backward" in rows["ln-8192x1024"]
    assert "instance-norm" in rows["in-128"] and "train" not in rows["in-128"]
