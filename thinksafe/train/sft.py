"""`thinksafe train`: LoRA-SFT on (prompt, safe response) rows with prompt masking and optional KL.

config (dataclasses: defaults, the family's recipe, --config, flags) -> run paths (registry) ->
tokenise (cached) -> model -> KLSFTTrainer -> train (resuming from the last checkpoint) -> save the
adapter. Launch on several GPUs with
`accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m thinksafe train ...`.
"""

from __future__ import annotations

import logging
import os
import time

from thinksafe.console import say
from thinksafe.locks import writer_lock
from thinksafe.model_loading import check_model_source, default_dtype, load_model, load_tokenizer, use_idle_cpu_threads
from thinksafe.progress import trainer_progress_callback
from thinksafe.recipes import parse_training
from thinksafe.registry import TOKEN_WEIGHTING, RunConfig, resolve_model, settings_hash
from thinksafe.train.common import (
    TrainConfigError,
    distributed_state,
    finish_run,
    idle_cpu_threads_callback,
    locate_run,
    place_trainer,
    prepare_run_dir,
    resume_checkpoint,
    summary_metrics,
    umask_modes_callback,
)
from thinksafe.train.config import RunArguments, ThinkSafeModelConfig, ThinkSafeSFTConfig
from thinksafe.train.data import (
    GENERATED_IDS,
    build_train_dataset,
    dataset_source,
    load_reference,
    make_collator,
    read_train_rows,
)
from thinksafe.train.kl import KLSFTTrainer

logger = logging.getLogger(__name__)

PROG = "thinksafe train"

# The settings that decide what a run learns (besides its data); per-device batch size and gradient
# checkpointing only change how it is computed, so a resume on other hardware may change them.
CONTENT_SETTINGS = {
    "model": ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"),
    "sft": ("completion_only_loss", "use_kl", "kl_on_unfinished", "kl_weighting", "kl_reference", "kl_coef",
            "num_train_epochs", "max_steps", "learning_rate", "effective_batch_size", "max_length", "warmup_steps",
            "lr_scheduler_type", "max_grad_norm", "seed"),
}


def parse_args(argv: list[str] | None, typed: dict | None = None) -> tuple[ThinkSafeModelConfig, RunArguments,
                                                                          ThinkSafeSFTConfig]:
    """`typed`: field values already typed (the plan's), laid over the recipes (thinksafe.recipes)."""
    return parse_training("sft", (ThinkSafeModelConfig, RunArguments, ThinkSafeSFTConfig), argv, PROG, typed)


def run_config(model_cfg: ThinkSafeModelConfig, run: RunArguments, sft: ThinkSafeSFTConfig) -> RunConfig:
    """What names the run (registry.run_name): the readable parts, the hash of the rest of the settings,
    or the name a recipe or `--run_name` gives (TRL's field)."""
    spec = resolve_model(model_cfg.model_name_or_path, model_cfg.size, model_type=model_cfg.model_type)
    return RunConfig(model=spec, dataset=run.dataset, prompt_masking=sft.completion_only_loss, rank=model_cfg.lora_r,
                     use_kl=sft.use_kl, epochs=int(sft.num_train_epochs), kl_on_unfinished=sft.kl_on_unfinished,
                     kl_weighting=sft.kl_weighting, kl_reference=sft.kl_reference,
                     max_steps=sft.max_steps if sft.max_steps > 0 else None,
                     settings_hash=settings_hash(identity_settings(model_cfg, sft)), name=sft.run_name or None)


# Settings that only matter with KL: a CE run given another kl_reference learns the same thing.
KL_ONLY_SETTINGS = ("kl_on_unfinished", "kl_weighting", "kl_reference", "kl_coef")


def identity_settings(model_cfg: ThinkSafeModelConfig, sft: ThinkSafeSFTConfig) -> dict:
    """What the run name's hash covers: every content setting, less the KL ones when there is no KL
    (the model and the data are the name's readable parts; the data's content hash is checked against
    run_record.json instead, since self-generated data does not exist yet when the run is planned)."""
    settings = content_settings(model_cfg, sft)
    if not settings["use_kl"]:
        settings = {key: value for key, value in settings.items() if key not in KL_ONLY_SETTINGS}
    if settings.get("kl_coef") == 1.0:
        del settings["kl_coef"]  # the paper's loss: runs named before kl_coef existed keep their hash
    return settings


def content_settings(model_cfg: ThinkSafeModelConfig, sft: ThinkSafeSFTConfig) -> dict:
    """CONTENT_SETTINGS as plain values (TRL turns some into enums after parsing)."""
    values = {key: getattr(model_cfg, key) for key in CONTENT_SETTINGS["model"]}
    values.update({key: getattr(sft, key) for key in CONTENT_SETTINGS["sft"]})
    return {key: getattr(value, "value", value) for key, value in values.items()}


def run_record(model_cfg, run: RunArguments, sft, cfg: RunConfig, paths, data) -> dict:
    """What run_record.json holds: the family, the dataset's content hash and every setting that decides the run."""
    settings = content_settings(model_cfg, sft)
    return {"dataset": run.dataset, "family": cfg.model.family.name, "run_name": paths.name,
            "settings": {"model": cfg.model.source, "dataset_sha256": data.sha256, **settings},
            # how, not what: outside "settings", so a resume on other hardware may differ here
            "kernels": liger_kernels(sft)}


def liger_kernels(sft) -> dict:
    """Which layer kernels this run uses, and whether `--use_liger_kernel` or the default chose them."""
    return {"liger": bool(sft.use_liger_kernel), "chosen_by": getattr(sft, "liger_kernel_chosen_by", "flag")}


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    # Everything that can be checked without a model is checked first: arguments, device, data.
    model_cfg, run, sft = parse_args(argv)
    sft.start_tracking()  # wandb set up (and an online run's key checked) before any work
    if not run.dataset:
        raise TrainConfigError("--dataset is required")
    cfg = run_config(model_cfg, run, sft)
    spec, paths = cfg.model, locate_run(cfg, content_settings(model_cfg, sft))
    check_model_source(spec.source)
    data = read_train_rows(run.dataset, spec, sft.use_kl, kl_on_unfinished=sft.kl_on_unfinished)
    reference = cached_reference(sft, data, run.dataset, spec)
    distributed_state(sft.target_device)  # before anything asks which process is the main one
    with writer_lock(paths.run_dir, "run directory"):  # one writer per run, before anything in it is touched
        return train_run(model_cfg, run, sft, cfg, paths, data, reference, started)


def train_run(model_cfg, run: RunArguments, sft: ThinkSafeSFTConfig, cfg: RunConfig, paths, data, reference,
              started: float) -> int:
    """Train into the run dir `paths`, whose writer lock the caller holds."""

    spec = cfg.model
    work = prepare_run_dir(paths, run.overwrite, run_record(model_cfg, run, sft, cfg, paths, data),
                           run.skip_finished)
    if work is None:
        say(f"{paths.run_dir} already finished with the same data and settings: skipping training")
        return 0
    place_trainer(sft, work)
    tokenizer = load_tokenizer(spec.source)
    reference_drops: dict = {}
    dataset = build_train_dataset(data.rows, tokenizer, spec.family, sft.use_kl, reference=reference,
                                  dropped=reference_drops)
    n_kl = sum(dataset["kl"])
    logger.info("%s: %d rows (%d benign rows on KL), run %s", run.dataset, len(dataset), n_kl, paths.name)
    truncated = rows_over_max_length(dataset, sft.max_length)

    on_one_cpu_process = sft.target_device == "cpu" and os.environ.get("WORLD_SIZE", "1") == "1"
    if on_one_cpu_process:
        use_idle_cpu_threads()  # a busy machine degrades gracefully (thinksafe.model_loading.cpu_threads)
    model = load_model(spec.source, device="cpu", dtype=model_cfg.dtype or default_dtype(sft.target_device))
    trainer = KLSFTTrainer(
        model=model.train(), args=sft, train_dataset=dataset, processing_class=tokenizer,
        data_collator=make_collator(tokenizer.pad_token_id), peft_config=peft_config(model_cfg),
        ref_model=full_finetune_reference(model, model_cfg, sft),
        # Without KL this is plain SFT, token-weighted over the step as in the paper (TRL's own CE).
        weighting=sft.kl_weighting if sft.use_kl else TOKEN_WEIGHTING,
        kl_coef=sft.kl_coef,
        callbacks=[umask_modes_callback(), trainer_progress_callback(),
                   *([idle_cpu_threads_callback()] if on_one_cpu_process else [])],
    )
    checkpoint = resume_checkpoint(work, run.resume)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    counts = {"rows": len(dataset), "kl_rows": n_kl, "truncated_rows": truncated,
              # cached: the KL rows served by the store, how many of them train on the ids the base
              # generated (their text re-tokenises differently), and why any others were dropped
              **({"kl_reference_rows": {"used": n_kl, "on_generated_ids": reference_drops.pop(GENERATED_IDS, 0),
                                        "dropped": reference_drops}} if reference is not None else {})}
    info = run_info(cfg, model_cfg, run, sft, data, paths, counts, checkpoint, trainer.accelerator.num_processes)
    info = finish_run(trainer, tokenizer, work, info, started, full_model=not model_cfg.use_peft, final=paths)
    metrics = summary_metrics(info["log_history"])
    say(f"trained {paths.name} in {info['seconds']:.0f} s: loss {metrics.get('train_loss', float('nan')):.4f}; "
          f"saved {info['saved']}")
    return 0


def cached_reference(sft: ThinkSafeSFTConfig, data, dataset: str, spec):
    """--kl_reference cached: the base model's top-k stored at synthesis (None: the exact forward KL)."""

    if not (sft.use_kl and sft.kl_reference == "cached"):
        return None
    if data.spec.kind != "self":
        raise TrainConfigError("--kl_reference cached needs a self-generated dataset (thinksafe[-<guard>]): "
                               "the base's top-k are stored while it writes the data")
    return load_reference(dataset_source(dataset, spec)[1])


def run_info(cfg: RunConfig, model_cfg, run: RunArguments, sft, data, paths, counts: dict, checkpoint,
             processes: int) -> dict:
    """run_info.json (written last: a finished run) before finish_run adds timings and the log."""
    return {
        "run": paths.name, "family": cfg.model.family.name, "model": cfg.model.source, "dataset": run.dataset,
        "dataset_kind": data.spec.kind, "dataset_sha256": data.sha256, "dropped_unclosed": data.dropped_unclosed,
        "max_length": sft.max_length, **counts, "kl_on_unfinished": cfg.kl_on_unfinished,
        "kl_weighting": cfg.kl_weighting if cfg.use_kl else None,
        "kl_reference": cfg.kl_reference if cfg.use_kl else None, "prompt_masking": cfg.prompt_masking,
        "use_kl": cfg.use_kl, "rank": cfg.rank, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "full_finetune": not model_cfg.use_peft, "resumed_from": checkpoint,
        "effective_batch_size": sft.effective_batch_size, "learning_rate": sft.learning_rate,
        "processes": processes, "per_device_batch_size": sft.per_device_train_batch_size,
        "gradient_accumulation_steps": sft.gradient_accumulation_steps, "kernels": liger_kernels(sft),
        "paths": paths.to_dict(),
    }


def rows_over_max_length(dataset, max_length: int | None) -> int:
    """Rows TRL will cut at max_length (as the paper's trainer did): their end, end-of-turn included,
    is not trained. Counted in run_info.json and said once, never silent."""
    if max_length is None:
        return 0
    over = sum(len(ids) > max_length for ids in dataset["input_ids"])
    if over:
        logger.warning("%d of %d rows are longer than --max-length %d tokens and are cut there (TRL truncates, as "
                       "the paper's trainer did): raise --max-length to train their ends", over, len(dataset),
                       max_length)
    return over


def peft_config(model_cfg: ThinkSafeModelConfig):
    from trl import get_peft_config

    return get_peft_config(model_cfg)  # None when use_peft is false


def full_finetune_reference(model, model_cfg: ThinkSafeModelConfig, sft: ThinkSafeSFTConfig):
    """Full fine-tuning with KL needs a frozen copy of the base; a LoRA run disables its adapter instead."""
    if model_cfg.use_peft or not sft.use_kl:
        return None
    import copy

    return copy.deepcopy(model)


__all__ = ["CONTENT_SETTINGS", "content_settings", "TrainConfigError", "main", "parse_args", "run_config"]
