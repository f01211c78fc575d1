"""The one registry: model families, hub ids, sampling defaults, dataset names, run names and paths.

families.py (families, sampling, models), datasets.py (dataset names, prompt labels), runs.py (run
names, output paths), parsing.py (the scripts' true/false and integer values); everything is
imported from `thinksafe.registry`.

Every stage and every script derives ids and output paths from here. The paper's code built the
output path twice (training and evaluation) and the two disagreed on the epoch suffix; here there
is exactly one `run_paths` and the tests check that every stage calls it.
"""

from __future__ import annotations

from thinksafe.registry.datasets import (  # noqa: F401
    _PUBLISHED_ORG,
    BENIGN,
    DATASETS,
    DEFAULT_GUARD,
    HARMFUL,
    PROMPT_SOURCES,
    SELF_GENERATED,
    DatasetSpec,
    is_harmful_label,
    resolve_dataset,
)
from thinksafe.registry.families import (  # noqa: F401
    _QWEN3_SIZES,
    _R1_LLAMA_SIZES,
    _R1_QWEN_SIZES,
    EVAL_MAX_NEW_TOKENS,
    FAMILIES,
    MODEL_TYPES,
    SYNTH_MAX_NEW_TOKENS,
    Family,
    ModelSpec,
    RegistryError,
    Sampling,
    _slugify,
    family_for_model,
    get_family,
    resolve_model,
)
from thinksafe.registry.parsing import (  # noqa: F401
    parse_bool,
    parse_positive_int,
)
from thinksafe.registry.runs import (  # noqa: F401
    DEFAULT_KL_REFERENCE,
    DEFAULT_KL_WEIGHTING,
    KL_REFERENCES,
    KL_WEIGHTINGS,
    MAX_LORA_RANK,
    ROW_WEIGHTING,
    SYNTH_STATS_FILE,
    SYNTH_TRAIN_FILE,
    SYNTH_UNFINISHED_BENIGN_FILE,
    TOKEN_WEIGHTING,
    RunConfig,
    RunPaths,
    base_paths,
    base_run_name,
    check_lora_rank,
    check_run_name,
    grpo_run_name,
    legacy_run_name,
    legacy_run_paths,
    output_root,
    paths_for_name,
    results_root,
    run_name,
    run_paths,
    settings_hash,
    synthesized_data_dir,
)

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
    "legacy_run_name",
    "legacy_run_paths",
    "check_run_name",
    "settings_hash",
    "run_paths",
    "synthesized_data_dir",
]
