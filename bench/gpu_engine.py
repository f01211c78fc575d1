"""thinksafe's vLLM paths on a GPU: generation throughput (vLLM vs transformers), LoRARequest vs the
merged model, a guard engine after the policy engine in one process, and free memory between them.

    python bench/gpu_engine.py --out $OUT/gpu_engine.json        # on the GPU machine (bench/README.md)

Random weights: the tiny Qwen3 fixture (tests/tiny_models.py) for the exactness checks and Qwen3-0.6B's
real shape (vocab 151,936; the small fixture tokenizer uses ids < 512) for throughput. Every section
records its own error instead of stopping the run, so one CUDA-only failure does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def free_gib() -> float:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return round(free / 2**30, 1)


def section(report: dict, name: str, fn, *args) -> None:
    start = time.perf_counter()
    try:
        report[name] = {"result": fn(*args)}
    except Exception as err:  # a benchmark reports every failure, then goes on
        report[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
    report[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(name, json.dumps(report[name])[:2000], flush=True)


def prompts(count: int) -> list[str]:
    words = ["How do I bake bread?", "Explain photosynthesis.", "Write a poem about the sea.",
             "What is 12 + 30?", "How do I kill a Python process?"]
    return [f"{words[i % len(words)]} (variant {i})" for i in range(count)]


def throughput(model_dir: str, n_prompts: int, n: int, max_tokens: int, hf_prompts: int) -> dict:
    from thinksafe.engines import HFGenerator, VLLMGenerator
    from thinksafe.model_loading import free_accelerator_memory
    from thinksafe.registry import FAMILIES

    family = FAMILIES["qwen"]
    # min_tokens-free sampling on random weights ends at random places; ignore_eos is not ours to set,
    # so tokens are counted as generated.
    sampling = family.sampling.replace(n=n, max_new_tokens=max_tokens, seed=1)
    start = time.perf_counter()
    gen = VLLMGenerator(model_dir, family, max_model_len=max_tokens + 256)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    out = gen.chat(prompts(n_prompts), sampling)
    seconds = time.perf_counter() - start
    tokens = sum(c.num_tokens for o in out for c in o)
    result = {"vllm": {"startup_s": round(startup, 1), "seconds": round(seconds, 2), "tokens": tokens,
                       "tok_per_s": round(tokens / seconds)}, "free_gib_with_engine": free_gib()}
    del gen, out
    free_accelerator_memory()
    result["free_gib_after_delete"] = free_gib()
    hf = HFGenerator(model_dir, family, device="cuda", batch_size=hf_prompts * n)
    start = time.perf_counter()
    out = hf.chat(prompts(hf_prompts), sampling)
    seconds = time.perf_counter() - start
    tokens = sum(c.num_tokens for o in out for c in o)
    result["transformers"] = {"prompts": hf_prompts, "seconds": round(seconds, 2), "tokens": tokens,
                              "tok_per_s": round(tokens / seconds)}
    del hf
    free_accelerator_memory()
    return result


def lora_vs_merged(model_dir: str, work: Path) -> dict:
    """Greedy answers of the adapter through LoRARequest vs the merged model, both through vLLM in bf16
    (vLLM's GPU LoRA kernels take bf16/fp16 only), and vs transformers on the merged model in bf16."""
    import torch
    from peft import LoraConfig, get_peft_model

    from thinksafe.engines import HFGenerator, VLLMGenerator
    from thinksafe.merge import merge_adapter
    from thinksafe.model_loading import free_accelerator_memory, load_model
    from thinksafe.registry import FAMILIES

    family = FAMILIES["qwen"]
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_model(model_dir, device="cpu"), config).save_pretrained(work / "adapter")
    merged = merge_adapter(work / "adapter", work / "merged", base=model_dir, dtype=torch.bfloat16)
    greedy = family.sampling.replace(temperature=0.0, max_new_tokens=24)
    answers = {}
    for name, source, lora in (("vllm_lora", model_dir, True), ("vllm_merged", str(merged), False)):
        gen = VLLMGenerator(source, family, dtype="bfloat16", max_model_len=512, enable_lora=lora,
                            max_lora_rank=16, gpu_memory_utilization=0.3)
        if lora:
            gen.use_adapter(str(work / "adapter"))
        answers[name] = gen.chat(prompts(8), greedy)
        del gen
        free_accelerator_memory()
    hf = HFGenerator(str(merged), family, model=load_model(str(merged), device="cuda", dtype=torch.bfloat16),
                     batch_size=8)
    answers["transformers_merged"] = hf.chat(prompts(8), greedy)
    base = answers["vllm_lora"]
    return {"prompts": 8, **{f"equal_to_{k}": sum(a == b for a, b in zip(base, v)) for k, v in answers.items()
                             if k != "vllm_lora"}}


def guard_after_policy(model_dir: str) -> dict:
    from thinksafe.engines import VLLMGenerator
    from thinksafe.guards import load_guard
    from thinksafe.model_loading import free_accelerator_memory
    from thinksafe.registry import FAMILIES

    before = free_gib()
    gen = VLLMGenerator(model_dir, FAMILIES["qwen"], max_model_len=1024)
    with_policy = free_gib()
    gen.chat(prompts(4), FAMILIES["qwen"].sampling.replace(max_new_tokens=16))
    del gen
    free_accelerator_memory()
    after_delete = free_gib()
    guard = load_guard(model_dir, style="llama-guard", backend="vllm", max_model_len=1024)
    start = time.perf_counter()
    verdicts = guard.judge(prompts(256), ["Sure, here is how."] * 256)
    seconds = time.perf_counter() - start
    return {"free_gib": {"before": before, "with_policy": with_policy, "after_delete": after_delete,
                         "with_guard": free_gib()},
            "guard_rows": len(verdicts), "guard_rows_per_s": round(len(verdicts) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--sections", default="lora,guard,throughput")
    args = parser.parse_args()
    import torch
    from tiny_models import QWEN3_0_6B, build_tiny_model

    work = args.out.parent / "gpu_engine_work"
    report = {"device": torch.cuda.get_device_name(0), "versions": {}}
    for name in ("torch", "transformers", "vllm", "peft", "trl"):
        try:
            report["versions"][name] = __import__(name).__version__
        except ImportError:
            report["versions"][name] = None
    tiny = str(build_tiny_model("qwen3", work / "tiny"))
    shaped = str(build_tiny_model("qwen3", work / "qwen3-0.6b-shape", **QWEN3_0_6B))
    wanted = args.sections.split(",")
    if "lora" in wanted:
        section(report, "lora_vs_merged", lora_vs_merged, tiny, work)
    if "guard" in wanted:
        section(report, "guard_after_policy", guard_after_policy, shaped)
    if "throughput" in wanted:
        section(report, "throughput_0.6b_shape", throughput, shaped, args.prompts, 2, args.max_tokens, 32)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
