"""Which model an evaluation loads, which run its results belong to, and the policy generator.

Family, run name and whether a model is a base model come from what recorded them, never from path
text (issue 17, item 7: a Qwen3 run under a folder named like "deepseek-r1-study" was sampled as
R1): for a model or adapter dir inside a training run, that run's run_record.json; for a registry
name or hub id, the registry; `--model-type` and `--run-name` override either.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from thinksafe.engines import pick_backend
from thinksafe.errors import ThinksafeError
from thinksafe.io import read_json, sha256_of_files
from thinksafe.merge import base_model_of, is_merged_as, locate, merge_adapter
from thinksafe.registry import FAMILIES, Family, base_run_name, get_family, resolve_model
from thinksafe.replicas import make_generators
from thinksafe.train.common import RUN_INFO, RUN_RECORD, read_run_record

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


class EvaluateError(ThinksafeError, ValueError):
    pass


@dataclass(frozen=True)
class EvalModel:
    requested: str  # what the user typed
    source: str  # what generation loads: a hub id, a directory or "demo" (the base, for an adapter)
    family: Family
    run_name: str
    is_base: bool  # an untouched model (registry, hub or a dir no training run here produced)
    adapter: Path | None = None
    merged_dir: Path | None = None  # where an adapter is merged when the backend cannot serve LoRA
    lora_rank: int | None = None

    def describe(self) -> dict:
        return {"requested": self.requested, "source": self.source, "family": self.family.name,
                "adapter": str(self.adapter) if self.adapter else None}


def resolve_eval_model(model: str, run_name: str | None = None, model_type: str | None = None) -> EvalModel:
    """A directory (adapter or model) or a registry/hub name -> what to load and the run it belongs to."""
    path = Path(model)
    if path.is_dir():
        if (path / ADAPTER_CONFIG).exists():
            return _adapter_model(model, path, run_name, model_type)
        if (path / MODEL_CONFIG).exists():
            family, name, is_base = dir_identity(path, None, run_name, model_type)
            return EvalModel(model, str(path), family, name, is_base)
        raise EvaluateError(
            f"{model} is neither a model directory ({MODEL_CONFIG}) nor a LoRA adapter ({ADAPTER_CONFIG}): "
            "pass a merged model dir, an adapter dir, a hub id, model_type/size or demo"
        )
    if path.exists():
        raise EvaluateError(f"{model} is a file: pass a model or adapter directory, a hub id, model_type/size or demo")
    spec = resolve_model(model, model_type=model_type)
    return EvalModel(model, spec.source, spec.family, run_name or base_run_name(spec), is_base=True)


def _adapter_model(model: str, path: Path, run_name: str | None, model_type: str | None) -> EvalModel:
    base = base_model_of(path)
    family, name, is_base = dir_identity(path, base, run_name, model_type)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    _, merged_dir = locate(path)
    return EvalModel(model, base, family, name, is_base, adapter=path, merged_dir=merged_dir,
                     lora_rank=config.get("r"))


def training_run(model_dir: Path) -> dict | None:
    """{run, family, model} of the training run whose adapter or merged dir this is (its
    run_record.json sits in the dir above); None for a dir no training run produced. A record
    that lacks the run or the base model (GRPO runs, runs trained before records named them)
    is completed from the finished run's run_info.json."""
    run_dir = model_dir.absolute().parent  # not resolve(): a linked model dir belongs to the run it is linked into
    record = read_run_record(run_dir)
    if record is None:
        return None
    info = read_json(run_dir / RUN_INFO) if (run_dir / RUN_INFO).exists() else {}
    return {"run": record.get("run_name") or info.get("run"), "family": record.get("family"),
            "model": record.get("settings", {}).get("model") or info.get("model")}


def registry_family(source: str | None) -> Family | None:
    """The family the registry gives a registry name or hub id; None for a local directory."""
    if not source or Path(source).expanduser().exists():
        return None
    return resolve_model(source).family


def dir_identity(path: Path, base: str | None, run_name: str | None,
                 model_type: str | None) -> tuple[Family, str, bool]:
    """(family, run name, is base) of a model dir, or of an adapter dir whose base model is `base`."""
    run = training_run(path)
    if run is not None:
        named = model_type or run["family"]
        family = get_family(named) if named else registry_family(run["model"])
        name, is_base = run_name or run["run"], False
        where = f"its training run's {RUN_RECORD}"
    else:
        family = get_family(model_type) if model_type else registry_family(base)
        is_base = base is None  # a model dir no training run produced is untouched; an adapter is trained
        name = run_name
        if name is None and is_base and family is not None:  # named as the registry names a hub model
            name = base_run_name(resolve_model(str(path), model_type=family.name))
        where = f"a {RUN_RECORD} in the directory above it (it is not inside a training run)"
    if family is None:
        raise EvaluateError(f"{path}: neither --model-type nor {where} gives its model family; "
                            f"pass --model-type ({', '.join(FAMILIES)})")
    if name is None:
        raise EvaluateError(f"{path}: neither --run-name nor {where} gives its run name; pass --run-name")
    return family, name, is_base


def model_version(model: EvalModel) -> str | None:
    """sha256 of the run_info.json of the training run a model dir belongs to: results of a run
    trained again (--overwrite) are not the new model's results. None for a hub or base model."""
    directory = model.adapter or (Path(model.source) if Path(model.source).is_dir() else None)
    run_info = directory.resolve().parent / RUN_INFO if directory is not None else None
    return sha256_of_files([run_info]) if run_info is not None and run_info.exists() else None


# --- loading ---------------------------------------------------------------------------------


def choose_backend(backend: str, model: EvalModel, work_tokens: int | None = None):
    """The generation backend (a BackendChoice) for `model` and about `work_tokens` generated tokens."""

    try:
        return pick_backend(backend, work_tokens, adapter=model.adapter is not None)
    except (ValueError, RuntimeError) as err:
        raise EvaluateError(str(err)) from None


def merged_source(model: EvalModel) -> str:
    """The float32 merged copy of an adapter, made once (thinksafe.merge) and reused afterwards."""

    assert model.adapter is not None and model.merged_dir is not None
    if is_merged_as(model.merged_dir):
        return str(model.merged_dir)
    logger.info("merging %s into %s (once; reused by later evaluations)", model.adapter, model.merged_dir)
    return str(merge_adapter(model.adapter, model.merged_dir, base=model.source))


def loadable_source(model: EvalModel) -> str:
    """What a backend without LoRA serving loads: the merged copy of an adapter, else the model."""
    return merged_source(model) if model.adapter is not None else model.source


def make_policy_generator(model: EvalModel, backend, args):
    common = {"device": args.device, "batch_size": args.batch_size, "seed": args.seed,
              "tensor_parallel_size": args.tensor_parallel_size,
              "gpu_memory_utilization": args.gpu_memory_utilization}
    common = {k: v for k, v in common.items() if v is not None}
    replicas = {"data_parallel": getattr(args, "data_parallel", 1), "address": getattr(args, "ray_address", None)}
    if model.adapter is not None and backend.name == "vllm":  # LoRA served directly, no merge
        # the base model's engine, the adapter through vLLM's LoRARequest on every request (each replica's)
        return make_generators(model.source, model.family, backend, enable_lora=True,
                               max_lora_rank=max(model.lora_rank or 0, 16), adapter=str(model.adapter),
                               **replicas, **common)
    return make_generators(loadable_source(model), model.family, backend, **replicas, **common)
