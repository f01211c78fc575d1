"""One training step (forward + backward) of a LoRA model at long sequence lengths, several loss paths.

Random weights with the real Qwen3 shapes, LoRA r=32 on q_proj/v_proj, one sequence, bf16, sdpa,
gradient checkpointing. Rows, all in one process on one GPU:
  plain_ce   transformers' own loss (full logits)
  naive_kl   KL(base ‖ model) from the full logits of both models (as the paper's code)
  ours_ce    thinksafe's KLSFTTrainer.compute_loss on a harmful row (TRL's chunked log-prob LM head)
  ours_kl    thinksafe's KLSFTTrainer.compute_loss on a benign row (chunked forward KL, adapter disabled)
  ours_kl_cached  the same with `--kl_reference cached`: the base's top-64 per position given (as stored
             at synthesis), no reference forward; the fused cached-KL head (each tile's logits formed once,
             the gradient taken in the forward, a Triton kernel for the softmax pieces)
  ours_kl_cached_tiles  the same through the two-pass cached head it replaced (issue 31's baseline)
  ours_*_nogc  the same without gradient checkpointing (`thinksafe train --gradient_checkpointing false`)
  ours_*_sac  TRL's selective activation checkpointing: attention outputs kept, the rest recomputed
             (`--gradient_checkpointing_kwargs '{"selective": true}'`)
  ours_*_gc2  every second decoder layer checkpointed, the others keep their activations
             (`--gradient_checkpointing_kwargs '{"every_n_layers": 2}'`)
  ours_*_liger  the same under Liger's RMSNorm/SwiGLU/RoPE kernels, applied as `thinksafe train` applies
             them (TRL keeps its fused LM head: no fused linear CE); the default on a GPU with liger-kernel
  liger_ce   apply_liger_kernel_to_qwen3 (fused linear CE, RMSNorm, SwiGLU, RoPE), model's own loss
  liger_kl   LigerFusedLinearJSD(jsd_beta=0) = forward KL(base ‖ model) on the Liger-patched model
Liger patches the model's modules, so its rows run last: our head under its layer kernels, then its own
loss heads.
head_*       the loss head alone on [seq, hidden] bf16 hidden states (forward + backward, the backbone left
             out): head_cached (fused), head_cached_tiles, head_trl_ce (TRL's chunked log-prob head, our CE),
             head_liger_ce (LigerFusedLinearCrossEntropyLoss),
             head_liger_kl (LigerFusedLinearJSD, beta 0, the teacher's hidden states given)
`--rows` keeps only the rows matching its patterns (fnmatch), e.g. `--rows 'ours_ce*' 'liger_*'`.
MFU uses TRL's compute_flops_per_token: 3 x forward FLOPs (matmuls incl. LM head, non-causal attention
scores 4·heads·head_dim·seq per token per layer), over the GPU's dense bf16 peak.

GPU:  python bench/train_step.py --out results.json
CPU:  python bench/train_step.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thinksafe.reference_topk import PIPELINE_REFERENCE_TOPK as REFERENCE_TOPK  # noqa: E402  the pipeline's K

SHAPES = {  # Qwen3 config.json values
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=5000, tie_word_embeddings=True),
}
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16, SXM
PROMPT_TOKENS = 256  # masked prompt prefix of the benchmark sequence
LORA_RANK, LORA_TARGETS = 32, ["q_proj", "v_proj"]


def build_model(shape: str, device: str, dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def dummy_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<pad>", unk_token="<unk>")


def placeholder_dataset():
    """The trainer wants a dataset; the benchmark feeds compute_loss itself. A fixed fingerprint and no
    preparation keep datasets from pickling (dill + some pyarrow builds fail on the GPU image)."""
    from thinksafe.train.data import fingerprinted_dataset

    return fingerprinted_dataset({"input_ids": [[2, 3, 4]], "labels": [[-100, 3, 4]], "kl": [1]}, "thinksafe-bench")


def build_trainer(model, device: str):
    """thinksafe's trainer exactly as `thinksafe train` builds it (LoRA via peft_config)."""
    from trl import SFTConfig

    from thinksafe.train.common import lora_config
    from thinksafe.train.data import make_collator
    from thinksafe.train.kl import KLSFTTrainer

    on_gpu = device.startswith("cuda")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, bf16=on_gpu, use_cpu=not on_gpu,
                     gradient_checkpointing=True, report_to=[], completion_only_loss=True,
                     remove_unused_columns=False, max_length=None,
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer = KLSFTTrainer(model=model, args=args, train_dataset=placeholder_dataset(), processing_class=dummy_tokenizer(),
                           data_collator=make_collator(0),
                           peft_config=lora_config(LORA_RANK, None, 0.0, target_modules=LORA_TARGETS))  # no dropout: timing only
    return trainer


CHECKPOINTING = ("full", "off", "sac", "gc2")  # the modes of the ours_* rows (module docstring)


def set_checkpointing(model, mode: str) -> None:
    """As `thinksafe train` turns it on: transformers' Trainer calls gradient_checkpointing_enable with
    the `--gradient_checkpointing_kwargs` (TRL wraps it first for `selective`)."""
    model.gradient_checkpointing_disable()
    if mode == "off":
        return
    if mode == "sac":
        from trl.models import enable_selective_activation_checkpointing

        enable_selective_activation_checkpointing(model)
    layers = 2 if mode == "gc2" else 1
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=layers)
    except TypeError:  # transformers < 5.19 has no every_n_layers: set the per-layer flags as 5.19 does
        from transformers.modeling_layers import GradientCheckpointingLayer

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, block in enumerate(blocks):
            block.gradient_checkpointing = index % layers == 0
    finally:
        vars(model).pop("gradient_checkpointing_enable", None)  # undo TRL's wrapper: the next mode is plain
    model.enable_input_require_grads()


def make_batch(seq: int, vocab: int, device: str, kind: str) -> dict:
    """kind: "ce" (a harmful row), "kl" (a benign row, exact KL) or "cached" (a benign row with the
    base's top-k per position, as the collator gives them: thinksafe.train.data.REFERENCE_COLUMNS)."""
    generator = torch.Generator().manual_seed(seq)
    input_ids = torch.randint(2, vocab, (1, seq), generator=generator).to(device)
    labels = input_ids.clone()
    labels[:, :PROMPT_TOKENS] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "kl": torch.tensor([kind != "ce"], device=device)}
    if kind.startswith("cached"):
        logits = torch.randn(1, seq, REFERENCE_TOPK + 1, generator=generator)
        logprobs = torch.log_softmax(logits, -1)[..., :REFERENCE_TOPK]  # the last slot's mass is the tail
        # distinct ids per position, as a top-k's are: a random start and stride, stride·(k-1) < vocab
        start = torch.randint(0, vocab, (1, seq, 1), generator=generator)
        stride = torch.randint(1, vocab // REFERENCE_TOPK, (1, seq, 1), generator=generator)
        ref_ids = (start + stride * torch.arange(REFERENCE_TOPK)) % vocab
        batch.update(ref_ids=ref_ids.to(torch.int32), ref_logprobs=logprobs.half(), ref_tail=1 - logprobs.exp().sum(-1))
    return batch


# --- the loss paths -----------------------------------------------------------------------------


def plain_ce(trainer, batch):
    return trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss


def naive_kl(trainer, batch):
    """As the paper's code: full logits of both models, fp32 log-softmax over the whole sequence."""
    import torch.nn.functional as F

    model, inputs = trainer.model, {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**inputs).logits
    logits = model(**inputs).logits
    per_token = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1),
                         log_target=True, reduction="none").sum(-1)
    mask = (batch["labels"] != -100).float()
    return (per_token[:, :-1] * mask[:, 1:]).sum() / mask[:, 1:].sum()


def ours(trainer, batch):
    inputs = dict(batch)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    return trainer.compute_loss(trainer.model, inputs, num_items_in_batch=num_items)


def ours_tiles(trainer, batch):
    """`ours` with the cached KL through the two-pass head (`cached_kl_per_token(path="tiles")`)."""
    from functools import partial

    from thinksafe.train import kl

    fused = kl.cached_kl_per_token
    kl.cached_kl_per_token = partial(fused, path=kl.CACHED_KL_TILES)
    try:
        return ours(trainer, batch)
    finally:
        kl.cached_kl_per_token = fused


def liger_ce(trainer, batch):
    return plain_ce(trainer, batch)  # after the Liger patch the model's own loss is Liger's fused linear CE


def make_liger_kl():
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.0)

    def liger_kl(trainer, batch):
        model = trainer.model
        lm = model.get_base_model()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad(), model.disable_adapter():
            teacher = lm.model(**inputs).last_hidden_state
        student = lm.model(**inputs).last_hidden_state
        weight = lm.get_output_embeddings().weight
        hidden = student.size(-1)
        return jsd(student[:, :-1].reshape(-1, hidden), weight, teacher[:, :-1].reshape(-1, hidden), weight,
                   batch["labels"][:, 1:].reshape(-1))

    return liger_kl


def apply_liger_layers(trainer) -> None:
    """What `thinksafe train --use_liger_kernel true` does at train start: transformers' Trainer applies
    Liger with the config TRL's SFTTrainer gives it (fused linear CE off, so TRL's fused head stays)."""
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(trainer.model, {**(trainer.args.liger_kernel_config or {}), "fused_linear_cross_entropy": False})


def apply_liger(trainer) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3

    lm = trainer.model.get_base_model()
    if "forward" in vars(lm):
        del lm.forward  # drop TRL's instance-level fused-head patch so the class's (Liger's) forward runs
    apply_liger_kernel_to_qwen3(model=lm)


# --- measurement --------------------------------------------------------------------------------


def timed_steps(fn, trainer, batch, device: str, warmup: int, steps: int) -> tuple[float, float, float]:
    """(mean seconds per forward+backward, peak GiB, the loss: paths on the same row must agree)."""
    cuda = device.startswith("cuda")

    def step():
        loss = fn(trainer, batch)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        loss = float(step())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return seconds, peak, loss


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def wanted(name: str, patterns: list[str] | None) -> bool:
    from fnmatch import fnmatch

    return patterns is None or any(fnmatch(name, pattern) for pattern in patterns)


def run_shape(shape: str, seqs: list[int], device: str, warmup: int, steps: int, with_liger: bool,
              rows_wanted: list[str] | None = None) -> list[dict]:
    from trl.trainer.utils import compute_flops_per_token

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    trainer = build_trainer(build_model(shape, device, dtype), device)
    config = trainer.model.get_base_model().config
    peak = peak_flops(device)
    rows: list[dict] = []
    paths = [("plain_ce", plain_ce, "ce", "full"), ("naive_kl", naive_kl, "kl", "full"),
             ("ours_ce", ours, "ce", "full"), ("ours_kl", ours, "kl", "full"), ("ours_kl_cached", ours, "cached", "full"),
             ("ours_kl_cached_tiles", ours_tiles, "cached", "full"),
             ("ours_ce_nogc", ours, "ce", "off"), ("ours_kl_nogc", ours, "kl", "off"),
             ("ours_kl_cached_nogc", ours, "cached", "off")]
    paths += [(f"ours_{kind.replace('cached', 'kl_cached')}_{mode}", ours, kind, mode)
              for mode in ("sac", "gc2") for kind in ("ce", "kl", "cached")]
    paths = [path for path in paths if wanted(path[0], rows_wanted)]
    liger_layer_rows = [("ours_ce_liger", ours, "ce"), ("ours_kl_liger", ours, "kl"),
                        ("ours_kl_cached_liger", ours, "cached"), ("ours_kl_cached_tiles_liger", ours_tiles, "cached")]
    liger_rows = [("liger_ce", liger_ce, "ce"), ("liger_kl", None, "kl")]
    liger_layer_rows = [row for row in liger_layer_rows if wanted(row[0], rows_wanted)]
    liger_rows = [row for row in liger_rows if wanted(row[0], rows_wanted)]
    if with_liger:
        paths += [(name, None, None, None) for name, todo in (("liger_layers", liger_layer_rows), ("liger", liger_rows))
                  if todo]
    for name, fn, kind, checkpointing in paths:
        if name.startswith("liger"):
            try:
                if name == "liger_layers":
                    apply_liger_layers(trainer)
                    todo = liger_layer_rows
                else:
                    apply_liger(trainer)
                    todo = [(path, make_liger_kl() if path == "liger_kl" else fn, kind) for path, fn, kind in liger_rows]
            except Exception as err:  # no GPU/Triton or no package: record, keep the other rows
                rows.append({"shape": shape, "path": name, "error": f"{type(err).__name__}: {err}"[:200]})
                print(json.dumps(rows[-1]), flush=True)
                break
            set_checkpointing(trainer.model, "full")
        else:
            set_checkpointing(trainer.model, checkpointing)
            todo = [(name, fn, kind)]
        for path, path_fn, path_kind in todo:
            for seq in seqs:
                row = {"shape": shape, "path": path, "seq": seq}
                try:
                    batch = make_batch(seq, config.vocab_size, device, path_kind)
                    seconds, peak_gib, loss = timed_steps(path_fn, trainer, batch, device, warmup, steps)
                    flops = compute_flops_per_token(config, seq) * seq
                    row.update(seconds=round(seconds, 4), peak_gib=round(peak_gib, 2), loss=round(loss, 5),
                               tokens_per_s=round(seq / seconds), mfu=round(flops / seconds / peak, 3) if peak else None)
                except torch.OutOfMemoryError:
                    row["error"] = "OOM"
                trainer.model.zero_grad(set_to_none=True)
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
    del trainer
    gc.collect()
    return rows


def trl_log_probs(hidden, weight, labels):
    """Per-token log-probs from TRL's chunked head, with the outputs and tile width the SFTTrainer asks for
    (trl.trainer.utils.add_fused_lm_head: log-probs, entropy and top-1 for its metrics)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                        ("log_probs", "entropy", "is_top1"))[0]


def head_rows(shape: str, seqs: list[int], device: str, warmup: int, steps: int, with_liger: bool,
              rows_wanted: list[str] | None = None) -> list[dict]:
    """The loss heads alone: forward + backward from [seq - prompt, hidden] bf16 hidden states (unit scale, as
    after the last RMSNorm) through a frozen [vocab, hidden] head (std 0.02: logits of std ~0.9). Seconds per
    call and the peak memory above the inputs."""
    from thinksafe.train.kl import CACHED_KL_TILES, cached_kl_per_token

    config = SHAPES[shape]
    hidden_size, vocab = config["hidden_size"], config["vocab_size"]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    head.weight.normal_(0, 0.02)
    rows = []
    for seq in seqs:
        n = seq - PROMPT_TOKENS
        batch = make_batch(seq, vocab, device, "cached")
        ids, logprobs, tail = (batch[name][0, PROMPT_TOKENS:] for name in ("ref_ids", "ref_logprobs", "ref_tail"))
        hidden = torch.randn(n, hidden_size, device=device, dtype=dtype).requires_grad_(True)
        teacher = torch.randn(n, hidden_size, device=device, dtype=dtype)
        labels = batch["labels"][0, PROMPT_TOKENS:]
        fns = {"head_cached": lambda: cached_kl_per_token(hidden, head, ids, logprobs, tail).sum(),
               "head_cached_tiles": lambda: cached_kl_per_token(hidden, head, ids, logprobs, tail,
                                                                path=CACHED_KL_TILES).sum(),
               "head_trl_ce": lambda: -trl_log_probs(hidden, head.weight, labels).sum()}
        if with_liger:
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

                liger_ce_loss, liger_jsd = LigerFusedLinearCrossEntropyLoss(), LigerFusedLinearJSD(jsd_beta=0.0)
                fns["head_liger_ce"] = lambda: liger_ce_loss(head.weight, hidden, labels)
                fns["head_liger_kl"] = lambda: liger_jsd(hidden, head.weight, teacher, head.weight, labels)
            except Exception as err:  # noqa: BLE001  no GPU/Triton or no package: the other rows still run
                rows.append({"shape": shape, "path": "head_liger", "error": f"{type(err).__name__}: {err}"[:200]})
        for name, fn in fns.items():
            if not wanted(name, rows_wanted):
                continue
            row = {"shape": shape, "path": name, "seq": seq}

            def step():
                loss = fn()
                loss.backward()
                hidden.grad = None
                return float(loss.detach())

            try:
                for _ in range(warmup):
                    loss = step()
                cuda = device.startswith("cuda")
                if cuda:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / steps
                extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
                row.update(seconds=round(seconds, 5), peak_gib=round(extra, 3), loss=round(loss, 5),
                           tokens_per_s=round(seq / seconds))
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict], shape: str, seqs: list[int]) -> str:
    paths = list(dict.fromkeys(r["path"] for r in rows if r["shape"] == shape and "seq" in r))
    lines = [f"| {shape} | " + " | ".join(paths) + " |", "| --- |" + " --- |" * len(paths)]
    for seq in seqs:
        cells = []
        for path in paths:
            row = next((r for r in rows if r["shape"] == shape and r["path"] == path and r.get("seq") == seq), {})
            if "seconds" in row:
                mfu = f", MFU {row['mfu']:.0%}" if row.get("mfu") else ""
                cells.append(f"{row['seconds']:.3f} s, {row['peak_gib']:.1f} GiB, {row['tokens_per_s'] / 1000:.1f}k tok/s{mfu}")
            else:
                cells.append(row.get("error", "-"))
        lines.append(f"| {seq // 1024}k |" if seq >= 1024 else f"| {seq} |")
        lines[-1] += " " + " | ".join(cells) + " |"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1.7B", "0.6B"], choices=sorted(SHAPES))
    parser.add_argument("--seqs", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shape and short sequences (CPU check)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--rows", nargs="+", default=None, help="only the rows matching these fnmatch patterns")
    parser.add_argument("--heads", action="store_true", help="also the head_* rows (the loss heads alone)")
    parser.add_argument("--out", default=None, help="write rows + tables as JSON here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.seqs, args.warmup, args.steps = ["tiny"], [384, 512], 1, 1  # > PROMPT_TOKENS
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "trl", "accelerate")}
    try:
        versions["liger-kernel"] = md.version("liger-kernel")
    except md.PackageNotFoundError:
        pass
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"device": device_name, "versions": versions}), flush=True)
    rows = []
    for shape in args.shapes:
        if args.heads:  # first: the head rows patch nothing
            rows += head_rows(shape, args.seqs, args.device, args.warmup, args.steps, not args.no_liger, args.rows)
        rows += run_shape(shape, args.seqs, args.device, args.warmup, args.steps, not args.no_liger, args.rows)
    tables = {shape: markdown(rows, shape, args.seqs) for shape in args.shapes}
    for table in tables.values():
        print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device_name, "versions": versions, "rows": rows,
                                              "tables": tables}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
