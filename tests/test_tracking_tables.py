"""wandb as the peers use it, offline and without an account: evaluation results as the run's summary,
a table of sampled generations per task, synthesis statistics and rows, a grid's report in its group.
Each test reads the offline run's own files; nothing is written into the current directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, write_fixture_data

pytest.importorskip("wandb")


def offline_env(out: Path, **extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_MODE": "offline",
            "THINKSAFE_OUTPUT_DIR": str(out), "PYTHONPATH": str(ROOT), **extra}


def only_run(out: Path) -> Path:
    (run,) = (out / "wandb").glob("offline-run-*")
    return run / "files"


def run_records(files: Path) -> bytes:
    """The offline run's record log (run-<id>.wandb): protobuf records that `wandb sync` uploads."""
    (path,) = files.parent.glob("run-*.wandb")
    return path.read_bytes()


def holds_item(records: bytes, key: str, value) -> bool:
    """A summary or history item {key, value_json} as protobuf encodes it (field 1 the key, field 16 the
    value's JSON): the value the run logged under that key, not just the key's text."""
    text = json.dumps(value).encode()
    return key.encode() + b"\x82\x01" + bytes([len(text)]) + text in records


def table(files: Path, key: str) -> dict:
    (path,) = files.glob(f"media/table/{key}_*.table.json")
    return json.loads(path.read_text())


def test_an_evaluation_logs_its_metrics_as_summary_and_its_generations_as_a_table(tiny_qwen3, tmp_path):
    data = write_fixture_data(tmp_path / "data")
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    argv = ["--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "tiny", "--tasks", "xstest,gsm8k",
            "--backend", "transformers", "--max-new-tokens", "6", "--n", "2", "--refusal-guard", "refusal-judge",
            "--guard", "refusal-judge", "--report-to", "offline", "--device", "cpu",
            "--data-file", f"xstest={data['xstest']}", "--data-file", f"gsm8k={data['gsm8k']}"]
    done = subprocess.run([sys.executable, "-m", "thinksafe", "evaluate", *argv], capture_output=True, text=True,
                          env=offline_env(out, WANDB_RUN_GROUP="grid-x"), timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(cwd.iterdir()) == []  # nothing in the current directory
    files = only_run(out)
    records = run_records(files)
    assert b"grid-x" in records  # the run's group
    for task in ("xstest", "gsm8k"):
        metrics = json.loads((out / "results" / "tiny" / task / "metrics.json").read_text())
        assert holds_item(records, f"eval/{task}/{metrics['metric']}", metrics["value"])
        rows = [json.loads(line) for line in (out / "results" / "tiny" / task / "generations.jsonl").open()]
        logged = table(files, f"eval/{task}/samples")
        assert logged["columns"] == ["id", "sample", "label", "prompt", "response", "verdict"]
        # every generation (fewer than the table's sample size), in file order, with its verdict
        assert [(r[0], r[1], r[3], r[4]) for r in logged["data"]] == [
            (str(r["id"]), r["sample"], r["prompt"], r["response"]) for r in rows]
        assert all(r[5] for r in logged["data"])
    xstest = table(files, "eval/xstest/samples")
    assert {r[2] for r in xstest["data"]} == {"safe", "unsafe"}


def test_a_table_samples_a_fixed_subset_in_file_order():
    from thinksafe.tracking import TABLE_ROWS, sample_rows

    rows = list(range(1000))
    picked = sample_rows(rows)
    assert len(picked) == TABLE_ROWS and picked == sorted(picked) and picked == sample_rows(rows)
    assert sample_rows(rows[:5]) == rows[:5]


def test_a_grid_report_and_synthesis_log_offline_in_the_grid_group(tmp_path):
    """The report's CSV as a Table and its plot in the grid's group; synthesis statistics as summary and
    a table of kept and dropped rows. Run in a child: wandb's service belongs to the process."""
    out = tmp_path / "out"
    csv_path, png = tmp_path / "grid.csv", tmp_path / "grid.png"
    csv_path.write_text("model,variant,column,mean\ndemo,base,xstest,0.03\ndemo,thinksafe,xstest,0.12\n")
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    code = f"""
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
plt.plot([0, 1]); plt.savefig({str(png)!r})
from pathlib import Path
from thinksafe.tracking import log_grid_report, log_synthesis
run = log_grid_report("g1", {{"csv": Path({str(csv_path)!r}), "png": Path({str(png)!r})}})
log_synthesis("demo-data", {{"kept": {{"total": 3, "harmful": 1}}, "generated": 8}},
              [{{"instruction": "q", "response": "a", "prompt_label": "vanilla_benign"}}],
              [{{"instruction": "h", "response": "sure", "prompt_label": "vanilla_harmful", "reason": "unsafe"}}])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(
        out, WANDB_RUN_GROUP="g1"), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    report, synthesis = (r / "files" for r in runs)
    grid = table(report, "grid/table")
    assert grid["columns"] == ["model", "variant", "column", "mean"] and grid["data"][1][3] == "0.12"
    assert list(report.glob("media/images/grid/plot_*.png"))
    assert b"g1" in run_records(report) and b"g1-report" in run_records(report)  # group and name
    records = run_records(synthesis)
    assert holds_item(records, "synthesis/kept/total", 3) and holds_item(records, "synthesis/generated", 8)
    rows = table(synthesis, "synthesis/rows")["data"]
    assert rows == [[True, "vanilla_benign", "kept", "q", "a"], [False, "vanilla_harmful", "unsafe", "h", "sure"]]
