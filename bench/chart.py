"""The ratios of a bench run as one PNG (matplotlib): one panel per section, a bar per
contender, the 1x line marked, so the headline numbers read at a glance in the docs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from bench.report import Row
from bench.streaming import StreamRow

# (section title, what its ratio is, [(bar label, ratio)])
Section = tuple[str, str, list[tuple[str, float]]]
PNG = Path(__file__).resolve().parent.parent / "docs" / "benchmark-ratios.png"   # docs show it


def sections_of(fast: Sequence[Row], slow: Sequence[Row], stream: Sequence[StreamRow],
                reference: str = "fastapi-article") -> list[Section]:
    """The ratios the results tables print, from the rows of a run (sections without rows
    left out)."""
    out: list[Section] = []
    none = next((r for r in fast if r.name == "none" and r.ok), None)
    if none is not None:
        bars = [(f"{r.name} ({r.worker_class})", statistics.median(v))
                for r in fast if r.ok and r is not none and (v := r.ratios_to(none))]
        out.append(("Echo /chat: throughput vs no limiter", "2xx/s / none's", bars))
    bars = []
    for conns in sorted({r.connections for r in slow}):
        ref = next((r for r in slow if r.connections == conns and r.name == reference
                    and r.ok), None)
        for r in slow:
            if ref is not None and r.connections == conns and r.ok and r is not ref \
                    and (v := r.ratios_to(ref)):
                bars.append((f"{r.name} ({r.worker_class}), {conns:,} conns",
                             statistics.median(v)))
    if bars:
        out.append(("Slow upstream: throughput vs the article's FastAPI", "2xx/s ratio", bars))
    mine = next((r for r in stream if r.name == "ours" and r.ok), None)
    base = next((r for r in stream if r.name == "none" and r.ok), None)
    if mine is not None and base is not None:
        bars = [(f"TTFB p{p}", statistics.median(v)) for p in (50, 99)
                if (v := mine.ratios_to(base, "ttfb_ms", p))]
        out.append(("Streaming: time to first byte, ours / none", "lower is better", bars))
    return out


def draw(sections: Sequence[Section], path: Path = PNG, subtitle: str = "") -> None:
    """One horizontal bar chart per section, stacked, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")   # no display: a file only
    import matplotlib.pyplot as plt

    heights = [1.0 + 0.42 * len(bars) for _, _, bars in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(9, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, unit, bars) in zip(axes[:, 0], sections, strict=True):
        labels = [label for label, _ in bars][::-1]
        values = [value for _, value in bars][::-1]
        colors = ["#2b6cb0" if label.startswith(("ours", "(a)", "(b)", "(c)", "TTFB"))
                  else "#a0aec0" for label in labels]
        ax.barh(labels, values, color=colors)
        ax.axvline(1.0, color="#c53030", linewidth=1, linestyle="--")
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.2f}x", va="center", fontsize=9)
        ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
        ax.set_xlabel(f"ratio ({unit}); dashed line: 1x", fontsize=9)
        ax.set_xlim(0, max([*values, 1.0]) * 1.18)
        ax.tick_params(axis="y", labelsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    if subtitle:
        fig.suptitle(subtitle, fontsize=9, x=0.01, ha="left", color="#4a5568")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
