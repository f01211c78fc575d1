"""The cached KL reference (--kl_reference cached): its math against full-vocabulary KL computed by hand,
the stored top-k against the model's own logits, and its fidelity to the exact KL on the demo model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thinksafe.reference_topk import TopK, read_store, row_key, tail_from_logprobs, topk_from_logits, write_store
from thinksafe.train.kl import cached_kl_per_token, topk_tail_kl


def coarsened_kl_by_hand(base_logits, model_logits, ids):
    """KL between the two distributions reduced to k+1 outcomes (each top-k token, everything else),
    built from full float64 softmaxes."""
    p, q = base_logits.double().softmax(-1), model_logits.double().softmax(-1)
    p_top, q_top = p.gather(1, ids), q.gather(1, ids)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    return (p_top * (p_top / q_top).log()).sum(-1) + p_tail * (p_tail / q_tail).log()


def test_topk_tail_kl_is_the_coarsened_kl_and_the_full_kl_at_k_equal_v():
    torch.manual_seed(0)
    n, vocab, k = 6, 50, 8
    base, model = torch.randn(n, vocab) * 3, torch.randn(n, vocab) * 3
    ids, logprobs, tail = topk_from_logits(base, k)
    ids_t = torch.from_numpy(ids).long()
    got = topk_tail_kl(model, ids_t, torch.from_numpy(logprobs), torch.from_numpy(tail))
    # float16 log-probs: the bucket probabilities are rounded to ~1e-3 relative
    torch.testing.assert_close(got.double(), coarsened_kl_by_hand(base, model, ids_t), rtol=5e-3, atol=1e-4)
    full = F.kl_div(model.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert (got <= full + 1e-3).all()  # coarsening never adds divergence
    ids_all, logprobs_all, tail_all = topk_from_logits(base, vocab)
    assert np.abs(tail_all).max() < 1e-6
    at_v = topk_tail_kl(model, torch.from_numpy(ids_all).long(), torch.from_numpy(logprobs_all),
                        torch.from_numpy(tail_all))
    torch.testing.assert_close(at_v, full, rtol=5e-3, atol=1e-4)


def test_cached_kl_gradient_matches_the_coarsened_kl_by_hand_across_tiles():
    torch.manual_seed(1)
    n, hidden, vocab, k = 7, 16, 40, 5
    head = torch.nn.Linear(hidden, vocab, bias=False)
    base_logits = torch.randn(n, vocab) * 2
    ids, logprobs, tail = (torch.from_numpy(a) for a in topk_from_logits(base_logits, k))
    h1 = torch.randn(n, hidden, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    got = cached_kl_per_token(h1, head, ids, logprobs, tail, tile=3)  # tiles of 3, 3, 1
    # The reference uses the float16-rounded base log-probs too, so the two differ only in the method.
    p_top = logprobs.double().exp()
    q = (h2.double() @ head.weight.double().T).log_softmax(-1)
    q_top = q.gather(1, ids.long())
    q_tail = torch.log1p(-q_top.exp().sum(-1))
    expected = (p_top * (logprobs.double() - q_top)).sum(-1) + torch.xlogy(tail.double(), tail.double()) \
        - tail.double() * q_tail
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad.float(), rtol=1e-3, atol=1e-5)


def coarsened_kl_of_the_head_by_hand(hidden, weight, bias, ids, logprobs, tail, scale=1.0, softcap=None):
    """The coarsened KL in float64 from the head's own parameters, by autograd on full softmaxes."""
    logits = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    q_top = logits.log_softmax(-1).gather(1, ids.long())
    q_tail = torch.log1p(-q_top.exp().sum(-1))
    tail = tail.double()
    return (logprobs.double().exp() * (logprobs.double() - q_top)).sum(-1) + torch.xlogy(tail, tail) - tail * q_tail


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cached_kl_gradients_in_hidden_weight_and_bias_match_float64_autograd(softcap):
    """The hand-written backward (and the soft-capped autograd path) against float64 autograd, with a
    trainable head and bias, a logit scale, per-token upstream weights (the row means) and tiles of 4, 4, 3."""
    torch.manual_seed(2)
    n, hidden, vocab, k = 11, 12, 30, 6
    weight = torch.randn(vocab, hidden) * 0.5
    bias = torch.randn(vocab) * 0.3
    ids, logprobs, tail = (torch.from_numpy(a) for a in topk_from_logits(torch.randn(n, vocab) * 2, k))
    h = torch.randn(n, hidden)
    upstream = torch.rand(n) + 0.5
    ours = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
    ref = [t.double().clone().requires_grad_(True) for t in (h, weight, bias)]
    head = torch.nn.Linear(hidden, vocab)
    head.weight, head.bias = torch.nn.Parameter(ours[1]), torch.nn.Parameter(ours[2])
    got = cached_kl_per_token(ours[0], head, ids, logprobs, tail, logit_scale=0.7, softcap=softcap, tile=4)
    expected = coarsened_kl_of_the_head_by_hand(*ref, ids, logprobs, tail, scale=0.7, softcap=softcap)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    (got * upstream).sum().backward()
    (expected * upstream.double()).sum().backward()
    for mine, theirs in zip((ours[0], head.weight, head.bias), ref):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-3, atol=1e-5)


def test_cached_kl_with_every_token_stored_has_the_full_kl_gradient():
    """k = V: no tail bucket, so the KL and its gradient are the full ones (finite, the empty tail
    contributing nothing)."""
    torch.manual_seed(3)
    n, hidden, vocab = 5, 8, 16
    head = torch.nn.Linear(hidden, vocab, bias=False)
    base_logits = torch.randn(n, vocab)
    ids, logprobs, tail = (torch.from_numpy(a) for a in topk_from_logits(base_logits, vocab))
    h1 = torch.randn(n, hidden, requires_grad=True)
    h2 = h1.detach().double().requires_grad_(True)
    got = cached_kl_per_token(h1, head, ids, logprobs, tail)
    full = F.kl_div((h2 @ head.weight.double().T).log_softmax(-1), logprobs.double().gather(
        1, ids.long().argsort(1)), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(got.double(), full.detach(), rtol=1e-4, atol=1e-6)
    got.sum().backward()
    full.sum().backward()
    assert torch.isfinite(h1.grad).all()
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-3, atol=1e-5)


def test_tail_from_logprobs_and_the_store_round_trip(tmp_path):
    torch.manual_seed(2)
    logits = torch.randn(9, 30)
    ids, logprobs, tail = topk_from_logits(logits, 4)
    full = logits.softmax(-1)
    torch.testing.assert_close(torch.from_numpy(tail), 1 - full.topk(4).values.sum(-1), rtol=1e-5, atol=1e-6)
    # vLLM gives log-probs only: the tail rebuilt from them is within float16's rounding
    assert np.allclose(tail_from_logprobs(logprobs), tail, atol=2e-3)
    entries = {row_key("q", "a"): TopK(np.arange(9, dtype=np.int32), ids, logprobs, tail),
               row_key("q", "b"): TopK(np.arange(2, dtype=np.int32), ids[:2], logprobs[:2], tail[:2])}
    write_store(tmp_path / "s.safetensors", entries, 4, {"model": "demo"})
    loaded, k = read_store(tmp_path / "s.safetensors")
    assert k == 4 and set(loaded) == set(entries)
    for key, entry in entries.items():
        for name in ("tokens", "ids", "logprobs", "tail"):
            assert np.array_equal(getattr(loaded[key], name), getattr(entry, name))


# Fidelity on the demo model, small enough for CI: bench/kl_cached.py measures the table in
# bench/README.md (4 rows x 40 tokens, k = 20, 64, 256); here 2 rows x 10 tokens at k = 20 and 256
# (the 2% KL target is asserted on the token-weighted error).
def test_cached_kl_fidelity_on_the_demo_model(demo_model):
    """Issue 20's targets on a few tokens: the stored top-k are the model's raw distribution; at k = 256
    the LoRA gradient cosine is >= 0.99 and the KL error small; more of the distribution never hurts."""
    from bench.kl_cached import aligned, demo_samples, fidelity, with_lora

    generator, samples = demo_samples(demo_model, 256, ["Explain why the sky is blue.",
                                                        "What is a good way to learn Python?"], max_new_tokens=10)
    samples = aligned(samples)
    assert samples, "no sample's generated ids equal training's tokenisation"
    # The stored top-k are the model's own raw logits at those positions (not the sampler's): against a
    # single forward of the training ids (compared on the top 20: deeper in the list, near-equal
    # log-probs may swap places between the two computations)
    input_ids, start, completion = samples[0]
    with torch.no_grad():
        logits = generator.model(input_ids=torch.tensor([input_ids])).logits[0, start - 1: len(input_ids) - 1]
    ids, logprobs, _ = topk_from_logits(logits, 20)
    assert np.array_equal(ids, completion.reference.ids[:, :20])
    # float16's step is 0.004 between 4 and 8: a left-padded, cached batch and this single forward
    # differ by ~1e-4 in float32, enough to round some values one step apart
    assert np.allclose(logprobs.astype(np.float32), completion.reference.logprobs[:, :20].astype(np.float32), atol=1e-2)

    at20, at256 = fidelity(with_lora(generator.model), samples, (20, 256))
    assert at20.exact_kl == at256.exact_kl > 0
    # the coarser KL is a lower bound of the finer one, so keeping more of the distribution never hurts
    assert at20.weighted_error >= at256.weighted_error and at20.tail > at256.tail
    assert at256.grad_cosine >= 0.99 and at256.weighted_error <= 0.02


def test_run_name_marks_the_cached_reference_and_forward_stays_default():
    from thinksafe.registry import RunConfig, resolve_model, run_name

    model = resolve_model("qwen", "0.6B")
    assert run_name(RunConfig(model, "thinksafe", 32, 3, use_kl=True)) == "qwen3-0.6B_thinksafe_r32_ep3_mask_kl"
    assert run_name(RunConfig(model, "thinksafe", 32, 3, use_kl=True, kl_reference="cached")) == \
        "qwen3-0.6B_thinksafe_r32_ep3_mask_klcached"


def test_reference_batch_puts_entry_j_on_the_jth_completion_token():
    from thinksafe.train.data import reference_batch

    examples = [{"ref_start": 2, "ref_ids": [[5, 6], [7, 8], [9, 10]],
                 "ref_logprobs": [[-1, -2], [-1, -3], [-1, -4]], "ref_tail": [0.1, 0.2, 0.3]},
                {"ref_start": 0, "ref_ids": [], "ref_logprobs": [], "ref_tail": []}]
    batch = reference_batch(examples, width=5)
    assert batch["ref_ids"][0, 2:].tolist() == [[5, 6], [7, 8], [9, 10]]
    assert batch["ref_ids"][0, :2].abs().sum() == 0 and batch["ref_ids"][1].abs().sum() == 0
    assert torch.allclose(batch["ref_tail"][0], torch.tensor([0, 0, 0.1, 0.2, 0.3]))
    # labels[:, 1:] at position t is token t+1: shifting the reference the same way pairs them
    assert batch["ref_logprobs"][0, 1:][1].tolist() == [-1, -2]


@pytest.mark.demo
def test_synthesize_with_stored_topk_then_train_with_the_cached_reference(tmp_path, output_root, demo_model):
    """`synthesize --store-reference-topk K` -> `train --use-kl --kl_reference cached`, end to end."""
    import json

    from thinksafe import cli
    from thinksafe.io import read_json, read_jsonl
    from thinksafe.reference_topk import REFERENCE_TOPK_FILE

    prompts = tmp_path / "prompts.jsonl"
    # benign questions only: their rows are the KL rows (the demo recipe also keeps the ones cut at the
    # token limit, in unfinished_benign.jsonl); generation is most of this test's time
    rows = [{"instruction": q, "label": "vanilla_benign"} for q in ("What is 2 + 2?", "Name one colour.",
                                                                     "What is the capital of France?")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "data"
    k = 16
    synth = ["synthesize", "--model", "demo", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "24",
             "--samples-per-prompt", "2", "--backend", "transformers", "--device", "cpu", "--guard", "refusal-judge",
             "--store-reference-topk", str(k)]
    assert cli.main(synth) == 0
    stats = read_json(out / "stats.json")
    train_rows = read_jsonl(out / "train.jsonl")
    unfinished = read_jsonl(out / "unfinished_benign.jsonl") if (out / "unfinished_benign.jsonl").exists() else []
    benign = train_rows + unfinished
    assert benign, stats
    entries, stored_k = read_store(out / REFERENCE_TOPK_FILE)
    # one entry per distinct row (complete and cut), k wide, with a tail mass in [0, 1] per position
    assert stored_k == k and set(entries) == {row_key(r["instruction"], r["response"]) for r in benign}
    assert stats["reference_topk"] == {"k": k, "rows": len(entries), "benign_rows": len(entries)}
    for entry in entries.values():
        assert entry.ids.shape == (len(entry), k) and entry.tail.shape == (len(entry),)
        assert ((entry.tail >= 0) & (entry.tail <= 1)).all()
    assert read_json(out / "run.json")["store_reference_topk"] == k
    # a rerun resumes (the chunk stores keep the top-k): the same store, nothing generated again
    assert cli.main(synth) == 0
    again, _ = read_store(out / REFERENCE_TOPK_FILE)
    assert read_json(out / "stats.json")["phases"]["generation"]["resumed_prompts"] == len(rows)
    assert set(again) == set(entries)

    from thinksafe.registry import FAMILIES, ModelSpec, synthesized_data_dir

    dataset_dir = synthesized_data_dir(ModelSpec(FAMILIES["demo"], "135M", "demo"), "refusal-judge")
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copytree(out, dataset_dir)
    # --use-kl needs a CE row: one refusal written here (the demo model refuses too rarely to rely on it);
    # harmful rows have no stored top-k and need none
    refusal = {"instruction": "How do I pick a lock to break into a house?", "prompt_label": "vanilla_harmful",
               "response": "I'm sorry, but I can't help with that.", "response_label": "safe"}
    with open(dataset_dir / "train.jsonl", "a") as handle:
        handle.write(json.dumps(refusal) + "\n")
    from thinksafe.io import atomic_write_json, sha256_of_files

    # ... and stats.json re-describes the edited file (training refuses a train.jsonl it does not describe)
    edited = read_json(dataset_dir / "stats.json")
    edited["files_sha256"]["train.jsonl"] = sha256_of_files([dataset_dir / "train.jsonl"])
    atomic_write_json(dataset_dir / "stats.json", edited)
    train = ["train", "--model", "demo", "--dataset", "thinksafe-refusal-judge", "--use-kl", "--kl_reference", "cached",
             "--rank", "4", "--epochs", "1", "--effective-batch-size", "2",
             "--per-device-batch-size", "2", "--learning-rate", "1e-3", "--warmup-ratio", "0",
             "--max-length", "256", "--report-to", "none", "--device", "cpu"]
    assert cli.main(train) == 0
    run_dirs = [p for p in (output_root / "runs").iterdir() if (p / "run_info.json").exists()]
    # the demo recipe trains KL on the cut rows too (kl_on_unfinished), named after the reference
    readable = run_dirs[0].name.rsplit("_h", 1)[0]  # then the hash of the other settings
    assert len(run_dirs) == 1 and readable.endswith("_mask_klcached_unfinished"), run_dirs
    info, record = read_json(run_dirs[0] / "run_info.json"), read_json(run_dirs[0] / "run_record.json")
    assert record["settings"]["kl_reference"] == "cached" and info["kl_reference"] == "cached"
    # the KL rows trained on are the benign rows the store serves (some on the ids the base generated,
    # counted apart); any others are dropped and counted, so every benign row is accounted for
    reference = info["kl_reference_rows"]
    assert reference["used"] == info["kl_rows"] >= 1
    assert reference["used"] + sum(reference["dropped"].values()) == len(benign)
    assert reference["on_generated_ids"] <= reference["used"]
    assert any("kl_loss" in entry for entry in info["log_history"])


def test_a_finished_forward_run_recorded_before_kl_reference_is_still_the_same_run(output_root):
    """run_record.json written before `kl_reference` existed: read as forward (what those runs did)."""
    from thinksafe.io import atomic_write_json
    from thinksafe.train.common import RUN_INFO, RUN_RECORD, TrainConfigError, prepare_run_dir
    from thinksafe.train.sft import content_settings, parse_args

    def record(*flags):
        model_cfg, run, sft = parse_args(["--model", "demo", "--dataset", "thinksafe", "--use-kl", "--device", "cpu",
                                          "--report-to", "none", *flags])
        return {"dataset": "thinksafe", "settings": {"model": "demo", "dataset_sha256": "0" * 64,
                                                     **content_settings(model_cfg, sft)}}

    forward = record()
    assert forward["settings"]["kl_reference"] == "forward"
    older = {**forward, "settings": {k: v for k, v in forward["settings"].items() if k != "kl_reference"}}
    from thinksafe.registry import RunConfig, resolve_model, run_paths

    paths = run_paths(RunConfig(resolve_model("demo"), "thinksafe", 32, 3, use_kl=True))
    paths.run_dir.mkdir(parents=True)
    atomic_write_json(paths.run_dir / RUN_RECORD, older)
    atomic_write_json(paths.run_dir / RUN_INFO, {"run": paths.name})
    # the same forward run: skipped as finished, not refused for a changed setting
    assert prepare_run_dir(paths, overwrite=False, record=forward, skip_finished=True) is None
    # a real change is still caught, named with the old run's (default) value
    with pytest.raises(TrainConfigError, match="kl_reference 'forward' -> 'cached'"):
        prepare_run_dir(paths, overwrite=False, record=record("--kl_reference", "cached"), skip_finished=True)


def test_a_kl_row_trains_on_the_ids_the_base_generated_when_its_text_re_tokenises_differently(tiny_qwen3):
    """A sampled model may write a text in a segmentation the tokenizer would not choose, and the
    synthesis strips trailing whitespace: the row then trains on the generated ids (where its stored
    top-k belong), as long as they spell the same text; stored ids of another text drop the row."""
    from thinksafe.model_loading import load_tokenizer
    from thinksafe.registry import FAMILIES
    from thinksafe.train.data import GENERATED_IDS, REFERENCE_START_COLUMN, TrainRow, tokenize_rows

    tokenizer, family = load_tokenizer(str(tiny_qwen3)), FAMILIES["qwen"]

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    canonical = ids("Hello world")
    split = ids("Hel") + ids("lo") + ids(" world") + ids("\n\n")  # same text, other ids, then stripped whitespace
    assert split[:-len(ids("\n\n"))] != canonical and tokenizer.decode(split).rstrip() == "Hello world"
    rows = [TrainRow("greet", "Hello world", harmful=False, finished=False),
            TrainRow("greet again", "Hello world", harmful=False, finished=False),
            TrainRow("other", "Hello world", harmful=False, finished=False)]

    def entry(tokens):
        n = len(tokens)
        return TopK(np.asarray(tokens, dtype=np.int32), np.arange(n * 2, dtype=np.int32).reshape(n, 2),
                    np.full((n, 2), -1.0, dtype=np.float16), np.full(n, 0.5, dtype=np.float32))

    reference = {row_key("greet", "Hello world"): entry(canonical), row_key("greet again", "Hello world"): entry(split),
                 row_key("other", "Hello world"): entry(ids("Goodbye world"))}
    dropped: dict = {}
    columns = tokenize_rows(rows, tokenizer, family, True, reference, dropped)
    assert dropped == {GENERATED_IDS: 1, "tokens_differ": 1}
    (first, second) = columns["input_ids"]
    start = columns[REFERENCE_START_COLUMN][1]
    assert first[columns[REFERENCE_START_COLUMN][0]:] == canonical  # the usual case: nothing changes
    from thinksafe.chat import encode_for_training

    usual = encode_for_training(tokenizer, "greet again", "Hello world", family, finished=False)
    assert second[:start] == usual["input_ids"][:usual["completion_mask"].index(1)] and second[start:] == split
    assert columns["completion_mask"][1] == [0] * start + [1] * len(split)
    assert len(columns["ref_ids"][1]) == len(split)  # entry j still on the j-th completion token
