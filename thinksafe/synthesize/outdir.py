"""<out>: checked before anything is written, staged beside it for --overwrite, and given the
finished set (train.jsonl, unfinished_benign.jsonl, stats.json) atomically, or nothing when the
guard kept no row."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import atomic_write_json, atomic_write_jsonl, read_json, require_writable_dir, sha256_of_files
from thinksafe.reference_topk import REFERENCE_TOPK_FILE
from thinksafe.synthesize.config import (
    MANIFEST,
    OUTPUT_FILES,
    REJECTED_STATS_FILE,
    STATS_FILE,
    TRAIN_FILE,
    UNFINISHED_BENIGN_FILE,
    SynthConfig,
)


def overwrite_dir(out: Path) -> Path:
    """Where --overwrite synthesizes: beside <out>, swapped in only once the new set is complete."""
    return out.with_name(f".{out.name}.overwrite")


def manifest_differences(out: Path, manifest: dict) -> list[str]:
    path = out / MANIFEST
    if not path.exists():
        return []
    previous = read_json(path)
    return sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))


def check_out_dir(cfg: SynthConfig) -> None:
    """--out is a writable directory, and its logs come from a run with these arguments (or --overwrite)."""
    require_writable_dir(cfg.out, "--out")
    changed = manifest_differences(cfg.out, cfg.manifest())
    if changed and not cfg.overwrite:
        raise ThinksafeError(
            f"{cfg.out} holds a synthesis run with other {', '.join(changed)}: pass --overwrite to restart "
            "there, or choose another --out"
        )


def prepare_out_dir(cfg: SynthConfig) -> Path:
    """The directory this run writes its logs and set into: <out> itself, or with --overwrite a
    staging dir beside it (nothing in <out> is deleted before the new set is complete)."""
    check_out_dir(cfg)
    work = cfg.out
    if cfg.overwrite and cfg.out.exists() and any(cfg.out.iterdir()):
        work = overwrite_dir(cfg.out)
        if manifest_differences(work, cfg.manifest()):  # an interrupted --overwrite with other arguments
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / MANIFEST, cfg.manifest())
    return work


def move_user_files(old: Path, new: Path) -> None:
    """Files in <out> that synthesis did not write (a pipeline log) follow <out> when it is replaced."""
    for path in old.iterdir():
        if path.name not in OUTPUT_FILES and not (new / path.name).exists():
            os.replace(path, new / path.name)


def write_dataset_set(work: Path, rows: list[dict], unfinished_rows: list[dict] | None, stats: dict) -> None:
    """train.jsonl, unfinished_benign.jsonl and stats.json as one set: stats.json, written last,
    records the sha256 of the two row files it describes."""
    atomic_write_jsonl(work / TRAIN_FILE, rows)
    files = {TRAIN_FILE: sha256_of_files([work / TRAIN_FILE])}
    if unfinished_rows is not None:
        atomic_write_jsonl(work / UNFINISHED_BENIGN_FILE, unfinished_rows)
        files[UNFINISHED_BENIGN_FILE] = sha256_of_files([work / UNFINISHED_BENIGN_FILE])
    else:
        (work / UNFINISHED_BENIGN_FILE).unlink(missing_ok=True)  # never a side file older than train.jsonl
    if (work / REFERENCE_TOPK_FILE).exists():  # written just before, by this run (or removed)
        files[REFERENCE_TOPK_FILE] = sha256_of_files([work / REFERENCE_TOPK_FILE])
    (work / REJECTED_STATS_FILE).unlink(missing_ok=True)
    atomic_write_json(work / STATS_FILE, {**stats, "files_sha256": files})


def refuse_empty_set(cfg: SynthConfig, work: Path, stats: dict, judged: int) -> None:
    """The guard kept nothing: never leave stats.json saying so beside an older train.jsonl.

    An earlier complete set in <out> stays as it was; this attempt's counts go to stats.rejected.json.
    With no earlier set, stats.json (kept 0) is the whole state, and no train.jsonl tells
    train_and_eval.sh that synthesis has not succeeded.
    """
    kept_earlier = (cfg.out / TRAIN_FILE).exists()
    if kept_earlier:
        counts_file = work / REJECTED_STATS_FILE
        outcome = f"{cfg.out / TRAIN_FILE} and its stats.json are unchanged"
    else:
        counts_file = work / STATS_FILE
        (work / UNFINISHED_BENIGN_FILE).unlink(missing_ok=True)
        (work / REFERENCE_TOPK_FILE).unlink(missing_ok=True)
        outcome = "nothing to train on"
    atomic_write_json(counts_file, stats)
    raise ThinksafeError(f"{empty_set_counts(stats, judged)}; {outcome} (counts in {counts_file}; "
                         "try more prompts, --samples-per-prompt or --max-new-tokens)")


def empty_set_counts(stats: dict, judged: int) -> str:
    """Where the generated responses went, so that 'kept 0' never reads as 'nothing was judged': the
    unfinished benign responses judged for KL (--keep-unfinished-benign) are not train rows."""
    generated = stats.get("generated", {}).get("total", judged)
    dropped = {reason: counts.get("total", 0) for reason, counts in stats.get("dropped", {}).items()}
    before = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in dropped.items() if count)
    text = f"the guard kept 0 of the {judged} complete responses it judged ({generated} generated"
    text += f"; dropped: {before})" if before else ")"
    unfinished = stats.get("unfinished_benign")
    if unfinished and unfinished.get("judged"):
        text += (f"; the {unfinished['judged']} unfinished benign responses judged for the KL term "
                 f"({unfinished.get('kept', 0)} kept) are no training rows on their own")
    return text
