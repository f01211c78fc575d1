"""The base model's per-position top-k log-probabilities, captured while it generates its own data.

`thinksafe synthesize --store_reference_topk K` keeps, for every generated position of a sample, the
K most likely next tokens under the generating model's raw (temperature-1, unfiltered) distribution,
their log-probabilities and the mass outside them; `thinksafe train --kl_reference cached` computes
KL(base ‖ model) against them (thinksafe.train.kl.cached_kl_per_token) with no reference forward.

One entry per sample: `tokens` [T] the generated ids (to check that training tokenises the response
to the very same ids), `ids` [T, K] int32, `logprobs` [T, K] float16, `tail` [T] float32. A store is
one safetensors file of the entries' arrays concatenated, with a JSON index (key -> offset, length)
in its metadata: a few bytes per (position, k) and no pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinksafe.io import give_normal_mode

REFERENCE_TOPK_FILE = "reference_topk.safetensors"  # beside train.jsonl: kept benign rows (and cut ones)
REFERENCE_TOPK_PARTIAL_DIR = "reference_topk.partial"  # per-chunk stores of the generation log's samples
FORMAT_VERSION = 1
# K when the pipeline synthesizes for a `--kl_reference cached` run and the synthesis recipe names none.
# Measured on the demo model (bench/README.md "Cached KL reference"): gradient cosine with the exact KL
# 0.99769 / 0.99969 / 0.99997 and KL error 13.1% / 5.6% / 1.9% at K = 20 / 64 / 256. 64 costs ~0.4 KB
# a generated position (int32 id + float16 log-prob), 256 ~1.5 KB: 64 is the storage/fidelity middle.
PIPELINE_REFERENCE_TOPK = 64


@dataclass(frozen=True)
class TopK:
    tokens: np.ndarray  # [T] int32: the generated ids these positions predicted
    ids: np.ndarray  # [T, K] int32
    logprobs: np.ndarray  # [T, K] float16
    tail: np.ndarray  # [T] float32: 1 - the top-k mass, computed before rounding the log-probs

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, length: int) -> "TopK":
        return TopK(self.tokens[:length], self.ids[:length], self.logprobs[:length], self.tail[:length])


def topk_from_logits(logits, k: int):
    """(ids [n, k] int32, log-probs [n, k] float16, tail [n] float32) of raw logits [n, V].

    The tail is exp(logsumexp of the other logits - logsumexp of all), in float32: exact where
    1 - Σ exp(rounded top-k) would cancel.
    """
    import torch

    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    top, ids = logits.topk(k, dim=-1)
    tail = (torch.logsumexp(logits.scatter(1, ids, float("-inf")), dim=-1) - log_z[:, 0]).exp()
    return (ids.to(torch.int32).cpu().numpy(), (top - log_z).to(torch.float16).cpu().numpy(),
            tail.cpu().numpy().astype(np.float32))


def tail_from_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """The mass outside the top-k when only their log-probs are known (vLLM returns no more)."""
    return np.clip(1.0 - np.exp(logprobs.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)


def row_key(instruction: str, response: str) -> str:
    """A training row's key in a store: its content, so train.jsonl needs no extra column."""
    return hashlib.sha256(json.dumps([instruction, response]).encode()).hexdigest()[:32]


def write_store(path: Path, entries: dict[str, TopK], k: int, meta: dict | None = None) -> None:
    """One safetensors file (written to a temp name, then renamed: never half a store)."""
    from safetensors.numpy import save_file

    path = Path(path)
    index, offset = {}, 0
    for key, entry in entries.items():
        index[key] = [offset, len(entry)]
        offset += len(entry)
    values = list(entries.values())

    def stack(name, dtype, shape):
        parts = [getattr(e, name) for e in values]
        return np.ascontiguousarray(np.concatenate(parts).astype(dtype)) if parts else np.zeros(shape, dtype)

    arrays = {"tokens": stack("tokens", np.int32, (0,)), "ids": stack("ids", np.int32, (0, k)),
              "logprobs": stack("logprobs", np.float16, (0, k)), "tail": stack("tail", np.float32, (0,))}
    metadata = {"index": json.dumps(index), "k": str(k), "version": str(FORMAT_VERSION),
                **{name: json.dumps(value) for name, value in (meta or {}).items()}}
    staging = path.with_name(path.name + ".tmp")
    save_file(arrays, str(staging), metadata=metadata)
    import os

    with open(staging, "rb") as handle:
        os.fsync(handle.fileno())
    give_normal_mode(staging)  # safetensors writes 0600 whatever the umask
    os.replace(staging, path)


def read_store(path: Path) -> tuple[dict[str, TopK], int]:
    """({key: TopK}, k) of a store."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
        arrays = {name: handle.get_tensor(name) for name in ("tokens", "ids", "logprobs", "tail")}
    index = json.loads(metadata["index"])
    entries = {key: TopK(*(arrays[name][start:start + length] for name in ("tokens", "ids", "logprobs", "tail")))
               for key, (start, length) in index.items()}
    return entries, int(metadata["k"])
