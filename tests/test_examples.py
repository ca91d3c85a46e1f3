"""The examples of ``examples/`` run for real, at their ``--quick`` settings,
in a subprocess: exit code 0, the PNG written, and what they print holds
what they claim."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(name, tmp_path, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "BNKERNELS_BACKEND"}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-3000:]}"
    png = tmp_path / name.replace(".py", ".png")
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, f"{png} is not a PNG"
    assert png.stat().st_size > 10_000
    return proc.stdout


def _cell(text):
    """A table cell of scales_mlp: None for a diverged run, else (final loss, test MSE)."""
    if text.split()[0] == "diverged":
        return None
    final, test = map(float, text.split())
    return final, test


def test_scales_mlp(tmp_path):
    pytest.importorskip("matplotlib")
    out = _run("scales_mlp.py", tmp_path)
    baseline = float(re.search(r"predicting its mean\): (\S+)", out).group(1))
    rows = re.findall(r"^\s*(\d\S*) \| (.+?) \| (.+?)$", out, flags=re.M)
    assert len(rows) == 8, out
    runs = {False: {}, True: {}}
    for lr, without, with_bn in rows:
        for bn, cell in ((False, without), (True, with_bn)):
            got = _cell(cell)
            if got is not None:
                assert all(math.isfinite(v) and v >= 0 for v in got), (lr, bn, cell)
                runs[bn][float(lr)] = got[0]
    assert runs[False] and runs[True], out  # each trains at some learning rate
    best = {bn: min(r.values()) for bn, r in runs.items()}
    # batch norm buys a lower loss (it learns the target: well below predicting
    # the mean, which the raw-feature network never reaches) ...
    assert best[True] < 0.5 * baseline, out
    assert best[True] < 0.1 * best[False], out
    # ... and usable learning rates a billion times higher
    assert max(runs[True]) >= 1e8 * max(runs[False]), out
    assert f"wrote {tmp_path / 'scales_mlp.png'}" in out


def test_digits_cnn(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    bnk_torch = pytest.importorskip("bnkernels.torch")
    if not hasattr(bnk_torch, "convert"):
        pytest.skip("bnkernels.torch has no convert")
    out = _run("digits_cnn.py", tmp_path, "--channels-last")
    rows = {m.group(1): [float(v) for v in m.group(2, 3, 4, 5, 6)] for m in re.finditer(
        r"^((?:torch|bnkernels) \S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)%\s+(\S+)$", out, flags=re.M)}
    assert set(rows) == {"torch NCHW", "bnkernels NCHW", "torch channels_last", "bnkernels channels_last"}, out
    for name, (first, final, test_loss, accuracy, ms) in rows.items():
        assert all(math.isfinite(v) for v in (first, final, test_loss, accuracy, ms)), (name, out)
        assert final < first and ms > 0, (name, out)
        assert accuracy > 50.0, (name, out)  # chance: 10%
    assert "bnkernels.torch" in re.search(r"^BN layers after convert: (.*)$", out, flags=re.M).group(1), out
    diffs = re.findall(r"^loss curves (\S+): max abs diff (\S+), max rel diff (\S+)", out, flags=re.M)
    assert {fmt for fmt, _, _ in diffs} == {"NCHW", "channels_last"}, out
    # float32 noise: each curve against torch's float64 one. bnkernels' stays
    # within 1e-4 relative; torch's own float32 one may drift further (to
    # ~4e-3 over the 42 steps with --seed 1 or 2: its float32 CPU batch norm
    # rounds more), so bnkernels against torch in float32 is held to 1e-4 or,
    # where torch drifts, to twice torch's own drift.
    noise = dict(re.findall(r"(\w+ \w+) (\S+)(?:,|$)", re.search(
        r"^float32 noise.*max rel diff (.*)$", out, flags=re.M).group(1)))
    assert set(noise) == set(rows), out
    for fmt, _, rel in diffs:
        assert float(noise[f"bnkernels {fmt}"]) < 1e-4, (fmt, out)
        assert float(rel) < max(1e-4, 2 * float(noise[f"torch {fmt}"])), (fmt, out)
    for fmt, _, _ in diffs:  # the same model: the same test accuracy (to a test image or two of 450)
        assert abs(rows[f"bnkernels {fmt}"][3] - rows[f"torch {fmt}"][3]) < 0.5, out
