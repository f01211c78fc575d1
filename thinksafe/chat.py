"""Chat formatting and <think> handling shared by generation, guards and training.

Training text must keep the assistant's reasoning, but the real templates drop it: R1-distill's
keeps only what follows `</think>` in assistant turns, and Qwen3's drops reasoning from history
turns. So we never render the assistant turn through the template. The prompt is rendered with
`add_generation_prompt=True`, the completion is the normalised response plus the template's own
end-of-turn text, and the two are tokenised separately and concatenated, which makes the prompt a
token-exact prefix of the conversation by construction (prompt masking relies on it).
"""

from __future__ import annotations

from dataclasses import dataclass

from thinksafe.errors import ThinksafeError
from thinksafe.registry import Family

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_SENTINEL = "\u2063THINKSAFE-RESPONSE\u2063"


class ChatTemplateError(ThinksafeError, ValueError):
    """The tokenizer has no usable chat template."""


def require_chat_template(tokenizer, name: str = "model") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{name} has no chat template: use an instruct/chat checkpoint or set "
            "tokenizer.chat_template before running thinksafe"
        )


def generation_prompt(tokenizer, prompt: str, family: Family, enable_thinking: bool = True) -> str:
    """The text a model is sampled from: the user turn plus the assistant header.

    `enable_thinking` is read by Qwen3's template only; other templates ignore the variable.
    """
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking and family.reasoning,
    )


def generation_prompt_ids(tokenizer, prompt: str, family: Family, enable_thinking: bool = True) -> list[int]:
    """The prompt as every engine receives it: rendered once by the template, then tokenised without
    adding special tokens. The template writes its own BOS; letting the tokenizer add one too (as an
    engine does with text) gives R1-distill, whose tokenizer has `add_bos_token`, two."""
    return tokenizer(generation_prompt(tokenizer, prompt, family, enable_thinking),
                     add_special_tokens=False)["input_ids"]


def opened_think(tokenizer, prompt_ids: list[int]) -> str:
    """What of the response the prompt already wrote: `<think>\\n` when the generation prompt ends inside
    an opened think block (R1-distill's later template revision), else "" (its first revision, Qwen3).
    Read from the rendered tokens, never assumed per family: both R1 revisions are in use."""
    tail = tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False)
    stripped = tail.rstrip("\n")
    return tail[len(stripped) - len(THINK_OPEN):] if stripped.endswith(THINK_OPEN) else ""


def template_opened_think(tokenizer, family: Family) -> str:
    """opened_think for this template's generation prompt (thinking on)."""
    return opened_think(tokenizer, generation_prompt_ids(tokenizer, "hi", family, enable_thinking=True))


def end_of_turn_text(tokenizer) -> str:
    """What the template writes after an assistant message (e.g. `<|im_end|>`), trailing newlines cut."""
    require_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
        tokenize=False,
    )
    if _SENTINEL not in rendered:
        raise ChatTemplateError("the chat template does not render assistant messages")
    suffix = rendered.split(_SENTINEL, 1)[1].rstrip("\n")
    if not suffix and tokenizer.eos_token:
        suffix = tokenizer.eos_token
    return suffix


# --- response normalisation -----------------------------------------------------------------


@dataclass(frozen=True)
class NormalizedResponse:
    text: str
    has_think: bool  # a <think> block was opened
    closed: bool  # ... and closed with </think> (always True for non-reasoning families)


def normalize_response(text: str, family: Family) -> NormalizedResponse:
    """Put a generated response in the training form `<think>\\n…\\n</think>\\n\\nanswer`.

    - A response that closes a block it never opened gets `<think>\\n` in front: SafeChain and
      published rows trained on Qwen3 lost the opening tag (the paper's data loader adds it back).
      Generated responses already carry it: generators put back the `<think>` a template opened.
    - `</think>` is followed by exactly one blank line.
    - An unclosed block is reported (closed=False), never raised: the caller counts and drops it.
    Non-reasoning families are returned stripped and unchanged otherwise.
    """
    if not family.reasoning:
        return NormalizedResponse(text.strip(), THINK_OPEN in text, True)
    body = text.lstrip()
    if THINK_CLOSE in body and THINK_OPEN not in body:
        body = f"{THINK_OPEN}\n{body}"
    has_think = body.startswith(THINK_OPEN)
    closed = has_think and THINK_CLOSE in body
    if closed:
        reasoning, answer = body.split(THINK_CLOSE, 1)
        body = f"{reasoning.rstrip()}\n{THINK_CLOSE}\n\n{answer.strip()}"
    return NormalizedResponse(body.rstrip(), has_think, closed)


def split_think(text: str) -> tuple[str, str]:
    """(reasoning, final answer). Text without `</think>` is all answer when no block was opened."""
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return reasoning.replace(THINK_OPEN, "", 1).strip(), answer.strip()
    if THINK_OPEN in text:
        return text.split(THINK_OPEN, 1)[1].strip(), ""
    return "", text.strip()


# --- training text --------------------------------------------------------------------------


def training_texts(tokenizer, prompt: str, response: str, family: Family, finished: bool = True) -> tuple[str, str]:
    """(prompt_text, completion_text) with the reasoning kept in the completion.

    When the generation prompt already opened the think block (R1-distill), the response's own
    `<think>` is not repeated. An unfinished response (cut at the token limit) gets no end-of-turn
    text: the model never wrote one there.
    """
    prompt_text = generation_prompt(tokenizer, prompt, family, enable_thinking=True)
    completion = normalize_response(response, family).text
    if prompt_text.rstrip().endswith(THINK_OPEN) and completion.startswith(THINK_OPEN):
        completion = completion[len(THINK_OPEN) :].lstrip("\n")
    return prompt_text, completion + (end_of_turn_text(tokenizer) if finished else "")


def encode_for_training(tokenizer, prompt: str, response: str, family: Family, finished: bool = True) -> dict:
    """Token ids of prompt+completion and a completion mask (1 on completion tokens).

    The template text carries its own BOS/special tokens, so nothing is added by the tokenizer.
    """
    prompt_text, completion_text = training_texts(tokenizer, prompt, response, family, finished)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }
