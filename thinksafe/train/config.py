"""Training configs: TRL's dataclasses with the paper's values as their defaults.

Each default below is written here and nowhere else (seanie12/ThinkSafe train.py and grpo_train.py
for the values; docs/paper.md for where the original's behaviour differs). Where a TRL field already
has the paper's value (seed 42, max_grad_norm 1.0, lora_dropout 0.05, 3 epochs) it is not repeated.
Aliases keep the scripts' short flags (--rank, --epochs, --prompt-masking) working beside TRL's names.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from trl import GRPOConfig, ModelConfig, SFTConfig

from thinksafe.model_loading import resolve_device
from thinksafe.recipes import ConfigError
from thinksafe.registry import DEFAULT_KL_REFERENCE, DEFAULT_KL_WEIGHTING, MAX_LORA_RANK
from thinksafe.tracking import REPORT_CHOICES, configure_wandb, wandb_installed
from thinksafe.train.common import batch_split


def _alias(*flags: str, help: str = "") -> dict:
    return {"aliases": list(flags), "help": help}


@dataclass
class ThinkSafeModelConfig(ModelConfig):
    """Which model and which adapter (TRL's ModelConfig: --lora_r, --lora_target_modules, ...)."""

    model_name_or_path: str | None = field(default=None, metadata=_alias(
        "--model", help="family (qwen, r1-distill, demo), family/size, hub id or dir"))
    size: str | None = field(default=None, metadata={"help": "model size when --model is a family, e.g. 1.7B"})
    model_type: str | None = field(default=None, metadata={"help": "family of a hub id or dir whose name does not say"})
    dtype: str | None = field(default=None, metadata={"help": "default: bfloat16 on GPU, float32 on CPU"})
    use_peft: bool = field(default=True, metadata={"help": "LoRA (paper); false trains every weight"})
    lora_r: int = field(default=32, metadata=_alias("--rank", help="LoRA rank"))
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: rank/2, as the paper)"})
    # lora_target_modules None: PEFT's defaults for the architecture (q_proj, v_proj for Qwen), as the paper.

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ConfigError("--model is required")
        super().__post_init__()
        if not 1 <= self.lora_r <= MAX_LORA_RANK:
            raise ConfigError(f"--rank must be a positive integer, at most {MAX_LORA_RANK}, got {self.lora_r}")
        if self.lora_alpha is None:
            self.lora_alpha = self.lora_r / 2
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class RunArguments:
    """How a training run is placed and resumed (not what it learns)."""

    dataset: str | None = field(default=None, metadata={
        "help": "thinksafe[-<guard>] (self-generated), a published short name, a hub id, or a JSONL path"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in the same directory"})
    resume: bool = field(default=True, metadata={"help": "resume from this run's last checkpoint"})
    skip_finished: bool = field(default=False, metadata={
        "help": "exit 0 when this run already finished with the same data and settings (pipeline reruns)"})


@dataclass
class _ThinkSafeTrainerMixin:
    """Fields SFT and GRPO share, and the checks that must come before a model loads."""

    effective_batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step over all processes"})
    report_to: str = field(default="auto", metadata={
        "choices": REPORT_CHOICES, "help": "wandb when logged in (auto), offline, or none; never prompts"})
    # not `device`: TrainingArguments.device is the torch device it sets up
    target_device: str | None = field(default=None, metadata=_alias(
        "--device", help="cuda or cpu (default: cuda when available)"))

    def split_batch(self, processes: int) -> None:
        """per-device batch x accumulation x processes = effective batch (TRL's GRPOConfig derives its
        generation batch from these in __post_init__, so they are set before it runs)."""
        self.per_device_train_batch_size, self.gradient_accumulation_steps = batch_split(
            self.effective_batch_size, self.per_device_train_batch_size, processes)

    def check_and_place(self) -> None:
        """Checks, and the values derived from the device and the process count (which TRL's own
        __post_init__ reads next). Reads torch and WORLD_SIZE; changes nothing outside this object:
        the tracker is set up by the stage when it runs (`start_tracking`), not when a config is built."""
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be a positive integer (or -1: all epochs), got {self.max_steps}")
        if self.effective_batch_size < 1:
            raise ConfigError(f"--effective-batch-size must be a positive integer, got {self.effective_batch_size}")
        self.split_batch(int(os.environ.get("WORLD_SIZE", "1")))  # accelerate/torchrun set it per process
        self.target_device = resolve_device(self.target_device)
        on_gpu = self.target_device.startswith("cuda")
        self.bf16, self.use_cpu = on_gpu, not on_gpu
        if isinstance(self.report_to, str) and self.report_to in REPORT_CHOICES:
            # our choice kept for start_tracking; TRL's field says which integration the Trainer may load
            self.tracking = self.report_to
            self.report_to = ["wandb"] if self.report_to != "none" and wandb_installed() else []

    def start_tracking(self) -> None:
        """Where the run logs (wandb online/offline, or nowhere): set up by the stage before the Trainer
        is built, since TRL starts wandb itself and reads WANDB_MODE then. May probe the wandb server."""
        self.report_to = configure_wandb(getattr(self, "tracking", "auto"))


@dataclass
class ThinkSafeSFTConfig(_ThinkSafeTrainerMixin, SFTConfig):
    """LoRA-SFT on (prompt, safe response) rows; benign rows optionally on forward KL to the base."""

    # ThinkSafe's options
    use_kl: bool = field(default=False, metadata={
        "help": "benign rows: forward KL(base || model) instead of cross-entropy"})
    kl_on_unfinished: bool = field(default=False, metadata={
        "help": "with use_kl: also KL on benign samples cut at the token limit (unfinished_benign.jsonl)"})
    kl_weighting: Literal["row", "token"] = field(default=DEFAULT_KL_WEIGHTING, metadata={
        "help": "with use_kl: 'row' (the paper's: mean over rows of each row's per-token mean) or 'token'"})
    kl_coef: float = field(default=1.0, metadata={
        "help": "with use_kl: the KL term's weight against the CE term (the paper's loss: 1; a larger value holds "
                "the benign rows closer to the base model)"})
    kl_reference: Literal["forward", "cached"] = field(default=DEFAULT_KL_REFERENCE, metadata={
        "help": "with use_kl: the base's distribution from a reference forward each step ('forward', exact) or "
                "from the top-k stored at synthesis (`synthesize --store_reference_topk K`; 'cached': no "
                "reference forward, KL over the top-k plus one tail bucket)"})
    # None: chosen in __post_init__ (liger_layers_by_default); a given true/false always wins
    use_liger_kernel: bool | None = field(default=None, metadata={
        "help": "Liger's RMSNorm/SwiGLU/RoPE kernels under thinksafe's own loss head (default: on with a CUDA "
                "device and liger-kernel installed, off otherwise; the same loss, faster: docs/train.md)"})
    # The paper's values where TRL's differ
    completion_only_loss: bool = field(default=True, metadata=_alias(
        "--prompt-masking", "--prompt_masking", help="loss on the response only (paper: true)"))
    num_train_epochs: float = field(default=3.0, metadata=_alias("--epochs"))
    learning_rate: float = 1e-5
    per_device_train_batch_size: int = field(default=1, metadata=_alias("--per-device-batch-size"))
    max_length: int | None = 16384
    warmup_steps: float = field(default=0.1, metadata=_alias(
        "--warmup-ratio", "--warmup_ratio", help="a value below 1 is a ratio of the total steps (paper: 0.1)"))
    lr_scheduler_type: str = "cosine"
    logging_steps: float = 1
    save_strategy: str = "epoch"  # one save per epoch: the checkpoints a resume picks up
    remove_unused_columns: bool = False  # the collator reads each row's `kl` flag

    def __post_init__(self):
        if not self.use_kl:
            # KL options mean nothing without KL
            self.kl_on_unfinished = False
            self.kl_weighting, self.kl_reference = DEFAULT_KL_WEIGHTING, DEFAULT_KL_REFERENCE
            self.kl_coef = 1.0
        if not (self.kl_coef > 0 and math.isfinite(self.kl_coef)):
            raise ConfigError(f"--kl_coef must be a positive number, got {self.kl_coef}")
        if self.num_train_epochs != int(self.num_train_epochs) or self.num_train_epochs < 1:
            raise ConfigError(f"--epochs must be a positive integer, got {self.num_train_epochs}")
        self.check_and_place()
        # Which ran and why goes in run_info.json / run_record.json (thinksafe.train.sft)
        self.liger_kernel_chosen_by = "default" if self.use_liger_kernel is None else "flag"
        if self.use_liger_kernel is None:
            self.use_liger_kernel = liger_layers_by_default(self.target_device)
        super().__post_init__()


def liger_layers_by_default(device: str) -> bool:
    """On with a CUDA device and liger-kernel importable, off on a CPU (its kernels are Triton, GPU-only).

    They replace the decoder's RMSNorm, SwiGLU and RoPE with fused kernels and leave thinksafe's loss
    head alone (TRL turns Liger's fused linear CE off): the same loss to bf16 rounding, measured faster on
    an H200 for CE, exact and cached KL (bench/README.md, "train_step.py"; tests/test_liger_default.py).
    """
    if not device.startswith("cuda"):
        return False
    try:
        import liger_kernel.transformers  # noqa: F401  (imports triton: a broken install is "not available")
    except Exception:  # noqa: BLE001
        return False
    return True


@dataclass
class ThinkSafeGRPOConfig(_ThinkSafeTrainerMixin, GRPOConfig):
    """The GRPO baseline (seanie12/ThinkSafe grpo.sh / grpo_train.py); docs/grpo.md."""

    num_train_epochs: float = field(default=1.0, metadata=_alias("--epochs"))
    learning_rate: float = 1e-5
    effective_batch_size: int = field(default=64, metadata={
        "help": "completions per optimizer step (8 prompts x 8 generations)"})
    per_device_train_batch_size: int = field(default=1, metadata=_alias("--per-device-batch-size"))
    beta: float = 0.04
    max_prompt_length: int = field(default=1024, metadata={"help": "longer prompts are dropped (counted), never cut"})
    temperature: float = 0.7
    max_completion_length: int = 16384
    loss_type: str = "grpo"  # the paper's; TRL 1.x defaults to dapo
    # TRL 0.21 (the paper's) had neither correction; TRL 1.x turns both on (docs/grpo.md)
    use_bias_correction_kl: bool = False
    vllm_importance_sampling_correction: bool = False
    warmup_steps: float = field(default=0.1, metadata=_alias("--warmup-ratio", "--warmup_ratio"))
    lr_scheduler_type: str = "cosine"
    logging_steps: float = 20

    vllm_server_base_url: str | None = field(default=None, metadata=_alias(
        "--vllm-server-url", help="`trl vllm-serve` base URL: server mode (scripts/grpo.sh)"))

    def __post_init__(self):
        if self.effective_batch_size % self.num_generations:
            raise ConfigError(f"--effective-batch-size {self.effective_batch_size} must be a multiple of "
                              f"--num-generations {self.num_generations} (whole prompt groups per step)")
        if self.vllm_server_base_url:
            self.use_vllm, self.vllm_mode = True, "server"
        self.check_and_place()
        super().__post_init__()


@dataclass
class GRPOArguments(RunArguments):
    """What GRPO rewards with and how scripts/grpo.sh places it."""

    guard: str | None = field(default=None, metadata={
        "help": "reward guard: a registered guard name, a hub id or dir (default: the family's; the server "
                "mode needs a Llama-Guard model)"})
    guard_style: Literal["llama-guard", "wildguard"] | None = field(default=None, metadata={
        "help": "how to use a guard that is not a named one (e.g. a small chat LM in Llama-Guard style)"})
    guard_server_url: str | None = field(default=None, metadata={"help": "`vllm serve <guard>` base URL"})
    server_gpus: int = field(default=0, metadata={"help": "GPUs held by the servers (for GPU-hours)"})
    plan: str | None = field(default=None, metadata={
        "metavar": "GPU_IDS", "help": "validate, print the launch plan for scripts/grpo.sh and exit"})
