"""`thinksafe grid <grid.yaml>`: models x variants x seeds (x a sweep) in one command, one report.

Every run is planned first (a bad model, variant or setting stops the grid before any work), then,
model by model: synthesize its data once (with what every variant needs: the cut benign rows for KL,
the base's top-k for cached KL), evaluate the base model once, and train, merge and evaluate each
point that is not finished yet, through the same stage functions as `train_and_eval.sh`
(thinksafe.pipeline). A finished run (run_info.json) with every task's metrics.json is skipped without
starting a process, so a rerun of a finished grid only rewrites the report; `--recheck` runs each
stage anyway, and each stage then skips what it finds done with the same settings. The report
(results/grids/<name>/grid.{md,csv,png}) holds one row per model x variant (x sweep point): mean,
spread and 95% interval over seeds (thinksafe.report.grid).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from thinksafe import pipeline
from thinksafe.console import VERBOSE_ENV, say
from thinksafe.grid.config import BASE, TRAINED_VARIANTS, GridSpec, load_grid
from thinksafe.locks import writer_locks
from thinksafe.plan import RunPlan, resolve_plan
from thinksafe.registry import results_root
from thinksafe.report.collect import METRICS_FILE
from thinksafe.report.grid import GridRow, write_grid_report
from thinksafe.steps import StepFailed
from thinksafe.tracking import log_grid_report
from thinksafe.train.common import is_finished

GROUP_ENV = "WANDB_RUN_GROUP"  # wandb.init reads it: every run of the grid (training, evaluation) in one group


@dataclass(frozen=True)
class GridPoint:
    """One trained run of the grid (or, variant `base`, the model's base evaluation)."""

    model: str
    variant: str
    point: str  # the sweep values, e.g. "learning_rate=0.001" ('' without a sweep)
    seed: int | None
    plan: RunPlan

    @property
    def run_name(self) -> str:
        return self.plan.base.name if self.variant == BASE else self.plan.paths.name


def plan_grid(spec: GridSpec, check_devices: bool = True) -> list[GridPoint]:
    """Every point resolved to its run (name, paths, record) before anything runs."""
    points = []
    for model in spec.models:
        model_type, size = spec.model_argument(model)
        for variant in spec.trained_variants:
            use_kl, variant_settings = TRAINED_VARIANTS[variant]
            for values in spec.sweep_points():
                for seed in spec.seeds:
                    plan = resolve_plan(positional(spec, model_type, size, use_kl), check_devices,
                                        overrides={**spec.settings, **variant_settings, **values, "seed": seed},
                                        evaluate_overrides={"seed": seed})
                    points.append(GridPoint(model, variant, point_label(values), seed, plan))
        if BASE in spec.variants:
            # the base model is evaluated once, with the first seed's evaluation sampling, under the run
            # record of the model's first trained point (so it makes no run directory of its own)
            trained = [p.plan for p in points if p.model == model]
            plan = trained[0] if trained else resolve_plan(
                positional(spec, model_type, size, False), check_devices,
                overrides={**spec.settings, "seed": spec.seeds[0]}, evaluate_overrides={"seed": spec.seeds[0]})
            points.append(GridPoint(model, BASE, "", None, plan))
    return points


def positional(spec: GridSpec, model_type: str, size: str, use_kl: bool) -> dict:
    """train_and_eval.sh's positional arguments for one point ('' = the default, as the script passes it)."""
    return {"devices": spec.devices, "model_type": model_type, "size": size, "dataset": spec.dataset,
            "use_kl": str(use_kl).lower(), "prompt_masking": str(spec.prompt_masking).lower(),
            "rank": str(spec.rank or ""), "epochs": str(spec.epochs or "")}


def point_label(values: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def tasks_of(point: GridPoint) -> list[str]:
    return pipeline.evaluation_tasks(point.plan.model_type)


def results_dir(point: GridPoint) -> Path:
    return point.plan.base.results if point.variant == BASE else point.plan.paths.results


def is_trained(point: GridPoint) -> bool:
    return point.variant == BASE or is_finished(point.plan.paths)


def is_evaluated(point: GridPoint) -> bool:
    return all((results_dir(point) / task / METRICS_FILE).exists() for task in tasks_of(point))


def state(point: GridPoint) -> str:
    if is_trained(point) and is_evaluated(point):
        return "done"
    return "to evaluate" if is_trained(point) else "to train"


def print_grid(spec: GridSpec, points: list[GridPoint]) -> None:
    say(f"grid {spec.name}: {len(spec.models)} model(s) x {len(spec.variants)} variant(s) x "
        f"{len(spec.seeds)} seed(s){f' x {len(spec.sweep_points())} sweep points' if spec.sweep else ''}: "
        f"{len(points)} run(s)")
    for point in points:
        seed = "" if point.seed is None else f"seed {point.seed}"
        say(f"  {point.model:<12} {point.variant:<20} {point.point:<24} {seed:<8} {point.run_name}  [{state(point)}]")


def run_points(points: list[GridPoint], recheck: bool) -> list[str]:
    """Run what is missing, model by model; returns the failures, one line each (the others go on)."""
    failures: list[str] = []
    for model in dict.fromkeys(p.model for p in points):
        mine = [p for p in points if p.model == model]
        todo = [p for p in mine if recheck or state(p) != "done"]
        if not todo:
            continue
        try:
            synthesize_once(mine, recheck)
        except StepFailed as err:
            failures.append(f"{model}: synthesis: {err}")
            continue
        for point in sorted(todo, key=lambda p: p.variant != BASE):  # the base first: every run's reference
            failures += run_point(point, recheck)
    return failures


def synthesize_once(points: list[GridPoint], recheck: bool) -> None:
    """The model's own data, once, with what its most demanding variant needs (a cached-KL run needs the
    base's top-k stored while sampling, a KL run the cut benign rows): the others read the same files."""
    trained = [p for p in points if p.variant != BASE and (recheck or not is_trained(p))]
    if not trained or not trained[0].plan.self_generated:
        return
    demanding = max(trained, key=lambda p: (pipeline.needs_reference(p.plan), p.plan.kl_on_unfinished))
    pipeline.synthesize_if_needed(demanding.plan)


def run_point(point: GridPoint, recheck: bool) -> list[str]:
    label = f"{point.model} {point.variant}{f' ({point.point})' if point.point else ''}" + (
        f" seed {point.seed}" if point.seed is not None else "")
    say(f"\n== {label}: {point.run_name}")
    try:
        if point.variant == BASE:
            results = pipeline.evaluate(point.plan, include_base=True, include_trained=False)
        else:
            if recheck or not is_trained(point):
                pipeline.train(point.plan)
            if recheck or not point.plan.paths.merged.exists():
                pipeline.merge(point.plan)
            results = pipeline.evaluate(point.plan, include_base=False)
    except StepFailed as err:
        return [f"{label}: {err}"]
    return [f"{label}: {task.name} exit {code}, log {task.log}" for task, code in results if code != 0]


def rows_of(points: list[GridPoint]) -> list[GridRow]:
    """The report's rows: one per model x variant x sweep point, holding each seed's run."""
    rows: dict[tuple, GridRow] = {}
    for point in points:
        key = (point.model, point.variant, point.point)
        row = rows.setdefault(key, GridRow(point.model, point.variant, point.point, {}))
        row.runs[point.seed] = point.run_name
    return list(rows.values())


def grid_locks(points: list[GridPoint]) -> list[tuple[Path, str]]:
    """One writer per run and data dir (as the pipeline takes them), each once."""
    locks: dict[Path, str] = {}
    for point in points:
        if point.variant != BASE:
            locks.update(dict(pipeline.pipeline_locks(point.plan, eval_only=False)))
    return list(locks.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinksafe grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="a grid file (configs/grids/demo.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print every run and its state, run nothing")
    parser.add_argument("--recheck", action="store_true",
                        help="run every stage of every point; each skips what it finds done with the same settings "
                             "(default: a point whose run finished and whose tasks all have metrics is skipped)")
    parser.add_argument("--verbose", action="store_true", help="stream every stage's whole output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    spec = load_grid(args.grid)
    points = plan_grid(spec)
    print_grid(spec, points)
    if args.dry_run:
        return 0
    os.environ.setdefault(GROUP_ENV, spec.name)
    start = time.time()
    with writer_locks(grid_locks(points)):
        failures = run_points(points, args.recheck)
    out = results_root() / "grids" / spec.name
    files = write_grid_report(rows_of(points), results_root(), out, title=f"grid {spec.name}")
    say("\n" + files["md"].read_text(encoding="utf-8"))
    say("written: " + ", ".join(str(p) for p in files.values()))
    log_grid_report(spec.name, files)
    say(f"grid {spec.name} finished in {time.time() - start:.0f} s")
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failures else 0
