"""How much of a LoRA update survives a merge saved in bf16 (what `thinksafe merge --dtype bfloat16`,
and every merge before the float32 default, wrote).

    python bench/merge_rounding.py outputs/runs/<run> [...]

Per run: ΔW = (alpha / r) B A for every adapted weight, computed from the adapter in float32, against
the update a bf16 merge stores: W in bf16 plus ΔW, rounded to bf16, minus W. Prints the error
on the update's norm and the share of entries whose update was erased entirely.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def rounding_loss(run_dir: Path) -> dict:
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    base = weights(Path(config["base_model_name_or_path"]))
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    error = norm = erased = entries = 0.0
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
        name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        # the old merge loaded the base in bf16 (the real models' own dtype) and added ΔW there
        w = base[name].bfloat16().float()
        update = scale * (lora_b.float() @ lora_a.float())
        stored = (w + update).bfloat16().float() - w
        error += (stored - update).pow(2).sum().item()
        norm += update.pow(2).sum().item()
        erased += ((stored == 0) & (update != 0)).sum().item()
        entries += update.numel()
    return {"run": run_dir.name, "update_norm_error": (error / norm) ** 0.5, "entries_erased": erased / entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    for run in parser.parse_args().runs:
        result = rounding_loss(run)
        print(f"{result['run']}: bf16 merge: {result['update_norm_error']:.1%} error on the update's norm, "
              f"update erased in {result['entries_erased']:.1%} of entries")


if __name__ == "__main__":
    main()
