"""`thinksafe grid`: a grid file planned, run end to end at tiny scale, rerun (nothing but the report),
resumed after a lost result; the report's seed statistics against an independent computation."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, one_line_error, run_cli

from thinksafe.grid.config import load_grid
from thinksafe.grid.run import plan_grid
from thinksafe.report.collect import Value
from thinksafe.report.grid import over_seeds


def write_grid(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, needle", [
    ("models: [demo]\nvariants: [base, sft]\n", "variant(s) sft unknown"),
    ("models: [demo]\nvariants: [base]\nseeds: [1, 1]\n", "`seeds` lists a seed twice"),
    ("models: [demo]\nvariants: [base]\nseed: 3\n", "unknown key(s) seed"),
    ("models: [demo]\nvariants: [thinksafe]\nsettings: {seed: 3}\n", "seed set twice"),
    ("models: [demo]\nvariants: [thinksafe]\nsweep: {learning_rate: 1.0e-3}\n", "sweep `learning_rate` must be"),
    ("models: [nope]\nvariants: [thinksafe]\n", "model_type"),
    ("models: [demo]\nvariants: [thinksafe]\nsettings: {learning_rat: 1.0e-3}\n", "unknown option(s) learning_rat"),
])
def test_a_bad_grid_is_one_line_before_any_work(tmp_path, output_root, capsys, text, needle):
    grid = write_grid(tmp_path / "g.yaml", "devices: cpu\n" + text)
    code, _, err = run_cli(capsys, "grid", str(grid))
    one_line_error(code, err, needle)
    assert not output_root.exists()  # nothing planned is written


def test_every_point_of_a_seed_and_learning_rate_grid_is_its_own_run(tmp_path, output_root):
    grid = write_grid(tmp_path / "g.yaml", "models: [demo]\nvariants: [base, thinksafe, thinksafe+kl]\n"
                                            "seeds: [1, 2]\nsweep: {learning_rate: [2.5e-4, 5.0e-4]}\n")
    points = plan_grid(load_grid(grid), check_devices=False)
    trained = [p for p in points if p.variant != "base"]
    assert len(trained) == 2 * 2 * 2 and len({p.run_name for p in trained}) == 8
    assert [p.variant for p in points].count("base") == 1
    for p in trained:  # each run's record carries its seed and learning rate to `train` and `evaluate`
        assert p.plan.record["sft"]["seed"] == p.seed == p.plan.record["evaluate"]["seed"]
        assert f"learning_rate={p.plan.record['sft']['learning_rate']}" == p.point
    # the same grid planned again finds the same runs
    assert [p.run_name for p in plan_grid(load_grid(grid), check_devices=False)] == [p.run_name for p in points]


def test_seed_cells_against_an_independent_computation():
    values = {1: Value(0.9, 0.8, 0.95, 100), 2: Value(0.8, 0.7, 0.88, 100), 3: Value(0.7, 0.6, 0.8, 100)}
    cell = over_seeds(values)
    mean = (0.9 + 0.8 + 0.7) / 3
    sd = math.sqrt(((0.9 - mean) ** 2 + (0.8 - mean) ** 2 + (0.7 - mean) ** 2) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 df)
    assert (cell.seeds, cell.samples) == (3, 300)
    assert cell.mean == pytest.approx(mean) and cell.sd == pytest.approx(sd)
    assert (cell.low, cell.high) == (pytest.approx(mean - half), pytest.approx(min(1.0, mean + half)))
    assert cell.cell() == f"{100 * mean:.1f} ± {100 * sd:.1f} [{100 * (mean - half):.1f}, 100.0] (3 seeds, n=300)"
    one = over_seeds({None: Value(0.5, 0.4, 0.6, 50), 7: None})  # one seed: its own (Wilson) interval
    assert (one.mean, one.sd, one.low, one.high, one.seeds, one.samples) == (0.5, None, 0.4, 0.6, 1, 50)
    assert over_seeds({1: None}) is None


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run_grid(grid: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "grid.sh"), str(grid)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=1500)


@pytest.mark.demo
def test_the_demo_grid_sh_end_to_end_rerun_and_resume(tmp_path, demo_model):
    """base + ThinkSafe, 2 seeds x 2 learning rates on the demo model with the tests' tiny limits: one
    synthesis, four runs in one report with per-seed spread; a rerun runs nothing; a lost result is
    redone alone."""
    out = tmp_path / "outputs"
    env = {"THINKSAFE_OUTPUT_DIR": str(out), "THINKSAFE_RECIPE": str(ROOT / "tests/data/smoke_recipe.yaml"),
           "WANDB_MODE": "offline"}
    grid = write_grid(tmp_path / "tiny.yaml", "name: tiny\ndevices: cpu\nmodels: [demo]\n"
                                               "variants: [base, thinksafe]\nseeds: [1, 2]\n"
                                               "sweep: {learning_rate: [1.0e-3, 2.0e-3]}\n")
    first = run_grid(grid, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("[synthesize] started") == 1
    runs = sorted(p.name for p in (out / "runs").iterdir() if (p / "run_info.json").exists())
    assert len(runs) == 4
    infos = [json.loads((out / "runs" / r / "run_info.json").read_text()) for r in runs]
    assert sorted((i["learning_rate"], json.loads((out / "runs" / r / "run_record.json").read_text())
                   ["settings"]["seed"]) for i, r in zip(infos, runs)) == [(1e-3, 1), (1e-3, 2), (2e-3, 1), (2e-3, 2)]

    report = out / "results" / "grids" / "tiny"
    table = (report / "grid.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| demo")]
    assert len(rows) == 3  # two learning rates + the base model
    assert sum("(2 seeds, n=" in row for row in rows) == 2 and "(1 seed, n=" in rows[-1]
    # every CSV cell equals the mean of its seeds' metrics.json values
    for line in read_csv(report / "grid.csv"):
        if line["column"] != "xstest":
            continue
        per_seed = dict(item.split(":") for item in line["per_seed"].split(";"))
        grid_json = json.loads((report / "grid.json").read_text())
        row = next(r for r in grid_json["rows"] if r["variant"] == line["variant"] and r["point"] == line["point"])
        found = {s: json.loads((out / "results" / run / "xstest" / "metrics.json").read_text())["value"]
                 for s, run in row["runs"].items()}
        assert {s: float(v) for s, v in per_seed.items()} == {s: v for s, v in found.items()}
        assert float(line["mean"]) == pytest.approx(sum(found.values()) / len(found))
    assert (report / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/grid/table_*.table.json"))
    assert len(tables) == 1 and "xstest" in tables[0].read_text()

    # a rerun: no stage starts, the report is written again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "grids" not in p.parts
              and "wandb" not in p.parts and p.suffix != ".lock"}
    again = run_grid(grid, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "started" not in again.stdout and again.stdout.count("[done]") == 5
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a lost result: only that run's evaluation runs again
    lost = out / "results" / runs[0] / "xstest"
    (lost / "metrics.json").unlink()
    resumed = run_grid(grid, env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"[eval] {runs[0]} / xstest started" in resumed.stdout and resumed.stdout.count(" started") == 1
    assert resumed.stdout.count("\n== ") == 1 and runs[0] in resumed.stdout.split("\n== ", 1)[1].splitlines()[0]
    assert (lost / "metrics.json").exists()
