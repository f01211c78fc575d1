"""GRPO rewards: pure scoring functions and the trainer-facing reward callables.

The paper rewards a completion with two equally weighted terms:
- guard reward: P(safe) from Llama-Guard-3's first generated token, softmax over the "safe" and
  "unsafe" logprobs (thinksafe.guards.p_safe_from_logprobs);
- format reward: 1 when the completion has exactly one well-ordered think block, else 0.

Scoring is pure (strings, verdicts and logprobs in, floats out, tested on hand-written cases). The
guard itself is thinksafe.guards: loaded in-process in single-device mode, or asking a vLLM server
(thinksafe.guards.server_guard) in the multi-GPU mode, where a failing server stops the run rather
than giving a reward.
"""

from __future__ import annotations

import math

from thinksafe.chat import THINK_CLOSE, THINK_OPEN, normalize_response
from thinksafe.errors import ThinksafeError
from thinksafe.guards import GuardServerError
from thinksafe.registry import Family

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


__all__ = [
    "FormatReward",
    "GuardReward",
    "completion_text",
    "format_score",
    "guard_score",
]
