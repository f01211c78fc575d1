"""What the generator sees (steering) and whether what it wrote is complete enough to judge."""

from __future__ import annotations

from thinksafe.chat import normalize_response
from thinksafe.engines import Completion
from thinksafe.registry import Family
from thinksafe.synthesize.config import STEER_PREFIX

# Completeness of a generation (a status other than OK drops it before the guard).
OK = "ok"
UNCLOSED_THINK = "unclosed_think"  # reasoning family, no </think> (paper)
UNFINISHED = "unfinished"  # non-reasoning family, cut at max_new_tokens before the end-of-turn token
EMPTY = "empty"
CUT_AT_LIMIT = (UNFINISHED, UNCLOSED_THINK)  # statuses of a sample the token limit cut short


def steer(instruction: str, harmful: bool, prefix: str = STEER_PREFIX) -> str:
    """What the generator sees: harmful prompts behind the refusal-steering prefix, benign unchanged."""
    return prefix + instruction if harmful else instruction


def check_completion(completion: Completion, family: Family) -> tuple[str, str]:
    """(normalised response, status): reasoning families need a closed think block (R1-distill gets
    its `<think>\\n` prepended); the others need the end-of-turn token."""
    normalized = normalize_response(completion.text, family)
    if family.reasoning and not normalized.closed:
        return normalized.text, UNCLOSED_THINK
    if not family.reasoning and not completion.finished:
        return normalized.text, UNFINISHED
    if not normalized.text.strip():
        return normalized.text, EMPTY
    return normalized.text, OK
