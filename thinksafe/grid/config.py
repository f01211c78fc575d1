"""A grid file (configs/grids/*.yaml), typed and checked before anything runs.

    name: demo                       # the report's directory (results/grids/<name>/) and the wandb group
    devices: cpu                     # as train_and_eval.sh's first argument
    models: [demo]                   # model_type or model_type/size (the registry's)
    dataset: thinksafe               # as train_and_eval.sh's dataset argument
    variants: [base, thinksafe, thinksafe+kl]
    seeds: [1, 2]                    # each trained variant once per seed (training and evaluation sampling)
    sweep: {learning_rate: [5.0e-4, 1.0e-3]}   # optional: every combination is one more point
    settings: {}                     # optional: training settings for every run (TRL's field names)
    rank: null                       # optional: as train_and_eval.sh's rank and epochs
    epochs: null

A run's directory comes from its settings (thinksafe.registry.run_name): the seed and every swept value
are in its hash, so each point is its own run, and the same grid finds the same runs again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.recipes import read_yaml
from thinksafe.registry import check_run_name

BASE = "base"
# variant -> (use_kl, training settings it sets): the paper's table rows this codebase trains.
TRAINED_VARIANTS: dict[str, tuple[bool, dict]] = {
    "thinksafe": (False, {}),
    "thinksafe+kl": (True, {}),
    "thinksafe+kl-cached": (True, {"kl_reference": "cached"}),
}
VARIANTS = (BASE, *TRAINED_VARIANTS)
KEYS = ("name", "devices", "models", "dataset", "variants", "seeds", "sweep", "settings", "rank", "epochs",
        "prompt_masking")


class GridError(ThinksafeError, ValueError):
    """A grid file that cannot run as written."""


@dataclass(frozen=True)
class GridSpec:
    name: str
    devices: str
    models: tuple[str, ...]
    dataset: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    sweep: dict = field(default_factory=dict)  # setting -> list of values
    settings: dict = field(default_factory=dict)
    rank: int | None = None
    epochs: int | None = None
    prompt_masking: bool = True

    @property
    def trained_variants(self) -> list[str]:
        return [v for v in self.variants if v != BASE]

    def sweep_points(self) -> list[dict]:
        """Every combination of the swept values ([{}] without a sweep), in the file's order."""
        keys = list(self.sweep)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.sweep[k] for k in keys))]

    def model_argument(self, model: str) -> tuple[str, str]:
        """'demo' or 'qwen/1.7B' -> (model_type, size or '' for the family's default)."""
        model_type, _, size = model.partition("/")
        return model_type, size


def load_grid(path: Path | str) -> GridSpec:
    path = Path(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file has: {', '.join(KEYS)}")
    spec = GridSpec(
        name=check_run_name(str(data.get("name") or path.stem)),
        devices=str(data.get("devices", "cpu")),
        models=tuple(_str_list(data, "models", path)),
        dataset=str(data.get("dataset") or "thinksafe"),
        variants=tuple(_str_list(data, "variants", path)),
        seeds=tuple(_seeds(data.get("seeds", [42]), path)),
        sweep=_sweep(data.get("sweep") or {}, path),
        settings=_mapping(data.get("settings") or {}, "settings", path),
        rank=data.get("rank"), epochs=data.get("epochs"), prompt_masking=bool(data.get("prompt_masking", True)),
    )
    bad = [v for v in spec.variants if v not in VARIANTS]
    if bad:
        raise GridError(f"{path}: variant(s) {', '.join(bad)} unknown; choose from: {', '.join(VARIANTS)} "
                        "(the GRPO baseline runs with scripts/grpo.sh)")
    clash = sorted(set(spec.settings) & set(spec.sweep) | ({"seed"} & (set(spec.settings) | set(spec.sweep))))
    if clash:
        raise GridError(f"{path}: {', '.join(clash)} set twice (seeds come from `seeds`; a swept setting is not "
                        "also in `settings`)")
    return spec


def _str_list(data: dict, key: str, path: Path) -> list[str]:
    value = data.get(key)
    values = [value] if isinstance(value, str) else value
    if not values or not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise GridError(f"{path}: `{key}` must be a non-empty list of names")
    if len(set(values)) != len(values):
        raise GridError(f"{path}: `{key}` lists a name twice")
    return values


def _seeds(value, path: Path) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise GridError(f"{path}: `seeds` must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(values)) != len(values):
        raise GridError(f"{path}: `seeds` lists a seed twice")
    return values


def _mapping(value, key: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise GridError(f"{path}: `{key}` must be a mapping of setting names to values")
    return dict(value)


def _sweep(value, path: Path) -> dict:
    sweep = _mapping(value, "sweep", path)
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: sweep `{key}` must be a non-empty list of values")
    return sweep
