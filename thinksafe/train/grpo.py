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
import re
import time
from dataclasses import dataclass
from pathlib import Path

from thinksafe.config import parse_training
from thinksafe.config.train import GRPOArguments, ThinkSafeGRPOConfig, ThinkSafeModelConfig
from thinksafe.errors import ThinksafeError
from thinksafe.registry import FAMILIES, ModelSpec, grpo_run_name, paths_for_name, resolve_model
from thinksafe.train.common import (
    TrainConfigError,
    distributed_state,
    finish_run,
    place_trainer,
    prepare_run_dir,
    resume_checkpoint,
    summary_metrics,
)

logger = logging.getLogger(__name__)

SERVER_GPUS = 2  # scripts/grpo.sh: one GPU for the policy server, one for the guard server
MIN_SERVER_MODE_GPUS = SERVER_GPUS + 1
# Llama-Guard-3's template (instructions + 14 categories) around the conversation, with room to spare.
GUARD_TEMPLATE_TOKENS = 2048
SERVER_HOST = "127.0.0.1"
COST_FILE = "cost.json"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


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


def check_model_name(model: str) -> None:
    """A family, family/size, local directory or hub id (org/name); anything else is a typo."""
    if model in FAMILIES or model.partition("/")[0] in FAMILIES or Path(model).exists() or _HUB_ID.fullmatch(model):
        return
    raise TrainConfigError(
        f"model {model!r} is unknown: use a family ({', '.join(FAMILIES)}), family/size (qwen/0.6B), "
        "a hub id (org/name) or a local directory"
    )


def parse_args(argv: list[str] | None) -> GRPORun:
    """Defaults (thinksafe/config/train.py), the family's configs/recipes/<family>/grpo.yaml, flags."""
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


def check_guard_name(guard: str) -> None:
    """A registered name or something that looks like a model (its weights are checked when it loads)."""
    from thinksafe.guards import GUARD_SPECS, GuardError
    from thinksafe.guards.loading import looks_like_model

    if guard not in GUARD_SPECS and not looks_like_model(guard):
        raise GuardError(f"unknown guard {guard!r}; choose one of: {', '.join(GUARD_SPECS)}, a hub id or a model "
                         "directory")


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
    # Our own fingerprint: Dataset.from_dict hashes the table with dill, which fails on Python 3.12
    # (the GPU image's) for pyarrow's MonthDayNano type, as in train/data.py.
    import hashlib
    import json

    from datasets.table import InMemoryTable

    key = hashlib.sha256(json.dumps(rows["instruction"]).encode()).hexdigest()[:16]
    return Dataset(InMemoryTable.from_pydict(rows), fingerprint=f"thinksafe-grpo-{key}"), dropped


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


def load_reward_guard(args: GRPOArguments, device: str):
    if args.guard_server_url:
        from thinksafe.guards import server_guard

        return server_guard(args.guard_server_url, args.guard)
    from thinksafe.guards import load_guard

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

    from thinksafe.chat import template_opened_think
    from thinksafe.models import check_model_source, default_dtype, load_model, load_tokenizer
    from thinksafe.serving import served_max_model_len
    from thinksafe.train.rewards import FormatReward, GuardReward

    model_cfg, args, config, spec, paths = run.model, run.args, run.config, run.spec, run.paths
    check_model_source(spec.source)
    device = config.target_device
    distributed_state(device)  # before anything asks which process is the main one
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
        reward_funcs=[GuardReward(guard, spec.family, opened), FormatReward(spec.family, opened)],  # equal weights (paper)
        args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=get_peft_config(model_cfg),
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
    print(f"GRPO {paths.name}: {cost['wall_seconds']:.0f} s, reward {metrics.get('reward', float('nan')):.3f}; "
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
    from thinksafe.io import atomic_write_json
    from thinksafe.tracking import log_metrics

    atomic_write_json(paths.run_dir / COST_FILE, cost)
    # the trainer's wandb run (if any) is finished: the cost goes to its own run in the grpo group
    log_metrics(paths.name, {f"cost/{k}": v for k, v in cost.items() if isinstance(v, (int, float))},
                report_to="auto" if "wandb" in report_to else "none", group="grpo")


# --- launch plan for scripts/grpo.sh --------------------------------------------------------


def parse_gpu_ids(value: str) -> list[str]:
    from thinksafe.plan import parse_devices

    return parse_devices(value, check_visible=True, name="GPU_IDS")


def launch_plan(run: GRPORun, gpu_ids: str) -> dict:
    """Everything scripts/grpo.sh needs, validated: mode, GPU split, ports, server settings."""
    from thinksafe.config.parse import CONFIG_DIR
    from thinksafe.guards import GUARDS
    from thinksafe.serving import free_ports
    from thinksafe.train.data import dataset_source

    args, config, spec = run.args, run.config, run.spec
    ids = parse_gpu_ids(gpu_ids)
    dataset_source(args.dataset, spec)  # fails now, not after the servers started, when data is missing
    paths = run.paths
    plan = {"model": spec.source, "model_arg": run.model.model_name_or_path, "dataset": args.dataset,
            "guard": args.guard, "run_name": paths.name, "log_dir": str(paths.logs), "adapter": str(paths.adapter)}
    if len(ids) < MIN_SERVER_MODE_GPUS:
        device = "cpu" if ids == ["cpu"] else "cuda"
        where = "CPU" if device == "cpu" else f"GPU {ids[0]}"
        unused = f" (GPU {ids[1]} unused)" if len(ids) == 2 else ""
        plan.update(mode="single", device=device, visible_devices="" if device == "cpu" else ids[0], message=(
            f"single-device mode on {where}{unused}: generation inside the trainer (or a colocated vLLM with "
            f"--use_vllm --vllm_mode colocate), guard in-process; give at least {MIN_SERVER_MODE_GPUS} GPU ids "
            "for the vLLM server mode"))
        return plan
    check_server_guard(args.guard, args.guard_style)
    policy_port, guard_port, group_port = free_ports(3)
    accelerate_config = CONFIG_DIR / "accelerate" / "multi_gpu.yaml"
    max_len = config.max_prompt_length + config.max_completion_length
    plan.update(
        mode="server", policy_gpu=ids[0], guard_gpu=ids[1], train_gpus=",".join(ids[2:]),
        num_train_processes=str(len(ids) - SERVER_GPUS), server_gpus=str(SERVER_GPUS),
        guard_model=GUARDS.get(args.guard, args.guard),
        policy_port=str(policy_port), guard_port=str(guard_port), group_port=str(group_port),
        policy_url=f"http://{SERVER_HOST}:{policy_port}", guard_url=f"http://{SERVER_HOST}:{guard_port}",
        policy_max_model_len=str(max_len), guard_max_model_len=str(max_len + GUARD_TEMPLATE_TOKENS),
        accelerate_config=str(accelerate_config) if accelerate_config.exists() else "",
        message=(f"server mode: policy server on GPU {ids[0]}, guard server on GPU {ids[1]}, "
                 f"training on GPU(s) {','.join(ids[2:])}"),
    )
    return plan


def print_plan(run: GRPORun) -> int:
    for key, value in launch_plan(run, run.args.plan).items():
        if "\t" in value or "\n" in value:
            raise ThinksafeError(f"{key} contains a tab or newline: {value!r}")
        print(f"{key}\t{value}")
    return 0


__all__ = ["GRPORun", "capped_completion_length", "launch_plan", "main", "parse_args", "prompt_dataset",
           "trainer_prompt"]
