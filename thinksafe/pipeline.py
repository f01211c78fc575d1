"""`thinksafe pipeline`: what scripts/train_and_eval.sh and scripts/eval.sh run.

synthesize (if the run trains on this model's own data and it is not there yet) -> train on the
listed devices -> merge -> evaluate the base model and the trained one, one task per free device,
reasoning tasks first -> report. Each step is a subprocess of `python -m thinksafe <stage>`, so a
step's failure never loses an earlier step's files, and each evaluation task writes its own log.
The plan's typed stage configs are written once, as the run record `<run dir>/run_plan.yaml`, and
each stage reads its section with `--config`; every stage also reads its family's recipe
(configs/recipes/<family>/<stage>.yaml) and THINKSAFE_RECIPE (the tests' tiny limits) itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from thinksafe.console import TERMINAL, VERBOSE_ENV, verbose_from_env
from thinksafe.errors import ThinksafeError
from thinksafe.evaluate.tasks import task_groups as task_files_by_group
from thinksafe.io import atomic_write_text
from thinksafe.locks import writer_locks
from thinksafe.merge import ADAPTER_CONFIG
from thinksafe.plan import POSITIONAL, RunPlan, resolve_plan, text
from thinksafe.recipes import CONFIG_DIR, recipe_values
from thinksafe.reference_topk import PIPELINE_REFERENCE_TOPK, REFERENCE_TOPK_FILE
from thinksafe.registry import SYNTH_TRAIN_FILE, SYNTH_UNFINISHED_BENIGN_FILE, get_family, results_root
from thinksafe.shared_engine import MODE_ENV, MODES, EngineProcess
from thinksafe.steps import (  # run_step and run_tasks_on_devices are looked up here: tests replace them
    StepFailed,
    Task,
    device_env,
    log_tail,
    open_log,
    run_step,
    run_tasks_on_devices,
    thinksafe_cmd,
)

RUN_PLAN = "run_plan.yaml"  # the run record: the typed config of each stage, as the plan resolved it



def evaluation_tasks(family: str) -> list[str]:
    """The reasoning group first (the longest tasks start first), then safety, each in the task files'
    order (eval/tasks/*.yaml); the recipe may name others (the demo)."""
    tasks = recipe_values(family, "evaluate").get("tasks")
    if tasks:
        return [tasks] if isinstance(tasks, str) else list(tasks)
    groups = task_files_by_group()
    return [*groups["reasoning"], *groups["safety"]]


def synthesis_needed(plan: RunPlan) -> bool:
    if not plan.self_generated:
        return False
    # Data synthesized without the cut benign rows this KL run needs: rerun, it reuses the logs.
    side_file_missing = plan.kl_on_unfinished and not (plan.data_dir / SYNTH_UNFINISHED_BENIGN_FILE).exists()
    return not plan.data_file.exists() or side_file_missing


def synthesize_if_needed(plan: RunPlan) -> None:
    if not plan.self_generated:
        return
    data_file = plan.data_file
    needs_side_file = plan.kl_on_unfinished
    check_reference_store(plan)
    if not synthesis_needed(plan):
        print(f"dataset: {data_file} exists, skipping synthesis", flush=True)
        return
    # The stage reads the family's synthesis recipe itself (scripts/synthesize.sh gets the same data).
    cmd = thinksafe_cmd("synthesize", "--model", f"{plan.model_type}/{plan.size}", "--guard", plan.guard,
                        "--out", str(plan.data_dir), *(["--keep-unfinished-benign", "true"] if needs_side_file else []),
                        *(["--store-reference-topk", str(reference_topk(plan))] if needs_reference(plan) else []))
    run_step("synthesize", cmd, plan.data_dir / "synthesize.log", env=device_env(plan.first_device))


def needs_reference(plan: RunPlan) -> bool:
    return plan.kl_reference == "cached"


def reference_topk(plan: RunPlan) -> int:
    """K for a cached-KL run: the synthesis recipe's store_reference_topk, else PIPELINE_REFERENCE_TOPK."""
    return int(recipe_values(plan.model_type, "synthesize").get("store_reference_topk") or PIPELINE_REFERENCE_TOPK)


def check_reference_store(plan: RunPlan) -> None:
    """A cached-KL run needs the base model's top-k captured while its data was generated: data made
    without it cannot gain it by a rerun (its samples are already drawn), so say so before anything runs."""
    data_dir = plan.data_dir
    store_missing = (data_dir / SYNTH_TRAIN_FILE).exists() and not (data_dir / REFERENCE_TOPK_FILE).exists()
    if needs_reference(plan) and store_missing:
        raise ThinksafeError(
            f"kl_reference cached: {data_dir} was synthesized without the base model's top-k ({REFERENCE_TOPK_FILE}); "
            "synthesize again into a fresh THINKSAFE_OUTPUT_DIR (the pipeline then passes --store-reference-topk) "
            "or train with kl_reference forward")


def train(plan: RunPlan) -> None:
    # `thinksafe train` derives the run name from the same registry call as the plan; we check it.
    # --skip-finished: a rerun of a finished run (same data hash and settings) goes on to evaluation;
    # one whose data or settings changed is refused by train with what differs.
    args = ["--config", str(write_run_plan(plan)), "--skip-finished"]
    if plan.num_devices <= 1:
        cmd = thinksafe_cmd("train", *args)
    else:
        config = CONFIG_DIR / "accelerate" / "multi_gpu.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(plan.num_devices), "-m", "thinksafe", "train", *args]
    # several processes under accelerate: the ranks never get the console pipe (the launcher may close
    # it, and a rank would then write into whatever file took its number); their output is in the log
    run_step("train", cmd, plan.paths.logs / "train.log", env=device_env(",".join(plan.devices)),
             **({"relay": False} if plan.num_devices > 1 else {}))
    if not plan.paths.adapter.exists():
        raise StepFailed(f"train finished but wrote no adapter at {plan.paths.adapter}")


def write_run_plan(plan: RunPlan) -> Path:
    """The run record `train` and `evaluate` read with --config: each stage's section as typed YAML."""
    path = plan.paths.run_dir / RUN_PLAN
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(plan.record, sort_keys=False))
    return path


def merge(plan: RunPlan) -> None:
    cmd = thinksafe_cmd("merge", str(plan.paths.run_dir))
    run_step("merge", cmd, plan.paths.logs / "merge.log", env=device_env(plan.first_device))


def task_groups(names: list[str], devices: list[str]) -> list[list[str]]:
    """A model's tasks split over at most one evaluation process per device. Each process loads the
    policy (a vLLM engine start is ~60 s on a GPU, ~55 s on CPU) and each guard once for all its
    tasks, where one process per task paid that for every task; with as many devices as tasks, one
    task each, in parallel, as before."""
    count = max(1, min(len(devices), len(names)))
    return [names[i::count] for i in range(count)]


def evaluation_task(names: list[str], model: str, run_name: str, logs: Path, extra: list[str]) -> Task:
    return Task(",".join(names), model, run_name, logs / f"eval_{'+'.join(names)}.log", extra)


def trained_model(plan: RunPlan) -> str:
    """The adapter where the run has one: vLLM serves it through LoRARequest, which keeps the update
    apart from the 16-bit weights that would round most of it away (thinksafe.merge), and the
    transformers backend evaluates the float32 merge made by the merge step. A full fine-tune: its
    model."""
    adapter = plan.paths.adapter
    return str(adapter) if (adapter / ADAPTER_CONFIG).exists() else str(plan.paths.merged)


def evaluate(plan: RunPlan, include_base: bool = True, include_trained: bool = True,
             together: bool = False) -> list[tuple[Task, int]]:
    """`together` (a shared engine serves both models): the trained model and the base model in one
    process per task group, one after the other (`evaluate --also-model`), its log in the run's logs;
    each model's results where its own process would write them."""
    devices = list(plan.devices)
    groups = task_groups(evaluation_tasks(plan.model_type), devices)
    extra = ["--config", str(write_run_plan(plan))]
    models = []
    if include_trained:
        models.append((trained_model(plan), plan.paths.name, plan.paths.logs))
    if include_base:
        models.append((f"{plan.model_type}/{plan.size}", plan.base.name, plan.base.results / "logs"))
    if together and len(models) == 2:
        (model, run_name, logs), (base, base_name, _) = models
        models = [(model, run_name, logs)]
        extra = [*extra, "--also-model", base, "--also-run-name", base_name]
    tasks = [evaluation_task(names, model, run_name, logs, extra)
             for model, run_name, logs in models for names in groups]
    return with_failed_groups_split(run_tasks_on_devices(tasks, devices), devices)


def with_failed_groups_split(results: list[tuple[Task, int]], devices: list[str]) -> list[tuple[Task, int]]:
    """A group's process stops at its first failing task (a task without data fails before any
    generation): its tasks run again one per process, so that the others still finish. Tasks that
    did finish are skipped by `evaluate` (same settings) in their own process."""
    failed = [task for task, code in results if code != 0 and "," in task.name]
    if not failed:
        return results
    print(f"[eval] {len(failed)} task group(s) failed: their tasks again one per process", flush=True)
    singles = [evaluation_task([name], task.model, task.run_name, task.log.parent, task.extra)
               for task in failed for name in task.name.split(",")]
    return [(task, code) for task, code in results if task not in failed] + run_tasks_on_devices(singles, devices)


def report() -> None:
    """The results table on the terminal; what the report's libraries print goes to its log."""
    root = Path(results_root())
    with open_log(root / "report.log", ["report"]) as log:
        subprocess.run(thinksafe_cmd("report", str(root)), check=False,
                       stderr=None if verbose_from_env() else log)


def summarize_failures(results: list[tuple[Task, int]]) -> int:
    failed = [(t, code) for t, code in results if code != 0]
    if not failed:
        return 0
    print("\nFAILED evaluation tasks:", file=sys.stderr)
    for task, code in failed:
        print(f"  {task.run_name} / {task.name}: exit {code}, log: {task.log}", file=sys.stderr)
        if not verbose_from_env():
            print(log_tail(task.log), file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinksafe pipeline", description=__doc__.split("\n\n")[0])
    for name in POSITIONAL:
        parser.add_argument(name, nargs="?", default="")
    parser.add_argument("--eval-only", action="store_true", help="evaluate (base and, if trained, the run) and report")
    parser.add_argument("--no-base", action="store_true", help="do not evaluate the untouched base model")
    parser.add_argument("--shared-engine", default=None, metavar="auto|on|off",
                        help=f"one generation engine for synthesis and both evaluations, started once and asleep "
                             f"while training (docs/scale.md); auto (default, or {MODE_ENV}): on one GPU with vLLM")
    parser.add_argument("--verbose", action="store_true",
                        help=f"stream every stage's whole output (engine logs, warnings) to the terminal too; "
                             f"default: each stage's own lines, the rest in its log file "
                             f"({VERBOSE_ENV}=1 does the same)")
    return parser


def print_plan(plan: RunPlan) -> None:
    flat = plan.to_dict()
    print("thinksafe run:", flush=True)
    for key in (*POSITIONAL, "run_name", "path_run_dir", "path_results"):
        print(f"  {key:<15} {text(flat[key])}")
    if plan.self_generated:
        print(f"  {'guard':<15} {plan.guard}\n  {'data_file':<15} {plan.data_file}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by the step runner (thinksafe.steps)
    args.shared_engine = shared_engine_mode(args.shared_engine)
    plan = resolve_plan({key: value for key, value in vars(args).items() if key not in ("verbose", "shared_engine")})
    trained = plan.paths.merged.exists() or plan.paths.adapter.exists()
    if args.eval_only and args.no_base and not trained:
        raise ThinksafeError(f"nothing to evaluate: {plan.paths.run_dir} holds no trained model and "
                             "--no-base skips the base model; train it first or drop --no-base")
    print_plan(plan)
    if args.eval_only and not trained:
        print(f"no trained run at {plan.paths.run_dir} (train it with scripts/train_and_eval.sh and the same "
              "arguments): evaluating the base model only", flush=True)
    # One writer per run (and per data dir it synthesizes): a second pipeline on this run stops here.
    # The stages run as children under these locks (thinksafe.locks.HOLDER_ENV).
    with writer_locks(pipeline_locks(plan, args.eval_only)):
        return run_stages(plan, args, trained)


def pipeline_locks(plan: RunPlan, eval_only: bool) -> list[tuple[Path, str]]:
    locks = [(plan.paths.run_dir, "run directory")]
    if plan.self_generated and not eval_only:
        locks.append((plan.data_dir, "data directory"))
    return locks


def run_stages(plan: RunPlan, args, trained: bool) -> int:
    start = time.time()
    engine = shared_engine_wanted(plan, args.shared_engine)
    # built at once when synthesis will run (its start overlaps the synthesis stage's own); else when
    # the first evaluation connects, so that a rerun with nothing left to generate starts no engine
    lazy = args.eval_only or not synthesis_needed(plan)
    try:
        with shared_engine(plan, engine, lazy) as server:
            if args.eval_only:
                if trained and not plan.paths.merged.exists():
                    merge(plan)
                results = evaluate(plan, include_base=not args.no_base, include_trained=trained,
                                   together=server is not None)
            else:
                synthesize_if_needed(plan)
                train(plan)
                with merge_beside(plan, server is not None and server.backend == "vllm"):
                    results = evaluate(plan, include_base=not args.no_base, together=server is not None)
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report()
    print(f"\nthinksafe pipeline finished in {time.time() - start:.0f} s", flush=True)
    return summarize_failures(results)


# --- one engine for the run's generation (thinksafe.shared_engine) -----------------------------------


def shared_engine_mode(flag: str | None) -> str:
    value = (flag or os.environ.get(MODE_ENV) or "auto").strip().lower()
    if value not in MODES:
        where = "--shared-engine" if flag else MODE_ENV
        raise ThinksafeError(f"{where} {value!r}: choose one of {', '.join(MODES)}")
    return value


def shared_engine_wanted(plan: RunPlan, mode: str) -> bool:
    """`auto`: on one GPU with vLLM, each stage generating on one engine. Not on a CPU, where `auto`
    picks transformers for adapters and small jobs (measured faster there), nor with several devices,
    where evaluation runs one process per device in parallel, each with its own engine, nor with
    replicas (their own engines, on Ray)."""
    if mode != "auto":
        return mode == "on"
    from thinksafe.engines import vllm_installed  # deferred: engines import torch; the pipeline stays light

    if plan.num_devices != 1 or not vllm_installed():
        return False
    for stage in ("synthesize", "evaluate"):
        values = recipe_values(plan.model_type, stage)
        if str(values.get("data_parallel", 1)) != "1" or values.get("backend", "auto") not in ("auto", "vllm"):
            return False
    return True


def engine_backend(plan: RunPlan) -> str:
    """vLLM, unless the recipes ask the transformers backend of every stage (`--shared-engine on` on a CPU)."""
    backends = {recipe_values(plan.model_type, stage).get("backend", "auto") for stage in ("synthesize", "evaluate")}
    return "transformers" if backends == {"transformers"} else "vllm"


def engine_args(plan: RunPlan, backend: str, lazy: bool) -> list[str]:
    """The engine the stages would start for the base model, able to serve the run's adapter too."""
    lora_rank = 16
    while lora_rank < plan.rank:  # vLLM's LoRA ranks are powers of two from 16 here
        lora_rank *= 2
    args = ["--model", f"{plan.model_type}/{plan.size}", "--model-type", plan.model_type, "--backend", backend,
            "--max-lora-rank", str(lora_rank),
            "--reference-topk", str(reference_topk(plan) if needs_reference(plan) else 0)]
    # The engine serves the whole run's generation. A reasoning family's samples are 16k-32k tokens,
    # far above GPU_EAGER_MAX_WORK_TOKENS for any run: compiled. The others' (the demo's, <= 128 tokens
    # per sample) are small jobs: eager, as each stage's own engine was (thinksafe.engines.eager_for).
    if not get_family(plan.model_type).reasoning:
        args.append("--enforce-eager")
    return [*args, *(["--lazy"] if lazy else [])]


@contextmanager
def shared_engine(plan: RunPlan, wanted: bool, lazy: bool):
    """The shared engine for the stages run inside, stopped when they end (also on failure and Ctrl-C)."""
    if not wanted:
        yield None
        return
    backend = engine_backend(plan)
    server = EngineProcess(engine_args(plan, backend, lazy), plan.paths.logs / "engine.log",
                           device_env(plan.first_device))
    server.backend = backend
    os.environ.update(server.environment())  # the stages' environment (steps.device_env copies it)
    try:
        yield server
    finally:
        for name in server.environment():
            os.environ.pop(name, None)
        server.stop()
        TERMINAL.line("[engine] stopped")


@contextmanager
def merge_beside(plan: RunPlan, in_background: bool):
    """The merge, beside the evaluation when that serves the adapter through vLLM's LoRARequest and does
    not need the merged copy (the merge runs on CPU: thinksafe.merge); else before it, as it needs it."""
    if not in_background:
        merge(plan)
        yield
        return
    failure: list[StepFailed] = []

    def run() -> None:
        try:
            merge(plan)
        except StepFailed as err:
            failure.append(err)

    thread = threading.Thread(target=run, name="merge", daemon=True)
    thread.start()
    yield
    thread.join()
    if failure:
        raise failure[0]
