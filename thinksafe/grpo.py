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

import argparse
import logging
import re
import time
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.registry import (
    FAMILIES,
    GUARDS,
    REFUSAL_JUDGE,
    grpo_run_name,
    parse_bool,
    paths_for_name,
    resolve_model,
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

# This parser's option -> the config field that holds its default (the paper's, written once in
# thinksafe/config/train.py); a family's configs/recipes/<family>/grpo.yaml overrides them by option name.
_DEFAULT_FIELDS = {
    "rank": "lora_r", "lora_dropout": "lora_dropout", "learning_rate": "learning_rate",
    "effective_batch_size": "effective_batch_size", "per_device_batch_size": "per_device_train_batch_size",
    "num_generations": "num_generations", "beta": "beta", "epsilon": "epsilon", "temperature": "temperature",
    "max_prompt_length": "max_prompt_length", "max_completion_length": "max_completion_length",
    "epochs": "num_train_epochs", "warmup_ratio": "warmup_steps", "lr_scheduler_type": "lr_scheduler_type",
    "max_grad_norm": "max_grad_norm", "loss_type": "loss_type", "use_bias_correction_kl": "use_bias_correction_kl",
    "vllm_importance_sampling_correction": "vllm_importance_sampling_correction",
    "gradient_checkpointing": "gradient_checkpointing", "seed": "seed", "logging_steps": "logging_steps",
    "save_steps": "save_steps",
}


def config_defaults() -> dict:
    from dataclasses import fields

    from thinksafe.config.train import ThinkSafeGRPOConfig, ThinkSafeModelConfig

    defaults = {f.name: f.default for cls in (ThinkSafeModelConfig, ThinkSafeGRPOConfig) for f in fields(cls)}
    values = {option: defaults[name] for option, name in _DEFAULT_FIELDS.items()}
    values["epochs"] = int(values["epochs"])
    return values


SERVER_GPUS = 2  # scripts/grpo.sh: one GPU for the policy server, one for the guard server
MIN_SERVER_MODE_GPUS = SERVER_GPUS + 1
# Llama-Guard-3's template (instructions + 14 categories) around the conversation, with room to spare.
GUARD_TEMPLATE_TOKENS = 2048
SERVER_HOST = "127.0.0.1"
COST_FILE = "cost.json"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _flag_bool(name: str):
    return lambda value: parse_bool(value, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinksafe grpo", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--dataset", required=True,
                        help="prompts (`instruction` column): a published short name, hub id, JSON/JSONL path, "
                        "or thinksafe[-<guard>]")
    parser.add_argument("--guard", default=None,
                        help=f"reward guard: {', '.join([*GUARDS, REFUSAL_JUDGE])}, a hub id or dir "
                        "(default: the family's; the server mode needs a Llama-Guard model)")
    parser.add_argument("--guard-style", choices=("llama-guard", "wildguard"), default=None,
                        help="how to use a guard that is not a named one (e.g. a small chat LM in Llama-Guard style)")
    parser.add_argument("--epochs", type=positive_int("--epochs"), default=None)
    parser.add_argument("--num-generations", type=positive_int("--num-generations"), default=None)
    parser.add_argument("--beta", type=float, default=None, help="KL coefficient")
    parser.add_argument("--epsilon", type=float, default=None, help="PPO clip range")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--max-prompt-length", type=positive_int("--max-prompt-length"), default=None,
                        help="longer prompts are dropped (counted in run_info.json), never cut")
    parser.add_argument("--max-completion-length", type=positive_int("--max-completion-length"), default=None)
    parser.add_argument("--loss-type", default=None, help="TRL GRPO loss (grpo, dapo, dr_grpo, bnpo, ...)")
    parser.add_argument("--use-bias-correction-kl", type=_flag_bool("--use-bias-correction-kl"), default=None,
                        help="true|false: TRL's importance-weighted KL (default false: the paper's TRL 0.21 had none)")
    parser.add_argument("--vllm-importance-sampling-correction", default=None,
                        type=_flag_bool("--vllm-importance-sampling-correction"),
                        help="true|false: TRL's correction of vLLM/trainer log-prob mismatch (default false: the "
                             "paper's TRL 0.21 had none)")
    parser.add_argument("--warmup-ratio", type=float, default=None)
    parser.add_argument("--lr-scheduler-type", default=None)
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--logging-steps", type=positive_int("--logging-steps"), default=None)
    parser.add_argument("--save-steps", type=positive_int("--save-steps"), default=None)
    server = parser.add_argument_group("server mode (scripts/grpo.sh)")
    server.add_argument("--vllm-server-url", default=None, help="`trl vllm-serve` base URL for generation")
    server.add_argument("--vllm-group-port", type=int, default=None, help="port of TRL's weight-sync group")
    server.add_argument("--guard-server-url", default=None, help="`vllm serve <guard>` base URL for the reward")
    server.add_argument("--server-gpus", type=int, default=0, help="GPUs held by the servers (for GPU-hours)")
    server.add_argument("--plan", metavar="GPU_IDS", default=None,
                        help="validate, print the launch plan for scripts/grpo.sh and exit")
    return parser


def check_model_name(model: str) -> None:
    """A family, family/size, local directory or hub id (org/name); anything else is a typo."""
    if model in FAMILIES or model.partition("/")[0] in FAMILIES or Path(model).exists() or _HUB_ID.fullmatch(model):
        return
    raise TrainConfigError(
        f"model {model!r} is unknown: use a family ({', '.join(FAMILIES)}), family/size (qwen/0.6B), "
        "a hub id (org/name) or a local directory"
    )


def parse_args(argv: list[str] | None):
    from thinksafe.config import recipe_values

    args = build_parser().parse_args(argv)
    check_model_name(args.model)
    spec = resolve_model(args.model, args.size)
    with_recipe(args, recipe_values(spec.family.name, "grpo"), config_defaults())
    args.guard = args.guard or spec.family.default_guard
    if args.effective_batch_size % args.num_generations:
        raise TrainConfigError(
            f"--effective-batch-size {args.effective_batch_size} must be a multiple of --num-generations "
            f"{args.num_generations} (whole prompt groups per step)"
        )
    if bool(args.vllm_server_url) != bool(args.guard_server_url):
        raise TrainConfigError("the server mode needs both --vllm-server-url and --guard-server-url")
    if args.guard_server_url:
        check_server_guard(args.guard, args.guard_style)
    return args, spec


def check_server_guard(guard: str, style: str | None = None) -> None:
    from thinksafe.guards import LogprobGuard
    from thinksafe.guards.registry import spec_for

    if spec_for(guard, style).kind is not LogprobGuard:
        raise TrainConfigError(f"--guard {guard}: the guard server scores P(safe), so it must be a Llama-Guard model")


# --- prompts --------------------------------------------------------------------------------


def trainer_prompt(instruction: str) -> list[dict]:
    """A conversational prompt: TRL renders it with the chat template and tokenises the text without
    adding special tokens, so the policy sees exactly the template's ids (one BOS), as in synthesis."""
    return [{"role": "user", "content": instruction}]


def template_kwargs(family) -> dict:
    """What TRL passes to the chat template (GRPOConfig.chat_template_kwargs): thinking on, as in synthesis."""
    return {"enable_thinking": family.reasoning}


def load_prompts(dataset: str, spec) -> tuple[list[str], object]:
    """The `instruction` column (or `prompt`) of the dataset, as registry.resolve_dataset names it."""
    from thinksafe.train.data import PROMPT_COLUMNS, DatasetError, dataset_source, read_records

    dataset_spec, source = dataset_source(dataset, spec)
    records = read_records(dataset_spec, source)
    if not records:
        raise DatasetError(f"dataset {dataset} is empty")
    column = next((c for c in PROMPT_COLUMNS if c in records[0]), None)
    if column is None:
        raise DatasetError(f"dataset {dataset} has no {'/'.join(PROMPT_COLUMNS)} column; "
                           f"it has: {', '.join(sorted(records[0]))}")
    return [str(r[column]) for r in records if str(r[column] or "").strip()], dataset_spec


def prompt_dataset(instructions: list[str], tokenizer, family, max_prompt_length: int):
    """datasets.Dataset with `prompt` (one user message) and `instruction`; prompts over the limit dropped."""
    from datasets import Dataset

    from thinksafe.chat import generation_prompt_ids

    rows = {"prompt": [], "instruction": []}
    dropped = 0
    for instruction in instructions:
        if len(generation_prompt_ids(tokenizer, instruction, family)) > max_prompt_length:
            dropped += 1
            continue
        rows["prompt"].append(trainer_prompt(instruction))
        rows["instruction"].append(instruction)
    if not rows["prompt"]:
        raise TrainConfigError(f"every prompt is longer than --max-prompt-length {max_prompt_length} tokens")
    if dropped:
        logger.warning("dropped %d of %d prompts longer than %d tokens", dropped, len(instructions), max_prompt_length)
    return Dataset.from_dict(rows), dropped


def capped_completion_length(requested: int, max_prompt_length: int, server_max_model_len: int | None) -> int:
    """Prompt + completion must fit the policy server's context (the paper's setup could overflow it)."""
    if server_max_model_len is None:
        return requested
    room = server_max_model_len - max_prompt_length
    if room <= 0:
        raise TrainConfigError(f"the policy server's max_model_len {server_max_model_len} leaves no room after "
                               f"--max-prompt-length {max_prompt_length}")
    if room < requested:
        logger.warning("max completion length capped at %d (server max_model_len %d - max prompt %d)",
                       room, server_max_model_len, max_prompt_length)
    return min(requested, room)


# --- trainer --------------------------------------------------------------------------------


def load_reward_guard(args, device: str):
    if args.guard_server_url:
        from thinksafe.guards import server_guard

        return server_guard(args.guard_server_url, args.guard)
    from thinksafe.guards import load_guard

    # transformers next to the policy: a colocated vLLM engine would compete for the same memory
    return load_guard(args.guard, device=device, backend="transformers", style=args.guard_style)


def grpo_config(args, paths, device: str, report_to: list[str], max_completion_length: int, family):
    from trl import GRPOConfig

    server = {}
    if args.vllm_server_url:
        server = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": args.vllm_server_url}
        if args.vllm_group_port:
            server["vllm_group_port"] = args.vllm_group_port
    return GRPOConfig(
        **shared_trainer_kwargs(args, paths, device, report_to),
        num_generations=args.num_generations,
        max_completion_length=max_completion_length,
        temperature=args.temperature,
        beta=args.beta,
        epsilon=args.epsilon,
        loss_type=args.loss_type,
        use_bias_correction_kl=bool(args.use_bias_correction_kl),
        vllm_importance_sampling_correction=bool(args.vllm_importance_sampling_correction),
        save_steps=args.save_steps,
        chat_template_kwargs=template_kwargs(family),
        **server,
    )


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
    args, spec = parse_args(argv)
    if args.plan is not None:
        return print_plan(args, spec)
    from trl import GRPOTrainer

    from thinksafe.chat import template_opened_think
    from thinksafe.io import atomic_write_json
    from thinksafe.models import check_model_source, default_dtype, load_model, load_tokenizer, resolve_device
    from thinksafe.train.rewards import FormatReward, GuardReward
    from thinksafe.serving import served_max_model_len
    from thinksafe.tracking import configure_wandb, log_metrics

    paths = paths_for_name(grpo_run_name(spec, args.dataset, args.rank))
    check_model_source(spec.source)
    device = resolve_device(args.device)
    distributed_state(device)  # before anything asks which process is the main one
    work = prepare_run_dir(paths, args.overwrite)
    report_to = configure_wandb(args.report_to)
    tokenizer = load_tokenizer(spec.source)
    tokenizer.padding_side = "left"  # GRPOTrainer generates from left-padded prompts
    instructions, dataset_spec = load_prompts(args.dataset, spec)
    dataset, dropped = prompt_dataset(instructions, tokenizer, spec.family, args.max_prompt_length)
    server_len = served_max_model_len(args.vllm_server_url) if args.vllm_server_url else None
    max_completion = capped_completion_length(args.max_completion_length, args.max_prompt_length, server_len)
    guard = load_reward_guard(args, device)
    logger.info("%s: %d prompts (%d too long), guard %s, run %s", args.dataset, len(dataset), dropped,
                getattr(guard, "label", args.guard), paths.name)

    opened = template_opened_think(tokenizer, spec.family)  # TRL's completions start after it
    model = load_model(spec.source, device="cpu", dtype=default_dtype(device))  # the trainer places it
    trainer = GRPOTrainer(
        model=model.train(),
        reward_funcs=[GuardReward(guard, spec.family, opened), FormatReward(spec.family, opened)],  # equal weights (paper)
        args=grpo_config(args, work, device, report_to, max_completion, spec.family),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=None if args.full_finetune else lora_config(
            args.rank, args.lora_alpha, args.lora_dropout, args.target_modules),
    )
    checkpoint = resume_checkpoint(work, args.resume)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    cost = cost_record(started, cpu_started, device, trainer.accelerator.num_processes, args.server_gpus)
    info = {
        "run": paths.name, "method": "grpo", "model": spec.source, "dataset": args.dataset,
        "dataset_kind": dataset_spec.kind, "prompts": len(dataset), "prompts_too_long": dropped,
        "guard": args.guard, "guard_label": getattr(guard, "label", args.guard),
        "mode": "servers" if args.vllm_server_url else "single-device", "rank": args.rank,
        "num_generations": args.num_generations, "effective_batch_size": args.effective_batch_size,
        "beta": args.beta, "epsilon": args.epsilon, "temperature": args.temperature,
        "max_prompt_length": args.max_prompt_length, "max_completion_length": max_completion,
        "learning_rate": args.learning_rate, "loss_type": args.loss_type, "resumed_from": checkpoint,
        "use_bias_correction_kl": bool(args.use_bias_correction_kl),
        "vllm_importance_sampling_correction": bool(args.vllm_importance_sampling_correction),
        "cost": cost, "paths": paths.to_dict(),
    }
    info = finish_run(trainer, tokenizer, work, info, started, full_model=args.full_finetune, final=paths)
    if trainer.accelerator.is_main_process:
        atomic_write_json(paths.run_dir / COST_FILE, cost)
        log_metrics(paths.name, {f"cost/{k}": v for k, v in cost.items() if isinstance(v, (int, float))},
                    report_to=args.report_to, group="grpo")
    metrics = summary_metrics(info["log_history"])
    print(f"GRPO {paths.name}: {cost['wall_seconds']:.0f} s, reward {metrics.get('reward', float('nan')):.3f}; "
          f"saved {info['saved']}")
    return 0


# --- launch plan for scripts/grpo.sh --------------------------------------------------------


def parse_gpu_ids(value: str) -> list[str]:
    from thinksafe.plan import parse_devices

    return parse_devices(value, check_visible=True, name="GPU_IDS")


def launch_plan(args, spec, gpu_ids: str) -> dict:
    """Everything scripts/grpo.sh needs, validated: mode, GPU split, ports, server settings."""
    from thinksafe.config.parse import CONFIG_DIR
    from thinksafe.serving import free_ports
    from thinksafe.train.data import dataset_source

    ids = parse_gpu_ids(gpu_ids)
    dataset_source(args.dataset, spec)  # fails now, not after the servers started, when data is missing
    paths = paths_for_name(grpo_run_name(spec, args.dataset, args.rank))
    plan = {"model": spec.source, "model_arg": args.model, "dataset": args.dataset, "guard": args.guard,
            "run_name": paths.name, "log_dir": str(paths.logs), "adapter": str(paths.adapter)}
    if len(ids) < MIN_SERVER_MODE_GPUS:
        device = "cpu" if ids == ["cpu"] else "cuda"
        where = "CPU" if device == "cpu" else f"GPU {ids[0]}"
        unused = f" (GPU {ids[1]} unused)" if len(ids) == 2 else ""
        plan.update(mode="single", device=device, visible_devices="" if device == "cpu" else ids[0], message=(
            f"single-device mode on {where}{unused}: generation inside the trainer, guard in-process; "
            f"give at least {MIN_SERVER_MODE_GPUS} GPU ids for the vLLM server mode"))
        return plan
    check_server_guard(args.guard)
    policy_port, guard_port, group_port = free_ports(3)
    accelerate_config = CONFIG_DIR / "accelerate" / "multi_gpu.yaml"
    plan.update(
        mode="server", policy_gpu=ids[0], guard_gpu=ids[1], train_gpus=",".join(ids[2:]),
        num_train_processes=str(len(ids) - SERVER_GPUS), server_gpus=str(SERVER_GPUS),
        guard_model=GUARDS.get(args.guard, args.guard),
        policy_port=str(policy_port), guard_port=str(guard_port), group_port=str(group_port),
        policy_url=f"http://{SERVER_HOST}:{policy_port}", guard_url=f"http://{SERVER_HOST}:{guard_port}",
        policy_max_model_len=str(args.max_prompt_length + args.max_completion_length),
        guard_max_model_len=str(args.max_prompt_length + args.max_completion_length + GUARD_TEMPLATE_TOKENS),
        accelerate_config=str(accelerate_config) if accelerate_config.exists() else "",
        message=(f"server mode: policy server on GPU {ids[0]}, guard server on GPU {ids[1]}, "
                 f"training on GPU(s) {','.join(ids[2:])}"),
    )
    return plan


def print_plan(args, spec) -> int:
    for key, value in launch_plan(args, spec, args.plan).items():
        if "\t" in value or "\n" in value:
            raise ThinksafeError(f"{key} contains a tab or newline: {value!r}")
        print(f"{key}\t{value}")
    return 0


__all__ = ["config_defaults", "build_parser", "capped_completion_length", "launch_plan", "main", "parse_args",
           "prompt_dataset", "trainer_prompt"]
