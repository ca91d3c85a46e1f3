"""``ci/gpu-check.sh`` is valid bash, and on a machine without an NVIDIA GPU
(CI, this one) it says so and exits 2 without running anything."""
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "ci" / "gpu-check.sh"


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_it_exits_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "no usable NVIDIA GPU" in proc.stderr
    assert not (tmp_path / "out" / "bench-gpu.json").exists()
