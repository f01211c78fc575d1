"""summary.csv: every metric of every task, and the summary means with their departures."""

from __future__ import annotations

import csv
import io

from thinksafe.report.collect import (
    MEANS,
    MeanDeparture,
    is_base,
    mean_departures,
    metric_value,
    order_runs,
    order_tasks,
    summary_values,
)


def csv_text(runs: dict) -> str:
    """Every metric (primary and secondary) of every task: value, ci_low, ci_high, n."""
    metric_names: list[tuple[str, str]] = []
    for task in order_tasks({t for tasks in runs.values() for t in tasks}):
        for tasks in runs.values():
            m = tasks.get(task)
            if not m:
                continue
            for name in [m["metric"], *m.get("secondary", {})]:
                if (task, name) not in metric_names:
                    metric_names.append((task, name))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["run", "is_base"]
    for task, name in metric_names:
        header += [f"{task}/{name}", f"{task}/{name}/ci_low", f"{task}/{name}/ci_high", f"{task}/{name}/n"]
    # /missing, /extra: the tasks that make a mean differ from the paper's; /not_comparable: why the
    # tasks it has do not compare (another set, a limit, another judge); each ";"-joined
    for name in MEANS:
        header += [name, f"{name}/ci_low", f"{name}/ci_high", f"{name}/missing", f"{name}/extra",
                   f"{name}/not_comparable"]
    writer.writerow(header)
    for run in order_runs(runs):
        row = [run, is_base(runs, run)]
        for task, name in metric_names:
            v = metric_value(runs, run, task, name)
            row += [v.value, v.low, v.high, v.n] if v else ["", "", "", ""]
        summaries, departures = summary_values(runs, run), mean_departures(runs, run)
        for name in MEANS:
            v = summaries[name]
            departure = departures.get(name, MeanDeparture([], [], []))
            row += [v.value, v.low, v.high] if v else ["", "", ""]
            row += [";".join(departure.missing), ";".join(departure.extra), ";".join(departure.not_comparable)]
        writer.writerow(row)
    return buffer.getvalue()
