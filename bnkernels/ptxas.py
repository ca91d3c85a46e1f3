"""Assemble PTX with ptxas and read its resource report (no GPU needed).

Used by the compile checks of the GPU kernels and by tools that report
registers, shared memory and spills per kernel and architecture.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """What ``ptxas -v`` reports for one kernel on one architecture."""

    kernel: str
    arch: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


def _version(tool: str) -> tuple[int, int] | None:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_ptxas() -> str | None:
    """The newest ptxas available: the NVIDIA wheel's (``pip install
    "cuda-toolkit[nvcc]"``, found with cuda.pathfinder) or one on PATH.

    PTX from NVVM of CUDA 13.x needs a ptxas at least that new; choosing the
    newest avoids 'Unsupported .version' errors from an older system CUDA.
    """
    candidates = []
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_binary_utility("ptxas")
        if found:
            candidates.append(found)
    except Exception:  # cuda-pathfinder missing or cannot search
        pass
    on_path = shutil.which("ptxas")
    if on_path:
        candidates.append(on_path)
    versions = [(v, c) for c in candidates if (v := _version(c))]
    return max(versions)[1] if versions else None


_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_report(text: str) -> list[Resources]:
    """Parse ``ptxas -v`` output into one :class:`Resources` per entry."""
    out, current, stack = [], None, (0, 0, 0)
    for line in text.splitlines():
        if m := _FUNC.search(line):
            current, stack = (m.group(1), m.group(2)), (0, 0, 0)
        elif (m := _STACK.search(line)) and current:
            stack = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and current:
            out.append(Resources(current[0], current[1], int(m.group(1)), int(m.group(2) or 0), *stack))
            current = None
    return out


def assemble(ptx: str, arch: str, ptxas: str | None = None) -> list[Resources]:
    """Assemble ``ptx`` for ``arch`` (e.g. ``"sm_90"``) and return the
    resource report of every entry function. Raises ``RuntimeError`` with
    ptxas' message on failure."""
    tool = ptxas or find_ptxas()
    if tool is None:
        raise RuntimeError('ptxas not found: pip install "cuda-toolkit[nvcc]"')
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {proc.stderr.strip()}")
    return parse_report(proc.stderr)
