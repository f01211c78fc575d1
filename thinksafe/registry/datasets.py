"""Dataset names (published, self-generated, hub, local) and prompt labels."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from thinksafe.registry.families import Family, RegistryError, _slugify

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


@dataclass(frozen=True)
class DatasetSpec:
    """kind: 'self' (synthesize for this model), 'published' (hub short name), 'hub' or 'local'."""

    name: str  # the label used in run names
    kind: str
    source: str  # hub id or path; for 'self', the guard name


def resolve_dataset(dataset: str, family: Family | None = None) -> DatasetSpec:
    """`thinksafe` alone uses the family's default guard; `thinksafe-<guard>` names one (which guards
    exist is the guards package's to say: the stages that use one check it, thinksafe.guards)."""
    if dataset == SELF_GENERATED:
        return DatasetSpec(name=dataset, kind="self", source=family.default_guard if family else DEFAULT_GUARD)
    if dataset in DATASETS:
        return DatasetSpec(name=dataset, kind="published", source=DATASETS[dataset])
    path = Path(dataset)
    if path.exists():
        return DatasetSpec(name=_slugify(path.stem if path.is_file() else path.name), kind="local", source=str(path))
    if dataset.startswith(SELF_GENERATED + "-") and "/" not in dataset:
        return DatasetSpec(name=dataset, kind="self", source=dataset[len(SELF_GENERATED) + 1:])
    if re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        return DatasetSpec(name=_slugify(dataset.split("/")[-1]), kind="hub", source=dataset)
    raise RegistryError(
        f"unknown dataset {dataset!r}: not a file, not a hub id (org/name), and not one of: "
        f"{SELF_GENERATED}, {SELF_GENERATED}-<guard>, {', '.join(DATASETS)}"
    )


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
