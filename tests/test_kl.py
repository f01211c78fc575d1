"""The KL term against an independent full-logit computation, label positions, adapter and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rows_file

from thinksafe.registry import FAMILIES

IGNORE = -100


def make_trainer(model_dir, tmp_path, family, use_kl=True, masking=True, n=4, batch=4, lora_init_scale=0.5,
                 weighting="row", varied=False, kl_coef=1.0):
    """A KLSFTTrainer on a tiny model with non-zero LoRA weights (so model != base)."""
    from trl import SFTConfig

    from thinksafe.model_loading import load_model, load_tokenizer
    from thinksafe.registry import resolve_model
    from thinksafe.train.common import lora_config
    from thinksafe.train.data import build_train_dataset, make_collator, read_records, to_rows
    from thinksafe.train.kl import KLSFTTrainer

    path, _ = rows_file(tmp_path, n, varied=varied)
    spec = resolve_model(str(model_dir), model_type=family)
    tokenizer = load_tokenizer(str(model_dir))
    from thinksafe.registry import resolve_dataset

    rows = to_rows(read_records(resolve_dataset(str(path)), str(path)), "t", need_labels=True)
    dataset = build_train_dataset(rows, tokenizer, spec.family, use_kl, cache_root=tmp_path / "cache")
    model = load_model(str(model_dir), device="cpu", dtype=torch.float32).train()
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=batch, report_to=[],
                     use_cpu=True, completion_only_loss=masking, remove_unused_columns=False, max_length=512,
                     learning_rate=1e-3, lr_scheduler_type="constant")
    trainer = KLSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           data_collator=make_collator(tokenizer.pad_token_id),
                           peft_config=lora_config(4, None, 0.0), weighting=weighting, kl_coef=kl_coef)
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, lora_init_scale)
    return trainer, tokenizer, rows, spec


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to("cpu") for k, v in batch.items()}


def prompt_lengths(tokenizer, rows, family):
    """Independent: the number of tokens of the rendered generation prompt."""
    lengths = []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row.prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


def full_logits(trainer, batch, adapter: bool):
    model = trainer.model
    with torch.no_grad():
        if adapter:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def reference_token_losses(trainer, batch, kl_coef=1.0):
    """Independent, from full logits: per-token CE (harmful rows) and KL(base || model) (benign rows).

    Returns [B, T-1] losses and the [B, T-1] mask of the positions that count.
    """
    logits = full_logits(trainer, batch, adapter=True)[:, :-1].float()
    base = full_logits(trainer, batch, adapter=False)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    kl_rows = batch["kl"][:, None]
    ce_tok = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    kl_tok = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(base, -1), log_target=True, reduction="none").sum(-1)
    return torch.where(kl_rows, kl_coef * kl_tok, ce_tok), labels != IGNORE


def reference_loss(trainer, batches, weighting="row", num_items=None, kl_coef=1.0):
    """The step's loss over micro-batches: the mean over rows of each row's mean, or over all tokens."""
    per_batch = [reference_token_losses(trainer, batch, kl_coef) for batch in batches]
    if weighting == "token":
        total = sum(losses[mask].sum() for losses, mask in per_batch)
        return total / (num_items or sum(int(mask.sum()) for _, mask in per_batch))
    row_means = [losses[i][mask[i]].mean() for losses, mask in per_batch for i in range(len(mask)) if mask[i].any()]
    return torch.stack(row_means).mean()


def test_forward_kl_per_token_matches_kl_div():
    from thinksafe.train.kl import forward_kl_per_token

    torch.manual_seed(0)
    n, hidden, vocab = 37, 16, 70000  # vocab > one 32k tile: the chunking is exercised
    head_s, head_t = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    head_t.weight.data = head_s.weight.data + 0.05 * torch.randn_like(head_s.weight)
    h_s = torch.randn(n, hidden, requires_grad=True)
    h_t = torch.randn(n, hidden)
    ours = forward_kl_per_token(h_s, head_s, h_t, head_t)
    expected = F.kl_div(F.log_softmax(head_s(h_s), -1), F.log_softmax(head_t(h_t), -1), log_target=True,
                        reduction="none").sum(-1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    grad_ours, = torch.autograd.grad(ours.sum(), h_s)
    grad_ref, = torch.autograd.grad(expected.sum(), h_s)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_items", [None, 57])
def test_token_weighted_mixed_batch_equals_full_logit_reference(tiny_qwen3, tmp_path, num_items):
    trainer, *_ = make_trainer(tiny_qwen3, tmp_path, "qwen", weighting="token", varied=True)
    batch = first_batch(trainer)
    assert batch["kl"].any() and (~batch["kl"]).any(), "the batch must mix KL and CE rows"
    expected = reference_loss(trainer, [batch], "token", num_items)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    assert trainer._metrics["train"]["kl_loss"] and trainer._metrics["train"]["ce_loss"]


def accumulate(trainer, batches, num_items=None):
    """What one optimizer step sums: the trainer counts the step's rows, then one loss per micro-batch."""
    trainer.model.train()
    trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    return sum(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items) for batch in batches)


def micro_batches(trainer):
    return [{k: v.to("cpu") for k, v in batch.items()} for batch in trainer.get_train_dataloader()]


def test_row_weighting_is_the_mean_of_row_means_over_accumulated_micro_batches(tiny_qwen3, tmp_path):
    """The default: rows of very different lengths weigh the same, across two accumulated micro-batches."""
    trainer, *_ = make_trainer(tiny_qwen3, tmp_path, "qwen", batch=2, varied=True)
    batches = micro_batches(trainer)
    assert len(batches) == 2 and trainer.weighting == "row"
    expected = reference_loss(trainer, batches, "row")
    torch.testing.assert_close(accumulate(trainer, batches, num_items=123).detach(), expected, rtol=1e-5, atol=1e-5)
    assert trainer.rows_in_step == 4
    assert not torch.allclose(expected, reference_loss(trainer, batches, "token"), rtol=1e-3)  # the rows differ


@pytest.mark.parametrize("weighting", ["row", "token"])
def test_kl_coef_scales_the_kl_term_only(tiny_qwen3, tmp_path, weighting):
    """kl_coef 3: CE rows as before, each KL token weighs 3x, against the full-logit reference."""
    trainer, *_ = make_trainer(tiny_qwen3, tmp_path, "qwen", batch=2, weighting=weighting, varied=True, kl_coef=3.0,
                               lora_init_scale=2.0)
    batches = micro_batches(trainer)
    num_items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    expected = reference_loss(trainer, batches, weighting, kl_coef=3.0)
    assert (expected - reference_loss(trainer, batches, weighting)).abs() > 1e-3  # the KL term is there to scale
    torch.testing.assert_close(accumulate(trainer, batches, num_items).detach(), expected, rtol=1e-5, atol=1e-5)
    assert trainer._metrics["train"]["kl_loss"]  # logged before the weight: comparable across kl_coef


def test_token_weighting_over_accumulated_micro_batches(tiny_qwen3, tmp_path):
    trainer, *_ = make_trainer(tiny_qwen3, tmp_path, "qwen", batch=2, weighting="token", varied=True)
    batches = micro_batches(trainer)
    num_items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    expected = reference_loss(trainer, batches, "token")
    torch.testing.assert_close(accumulate(trainer, batches, num_items).detach(), expected, rtol=1e-5, atol=1e-5)


def test_the_issue_example_row_weighting_gives_kl_rows_half_the_weight():
    """4 refusals of 300 tokens + 4 benign rows of 3,000: KL rows weigh 50% by row, 91% by token."""
    from thinksafe.train.kl import row_means_sum, row_weighted_loss, token_weighted_loss

    lengths = [300] * 4 + [3000] * 4
    row_index = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    kl_token = row_index >= 4
    losses = torch.rand(len(row_index), dtype=torch.float64, requires_grad=True)
    row_means, rows = row_means_sum(losses, row_index, len(lengths))
    grad_row, = torch.autograd.grad(row_weighted_loss(row_means, rows), losses)
    grad_token, = torch.autograd.grad(
        token_weighted_loss(losses[~kl_token].sum(), losses[kl_token].sum(), len(losses)), losses)
    assert grad_row[kl_token].sum().item() == pytest.approx(0.5)
    assert grad_token[kl_token].sum().item() == pytest.approx(12000 / 13200)
    assert row_weighted_loss(row_means, rows).item() == pytest.approx(
        sum(losses[row_index == i].mean().item() for i in range(8)) / 8)


def test_processes_divide_by_the_rows_of_all_of_them():
    """DDP averages gradients over processes: each one's sum / all rows x processes = the global mean."""
    from thinksafe.train.kl import row_weighted_loss

    per_process = [torch.tensor(3.0), torch.tensor(5.0)]  # summed row means, 2 rows on each process
    averaged = sum(row_weighted_loss(s, rows_in_step=4, process_scale=2) for s in per_process) / 2
    assert averaged.item() == pytest.approx((3.0 + 5.0) / 4)


def test_all_benign_batch_is_pure_kl(tiny_r1, tmp_path):
    trainer, *_ = make_trainer(tiny_r1, tmp_path, "r1-distill")
    batch = first_batch(trainer)
    batch = {k: v[batch["kl"]] for k, v in batch.items()}
    expected = reference_loss(trainer, [batch])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    assert expected > 0


@pytest.mark.parametrize("family,fixture", [("qwen", "tiny_qwen3"), ("r1-distill", "tiny_r1")])
@pytest.mark.parametrize("use_kl,masking", [(False, True), (True, True), (False, False), (True, False)])
def test_label_positions_are_exactly_the_prompt(family, fixture, use_kl, masking, tmp_path, request):
    """Masking: -100 on exactly the generation-prompt tokens, in every mode (the paper lost it with KL)."""
    trainer, tokenizer, rows, _ = make_trainer(request.getfixturevalue(fixture), tmp_path, family, use_kl, masking)
    from thinksafe.train.data import tokenize_rows

    batch = first_batch(trainer)
    by_ids = {tuple(ids): i for i, ids in enumerate(tokenize_rows(rows, tokenizer, FAMILIES[family], use_kl)["input_ids"])}
    lengths = prompt_lengths(tokenizer, rows, FAMILIES[family])
    for input_ids, labels, attention, kl in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                batch["kl"]):
        real = int(attention.sum())
        index = by_ids[tuple(input_ids[:real].tolist())]
        cut = lengths[index] if masking else 0
        assert (labels[:cut] == IGNORE).all()
        assert torch.equal(labels[cut:real], input_ids[cut:real])
        assert (labels[real:] == IGNORE).all()
        assert bool(kl) == (use_kl and rows[index].harmful is False)


def test_adapter_disabled_gives_base_logits(tiny_qwen3, tmp_path):
    from thinksafe.model_loading import load_model

    trainer, *_ = make_trainer(tiny_qwen3, tmp_path, "qwen")
    batch = first_batch(trainer)
    base = load_model(str(tiny_qwen3), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(full_logits(trainer, batch, adapter=False), expected)
    assert not torch.allclose(full_logits(trainer, batch, adapter=True), expected)


def test_gradients_reach_lora_parameters_only(tiny_qwen3, tmp_path):
    trainer, *_ = make_trainer(tiny_qwen3, tmp_path, "qwen")
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=50).backward()
    with_grad = {n for n, p in trainer.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    lora = {n for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert with_grad == lora


def test_row_means_skip_rows_without_tokens():
    from thinksafe.train.kl import row_means_sum

    total, rows = row_means_sum(torch.tensor([1.0, 3.0, 6.0]), torch.tensor([0, 0, 2]), n_rows=4)
    assert (total.item(), rows) == (2.0 + 6.0, 2)


def test_unknown_weighting_is_refused(tiny_qwen3, tmp_path):
    with pytest.raises(ValueError, match="row, token"):
        make_trainer(tiny_qwen3, tmp_path, "qwen", weighting="rows")
