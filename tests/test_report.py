"""thinksafe report: the table and the plot from run directories written by the real evaluate code."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from test_evaluate import evaluate_tiny, write_fixture_data, write_run_record

from thinksafe.errors import ThinksafeError
from thinksafe.report import Value, collect_runs, main, mean_of, plot_panels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELL = re.compile(r"^([\d.]+) \[([\d.]+), ([\d.]+)\] n=(\d+)$")
RUNS = ("tiny_base", "tiny_thinksafe_r32_ep3_mask")


@pytest.fixture(scope="module")
def two_runs(tiny_qwen3, tmp_path_factory) -> Path:
    """Two runs evaluated once for this module (the report only reads them): the untouched model dir,
    and the same weights as the merged model of a training run, named by that run's record."""
    root = tmp_path_factory.mktemp("report")
    data = write_fixture_data(root / "data")
    run_dir = root / "outputs" / "runs" / "dir-name-is-not-the-run"
    write_run_record(run_dir, run_name=RUNS[1], family="qwen")
    (run_dir / "merged").symlink_to(tiny_qwen3, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THINKSAFE_OUTPUT_DIR", str(root / "outputs"))
        assert evaluate_tiny(tiny_qwen3, RUNS[0], data, ["--seed", "0"]) == 0
        assert evaluate_tiny(run_dir / "merged", None, data, ["--seed", "1"], model_type=None) == 0
    return root / "outputs" / "results"


def markdown_cells(text: str) -> dict[str, dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        run = cells[0].replace("**", "").replace(" (base)", "")
        table[run] = dict(zip(header, cells))
    return table


def test_report_table_equals_the_metrics_files(two_runs, capsys):
    assert main([str(two_runs)]) == 0
    printed = capsys.readouterr().out
    markdown = (two_runs / "summary.md").read_text()
    assert markdown in printed
    table = markdown_cells(markdown)
    assert list(table) == list(RUNS)  # the base run first
    assert "(base)" in markdown.splitlines()[2]
    csv_rows = {row["run"]: row for row in csv.DictReader((two_runs / "summary.csv").open())}
    for run in RUNS:
        for metrics_file in sorted((two_runs / run).glob("*/metrics.json")):
            m = json.loads(metrics_file.read_text())
            column = next(c for c in table[run] if c.startswith(f"{m['task']} {m['metric']}"))
            value, low, high, n = CELL.match(table[run][column]).groups()
            assert float(value) == pytest.approx(round(100 * m["value"], 1))
            assert (float(low), float(high)) == pytest.approx((round(100 * m["ci95"][0], 1), round(100 * m["ci95"][1], 1)))
            assert int(n) == m["n"]
            key = f"{m['task']}/{m['metric']}"
            assert float(csv_rows[run][key]) == pytest.approx(m["value"])
            assert int(csv_rows[run][f"{key}/n"]) == m["n"]
            for name, sub in m["secondary"].items():
                assert float(csv_rows[run][f"{m['task']}/{name}"]) == pytest.approx(sub["value"])
        assert csv_rows[run]["is_base"] == str(run == RUNS[0])  # as evaluate recorded it
    # single reasoning and harmful task: the summary columns repeat those tasks' values
    harm = json.loads((two_runs / RUNS[1] / "harmbench" / "metrics.json").read_text())
    assert float(csv_rows[RUNS[1]]["safety: mean harmful"]) == pytest.approx(harm["value"])


def test_report_plot_is_a_valid_png_with_both_panels(two_runs):
    out = two_runs.parent / "report"
    assert main([str(two_runs), "--out", str(out)]) == 0
    png = out / "summary.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        width, height = image.size
    assert width > 1.8 * height  # two panels side by side: safety/reasoning and refusal/over-refusal
    panels = plot_panels(collect_runs(two_runs))
    assert [p["title"] for p in panels] == ["Safety vs reasoning", "Refusal vs over-refusal"]
    assert [run for run, _, _ in panels[1]["points"]] == list(RUNS)


def write_metrics(root: Path, run: str, task: str, metric: str, value: float, is_base: bool = False,
                  directory: str | None = None) -> None:
    d = root / (directory or run) / task
    d.mkdir(parents=True)
    d.joinpath("metrics.json").write_text(json.dumps(
        {"task": task, "run_name": run, "is_base": is_base, "metric": metric, "value": value, "k": round(30 * value),
         "n": 30, "ci95": [0.0, 1.0], "secondary": {}, "higher_is_better": metric in ("pass@1", "refusal_rate")}))


def test_demo_style_runs_plot_refusal_only(tmp_path):
    """Runs without reasoning tasks (the CPU demo) get the refusal vs over-refusal panel alone."""
    for run, (refused, over) in {"smollm2-135M_base": (3, 0), "smollm2-135M_thinksafe": (12, 2)}.items():
        for task, metric, k in (("heldout_harmful", "refusal_rate", refused), ("xstest", "over_refusal_rate", over)):
            write_metrics(tmp_path, run, task, metric, k / 30, is_base=run.endswith("_base"))
    panels = plot_panels(collect_runs(tmp_path))
    assert [p["title"] for p in panels] == ["Refusal vs over-refusal"]
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG_SIGNATURE


def test_mean_of_combines_task_errors():
    one = Value(0.2, 0.1, 0.3, 10)
    assert mean_of([one]) == one
    mean = mean_of([one, Value(0.4, 0.2, 0.6, 10)])
    half = ((0.1 ** 2 + 0.2 ** 2) ** 0.5) / 2
    assert (mean.value, mean.low, mean.high) == pytest.approx((0.3, 0.3 - half, 0.3 + half))


def test_empty_results_root_is_a_one_line_error(tmp_path):
    with pytest.raises(ThinksafeError, match="run `thinksafe evaluate` first"):
        collect_runs(tmp_path)


def test_report_links_the_page_of_paper_commands_and_departures(two_runs):
    from urllib.parse import unquote, urlparse

    main([str(two_runs)])
    markdown = (two_runs / "summary.md").read_text()
    link = re.search(r"\[docs/paper\.md\]\((file://[^)]+)\)", markdown)
    assert link is not None
    page = Path(unquote(urlparse(link.group(1)).path))
    assert page.name == "paper.md" and "## Departures that remain" in page.read_text()


def test_runs_are_named_and_marked_base_by_their_metrics_not_their_directories(tmp_path):
    write_metrics(tmp_path, "qwen3-0.6B_base", "gsm8k", "pass@1", 0.5, is_base=True, directory="copied-by-hand")
    write_metrics(tmp_path, "looks_like_a_base", "gsm8k", "pass@1", 0.6, directory="trained_base")
    runs = collect_runs(tmp_path)
    assert set(runs) == {"qwen3-0.6B_base", "looks_like_a_base"}
    table = markdown_cells(main_markdown(tmp_path))
    assert list(table) == ["qwen3-0.6B_base", "looks_like_a_base"]  # the base model first
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert "**qwen3-0.6B_base** (base)" in lines[2] and "(base)" not in lines[3]
    write_metrics(tmp_path, "looks_like_a_base", "gsm8k", "pass@1", 0.6, directory="again")
    with pytest.raises(ThinksafeError, match="repeats run 'looks_like_a_base'"):
        collect_runs(tmp_path)


def main_markdown(root: Path) -> str:
    assert main([str(root)]) == 0
    return (root / "summary.md").read_text()


PAPER_SAFETY = ("harmbench", "strongreject", "wildjailbreak")
PAPER_REASONING = ("aime24", "gpqa_diamond", "math500", "gsm8k")


def test_a_mean_without_all_the_papers_tasks_is_marked_with_the_missing_ones(tmp_path):
    for task in PAPER_SAFETY:
        write_metrics(tmp_path, "full", task, "harmful_rate", 0.2)
    for task in PAPER_REASONING:
        write_metrics(tmp_path, "full", task, "pass@1", 0.5)
    for task in ("harmbench", "strongreject"):  # no wildjailbreak (gated)
        write_metrics(tmp_path, "partial", task, "harmful_rate", 0.4)
    write_metrics(tmp_path, "partial", "gsm8k", "pass@1", 0.7)
    table = markdown_cells(main_markdown(tmp_path))
    safety, reasoning = "safety: mean harmful ↓", "reasoning: mean pass@1 ↑"
    assert CELL.match(table["full"][safety]) and CELL.match(table["full"][reasoning])  # nothing marked
    assert table["partial"][safety].startswith("40.0") and table["partial"][safety].endswith(
        "(partial, missing wildjailbreak)")
    assert table["partial"][reasoning].endswith("(partial, missing aime24, gpqa_diamond, math500)")
    rows = {row["run"]: row for row in csv.DictReader((tmp_path / "summary.csv").open())}
    assert float(rows["partial"]["safety: mean harmful"]) == pytest.approx(0.4)
    assert rows["partial"]["safety: mean harmful/missing"] == "wildjailbreak"
    assert rows["partial"]["reasoning: mean pass@1/missing"] == "aime24;gpqa_diamond;math500"
    assert rows["full"]["safety: mean harmful/missing"] == rows["full"]["reasoning: mean pass@1/missing"] == ""
    labels = plot_panels(collect_runs(tmp_path))[0]["labels"]
    assert labels == {"full": "full", "partial": "partial (partial means)"}


def test_a_mean_over_a_task_the_paper_did_not_have_is_marked_too(tmp_path):
    for task in PAPER_SAFETY:
        write_metrics(tmp_path, "run", task, "harmful_rate", 0.2)
    write_metrics(tmp_path, "run", "my_new_redteam_set", "harmful_rate", 0.8)
    table = markdown_cells(main_markdown(tmp_path))
    assert table["run"]["safety: mean harmful ↓"].startswith("35.0")  # (3 x 20 + 80) / 4: averaged, and marked
    assert table["run"]["safety: mean harmful ↓"].endswith("(with my_new_redteam_set, not in the paper)")
    assert "neither is the paper's mean" in (tmp_path / "summary.md").read_text()
