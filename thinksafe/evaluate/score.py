"""Scoring a task's generations and writing its results.

Reasoning: each sample's final answer checked against the gold one (thinksafe.evaluate.reasoning),
pass@1 averaged over samples then items; or SkyThought's own results, read back. Safety: a guard's
verdicts -> harmful rate / over-refusal / refusal, with the refusal-phrase judge's rate beside them.
`write_results` writes generations.jsonl and metrics.json (last: its presence means the task finished).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from thinksafe.evaluate import skythought
from thinksafe.evaluate.eval_model import EvalModel, EvaluateError, loadable_source
from thinksafe.evaluate.jobs import METRICS, SETTINGS, Job
from thinksafe.evaluate.metrics import mean_pass_at_1, rate
from thinksafe.evaluate.reasoning import check_answer
from thinksafe.evaluate.responses import GENERATIONS, PARTIAL
from thinksafe.evaluate.safety import judged_text, safety_metrics
from thinksafe.evaluate.tasks import data_set_name, paper_departures, paper_set_name
from thinksafe.guards import is_refusal
from thinksafe.guards import load_guard as load
from thinksafe.io import atomic_write_json, atomic_write_jsonl, read_jsonl, swap_in
from thinksafe.model_loading import resolve_model_path
from thinksafe.registry import Family, paths_for_name
from thinksafe.tracking import log_evaluation

logger = logging.getLogger(__name__)

JUDGE_INPUTS = {"whole": "whole output (reasoning included)", "final": "final answer (after </think>)"}


def score_reasoning(job: Job, rows: list[dict]) -> dict:
    gold = {item.id: item.answer for item in job.items}
    correct_by_item: dict[str, list[bool]] = {}
    for row in rows:
        # SkyThought's rules read the whole response, whatever the family's think format
        check = check_answer(job.task.answer_format, row["response"], gold[row["id"]])
        row.update(answer=gold[row["id"]], extracted=check.extracted, extracted_by=check.rule,
                   correct=check.correct, reason=check.reason)
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


def judge_info(job: Job, guard) -> dict:
    """What metrics.json says about the judge: which one, and what it read."""
    return {"name": guard.name, "label": guard.label, "input": JUDGE_INPUTS[job.task.judge_input],
            "refusal_phrase_judge": "thinksafe.guards.is_refusal on the final answer"}


def load_guard(name: str, args, work_tokens: int):
    vllm_kwargs = {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {}
    return load(name, device=args.device, backend=args.backend, work_tokens=work_tokens,
                data_parallel=getattr(args, "data_parallel", 1), ray_address=getattr(args, "ray_address", None),
                **vllm_kwargs)


def data_set_fields(job: Job, judge: dict | None) -> dict:
    """Which set the number comes from, and for the paper's tasks whether it compares with the
    paper's table (and why not). A task whose file names its sets (HarmBench) also gets
    `<task>_set`, the key a reader of harmbench's metrics.json looks for."""
    task = job.task
    name = job.data.get("set") or data_set_name(task, job.data.get("source", ""))
    fields = {"data_set": name, **({f"{task.name}_set": name} if task.set_names else {})}
    if task.paper:
        departures = paper_departures(task, {**job.data, "set": name}, (judge or {}).get("name"),
                                      job.sampling.max_new_tokens)
        fields["paper_set"] = paper_set_name(task)
        fields["paper_comparable"] = {"comparable": not departures, "departures": departures}
    return fields


def write_results(job: Job, model: EvalModel, result: dict, judge: dict | None, backend) -> dict:
    metrics = {
        "task": job.task.name,
        "run_name": model.run_name,
        "family": model.family.name,
        "is_base": model.is_base,
        "model": model.describe(),
        **result,
        "higher_is_better": job.task.higher_is_better,
        "samples_per_item": job.sampling.n,
        "sampling": job.sampling.to_dict(),
        "judge": judge,
        "data": job.data,
        **data_set_fields(job, judge),
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


def run_skythought(job: Job, model: EvalModel, args) -> dict:
    start = time.time()
    source = loadable_source(model)
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
    job.data = {"source": "skythought", "location": str(found), "set": data_set_name(job.task, "skythought"),
                "rows_total": len(parsed.correct_by_item), "rows_used": len(parsed.correct_by_item), "limit": None}
    result = reasoning_metrics(parsed.rows, parsed.correct_by_item)
    result["skythought"] = {k: parsed.summary.get(k) for k in ("accuracy", "pass_at_k", "avg_completion_tokens")}
    return result


def log_to_wandb(model: EvalModel, results: list[dict], report_to: str) -> None:
    """Each task's metrics (summary and history) and a table of its sampled generations, read back
    from the generations.jsonl each result was written with (the peers log what their users read)."""
    if not results:
        return
    metrics, tables = {}, {}
    for m in results:
        metrics[f"eval/{m['task']}/{m['metric']}"] = m["value"]
        metrics[f"eval/{m['task']}/n"] = m["n"]
        for name, sub in m.get("secondary", {}).items():
            metrics[f"eval/{m['task']}/{name}"] = sub["value"]
        generations = paths_for_name(m["run_name"]).task_dir(m["task"]) / GENERATIONS
        tables[m["task"]] = read_jsonl(generations) if generations.exists() else []
    log_evaluation(model.run_name, metrics, tables, config={"model": model.describe()}, report_to=report_to)
