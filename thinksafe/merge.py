"""`thinksafe merge <run dir | adapter dir>`: LoRA adapter + base -> a standalone model dir for vLLM.

The merged directory (registry: runs/<name>/merged) holds the weights, the tokenizer and its chat
template. A run without an adapter (full fine-tuning saves straight to `merged`) or a plain model
directory passes through unchanged. Writing goes to a staging dir renamed at the end, so parallel
evaluation jobs never see a half-written merge (the paper's jobs raced on one directory).

The merge is computed in float32 and saved in float32 by default. A LoRA update is small beside the
weight it is added to: rounded into bf16 weights, W + ΔW falls back to W wherever ΔW is under half
a bf16 step of W. On the demo's CE adapter (lr 5e-4) a bf16 merge erased the update entirely in 80%
of its entries (78% error on the update's norm; bench/README.md), and the H200 evaluation of that
bf16 merge answered unlike the adapter it came from. `--dtype bfloat16` halves the size for export,
knowing that. Served at 16 bits (vLLM), even a float32 merge is rounded again: evaluation with vLLM
serves the adapter itself (LoRARequest), which keeps ΔW apart from W.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from thinksafe.console import say
from thinksafe.errors import ThinksafeError
from thinksafe.locks import writer_lock
from thinksafe.model_loading import load_model, load_tokenizer, save_model_atomically
from thinksafe.registry import RunPaths, paths_for_name

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


class MergeError(ThinksafeError, ValueError):
    """Nothing mergeable at the given path."""


def locate(path: Path) -> tuple[Path | None, Path]:
    """(adapter dir or None, output dir) for a run dir, an adapter dir, or a plain model dir."""
    if not path.exists():
        raise MergeError(f"{path} does not exist: pass a run directory (runs/<name>) or an adapter directory")
    if (path / ADAPTER_CONFIG).exists():
        run_dir = path.parent if path.name == "adapter" else path
        return path, run_paths_of(run_dir).merged if path.name == "adapter" else path.parent / f"{path.name}-merged"
    paths = run_paths_of(path)
    if (paths.adapter / ADAPTER_CONFIG).exists():
        return paths.adapter, paths.merged
    if (paths.merged / MODEL_CONFIG).exists():
        return None, paths.merged
    if (path / MODEL_CONFIG).exists():
        return None, path
    raise MergeError(f"{path} holds no adapter ({ADAPTER_CONFIG}) and no model ({MODEL_CONFIG})")


def run_paths_of(run_dir: Path) -> RunPaths:
    """The registry's paths for an existing run dir (<root>/runs/<name>)."""
    return paths_for_name(run_dir.name, root=run_dir.parent.parent)


def base_model_of(adapter: Path) -> str:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter / ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


DEFAULT_MERGE_DTYPE = "float32"
MERGE_DTYPES = ("float32", "bfloat16", "float16")


def saved_dtype(model_dir: Path) -> str | None:
    """The dtype a model dir's config.json says its weights are saved in."""
    config = json.loads((model_dir / MODEL_CONFIG).read_text())
    return config.get("dtype") or config.get("torch_dtype")


def is_merged_as(target: Path, dtype: str = DEFAULT_MERGE_DTYPE) -> bool:
    """A finished merge in `dtype`: an older merge in another dtype (bf16 was the default) is redone."""
    return (target / MODEL_CONFIG).exists() and saved_dtype(target) == dtype


def merge_adapter(adapter: Path, output: Path, base: str | None = None, dtype: str = DEFAULT_MERGE_DTYPE) -> Path:
    """Load base + adapter on CPU in float32, fold the LoRA weights in, cast to `dtype`, save weights
    + tokenizer atomically."""
    import torch
    from peft import PeftModel

    if dtype not in MERGE_DTYPES:
        raise MergeError(f"merge dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)}")
    base = base or base_model_of(adapter)
    model = load_model(base, device="cpu", dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(getattr(torch, dtype))
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").exists() else base
    tokenizer = load_tokenizer(tokenizer_source)
    return save_model_atomically(merged, tokenizer, output)


def merge(path: str | Path, output: str | Path | None = None, overwrite: bool = False,
          dtype: str = DEFAULT_MERGE_DTYPE) -> Path:
    adapter, target = locate(Path(path))
    target = Path(output) if output else target
    if adapter is None:
        return target  # nothing to merge: the run already is a full model
    # the run dir when merging into its `merged` (training writes there too), else the output dir
    owner = target.parent if target.name == "merged" and (target.parent / "adapter").is_dir() else target
    with writer_lock(owner, "run directory" if owner != target else "--output"):
        if is_merged_as(target, dtype) and not overwrite:
            return target
        return merge_adapter(adapter, target, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thinksafe merge", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run directory (outputs/runs/<name>) or an adapter directory")
    parser.add_argument("--output", default=None, help="where to write (default: the run's merged dir)")
    parser.add_argument("--overwrite", action="store_true", help="re-merge even when the merged dir exists")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default=DEFAULT_MERGE_DTYPE,
                        help="dtype of the saved weights; the merge itself is float32. bfloat16 halves the size "
                             "but rounds away most of a LoRA update (see the module docstring)")
    args = parser.parse_args(argv)
    say(str(merge(args.path, args.output, args.overwrite, args.dtype)))
    return 0
