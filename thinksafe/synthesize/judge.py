"""Judging phase: the guard judges every complete generation (and, with --keep-unfinished-benign,
every benign one the token limit cut) not yet in judged.partial.jsonl, one fsynced chunk at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from thinksafe.guards import guard_label, load_guard
from thinksafe.io import ResumableLog
from thinksafe.progress import Progress
from thinksafe.prompts import PromptRow
from thinksafe.resumable import sample_key
from thinksafe.synthesize.completion import OK
from thinksafe.synthesize.config import JUDGED_LOG, SynthConfig
from thinksafe.synthesize.dataset import is_unfinished_benign_candidate
from thinksafe.synthesize.stats import PhaseTimer

JUDGE_CHUNK_BATCHES = 4
TEXT_JUDGE_CHUNK = 256


@dataclass
class Judged:
    verdicts: dict[str, dict]  # log key (prompt#sample) -> verdict row
    timer: PhaseTimer
    guard_name: str
    guard_label: str
    candidates: int  # complete generations (judged for train.jsonl)


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def judge_missing(cfg: SynthConfig, candidates: list[tuple[PromptRow, dict]], guard, log: ResumableLog,
                  timer: PhaseTimer) -> None:
    """Judge every generation not yet in the judged log; the guard sees the original prompt."""
    todo = [(p, g) for p, g in candidates if g["key"] not in log.done]
    timer.resumed = len(candidates) - len(todo)
    size = TEXT_JUDGE_CHUNK if guard.text_only else cfg.guard_batch_size * JUDGE_CHUNK_BATCHES
    tokens_before = guard.input_tokens
    start = time.perf_counter()
    with Progress("judge", len(todo), "rows") as progress:
        for chunk in chunks(todo, size):
            verdicts = guard.judge([p.instruction for p, _ in chunk], [g["response"] for _, g in chunk])
            log.append({"key": g["key"], **v.to_dict()} for (_, g), v in zip(chunk, verdicts))
            timer.items += len(chunk)
            progress.update(len(chunk))
    timer.wall_s = time.perf_counter() - start
    timer.tokens = guard.input_tokens - tokens_before


def make_default_guard(cfg: SynthConfig, rows_to_judge: int):
    return load_guard(cfg.guard, device=cfg.device, backend=cfg.backend, style=cfg.guard_style,
                      batch_size=cfg.guard_batch_size, trust_remote_code=cfg.trust_remote_code,
                      work_tokens=rows_to_judge * cfg.sampling.max_new_tokens, data_parallel=cfg.data_parallel,
                      ray_address=cfg.ray_address)


def guard_identity(cfg: SynthConfig, guard) -> tuple[str, str]:
    """(name, label) of the guard that judged; with every verdict resumed no guard was loaded, and
    both come from --guard (the keep rule follows the name)."""
    if guard is not None:
        return guard.name, guard.label

    return cfg.guard, guard_label(cfg.guard, cfg.guard_style)


def judging_phase(cfg: SynthConfig, prompts: list[PromptRow], generations: dict[str, dict], work: Path,
                  guard=None) -> Judged:
    """Resume judging in `work`; the guard is loaded only when a verdict is missing."""
    samples = [(p, generations[sample_key(p.id, s)]) for p in prompts for s in range(cfg.sampling.n)]
    candidates = [(p, g) for p, g in samples if g["status"] == OK]
    to_judge = candidates + [(p, g) for p, g in samples if is_unfinished_benign_candidate(cfg, p, g)]
    timer = PhaseTimer("judging")
    log = ResumableLog(work / JUDGED_LOG, key=lambda r: r["key"])
    missing = sum(g["key"] not in log.done for _, g in to_judge)
    if missing:
        load_start = time.perf_counter()
        guard = guard or make_default_guard(cfg, missing)
        timer.load_s = time.perf_counter() - load_start
        judge_missing(cfg, to_judge, guard, log, timer)
    else:
        timer.resumed = len(to_judge)
    guard_name, guard_label = guard_identity(cfg, guard)
    return Judged({r["key"]: r for r in log.rows}, timer, guard_name, guard_label, len(candidates))
