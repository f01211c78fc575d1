"""`thinksafe merge`: merged weights give the logits of base + adapter; full models pass through."""

from __future__ import annotations

import torch

from thinksafe.registry import paths_for_name


def saved_adapter(model_dir, run_dir):
    from peft import get_peft_model

    from thinksafe.models import load_model, load_tokenizer
    from thinksafe.train.common import lora_config

    model = get_peft_model(load_model(str(model_dir), device="cpu", dtype=torch.float32), lora_config(4, None, 0.0))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    adapter = run_dir / "adapter"
    model.save_pretrained(adapter)
    load_tokenizer(str(model_dir)).save_pretrained(adapter)
    return model.eval()


def test_merged_logits_equal_base_plus_adapter(tiny_qwen3, tmp_path):
    from thinksafe.merge import main
    from thinksafe.models import load_model, load_tokenizer

    paths = paths_for_name("tiny_run", root=tmp_path)
    peft_model = saved_adapter(tiny_qwen3, paths.run_dir)
    assert main([str(paths.run_dir), "--dtype", "float32"]) == 0
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
    assert merge(paths.adapter, dtype=torch.float32) == paths.merged
    assert merge(tiny_qwen3) == tiny_qwen3  # a plain model directory passes through
    import pytest

    with pytest.raises(MergeError):
        merge(tmp_path / "missing")
