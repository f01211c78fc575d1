"""GRPO's prompts: one user message each (TRL renders the chat template), too-long prompts dropped
and counted, the completion budget capped to the policy server's context."""

from __future__ import annotations

import hashlib
import json
import logging

from thinksafe.chat import generation_prompt_ids
from thinksafe.train.common import TrainConfigError
from thinksafe.train.data import PROMPT_COLUMNS, DatasetError, dataset_source, fingerprinted_dataset, read_records

logger = logging.getLogger(__name__)



def trainer_prompt(instruction: str) -> list[dict]:
    """A conversational prompt: TRL renders it with the chat template and tokenises the text without
    adding special tokens, so the policy sees exactly the template's ids (one BOS), as in synthesis."""
    return [{"role": "user", "content": instruction}]


def template_kwargs(family) -> dict:
    """What TRL passes to the chat template (GRPOConfig.chat_template_kwargs): thinking on, as in synthesis."""
    return {"enable_thinking": family.reasoning}


def load_prompts(dataset: str, spec) -> tuple[list[str], object]:
    """The `instruction` column (or `prompt`) of the dataset, as registry.resolve_dataset names it."""

    dataset_spec, source = dataset_source(dataset, spec)
    records = read_records(dataset_spec, source)
    if not records:
        raise DatasetError(f"dataset {dataset} is empty")
    column = next((c for c in PROMPT_COLUMNS if c in records[0]), None)
    if column is None:
        raise DatasetError(f"dataset {dataset} has no {'/'.join(PROMPT_COLUMNS)} column; "
                           f"it has: {', '.join(sorted(records[0]))}")
    return [str(r[column]) for r in records if str(r[column] or "").strip()], dataset_spec


def prompt_dataset(instructions: list[str], tokenizer, family, max_prompt_length: int):
    """datasets.Dataset with `prompt` (one user message) and `instruction`; prompts over the limit dropped."""

    rows = {"prompt": [], "instruction": []}
    dropped = 0
    for instruction in instructions:
        if len(generation_prompt_ids(tokenizer, instruction, family)) > max_prompt_length:
            dropped += 1
            continue
        rows["prompt"].append(trainer_prompt(instruction))
        rows["instruction"].append(instruction)
    if not rows["prompt"]:
        raise TrainConfigError(f"every prompt is longer than --max-prompt-length {max_prompt_length} tokens")
    if dropped:
        logger.warning("dropped %d of %d prompts longer than %d tokens", dropped, len(instructions), max_prompt_length)
    key = hashlib.sha256(json.dumps(rows["instruction"]).encode()).hexdigest()[:16]
    return fingerprinted_dataset(rows, f"thinksafe-grpo-{key}"), dropped


def capped_completion_length(requested: int, max_prompt_length: int, server_max_model_len: int | None) -> int:
    """Prompt + completion must fit the policy server's context (the paper's setup could overflow it)."""
    if server_max_model_len is None:
        return requested
    room = server_max_model_len - max_prompt_length
    if room <= 0:
        raise TrainConfigError(f"the policy server's max_model_len {server_max_model_len} leaves no room after "
                               f"--max-prompt-length {max_prompt_length}")
    if room < requested:
        logger.warning("max completion length capped at %d (server max_model_len %d - max prompt %d)",
                       room, server_max_model_len, max_prompt_length)
    return min(requested, room)
