"""`thinksafe evaluate`: reasoning and safety benchmarks for one model, results in the registry.

    python -m thinksafe evaluate --model <merged dir | adapter dir | hub id | type/size | demo> \\
        --tasks gsm8k,xstest [--run-name NAME] [--backend auto|vllm|transformers] [--n N] [--limit N]

For each task: load its rows (hub, bundled subset or --data-file) -> generate n samples per prompt
(resumable: rows are appended to generations.partial.jsonl as they finish) -> score (SkyThought's answer
rules, or a guard's verdicts) -> results/<run>/<task>/{generations.jsonl, metrics.json}.
All tasks are generated first and judged afterwards, so the policy model and the guard never
share the accelerator. Reasoning tasks go to SkyThought when it is installed and vLLM is used.

Modules: `models` (which model, which run: from the run record or the registry), `jobs` (a plan per
task, reuse of finished results), `generate` (resumable generation), `score` (metrics, results).
"""

from __future__ import annotations

import logging
import time

from thinksafe.console import say
from thinksafe.engines import check_fits_context
from thinksafe.evaluate.config import EvaluationArguments
from thinksafe.evaluate.eval_model import (
    EvalModel,
    choose_backend,
    make_policy_generator,
    resolve_eval_model,
)
from thinksafe.evaluate.jobs import Job, generation_work, plan_jobs, select_todo
from thinksafe.evaluate.responses import generate_job, generated_rows
from thinksafe.evaluate.score import (
    judge_info,
    load_guard,
    log_to_wandb,
    run_skythought,
    score_reasoning,
    score_safety,
    write_results,
)
from thinksafe.io import require_writable_dir
from thinksafe.locks import writer_locks
from thinksafe.model_loading import (
    check_model_source,
    free_accelerator_memory,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from thinksafe.recipes import parse_stage
from thinksafe.registry import paths_for_name
from thinksafe.tracking import wandb_mode

logger = logging.getLogger(__name__)



def evaluate(args) -> list[dict]:
    """The model's tasks, then (--also-model) another model's in the same process: the pipeline's base
    model and trained adapter, one process and the one shared engine for both (thinksafe.shared_engine).
    Each model writes its results where its own evaluation would."""

    # Everything checkable without a model, for every model, before any result is touched.
    wandb_mode(args.report_to)  # an online wandb that rejects the key: one line now, not after the work
    if args.device is not None:
        resolve_device(args.device)
    planned = [plan_model(args, model, run_name) for model, run_name in models_asked(args)]
    # one writer per task's results, taken before any of them is touched (a pipeline's parallel
    # evaluation processes hold different tasks)
    with writer_locks([(job.final_dir, "results directory") for jobs, _ in planned for job in jobs]):
        return [result for jobs, model in planned for result in evaluate_jobs(jobs, model, args)]


def models_asked(args) -> list[tuple[str, str | None]]:
    also = [(args.also_model, args.also_run_name)] if args.also_model else []
    return [(args.model, args.run_name), *also]


def plan_model(args, model_name: str, run_name: str | None) -> tuple[list[Job], EvalModel]:
    model = resolve_eval_model(model_name, run_name, args.model_type)
    check_model_source(model.source)
    jobs = plan_jobs(args, model, choose_backend(args.backend, model).name)
    check_contexts(jobs, model)
    require_writable_dir(paths_for_name(model.run_name).results, "results directory")
    return jobs, model


def evaluate_jobs(jobs: list[Job], model: EvalModel, args) -> list[dict]:
    todo = select_todo(jobs, args.overwrite, args.rescore)

    results = [write_results(job, model, run_skythought(job, model, args), None, None)
               for job in todo if job.via_skythought]
    builtin = [job for job in todo if not job.via_skythought]
    backend = choose_backend(args.backend, model, generation_work(builtin))
    logger.info("run %s: %s (%s family), backend %s (%s)", model.run_name, model.requested, model.family.name,
                backend.name, backend.reason)
    generate_all(builtin, model, backend, args)
    results += score_all(builtin, model, backend, args)
    log_to_wandb(model, results, args.report_to)
    return results


def check_contexts(jobs: list[Job], model: EvalModel) -> None:
    """Each task's token budget plus its longest prompt within the model's context, before any engine."""

    tokenizer = None
    for job in jobs:
        if job.via_skythought or not job.items:
            continue
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_model_path(model.source))
        check_fits_context(model.source, model.family, [item.prompt for item in job.items],
                           job.sampling.max_new_tokens, flag=f"{job.task.name}: --max-new-tokens", tokenizer=tokenizer)


def generate_all(jobs: list[Job], model: EvalModel, backend, args) -> None:
    """Phase 1: every task's generations, the policy model alone on the device (loaded only if needed)."""
    generator = None
    for job in jobs:
        start = time.time()
        if generator is None:
            generator = make_policy_generator(model, backend, args)
        generate_job(generator, job, args.chunk_size)
        job.seconds += time.time() - start
    if generator is not None and hasattr(generator, "close"):
        generator.close()  # the engine stopped now, in order (thinksafe.engines.VLLMGenerator.close)
    del generator
    free_accelerator_memory()


def score_all(jobs: list[Job], model: EvalModel, backend, args) -> list[dict]:
    """Phase 2: score every task, each guard loaded once; write each task's results."""
    guards: dict[str, object] = {}
    results = []
    for job in jobs:
        start = time.time()
        job.rows = generated_rows(job)
        judge = None
        if job.task.is_reasoning:
            result = score_reasoning(job, job.rows)
        else:
            if job.judge not in guards:
                guards[job.judge] = load_guard(job.judge, args, len(job.rows) * job.sampling.max_new_tokens)
            result = score_safety(job, job.rows, model.family, guards[job.judge])
            judge = judge_info(job, guards[job.judge])
        job.seconds += time.time() - start
        results.append(write_results(job, model, result, judge, backend))
    return results


def format_result(m: dict) -> str:
    value = "n/a" if m["value"] is None else f"{100 * m['value']:.1f}%"
    ci = m.get("ci95")
    interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
    comparable = m.get("paper_comparable")
    note = "" if comparable is None or comparable["comparable"] else "; not comparable with the paper's table"
    return (f"{m['task']}: {m['metric']} = {value}{interval} (n={m['n']}, {m['data_set']} set, "
            f"{m['wall_time_s']:.0f} s{note})")


def parse_args(argv: list[str] | None):
    """Flags over --config (a recipe, or the pipeline's run record with its `evaluate` section)."""

    (args,) = parse_stage("evaluate", (EvaluationArguments,), argv, None, "thinksafe evaluate")
    return args


def main(argv: list[str] | None = None) -> int:
    for metrics in evaluate(parse_args(argv)):
        say(format_result(metrics))
    return 0
