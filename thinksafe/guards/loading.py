"""Checking and loading guards by name: a registered name, a hub id or a directory."""

from __future__ import annotations

from thinksafe.engines import GUARD, eager_for, pick_backend
from thinksafe.guards.backends import HFBackend, ReplicatedBackend, VLLMBackend, transformers_backend
from thinksafe.guards.base import DEFAULT_BATCH_SIZE, Guard, GuardError
from thinksafe.guards.llama_guard import LogprobGuard
from thinksafe.guards.server import VLLMServerBackend
from thinksafe.guards.specs import GUARD_SPECS, GUARDS, GuardSpec, looks_like_model, spec_for
from thinksafe.guards.wildguard import WILDGUARD_MAX_INPUT_TOKENS
from thinksafe.model_loading import check_model_source, default_device, load_model, load_tokenizer, resolve_model_path


def check_named_guard(name: str, where: str) -> None:
    """A self-generated dataset names its guard (`thinksafe-<guard>`): one of the registered guards."""
    if name not in GUARD_SPECS:
        raise GuardError(f"{where} names an unknown guard {name!r}; choose one of: {', '.join(GUARD_SPECS)}")


def validate_guard_name(name_or_path: str, style: str | None = None) -> GuardSpec:
    """Fail fast (before any model loads) on a guard name that load_guard would reject; the spec."""
    registered = GUARD_SPECS.get(name_or_path)
    if registered is not None and registered.kind.text_only:
        return registered
    if registered is None and not looks_like_model(name_or_path):
        raise GuardError(
            f"unknown guard {name_or_path!r}; choose one of: {', '.join(GUARD_SPECS)}, a hub id or a model directory"
        )
    spec = spec_for(name_or_path, style)

    check_model_source(spec.source)  # a missing dir or uncached hub id, now
    return spec


def guard_label(name_or_path: str, style: str | None = None) -> str:
    """The label load_guard would give, without loading any weights (for stats of resumed runs)."""
    return validate_guard_name(name_or_path, style).label


def load_guard(name_or_path: str, device: str | None = None, backend: str = "auto", *,
               style: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               max_input_tokens: int | None = None, model=None, tokenizer=None,
               trust_remote_code: bool = False, work_tokens: int | None = None, data_parallel=1,
               ray_address: str | None = None, **vllm_kwargs) -> Guard:
    """A guard by registry name (guards/specs.py: "llama-guard-3", "wildguard", "refusal-judge", ...),
    hub id or directory. `style="llama-guard"` makes any causal LM with a chat template a (weak)
    Llama-Guard-style guard. `model`/`tokenizer` reuse already-loaded objects (transformers only).
    max_input_tokens defaults to the guard's context (WildGuard: 16384, as the paper). `work_tokens`
    (about the tokens to judge) lets `backend="auto"` weigh vLLM's start-up on a CPU."""
    registered = GUARD_SPECS.get(name_or_path)
    if registered is not None and registered.kind.text_only:
        return registered.kind()
    if model is None:
        validate_guard_name(name_or_path, style)
    spec = spec_for(name_or_path, style)

    try:
        chosen_backend = "transformers" if model is not None else pick_backend(backend, work_tokens, job=GUARD).name
    except (ValueError, RuntimeError) as err:
        raise GuardError(str(err)) from None
    tokenizer = tokenizer or load_tokenizer(spec.source, trust_remote_code=trust_remote_code,
                                            require_template=spec.kind.needs_chat_template)
    runner = None
    if chosen_backend == "vllm" and "enforce_eager" not in vllm_kwargs:  # a small job: no compile (engines.eager_for)
        vllm_kwargs = {**vllm_kwargs, "enforce_eager": eager_for(work_tokens)}
    if data_parallel != 1 and model is None:  # replicas on Ray (thinksafe.replicas), when more than one fits
        runner = replicated_backend(spec.source, chosen_backend, device, batch_size, trust_remote_code,
                                    data_parallel, ray_address, vllm_kwargs)
    if runner is None and chosen_backend == "vllm":
        runner = VLLMBackend(resolve_model_path(spec.source), **vllm_kwargs)
    elif runner is None:
        device = device or default_device()
        runner = HFBackend(model or load_model(spec.source, device=device, trust_remote_code=trust_remote_code),
                           tokenizer, batch_size=batch_size)
    # A model config that names no context: the paper's guard input cap.
    context = runner.context_length or WILDGUARD_MAX_INPUT_TOKENS
    return spec.kind.build(spec, tokenizer, runner, max_input_tokens or spec.kind.input_limit(context))


def replicated_backend(source: str, backend: str, device: str | None, batch_size: int, trust_remote_code: bool,
                       data_parallel, ray_address: str | None, vllm_kwargs: dict):
    """A guard's backend on `data_parallel` replicas; None when the layout holds one (the in-process path)."""
    from thinksafe.replicas import layout_for  # deferred: ray only with several replicas
    from thinksafe.replicas import ray_address as cluster

    layout = layout_for(data_parallel, source, ray_address, vllm_kwargs.get("tensor_parallel_size"),
                        vllm_kwargs.get("gpu_memory_utilization"))
    if not layout.parallel:
        return None
    if backend == "vllm":
        engine = {**vllm_kwargs, "path": resolve_model_path(source),
                  "tensor_parallel_size": layout.tensor_parallel_size}
        if layout.gpu_memory_utilization:
            engine["gpu_memory_utilization"] = layout.gpu_memory_utilization
        return ReplicatedBackend(VLLMBackend, engine, layout, cluster(ray_address))
    loader = {"source": source, "device": device or default_device(), "batch_size": batch_size,
              "trust_remote_code": trust_remote_code}
    return ReplicatedBackend(transformers_backend, loader, layout, cluster(ray_address))


def server_guard(base_url: str, guard: str, tokenizer=None, **backend_kwargs) -> LogprobGuard:
    """Llama-Guard (its own template) scored by a vLLM server; the tokenizer is loaded locally."""

    source = GUARDS.get(guard, guard)
    backend = VLLMServerBackend(base_url, **backend_kwargs)
    tokenizer = tokenizer or load_tokenizer(source)
    label = f"Llama-Guard ({source}) served at {base_url}: P(safe) vs P(unsafe) on the first token"
    return LogprobGuard(guard, label, tokenizer, backend, backend.context_length - 1, official_template=True)
