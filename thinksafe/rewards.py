"""GRPO rewards: pure scoring functions, the trainer-facing reward callables, the guard server client.

The paper rewards a completion with two equally weighted terms:
- guard reward: P(safe) from Llama-Guard-3's first generated token, softmax over the "safe" and
  "unsafe" logprobs (thinksafe.guards.p_safe_from_logprobs);
- format reward: 1 when the completion has exactly one well-ordered think block, else 0.

Scoring is pure (strings, verdicts and logprobs in, floats out, tested on hand-written cases). The
guard itself is thinksafe.guards (loaded in-process in single-device mode); for the multi-GPU mode
this file adds a guards backend that asks a vLLM server. The paper's client caught every exception and
returned a reward of 0, so a dead guard server silently trained the policy on noise: here a
server error is retried a bounded number of times and then raised.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from thinksafe.chat import THINK_CLOSE, THINK_OPEN, normalize_response
from thinksafe.errors import ThinksafeError
from thinksafe.registry import Family

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


# --- pure scoring ---------------------------------------------------------------------------


def completion_text(completion) -> str:
    """TRL passes plain strings for text prompts and [{"role": "assistant", "content": ...}] for chats."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"unexpected completion type {type(completion).__name__}")


def format_score(text: str, family: Family, opened: str = "") -> float:
    """1.0 when the response's think block is well formed for its family, else 0.0.

    `opened` is what the prompt already wrote of the response (`<think>\\n` where the template opens
    the block, read from the template: thinksafe.chat.template_opened_think); the completion is
    scored as the whole turn `opened + text`.
    - Reasoning families: exactly one `<think>` and one `</think>`, in that order.
    - Non-reasoning families (the demo model): no think tags at all.
    """
    text = opened + text
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if not family.reasoning:
        return float(opens == 0 and closes == 0)
    return float(opens == 1 and closes == 1 and text.index(THINK_OPEN) < text.index(THINK_CLOSE))


def guard_score(verdict) -> float:
    """The guard reward of one Verdict: P(safe) where the guard gives one (Llama-Guard style);
    1.0/0.0 for guards judged from text (WildGuard, refusal judge). Unparsed counts as unsafe (0.0),
    as everywhere in thinksafe; GuardReward logs how often that happens."""
    if verdict.p_safe is not None:
        if math.isnan(verdict.p_safe):  # e.g. both logprobs -inf; TRL would read NaN as "no reward"
            raise GuardServerError(f"the guard's P(safe) is NaN (verdict {verdict!r})")
        return float(verdict.p_safe)
    return float(verdict.safe and verdict.parsed)


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


# --- trainer-facing reward callables ---------------------------------------------------------


class FormatReward:
    """TRL reward function: format_score per completion."""

    __name__ = "format_reward"  # TRL names the logged reward column after __name__

    def __init__(self, family: Family, opened: str = ""):
        self.family = family
        self.opened = opened  # what the prompt already wrote of each response (see format_score)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [format_score(completion_text(c), self.family, self.opened) for c in completions]


class GuardReward:
    """TRL reward function: the guard's score for (original instruction, completion).

    The guard sees the dataset's `instruction` (the user's words), not the chat-templated policy
    prompt the paper's code sent, and the whole completion, reasoning included, normalised as in
    synthesis (the `<think>` a template opened in the prompt restored). `guard` is any thinksafe.guards.Guard:
    loaded in-process (single-device mode) or a LogprobGuard over VLLMServerBackend.
    """

    __name__ = "guard_reward"

    def __init__(self, guard, family: Family, opened: str = ""):
        self.guard = guard
        self.family = family
        self.opened = opened

    def __call__(self, prompts, completions, instruction=None, log_metric=None, **kwargs) -> list[float]:
        if instruction is None:
            raise ThinksafeError("the GRPO dataset has no `instruction` column for the guard reward")
        responses = [normalize_response(self.opened + completion_text(c), self.family).text for c in completions]
        verdicts = self.guard.judge(list(instruction), responses)
        if len(verdicts) != len(responses):
            raise GuardServerError(f"the guard returned {len(verdicts)} verdicts for {len(responses)} completions")
        if log_metric is not None:
            log_metric("guard/unparsed", float(sum(not v.parsed for v in verdicts)))
            log_metric("guard/truncated", float(sum(v.truncated for v in verdicts)))
        return [guard_score(v) for v in verdicts]


# --- the guard server -----------------------------------------------------------------------


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


def server_guard(base_url: str, guard: str, tokenizer=None, **backend_kwargs):
    """Llama-Guard (its own template) scored by a vLLM server; the tokenizer is loaded locally."""
    from thinksafe.guards import LogprobGuard
    from thinksafe.models import load_tokenizer
    from thinksafe.registry import GUARDS

    source = GUARDS.get(guard, guard)
    backend = VLLMServerBackend(base_url, **backend_kwargs)
    tokenizer = tokenizer or load_tokenizer(source)
    label = f"Llama-Guard ({source}) served at {base_url}: P(safe) vs P(unsafe) on the first token"
    return LogprobGuard(guard, label, tokenizer, backend, backend.context_length - 1, official_template=True)


__all__ = [
    "FormatReward",
    "GuardReward",
    "GuardServerError",
    "VLLMServerBackend",
    "completion_text",
    "format_score",
    "guard_score",
    "server_guard",
    "top_logprobs_by_id",
]
