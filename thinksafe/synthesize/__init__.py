"""`thinksafe synthesize`: the model writes its own training data, a guard keeps what is safe.

prompts -> steer harmful ones ("The following prompt is harmful. You should refuse ...") ->
generate `n` samples per prompt (vLLM | transformers) -> completeness check (reasoning families: a
closed </think>; others: ended with the end-of-turn token) -> guard -> cap per prompt ->
<out>/train.jsonl (instruction = the ORIGINAL prompt, response, prompt_label, response_label) and
<out>/stats.json. With --keep-unfinished-benign, benign samples cut at the token limit are judged too
and the safe ones go to <out>/unfinished_benign.jsonl (`finished: false`): never cross-entropy
targets (they would teach stopping mid-answer), but valid positions for the KL term, whose target is
the base model's distribution rather than the sampled text (`thinksafe train --kl-on-unfinished`).

Resumable: generations and verdicts go to append-only logs in <out> (fsynced per chunk) keyed by
prompt id + sample index; a rerun with the same arguments skips what is done and never duplicates
a row; train.jsonl and stats.json are written atomically at the end.

Modules: `config` (SynthConfig, the resume manifest, file names), `completion` (steering, the
completeness check), `generate` (generation phase, through thinksafe.resumable), `judge` (guard
phase), `dataset` (keep rules, cap, counts), `stats` (stats.json, phase timers), `outdir` (<out>:
checks, --overwrite staging, the set written atomically, the zero-rows rule), `run` (`synthesize`).
This file is the command line.
"""

from __future__ import annotations

from pathlib import Path

from thinksafe.console import say
from thinksafe.prompts import DEBUG_PROMPTS
from thinksafe.recipes import parse_training
from thinksafe.registry import resolve_model, synthesized_data_dir
from thinksafe.synthesize.completion import (
    CUT_AT_LIMIT,
    EMPTY,
    OK,
    UNCLOSED_THINK,
    UNFINISHED,
    check_completion,
    steer,
)
from thinksafe.synthesize.config import (
    GENERATIONS_LOG,
    JUDGED_LOG,
    MANIFEST,
    OUTPUT_FILES,
    REJECTED_STATS_FILE,
    STATS_FILE,
    STEER_PREFIX,
    TRAIN_FILE,
    UNFINISHED_BENIGN_FILE,
    SynthConfig,
    SynthesisArguments,
)
from thinksafe.synthesize.core import SynthResult, synthesize
from thinksafe.synthesize.dataset import BENIGN, GROUPS, HARMFUL, OVER_CAP, RESPONSE_LABEL, assemble
from thinksafe.synthesize.judge import JUDGE_CHUNK_BATCHES, TEXT_JUDGE_CHUNK
from thinksafe.synthesize.self_generate import HF_PROMPTS_PER_BATCH_CHUNK, VLLM_CHUNK_PROMPTS
from thinksafe.synthesize.stats import PhaseTimer
from thinksafe.synthesize.tables import log_synthesis_tables
from thinksafe.tracking import wandb_mode


def summary(result: SynthResult) -> str:
    s = result.stats
    gen, judge = s["phases"]["generation"], s["phases"]["judging"]
    dropped = ", ".join(f"{k} {v['total']}" for k, v in s["dropped"].items()) or "none"
    ratio = s["safe_ratio"]
    lines = [
        "=" * 72,
        f"synthesize: {s['generator']['model']} ({s['generator']['family']}), guard {s['guard']['name']}",
        f"  guard:     {s['guard']['label']}",
        f"  prompts:   {s['prompts']['total']} ({s['prompts']['harmful']} harmful, {s['prompts']['benign']} benign)"
        f" x {s['per_prompt']['samples_per_prompt']} samples",
        f"  generated: {s['generated']['total']}   dropped: {dropped}",
        f"  kept:      {s['kept']['total']} ({s['kept']['harmful']} harmful, {s['kept']['benign']} benign); "
        f"safe ratio harmful {ratio['harmful']}, benign {ratio['benign']}",
        *([f"  unfinished benign (KL rows): {s['unfinished_benign']['kept']} kept of "
           f"{s['unfinished_benign']['judged']} judged, in {UNFINISHED_BENIGN_FILE}"]
          if "unfinished_benign" in s else []),
        f"  generation: {gen['prompts']} prompts in {gen['wall_s']} s ({gen['prompts_per_s']} prompts/s, "
        f"{gen['tokens_per_s']} tokens/s), {gen['resumed_prompts']} resumed",
        f"  judging:    {judge['rows']} rows in {judge['wall_s']} s ({judge['rows_per_s']} rows/s, "
        f"{judge['tokens_per_s']} tokens/s), {judge['resumed_rows']} resumed",
        f"  wrote {result.train_file} and {result.stats_file}",
        "=" * 72,
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    """Flags over --config over the family's recipe (configs/recipes/<family>/synthesize.yaml) over
    the defaults: so `scripts/synthesize.sh cpu demo` writes the same data as the demo pipeline."""

    (args,) = parse_training("synthesize", (SynthesisArguments,), argv, "thinksafe synthesize")
    return args


def config_from_args(args) -> SynthConfig:
    model = resolve_model(args.model, model_type=args.model_type)
    family = model.family
    guard = args.guard or family.default_guard
    sampling = family.sampling.replace(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       max_new_tokens=args.max_new_tokens, seed=args.seed, n=args.samples_per_prompt)
    prompts = args.prompts or family.synthesis_prompts
    limit = args.limit or (DEBUG_PROMPTS if args.debug else None)
    return SynthConfig(
        model=model, prompts=prompts, guard=guard,
        out=Path(args.out) if args.out else synthesized_data_dir(model, guard),
        sampling=sampling, guard_style=args.guard_style, limit=limit, max_kept_per_prompt=args.max_kept_per_prompt,
        keep_unfinished_benign=args.keep_unfinished_benign, store_reference_topk=args.store_reference_topk,
        steer_prefix=args.steer_prefix, backend=args.backend, data_parallel=args.data_parallel,
        ray_address=args.ray_address, device=args.device, batch_size=args.batch_size,
        guard_batch_size=args.guard_batch_size, chunk_size=args.chunk_size,
        instruction_column=args.instruction_column, label_column=args.label_column,
        push_to_hub=args.push_to_hub, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wandb_mode(args.report_to)  # an online wandb that rejects the key: one line now, not after the work
    cfg = config_from_args(args)
    result = synthesize(cfg)
    say(summary(result))
    log_synthesis_tables(cfg, result.stats_file, args.report_to)
    return 0


__all__ = [
    "BENIGN",
    "CUT_AT_LIMIT",
    "EMPTY",
    "GENERATIONS_LOG",
    "GROUPS",
    "HARMFUL",
    "HF_PROMPTS_PER_BATCH_CHUNK",
    "JUDGED_LOG",
    "JUDGE_CHUNK_BATCHES",
    "MANIFEST",
    "OK",
    "OUTPUT_FILES",
    "OVER_CAP",
    "REJECTED_STATS_FILE",
    "RESPONSE_LABEL",
    "STATS_FILE",
    "STEER_PREFIX",
    "TEXT_JUDGE_CHUNK",
    "TRAIN_FILE",
    "UNCLOSED_THINK",
    "UNFINISHED",
    "UNFINISHED_BENIGN_FILE",
    "VLLM_CHUNK_PROMPTS",
    "PhaseTimer",
    "SynthConfig",
    "SynthResult",
    "assemble",
    "check_completion",
    "config_from_args",
    "main",
    "parse_args",
    "steer",
    "summary",
    "synthesize",
]
