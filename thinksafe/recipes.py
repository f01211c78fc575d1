"""Where a stage's settings come from. Dataclass configs filled TRL's way: defaults in the dataclass,
then the family's recipe, then an
explicit `--config` file (a recipe or a run record), then the command line.

Recipes live in configs/recipes/<family>/<stage>.yaml and hold only a family's departures from the
defaults; keys are the dataclass field names (TRL's own for trainer settings). A run record (the
pipeline's `runs/<run>/run_plan.yaml`) holds one mapping per stage; a stage reads its own.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import read_text
from thinksafe.registry import RegistryError, resolve_model

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPE_DIR = CONFIG_DIR / "recipes"
RECIPE_OVERRIDE_ENV = "THINKSAFE_RECIPE"  # a file with stage sections laid over the family's (tests' tiny limits)
STAGES = ("synthesize", "sft", "grpo", "evaluate")


class ConfigError(ThinksafeError, ValueError):
    """A config file or option that cannot be used as given."""


def recipe_path(family: str, stage: str) -> Path:
    return RECIPE_DIR / family / f"{stage}.yaml"


def read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = read_text(path)  # a non-UTF-8 file is one line naming the file and the line, not a traceback
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of option names to values")
    return data


def stage_section(data: dict, stage: str) -> dict:
    """A file with stage sections (a run record, THINKSAFE_RECIPE) -> its `stage` mapping; a flat file as is."""
    if not set(data) & set(STAGES):
        return dict(data)
    section = data.get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"section {stage!r} must be a mapping")
    return dict(section)


def recipe_sources(family: str | None, stage: str, config: str | None = None) -> list[tuple[str, dict]]:
    """(file, values) laid over the dataclass defaults, in order: family recipe, THINKSAFE_RECIPE, --config."""
    sources: list[tuple[str, dict]] = []
    if family and recipe_path(family, stage).is_file():
        sources.append((str(recipe_path(family, stage)), read_yaml(recipe_path(family, stage))))
    override = os.environ.get(RECIPE_OVERRIDE_ENV)
    if override:
        sources.append((f"{RECIPE_OVERRIDE_ENV}={override}", stage_section(read_yaml(Path(override)), stage)))
    if config:
        sources.append((config, stage_section(read_yaml(Path(config)), stage)))
    return sources


def recipe_values(family: str | None, stage: str, config: str | None = None) -> dict:
    """The values laid over the dataclass defaults (recipe_sources, later ones winning)."""
    values: dict = {}
    for _, section in recipe_sources(family, stage, config):
        values.update(section)
    return values


def apply_defaults(parser: argparse.ArgumentParser, values: dict, source: str) -> None:
    """Set parser defaults from a recipe. Unlike TRL's set_defaults_with_config, a YAML string goes
    through the option's type (YAML 1.1 reads `1e-5` as a string) and an unknown key is an error."""
    actions: dict[str, list] = {}
    for action in parser._actions:  # a bool field with default True has two: --x and --no_x
        actions.setdefault(action.dest, []).append(action)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
    for key, value in values.items():
        typed = next((a.type for a in actions[key] if callable(a.type)), None)
        if isinstance(value, str) and typed is not None:
            try:
                value = typed(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise ConfigError(f"{source}: {key} = {value!r} is not valid") from None
        for action in actions[key]:
            action.default = value
            action.required = False


def peek(argv: list[str], *names: str) -> dict:
    """The values of a few options before the full parse (which needs the family's recipe)."""
    pre = argparse.ArgumentParser(add_help=False)
    for name in names:
        pre.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name)
    known, _ = pre.parse_known_args(argv)
    return vars(known)


def parse_stage(stage: str, types: tuple, argv: list[str] | None, family: str | None, prog: str,
                typed: dict | None = None) -> tuple:
    """Parse `argv` into instances of `types` (dataclasses) with the family's recipe for `stage`;
    `typed` (already typed values, e.g. the scripts' positional arguments resolved by `thinksafe plan`)
    is laid over the recipes as they are: never turned into text and parsed again."""
    from trl import TrlParser

    class OneLineParser(TrlParser):
        def error(self, message):  # argparse prints usage + message and exits; ours is one line, exit 2
            raise ConfigError(message)

    argv = list(argv) if argv is not None else []
    config = peek(argv, "config")["config"]
    parser = OneLineParser(types, prog=prog)
    parser.add_argument("--config", help="a recipe or run record (YAML) laid over the family's recipe")
    # each file's values applied on their own, so that an unknown key is blamed on the file holding it
    for source, values in recipe_sources(family, stage, config):
        apply_defaults(parser, values, source)
    if typed:
        apply_defaults(parser, typed, "the positional arguments")
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a dataclass __post_init__ that is not ours
        raise ConfigError(str(err).splitlines()[0]) from None
    return tuple(item for item in parsed if not isinstance(item, argparse.Namespace))


def family_in(argv: list[str] | None) -> str | None:
    """The family named by --model (and --size/--model-type) in argv, for its recipe; None when the
    model cannot be resolved yet (the full parse then reports why)."""
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
    family = read_yaml(Path(path)).get("family")
    return family if isinstance(family, str) else None


def parse_training(stage: str, types: tuple, argv: list[str] | None, prog: str, typed: dict | None = None) -> tuple:
    return parse_stage(stage, types, argv, family_in(argv), prog, typed)
