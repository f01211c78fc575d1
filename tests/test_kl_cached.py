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
