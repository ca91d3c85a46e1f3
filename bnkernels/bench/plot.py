"""The chart of ``bnkernels bench --plot`` (matplotlib, optional)."""
from __future__ import annotations

import textwrap
from typing import Sequence

from .ops import BYTES_FACTOR, COPY, OPS, OP_TITLES
from .run import Result


def plot_results(results: Sequence[Result], path: str, title: str = ""):
    """Bar chart of % of the same-size copy (``pct_of_copy``: GB/s over the
    operation's minimum bytes against a copy of x timed in the same run and
    cache state, the achievable reference; a large-copy DRAM ceiling is
    exceeded several times by inputs that fit the cache): one panel per
    operation with a title saying what it shows, one group of bars per
    (shape, dtype), one bar per implementation; a dashed line at 100 %.
    Results that were not timed (wrong, error) are marked in place of their
    bar. The same-size copy rows (:data:`COPY`) are left out.
    Needs matplotlib (``pip install "bnkernels[plot]"``); uses the Agg
    canvas directly, so no GUI and no global pyplot state. Returns the
    matplotlib Figure (also saved to ``path``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [r for r in results if r.role != COPY]
    ops = [op for op in OPS if any(r.op == op for r in results)]
    groups = list(dict.fromkeys((r.shape_name, r.dtype) for r in results))
    impls = list(dict.fromkeys(r.implementation for r in results))
    by_key = {(r.op, r.shape_name, r.dtype, r.implementation): r for r in results}
    n_bars = max(len(impls), 1)
    width = 0.8 / n_bars
    fig = Figure(figsize=(max(8.0, 0.22 * len(groups) * n_bars + 2.0), 2.9 * len(ops) + 1.2),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ops), 1, squeeze=False)[:, 0]
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for ax, op in zip(axes, ops):
        top = 100.0
        for j, name in enumerate(impls):
            xs, hs = [], []
            for g, (shape_name, dtype) in enumerate(groups):
                r = by_key.get((op, shape_name, dtype, name))
                x = g - 0.4 + width * (j + 0.5)
                if r is None:
                    continue
                if r.pct_of_copy is not None:
                    xs.append(x)
                    hs.append(r.pct_of_copy)
                    top = max(top, r.pct_of_copy)
                elif r.status in ("wrong", "error"):
                    ax.text(x, 2, r.status, rotation=90, ha="center", va="bottom", fontsize=7,
                            color="#d62728")
            ax.bar(xs, hs, width, label=name, color=colors[j % len(colors)])
        ax.axhline(100, color="black", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel("% of same-size copy")
        panel = (f"{OP_TITLES[op]}: GB/s over the minimum bytes ({BYTES_FACTOR[op]} x nbytes of x) as % of "
                 "a copy of x timed in the same run (100 % = copy speed; higher is faster)")
        ax.set_title(textwrap.fill(panel, int(fig.get_figwidth() * 12)), fontsize=9, loc="left")
        ax.set_xticks(range(len(groups)), [f"{s}\n{d}" for s, d in groups], fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncols=min(n_bars, 6), fontsize=8, loc="upper right")
    if title:  # wrapped to the figure's width (about 11 characters per inch at 10 pt)
        width_chars = int(fig.get_figwidth() * 11)
        fig.suptitle("\n".join(textwrap.fill(line, width_chars) for line in title.split("\n")), fontsize=10)
    fig.savefig(path, dpi=110)
    return fig


__all__ = [
    'plot_results',
]
