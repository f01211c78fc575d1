"""Run names and output paths: the one `run_paths` every stage calls."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from thinksafe.registry.datasets import resolve_dataset
from thinksafe.registry.families import ModelSpec, RegistryError, _slugify
from thinksafe.registry.parsing import parse_positive_int

# --- run names and paths --------------------------------------------------------------------


def output_root() -> Path:
    """Where data/, runs/ and results/ live; THINKSAFE_OUTPUT_DIR overrides `./outputs`."""
    return Path(os.environ.get("THINKSAFE_OUTPUT_DIR", "outputs"))


# How rows and tokens weigh in a KL run's loss (thinksafe.train.kl): the paper's objective is the mean
# over rows of each row's per-token mean; "token" weighs every loss token the same instead.
ROW_WEIGHTING, TOKEN_WEIGHTING = "row", "token"
KL_WEIGHTINGS = (ROW_WEIGHTING, TOKEN_WEIGHTING)
DEFAULT_KL_WEIGHTING = ROW_WEIGHTING
# Where the KL's base distribution comes from: a reference forward (exact) or the top-k stored at synthesis.
KL_REFERENCES = ("forward", "cached")
DEFAULT_KL_REFERENCE = "forward"
# LoRA ranks above this are a typo (1e23 once planned fine and failed after synthesis); the largest
# hidden size among the registry's models is 8192 (R1-Distill-Llama-70B).
MAX_LORA_RANK = 8192


def check_lora_rank(rank: int, name: str = "rank") -> int:
    if rank > MAX_LORA_RANK:
        raise RegistryError(f"{name} must be at most {MAX_LORA_RANK} (no model here is wider), got {rank}")
    return rank


@dataclass(frozen=True)
class RunConfig:
    """Everything that names a training run (the positional arguments of train_and_eval.sh)."""

    model: ModelSpec
    dataset: str
    rank: int  # no defaults here: the training config (thinksafe/train/config.py) owns them
    epochs: int
    prompt_masking: bool = True
    use_kl: bool = False
    kl_on_unfinished: bool = False  # with use_kl: KL also on benign samples cut at the token limit
    kl_weighting: str = DEFAULT_KL_WEIGHTING  # with use_kl: KL_WEIGHTINGS
    kl_reference: str = DEFAULT_KL_REFERENCE  # with use_kl: KL_REFERENCES
    max_steps: int | None = None  # a run cut short by --max-steps is not the full epN run: named apart
    # The hash of every other setting that decides what the run learns (learning rate, seed, batch,
    # LoRA targets, ...: `settings_hash`); None only for the names runs had before it (legacy_run_name).
    settings_hash: str | None = None
    name: str | None = None  # an explicit run name (`run_name` in a recipe or --run_name): used as given

    def __post_init__(self):
        if self.kl_weighting not in KL_WEIGHTINGS:
            raise RegistryError(
                f"kl_weighting {self.kl_weighting!r} is unknown; choose one of: {', '.join(KL_WEIGHTINGS)}")
        if self.kl_reference not in KL_REFERENCES:
            raise RegistryError(
                f"kl_reference {self.kl_reference!r} is unknown; choose one of: {', '.join(KL_REFERENCES)}")
        for name in ("rank", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RegistryError(f"{name} must be a positive integer, got {value!r}")
        check_lora_rank(self.rank)
        if self.name is not None:
            check_run_name(self.name)


# A run name is one directory under runs/ and results/: no separators, no leading dot (hidden staging dirs).
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
HASH_LENGTH = 8  # 32 bits: a collision needs ~65k runs of one model, data and variant


def check_run_name(name: str) -> str:
    if not RUN_NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"run name {name!r} must be 1-200 letters, digits, '.', '_', '+' or '-', "
                            "starting with a letter or digit")
    return name


def settings_hash(settings: dict) -> str:
    """A short stable hash of the settings that decide a run's result: JSON with sorted keys, so the same
    values give the same hash on any machine and in any order they were given (5e-4 and 0.0005 are one
    float before they get here)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def run_name(cfg: RunConfig) -> str:
    """The readable parts people compare (legacy_run_name) then `h<hash>` of every other setting that
    decides the run: two runs differing only in learning rate or seed get two directories, the same
    settings always the same one. e.g. qwen3-0.6B_thinksafe_r32_ep3_mask_kl_h1a2b3c4d. An explicit
    `cfg.name` is used as given."""
    if cfg.name:
        return cfg.name
    readable = legacy_run_name(cfg)
    return f"{readable}_h{cfg.settings_hash}" if cfg.settings_hash else readable


def legacy_run_name(cfg: RunConfig) -> str:
    """The readable parts (all a run's name had before the settings hash; runs trained then keep it),
    e.g. qwen3-0.6B_thinksafe_r32_ep3_mask, qwen3-0.6B_thinksafe_r32_ep3_mask_kl,
    smollm2-135M_thinksafe_r16_ep3_mask_kl_unfinished (KL also on cut benign samples: other data),
    qwen3-0.6B_thinksafe_r32_ep3_mask_kl_tokenw (KL with token weighting instead of the paper's rows),
    qwen3-0.6B_thinksafe_r32_ep3_mask_klcached (KL against the top-k stored at synthesis: an approximation),
    ..._ep3_mask_steps2 (stopped by --max-steps: never mistaken for the finished ep3 run).

    The epoch suffix is always present (the paper's scripts added it in one place only).
    """
    parts = [cfg.model.slug, resolve_dataset(cfg.dataset, cfg.model.family).name, f"r{cfg.rank}", f"ep{cfg.epochs}"]
    if cfg.prompt_masking:
        parts.append("mask")
    if cfg.use_kl:
        parts.append("kl" if cfg.kl_reference == DEFAULT_KL_REFERENCE else f"kl{cfg.kl_reference}")
        if cfg.kl_on_unfinished:
            parts.append("unfinished")
        if cfg.kl_weighting != DEFAULT_KL_WEIGHTING:
            parts.append(f"{cfg.kl_weighting}w")  # another objective: another run
    if cfg.max_steps:
        parts.append(f"steps{cfg.max_steps}")
    return "_".join(parts)


def grpo_run_name(model: ModelSpec, dataset: str, rank: int) -> str:
    """The GRPO baseline's run, e.g. qwen3-0.6B_grpo_thinksafe-0.6B_r32 (same runs/ and results/ tree)."""
    rank = parse_positive_int(rank, "rank")
    return "_".join([model.slug, "grpo", resolve_dataset(dataset, model.family).name, f"r{rank}"])


def base_run_name(model: ModelSpec) -> str:
    """The untouched model's evaluation results live under this name."""
    return f"{model.slug}_base"


@dataclass(frozen=True)
class RunPaths:
    name: str
    run_dir: Path  # runs/<name>
    adapter: Path  # runs/<name>/adapter
    merged: Path  # runs/<name>/merged
    checkpoints: Path  # runs/<name>/checkpoints
    logs: Path  # runs/<name>/logs
    results: Path  # results/<name>

    def task_dir(self, task: str) -> Path:
        return self.results / task

    def to_dict(self) -> dict:
        return {k: str(v) for k, v in self.__dict__.items()}


def paths_for_name(name: str, root: Path | None = None) -> RunPaths:
    root = root or output_root()
    run_dir = root / "runs" / name
    return RunPaths(
        name=name,
        run_dir=run_dir,
        adapter=run_dir / "adapter",
        merged=run_dir / "merged",
        checkpoints=run_dir / "checkpoints",
        logs=run_dir / "logs",
        results=root / "results" / name,
    )


def run_paths(cfg: RunConfig, root: Path | None = None) -> RunPaths:
    return paths_for_name(run_name(cfg), root)


def legacy_run_paths(cfg: RunConfig, root: Path | None = None) -> RunPaths | None:
    """Where a run with these readable parts was trained before names carried the settings hash
    (None for an explicitly named run, whose name never changed)."""
    return None if cfg.name else paths_for_name(legacy_run_name(cfg), root)


def base_paths(model: ModelSpec, root: Path | None = None) -> RunPaths:
    return paths_for_name(base_run_name(model), root)


# Files `thinksafe synthesize` writes in synthesized_data_dir(); `thinksafe train` and `plan` read them.
SYNTH_TRAIN_FILE = "train.jsonl"
# Benign samples cut at the token limit, judged safe: KL positions only (--keep-unfinished-benign).
SYNTH_UNFINISHED_BENIGN_FILE = "unfinished_benign.jsonl"
SYNTH_STATS_FILE = "stats.json"  # written last; records the sha256 of the files above


def synthesized_data_dir(model: ModelSpec, guard: str, root: Path | None = None) -> Path:
    """data/<model slug>_<guard>/ holds train.jsonl + stats.json written by `thinksafe synthesize`."""
    root = root or output_root()
    return root / "data" / f"{model.slug}_{_slugify(Path(guard).name)}"


def results_root(root: Path | None = None) -> Path:
    return (root or output_root()) / "results"
