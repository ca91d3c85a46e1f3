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
from typing import NamedTuple

#: pip requirement specifier of the ptxas wheel, as printed in error messages.
PTXAS_INSTALL = 'pip install "cuda-toolkit[nvcc]"'


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


def release(tool: str | None = None) -> tuple[int, int] | None:
    """(major, minor) CUDA release of ``tool`` (default: :func:`find_ptxas`'s)."""
    tool = tool or find_ptxas()
    return _version(tool) if tool else None


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


class Assembled(NamedTuple):
    """What :func:`assemble_cubin` returns: the cubin (an ELF image), ptxas'
    ``-v`` report as printed and as parsed (one entry per entry function)."""

    cubin: bytes
    log: str
    resources: list[Resources]


def assemble_cubin(ptx: str, arch: str, ptxas: str | None = None) -> Assembled:
    """Assemble ``ptx`` for the real architecture ``arch`` (e.g. ``"sm_90"``)
    with ``ptxas -v`` at its default optimization level (-O3; the driver,
    which JIT-compiles the PTX that Numba loads, also defaults to its
    highest level, but its ptxas may be of another CUDA release). Raises ``RuntimeError``
    with ptxas' message on failure, or when no ptxas is found."""
    tool = ptxas or find_ptxas()
    if tool is None:
        raise RuntimeError(f"ptxas not found: {PTXAS_INSTALL}")
    with tempfile.TemporaryDirectory(prefix="bnkernels-ptxas-") as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([tool, f"-arch={arch}", "-v", src, "-o", out], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed for {arch}: {proc.stderr.strip()}")
        with open(out, "rb") as f:
            cubin = f.read()
    return Assembled(cubin, proc.stderr, parse_report(proc.stderr))


def assemble(ptx: str, arch: str, ptxas: str | None = None) -> list[Resources]:
    """Assemble ``ptx`` for ``arch`` (e.g. ``"sm_90"``) and return the
    resource report of every entry function. Raises ``RuntimeError`` with
    ptxas' message on failure."""
    return assemble_cubin(ptx, arch, ptxas).resources
