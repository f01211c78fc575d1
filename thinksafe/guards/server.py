"""The guard backend that asks a vLLM OpenAI-compatible server (`vllm serve <guard>`): GRPO's
server mode scores its rewards here while the policy trains on other GPUs.

A server error is retried a bounded number of times and then raised, never turned into a reward
(the paper's client returned 0 on any exception: docs/paper.md).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from thinksafe.errors import ThinksafeError

logger = logging.getLogger(__name__)

# vLLM's OpenAI server caps `logprobs` at 20 unless started with --max-logprobs; the paper asked
# for the top 2, which loses "unsafe" whenever a third token outranks it.
GUARD_TOP_LOGPROBS = 20
GUARD_RETRIES = 3  # attempts per batch before the run stops
GUARD_BACKOFF_S = 2.0  # first wait between attempts; doubles each time
GUARD_TIMEOUT_S = 600.0  # one batch of up to 64 x 17k-token inputs through an 8B guard
TOKEN_ID_PREFIX = "token_id:"  # vLLM's logprob keys with return_tokens_as_token_ids


class GuardServerError(ThinksafeError, RuntimeError):
    """The guard server failed or answered something that is not a completions response."""


def top_logprobs_by_id(choice: dict) -> dict[int, float]:
    """{token id: logprob} of the first generated token in one choice of a vLLM /v1/completions
    answer requested with `logprobs` and `return_tokens_as_token_ids` (keys "token_id:<id>").
    vLLM writes -inf as -9999.0; both are kept as given."""
    logprobs = choice.get("logprobs") or {}
    top = logprobs.get("top_logprobs") or []
    if not top or not top[0]:
        raise GuardServerError(f"guard answer {choice.get('index')} has no top logprobs for its first token")
    result = {}
    for key, value in top[0].items():
        if not key.startswith(TOKEN_ID_PREFIX):
            raise GuardServerError(f"guard answer keyed by text ({key!r}), not token ids: is the server vLLM?")
        result[int(key[len(TOKEN_ID_PREFIX):])] = float(value)
    return result



class VLLMServerBackend:
    """A thinksafe.guards backend over vLLM's OpenAI-compatible server (`vllm serve <guard>`).

    One POST /v1/completions per reward batch: token-id prompts (built locally by the guard, so no
    second BOS and an exact length), max_tokens 1, greedy, top-k logprobs keyed by token id.
    Connection errors, timeouts and HTTP 5xx are retried `retries` times with doubling waits, then
    GuardServerError; HTTP 4xx is raised at once. Never a silent reward.
    """

    name = "vllm-server"

    def __init__(self, base_url: str, model: str | None = None, max_model_len: int | None = None,
                 retries: int = GUARD_RETRIES, backoff_s: float = GUARD_BACKOFF_S,
                 timeout_s: float = GUARD_TIMEOUT_S):
        if retries < 1:
            raise ValueError("retries must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        if model is None or max_model_len is None:
            card = (self._request("GET", "/v1/models").get("data") or [{}])[0]
            model = model or card.get("id")
            max_model_len = max_model_len or card.get("max_model_len")
        if not model or not max_model_len:
            raise GuardServerError(f"{self.base_url}/v1/models names no model or max_model_len")
        self.model, self.max_model_len = model, int(max_model_len)

    @property
    def context_length(self) -> int:
        return self.max_model_len

    def first_token_logprobs(self, sequences: list[list[int]], token_ids: Sequence[int]) -> list[dict[int, float]]:
        """Top-GUARD_TOP_LOGPROBS logprobs of the first generated token; `token_ids` outside them are missing."""
        if not sequences:
            return []
        payload = {
            "model": self.model,
            "prompt": [list(map(int, s)) for s in sequences],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": GUARD_TOP_LOGPROBS,
            "return_tokens_as_token_ids": True,
        }
        answer = self._request("POST", "/v1/completions", payload)
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if [c.get("index", 0) for c in choices] != list(range(len(sequences))):
            raise GuardServerError(f"guard server returned {len(choices)} choices for {len(sequences)} prompts")
        return [top_logprobs_by_id(choice) for choice in choices]

    def greedy(self, sequences, max_new_tokens):
        raise GuardServerError("the guard server backend serves Llama-Guard-style guards only")

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        data = json.dumps(payload).encode() if payload is not None else None
        last_error, attempt = "", 0
        for attempt in range(1, self.retries + 1):
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code}: {err.read().decode(errors='replace')[:500]}"
                if err.code < 500:  # a bad request does not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except json.JSONDecodeError as err:
                last_error = f"answer is not JSON: {err}"
            if attempt < self.retries:
                wait = self.backoff_s * 2 ** (attempt - 1)
                logger.warning("guard server %s failed (%s); retry %d/%d in %.0f s",
                               url, last_error, attempt, self.retries - 1, wait)
                time.sleep(wait)
        raise GuardServerError(f"guard server {url} failed after {attempt} attempt(s): {last_error}")
