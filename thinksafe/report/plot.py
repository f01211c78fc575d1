"""summary.png: safety against reasoning, and refusal against over-refusal (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from thinksafe.report.collect import (
    OVERREFUSAL_TASK,
    REASONING_MEAN,
    REFUSAL_TASK,
    SAFETY_MEAN,
    MeanDeparture,
    is_base,
    mean_departures,
    metric_value,
    order_runs,
    summary_values,
)


def plot_panels(runs: dict) -> list[dict]:
    """The panels that have data: safety vs reasoning, and refusal vs over-refusal. Each panel's
    `labels` name its points' runs, marking base models and means that are not the paper's."""
    names = order_runs(runs)
    base = {run: " (base)" if is_base(runs, run) else "" for run in names}
    tradeoff = [(run, summary_values(runs, run)[REASONING_MEAN], summary_values(runs, run)[SAFETY_MEAN])
                for run in names]
    refusal = [(run, metric_value(runs, run, *OVERREFUSAL_TASK), metric_value(runs, run, *REFUSAL_TASK))
               for run in names]
    panels = []
    points = [(r, x, y) for r, x, y in tradeoff if x and y]
    if points:
        partial = {r: _departure_label(mean_departures(runs, r)) for r, _, _ in points}
        panels.append({"points": points, "xlabel": "reasoning: mean pass@1 (%) →",
                       "ylabel": "safety: mean harmful-response rate (%) ↓", "title": "Safety vs reasoning",
                       "labels": {r: r + base[r] + partial[r] for r, _, _ in points}})
    points = [(r, x, y) for r, x, y in refusal if x and y]
    if points:
        panels.append({"points": points, "xlabel": "over-refusal on XSTest safe prompts (%) ↓",
                       "ylabel": "refusal on held-out harmful prompts (%) ↑",
                       "title": "Refusal vs over-refusal", "labels": {r: r + base[r] for r, _, _ in points}})
    return panels


def _departure_label(departures: dict[str, MeanDeparture]) -> str:
    labels = ["partial means"] if any(d.missing or d.extra for d in departures.values()) else []
    labels += ["not comparable"] if any(d.not_comparable for d in departures.values()) else []
    return f" ({', '.join(labels)})" if labels else ""


def _errors(values: list) -> list[list[float]]:
    low = [100 * (v.value - v.low) if v.low is not None else 0.0 for v in values]
    high = [100 * (v.high - v.value) if v.high is not None else 0.0 for v in values]
    return [low, high]


def write_plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    panels = plot_panels(runs)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 5), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no run has both metrics of a panel\n(see summary.md)", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, panel in zip(axes[0], panels):
        for run, x, y in panel["points"]:
            base = is_base(runs, run)
            ax.errorbar([100 * x.value], [100 * y.value], xerr=_errors([x]), yerr=_errors([y]),
                        fmt="*" if base else "o", markersize=14 if base else 8, capsize=4,
                        color="black" if base else None, label=panel["labels"][run])
        style_rate_axes(ax, panel["xlabel"], panel["ylabel"], panel["title"] + " (95% intervals)")
    save_figure(fig, path)


def style_rate_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Rates on the same 0-100 scale in every report's plot, labelled, gridded, with a legend."""
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def save_figure(fig, path: Path) -> None:
    """Write the PNG beside its final name and rename it into place (a reader never sees half a file)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
