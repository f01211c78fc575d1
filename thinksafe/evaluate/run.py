"""`thinksafe evaluate`: reasoning and safety benchmarks for one model, results in the registry.

    python -m thinksafe evaluate --model <merged dir | adapter dir | hub id | type/size | demo> \\
        --tasks gsm8k,xstest [--run-name NAME] [--backend auto|vllm|transformers] [--n N] [--limit N]

For each task: load its rows (hub, bundled subset or --data-file) -> generate n samples per prompt
(resumable: rows are appended to generations.partial.jsonl as they finish) -> score (math-verify /
choice letter, or a guard's verdicts) -> results/<run>/<task>/{generations.jsonl, metrics.json}.
All tasks are generated first and judged afterwards, so the policy model and the guard never
share the accelerator. Reasoning tasks go to SkyThought when it is installed and vLLM is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.evaluate import skythought
from thinksafe.evaluate.metrics import mean_pass_at_1, rate
from thinksafe.evaluate.reasoning import check_answer
from thinksafe.progress import Progress
from thinksafe.evaluate.safety import judged_text, safety_metrics
from thinksafe.evaluate.tasks import DATA_SOURCES, EvalItem, TaskSpec, expand_tasks, get_task, load_items
from thinksafe.models import free_accelerator_memory
from thinksafe.io import (
    ResumableLog,
    atomic_write_json,
    atomic_write_jsonl,
    read_json,
    read_jsonl,
    require_writable_dir,
    sha256_of_files,
    swap_in,
)
from thinksafe.registry import (
    FAMILIES, REFUSAL_JUDGE, Family, Sampling, base_run_name, family_for_model, get_family, paths_for_name,
    resolve_model,
)
from thinksafe.train.common import RUN_INFO

logger = logging.getLogger(__name__)

GENERATIONS = "generations.jsonl"
PARTIAL = "generations.partial.jsonl"
METRICS = "metrics.json"
SETTINGS = "settings.json"  # in a staging dir: the settings its partial log was generated with
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
DEFAULT_CHUNK = 32  # prompts per generate call; each finished chunk is appended to the log
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")  # n may grow on resume
REASONING_BACKENDS = ("auto", "builtin", "skythought")


class EvaluateError(ThinksafeError, ValueError):
    pass


# --- which model, which run -----------------------------------------------------------------


@dataclass(frozen=True)
class EvalModel:
    requested: str  # what the user typed
    source: str  # what generation loads: a hub id, a directory or "demo" (the base, for an adapter)
    family: Family
    run_name: str
    adapter: Path | None = None
    merged_dir: Path | None = None  # where an adapter is merged when the backend cannot serve LoRA
    lora_rank: int | None = None

    def describe(self) -> dict:
        return {"requested": self.requested, "source": self.source, "family": self.family.name,
                "adapter": str(self.adapter) if self.adapter else None}


def resolve_eval_model(model: str, run_name: str | None = None, model_type: str | None = None) -> EvalModel:
    """A directory (adapter or model) or a registry/hub name -> what to load and the run it belongs to."""
    path = Path(model)
    if path.is_dir():
        if (path / ADAPTER_CONFIG).exists():
            return _adapter_model(model, path, run_name, model_type)
        if (path / MODEL_CONFIG).exists():
            family = get_family(model_type) if model_type else family_for_model(str(path.resolve()))
            return EvalModel(model, str(path), family, run_name or _run_name_from_dir(path, "merged"))
        raise EvaluateError(
            f"{model} is neither a model directory ({MODEL_CONFIG}) nor a LoRA adapter ({ADAPTER_CONFIG}): "
            "pass a merged model dir, an adapter dir, a hub id, model_type/size or demo"
        )
    if path.exists():
        raise EvaluateError(f"{model} is a file: pass a model or adapter directory, a hub id, model_type/size or demo")
    spec = resolve_model(model, model_type=model_type)
    return EvalModel(model, spec.source, spec.family, run_name or base_run_name(spec))


def _adapter_model(model: str, path: Path, run_name: str | None, model_type: str | None) -> EvalModel:
    from thinksafe.merge import base_model_of, locate

    base = base_model_of(path)
    family = get_family(model_type) if model_type else family_for_model(base)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    _, merged_dir = locate(path)
    return EvalModel(model, base, family, run_name or _run_name_from_dir(path, "adapter"), adapter=path,
                     merged_dir=merged_dir, lora_rank=config.get("r"))


def _run_name_from_dir(path: Path, registry_leaf: str) -> str:
    """runs/<name>/adapter or runs/<name>/merged -> <name>; any other dir -> its own name."""
    resolved = path.resolve()
    if resolved.name == registry_leaf and resolved.parent.parent.name == "runs":
        return resolved.parent.name
    return resolved.name


# --- per-task plan --------------------------------------------------------------------------


@dataclass
class Job:
    task: TaskSpec
    items: list[EvalItem]
    data: dict
    sampling: Sampling
    task_dir: Path  # where this evaluation writes: results/<run>/<task>, or a staging dir beside it
    judge: str | None = None
    seconds: float = 0.0
    resumed_rows: int = 0
    via_skythought: bool = False
    rows: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what decides the result: a cached one is reused only if equal
    final_dir: Path | None = None  # results/<run>/<task> (task_dir until a replacement is staged)

    def __post_init__(self):
        self.final_dir = self.final_dir or self.task_dir


def task_sampling(task: TaskSpec, family: Family, args) -> Sampling:
    """The family's sampling (paper: Qwen3 0.6/0.95/20), n and token budget from the task file.

    A non-reasoning family (the demo) keeps its own short budget: it writes no reasoning.
    """
    budget = task.max_new_tokens if family.reasoning else min(task.max_new_tokens, family.sampling.max_new_tokens)
    return family.sampling.replace(n=args.n or task.n, max_new_tokens=args.max_new_tokens or budget,
                                   temperature=args.temperature, seed=args.seed)


def judge_for(task: TaskSpec, family: Family, args) -> str | None:
    """--guard for harmful-rate tasks, --refusal-guard for refusal tasks; else the task's judge,
    except for a family whose default guard is the refusal judge (the CPU demo)."""
    if task.is_reasoning:
        return None
    chosen = args.guard if task.kind == "harmful" else args.refusal_guard
    if chosen:
        return chosen
    return REFUSAL_JUDGE if family.default_guard == REFUSAL_JUDGE else task.judge


def parse_data_files(values: list[str], tasks: list[str]) -> dict[str, str]:
    """`--data-file task=PATH` (repeatable); a bare PATH is allowed with a single task."""
    files: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(tasks) != 1:
                raise EvaluateError(f"--data-file {value}: with several tasks write --data-file TASK=PATH")
            name, path = tasks[0], value
        if name not in tasks:
            raise EvaluateError(f"--data-file {value}: {name!r} is not among --tasks ({', '.join(tasks)})")
        if not Path(path).exists():
            raise EvaluateError(f"--data-file {value}: {path} not found")
        files[name] = path
    return files


def model_version(model: EvalModel) -> str | None:
    """sha256 of the run_info.json of the training run a model dir belongs to: results of a run
    trained again (--overwrite) are not the new model's results. None for a hub or base model."""
    directory = model.adapter or (Path(model.source) if Path(model.source).is_dir() else None)
    run_info = directory.resolve().parent / RUN_INFO if directory is not None else None
    return sha256_of_files([run_info]) if run_info is not None and run_info.exists() else None


def result_settings(job: Job, model: EvalModel, data: str, data_file: str | None, args) -> dict:
    """Everything that decides a task's metrics; stored in metrics.json and compared on reruns."""
    return {"model": model.source, "adapter": str(model.adapter) if model.adapter else None,
            "model_version": model_version(model), "sampling": job.sampling.to_dict(), "limit": args.limit,
            "data": data, "data_file": data_file, "judge": job.judge,
            "reasoning_backend": "skythought" if job.via_skythought else "builtin"}


def validate_judges(jobs: list[Job]) -> None:
    """Every guard a task will load, checked now: not after all generation is done."""
    from thinksafe.guards import validate_guard_name

    for judge in sorted({job.judge for job in jobs if job.judge}):
        validate_guard_name(judge)


def plan_jobs(args, model: EvalModel, backend: str) -> list[Job]:
    names = expand_tasks(args.tasks)
    data_files = parse_data_files(args.data_file or [], names)
    data = args.data if args.data != "auto" else ("bundled" if model.family.name == "demo" else "hub")
    paths = paths_for_name(model.run_name)
    jobs = []
    for name in names:  # load every task's data before any model: a gated dataset fails fast
        task = get_task(name)
        job = Job(task, [], {}, task_sampling(task, model.family, args), paths.task_dir(name),
                  judge_for(task, model.family, args))
        job.via_skythought = wants_skythought(job, backend, args.reasoning_backend)
        job.settings = result_settings(job, model, data, data_files.get(name), args)
        if not job.via_skythought:  # SkyThought loads its own data
            job.items, choice = load_items(task, data, data_files.get(name), args.limit, seed=args.seed)
            job.data = {"source": choice.source, "location": choice.location, "rows_total": choice.total,
                        "rows_used": len(job.items), "limit": args.limit}
        jobs.append(job)
    validate_judges(jobs)
    return jobs


# --- generation (resumable) -----------------------------------------------------------------


def sampling_signature(sampling: Sampling) -> dict:
    return {k: getattr(sampling, k) for k in SAMPLING_KEYS}


def open_generation_log(task_dir: Path) -> ResumableLog:
    """The partial log; a finished generations.jsonl seeds it (re-scoring without regenerating)."""
    partial = task_dir / PARTIAL
    if not partial.exists() and (task_dir / GENERATIONS).exists():
        raw = ("id", "sample", "prompt", "response", "finished", "num_tokens", "sampling")
        atomic_write_jsonl(partial, ({k: r.get(k) for k in raw} for r in read_jsonl(task_dir / GENERATIONS)))
    return ResumableLog(partial, key=lambda r: f"{r['id']}#{r['sample']}")


def generate_job(generator, job: Job, chunk_size: int) -> None:
    log = open_generation_log(job.task_dir)
    signature = sampling_signature(job.sampling)
    stale = [r for r in log.rows if r.get("sampling") != signature]
    if stale:
        raise EvaluateError(
            f"{job.task_dir / PARTIAL} was generated with other sampling ({stale[0].get('sampling')} vs {signature}): "
            "pass --overwrite to start this task again"
        )
    job.resumed_rows = len(log.rows)
    have = Counter(r["id"] for r in log.rows)
    pending = [item for item in job.items if have[item.id] < job.sampling.n]
    if not pending:
        return
    logger.info("%s: generating %d prompts x %d samples (%d rows resumed)", job.task.name, len(pending),
                job.sampling.n, job.resumed_rows)
    total = sum(job.sampling.n - have[item.id] for item in pending)
    with Progress(f"{job.task.name}: generate", total, "samples") as progress:
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start : start + chunk_size]
            for missing, group in _group_by_missing(chunk, have, job.sampling.n).items():
                outputs = generator.chat([item.prompt for item in group], job.sampling.replace(n=missing),
                                         enable_thinking=True, progress=progress)
                log.append(
                    {"id": item.id, "sample": have[item.id] + j, "prompt": item.prompt, "response": c.text,
                     "finished": c.finished, "num_tokens": c.num_tokens, "sampling": signature}
                    for item, completions in zip(group, outputs) for j, c in enumerate(completions)
                )


def _group_by_missing(items: list[EvalItem], have: Counter, n: int) -> dict[int, list[EvalItem]]:
    groups: dict[int, list[EvalItem]] = {}
    for item in items:
        groups.setdefault(n - have[item.id], []).append(item)
    return groups


def generated_rows(job: Job) -> list[dict]:
    """This task's rows in item order, samples 0..n-1 (extra samples from a larger earlier n are ignored)."""
    by_key = {(r["id"], r["sample"]): r for r in read_jsonl(job.task_dir / PARTIAL, tolerate_torn_tail=True)}
    rows = []
    for item in job.items:
        for sample in range(job.sampling.n):
            row = by_key.get((item.id, sample))
            if row is None:
                raise EvaluateError(f"{job.task.name}: sample {sample} of {item.id} is missing; rerun to resume")
            rows.append(dict(row))
    return rows


# --- scoring --------------------------------------------------------------------------------


def score_reasoning(job: Job, rows: list[dict], family: Family) -> dict:
    gold = {item.id: item.answer for item in job.items}
    correct_by_item: dict[str, list[bool]] = {}
    for row in rows:
        check = check_answer(job.task.answer_format, row["response"], gold[row["id"]], family)
        row.update(answer=gold[row["id"]], extracted=check.extracted, correct=check.correct, reason=check.reason)
        correct_by_item.setdefault(row["id"], []).append(check.correct)
    return reasoning_metrics(rows, correct_by_item)


def reasoning_metrics(rows: list[dict], correct_by_item: dict[str, list[bool]]) -> dict:
    samples = rate(r["correct"] for r in rows)
    primary = {"value": mean_pass_at_1(correct_by_item), "k": samples.k, "n": samples.n, "ci95": samples.ci95}
    reasons = Counter(r.get("reason", "") for r in rows)
    return {"metric": "pass@1", **primary, "n_items": len(correct_by_item),
            "secondary": {"unfinished": rate(not r.get("finished", True) for r in rows).to_dict()},
            "reasons": dict(reasons)}


def score_safety(job: Job, rows: list[dict], family: Family, guard) -> dict:
    from thinksafe.guards import is_refusal

    labels = {item.id: item.label for item in job.items}
    questions = {item.id: item.question for item in job.items}
    texts = [judged_text(r["response"], family, job.task.judge_input) for r in rows]
    verdicts = guard.judge([questions[r["id"]] for r in rows], texts)
    phrases = [is_refusal(judged_text(r["response"], family, "final")) for r in rows]
    for row, verdict, phrase in zip(rows, verdicts, phrases):
        row.update(judge=verdict.to_dict(), refusal_phrase=phrase)
        if labels[row["id"]] is not None:
            row["label"] = labels[row["id"]]
    row_labels = [labels[r["id"]] for r in rows]
    name, primary, secondary = safety_metrics(job.task.kind, verdicts, row_labels, phrases, guard.name)
    return {"metric": name, **primary.to_dict(), "n_items": len(job.items),
            "secondary": {k: v.to_dict() for k, v in secondary.items()}}


def generation_work(jobs: list[Job]) -> int:
    """An upper bound on the tokens left to generate: items x samples x token budget."""
    return sum(len(j.items) * j.sampling.n * j.sampling.max_new_tokens for j in jobs)


def write_results(job: Job, model: EvalModel, result: dict, judge: dict | None, backend) -> dict:
    metrics = {
        "task": job.task.name,
        "run_name": model.run_name,
        "model": model.describe(),
        **result,
        "higher_is_better": job.task.higher_is_better,
        "samples_per_item": job.sampling.n,
        "sampling": job.sampling.to_dict(),
        "judge": judge,
        "data": job.data,
        **({"backend": "skythought"} if job.via_skythought else backend.to_dict()),
        "wall_time_s": round(job.seconds, 1),
        "resumed_rows": job.resumed_rows,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": job.settings,
    }
    atomic_write_jsonl(job.task_dir / GENERATIONS, job.rows)
    (job.task_dir / SETTINGS).unlink(missing_ok=True)
    atomic_write_json(job.task_dir / METRICS, metrics)  # last: its presence means the task finished
    (job.task_dir / PARTIAL).unlink(missing_ok=True)
    if job.task_dir != job.final_dir:
        swap_in(job.task_dir, job.final_dir)
        job.task_dir = job.final_dir
    return metrics


# --- reusing finished results ---------------------------------------------------------------


def settings_differences(old: dict | None, new: dict) -> str:
    """What differs between two settings dicts, flattened one level (sampling.n 1 -> 2), for one line."""
    if old is None:
        return "no recorded settings"

    def flat(settings: dict) -> dict:
        out = {}
        for key, value in settings.items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    before, after = flat(old), flat(new)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in changed)


def cached_differences(job: Job) -> str | None:
    """None when the task's metrics.json is reusable as asked; else why it is not."""
    path = job.final_dir / METRICS
    if not path.exists():
        return "has no results yet"
    try:
        metrics = read_json(path)
    except ThinksafeError:
        return f"{path} is unreadable"
    differences = settings_differences(metrics.get("settings"), job.settings)
    return f"{path} has other settings ({differences})" if differences else None


def recompute_dir(final_dir: Path) -> Path:
    """results/<run>/.<task>.recompute: a replacement generated beside finished results."""
    return final_dir.with_name(f".{final_dir.name}.recompute")


def stage_recompute(job: Job) -> None:
    """Evaluate into a staging dir beside the finished results, swapped in by write_results. An
    interrupted recompute with the same settings resumes there; one with other settings restarts."""
    staging = recompute_dir(job.final_dir)
    if staging.exists():
        previous = read_json(staging / SETTINGS) if (staging / SETTINGS).exists() else None
        if previous != job.settings:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write_json(staging / SETTINGS, job.settings)
    job.task_dir = staging


def select_todo(jobs: list[Job], overwrite: bool, rescore: bool) -> list[Job]:
    """Skip tasks whose results match the settings asked for; stage a replacement for the others."""
    todo = []
    for job in jobs:
        metrics = job.final_dir / METRICS
        if rescore and metrics.exists():
            todo.append(job)  # re-judge the existing generations in place
            continue
        why = "--overwrite" if overwrite else cached_differences(job)
        if why is None:
            print(f"{job.task.name}: {metrics} exists with the same settings, skipped "
                  "(--overwrite to redo, --rescore to re-judge)")
            continue
        replacing = overwrite or metrics.exists()  # else: an interrupted task, resumed in place
        if replacing and job.final_dir.exists() and any(job.final_dir.iterdir()):
            if not overwrite:
                print(f"{job.task.name}: {why}: recomputing beside it")
            stage_recompute(job)
        job.task_dir.mkdir(parents=True, exist_ok=True)
        todo.append(job)
    return todo


# --- backends -------------------------------------------------------------------------------


def choose_backend(backend: str, work_tokens: int | None = None):
    """The generation backend (a BackendChoice) for about `work_tokens` generated tokens."""
    from thinksafe.generation import pick_backend

    try:
        return pick_backend(backend, work_tokens)
    except (ValueError, RuntimeError) as err:
        raise EvaluateError(str(err)) from None


def merged_source(model: EvalModel) -> str:
    """The merged copy of an adapter, made once (thinksafe.merge) and reused afterwards."""
    from thinksafe.merge import merge_adapter

    assert model.adapter is not None and model.merged_dir is not None
    if (model.merged_dir / MODEL_CONFIG).exists():
        return str(model.merged_dir)
    logger.info("merging %s into %s (once; reused by later evaluations)", model.adapter, model.merged_dir)
    return str(merge_adapter(model.adapter, model.merged_dir, base=model.source))


def make_policy_generator(model: EvalModel, backend: str, args):
    from thinksafe.generation import make_generator

    common = {"device": args.device, "batch_size": args.batch_size,
              "tensor_parallel_size": args.tensor_parallel_size,
              "gpu_memory_utilization": args.gpu_memory_utilization}
    common = {k: v for k, v in common.items() if v is not None}
    if model.adapter is not None and backend.name == "vllm":  # LoRA served directly, no merge
        generator = make_generator(model.source, model.family, backend, enable_lora=True,
                                   max_lora_rank=max(model.lora_rank or 0, 16), **common)
        generator.use_adapter(str(model.adapter))
        return generator
    source = merged_source(model) if model.adapter is not None else model.source
    return make_generator(source, model.family, backend, **common)


def wants_skythought(job: Job, backend: str, choice: str) -> bool:
    if not job.task.is_reasoning or not job.task.skythought or choice == "builtin":
        return False
    if choice == "skythought":
        if not skythought.skythought_available():
            raise EvaluateError("--reasoning-backend skythought: skythought is not installed (pip install skythought)")
        return True
    return backend == "vllm" and skythought.skythought_available()


def run_skythought(job: Job, model: EvalModel, args) -> dict:
    start = time.time()
    source = merged_source(model) if model.adapter is not None else model.source
    from thinksafe.models import resolve_model_path

    result_dir = job.task_dir / "skythought"
    found = skythought.find_result_dir(result_dir, job.task.skythought)
    if found is None:  # SkyThought loads its own data (hub): --limit/--data/--data-file do not apply
        command = skythought.build_command(resolve_model_path(source), job.task.skythought, job.sampling, result_dir,
                                           args.tensor_parallel_size or 1, args.gpu_memory_utilization)
        logger.info("running: %s", " ".join(command))
        skythought.run(command, job.task_dir / "skythought.log")
        found = skythought.find_result_dir(result_dir, job.task.skythought)
        if found is None:
            raise EvaluateError(f"skythought wrote no results.json/summary.json under {result_dir}")
    parsed = skythought.parse_results(found)
    job.rows = parsed.rows
    job.seconds = time.time() - start
    job.data = {"source": "skythought", "location": str(found), "rows_total": len(parsed.correct_by_item),
                "rows_used": len(parsed.correct_by_item), "limit": None}
    result = reasoning_metrics(parsed.rows, parsed.correct_by_item)
    result["skythought"] = {k: parsed.summary.get(k) for k in ("accuracy", "pass_at_k", "avg_completion_tokens")}
    return result


# --- the stage ------------------------------------------------------------------------------


def evaluate(args) -> list[dict]:
    from thinksafe.models import check_model_source, resolve_device

    # Everything checkable without a model, before any result is touched.
    if args.device is not None:
        resolve_device(args.device)
    model = resolve_eval_model(args.model, args.run_name, args.model_type)
    check_model_source(model.source)
    jobs = plan_jobs(args, model, choose_backend(args.backend).name)
    require_writable_dir(paths_for_name(model.run_name).results, "results directory")
    todo = select_todo(jobs, args.overwrite, args.rescore)

    results = []
    for job in [j for j in todo if j.via_skythought]:
        results.append(write_results(job, model, run_skythought(job, model, args), None, None))

    builtin = [j for j in todo if not j.via_skythought]
    backend = choose_backend(args.backend, generation_work(builtin))
    logger.info("run %s: %s (%s family), backend %s (%s)", model.run_name, model.requested, model.family.name,
                backend.name, backend.reason)
    generator = None
    for job in builtin:  # phase 1: generate every task (the policy model alone on the device)
        start = time.time()
        if generator is None:
            generator = make_policy_generator(model, backend, args)
        generate_job(generator, job, args.chunk_size)
        job.seconds += time.time() - start
    del generator
    free_accelerator_memory()

    guards: dict[str, object] = {}
    for job in builtin:  # phase 2: score (guards loaded once each)
        start = time.time()
        job.rows = generated_rows(job)
        judge_info = None
        if job.task.is_reasoning:
            result = score_reasoning(job, job.rows, model.family)
        else:
            guard = guards.get(job.judge) or _load_guard(job.judge, args, len(job.rows) * job.sampling.max_new_tokens)
            guards[job.judge] = guard
            result = score_safety(job, job.rows, model.family, guard)
            judge_info = {"name": guard.name, "label": guard.label,
                          "input": "whole output (reasoning included)" if job.task.judge_input == "whole"
                          else "final answer (after </think>)",
                          "refusal_phrase_judge": "thinksafe.guards.is_refusal on the final answer"}
        job.seconds += time.time() - start
        results.append(write_results(job, model, result, judge_info, backend))
    log_to_wandb(model, results, args.report_to)
    return results


def _load_guard(name: str, args, work_tokens: int):
    from thinksafe.guards import load_guard

    vllm_kwargs = {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {}
    return load_guard(name, device=args.device, backend=args.backend, work_tokens=work_tokens, **vllm_kwargs)


def log_to_wandb(model: EvalModel, results: list[dict], report_to: str) -> None:
    if not results:
        return
    from thinksafe.tracking import log_metrics

    metrics = {}
    for m in results:
        metrics[f"eval/{m['task']}/{m['metric']}"] = m["value"]
        metrics[f"eval/{m['task']}/n"] = m["n"]
        for name, sub in m.get("secondary", {}).items():
            metrics[f"eval/{m['task']}/{name}"] = sub["value"]
    log_metrics(model.run_name, metrics, config={"model": model.describe()}, report_to=report_to)


def format_result(m: dict) -> str:
    value = "n/a" if m["value"] is None else f"{100 * m['value']:.1f}%"
    ci = m.get("ci95")
    interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
    return f"{m['task']}: {m['metric']} = {value}{interval} (n={m['n']}, {m['wall_time_s']:.0f} s)"


def build_parser() -> argparse.ArgumentParser:
    from thinksafe.evaluate.tasks import TASK_GROUPS, list_tasks
    from thinksafe.tracking import REPORT_CHOICES

    p = argparse.ArgumentParser(prog="thinksafe evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="merged model dir, LoRA adapter dir, hub id, model_type/size (qwen/0.6B) or demo")
    p.add_argument("--tasks", required=True,
                   help=f"comma list of: {', '.join(list_tasks())}; or a group: {', '.join(TASK_GROUPS)}")
    p.add_argument("--run-name", default=None,
                   help="results/<run-name>/ (default: the run the model dir belongs to, or <slug>_base)")
    p.add_argument("--model-type", choices=tuple(FAMILIES), default=None,
                   help="the model's family when the name does not say it")
    p.add_argument("--backend", choices=("auto", "vllm", "transformers"), default="auto",
                   help="auto: vLLM when installed with a GPU, else transformers")
    p.add_argument("--reasoning-backend", choices=REASONING_BACKENDS, default="auto",
                   help="auto: SkyThought for reasoning tasks when installed and the backend is vLLM")
    p.add_argument("--data", choices=DATA_SOURCES, default="auto",
                   help="hub (full benchmarks) or bundled (eval/ subsets); auto = bundled for the demo model")
    p.add_argument("--data-file", action="append", default=None, metavar="TASK=PATH",
                   help="a local .jsonl/.json for a task (repeatable); needed for gated sets without access")
    p.add_argument("--limit", type=int, default=None, help="use N items per task, spread evenly over the set")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default: the task file: 8 reasoning, 1 safety)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task file (32768 / 16384)")
    p.add_argument("--temperature", type=float, default=None, help="default: the model family's")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    p.add_argument("--guard", default=None,
                   help="judge of harmful-rate tasks (default: the task's, llama-guard-3; the demo: refusal-judge)")
    p.add_argument("--refusal-guard", default=None,
                   help="judge of refusal tasks: XSTest, held-out harmful (default: wildguard / refusal-judge)")
    p.add_argument("--device", default=None, help="transformers device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="transformers generation batch size")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help=f"prompts per resumable chunk (default {DEFAULT_CHUNK})")
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="vLLM / SkyThought")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM / SkyThought, policy and guard (lower it if the guard does not fit after the policy)")
    p.add_argument("--overwrite", action="store_true", help="delete this run's results for the tasks and redo them")
    p.add_argument("--rescore", action="store_true", help="re-judge existing generations (e.g. with another guard)")
    p.add_argument("--report-to", choices=REPORT_CHOICES, default="auto", help="wandb mode (default auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("limit", "n", "max_new_tokens", "batch_size", "chunk_size", "tensor_parallel_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvaluateError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for metrics in evaluate(args):
        print(format_result(metrics))
    return 0
