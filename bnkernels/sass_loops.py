"""The hot loops of a kernel's SASS (``cuobjdump -sass`` text): for each
innermost loop that loads global memory, its instructions per iteration,
the bytes its global loads read per iteration and their ratio, the
thread-instructions spent per byte loaded. Development-only, like
``kernel_report`` (``bnkernels kernels``); plain text processing.

Why it matters: an H100 issues about 1.05e12 warp-instructions/s against
3.35e12 B/s of HBM3, about 10 thread-instructions per byte; an H200 at
4.8 TB/s about 7. A loop above that budget is issue-bound, not
memory-bound. The counts are static: each instruction of the loop body once
per iteration (predicated-off and forward-branched-over instructions
included), which is what the warp issues when no lane skips them.

A loop is a backward branch (``BRA`` to an address at or before it); an
innermost loop contains no other loop.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSN = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*)$")
_TARGET = re.compile(r"0x([0-9a-fA-F]+)\s*;")
_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


@dataclass(frozen=True)
class Instruction:
    address: int
    op: str  # the opcode without modifiers, e.g. LDG
    modifiers: tuple[str, ...]
    target: int | None  # a branch's target address


@dataclass(frozen=True)
class HotLoop:
    """An innermost loop with global loads: addresses ``start`` to ``end``
    (the backward branch), its ``instructions`` and the global loads by
    width in bits."""

    start: int
    end: int
    instructions: int
    loads: Counter = field(hash=False)

    @property
    def load_bytes(self) -> int:
        return sum(bits // 8 * n for bits, n in self.loads.items())

    @property
    def per_byte(self) -> float:
        """Thread-instructions per byte loaded, per iteration."""
        return self.instructions / self.load_bytes

    def to_dict(self) -> dict:
        return {"start": hex(self.start), "end": hex(self.end), "instructions": self.instructions,
                "load_bytes": self.load_bytes, "loads_by_bits": {str(k): v for k, v in sorted(self.loads.items())},
                "instructions_per_byte": round(self.per_byte, 2)}


def functions(sass: str) -> dict[str, list[Instruction]]:
    """Each function's instructions, by (mangled) symbol name."""
    out: dict[str, list[Instruction]] = {}
    current = None
    for line in sass.splitlines():
        if m := _FUNC.match(line):
            current = out.setdefault(m.group(1), [])
            continue
        if current is None or not (m := _INSN.match(line)):
            continue
        op, *mods = m.group(2).split(".")
        target = None
        if op in ("BRA", "JMP") and (t := _TARGET.search(m.group(3))):
            target = int(t.group(1), 16)
        current.append(Instruction(int(m.group(1), 16), op, tuple(mods), target))
    return out


def function_texts(sass: str) -> dict[str, str]:
    """Each function's part of the SASS text, by symbol name."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        if m := _FUNC.match(line):
            current = out.setdefault(m.group(1), [])
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines) + "\n" for name, lines in out.items()}


def _bits(modifiers) -> int:
    for m in modifiers:
        if m in _BITS:
            return _BITS[m]
    return 32


def hot_loops(instructions: list[Instruction]) -> list[HotLoop]:
    """The innermost loops of one function that load global memory, in
    address order."""
    loops = sorted({(i.target, i.address) for i in instructions if i.target is not None and i.target <= i.address})
    innermost = [(s, e) for s, e in loops
                 if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    out = []
    for start, end in innermost:
        body = [i for i in instructions if start <= i.address <= end]
        loads = Counter(_bits(i.modifiers) for i in body if i.op == "LDG")
        if loads:
            out.append(HotLoop(start, end, len(body), loads))
    return out


def worst(loops: list[HotLoop]) -> HotLoop | None:
    """The loop with the most instructions per byte loaded, or None."""
    return max(loops, key=lambda loop: loop.per_byte, default=None)
