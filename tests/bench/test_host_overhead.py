"""``bnkernels bench --host-overhead`` and its stand-in devices
(``bnkernels/bench/standin.py``, ``host_overhead.py``): the figures it
prints come from the real backends' host code, run against devices whose
kernels do nothing."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("ho") / "host.json"
    proc = subprocess.run([sys.executable, "-m", "bnkernels", "bench", "--host-overhead", "--json", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(path.read_text())


def test_every_gpu_backend_and_op_is_measured(report):
    out, doc = report
    rows = {(r["backend"], r["op"]): r for r in doc["rows"]}
    ops = ("train", "infer", "backward", "train (prepared)", "infer (prepared)", "backward (prepared)")
    assert set(rows) == {(b, op) for b in ("cupy", "numba-cuda") for op in ops}
    for r in rows.values():
        assert r["us_per_call"] > 0
        assert r["launches"] == 2  # two kernels per call, whatever the backend
    assert "µs/call" in out and "numba-cuda" in out


def test_a_call_allocates_only_what_it_returns(report):
    """Training forward: y, mean, invstd; backward: dx, dgamma, dbeta (the
    workspace and the counters are kept between calls; the saved statistics
    are read as they are, not cast)."""
    _, doc = report
    for r in doc["rows"]:
        if r["op"] != "infer":
            assert r["allocations"] == 3, r


def test_torch_is_measured_in_the_same_run(report):
    _, doc = report
    pytest.importorskip("torch")
    assert doc["torch_cpu_tiny_us"] > 0
