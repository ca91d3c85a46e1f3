"""Every ```python block of README.md runs as pasted, on its own, in a fresh
interpreter (so no block may lean on another's variables). The CuPy block
needs a GPU (marked ``gpu``); the Numba CUDA block runs on Numba's CUDA
simulator where there is no GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def _params():
    for i, code in enumerate(BLOCKS):
        first = code.strip().splitlines()[0]
        marks = [pytest.mark.gpu] if "import cupy" in code else []
        yield pytest.param(code, id=f"block{i + 1}-{first[:30]}", marks=marks)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5, f"found {len(BLOCKS)} python blocks"
    assert any("from numba import cuda" in b for b in BLOCKS) and any("import cupy" in b for b in BLOCKS)


@pytest.mark.parametrize("code", list(_params()))
def test_block_runs_on_its_own(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BNKERNELS_BACKEND"}
    prelude = ""
    if "from numba import cuda" in code and os.environ.get("BNKERNELS_GPU") != "1":
        pytest.importorskip("numba.cuda")
        # Numba's simulator, with the warp shuffles it lacks (tests/cudasim_shuffles.py)
        env["NUMBA_ENABLE_CUDASIM"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
        prelude = "import cudasim_shuffles; cudasim_shuffles.install()\n"
    proc = subprocess.run([sys.executable, "-W", "error", "-c", prelude + code], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{code}\n--- stderr:\n{proc.stderr[-3000:]}"
