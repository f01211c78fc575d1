"""thinksafe report: the table and the plot from run directories written by the real evaluate code."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from helpers import evaluate_tiny, write_fixture_data, write_run_record

from thinksafe.errors import ThinksafeError
from thinksafe.evaluate.tasks import get_task
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


def markdown_cells(text: str, title: str | None = None) -> dict[str, dict[str, str]]:
    """{run: {column: cell}} of the main table, or of the table under the section `title`."""
    if title is not None:
        text = text.split(title, 1)[1]
    lines = []
    for line in text.strip().splitlines():
        if lines and not line.startswith("|"):
            break
        if line.startswith("|"):
            lines.append(line)
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
            cell = table[run][column]
            if m["task"] == "harmbench":  # its cells name the set (here a --data-file: "file")
                assert cell.endswith(" (file set)") and m["harmbench_set"] == "file"
                cell = cell.removesuffix(" (file set)")
            value, low, high, n = CELL.match(cell).groups()
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
                  directory: str | None = None, **fields) -> None:
    """A metrics.json as evaluate writes it; by default on the paper's data set, all rows, the task's
    judge and token budget (what makes a number comparable with the paper's table). `fields` override."""
    from thinksafe.evaluate.tasks import list_tasks, paper_set_name

    spec = get_task(task) if task in list_tasks() else None
    paper_set = paper_set_name(spec) if spec else "hub"
    d = root / (directory or run) / task
    d.mkdir(parents=True)
    d.joinpath("metrics.json").write_text(json.dumps(
        {"task": task, "run_name": run, "is_base": is_base, "metric": metric, "value": value, "k": round(30 * value),
         "n": 30, "ci95": [0.0, 1.0], "secondary": {}, "higher_is_better": metric in ("pass@1", "refusal_rate"),
         "data": {"source": "hub", "set": paper_set, "rows_total": 30, "rows_used": 30},
         "judge": {"name": spec.judge} if spec and spec.judge else None,
         "sampling": {"max_new_tokens": spec.max_new_tokens if spec else 16384}, **fields}))


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
    assert "none of them is the paper's mean" in (tmp_path / "summary.md").read_text()


def test_a_safety_mean_on_another_harmbench_set_is_marked_not_comparable(tmp_path):
    """Only the paper's 602-prompt HarmBench set gives the paper's safety mean; the standard hub set,
    part of the paper's set (--limit) or a file of unknown origin do not, and the report says which."""
    harmbench = {"paper_set": {"data": {"source": "file", "set": "paper", "rows_total": 602, "rows_used": 602}},
                 "standard_set": {"data": {"source": "hub", "set": "standard", "rows_total": 200, "rows_used": 200}},
                 "limited": {"data": {"source": "file", "set": "paper", "rows_total": 602, "rows_used": 20}},
                 "old_file": {"data": {}}}  # written before sets were recorded
    for run, fields in harmbench.items():
        write_metrics(tmp_path, run, "harmbench", "harmful_rate", 0.3, **fields)
        for task in ("strongreject", "wildjailbreak"):
            write_metrics(tmp_path, run, task, "harmful_rate", 0.2)
    markdown = main_markdown(tmp_path)
    table = markdown_cells(markdown)
    safety = "safety: mean harmful ↓"
    assert CELL.match(table["paper_set"][safety])  # unmarked: the paper's protocol
    assert table["paper_set"]["harmbench harmful_rate ↓"].endswith(" (paper set)")
    assert table["standard_set"]["harmbench harmful_rate ↓"].endswith(" (standard set)")
    for run in ("standard_set", "limited", "old_file"):
        assert table[run][safety].endswith("(not comparable with the paper, see below)")
    section = markdown.split("### Against the paper's table", 1)[1]
    assert "- paper_set: safety: mean harmful: comparable" in section
    assert "harmbench on the standard set (the paper's: paper)" in section
    assert "harmbench on 20 of 602 rows" in section and "harmbench on an unrecorded data set" in section
    assert "- harmbench set: paper (the paper's set): limited, paper_set; standard: standard_set" in markdown
    rows = {row["run"]: row for row in csv.DictReader((tmp_path / "summary.csv").open())}
    assert rows["paper_set"]["safety: mean harmful/not_comparable"] == ""
    assert rows["standard_set"]["safety: mean harmful/not_comparable"] == "harmbench on the standard set (the paper's: paper)"
    labels = plot_panels(collect_runs(tmp_path))
    assert labels == []  # no reasoning mean: no trade-off panel; the label rule is checked below
    from thinksafe.report import _departure_label, mean_departures

    assert _departure_label(mean_departures(collect_runs(tmp_path), "standard_set")) == " (not comparable)"


def test_other_judges_and_budgets_are_not_the_papers_either(tmp_path):
    """The CPU demo's numbers: the refusal judge for Llama-Guard-3, 48 new tokens, bundled subsets."""
    for task in PAPER_SAFETY:
        write_metrics(tmp_path, "demo", task, "harmful_rate", 0.5, judge={"name": "refusal-judge"},
                      sampling={"max_new_tokens": 48})
    section = main_markdown(tmp_path).split("### Against the paper's table", 1)[1]
    assert "strongreject judged by refusal-judge (the paper's: llama-guard-3)" in section
    assert "wildjailbreak cut at 48 new tokens (the paper's: 16384)" in section


def write_demo_run(root: Path, run: str, refusals: dict[str, float], over_refusal: float, is_base: bool) -> None:
    """A demo run's safety metrics with the refusal-phrase judge's rate, as evaluate writes them."""
    for task, refused in refusals.items():
        kind_metric = ("refusal_rate", refused) if task == "heldout_harmful" else ("harmful_rate", 1 - refused)
        phrase = {"value": refused, "k": round(100 * refused), "n": 100, "ci95": [refused - 0.1, refused + 0.1]}
        write_metrics(root, run, task, *kind_metric, is_base=is_base, family="demo",
                      secondary={"refusal_rate_phrase": phrase})
    write_metrics(root, run, "xstest", "over_refusal_rate", over_refusal, is_base=is_base, family="demo")


def test_refusal_in_and_out_of_the_training_distribution_side_by_side(tmp_path):
    write_demo_run(tmp_path, "smollm2-135M_base", {"heldout_harmful": 0.04, "harmbench": 0.10, "strongreject": 0.20},
                   0.04, is_base=True)
    write_demo_run(tmp_path, "smollm2-135M_thinksafe", {"heldout_harmful": 0.61, "harmbench": 0.30,
                                                        "strongreject": 0.40}, 0.25, is_base=False)
    markdown = main_markdown(tmp_path)
    table = markdown_cells(markdown, "### Refusal on harmful prompts by source")
    trained = table["smollm2-135M_thinksafe"]
    assert trained["held-out AdvBench (the demo's training source) ↑"].startswith("61.0 ")
    assert trained["held-out AdvBench (the demo's training source) ↑"].endswith("(+57.0)")
    assert trained["HarmBench ↑"].endswith("(+20.0)") and trained["StrongREJECT ↑"].endswith("(+20.0)")
    assert trained["other sources: mean ↑"].startswith("35.0 ") and trained["other sources: mean ↑"].endswith("(+20.0)")
    assert trained["XSTest safe over-refusal ↓"].endswith("(+21.0)")
    base = table["smollm2-135M_base"]
    assert base["HarmBench ↑"].startswith("10.0 ") and not base["HarmBench ↑"].endswith(")")  # no change for the base


def test_no_refusal_by_source_section_without_both_kinds_of_sets(tmp_path):
    write_demo_run(tmp_path, "only_heldout", {"heldout_harmful": 0.5}, 0.1, is_base=True)
    assert "Refusal on harmful prompts by source" not in main_markdown(tmp_path)
