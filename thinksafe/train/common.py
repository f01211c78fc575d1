"""Pieces SFT and GRPO share: options, recipe defaults, LoRA config, batch split, output checks, the tail.

The tail (`finish_run`) saves the final adapter under the registry's run paths, writes
`run_info.json` (the marker of a finished run) and logs the final metrics; `resume_checkpoint`
finds the last checkpoint of an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import atomic_write_json, read_json, require_writable_dir, swap_in
from thinksafe.registry import RunPaths, check_lora_rank, parse_positive_int
from thinksafe.tracking import REPORT_CHOICES

logger = logging.getLogger(__name__)

RUN_INFO = "run_info.json"  # written last: its presence means the run finished
RUN_RECORD = "run_record.json"  # written first: the data hash and settings that decide the run's content
OVERWRITE_SUFFIX = ".overwrite"  # runs/.<name>.overwrite: a replacement trained beside the finished run


class TrainConfigError(ThinksafeError, ValueError):
    """A training option that cannot be used as given."""


# Integer options checked after parsing (argparse would turn our one-line error into usage + a generic one).
_POSITIVE_INT_OPTIONS: set[str] = set()


def positive_int(name: str):
    """Mark an option as a positive integer; `check_positive_ints` validates it after parsing."""
    _POSITIVE_INT_OPTIONS.add(name)
    return str


def check_positive_ints(args: argparse.Namespace) -> argparse.Namespace:
    """Each marked option that was given -> int, or a one-line ThinksafeError naming it."""
    for option in _POSITIVE_INT_OPTIONS:
        key = option.lstrip("-").replace("-", "_")
        value = getattr(args, key, None)
        if value is not None:
            setattr(args, key, parse_positive_int(value, option))
    return args


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every training stage has. Defaults are None: the recipe fills what a flag leaves unset."""
    parser.add_argument("--model", required=True, help="family (qwen, r1-distill, demo), family/size, hub id or dir")
    parser.add_argument("--size", default=None, help="model size when --model is a family, e.g. 1.7B")
    parser.add_argument("--rank", type=positive_int("--rank"), default=None, help="LoRA rank (alpha = rank/2)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: rank/2, as the paper)")
    parser.add_argument("--lora-dropout", type=float, default=None)
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="LoRA target modules (default: PEFT's defaults for the architecture, as the paper)")
    parser.add_argument("--full-finetune", action="store_true", help="train every weight instead of a LoRA adapter")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--effective-batch-size", type=positive_int("--effective-batch-size"), default=None,
                        help="sequences per optimizer step over all processes")
    parser.add_argument("--per-device-batch-size", type=positive_int("--per-device-batch-size"), default=None)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (smoke runs)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        default=None)
    parser.add_argument("--report-to", choices=REPORT_CHOICES, default="auto",
                        help="wandb when logged in (auto), offline, or none; never prompts")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in the same directory")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start over even when a checkpoint of this run exists")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def with_recipe(args: argparse.Namespace, recipe: dict, defaults: dict) -> argparse.Namespace:
    """Flags win over the recipe, the recipe over built-in defaults (argparse defaults are None)."""
    check_positive_ints(args)
    for key in set(recipe) | set(defaults):
        if getattr(args, key, None) is None:
            setattr(args, key, recipe.get(key, defaults.get(key)))
    return check_ranges(args)


def _number(args: argparse.Namespace, key: str) -> float | None:
    """An option's value as a number (a recipe may hold `1e-5`, which YAML reads as a string)."""
    value = getattr(args, key, None)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TrainConfigError(f"--{key.replace('_', '-')} must be a number, got {value!r}") from None


def check_ranges(args: argparse.Namespace) -> argparse.Namespace:
    """Values argparse accepts but training would reject only after the model loaded."""
    if getattr(args, "rank", None) is not None:
        check_lora_rank(args.rank, "--rank")
    learning_rate, dropout, alpha = (_number(args, k) for k in ("learning_rate", "lora_dropout", "lora_alpha"))
    if learning_rate is not None and not learning_rate > 0:
        raise TrainConfigError(f"--learning-rate must be positive, got {args.learning_rate}")
    if dropout is not None and not 0 <= dropout < 1:
        raise TrainConfigError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if alpha is not None and not alpha > 0:
        raise TrainConfigError(f"--lora-alpha must be positive, got {args.lora_alpha}")
    max_steps = getattr(args, "max_steps", -1)
    if max_steps == 0 or max_steps < -1:
        raise TrainConfigError(f"--max-steps must be a positive integer (or -1: all epochs), got {max_steps}")
    return args


def lora_config(rank: int, alpha: float | None, dropout: float,
                target_modules: list[str] | None = None):
    """PEFT LoRA for a causal LM: alpha = rank/2 and PEFT's default targets unless given (paper)."""
    from peft import LoraConfig

    rank = parse_positive_int(rank, "rank")
    return LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha if alpha is not None else rank / 2,
                      lora_dropout=dropout, target_modules=target_modules or None)


def batch_split(effective: int, per_device: int, num_processes: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) so that per_device·accum·processes == effective."""
    per_device = min(per_device, max(effective // num_processes, 1))
    if effective % (per_device * num_processes):
        raise TrainConfigError(
            f"effective batch {effective} is not divisible by {num_processes} process(es) x per-device batch "
            f"{per_device}; choose --effective-batch-size as a multiple of {per_device * num_processes}"
        )
    return per_device, effective // (per_device * num_processes)


def distributed_state(device: str | None = None):
    """The process group, set up once per process (accelerate's PartialState is a singleton).

    On CPU it must be created with cpu=True: otherwise processes started by torchrun each believe
    they are alone (no gloo group), and every one of them clears and writes the run directory.
    """
    import torch
    from accelerate import PartialState

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return PartialState(cpu=not str(device).startswith("cuda"))


def num_processes() -> int:
    return distributed_state().num_processes


def shared_trainer_kwargs(args, paths: RunPaths, device: str, report_to: list[str]) -> dict:
    """The TrainingArguments fields SFTConfig and GRPOConfig both take, from the shared options."""
    per_device, accumulation = batch_split(args.effective_batch_size, args.per_device_batch_size, num_processes())
    on_gpu = device.startswith("cuda")
    return dict(
        output_dir=str(paths.checkpoints),
        run_name=paths.name,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        max_grad_norm=args.max_grad_norm,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=bool(args.gradient_checkpointing),
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        report_to=report_to,
        dataloader_num_workers=0,
    )


def place_trainer(config, paths: RunPaths) -> None:
    """Fill what the config cannot know before the run is placed: where it writes, its name, and how
    the effective batch splits over this launch's processes (a TRL config is a mutable dataclass)."""
    per_device, accumulation = batch_split(config.effective_batch_size, config.per_device_train_batch_size,
                                           num_processes())
    config.output_dir, config.run_name = str(paths.checkpoints), paths.name
    config.per_device_train_batch_size, config.gradient_accumulation_steps = per_device, accumulation
    config.data_seed = config.seed


def is_finished(paths: RunPaths) -> bool:
    return (paths.run_dir / RUN_INFO).exists()


def overwrite_paths(paths: RunPaths) -> RunPaths:
    """Where --overwrite trains: beside the finished run, swapped in only once it finished."""
    staging = paths.run_dir.with_name(f".{paths.name}{OVERWRITE_SUFFIX}")
    return replace(paths, run_dir=staging, adapter=staging / "adapter", merged=staging / "merged",
                   checkpoints=staging / "checkpoints", logs=staging / "logs")


def read_run_record(run_dir: Path) -> dict | None:
    path = run_dir / RUN_RECORD
    return read_json(path) if path.exists() else None


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else repr(value)


def record_differences(previous: dict | None, record: dict) -> str:
    """'' when the settings match (or the run predates records), else what differs, for one line."""
    if previous is None:
        return ""
    old, new = previous.get("settings", {}), record["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = []
    for key in changed:
        part = f"{key} {_short(old.get(key))} -> {_short(new.get(key))}"
        if key == "dataset_sha256":
            part += f" ({previous.get('dataset')} -> {record.get('dataset')})"
        parts.append(part)
    return "; ".join(parts)


def has_checkpoints(paths: RunPaths) -> bool:
    return paths.checkpoints.is_dir() and any(paths.checkpoints.glob("checkpoint-*"))


def prepare_run_dir(paths: RunPaths, overwrite: bool, record: dict | None = None,
                    skip_finished: bool = False) -> RunPaths | None:
    """Decide where this run trains, before anything is loaded; returns the paths to train into,
    or None when `skip_finished` and the same run already finished.

    A finished run is never deleted up front: --overwrite trains beside it (overwrite_paths) and
    finish_run swaps the new one in last. A run dir whose record (data hash + settings) differs from
    this run's is refused with what differs: resuming it would train on a mix.
    """
    require_writable_dir(paths.run_dir.parent, "run directory")
    record = record or {"settings": {}}
    work = overwrite_paths(paths) if overwrite and paths.run_dir.exists() else paths
    differences = record_differences(read_run_record(paths.run_dir), record)
    if work is paths and is_finished(paths):
        if differences:
            raise TrainConfigError(f"{paths.run_dir} holds a finished run with other data or settings: "
                                   f"{differences}; pass --overwrite to `thinksafe train` to replace it")
        if skip_finished:
            return None
        raise TrainConfigError(f"{paths.run_dir} already holds a finished run; pass --overwrite to replace it")
    if work is paths and differences and has_checkpoints(paths):
        raise TrainConfigError(f"{paths.run_dir} holds an unfinished run with other data or settings: "
                               f"{differences}; pass --overwrite to `thinksafe train` to start over")
    stale = work is not paths and record_differences(read_run_record(work.run_dir), record)
    state = distributed_state()
    state.wait_for_everyone()  # every process decided from the same files before the main one writes
    if state.is_main_process:
        if stale:  # an interrupted --overwrite of other settings: unfinished, not worth keeping
            shutil.rmtree(work.run_dir)
        work.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_json(work.run_dir / RUN_RECORD, record)
    state.wait_for_everyone()
    return work


def resume_checkpoint(paths: RunPaths, resume: bool = True) -> str | None:
    """The last checkpoint-N under the run's checkpoints dir, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    if not resume or not paths.checkpoints.is_dir():
        return None
    return get_last_checkpoint(str(paths.checkpoints))


def finish_run(trainer, tokenizer, paths: RunPaths, info: dict, started: float, full_model: bool = False,
               final: RunPaths | None = None) -> dict:
    """Save the adapter (or the full model, to `merged`) with the tokenizer, write run_info.json, log.

    `paths` is where the run trained; when it is an --overwrite staging dir, `final` (the run's own
    dir) is replaced by it only now, after everything was written.
    """
    final = final or paths
    target = paths.merged if full_model else paths.adapter
    trainer.save_model(str(target))
    saved = final.merged if full_model else final.adapter
    info = {**info, "seconds": round(time.time() - started, 1), "saved": str(saved),
            "log_history": trainer.state.log_history}
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(target))
        atomic_write_json(paths.run_dir / RUN_INFO, info)
        if paths.run_dir != final.run_dir:
            swap_in(paths.run_dir, final.run_dir)
    trainer.accelerator.wait_for_everyone()
    logger.info("saved %s to %s in %.0f s", "model" if full_model else "adapter", saved, info["seconds"])
    return info


def summary_metrics(log_history: list[dict]) -> dict:
    """The last logged value of each train metric (loss, ce_loss, kl_loss, ...)."""
    merged: dict = {}
    for entry in log_history:
        merged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return merged


def existing_path(value: str, what: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise TrainConfigError(f"{what} {value!r} does not exist")
    return path
