"""`thinksafe merge`: merged weights give the logits of base + adapter; full models pass through."""

from __future__ import annotations

import torch

from thinksafe.registry import paths_for_name


def saved_adapter(model_dir, run_dir, b_std: float = 0.3):
    from peft import get_peft_model

    from thinksafe.model_loading import load_model, load_tokenizer
    from thinksafe.train.common import lora_config

    model = get_peft_model(load_model(str(model_dir), device="cpu", dtype=torch.float32), lora_config(4, None, 0.0))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, b_std)
    adapter = run_dir / "adapter"
    model.save_pretrained(adapter)
    load_tokenizer(str(model_dir)).save_pretrained(adapter)
    return model.eval()


def test_merged_logits_equal_base_plus_adapter(tiny_qwen3, tmp_path):
    from thinksafe.merge import main
    from thinksafe.model_loading import load_model, load_tokenizer

    paths = paths_for_name("tiny_run", root=tmp_path)
    peft_model = saved_adapter(tiny_qwen3, paths.run_dir)
    assert main([str(paths.run_dir)]) == 0  # float32 by default
    merged = load_model(str(paths.merged), device="cpu", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
        base = load_model(str(tiny_qwen3), device="cpu", dtype=torch.float32)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)
    tokenizer = load_tokenizer(str(paths.merged))  # requires a chat template
    assert tokenizer.chat_template == load_tokenizer(str(tiny_qwen3)).chat_template


def test_adapter_dir_argument_and_passthrough(tiny_qwen3, tmp_path, capsys):
    from thinksafe.merge import MergeError, merge

    paths = paths_for_name("tiny_run", root=tmp_path)
    saved_adapter(tiny_qwen3, paths.run_dir)
    assert merge(paths.adapter) == paths.merged
    assert merge(tiny_qwen3) == tiny_qwen3  # a plain model directory passes through
    import pytest

    with pytest.raises(MergeError):
        merge(tmp_path / "missing")


def test_the_default_merge_keeps_a_small_update_that_a_bf16_merge_rounds_away(tiny_qwen3, tmp_path):
    """A small update (as a low learning rate leaves) survives the default float32 merge exactly and
    largely vanishes in bf16; a bf16 merge left by older code is redone."""
    from safetensors.torch import load_file

    from thinksafe.merge import merge, saved_dtype

    paths = paths_for_name("tiny_run", root=tmp_path)
    peft_model = saved_adapter(tiny_qwen3, paths.run_dir, b_std=2e-4)
    name, module = next((n, m) for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "q_proj" in n)
    update = (module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]).detach()
    key = name.replace("base_model.model.", "") + ".weight"
    base = load_file(str(next(tiny_qwen3.glob("*.safetensors"))))[key].float()

    def merged_update(target):
        return load_file(str(next(target.glob("*.safetensors"))))[key].float() - base

    bf16_dir = merge(paths.adapter, output=tmp_path / "bf16", dtype="bfloat16")
    assert saved_dtype(bf16_dir) == "bfloat16"
    lost = (merged_update(bf16_dir) - update).norm() / update.norm()
    assert lost > 0.5, lost  # most of the update is gone (0.78 on the demo's CE adapter)
    merged = merge(paths.adapter, output=tmp_path / "bf16")  # the default redoes it in float32
    assert saved_dtype(merged) == "float32"
    torch.testing.assert_close(merged_update(merged), update, rtol=0, atol=1e-7)
    written = next(merged.glob("*.safetensors")).stat().st_mtime_ns
    assert merge(paths.adapter, output=merged) == merged  # a float32 merge is reused as is
    assert next(merged.glob("*.safetensors")).stat().st_mtime_ns == written
