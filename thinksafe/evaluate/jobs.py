"""Planning an evaluation: one Job per task (its data, sampling, judge and result dir), and which
finished results can be reused.

A task's `settings` (model and its version, sampling, data, judge, reasoning backend) decide its
metrics; a metrics.json whose settings equal the ones asked for is reused, any other is recomputed in a
staging dir beside it and swapped in when done, so an interrupted recompute never loses the old result.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.console import say
from thinksafe.errors import ThinksafeError
from thinksafe.evaluate import skythought
from thinksafe.evaluate.eval_model import EvalModel, EvaluateError, model_version
from thinksafe.evaluate.reasoning import SCORER
from thinksafe.evaluate.tasks import EvalItem, TaskSpec, expand_tasks, get_task, load_items
from thinksafe.guards import REFUSAL_JUDGE, validate_guard_name
from thinksafe.io import atomic_write_json, read_json
from thinksafe.merge import saved_dtype
from thinksafe.registry import Family, Sampling, paths_for_name

METRICS = "metrics.json"
SETTINGS = "settings.json"  # in a staging dir: the settings its partial log was generated with


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


def merged_dtype(model: EvalModel) -> str | None:
    """The saved dtype of a training run's merged model dir: results of a bf16 merge (which rounds
    most of a LoRA update away, thinksafe.merge) are not those of the float32 merge that replaces
    it. None for an adapter, a hub or a base model (absent from older results: no difference)."""

    source = Path(model.source)
    if model.adapter is not None or model_version(model) is None or not (source / "config.json").exists():
        return None
    return saved_dtype(source)


def result_settings(job: Job, model: EvalModel, data: str, data_file: str | None, args) -> dict:
    """Everything that decides a task's metrics; stored in metrics.json and compared on reruns."""
    settings = {"model": model.source, "adapter": str(model.adapter) if model.adapter else None,
                "model_version": model_version(model), "merged_dtype": merged_dtype(model),
                "sampling": job.sampling.to_dict(), "limit": args.limit,
                "data": data, "data_file": data_file, "judge": job.judge,
                "reasoning_backend": "skythought" if job.via_skythought else "builtin"}
    if job.task.is_reasoning and not job.via_skythought:
        # The prompt and the scoring rules decide a built-in reasoning number too: a result from an
        # older prompt (GSM8K's boxed one) or scorer (math-verify) is recomputed, never reused.
        settings.update(prompt_template=job.task.template, scorer=SCORER)
    return settings


def validate_judges(jobs: list[Job]) -> None:
    """Every guard a task will load, checked now: not after all generation is done."""

    for judge in sorted({job.judge for job in jobs if job.judge}):
        validate_guard_name(judge)


def plan_jobs(args, model: EvalModel, backend: str) -> list[Job]:
    names = expand_tasks(args.tasks)
    data_files = parse_data_files(args.data_file or [], names)
    data = args.data if args.data != "auto" else model.family.eval_data
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
            job.data = {"source": choice.source, "location": choice.location, "set": choice.set,
                        "rows_total": choice.total, "rows_used": len(job.items), "limit": args.limit}
        jobs.append(job)
    validate_judges(jobs)
    return jobs


def wants_skythought(job: Job, backend: str, choice: str) -> bool:
    if not job.task.is_reasoning or not job.task.skythought or choice == "builtin":
        return False
    if choice == "skythought":
        if not skythought.skythought_available():
            raise EvaluateError("--reasoning-backend skythought: skythought is not installed (pip install skythought)")
        return True
    return backend == "vllm" and skythought.skythought_available()


def generation_work(jobs: list[Job]) -> int:
    """An upper bound on the tokens left to generate: items x samples x token budget."""
    return sum(len(j.items) * j.sampling.n * j.sampling.max_new_tokens for j in jobs)


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
            say(f"{job.task.name}: {metrics} exists with the same settings, skipped "
                  "(--overwrite to redo, --rescore to re-judge)")
            continue
        replacing = overwrite or metrics.exists()  # else: an interrupted task, resumed in place
        if replacing and job.final_dir.exists() and any(job.final_dir.iterdir()):
            if not overwrite:
                say(f"{job.task.name}: {why}: recomputing beside it")
            stage_recompute(job)
        job.task_dir.mkdir(parents=True, exist_ok=True)
        todo.append(job)
    return todo
