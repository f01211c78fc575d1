"""Generation throughput, vLLM vs transformers, same model and prompts, one run; and transformers'
thread count on a busy CPU.

    python bench/generation.py --out /tmp/bench_generation.json            # this machine (CPU)
    python bench/generation.py --model qwen3-shape --device cuda ...        # the GPU run (bench/README.md)

Part 1 (`backends`): the demo model (SmolLM2-135M-Instruct) answers the demo's chat prompts, greedy,
`--max-new-tokens` each, through thinksafe's own generators (HFGenerator, VLLMGenerator): start-up
(model load / engine init) and generation are timed apart, tokens counted by the generators.
Part 2 (`threads`, CPU only): transformers generation with 1 thread and with all cores while
`--busy` processes spin on the CPU, to choose the thread policy (thinksafe.model_loading.cpu_threads).
Run with the machine otherwise idle; the load average at the start is recorded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path


def demo_prompts(count: int) -> list[str]:
    rows = [json.loads(line) for line in Path("eval/prompts/demo_train.jsonl").read_text().splitlines()]
    return [r["instruction"] for r in rows][:count]


def timed_generation(generator, prompts, sampling) -> dict:
    start = time.perf_counter()
    outputs = generator.chat(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(c.num_tokens for o in outputs for c in o)
    return {"seconds": round(seconds, 2), "tokens": tokens, "tok_per_s": round(tokens / seconds, 1)}


def run_backend(name: str, dtype: str, prompts, samplings: dict) -> list[dict]:
    """One model load / engine start, then each sampling in turn (start-up counted once, in the first row)."""
    from thinksafe.engines import HFGenerator, VLLMGenerator
    from thinksafe.registry import FAMILIES

    start = time.perf_counter()
    if name == "vllm":
        generator = VLLMGenerator("demo", FAMILIES["demo"], dtype=dtype, max_model_len=1024)
    else:
        import torch

        from thinksafe.model_loading import load_model

        model = load_model("demo", device="cpu", dtype=getattr(torch, dtype))
        generator = HFGenerator("demo", FAMILIES["demo"], model=model, batch_size=len(prompts))
    startup = time.perf_counter() - start
    rows = []
    for label, sampling in samplings.items():
        result = timed_generation(generator, prompts, sampling)
        rows.append({"backend": name, "dtype": dtype, "sampling": label, "startup_s": round(startup, 1), **result,
                     "end_to_end_s": round(startup + result["seconds"], 1)})
        print(rows[-1], flush=True)
    return rows


def spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def run_threads(prompts, sampling, busy: int) -> list[dict]:
    import torch

    from thinksafe.engines import HFGenerator
    from thinksafe.model_loading import load_model
    from thinksafe.registry import FAMILIES

    generator = HFGenerator("demo", FAMILIES["demo"], model=load_model("demo", device="cpu"), batch_size=16)
    results = []
    for threads in (os.cpu_count() or 1, 1):
        torch.set_num_threads(threads)
        for load in (0, busy):
            hogs = [multiprocessing.Process(target=spin, args=(time.time() + 600,)) for _ in range(load)]
            for hog in hogs:
                hog.start()
            try:
                results.append({"threads": threads, "busy_processes": load,
                                **timed_generation(generator, prompts, sampling)})
            finally:
                for hog in hogs:
                    hog.terminate()
                    hog.join()
            print(results[-1], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes for the thread test")
    parser.add_argument("--parts", default="backends,threads", help="backends, threads or both")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from thinksafe.registry import FAMILIES

    prompts = demo_prompts(args.prompts)
    sampling = FAMILIES["demo"].sampling.replace(temperature=0.0, max_new_tokens=args.max_new_tokens, n=1)
    # greedy, and the demo's own sampling (temperature 0.7, top-p 0.95), which synthesis and evaluation use
    samplings = {"greedy": sampling, "demo sampling": FAMILIES["demo"].sampling.replace(
        max_new_tokens=args.max_new_tokens, n=1)}
    report = {"load_average_at_start": os.getloadavg(), "cpu_count": os.cpu_count(), "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens}
    if "backends" in args.parts:
        report["backends"] = [row for name, dtype in (("transformers", "float32"), ("vllm", "bfloat16"))
                              for row in run_backend(name, dtype, prompts, samplings)]
    if "threads" in args.parts:
        report["threads"] = run_threads(prompts[:16], sampling, args.busy)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
