"""``python -m bnkernels.bench.summary``: the one table of ci/gpu-check.sh,
from a real (tiny) bench run's JSON."""
import json
import subprocess
import sys

from bnkernels.bench import summary


def test_summary_of_a_real_bench_run(tmp_path):
    path = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bnkernels", "bench", "--device", "cpu", "--shapes", "4x3x5x5",
                           "--dtype", "float32", "--backends", "numpy,textbook-numpy", "--repeat", "1",
                           "--warmup", "0", "--min-time", "0", "--json", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(path.read_text())
    rows = summary.summary_rows(doc["results"])
    assert {r[0] for r in rows} == {"train", "infer", "backward", "train-add-relu"}
    assert all(r[4] == "numpy" for r in rows)  # candidates only, not the textbook baseline
    text = subprocess.run([sys.executable, "-m", "bnkernels.bench.summary", str(path)], capture_output=True,
                          text=True, timeout=60).stdout
    assert "vs textbook" in text and "numpy" in text and "measured on:" in text


def test_summary_usage(capsys):
    assert summary.main([]) == 2
    assert "usage" in capsys.readouterr().err
