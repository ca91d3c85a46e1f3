"""Start a multi-process job from a test, with a deadline: a hang fails the
test (the whole process group is killed) instead of blocking CI."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def mpiexec() -> str | None:
    """The ``mpiexec`` beside this Python (PyPI's ``mpich`` wheel), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def run(argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own process group; on timeout kill the group and
    raise AssertionError with what it printed so far."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(argv)} did not finish in {timeout} s (a hang?); it printed:\n{out}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, None)
