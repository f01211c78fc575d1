"""`thinksafe plan`: validate the scripts' positional arguments and print the resolved run.

The bash entry points pass their positional arguments through unchanged (an empty string means
"default") and read back tab-separated `key<TAB>value` lines. All defaults and all validation live
here, so bash never owns a default that Python also owns. A bad argument exits with status 2 and
one line naming the argument and the allowed values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from thinksafe.guards import GUARD_SPECS, GuardError, check_named_guard
from thinksafe.recipes import recipe_values
from thinksafe.registry import (
    MODEL_TYPES,
    SELF_GENERATED,
    SYNTH_TRAIN_FILE,
    RegistryError,
    RunPaths,
    base_paths,
    get_family,
    parse_bool,
    parse_positive_int,
    resolve_dataset,
    resolve_model,
    synthesized_data_dir,
)
from thinksafe.train.common import locate_run
from thinksafe.train.sft import content_settings, run_config
from thinksafe.train.sft import parse_args as parse_sft

# The paper's train_and_eval.sh defaults; size/rank/epochs fall back to the family and its recipe.
POSITIONAL = ("devices", "model_type", "size", "dataset", "use_kl", "prompt_masking", "rank", "epochs")
# use_kl has no default here: left empty it is the family's recipe's (the paper's false for every family
# but the CPU demo, whose recipe trains ThinkSafe+KL: configs/recipes/demo/sft.yaml says why).
DEFAULTS = {"devices": "0,1,2,3", "model_type": "qwen", "dataset": "thinksafe",
            "prompt_masking": "true"}


class PlanError(RegistryError):
    pass


# Overrides torch's count of visible GPUs: planning for another machine (and the tests, which have none).
GPU_COUNT_ENV = "THINKSAFE_GPU_COUNT"


def visible_gpu_count() -> int:
    override = os.environ.get(GPU_COUNT_ENV, "").strip()
    if override:
        return parse_positive_int(override, GPU_COUNT_ENV) if override != "0" else 0
    import torch

    return torch.cuda.device_count()


def parse_devices(value: str, check_visible: bool = True, name: str = "devices") -> list[str]:
    """`cpu` or a comma list of GPU indices visible to torch; errors name the argument `name`."""
    if value == "cpu":
        return ["cpu"]
    if not re.fullmatch(r"\d+(,\d+)*", value):
        raise PlanError(f"{name} must be 'cpu' or a comma list of GPU indices like 0,1,2,3, got {value!r}")
    ids = value.split(",")
    if len(set(ids)) != len(ids):
        raise PlanError(f"{name} lists a GPU twice: {value!r}")
    if check_visible:
        visible = visible_gpu_count()
        missing = [i for i in ids if int(i) >= visible]
        if missing:
            raise PlanError(
                f"{name} {value!r}: GPU {','.join(missing)} not visible to torch ({visible} visible); "
                "use 'cpu' or indices below the visible count"
            )
    return ids


@dataclass(frozen=True)
class RunPlan:
    """What the scripts' positional arguments resolve to, typed: the pipeline branches on these values
    and writes `record` (each stage's typed section) for the stages to read back as the same types."""

    devices: tuple[str, ...]  # ("cpu",) or GPU ids
    model_type: str
    size: str
    model: str  # hub id or directory
    dataset: str
    dataset_kind: str  # registry.DatasetSpec.kind
    dataset_source: str
    use_kl: bool
    prompt_masking: bool
    rank: int
    epochs: int
    kl_on_unfinished: bool
    kl_weighting: str
    kl_reference: str | None  # None without KL
    paths: RunPaths
    base: RunPaths
    record: dict
    guard: str | None = None  # self-generated data: the guard that filters it
    data_dir: Path | None = None

    @property
    def on_cpu(self) -> bool:
        return self.devices == ("cpu",)

    @property
    def num_devices(self) -> int:
        return 0 if self.on_cpu else len(self.devices)

    @property
    def first_device(self) -> str:
        return self.devices[0]

    @property
    def data_file(self) -> Path | None:
        return self.data_dir / SYNTH_TRAIN_FILE if self.data_dir else None

    @property
    def self_generated(self) -> bool:
        return self.dataset_kind == "self"

    def to_dict(self) -> dict:
        """The flat view `thinksafe plan` prints (key<TAB>value, or JSON), for people and scripts."""
        flat = {"devices": ",".join(self.devices), "num_devices": self.num_devices, "model_type": self.model_type,
                "size": self.size, "model": self.model, "dataset": self.dataset, "dataset_kind": self.dataset_kind,
                "dataset_source": self.dataset_source, "use_kl": self.use_kl, "kl_on_unfinished": self.kl_on_unfinished,
                "kl_weighting": self.kl_weighting, "kl_reference": self.kl_reference,
                "prompt_masking": self.prompt_masking, "rank": self.rank, "epochs": self.epochs,
                "run_name": self.paths.name, **{f"path_{k}": v for k, v in self.paths.to_dict().items() if k != "name"},
                "base_run_name": self.base.name, "base_results": str(self.base.results), "record": self.record}
        if self.self_generated:
            flat.update(guard=self.guard, data_dir=str(self.data_dir), data_file=str(self.data_file))
        return flat


def resolve_plan(args: dict, check_devices: bool = True, overrides: dict | None = None,
                 evaluate_overrides: dict | None = None) -> RunPlan:
    """Positional script arguments (None/'' = default) -> typed values, run name and paths. Each text
    argument is converted here, once; nothing downstream parses it again. `overrides`: training settings
    laid over the recipes (a grid's seed or learning rate; TRL's field names), and `evaluate_overrides`
    the evaluation's (a grid's sampling seed); both travel to the stages in the run record."""
    given = given_arguments(args)
    family, size = family_and_size(given)
    use_kl = parse_bool(given["use_kl"], "use_kl") if given["use_kl"] else None
    prompt_masking = parse_bool(given["prompt_masking"], "prompt_masking")
    rank = parse_positive_int(given["rank"], "rank") if given["rank"] else None
    epochs = parse_positive_int(given["epochs"], "epochs") if given["epochs"] else None
    devices = tuple(parse_devices(given["devices"], check_visible=check_devices))
    model = resolve_model(family.name, size)
    try:
        dataset = resolve_dataset(given["dataset"], family)
        if dataset.kind == "self":
            check_named_guard(dataset.source, repr(given["dataset"]))
    except (RegistryError, GuardError) as err:
        raise PlanError(f"dataset: {err}") from None
    model_cfg, run, sft, cfg = training_config(family.name, size, given["dataset"], use_kl, prompt_masking, rank,
                                               epochs, overrides)
    data_dir = synthesized_data_dir(model, dataset.source) if dataset.kind == "self" else None
    return RunPlan(
        devices=devices, model_type=family.name, size=size, model=model.source, dataset=given["dataset"],
        dataset_kind=dataset.kind, dataset_source=dataset.source, use_kl=sft.use_kl,
        prompt_masking=sft.completion_only_loss, rank=cfg.rank, epochs=cfg.epochs,
        kl_on_unfinished=cfg.kl_on_unfinished, kl_weighting=cfg.kl_weighting,
        kl_reference=cfg.kl_reference if sft.use_kl else None,
        paths=locate_run(cfg, content_settings(model_cfg, sft)), base=base_paths(model),
        record=record(family.name, model_cfg, run, sft, overrides, evaluate_overrides),
        guard=dataset.source if dataset.kind == "self" else None,
        data_dir=data_dir)


def given_arguments(args: dict) -> dict:
    """The positional arguments with the scripts' defaults; --guard names the self-generated dataset."""
    given = {k: (args.get(k) or DEFAULTS.get(k)) for k in POSITIONAL}
    if args.get("guard"):
        guards = list(GUARD_SPECS)
        if args["guard"] not in guards:
            raise PlanError(f"guard {args['guard']!r} is unknown; choose one of: {', '.join(guards)}")
        given["dataset"] = f"{SELF_GENERATED}-{args['guard']}"
    return given


def family_and_size(given: dict):
    try:
        family = get_family(given["model_type"])
    except RegistryError as err:
        raise PlanError(f"model_type: {err}") from None
    size = given["size"] or family.default_size
    if size not in family.sizes:
        raise PlanError(f"size {size!r} is not a {family.name} size; choose one of: {', '.join(family.sizes)}")
    return family, size


def training_config(family: str, size: str, dataset: str, use_kl: bool | None, prompt_masking: bool,
                    rank: int | None, epochs: int | None, overrides: dict | None = None):
    """The typed config `train` will parse (recipe and all), so the plan names the run as train does.
    The positional values go in typed, laid over the recipes; the device is fixed to the CPU so that
    planning never depends on the machine that plans (train resolves its own device when it runs)."""
    typed = {**(overrides or {}), **({"use_kl": use_kl} if use_kl is not None else {}),
             "completion_only_loss": prompt_masking,
             **({"lora_r": rank} if rank is not None else {}),
             **({"num_train_epochs": float(epochs)} if epochs is not None else {})}
    model_cfg, run, sft = parse_sft(["--model", family, "--size", size, "--dataset", dataset, "--device", "cpu"],
                                    typed=typed)
    return model_cfg, run, sft, run_config(model_cfg, run, sft)


def record(family: str, model_cfg, run, sft, overrides: dict | None = None,
           evaluate_overrides: dict | None = None) -> dict:
    """The run record's stage sections: what each stage is given, typed (pipeline writes it as YAML
    and passes it as `--config`); the stages read their family's recipe themselves. Overridden
    settings travel as parsed (those that change how, not what, too: a grid's batch split)."""
    parsed = {key: getattr(sft, key, getattr(model_cfg, key, None)) for key in overrides or {}}
    sft_section = {"model_name_or_path": model_cfg.model_name_or_path, "size": model_cfg.size,
                   "dataset": run.dataset, **{k: getattr(v, "value", v) for k, v in parsed.items()},
                   **content_settings(model_cfg, sft),
                   **({"run_name": sft.run_name} if sft.run_name else {})}  # an explicit name travels too
    # evaluate reads no family recipe itself (a model dir's family is known from its record): it gets
    # the family's evaluation settings here; the pipeline gives each task its own --tasks.
    return {"family": family, "sft": sft_section,
            "evaluate": {**recipe_values(family, "evaluate"), **(evaluate_overrides or {})}}


def text(value) -> str:
    """A value as the tab-separated output has always shown it (booleans lower case, None empty)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinksafe plan",
        description="Validate train_and_eval.sh's positional arguments and print the resolved run "
        "(run name, every output path). Empty arguments take the defaults.",
    )
    for name in POSITIONAL:
        parser.add_argument(name, nargs="?", default="",
                            help=f"default: {DEFAULTS.get(name, 'from the family/recipe')}")
    parser.add_argument("--guard", default="", help="synthesis guard (sets dataset to thinksafe-<guard>)")
    parser.add_argument("--format", choices=("tsv", "json"), default="tsv")
    parser.add_argument("--no-device-check", action="store_true", help="skip the torch visibility check of GPU ids")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = resolve_plan(vars(args), check_devices=not args.no_device_check)
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flat = plan.to_dict()
    if args.format == "json":
        print(json.dumps(flat, indent=2))
    else:
        for key, value in flat.items():
            if key != "record":  # typed sections: JSON only
                print(f"{key}\t{text(value)}")
    return 0


__all__ = ["MODEL_TYPES", "POSITIONAL", "PlanError", "resolve_plan", "main"]
