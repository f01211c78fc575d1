"""The fused cached-KL head (thinksafe.train.kl._FusedCachedKL, issue 31): its values and gradients against
float64 autograd of the same coarsened KL, against the two-pass implementation it replaces, and how
many logits it forms; on CPU through torch, and its Triton kernel (interpreted on a CPU, compiled on a GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from thinksafe.reference_topk import topk_from_logits
from thinksafe.train import kl as kl_module
from thinksafe.train.kl import cached_kl_per_token

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Which form of the softmax step runs: torch ops, or the Triton kernel (compiled on a GPU; on a CPU
    in Triton's interpreter, which must be chosen before triton is imported: a subprocess does that,
    test_the_triton_kernel_interpreted_on_a_cpu)."""
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed (the GPU set has it; `pip install triton` runs it interpreted)")
        if DEVICE == "cpu" and not INTERPRETED:
            pytest.skip("on a CPU the Triton kernel runs interpreted, in test_the_triton_kernel_interpreted_on_a_cpu")
        monkeypatch.setenv("THINKSAFE_CACHED_KL_TRITON", "1")
        monkeypatch.setattr(kl_module, "_TRITON_KERNEL", None)
    else:
        monkeypatch.setenv("THINKSAFE_CACHED_KL_TRITON", "0")
    yield request.param
    kl_module._TRITON_KERNEL = None


@pytest.mark.slow  # over 10 s on 2 cores
@pytest.mark.skipif(DEVICE != "cpu" or INTERPRETED or not HAS_TRITON,
                    reason="a CPU with triton installed (on a GPU the kernel tests run compiled)")
def test_the_triton_kernel_interpreted_on_a_cpu():
    """This file's Triton-kernel tests, in a process where Triton's interpreter is on from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", "triton",
                           __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b4 passed", done.stdout), done.stdout[-1000:]


def coarsened_kl_float64(hidden, weight, bias, ids, logprobs, tail, scale=1.0):
    """The KL over the top-k plus one tail bucket, in float64 from the head's own parameters, by autograd
    through full softmaxes (the model's tail as 1 - its top-k mass: no shortcut shared with the kernel)."""
    logits = (hidden @ weight.T + (0 if bias is None else bias)) * scale
    q_top = logits.log_softmax(-1).gather(1, ids.long())
    q_tail = torch.log1p(-q_top.exp().sum(-1))
    p_log, tail = logprobs.double(), tail.double()
    return (p_log.exp() * (p_log - q_top)).sum(-1) + torch.xlogy(tail, tail) - tail * q_tail


def problem(seed, n=11, hidden=12, vocab=300, k=6, with_bias=True):
    torch.manual_seed(seed)
    weight = torch.randn(vocab, hidden) * 0.5
    bias = torch.randn(vocab) * 0.3 if with_bias else None
    ids, logprobs, tail = (torch.from_numpy(a) for a in topk_from_logits(torch.randn(n, vocab) * 2, k))
    return torch.randn(n, hidden), weight, bias, ids, logprobs, tail


def head_of(weight, bias, trainable=True):
    head = torch.nn.Linear(weight.size(1), weight.size(0), bias=bias is not None).to(DEVICE)
    head.weight = torch.nn.Parameter(weight.clone().to(DEVICE), requires_grad=trainable)
    if bias is not None:
        head.bias = torch.nn.Parameter(bias.clone().to(DEVICE), requires_grad=trainable)
    return head


@pytest.mark.parametrize("weights_as_upstream", [True, False], ids=["prepared", "other-upstream"])
def test_fused_value_and_gradients_in_hidden_weight_and_bias_match_float64_autograd(backend, weights_as_upstream):
    """Tiles of 4, 4, 3; a logit scale; per-token upstream gradients (the row means). `prepared`: the
    token weights given to the forward are the upstream (the trainer's case: the head's gradient is
    taken in the forward and scaled); `other-upstream`: they are not, and the head's gradient is recomputed."""
    h, weight, bias, ids, logprobs, tail = problem(2)
    upstream = torch.rand(h.size(0)) + 0.5
    token_weights = upstream * 3.0 if weights_as_upstream else None  # any constant multiple is the same loss
    head = head_of(weight, bias)
    hidden = h.clone().to(DEVICE).requires_grad_(True)
    got = cached_kl_per_token(hidden, head, ids, logprobs, tail, logit_scale=0.7, tile=4,
                              token_weights=None if token_weights is None else token_weights.to(DEVICE))
    ref = [t.double().clone().requires_grad_(True) for t in (h, weight, bias)]
    expected = coarsened_kl_float64(*ref, ids, logprobs, tail, scale=0.7)
    torch.testing.assert_close(got.double().cpu(), expected.detach(), rtol=1e-4, atol=1e-6)
    (got * upstream.to(DEVICE)).sum().backward()
    (expected * upstream.double()).sum().backward()
    for mine, theirs in zip((hidden, head.weight, head.bias), ref):
        torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, rtol=1e-3, atol=1e-5)


def test_fused_with_every_token_stored_is_the_full_kl(backend):
    """k = V: no tail bucket, so the value and gradient are the full KL's (finite, the empty tail adding nothing)."""
    h, weight, _, ids, logprobs, tail = problem(3, n=5, hidden=8, vocab=16, k=16, with_bias=False)
    head = head_of(weight, None, trainable=False)
    hidden = h.clone().to(DEVICE).requires_grad_(True)
    got = cached_kl_per_token(hidden, head, ids, logprobs, tail)
    h64 = h.double().requires_grad_(True)
    base = logprobs.double().gather(1, ids.long().argsort(1))  # the stored log-probs in vocabulary order
    full = torch.nn.functional.kl_div((h64 @ weight.double().T).log_softmax(-1), base, log_target=True,
                                      reduction="none").sum(-1)
    torch.testing.assert_close(got.double().cpu(), full.detach(), rtol=1e-4, atol=1e-6)
    got.sum().backward()
    full.sum().backward()
    assert torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(hidden.grad.double().cpu(), h64.grad, rtol=1e-3, atol=1e-5)


def test_fused_equals_the_two_pass_tiles_path_in_bfloat16(backend):
    """The head in bf16 as on a GPU, a frozen head (LoRA's): the fused value and hidden-state gradient
    equal the two-pass `_CachedTopKKL` (the implementation before this one) to bf16 rounding."""
    h, weight, _, ids, logprobs, tail = problem(4, n=37, hidden=64, vocab=1000, k=16, with_bias=False)
    head = head_of(weight, None, trainable=False).to(torch.bfloat16)
    upstream = (torch.rand(h.size(0)) + 0.5).to(DEVICE)
    results = {}
    for path in ("fused", "tiles"):
        hidden = h.clone().to(DEVICE, torch.bfloat16).requires_grad_(True)
        kl = cached_kl_per_token(hidden, head, ids, logprobs, tail, tile=10, path=path)
        (kl * upstream).sum().backward()
        results[path] = kl.detach().float().cpu(), hidden.grad.float().cpu()
    torch.testing.assert_close(results["fused"][0], results["tiles"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["fused"][1], results["tiles"][1], rtol=2e-2, atol=1e-3)


def test_each_tiles_logits_are_formed_once_and_never_more_than_a_tile(monkeypatch):
    """The fused path projects each tile once (forward and backward together); the two-pass path twice.
    No projection is wider than a tile of tokens: never [N, V] logits."""
    h, weight, _, ids, logprobs, tail = problem(5, n=23, hidden=8, vocab=50, k=4, with_bias=False)
    head = head_of(weight, None, trainable=False)
    linear = torch.nn.functional.linear
    shapes: list[tuple] = []

    def counting_linear(x, w, b=None):
        out = linear(x, w, b)
        if w.shape == weight.shape:
            shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    counts = {}
    for path in ("fused", "tiles"):
        shapes.clear()
        hidden = h.clone().to(DEVICE).requires_grad_(True)
        cached_kl_per_token(hidden, head, ids, logprobs, tail, tile=5, path=path).sum().backward()
        assert all(rows <= 5 for rows, _ in shapes), shapes
        counts[path] = len(shapes)
    assert counts == {"fused": 5, "tiles": 10}  # 23 tokens in tiles of 5


def test_fused_takes_no_gradient_where_none_can_follow():
    """Under no_grad (evaluation) the forward gives the same values and keeps no gradient buffers."""
    h, weight, _, ids, logprobs, tail = problem(6, with_bias=False)
    head = head_of(weight, None)
    hidden = h.clone().to(DEVICE).requires_grad_(True)
    with torch.no_grad():
        quiet = cached_kl_per_token(hidden, head, ids, logprobs, tail, tile=4)
    assert quiet.grad_fn is None
    torch.testing.assert_close(quiet, cached_kl_per_token(hidden, head, ids, logprobs, tail, tile=4).detach())


def test_the_trainer_takes_the_fused_path_and_the_head_gradient_in_the_forward(tiny_qwen3, tmp_path, monkeypatch):
    """KLSFTTrainer with --kl_reference cached on a tiny Qwen3, its tied head made trainable (as a full
    fine-tune has it): the loss and the gradients of the adapter and the head equal the two-pass path's,
    and the head's gradient comes from the forward (the row weights it was given are the loss's), not
    from a recomputation."""
    from test_kl import first_batch, make_trainer

    trainer, *_ = make_trainer(tiny_qwen3, tmp_path, "qwen", batch=4, varied=True)
    batch = first_batch(trainer)
    model = trainer.model
    head = kl_module.causal_lm(model).get_output_embeddings()
    head.weight.requires_grad_(True)
    # the base's top-8 at every position, as the store holds them (entry t: the distribution of token t)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    flat = base.reshape(-1, base.size(-1))
    ids, logprobs, tail = (torch.from_numpy(a) for a in topk_from_logits(flat, 8))
    shape = base.shape[:2]
    reference = {"ref_ids": ids.reshape(*shape, 8), "ref_logprobs": logprobs.reshape(*shape, 8),
                 "ref_tail": tail.reshape(shape)}
    reference = {name: torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1) for name, v in reference.items()}
    recomputed = []
    real_recompute = kl_module._recomputed_grads
    monkeypatch.setattr(kl_module, "_recomputed_grads", lambda *a, **k: recomputed.append(1) or real_recompute(*a, **k))
    original = kl_module.cached_kl_per_token
    results = {}
    trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    for path in ("fused", "tiles"):
        monkeypatch.setattr(kl_module, "cached_kl_per_token", lambda *a, _p=path, **k: original(*a, path=_p, **k))
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, {**batch, **reference}, num_items_in_batch=99)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[path] = loss.detach(), grads
        if path == "fused":
            assert not recomputed, "the fused path recomputed the head's gradient: its token weights were not the loss's"
    assert bool(batch["kl"].any()) and bool((~batch["kl"]).any())
    torch.testing.assert_close(results["fused"][0], results["tiles"][0], rtol=1e-6, atol=1e-6)
    assert results["fused"][1].keys() == results["tiles"][1].keys()
    assert any("lora" in n for n in results["fused"][1]) and head.weight.grad is not None
    for name, grad in results["fused"][1].items():
        torch.testing.assert_close(grad, results["tiles"][1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.demo
def test_fused_equals_the_two_pass_path_on_the_demo_model(demo_model):
    """On the demo model (SmolLM2-135M, vocabulary 49,152, tied head): its base's top-20 at each position of a
    text, its hidden states moved a little (a trained model's), the head trainable. The fused value and the
    gradients in the hidden states and the head equal the two-pass path's and float64 autograd's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    ids = tokenizer("Why is the sky blue? Sunlight is scattered by the molecules of the air, and blue light",
                    return_tensors="pt")["input_ids"]
    head = model.get_output_embeddings()
    with torch.no_grad():
        base_hidden = model.model(input_ids=ids).last_hidden_state[0]
        ref_ids, logprobs, tail = (torch.from_numpy(a) for a in topk_from_logits(head(base_hidden), 20))
    torch.manual_seed(7)
    student = base_hidden + 0.3 * torch.randn_like(base_hidden)  # KL 0.007-0.8 nat a token
    row_weights = torch.linspace(0.5, 1.5, student.size(0))  # the loss's per-token weights
    head.weight.requires_grad_(True)
    results = {}
    for path in ("fused", "tiles"):
        head.weight.grad = None
        hidden = student.clone().requires_grad_(True)
        kl = cached_kl_per_token(hidden, head, ref_ids, logprobs, tail, tile=7, token_weights=row_weights, path=path)
        (kl * row_weights).sum().backward()
        results[path] = kl.detach(), hidden.grad, head.weight.grad.clone()
    ref = [t.double().requires_grad_(True) for t in (student, head.weight.detach())]
    expected = coarsened_kl_float64(ref[0], ref[1], None, ref_ids, logprobs, tail)
    (expected * row_weights.double()).sum().backward()
    assert (results["fused"][0] > 0).all()
    # float32: a KL is a difference of log-terms of ~10 (log Z of a 49k vocabulary), so ~1e-6 absolute
    # rounding in either float32 path (both measured 1-2e-6 off float64 here)
    for got, tiles, want in zip(results["fused"], results["tiles"], (expected.detach(), ref[0].grad, ref[1].grad)):
        torch.testing.assert_close(got, tiles, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)
