"""A task's generations, resumable: rows are appended to generations.partial.jsonl as each chunk
finishes (thinksafe.resumable), and a rerun with the same sampling generates only what is missing."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from thinksafe.console import say
from thinksafe.evaluate.eval_model import EvaluateError
from thinksafe.evaluate.jobs import Job
from thinksafe.io import ResumableLog, atomic_write_jsonl, read_jsonl
from thinksafe.registry import Sampling
from thinksafe.resumable import generate_missing, missing_samples, sample_key

logger = logging.getLogger(__name__)

GENERATIONS = "generations.jsonl"
PARTIAL = "generations.partial.jsonl"
DEFAULT_CHUNK = 32  # prompts per generate call; each finished chunk is appended to the log
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")  # n may grow on resume
RAW_KEYS = ("id", "sample", "prompt", "response", "finished", "num_tokens", "sampling")  # before scoring


def sampling_signature(sampling: Sampling) -> dict:
    return {k: getattr(sampling, k) for k in SAMPLING_KEYS}


def open_generation_log(task_dir: Path) -> ResumableLog:
    """The partial log; a finished generations.jsonl seeds it (re-scoring without regenerating)."""
    partial = task_dir / PARTIAL
    if not partial.exists() and (task_dir / GENERATIONS).exists():
        atomic_write_jsonl(partial, ({k: r.get(k) for k in RAW_KEYS} for r in read_jsonl(task_dir / GENERATIONS)))
    return ResumableLog(partial, key=lambda r: sample_key(r["id"], r["sample"]))


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
    pending = missing_samples(log, (item.id for item in job.items), job.sampling.n)
    if not pending:
        return
    logger.info("%s: generating %d prompts x %d samples (%d rows resumed)", job.task.name, len(pending),
                job.sampling.n, job.resumed_rows)

    def row(item_id: str, sample: int, prompt: str, completion) -> dict:
        return {"id": item_id, "sample": sample, "prompt": prompt, "response": completion.text,
                "finished": completion.finished, "num_tokens": completion.num_tokens, "sampling": signature}

    started = time.perf_counter()
    written = generate_missing(generator, [(item.id, item.prompt) for item in job.items], job.sampling, log, row,
                               chunk_size, f"{job.task.name}: generate")
    # start-up apart from the work: on a small task the engine's start is most of the stage's time
    say(f"{job.task.name}: generation {time.perf_counter() - started:.1f} s for {written} samples; policy engine "
        f"start-up {getattr(generator, 'startup_s', 0.0):.1f} s (once for this model's tasks)")


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
