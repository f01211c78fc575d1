"""`thinksafe train`: LoRA-SFT on (prompt, safe response) rows with prompt masking and optional KL.

parse -> recipe defaults -> run paths (registry) -> tokenise (cached) -> model -> KLSFTTrainer -> train
(resuming from the last checkpoint) -> save the adapter. Launch on several GPUs with
`accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m thinksafe train ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from thinksafe.registry import (
    DEFAULT_KL_WEIGHTING,
    KL_WEIGHTINGS,
    TOKEN_WEIGHTING,
    RunConfig,
    parse_bool,
    resolve_model,
    run_paths,
)
from thinksafe.train.common import (
    TrainConfigError,
    add_common_args,
    distributed_state,
    finish_run,
    lora_config,
    positive_int,
    prepare_run_dir,
    resume_checkpoint,
    shared_trainer_kwargs,
    summary_metrics,
    with_recipe,
)

logger = logging.getLogger(__name__)

# The paper's settings (seanie12/ThinkSafe train.py); configs/recipes/<family>.yaml may override.
DEFAULTS = {
    "epochs": 3,
    "rank": 32,
    "lora_dropout": 0.05,
    "learning_rate": 1e-5,
    "effective_batch_size": 8,
    "per_device_batch_size": 1,
    "max_length": 16384,
    "warmup_ratio": 0.1,
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 1.0,
    "gradient_checkpointing": True,
    "seed": 42,
    "logging_steps": 1,
    "kl_on_unfinished": False,
    "kl_weighting": DEFAULT_KL_WEIGHTING,
}


def _flag_bool(name: str):
    return lambda value: parse_bool(value, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinksafe train", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--dataset", required=True,
                        help="thinksafe[-<guard>] (self-generated), a published short name, a hub id, or a JSONL path")
    parser.add_argument("--epochs", type=positive_int("--epochs"), default=None)
    parser.add_argument("--prompt-masking", type=_flag_bool("--prompt-masking"), nargs="?", const=True, default=True,
                        help="loss on the response only (default true; `--prompt-masking false` trains everything)")
    parser.add_argument("--use-kl", type=_flag_bool("--use-kl"), nargs="?", const=True, default=False,
                        help="benign rows: forward KL(base || model) instead of cross-entropy")
    parser.add_argument("--kl-on-unfinished", type=_flag_bool("--kl-on-unfinished"), nargs="?", const=True,
                        default=None,
                        help="with --use-kl: also train KL on benign samples cut at the token limit "
                             "(unfinished_benign.jsonl from synthesize --keep-unfinished-benign); ignored without KL")
    parser.add_argument("--kl-weighting", choices=KL_WEIGHTINGS, default=None,
                        help="with --use-kl: 'row' (default, the paper's objective: the mean over the rows of a step "
                             "of each row's per-token mean, CE or KL) or 'token' (every loss token weighs the same)")
    parser.add_argument("--max-length", type=positive_int("--max-length"), default=None)
    parser.add_argument("--warmup-ratio", type=float, default=None)
    parser.add_argument("--lr-scheduler-type", default=None)
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--logging-steps", type=positive_int("--logging-steps"), default=None)
    parser.add_argument("--skip-finished", action="store_true",
                        help="exit 0 when this run already finished with the same data and settings (pipeline reruns)")
    return parser


def parse_args(argv: list[str] | None):
    from thinksafe.recipes import load_recipe

    args = build_parser().parse_args(argv)
    spec = resolve_model(args.model, args.size)
    with_recipe(args, load_recipe(spec.family.name, "sft"), DEFAULTS)
    return args, spec


def training_arguments(args, paths, device: str, report_to: list[str]):
    from trl import SFTConfig

    return SFTConfig(
        **shared_trainer_kwargs(args, paths, device, report_to),
        max_length=args.max_length,
        save_strategy="epoch",  # one save per epoch; checkpoints are what --resume picks up
        completion_only_loss=bool(args.prompt_masking),
        remove_unused_columns=False,  # keep the per-row `kl` flag for the collator
    )


# The settings that decide what a run learns (besides its data); per-device batch size and gradient
# checkpointing only change how it is computed, so a resume on other hardware may change them.
CONTENT_SETTINGS = ("prompt_masking", "use_kl", "kl_on_unfinished", "kl_weighting", "rank", "lora_alpha", "lora_dropout",
                    "target_modules", "full_finetune", "epochs", "max_steps", "learning_rate",
                    "effective_batch_size", "max_length", "warmup_ratio", "lr_scheduler_type", "max_grad_norm",
                    "seed")


def run_record(args, spec, cfg: RunConfig, data) -> dict:
    """What run_record.json holds: the dataset's content hash and every setting that decides the run."""
    settings = {key: getattr(cfg, key) if hasattr(cfg, key) else getattr(args, key)
                for key in CONTENT_SETTINGS}
    return {"dataset": args.dataset, "settings": {"model": spec.source, "dataset_sha256": data.sha256, **settings}}


def main(argv: list[str] | None = None) -> int:
    from thinksafe.models import (check_model_source, default_dtype, load_model, load_tokenizer, resolve_device,
                                  use_idle_cpu_threads)
    from thinksafe.tracking import configure_wandb
    from thinksafe.train.data import build_train_dataset, make_collator, read_train_rows
    from thinksafe.train.kl import KLSFTTrainer

    started = time.time()
    # Everything that can be checked without a model is checked first: arguments, device, data.
    args, spec = parse_args(argv)
    check_model_source(spec.source)
    device = resolve_device(args.device)
    cfg = RunConfig(model=spec, dataset=args.dataset, prompt_masking=bool(args.prompt_masking),
                    rank=args.rank, use_kl=bool(args.use_kl), epochs=args.epochs,
                    kl_on_unfinished=bool(args.use_kl and args.kl_on_unfinished),
                    kl_weighting=args.kl_weighting if args.use_kl else DEFAULT_KL_WEIGHTING,
                    max_steps=args.max_steps if args.max_steps > 0 else None)
    paths = run_paths(cfg)
    data = read_train_rows(args.dataset, spec, cfg.use_kl, kl_on_unfinished=cfg.kl_on_unfinished)
    distributed_state(device)  # before anything asks which process is the main one
    work = prepare_run_dir(paths, args.overwrite, run_record(args, spec, cfg, data), args.skip_finished)
    if work is None:
        print(f"{paths.run_dir} already finished with the same data and settings: skipping training")
        return 0
    report_to = configure_wandb(args.report_to)
    tokenizer = load_tokenizer(spec.source)
    dataset = build_train_dataset(data.rows, tokenizer, spec.family, cfg.use_kl)
    n_kl = sum(dataset["kl"])
    logger.info("%s: %d rows (%d benign rows on KL), run %s", args.dataset, len(dataset), n_kl, paths.name)

    if device == "cpu" and os.environ.get("WORLD_SIZE", "1") == "1":
        use_idle_cpu_threads()  # a busy machine degrades gracefully (thinksafe.models.cpu_threads)
    model = load_model(spec.source, device="cpu", dtype=default_dtype(device))  # the trainer places it
    peft_config = None if args.full_finetune else lora_config(
        args.rank, args.lora_alpha, args.lora_dropout, args.target_modules)
    ref_model = None
    if args.full_finetune and cfg.use_kl:
        import copy

        ref_model = copy.deepcopy(model)  # full fine-tuning: a frozen reference copy
    training_args = training_arguments(args, work, device, report_to)
    trainer = KLSFTTrainer(
        model=model.train(),
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=make_collator(tokenizer.pad_token_id),
        peft_config=peft_config,
        ref_model=ref_model,
        # Without KL this is plain SFT, token-weighted over the step as in the paper (TRL's own CE).
        weighting=cfg.kl_weighting if cfg.use_kl else TOKEN_WEIGHTING,
    )
    checkpoint = resume_checkpoint(work, args.resume)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    info = {
        "run": paths.name, "model": spec.source, "dataset": args.dataset, "dataset_kind": data.spec.kind,
        "dataset_sha256": data.sha256, "rows": len(dataset), "dropped_unclosed": data.dropped_unclosed,
        "kl_rows": n_kl, "kl_on_unfinished": cfg.kl_on_unfinished,
        "kl_weighting": cfg.kl_weighting if cfg.use_kl else None,
        "prompt_masking": cfg.prompt_masking, "use_kl": cfg.use_kl,
        "rank": cfg.rank, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "full_finetune": args.full_finetune, "resumed_from": checkpoint,
        "effective_batch_size": args.effective_batch_size, "learning_rate": args.learning_rate,
        "processes": trainer.accelerator.num_processes,
        "per_device_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "paths": paths.to_dict(),
    }
    info = finish_run(trainer, tokenizer, work, info, started, full_model=args.full_finetune, final=paths)
    metrics = summary_metrics(info["log_history"])
    print(f"trained {paths.name} in {info['seconds']:.0f} s: loss {metrics.get('train_loss', float('nan')):.4f}; "
          f"saved {info['saved']}")
    return 0


__all__ = ["DEFAULTS", "TrainConfigError", "build_parser", "main", "parse_args", "training_arguments"]
