"""The CPU's data caches as this machine reports them (Linux sysfs), for
the numba backend's block sizes and the bench's report.

Sizes come from ``/sys/devices/system/cpu/cpu0/cache/index*`` (``level``,
``type``, ``size``, ``shared_cpu_list``), read once. Where a level is not
reported (another OS, a container that hides sysfs), :data:`DEFAULTS`
stand in: modest sizes, so that blocks stay cache-sized on small machines
rather than relying on a cache that may not be there.
"""
from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass

SYSFS = "/sys/devices/system/cpu/cpu0/cache"
KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Level:
    """One data (or unified) cache level: ``size`` bytes shared by ``cpus``
    logical CPUs; ``reported``: read from the machine (else a default)."""

    level: int
    size: int
    cpus: int
    reported: bool = True

    @property
    def per_cpu(self) -> int:
        """This level's bytes per logical CPU that shares it."""
        return self.size // max(self.cpus, 1)


#: Used for a level the machine does not report.
DEFAULTS = {1: Level(1, 32 * KiB, 1, False), 2: Level(2, 512 * KiB, 1, False), 3: Level(3, 8 * MiB, 8, False)}


def _size(text: str) -> int:
    """A sysfs cache size (``"48K"``, ``"32768K"``, ``"1M"``) in bytes."""
    text = text.strip().upper()
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def _cpu_count(cpu_list: str) -> int:
    """How many CPUs a sysfs list such as ``"0-3,8-11"`` names."""
    n = 0
    for part in cpu_list.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
    return n


def read_levels(root: str = SYSFS) -> dict[int, Level]:
    """The data/unified cache levels ``root`` reports: ``{level: Level}``
    (the largest entry of a level where it lists several)."""
    levels: dict[int, Level] = {}
    for d in glob.glob(os.path.join(root, "index*")):
        try:
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                size = _size(f.read())
            try:
                with open(os.path.join(d, "shared_cpu_list")) as f:
                    cpus = _cpu_count(f.read())
            except OSError:
                cpus = 1
        except (OSError, ValueError):
            continue
        if level not in levels or size > levels[level].size:
            levels[level] = Level(level, size, max(cpus, 1))
    return levels


@functools.cache
def caches() -> dict[int, Level]:
    """Levels 1-3 of this machine (read once), each a reported
    :class:`Level` or its default."""
    found = read_levels()
    return {n: found.get(n, DEFAULTS[n]) for n in (1, 2, 3)}


def last_level() -> Level:
    """The largest level this machine reports (its default level 3 when none is)."""
    found = read_levels()
    return found[max(found)] if found else DEFAULTS[3]


def describe() -> str:
    """``"L1d 48 KiB, L2 1 MiB per CPU, L3 32 MiB shared by 2 CPUs"`` (a
    default marked as such)."""
    def size(b: int) -> str:
        return f"{b // MiB} MiB" if b % MiB == 0 else f"{b // KiB} KiB"

    parts = []
    for n, lv in caches().items():
        name = "L1d" if n == 1 else f"L{n}"
        share = "per CPU" if lv.cpus == 1 else f"shared by {lv.cpus} CPUs"
        parts.append(f"{name} {size(lv.size)} {share}" + ("" if lv.reported else " (not reported: assumed)"))
    return ", ".join(parts)


__all__ = ["DEFAULTS", "Level", "caches", "describe", "last_level", "read_levels"]
