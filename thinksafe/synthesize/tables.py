"""What synthesis logs to wandb: its statistics and a sample of kept and dropped rows, read back from
the files the stage wrote (train.jsonl; the generation and verdict logs for what was not kept), so a
resumed or skipped synthesis logs the same thing as a fresh one."""

from __future__ import annotations

from pathlib import Path

from thinksafe.io import read_json, read_jsonl
from thinksafe.prompts import load_prompts
from thinksafe.synthesize.config import GENERATIONS_LOG, JUDGED_LOG, TRAIN_FILE
from thinksafe.tracking import log_synthesis


def dropped_rows(out: Path, prompts: dict, kept: list[dict]) -> list[dict]:
    """Every logged sample that is not a training row, with why: its generation status (cut, empty, ...)
    or, judged, the guard's verdict (over a prompt's cap, a safe sample is dropped too)."""
    verdicts = {v["key"]: v for v in read_jsonl(out / JUDGED_LOG, tolerate_torn_tail=True)}
    kept_pairs = {(r["instruction"], r["response"]) for r in kept}
    rows = []
    for gen in read_jsonl(out / GENERATIONS_LOG, tolerate_torn_tail=True):
        prompt = prompts.get(gen["prompt_id"])
        if prompt is None or (prompt.instruction, gen.get("response")) in kept_pairs:
            continue
        verdict = verdicts.get(gen["key"])
        reason = gen["status"] if gen["status"] != "ok" or verdict is None else f"guard: {verdict.get('raw')}"
        rows.append({"instruction": prompt.instruction, "response": gen.get("response"), "prompt_label": prompt.label,
                     "reason": reason})
    return rows


def log_synthesis_tables(cfg, stats_file: Path, report_to: str) -> None:
    out = Path(cfg.out)
    kept = read_jsonl(out / TRAIN_FILE)
    prompts = {p.id: p for p in load_prompts(cfg.prompts, cfg.limit, cfg.instruction_column, cfg.label_column)}
    log_synthesis(out.name, read_json(stats_file), kept, dropped_rows(out, prompts, kept), report_to)
