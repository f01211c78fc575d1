"""`thinksafe report [results root]`: one table over every evaluated run, plus the trade-off plot.

Reads results/<run>/<task>/metrics.json (written by `thinksafe evaluate`), and writes
results/summary.md, summary.csv and summary.png. Run name, task and whether a run is a base model
come from each metrics.json, never from directory names. Rows are runs (base models first),
columns each task's metric (in the task files' order) as a percentage with its 95% Wilson interval
and sample count. Two summary columns follow the paper's headline: mean harmful rate over the
harmful-rate tasks (lower is better) and mean pass@1 over the reasoning tasks; a mean over other
tasks than the paper's (one missing, or one the paper did not have) is marked with the tasks
that differ, in the table, the CSV and the plot's legend, and so is a mean whose tasks ran on
other data or settings than the paper's (HarmBench's standard set instead of the paper's 602
prompts, --limit, another judge): the section "Against the paper's table" says why, run by run,
and HarmBench's cells name their set. A section compares refusal on the held-out prompts of the
demo's training source (AdvBench) with refusal on HarmBench's and StrongREJECT's prompts. The plot
shows safety against reasoning; for runs without reasoning tasks (the CPU demo) it shows refusal on
held-out harmful prompts against over-refusal on XSTest's safe prompts.

Modules: `collect` (metrics.json files, run and task order, values, the summary means and their
departures from the paper's), `markdown` (summary.md: the table, its notes and sections), `tables`
(summary.csv), `plot` (summary.png). This file writes the three and is the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thinksafe.io import atomic_write_text
from thinksafe.registry import results_root
from thinksafe.report.collect import (
    HARMFUL_METRIC,
    MEANS,
    METRICS_FILE,
    OVERREFUSAL_TASK,
    REASONING_MEAN,
    REASONING_METRIC,
    REFUSAL_TASK,
    SAFETY_MEAN,
    SUMMARY_NAME,
    MeanDeparture,
    ReportError,
    Value,
    collect_runs,
    comparability,
    data_set_of,
    is_base,
    mean_departures,
    mean_of,
    metric_value,
    order_runs,
    order_tasks,
    paper_tasks,
    primary,
    summary_values,
    task_specs,
)
from thinksafe.report.markdown import (
    IN_DISTRIBUTION,
    MARKED_MEANS_NOTE,
    OOD_MEAN,
    OUT_OF_DISTRIBUTION,
    PAPER_PAGE,
    PAPER_PAGE_PATH,
    PAPER_SET_MARK,
    PHRASE_REFUSAL,
    base_run_of,
    columns,
    markdown_table,
    refusal_by_source,
)
from thinksafe.report.plot import (
    _departure_label,  # noqa: F401  (the plot's label rule, tested on its own)
    plot_panels,
    write_plot,
)
from thinksafe.report.tables import csv_text

__all__ = [
    "HARMFUL_METRIC", "IN_DISTRIBUTION", "MARKED_MEANS_NOTE", "MEANS", "METRICS_FILE", "OOD_MEAN",
    "OUT_OF_DISTRIBUTION", "OVERREFUSAL_TASK", "PAPER_PAGE", "PAPER_PAGE_PATH", "PAPER_SET_MARK",
    "PHRASE_REFUSAL", "REASONING_MEAN", "REASONING_METRIC", "REFUSAL_TASK", "SAFETY_MEAN", "SUMMARY_NAME",
    "MeanDeparture", "ReportError", "Value", "base_run_of", "collect_runs", "columns", "comparability",
    "csv_text", "data_set_of", "is_base", "main", "markdown_table", "mean_departures", "mean_of",
    "metric_value", "order_runs", "order_tasks", "paper_tasks", "plot_panels", "primary",
    "refusal_by_source", "summary_values", "task_specs", "write_plot", "write_report",
]

def write_report(root: Path, out: Path | None = None) -> dict[str, Path]:
    runs = collect_runs(root)
    out = Path(out or root)
    files = {ext: out / f"{SUMMARY_NAME}.{ext}" for ext in ("md", "csv", "png")}
    atomic_write_text(files["md"], markdown_table(runs))
    atomic_write_text(files["csv"], csv_text(runs))
    write_plot(runs, files["png"])
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thinksafe report", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=None, help="results root (default: the registry's, outputs/results)")
    parser.add_argument("--out", default=None, help="where summary.{md,csv,png} go (default: the results root)")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else results_root()
    files = write_report(root, Path(args.out) if args.out else None)
    print(files["md"].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0
