"""The PNG: outcomes per second stacked by layer, and one user's tightest remaining over time."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from loadtest.classify import ADMITTED, kind
from loadtest.driver import LoadPlan, Recorder
from loadtest.report import ordered_labels, sent_total

# Fixed colours for the usual layers, so that two runs' plots read the same.
_COLOURS = {ADMITTED: "#2ca02c", "edge": "#9467bd", "user": "#d62728", "quota-minute": "#ff7f0e",
            "quota-hour": "#e6a000", "quota-day": "#8c564b", "tokens-minute": "#1f77b4",
            "limiter_unavailable": "#17becf", "upstream_saturated": "#e377c2",
            "skipped": "#c7c7c7"}
_SPARE = ["#bcbd22", "#393b79", "#637939", "#843c39", "#7b4173", "#5254a3", "#8ca252"]


def colours(labels: list[str]) -> dict[str, str]:
    """A colour per label: fixed ones first, errors grey, others from a spare palette."""
    spare = iter(_SPARE * 4)
    return {label: _COLOURS.get(label) or ("#7f7f7f" if label.startswith("error:")
                                           else next(spare, "#000000")) for label in labels}


def legend_name(recorder: Recorder, label: str) -> str:
    group = kind(recorder.statuses.get(label, 0), label)
    total = recorder.totals[label]
    name = {"refused": f"refused: {label}", "unavailable": f"503: {label}",
            "skipped": "skipped (client busy)"}.get(group, label)
    return f"{name} ({total})"


def title(plan: LoadPlan, url: str, recorder: Recorder, elapsed: float) -> str:
    """The command's parameters, then what came of them."""
    burst = f" --burst {plan.burst}" if plan.burst else ""
    command = (f"python -m loadtest --url {url} --seconds {plan.seconds:g} --rate {plan.rate:g} "
               f"--users {plan.users}{burst} --concurrency {plan.concurrency} "
               f"--model {plan.model}")
    sent = sent_total(recorder)
    rate = sent / elapsed if elapsed > 0 else 0.0
    admitted = recorder.totals[ADMITTED]
    outcome = (f"sent {sent} in {elapsed:.1f}s ({rate:.1f}/s): admitted {admitted}, "
               f"refused or failed {sent - admitted}")
    return f"{command}\n{outcome}"


def write_png(path: Path, plan: LoadPlan, url: str, recorder: Recorder, elapsed: float) -> None:
    """Two panels sharing the time axis; written with the Agg canvas, no display needed."""
    labels = ordered_labels(recorder)
    palette = colours(labels)
    last = max(max(recorder.per_second, default=0), math.ceil(elapsed) - 1)
    seconds = list(range(last + 1))
    fig = Figure(figsize=(12, 8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, never pyplot: no display, no global state
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    base = [0] * len(seconds)
    for label in labels:
        heights = [(recorder.per_second.get(s) or Counter())[label] for s in seconds]
        top.bar([s + 0.5 for s in seconds], heights, width=0.9, bottom=base,
                color=palette[label], label=legend_name(recorder, label),
                hatch="//" if label == "skipped" else None)
        base = [b + h for b, h in zip(base, heights, strict=True)]
    top.axhline(plan.rate, color="black", linestyle="--", linewidth=1,
                label=f"target {plan.rate:g}/s")
    top.set_ylim(0, max([*base, plan.rate, 1]) * 1.3)   # headroom for the legend
    top.set_ylabel("requests per second\n(by second sent)")
    top.set_title("Admitted and refused requests per second, by layer", loc="left", fontsize=11)
    top.legend(loc="upper right", fontsize=9, framealpha=0.9, ncols=min(4, len(labels) + 1))
    top.grid(axis="y", alpha=0.3)
    _remaining_panel(bottom, plan, recorder, palette)
    bottom.set_xlim(0, last + 1)
    bottom.set_xlabel("seconds since start")
    fig.suptitle(title(plan, url, recorder, elapsed), fontsize=10, family="monospace")
    fig.savefig(path, format="png")


def _remaining_panel(ax: Axes, plan: LoadPlan, recorder: Recorder,
                     palette: dict[str, str]) -> None:
    """A step line of X-RateLimit-Remaining; each point coloured by the layer it describes."""
    samples = sorted(recorder.remaining)
    ax.set_ylabel("X-RateLimit-Remaining")
    ax.set_title(f"{plan.watched}: remaining in its tightest layer (x = refused)", loc="left",
                 fontsize=11)
    ax.grid(alpha=0.3)
    if not samples:
        ax.text(0.5, 0.5, "no X-RateLimit headers seen for this user",
                ha="center", va="center", transform=ax.transAxes)
        return
    times = [s[0] for s in samples]
    values = [s[1] for s in samples]
    ax.step(times, values, where="post", color="#555555", linewidth=1)
    layers = sorted({s[2] for s in samples})
    extra = colours([layer for layer in layers if layer not in palette])
    handles = []
    for layer in layers:
        colour = palette.get(layer) or extra[layer]
        for refused, marker in ((False, "o"), (True, "x")):
            pts = [(t, v) for t, v, name, r in samples if name == layer and r == refused]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22,
                           color=colour, marker=marker, zorder=3)
        handles.append(Line2D([], [], color=colour, marker="o", linestyle="", label=layer))
    ax.set_ylim(bottom=-0.5)
    ax.legend(handles=handles, title="tightest layer", loc="upper right",
              fontsize=9, title_fontsize=9)
