"""`thinksafe grpo`: the GRPO baseline on TRL's GRPOTrainer with a guard reward and a format reward.

parse -> recipe defaults -> run paths (registry) -> prompts (chat template, length filter) -> guard
(in-process, or a vLLM server) -> GRPOTrainer (LoRA) -> train (resuming) -> save the adapter, cost.json.

Two modes:
- single device (default; one GPU or CPU): the trainer generates with `model.generate`, the guard
  runs in-process (thinksafe.guards.load_guard).
- servers (scripts/grpo.sh with >= 3 GPUs): `--vllm-server-url` points at `trl vllm-serve` (policy
  generation, weights synced by TRL), `--guard-server-url` at `vllm serve <guard>`; the trainer runs
  under `accelerate launch` on the remaining GPUs.
`--plan GPU_IDS` validates everything and prints the launch plan for scripts/grpo.sh (key<TAB>value).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from thinksafe.chat import template_opened_think
from thinksafe.console import say
from thinksafe.guards import load_guard, server_guard
from thinksafe.io import atomic_write_json
from thinksafe.locks import writer_lock
from thinksafe.model_loading import check_model_source, default_dtype, load_model, load_tokenizer
from thinksafe.progress import trainer_progress_callback
from thinksafe.recipes import parse_training
from thinksafe.registry import ModelSpec, grpo_run_name, paths_for_name, resolve_model
from thinksafe.serving import served_max_model_len
from thinksafe.tracking import log_metrics
from thinksafe.train.common import (
    TrainConfigError,
    distributed_state,
    finish_run,
    place_trainer,
    prepare_run_dir,
    resume_checkpoint,
    summary_metrics,
    umask_modes_callback,
)
from thinksafe.train.config import GRPOArguments, ThinkSafeGRPOConfig, ThinkSafeModelConfig
from thinksafe.train.grpo_data import (  # noqa: F401  (public here: tests and docs import them from grpo)
    capped_completion_length,
    load_prompts,
    prompt_dataset,
    template_kwargs,
    trainer_prompt,
)
from thinksafe.train.grpo_launch import (  # noqa: F401
    check_guard_name,
    check_model_name,
    check_server_guard,
    launch_plan,
    print_plan,
)
from thinksafe.train.rewards import FormatReward, GuardReward

logger = logging.getLogger(__name__)

COST_FILE = "cost.json"


@dataclass
class GRPORun:
    """The parsed run: the model and adapter, the reward and placement, TRL's GRPO config."""

    model: ThinkSafeModelConfig
    args: GRPOArguments
    config: ThinkSafeGRPOConfig
    spec: ModelSpec

    @property
    def paths(self):
        return paths_for_name(grpo_run_name(self.spec, self.args.dataset, self.model.lora_r))


def parse_args(argv: list[str] | None) -> GRPORun:
    """Defaults (thinksafe/train/config.py), the family's configs/recipes/<family>/grpo.yaml, flags."""
    model_cfg, args, config = parse_training("grpo", (ThinkSafeModelConfig, GRPOArguments, ThinkSafeGRPOConfig),
                                             argv, "thinksafe grpo")
    if not args.dataset:
        raise TrainConfigError("--dataset is required")
    check_model_name(model_cfg.model_name_or_path)
    spec = resolve_model(model_cfg.model_name_or_path, model_cfg.size, model_type=model_cfg.model_type)
    args.guard = args.guard or spec.family.default_guard
    check_guard_name(args.guard)
    if bool(config.vllm_server_base_url) != bool(args.guard_server_url):
        raise TrainConfigError("the server mode needs both --vllm-server-url and --guard-server-url")
    if args.guard_server_url:
        check_server_guard(args.guard, args.guard_style)
    config.chat_template_kwargs = template_kwargs(spec.family)
    return GRPORun(model_cfg, args, config, spec)


# --- trainer --------------------------------------------------------------------------------


def load_reward_guard(args: GRPOArguments, device: str):
    if args.guard_server_url:
        return server_guard(args.guard_server_url, args.guard)

    # transformers next to the policy: a colocated vLLM engine would compete for the same memory
    return load_guard(args.guard, device=device, backend="transformers", style=args.guard_style)


def generation_mode(config: ThinkSafeGRPOConfig) -> str:
    if not config.use_vllm:
        return "single-device"
    return "servers" if config.vllm_mode == "server" else f"vllm-{config.vllm_mode}"


def cost_record(started: float, cpu_started: float, device: str, train_processes: int, server_gpus: int) -> dict:
    """Wall time and device-hours, for the cost comparison with ThinkSafe (the paper: ~8x)."""
    wall = time.time() - started
    record = {"wall_seconds": round(wall, 1), "device": device}
    if device.startswith("cuda"):
        gpus = train_processes + server_gpus
        record.update(gpus=gpus, train_gpus=train_processes, server_gpus=server_gpus,
                      gpu_hours=round(wall * gpus / 3600, 4))
    else:
        record.update(cpu_hours=round((time.process_time() - cpu_started) / 3600, 4))
    return record


def main(argv: list[str] | None = None) -> int:
    started, cpu_started = time.time(), time.process_time()
    run = parse_args(argv)
    if run.args.plan is not None:
        return print_plan(run)
    from trl import GRPOTrainer, get_peft_config

    model_cfg, args, config, spec, paths = run.model, run.args, run.config, run.spec, run.paths
    config.start_tracking()  # wandb set up (and an online run's key checked) before any work
    check_model_source(spec.source)
    device = config.target_device
    distributed_state(device)  # before anything asks which process is the main one
    with writer_lock(paths.run_dir, "run directory"):  # one writer per run, before anything in it is touched
        work = prepare_run_dir(paths, args.overwrite)
        place_trainer(config, work)
        tokenizer = load_tokenizer(spec.source)
        tokenizer.padding_side = "left"  # GRPOTrainer generates from left-padded prompts
        instructions, dataset_spec = load_prompts(args.dataset, spec)
        dataset, dropped = prompt_dataset(instructions, tokenizer, spec.family, config.max_prompt_length)
        server_len = served_max_model_len(config.vllm_server_base_url) if config.vllm_server_base_url else None
        config.max_completion_length = capped_completion_length(config.max_completion_length, config.max_prompt_length,
                                                                server_len)
        guard = load_reward_guard(args, device)
        logger.info("%s: %d prompts (%d too long), guard %s, run %s", args.dataset, len(dataset), dropped,
                    getattr(guard, "label", args.guard), paths.name)

        opened = template_opened_think(tokenizer, spec.family)  # TRL's completions start after it
        model = load_model(spec.source, device="cpu", dtype=model_cfg.dtype or default_dtype(device))
        trainer = GRPOTrainer(
            model=model.train(),
            # equal weights (paper)
            reward_funcs=[GuardReward(guard, spec.family, opened), FormatReward(spec.family, opened)],
            args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=get_peft_config(model_cfg),
            callbacks=[umask_modes_callback(), trainer_progress_callback()],
        )
        checkpoint = resume_checkpoint(work, args.resume)
        if checkpoint:
            logger.info("resuming from %s", checkpoint)
        trainer.train(resume_from_checkpoint=checkpoint)
        cost = cost_record(started, cpu_started, device, trainer.accelerator.num_processes, args.server_gpus)
        info = run_info(run, dataset_spec, len(dataset), dropped, guard, checkpoint, cost)
        info = finish_run(trainer, tokenizer, work, info, started, full_model=not model_cfg.use_peft, final=paths)
        if trainer.accelerator.is_main_process:
            write_cost(paths, cost, config.report_to)
        metrics = summary_metrics(info["log_history"])
        say(f"GRPO {paths.name}: {cost['wall_seconds']:.0f} s, reward {metrics.get('reward', float('nan')):.3f}; "
              f"saved {info['saved']}")
        return 0


def run_info(run: GRPORun, dataset_spec, prompts: int, dropped: int, guard, checkpoint, cost: dict) -> dict:
    config, args = run.config, run.args
    return {
        "run": run.paths.name, "method": "grpo", "family": run.spec.family.name, "model": run.spec.source,
        "dataset": args.dataset, "dataset_kind": dataset_spec.kind, "prompts": prompts, "prompts_too_long": dropped,
        "guard": args.guard, "guard_label": getattr(guard, "label", args.guard), "mode": generation_mode(config),
        "rank": run.model.lora_r, "num_generations": config.num_generations,
        "effective_batch_size": config.effective_batch_size, "beta": config.beta, "epsilon": config.epsilon,
        "temperature": config.temperature, "max_prompt_length": config.max_prompt_length,
        "max_completion_length": config.max_completion_length, "learning_rate": config.learning_rate,
        "loss_type": config.loss_type, "resumed_from": checkpoint,
        "use_bias_correction_kl": config.use_bias_correction_kl,
        "vllm_importance_sampling_correction": config.vllm_importance_sampling_correction,
        "cost": cost, "paths": run.paths.to_dict(),
    }


def write_cost(paths, cost: dict, report_to: list[str]) -> None:
    atomic_write_json(paths.run_dir / COST_FILE, cost)
    # the trainer's wandb run (if any) is finished: the cost goes to its own run in the grpo group
    log_metrics(paths.name, {f"cost/{k}": v for k, v in cost.items() if isinstance(v, (int, float))},
                report_to="auto" if "wandb" in report_to else "none", group="grpo")


__all__ = ["GRPORun", "capped_completion_length", "launch_plan", "main", "parse_args", "prompt_dataset",
           "trainer_prompt"]
