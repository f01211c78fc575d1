"""Pieces SFT and GRPO share: LoRA config, batch split, run directory checks, the tail.

The tail (`finish_run`) saves the final adapter under the registry's run paths, writes
`run_info.json` (the marker of a finished run) and logs the final metrics; `resume_checkpoint`
finds the last checkpoint of an interrupted run.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import atomic_write_json, give_tree_normal_mode, read_json, require_writable_dir, swap_in
from thinksafe.model_loading import CPU_THREADS_RECHECK_S, use_idle_cpu_threads
from thinksafe.registry import (
    DEFAULT_KL_REFERENCE,
    RunConfig,
    RunPaths,
    legacy_run_paths,
    parse_positive_int,
    run_paths,
)

logger = logging.getLogger(__name__)

RUN_INFO = "run_info.json"  # written last: its presence means the run finished
RUN_RECORD = "run_record.json"  # written first: the data hash and settings that decide the run's content
OVERWRITE_SUFFIX = ".overwrite"  # runs/.<name>.overwrite: a replacement trained beside the finished run


class TrainConfigError(ThinksafeError, ValueError):
    """A training option that cannot be used as given."""


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


def place_trainer(config, paths: RunPaths) -> None:
    """Fill what the config cannot know before the run is placed: where it writes and its name (a TRL
    config is a mutable dataclass). The batch split was made from WORLD_SIZE; check it holds."""
    processes = num_processes()
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * processes
    if per_step != config.effective_batch_size:
        raise TrainConfigError(f"the effective batch {config.effective_batch_size} was split for another number "
                               f"of processes than the {processes} running; launch with WORLD_SIZE set")
    config.output_dir, config.run_name = str(paths.checkpoints), paths.name
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


# Settings added to run records after runs were recorded without them, with the value those runs
# used: an older record lacking one is read as having it, so a finished run is neither refused nor
# retrained because the record format grew.
SETTINGS_ADDED_LATER = {"kl_reference": DEFAULT_KL_REFERENCE}


def record_differences(previous: dict | None, record: dict) -> str:
    """'' when the settings match (or the run predates records), else what differs, for one line."""
    if previous is None:
        return ""
    new = record["settings"]
    old = {**{k: v for k, v in SETTINGS_ADDED_LATER.items() if k in new}, **previous.get("settings", {})}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = []
    for key in changed:
        part = f"{key} {_short(old.get(key))} -> {_short(new.get(key))}"
        if key == "dataset_sha256":
            part += f" ({previous.get('dataset')} -> {record.get('dataset')})"
        parts.append(part)
    return "; ".join(parts)


def locate_run(cfg: RunConfig, settings: dict) -> RunPaths:
    """runs/<name> (readable parts + settings hash), or the directory a run with the same settings was
    trained in before names carried the hash: a rerun of it skips or resumes there instead of
    training it again. An old run whose recorded settings differ, or that recorded none, is left alone."""
    paths, legacy = run_paths(cfg), legacy_run_paths(cfg)
    if paths.run_dir.exists() or legacy is None or not legacy.run_dir.is_dir():
        return paths
    previous = read_run_record(legacy.run_dir)
    if previous is None:
        return paths
    recorded = {**SETTINGS_ADDED_LATER, **previous.get("settings", {})}
    same = all(recorded.get(key) == value for key, value in settings.items())
    if same:
        logger.info("%s: trained before run names carried the settings hash; using it", legacy.run_dir)
    return legacy if same else paths


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
    """The last complete checkpoint-N under the run's checkpoints dir, or None.

    transformers writes a checkpoint in place, its trainer_state.json last, and its
    get_last_checkpoint takes the highest number whatever it holds: a run killed while saving left a
    torn checkpoint-N that made every rerun fail. A checkpoint counts once its trainer_state.json
    reads whole; a torn one is passed over (and written again when training reaches it).
    """
    import json
    import re

    if not resume or not paths.checkpoints.is_dir():
        return None
    numbered = sorted(((int(m.group(1)), p) for p in paths.checkpoints.iterdir()
                       if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    for _, checkpoint in numbered:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("%s is incomplete (a run stopped while saving it): resuming from an earlier one", checkpoint)
            continue
        return str(checkpoint)
    return None


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
        give_tree_normal_mode(target)  # safetensors writes 0600: the weights follow the umask like the rest
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


def umask_modes_callback():
    """A TrainerCallback that gives each checkpoint the modes the umask gives (safetensors writes its
    weights 0600): a checkpoint is what a resume, or a colleague, reads next."""
    from transformers import TrainerCallback

    class UmaskModes(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                give_tree_normal_mode(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return UmaskModes()


def idle_cpu_threads_callback():
    """A TrainerCallback that re-reads, between steps, the cores other processes leave idle
    (thinksafe.model_loading.cpu_threads, at most every CPU_THREADS_RECHECK_S): a CPU run that started on a
    busy machine gets its threads back when the other job ends, and the other way round."""
    from transformers import TrainerCallback

    class IdleCpuThreads(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            use_idle_cpu_threads(every_s=CPU_THREADS_RECHECK_S)

    return IdleCpuThreads()
