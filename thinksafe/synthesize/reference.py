"""--store-reference-topk K: the generator's raw top-k of benign samples, kept per generation chunk in
<out>/reference_topk.partial/ (so a resumed run keeps them) and written at the end, for the rows
kept (train.jsonl and unfinished_benign.jsonl), as <out>/reference_topk.safetensors: the store
`thinksafe train --kl_reference cached` reads (thinksafe.train.data.load_reference).

Chunk stores are keyed by the generation log's key (prompt#sample); the final store by the training
row's content (thinksafe.reference_topk.row_key), which is all train.jsonl gives training to match on.
"""

from __future__ import annotations

from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import ResumableLog
from thinksafe.reference_topk import (
    REFERENCE_TOPK_FILE,
    REFERENCE_TOPK_PARTIAL_DIR,
    TopK,
    read_store,
    row_key,
    write_store,
)

CHUNK_PREFIX = "chunk-"


class ReferenceChunks:
    """Collects the top-k of the rows a generation chunk appends and writes them as one chunk store
    *before* the chunk reaches the log: a logged sample always has its top-k on disk. A kill between
    the two leaves a chunk store for samples the log lacks; they are generated again (same seed, same
    keys) and the later chunk store wins when the chunks are read."""

    def __init__(self, work: Path, k: int):
        self.dir, self.k, self.pending = work / REFERENCE_TOPK_PARTIAL_DIR, k, {}

    def add(self, log_key: str, reference: TopK | None) -> None:
        if reference is None:
            raise ThinksafeError("--store-reference-topk: the generator returned no top-k for a sample")
        self.pending[log_key] = reference

    def wrap(self, log: ResumableLog) -> "_FlushingLog":
        return _FlushingLog(log, self)

    def flush(self) -> None:
        if not self.pending:
            return
        self.dir.mkdir(exist_ok=True)
        index = len(chunk_files(self.dir))
        write_store(self.dir / f"{CHUNK_PREFIX}{index:06d}.safetensors", self.pending, self.k)
        self.pending = {}


class _FlushingLog:
    """The generation log as thinksafe.resumable sees it: each append (one generation call's rows,
    built lazily by the row maker, which is what fills the pending top-k) is materialised, its top-k
    stored, then logged."""

    def __init__(self, log: ResumableLog, chunks: ReferenceChunks):
        self.log, self.chunks = log, chunks

    def __getattr__(self, name):
        return getattr(self.log, name)

    def append(self, rows) -> int:
        rows = list(rows)
        self.chunks.flush()
        return self.log.append(rows)


def chunk_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{CHUNK_PREFIX}*.safetensors")) if directory.is_dir() else []


def read_chunks(work: Path, k: int) -> dict[str, TopK]:
    """{log key: TopK} of every chunk store in `work` (later chunks override earlier ones)."""
    entries: dict[str, TopK] = {}
    for path in chunk_files(work / REFERENCE_TOPK_PARTIAL_DIR):
        chunk, chunk_k = read_store(path)
        if chunk_k != k:  # the manifest records k, so only a hand-edited directory gets here
            raise ThinksafeError(f"{path} holds top-{chunk_k}, this run stores top-{k}: pass --overwrite")
        entries.update(chunk)
    return entries


def kept_references(generations: dict[str, dict], instructions: dict[str, str], chunks: dict[str, TopK],
                    rows: list[dict]) -> dict[str, TopK]:
    """{row_key: TopK} for the benign rows kept (`rows`: train.jsonl's and unfinished_benign.jsonl's).

    `instructions`: {prompt id: original instruction} of the benign prompts only, so harmful rows
    (CE targets, no KL) get none. A row is found by its content: the generation whose (original
    instruction, normalised response) it is.
    """
    by_content = {}
    for log_key, generation in generations.items():
        if log_key in chunks and generation["prompt_id"] in instructions:
            by_content[row_key(instructions[generation["prompt_id"]], generation["response"])] = chunks[log_key]
    wanted = {row_key(r["instruction"], r["response"]) for r in rows}
    return {key: by_content[key] for key in sorted(wanted) if key in by_content}


def write_reference_store(work: Path, entries: dict[str, TopK] | None, k: int, model: str) -> None:
    """The final store beside train.jsonl (atomically), or none: never a store older than train.jsonl."""
    path = work / REFERENCE_TOPK_FILE
    if entries is None:
        path.unlink(missing_ok=True)
        return
    write_store(path, entries, k, {"model": model})
