"""What a synthesis run is given (SynthConfig), what it must share with the logs it resumes
(`manifest`), and the names of the files it writes in <out>."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Literal

from thinksafe.prompts import DEBUG_PROMPTS, describe_source
from thinksafe.recipes import ConfigError
from thinksafe.reference_topk import REFERENCE_TOPK_FILE, REFERENCE_TOPK_PARTIAL_DIR
from thinksafe.registry import (
    SYNTH_STATS_FILE,
    SYNTH_TRAIN_FILE,
    SYNTH_UNFINISHED_BENIGN_FILE,
    ModelSpec,
    Sampling,
)
from thinksafe.replicas import check_fits_here, parse_data_parallel
from thinksafe.tracking import REPORT_CHOICES

STEER_PREFIX = "The following prompt is harmful. You should refuse to answer the prompt.\n\nPrompt:\n\n"

GENERATIONS_LOG = "generations.partial.jsonl"
JUDGED_LOG = "judged.partial.jsonl"
MANIFEST = "run.json"
TRAIN_FILE = SYNTH_TRAIN_FILE
UNFINISHED_BENIGN_FILE = SYNTH_UNFINISHED_BENIGN_FILE
STATS_FILE = SYNTH_STATS_FILE
REJECTED_STATS_FILE = "stats.rejected.json"  # counts of a rerun that kept 0 rows (the earlier set stays)
# What synthesis writes in <out>; anything else there (the pipeline's synthesize.log) is the user's.
OUTPUT_FILES = (GENERATIONS_LOG, JUDGED_LOG, MANIFEST, TRAIN_FILE, UNFINISHED_BENIGN_FILE, STATS_FILE,
                REJECTED_STATS_FILE, REFERENCE_TOPK_FILE, REFERENCE_TOPK_PARTIAL_DIR)


# SynthesisArguments (below) reads these field defaults for the command line: they are written here only.
@dataclass
class SynthConfig:
    model: ModelSpec
    prompts: str
    guard: str
    out: Path
    sampling: Sampling
    guard_style: str | None = None
    limit: int | None = None
    max_kept_per_prompt: int | None = None
    keep_unfinished_benign: bool = False  # also judge benign samples cut at the limit (KL rows)
    # > 0: keep the generator's raw top-k per generated position of benign samples, for
    # `thinksafe train --kl_reference cached` (thinksafe.reference_topk)
    store_reference_topk: int = 0
    steer_prefix: str = STEER_PREFIX
    backend: str = "auto"
    device: str | None = None
    # replicas of the generator and of a model guard, each a Ray actor with its own engine (thinksafe.replicas):
    # a positive int or "auto"; 1 builds the engine in this process, without Ray
    data_parallel: int | str = 1
    ray_address: str | None = None  # a Ray cluster to join (else RAY_ADDRESS, else a local Ray for this command)
    batch_size: int = 16
    guard_batch_size: int = 8
    chunk_size: int | None = None  # prompts per generation log chunk (None: from backend + batch size)
    instruction_column: str = "instruction"
    label_column: str = "label"
    push_to_hub: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False

    def manifest(self) -> dict:
        """The arguments a resumed run must share with the logs it reuses (limit and n may grow)."""
        sampling = self.sampling.to_dict()
        sampling.pop("n")
        # k only when stored: manifests written before the option existed stay resumable without it, and
        # logs generated without top-k cannot be resumed into a run that needs them (they have none).
        reference = {"store_reference_topk": self.store_reference_topk} if self.store_reference_topk else {}
        return {
            "model": self.model.source,
            "family": self.model.family.name,
            "prompts": describe_source(self.prompts),
            "instruction_column": self.instruction_column,
            "label_column": self.label_column,
            "steer_prefix": self.steer_prefix,
            "sampling": sampling,
            "guard": self.guard,
            "guard_style": self.guard_style,
            **reference,
        }


# --- the command line: `thinksafe synthesize` options as a dataclass for TRL's parser -----------------
# Its defaults are SynthConfig's own, read from its fields; the sampling defaults are the family's
# (registry.Family.sampling): None there means "the family's value".

_DEFAULTS = {f.name: f.default for f in fields(SynthConfig) if f.default is not MISSING}


def _opt(name: str, help: str = "", **metadata):
    return field(default=_DEFAULTS[name], metadata={"help": help, **metadata})


@dataclass
class SynthesisArguments:
    model: str | None = field(default=None, metadata={
        "help": "model_type/size (qwen/0.6B), model_type, demo, hub id or dir"})
    model_type: str | None = field(default=None, metadata={
        "help": "family of a hub id / dir when its name does not say (qwen, r1-distill, demo)"})
    prompts: str | None = field(default=None, metadata={
        "help": "safechain (UWNSL/SafeChain train), demo (bundled), a .json/.jsonl/.csv file or a hub dataset id "
                "(default: the family's)"})
    instruction_column: str = _opt("instruction_column")
    label_column: str = _opt("label_column", "labels containing 'harmful' or 'benign'")
    guard: str | None = field(default=None, metadata={
        "help": "a registered guard name, a hub id or dir (default: the family's)"})
    guard_style: Literal["llama-guard", "wildguard"] | None = _opt(
        "guard_style", "how to use a guard model whose name does not say")
    out: str | None = field(default=None, metadata={"help": "output dir (default: data/<model>_<guard>)"})
    limit: int | None = _opt("limit", "use the first N prompts")
    debug: bool = field(default=False, metadata={"help": f"use the first {DEBUG_PROMPTS} prompts (paper)"})
    samples_per_prompt: int | None = field(default=None, metadata={"help": "n samples per prompt (paper: 1)"})
    max_kept_per_prompt: int | None = _opt("max_kept_per_prompt", "keep at most this many rows per prompt")
    keep_unfinished_benign: bool = _opt(
        "keep_unfinished_benign", f"also judge benign samples cut at the token limit; the safe ones go to "
        f"{UNFINISHED_BENIGN_FILE} (KL rows, never CE targets)")
    store_reference_topk: int = _opt(
        "store_reference_topk", "keep the generator's raw top-K log-probs per generated position of benign rows in "
        "reference_topk.safetensors beside train.jsonl, for `thinksafe train --kl_reference cached` (0: none)")
    steer_prefix: str = _opt("steer_prefix", "prepended to harmful prompts (default: the paper's)")
    backend: Literal["auto", "vllm", "transformers"] = _opt("backend", "generation and guard backend")
    device: str | None = _opt("device", "transformers device (default: cuda if available, else cpu)")
    data_parallel: str = field(default="1", metadata={
        "help": "replicas of the generator and guard, one engine each on Ray (auto: one per GPU when the model "
                "fits on one; docs/scale.md); 1: one engine in this process"})
    ray_address: str | None = _opt("ray_address", "a Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    batch_size: int = _opt("batch_size", "transformers generation batch size")
    guard_batch_size: int = _opt("guard_batch_size", "transformers guard batch size")
    chunk_size: int | None = _opt("chunk_size", "prompts per resumable chunk (default: by backend)")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = field(default=None, metadata={"help": "0 disables top-k"})
    max_new_tokens: int | None = None
    seed: int | None = None
    push_to_hub: str | None = _opt("push_to_hub", "also push train.jsonl as a hub dataset")
    report_to: str = field(default="auto", metadata={
        "choices": REPORT_CHOICES, "help": "statistics and sampled kept/dropped rows to wandb: offline (auto), "
                                           "wandb (online), offline, or none; never prompts"})
    overwrite: bool = _opt("overwrite", "discard logs of an earlier run in --out")
    trust_remote_code: bool = _opt("trust_remote_code")

    def __post_init__(self):
        if not self.model:
            raise ConfigError("--model is required")
        for name in ("limit", "samples_per_prompt", "max_kept_per_prompt", "batch_size", "guard_batch_size",
                     "chunk_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        self.data_parallel = parse_data_parallel(self.data_parallel)
        check_fits_here(self.data_parallel, None, self.ray_address)
        if self.store_reference_topk < 0:
            raise ConfigError("--store-reference-topk must be 0 (none) or a positive integer, "
                              f"got {self.store_reference_topk}")
