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

import argparse
import logging
import time

from thinksafe.evaluate.generate import DEFAULT_CHUNK, generate_job, generated_rows
from thinksafe.evaluate.jobs import Job, generation_work, plan_jobs, select_todo
from thinksafe.evaluate.models import (
    EvalModel,
    EvaluateError,
    choose_backend,
    make_policy_generator,
    resolve_eval_model,
)
from thinksafe.evaluate.score import (
    judge_info,
    load_guard,
    log_to_wandb,
    run_skythought,
    score_reasoning,
    score_safety,
    write_results,
)
from thinksafe.evaluate.tasks import DATA_SOURCES
from thinksafe.io import require_writable_dir
from thinksafe.models import free_accelerator_memory
from thinksafe.registry import FAMILIES, paths_for_name

logger = logging.getLogger(__name__)

REASONING_BACKENDS = ("auto", "builtin", "skythought")


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

    results = [write_results(job, model, run_skythought(job, model, args), None, None)
               for job in todo if job.via_skythought]
    builtin = [job for job in todo if not job.via_skythought]
    backend = choose_backend(args.backend, generation_work(builtin))
    logger.info("run %s: %s (%s family), backend %s (%s)", model.run_name, model.requested, model.family.name,
                backend.name, backend.reason)
    generate_all(builtin, model, backend, args)
    results += score_all(builtin, model, backend, args)
    log_to_wandb(model, results, args.report_to)
    return results


def generate_all(jobs: list[Job], model: EvalModel, backend, args) -> None:
    """Phase 1: every task's generations, the policy model alone on the device (loaded only if needed)."""
    generator = None
    for job in jobs:
        start = time.time()
        if generator is None:
            generator = make_policy_generator(model, backend, args)
        generate_job(generator, job, args.chunk_size)
        job.seconds += time.time() - start
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


def build_parser() -> argparse.ArgumentParser:
    from thinksafe.evaluate.tasks import GROUP_NAMES, list_tasks
    from thinksafe.tracking import REPORT_CHOICES

    p = argparse.ArgumentParser(prog="thinksafe evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="merged model dir, LoRA adapter dir, hub id, model_type/size (qwen/0.6B) or demo")
    p.add_argument("--tasks", required=True,
                   help=f"comma list of: {', '.join(list_tasks())}; or a group: {', '.join(GROUP_NAMES)}")
    p.add_argument("--run-name", default=None,
                   help="results/<run-name>/ (default: the model dir's training run record, or <slug>_base)")
    p.add_argument("--model-type", choices=tuple(FAMILIES), default=None,
                   help="the model's family (default: the training run record, or the registry for a hub id; "
                        "needed for a model dir outside a training run)")
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
