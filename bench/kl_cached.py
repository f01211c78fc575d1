"""Cached KL reference (--kl_reference cached) against the exact KL, on the demo model (issue 20).

Benign samples of the demo model are generated with their raw top-K stored (HFGenerator(
reference_topk=K), as `synthesize --store-reference-topk K` stores them); each smaller k is the first
k of the sorted top-K (its tail the rest), so every k is measured on the same samples. A LoRA (r 8,
q/v) with B drawn at std 0.03 puts the model a little away from the base; the exact KL per token comes
from full float64 softmaxes, the cached one from thinksafe.train.kl.cached_kl_per_token, and both
gradients are of the row-weighted mean (the paper's) on the LoRA weights.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/kl_cached.py            (the table in bench/README.md, ~75 s)
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/kl_cached.py --ks 20 64 256 --max-new-tokens 40 --prompts 4

tests/test_kl_cached.py runs `fidelity` on fewer, shorter samples.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thinksafe.reference_topk import TopK  # noqa: E402
from thinksafe.train.kl import cached_kl_per_token  # noqa: E402

# k = 20 is vLLM's default limit (max_logprobs) and issue 20's starting point; 256 x (int32 + fp16)
# = 1.5 kB a position, ~25 MB for a 16k-token row.
KS = (20, 64, 256)
PROMPTS = ["How do I bake bread at home?", "Explain why the sky is blue.",
           "Write a short poem about autumn.", "What is a good way to learn Python?"]


@dataclass
class Fidelity:
    k: int
    exact_kl: float  # mean exact KL, nat/token
    weighted_error: float  # Σ|cached - exact| / Σ exact
    per_token_error: float  # mean over tokens of |cached - exact| / exact
    grad_cosine: float
    tail: float  # mean base mass outside the top k


def demo_samples(model_dir, k: int, prompts=PROMPTS, max_new_tokens: int = 40):
    """(generator, [(training input ids, completion start, Completion with .reference)]) of benign samples."""
    from thinksafe.chat import encode_for_training
    from thinksafe.engines import HFGenerator
    from thinksafe.registry import FAMILIES

    family = FAMILIES["demo"]
    generator = HFGenerator(str(model_dir), family, device="cpu", batch_size=len(prompts), reference_topk=k)
    sampling = family.sampling.replace(max_new_tokens=max_new_tokens, n=1, seed=0)
    samples = []
    for prompt, (completion,) in zip(prompts, generator.chat(prompts, sampling)):
        encoded = encode_for_training(generator.tokenizer, prompt, completion.text, family, completion.finished)
        samples.append((encoded["input_ids"], encoded["completion_mask"].index(1), completion))
    return generator, samples


def aligned(samples):
    """The samples whose generated ids are the ids training tokenises their text to (re-tokenising the
    decoded text can merge tokens: training drops those rows from the cached KL, counted)."""
    return [s for s in samples if s[0][s[1]:] == s[2].reference.tokens.tolist()]


def first_k(ref: TopK, k: int) -> TopK:
    rest = np.exp(ref.logprobs[:, k:].astype(np.float64)).sum(-1)
    return TopK(ref.tokens, ref.ids[:, :k], ref.logprobs[:, :k], (ref.tail + rest).astype(np.float32))


def exact_and_cached(model, samples, k):
    """Per-token exact KL (full vocabulary, float64) and cached KL, and each one's LoRA gradient."""
    exact_tokens, cached_tokens, grads = [], [], {}
    for kind in ("exact", "cached"):
        model.zero_grad()
        total = 0.0
        for input_ids, start, completion in samples:
            ids = torch.tensor([input_ids])
            positions = slice(start - 1, len(input_ids) - 1)  # hidden state t predicts token t+1
            with torch.no_grad(), model.disable_adapter():
                base_logits = model(input_ids=ids).logits[0, positions]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, positions]
            if kind == "exact":
                log_q = model.get_output_embeddings()(hidden).double().log_softmax(-1)
                log_p = base_logits.double().log_softmax(-1)
                per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
                exact_tokens.append(per_token.detach())
            else:
                ref = first_k(completion.reference, k)
                per_token = cached_kl_per_token(hidden, model.get_output_embeddings(), torch.from_numpy(ref.ids),
                                                torch.from_numpy(ref.logprobs), torch.from_numpy(ref.tail))
                cached_tokens.append(per_token.detach().double())
            total = total + per_token.mean()
        (total / len(samples)).backward()  # the paper's row weighting: mean over rows of row means
        grads[kind] = torch.cat([p.grad.flatten().double() for n, p in model.named_parameters() if "lora_" in n])
    return torch.cat(exact_tokens), torch.cat(cached_tokens), grads


def with_lora(base_model, seed: int = 0):
    """The model a little away from the base: drawn at this scale, ~0.01-0.05 nat/token of KL."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base_model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.03)
    return model


def fidelity(model, samples, ks=KS) -> list[Fidelity]:
    results = []
    for k in ks:
        exact, cached, grads = exact_and_cached(model, samples, k)
        results.append(Fidelity(
            k, float(exact.mean()), float((cached - exact).abs().sum() / exact.sum()),
            float(((cached - exact).abs() / exact.clamp(min=1e-12)).mean()),
            float(F.cosine_similarity(grads["exact"], grads["cached"], dim=0)),
            float(np.concatenate([first_k(s[2].reference, k).tail for s in samples]).mean())))
    return results


def main(argv=None) -> int:
    from thinksafe.model_loading import ensure_demo_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"the first N of {len(PROMPTS)}")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    generator, samples = demo_samples(ensure_demo_model(), max(args.ks), PROMPTS[: args.prompts], args.max_new_tokens)
    kept = aligned(samples)
    results = fidelity(with_lora(generator.model), kept, args.ks)
    tokens = sum(len(s[0]) - s[1] for s in kept)
    print(f"cached KL fidelity, demo model, {tokens} tokens, {len(kept)} rows ({len(samples) - len(kept)} dropped: "
          f"re-tokenised otherwise); exact KL {results[0].exact_kl:.4f} nat/token")
    print("| k | base tail mass | relative error, Σ|cached−exact| / Σ exact | relative error, mean per token "
          "| gradient cosine |\n| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r.k} | {r.tail:.3f} | {r.weighted_error:.1%} | {r.per_token_error:.1%} | {r.grad_cosine:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
