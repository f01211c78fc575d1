"""One synthesis run: check the inputs, generate, judge, assemble, write the set (or refuse an
empty one), push it if asked."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from thinksafe.console import say
from thinksafe.engines import Generator, check_fits_context
from thinksafe.errors import ThinksafeError
from thinksafe.guards import keep_rule, validate_guard_name
from thinksafe.io import swap_in
from thinksafe.locks import writer_lock
from thinksafe.model_loading import check_model_source, resolve_device
from thinksafe.prompts import load_prompts
from thinksafe.reference_topk import row_key
from thinksafe.synthesize.completion import steer
from thinksafe.synthesize.config import STATS_FILE, TRAIN_FILE, SynthConfig
from thinksafe.synthesize.dataset import assemble
from thinksafe.synthesize.judge import judging_phase
from thinksafe.synthesize.outdir import move_user_files, prepare_out_dir, refuse_empty_set, write_dataset_set
from thinksafe.synthesize.reference import kept_references, read_chunks, write_reference_store
from thinksafe.synthesize.self_generate import generation_phase
from thinksafe.synthesize.stats import PhaseTimer, run_stats


@dataclass
class SynthResult:
    train_file: Path
    stats_file: Path
    stats: dict


def check_inputs(cfg: SynthConfig, generator: Generator | None, guard) -> None:
    """Everything checkable without a model, before anything in --out is touched."""

    if guard is None:
        validate_guard_name(cfg.guard, cfg.guard_style)
    if generator is None:
        check_model_source(cfg.model.source)
    if cfg.device is not None:
        resolve_device(cfg.device)


def synthesize(cfg: SynthConfig, generator: Generator | None = None, guard=None) -> SynthResult:
    """Run (or resume) synthesis. `generator`/`guard` replace the default ones (tests, notebooks)."""
    started = time.perf_counter()
    check_inputs(cfg, generator, guard)
    prompts = load_prompts(cfg.prompts, cfg.limit, cfg.instruction_column, cfg.label_column)
    if generator is None:  # the model's context, before any engine starts (a given generator is the caller's)
        check_fits_context(cfg.model.source, cfg.model.family,
                           [steer(p.instruction, p.harmful, cfg.steer_prefix) for p in prompts],
                           cfg.sampling.max_new_tokens, trust_remote_code=cfg.trust_remote_code)
    with writer_lock(cfg.out, "--out"):  # one writer per data dir, taken before anything in it is touched
        return _synthesize(cfg, prompts, generator, guard, started)


def _synthesize(cfg: SynthConfig, prompts, generator: Generator | None, guard, started: float) -> SynthResult:
    work = prepare_out_dir(cfg)

    generated = generation_phase(cfg, prompts, work, generator)
    judged = judging_phase(cfg, prompts, generated.rows, work, guard)
    say(startup_line(generated.timer, judged.timer))

    prompt_harmful = {(p.instruction, p.label): p.harmful for p in prompts}
    rows, unfinished_rows, counts = assemble(cfg, prompts, generated.rows, judged.verdicts,
                                             keep_rule(judged.guard_name))
    references = None
    if cfg.store_reference_topk:
        kl_rows = [r for r in rows + unfinished_rows if not prompt_harmful[(r["instruction"], r["prompt_label"])]]
        references = kept_references(generated.rows, {p.id: p.instruction for p in prompts if not p.harmful},
                                     read_chunks(work, cfg.store_reference_topk), kl_rows)
        # every benign row should have one; fewer means samples logged without their top-k
        counts["reference_topk"] = {"k": cfg.store_reference_topk, "rows": len(references),
                                    "benign_rows": len({row_key(r["instruction"], r["response"]) for r in kl_rows})}
    stats = run_stats(cfg, counts, generated, judged, started)
    if not rows:
        refuse_empty_set(cfg, work, stats, judged.candidates)
    write_reference_store(work, references, cfg.store_reference_topk, cfg.model.source)
    write_dataset_set(work, rows, unfinished_rows if cfg.keep_unfinished_benign else None, stats)
    if work != cfg.out:
        move_user_files(cfg.out, work)
        swap_in(work, cfg.out)
    train_file = cfg.out / TRAIN_FILE
    if cfg.push_to_hub:
        push_to_hub(train_file, cfg.push_to_hub)
    return SynthResult(train_file, cfg.out / STATS_FILE, stats)


def startup_line(generation: PhaseTimer, judging: PhaseTimer) -> str:
    """Engine start-up apart from the work: on a small job start-up is most of a stage's time."""
    return (f"synthesize: generator start-up {generation.load_s:.1f} s, generation {generation.wall_s:.1f} s; "
            f"guard start-up {judging.load_s:.1f} s, judging {judging.wall_s:.1f} s")


def push_to_hub(train_file: Path, repo: str) -> None:
    from datasets import load_dataset

    try:
        load_dataset("json", data_files=str(train_file), split="train").push_to_hub(repo)
    except Exception as err:  # network/auth errors come in many types: one line naming the repo
        raise ThinksafeError(f"push to the hub repo {repo!r} failed: {str(err).strip().splitlines()[0]}") from None
