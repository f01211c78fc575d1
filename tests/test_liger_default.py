"""Liger's layer kernels by default on a GPU (issue 31): how the default is chosen, what the run records say,
and, on a CUDA GPU with liger-kernel, that they train what the plain layers train."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from thinksafe.train.config import liger_layers_by_default


def parse(*flags):
    from thinksafe.train.sft import parse_args

    return parse_args(["--model", "demo", "--dataset", "thinksafe", "--device", "cpu", "--report-to", "none", *flags])


def test_on_a_cpu_the_default_is_off_and_a_given_value_always_wins():
    from thinksafe.train.sft import liger_kernels

    _, _, sft = parse()
    assert sft.use_liger_kernel is False and liger_kernels(sft) == {"liger": False, "chosen_by": "default"}
    _, _, sft = parse("--use_liger_kernel", "false")
    assert liger_kernels(sft) == {"liger": False, "chosen_by": "flag"}
    _, _, sft = parse("--use_liger_kernel", "true")  # given: kept even where it cannot run (TRL then says why)
    assert sft.use_liger_kernel is True and liger_kernels(sft) == {"liger": True, "chosen_by": "flag"}


def test_on_cuda_the_default_is_on_only_when_liger_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", SimpleNamespace())
    assert liger_layers_by_default("cuda") is True
    assert liger_layers_by_default("cuda:1") is True
    assert liger_layers_by_default("cpu") is False
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # `import` raises ImportError
    assert liger_layers_by_default("cuda") is False


def test_the_run_record_and_info_say_which_kernels_ran_and_a_resume_may_change_them(tmp_path):
    from thinksafe.registry import run_paths
    from thinksafe.train.common import record_differences
    from thinksafe.train.sft import run_config, run_record

    records = []
    for flags in ((), ("--use_liger_kernel", "true")):
        model_cfg, run, sft = parse(*flags)
        cfg = run_config(model_cfg, run, sft)
        records.append(run_record(model_cfg, run, sft, cfg, run_paths(cfg), SimpleNamespace(sha256="0" * 64)))
    assert records[0]["kernels"] == {"liger": False, "chosen_by": "default"}
    assert records[1]["kernels"] == {"liger": True, "chosen_by": "flag"}
    # kernels change how a step is computed, not what it learns: not a setting that blocks a resume
    assert record_differences(records[0], records[1]) == ""


def liger_imports() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


ON_GPU_WITH_LIGER = torch.cuda.is_available() and liger_imports()
# A small Qwen3 (the architecture thinksafe's GPU recipes train) so the test takes seconds
SMALL_QWEN3 = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, vocab_size=8192, tie_word_embeddings=True)
# (loss relative error, update relative error (L2), update cosine) allowed. float32: the kernels compute
# the same functions, so only summation order differs. bfloat16, as `thinksafe train` runs on a GPU: Liger's
# RMSNorm/SwiGLU/RoPE round their outputs differently from torch's, and a KL between two near-equal
# distributions is a small difference of bf16-rounded logits.
TOLERANCES = {torch.float32: (1e-4, 1e-3, 0.99999), torch.bfloat16: (1e-2, 5e-2, 0.998)}


def one_step(kind: str, liger: bool, dtype=torch.bfloat16, seq: int = 512, device: str = "cuda"):
    """(loss, {adapter parameter: gradient}) of one micro-batch through KLSFTTrainer, Liger's layers applied
    exactly as `thinksafe train` has them applied (TRL's config, transformers' apply_liger_kernel at train start)."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.integrations.liger import apply_liger_kernel
    from trl import SFTConfig

    from bench.train_step import dummy_tokenizer, make_batch, placeholder_dataset
    from thinksafe.train.common import lora_config
    from thinksafe.train.data import make_collator
    from thinksafe.train.kl import KLSFTTrainer

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**SMALL_QWEN3, rope_theta=1e6), dtype=dtype,
                                                 attn_implementation="sdpa").train()
    import tempfile

    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, bf16=dtype == torch.bfloat16,
                     use_cpu=device == "cpu", report_to=[],
                     completion_only_loss=True, remove_unused_columns=False, max_length=None,
                     gradient_checkpointing=True, use_liger_kernel=liger, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = KLSFTTrainer(model=model, args=args, train_dataset=placeholder_dataset(), processing_class=dummy_tokenizer(),
                           data_collator=make_collator(0), peft_config=lora_config(8, None, 0.0))
    torch.manual_seed(1)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # non-zero, so the base and the adapter differ and lora_A gets a gradient too
            param.data.normal_(0, 0.1)
    if liger:
        apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)  # Trainer.train's own call
    # each run is what it says: Liger's modules in the Liger run only (its patch also rebinds names in
    # transformers' Qwen3 module, undone after each Liger run: liger_patch_undone)
    # (Liger binds its forward onto the model's own modules and renames them: _get_name() gives "LigerRMSNorm")
    assert any(m._get_name().startswith("Liger") for m in trainer.model.modules()) == liger
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.enable_input_require_grads()
    batch = make_batch(seq, SMALL_QWEN3["vocab_size"], device, kind)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@contextmanager
def liger_patch_undone():
    """Liger's patch of an instance also replaces names in transformers' Qwen3 module for the whole process
    (apply_rotary_pos_emb, Qwen3RMSNorm, Qwen3MLP): restored here, or every later "plain" model would be
    built and run with Liger's kernels (as it was before this was written: the two runs then agreed exactly)."""
    from transformers.models.qwen3 import modeling_qwen3

    saved = dict(vars(modeling_qwen3))
    try:
        yield
    finally:
        for name in set(vars(modeling_qwen3)) - set(saved):
            delattr(modeling_qwen3, name)
        for name, value in saved.items():
            setattr(modeling_qwen3, name, value)


@pytest.mark.skipif(not ON_GPU_WITH_LIGER, reason="Liger's kernels are Triton: a CUDA GPU with liger-kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ce", "kl", "cached"])
def test_liger_layers_train_what_the_plain_layers_train(kind, dtype):
    """The loss and one step's adapter update (an SGD step's: -lr · the gradient) with and without Liger's
    layers, on a harmful row (CE), a benign row (exact KL) and a benign row with the stored top-k (cached KL)."""
    loss_rtol, update_rel_error, update_cosine = TOLERANCES[dtype]
    plain_loss, plain = one_step(kind, liger=False, dtype=dtype)
    with liger_patch_undone():
        liger_loss, liger = one_step(kind, liger=True, dtype=dtype)
    assert plain.keys() == liger.keys() and plain and all("lora" in n for n in plain)
    a = torch.cat([g.flatten() for g in plain.values()])
    b = torch.cat([liger[n].flatten() for n in plain])
    rel_error = float((a - b).norm() / a.norm())
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    print(f"liger agreement {kind} {dtype}: loss {plain_loss:.6f} vs {liger_loss:.6f} "
          f"(rel {abs(plain_loss - liger_loss) / abs(plain_loss):.2e}); update rel error {rel_error:.2e}, "
          f"cosine {cosine:.6f}")
    assert abs(plain_loss - liger_loss) <= loss_rtol * abs(plain_loss)
    assert rel_error <= update_rel_error and cosine >= update_cosine
