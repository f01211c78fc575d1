"""Every stage's configuration as dataclasses; see thinksafe/config/parse.py for the order of sources."""

from __future__ import annotations

from thinksafe.config.parse import ConfigError, parse_stage, peek, recipe_path, recipe_values


def family_in(argv: list[str] | None) -> str | None:
    """The family named by --model (and --size/--model-type) in argv, for its recipe; None when the
    model cannot be resolved yet (the full parse then reports why)."""
    from thinksafe.registry import RegistryError, resolve_model

    given = peek(list(argv or []), "model", "model_name_or_path", "size", "model_type", "config")
    model = given["model"] or given["model_name_or_path"]
    if not model and given["config"]:  # a run record names its family
        return _family_in_config(given["config"])
    if not model:
        return None
    try:
        return resolve_model(model, given["size"], model_type=given["model_type"]).family.name
    except (RegistryError, ValueError):
        return None


def _family_in_config(path: str) -> str | None:
    from pathlib import Path

    from thinksafe.config.parse import read_yaml

    family = read_yaml(Path(path)).get("family")
    return family if isinstance(family, str) else None


def parse_training(stage: str, types: tuple, argv: list[str] | None, prog: str) -> tuple:
    return parse_stage(stage, types, argv, family_in(argv), prog)


__all__ = ["ConfigError", "family_in", "parse_stage", "parse_training", "peek", "recipe_path", "recipe_values"]
