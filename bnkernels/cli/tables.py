"""Plain-text tables of the ``bnkernels`` command (the bench results, the backends)."""
from __future__ import annotations

from typing import Sequence

from .. import bench as bm


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool],
                  free_last: bool = False) -> str:
    """Fixed-width text table. A row shorter than ``headers`` ends in a free
    text cell that spans the remaining columns and does not widen them; with
    ``free_last`` the last column is always such free text."""
    n = len(headers)
    fixed = n - 1 if free_last else n
    widths = [len(h) for h in headers]
    for r in rows:
        k = min(fixed, len(r) if len(r) == n else len(r) - 1)
        for i in range(k):
            widths[i] = max(widths[i], len(r[i]))

    def line(cells):
        k = min(fixed, len(cells) if len(cells) == n else len(cells) - 1)
        out = [c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(cells[:k], widths, right)]
        out += cells[k:]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt_ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _fmt_x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _fmt_pct(v: float | None) -> str:
    return f"{v:.0f}%" if v is not None else "-"


def _result_row(r: bm.Result) -> list[str]:
    base = [r.op, r.shape_name, "x".join(map(str, r.shape)), r.layout, r.dtype, r.implementation]
    if r.status == "ok":
        return base + [
            _fmt_ms(r.median_s),
            f"{_fmt_ms(r.min_s)}-{_fmt_ms(r.max_s)}",
            f"{r.gbps:.2f}",
            _fmt_pct(r.pct_of_ceiling),
            _fmt_pct(r.pct_of_copy),
            _fmt_x(r.copy_time_ratio),
            _fmt_x(r.speedup_vs_textbook),
            _fmt_x(r.speedup_vs_torch),
        ]
    if r.status == "wrong":
        text = f"WRONG (max err {r.max_err:.2e} > tolerance {r.tolerance:.0e}; not timed)"
    elif r.status == "unsupported":
        text = f"n/a ({r.message})"
    else:
        text = f"ERROR ({r.message})"
    return base + [text]


TABLE_HEADERS = ["op", "shape", "dims", "layout", "dtype", "implementation", "median ms", "min-max ms",
                 "GB/s", "% ceil", "% copy", "x copy", "vs textbook", "vs torch"]


def format_results_table(results: Sequence[bm.Result]) -> str:
    """The bench table; a blank line between (dtype, shape) groups, each
    led by its same-size copy rows (op ``copy``)."""
    right = [False] * 6 + [True] * 8
    return _grouped(format_table(TABLE_HEADERS, [_result_row(r) for r in results], right), results,
                    lambda r: (r.dtype, r.shape_name, r.shape, r.device))


def _grouped(table: str, results: Sequence, group) -> str:
    """``table`` (headers, rule, one line per result) with a blank line
    wherever ``group(result)`` changes from the row before."""
    text = table.split("\n")
    lines, prev = text[:2], None
    for r, line in zip(results, text[2:]):
        if prev is not None and group(r) != prev:
            lines.append("")
        lines.append(line)
        prev = group(r)
    return "\n".join(lines)


SYNC_HEADERS = ["shape", "whole", "per rank", "layout", "dtype", "backend", "sync ms", "local ms", "sync/local",
                "in colls", "coll ms", "colls", "payload", "fwd B", "bwd B", "sync GB/s", "local GB/s"]


def _dims(shape: Sequence[int]) -> str:
    """``(8, 64, 56, 56)`` as ``"8x64x56x56"``."""
    return "x".join(map(str, shape))


def _sync_row(r) -> list[str]:
    """One row of :func:`format_sync_table` (``r``: ``bm.sync.SyncResult``)."""
    base = [r.shape_name, _dims(r.shape), _dims(r.part_shape), r.layout, r.dtype, r.backend]
    if r.status == "ok":
        payloads = sorted({r.forward_payload_values, r.backward_payload_values}, key=str)
        return base + [
            _fmt_ms(r.sync_s), _fmt_ms(r.local_s), _fmt_x(r.ratio), _fmt_pct(100 * r.collective_share),
            _fmt_ms(r.collective_s), f"{r.collectives_per_step:g}", "/".join(map(str, payloads)),
            str(r.forward_frame_bytes), str(r.backward_frame_bytes), f"{r.sync_gbps:.2f}", f"{r.local_gbps:.2f}",
        ] + ([f"({r.message})"] if r.message else [])
    if r.status == "wrong":
        return base + [f"WRONG (max err synchronized {r.max_err:.2e}, local {r.local_max_err:.2e}; tolerance "
                       f"{r.tolerance:.0e}; not timed)"]
    return base + [f"ERROR ({r.message})"]


def format_sync_table(results: Sequence) -> str:
    """The ``bnkernels bench --sync`` table (``results``:
    ``bm.sync.SyncResult`` rows); a blank line between (dtype, shape)
    groups. Returns the text."""
    right = [False] * 6 + [True] * 11
    return _grouped(format_table(SYNC_HEADERS, [_sync_row(r) for r in results], right), results,
                    lambda r: (r.dtype, r.shape))
