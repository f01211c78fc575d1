"""What every guard shares: the Verdict, the Guard interface, the keep rule of synthesis, and fitting
a (prompt, response) pair into a guard model's context.

`Guard.judge(prompts, responses) -> list[Verdict]`. A model guard renders each pair with its own
format, cuts it to fit (fit_to_context) and asks a backend (guards/backends.py, guards/server.py)
for either the first token's logprobs or a short greedy text; everything above the backend is pure
and tested on hand-written cases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from thinksafe.errors import ThinksafeError

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
STYLE_LLAMA_GUARD = "llama-guard"
STYLE_WILDGUARD = "wildguard"
STYLES = (STYLE_LLAMA_GUARD, STYLE_WILDGUARD)  # what --guard-style accepts for a model guard
TRUNCATION_NOTE = "\n[... truncated to fit the guard's context ...]"
MAX_TRUNCATION_ROUNDS = 64  # each round removes at least the overflow; a few suffice in practice
# Why synthesis drops a judged row (counted by name in stats.json).
GUARD_UNSAFE = "guard_unsafe"
GUARD_UNPARSED = "guard_unparsed"


class GuardError(ThinksafeError, ValueError):
    """An unknown guard name, an unusable guard model, or a guard that cannot fit its input."""


@dataclass(frozen=True)
class Verdict:
    safe: bool  # the guard judges the response safe (unparseable -> False)
    p_safe: float | None  # Llama-Guard style: P(safe)/(P(safe)+P(unsafe)); None for text parsers
    refusal: bool | None  # WildGuard "Response refusal", or the refusal-phrase judge
    parsed: bool  # False when the judge output could not be parsed
    raw: str = ""  # the judge's raw output (WildGuard text / "safe"/"unsafe")
    truncated: bool = False  # the input was cut to fit the guard's context

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Guard:
    """name: what the user typed (or the hub id); label: human-readable, says "stand-in" where one.

    Class attributes describe the kind of judge, so the registry (guards/specs.py) needs only
    the class: `style` (what --guard-style names it), `judges_refusal` (its verdicts carry
    `refusal`), `text_only` (no model: judged from the text alone, nothing to load or batch).
    """

    name = "guard"
    label = "guard"
    style = ""
    judges_refusal = False
    text_only = False
    input_tokens = 0  # tokens the guard model has read so far (0 for text-only judges)

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        return self._judge(list(prompts), list(responses))

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        raise NotImplementedError

    @classmethod
    def describe(cls, spec) -> str:
        """The label of the guard a registry spec describes (before any weights load)."""
        return cls.label

    @staticmethod
    def keeps(verdict: Mapping, harmful: bool) -> str | None:
        """Synthesis's rule for a judged row (a Verdict as stored, a dict): None keeps it, else the
        drop reason. A safety guard keeps what it parsed and judged safe, whatever the prompt;
        unparsed counts as unsafe."""
        if not verdict["parsed"]:
            return GUARD_UNPARSED
        return None if verdict["safe"] else GUARD_UNSAFE


class ModelGuard(Guard):
    """Shared by the model-based guards: tokenise with truncation, then ask the backend."""

    needs_chat_template = False  # its input is rendered with the tokenizer's chat template

    def __init__(self, name: str, label: str, tokenizer, backend, max_input_tokens: int):
        self.name = name
        self.label = label
        self.tokenizer = tokenizer
        self.backend = backend
        self.max_input_tokens = max_input_tokens

    @classmethod
    def build(cls, spec, tokenizer, backend, max_input_tokens: int) -> ModelGuard:
        """The guard a registry spec describes, over a loaded tokenizer and backend."""
        return cls(spec.name, spec.label, tokenizer, backend, max_input_tokens)

    @classmethod
    def input_limit(cls, context: int) -> int:
        """Input tokens allowed in a context of `context` positions (room left for the answer)."""
        return context - 1

    def render(self, prompt: str, response: str) -> str:
        raise NotImplementedError

    def prefix_ids(self) -> list[int]:
        """Token ids put before the rendered text (none: templates carry their own BOS)."""
        return []

    def encode_inputs(self, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[bool]]:
        prefix = self.prefix_ids()
        encoded = [fit_to_context(self.render, self._encode, p, r, self.max_input_tokens - len(prefix))
                   for p, r in zip(prompts, responses)]
        truncated = [t for _, t in encoded]
        self.input_tokens += sum(len(prefix) + len(ids) for ids, _ in encoded)
        if any(truncated):
            logger.info("%s: %d of %d inputs truncated to %d tokens", self.name, sum(truncated), len(truncated),
                        self.max_input_tokens)
        return [prefix + ids for ids, _ in encoded], truncated

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


# --- fitting an input into the guard's context ----------------------------------------------


def fit_to_context(render: Callable[[str, str], str], encode: Callable[[str], list[int]], prompt: str,
                   response: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of render(prompt, response), cutting the response's tail (then the prompt's) until
    they fit in max_tokens; the template around them is kept whole. Returns (ids, truncated)."""
    ids = encode(render(prompt, response))
    if len(ids) <= max_tokens:
        return ids, False
    for cut_response in (True, False):
        for _ in range(MAX_TRUNCATION_ROUNDS):
            if len(ids) <= max_tokens:
                break
            text = response if cut_response else prompt
            if not text:
                break
            text_ids = encode(text)
            # Drop the overflow plus the note's cost; re-encode since token boundaries can shift.
            keep = max(0, len(text_ids) - (len(ids) - max_tokens) - len(encode(TRUNCATION_NOTE)) - 1)
            shorter = _prefix_within(encode, text, keep)
            shorter = shorter + TRUNCATION_NOTE if shorter else ""
            if cut_response:
                response = shorter
            else:
                prompt = shorter
            ids = encode(render(prompt, response))
        if len(ids) <= max_tokens:
            return ids, True
    raise GuardError(f"the guard's template alone needs {len(ids)} tokens, more than its context of {max_tokens}")


def _prefix_within(encode: Callable[[str], list[int]], text: str, keep: int) -> str:
    """The longest character prefix of `text` whose encoding has at most `keep` tokens (bisection)."""
    if keep <= 0:
        return ""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(text[:mid])) <= keep:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]
