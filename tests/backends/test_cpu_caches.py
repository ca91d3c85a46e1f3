"""The CPU caches as sysfs reports them (``bnkernels/backends/cpu_caches.py``),
on made-up sysfs trees and on this machine."""
import pytest

from bnkernels.backends import cpu_caches as cc


def _index(root, n, level, kind, size, cpus):
    d = root / f"index{n}"
    d.mkdir()
    for name, text in (("level", f"{level}\n"), ("type", f"{kind}\n"), ("size", f"{size}\n"),
                       ("shared_cpu_list", f"{cpus}\n")):
        (d / name).write_text(text)


def test_levels_of_a_zen_like_tree(tmp_path):
    _index(tmp_path, 0, 1, "Data", "48K", "0")
    _index(tmp_path, 1, 1, "Instruction", "32K", "0")
    _index(tmp_path, 2, 2, "Unified", "1024K", "0")
    _index(tmp_path, 3, 3, "Unified", "32768K", "0-1")
    levels = cc.read_levels(str(tmp_path))
    assert levels == {1: cc.Level(1, 48 << 10, 1), 2: cc.Level(2, 1 << 20, 1), 3: cc.Level(3, 32 << 20, 2)}
    assert levels[3].per_cpu == 16 << 20


def test_shared_lists_sizes_and_unreadable_entries(tmp_path):
    _index(tmp_path, 0, 2, "Unified", "2M", "0-1,8-9")  # SMT siblings on two ranges: 4 CPUs
    _index(tmp_path, 1, 3, "Unified", "1G", "0-63")
    bad = tmp_path / "index2"
    bad.mkdir()
    (bad / "type").write_text("Unified\n")  # no level, no size: skipped, not fatal
    levels = cc.read_levels(str(tmp_path))
    assert levels == {2: cc.Level(2, 2 << 20, 4), 3: cc.Level(3, 1 << 30, 64)}
    assert cc.read_levels(str(tmp_path / "missing")) == {}


def test_this_machines_levels_or_the_defaults():
    levels = cc.caches()
    assert sorted(levels) == [1, 2, 3]
    assert all(lv.size > 0 and lv.cpus >= 1 for lv in levels.values())
    assert levels[1].size <= levels[2].size <= levels[3].size
    text = cc.describe()
    assert text.startswith("L1d ") and ", L2 " in text and ", L3 " in text
    for lv in levels.values():
        assert lv.reported or "(not reported: assumed)" in text


def test_the_numba_blocks_follow_the_last_level_cache():
    nb = pytest.importorskip("bnkernels.backends.numba_backend")
    assert nb.BLOCK_BYTES == min(4 << 20, cc.last_level().per_cpu // 2)
