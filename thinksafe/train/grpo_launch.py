"""GRPO's checks before anything loads, and the launch plan scripts/grpo.sh reads (`thinksafe grpo
--plan GPU_IDS`): single-device mode, or the server mode (policy server, guard server, trainers)
with its ports and context lengths."""

from __future__ import annotations

import re
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.guards import GUARD_SPECS, GUARDS, GuardError, LogprobGuard
from thinksafe.guards.loading import looks_like_model
from thinksafe.guards.specs import spec_for
from thinksafe.recipes import CONFIG_DIR
from thinksafe.registry import FAMILIES
from thinksafe.serving import free_ports
from thinksafe.train.common import TrainConfigError
from thinksafe.train.data import dataset_source

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

SERVER_GPUS = 2  # scripts/grpo.sh: one GPU for the policy server, one for the guard server
MIN_SERVER_MODE_GPUS = SERVER_GPUS + 1
# Llama-Guard-3's template (instructions + 14 categories) around the conversation, with room to spare.
GUARD_TEMPLATE_TOKENS = 2048
SERVER_HOST = "127.0.0.1"



def parse_gpu_ids(value: str) -> list[str]:
    # deferred: imports trl (heavy)
    from thinksafe.plan import parse_devices

    return parse_devices(value, check_visible=True, name="GPU_IDS")


def launch_plan(run, gpu_ids: str) -> dict:
    """Everything scripts/grpo.sh needs, validated: mode, GPU split, ports, server settings."""

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


def print_plan(run) -> int:
    for key, value in launch_plan(run, run.args.plan).items():
        if "\t" in value or "\n" in value:
            raise ThinksafeError(f"{key} contains a tab or newline: {value!r}")
        print(f"{key}\t{value}")
    return 0


def check_model_name(model: str) -> None:
    """A family, family/size, local directory or hub id (org/name); anything else is a typo."""
    if model in FAMILIES or model.partition("/")[0] in FAMILIES or Path(model).exists() or _HUB_ID.fullmatch(model):
        return
    raise TrainConfigError(
        f"model {model!r} is unknown: use a family ({', '.join(FAMILIES)}), family/size (qwen/0.6B), "
        "a hub id (org/name) or a local directory"
    )


def check_guard_name(guard: str) -> None:
    """A registered name or something that looks like a model (its weights are checked when it loads)."""

    if guard not in GUARD_SPECS and not looks_like_model(guard):
        raise GuardError(f"unknown guard {guard!r}; choose one of: {', '.join(GUARD_SPECS)}, a hub id or a model "
                         "directory")


def check_server_guard(guard: str, style: str | None = None) -> None:
    if spec_for(guard, style).kind is not LogprobGuard:
        raise TrainConfigError(f"--guard {guard}: the guard server scores P(safe), so it must be a Llama-Guard model")
