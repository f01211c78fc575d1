"""Training/GRPO recipes: one YAML per family in configs/recipes/, overridden by CLI flags.

A recipe file has one mapping per stage (`sft:`, `grpo:`, `synthesize:`); keys are the stage's
option names. The registry owns model ids and sampling; recipes own optimisation settings.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPE_DIR = CONFIG_DIR / "recipes"


def recipe_path(family: str) -> Path:
    return RECIPE_DIR / f"{family}.yaml"


def load_recipe(family: str, stage: str) -> dict:
    """The `stage` section of configs/recipes/<family>.yaml ({} when the file or section is absent)."""
    import yaml

    path = recipe_path(family)
    if not path.exists():
        return {}
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    section = data.get(stage) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: section {stage!r} must be a mapping")
    return dict(section)


RECIPE_OVERRIDE_ENV = "THINKSAFE_RECIPE"


def recipe_section(family: str, stage: str) -> dict:
    """The pipeline's recipe section for a stage; THINKSAFE_RECIPE (a YAML file) overrides the family's
    (the tests use it for tiny limits). `plan` reads the same, so both name the same run."""
    import os

    override = os.environ.get(RECIPE_OVERRIDE_ENV)
    if override:
        import yaml

        from thinksafe.errors import ThinksafeError

        path = Path(override)
        if not path.exists():
            raise ThinksafeError(f"{RECIPE_OVERRIDE_ENV}={override}: file not found")
        return dict((yaml.safe_load(path.read_text()) or {}).get(stage) or {})
    return load_recipe(family, stage)
