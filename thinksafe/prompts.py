"""Prompt sets for synthesis: SafeChain from the hub, the bundled demo file, any local JSON/JSONL/CSV
or hub dataset with an instruction column and a harmful/benign label column.

Every row gets a stable id (source position + content hash), so a resumed run matches the rows it
already generated even when --limit grows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import read_jsonl, read_text
from thinksafe.model_loading import require_reachable_dataset
from thinksafe.registry import PROMPT_SOURCES, RegistryError, is_harmful_label

DEMO_PROMPTS = "demo"
DEMO_PROMPTS_FILE = Path(__file__).resolve().parent.parent / "eval" / "prompts" / "demo_train.jsonl"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv"}
DEBUG_PROMPTS = 500  # paper: --debug takes the first 500 SafeChain rows
HUB_SPLIT = "train"


class PromptError(ThinksafeError, ValueError):
    """A prompt source that cannot be read or has the wrong columns/labels."""


@dataclass(frozen=True)
class PromptRow:
    id: str
    instruction: str
    label: str
    harmful: bool


def prompt_id(index: int, instruction: str, label: str) -> str:
    digest = hashlib.sha1(f"{label}\n{instruction}".encode()).hexdigest()[:10]
    return f"{index:07d}-{digest}"


def describe_source(source: str) -> str:
    """What `source` resolves to, for stats.json."""
    if source == DEMO_PROMPTS:
        return str(DEMO_PROMPTS_FILE)
    return PROMPT_SOURCES.get(source, source)


def _load_dataset(source: str):
    """A datasets.Dataset for a registry name, the bundled demo file, a local file or a hub id."""
    from datasets import load_dataset

    target = describe_source(source)
    path = Path(target)
    try:
        if path.exists():
            if path.suffix.lower() not in LOCAL_FORMATS:
                raise PromptError(f"{path}: unsupported prompt file type; use one of {', '.join(LOCAL_FORMATS)}")
            if path.stat().st_size == 0:
                raise PromptError(f"{path}: the prompt file is empty")
            if LOCAL_FORMATS[path.suffix.lower()] == "json":
                check_json_file(path)  # datasets' own parse error names no line
            return _quiet_local_load(LOCAL_FORMATS[path.suffix.lower()], path)
        if source in PROMPT_SOURCES or "/" in source:
            require_reachable_dataset(target, "synthesis prompts")
            return load_dataset(target, split=HUB_SPLIT)
    except ThinksafeError:
        raise
    except Exception as err:  # datasets raises many types (network, parsing); name the source, one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PromptError(f"cannot load prompts from {target!r}: {first}") from None
    raise PromptError(
        f"unknown prompt source {source!r}; choose {', '.join([*PROMPT_SOURCES, DEMO_PROMPTS])}, "
        "a local .json/.jsonl/.csv file or a hub dataset id"
    )


def check_json_file(path: Path) -> None:
    """A .json file holding one JSON document, or a .json/.jsonl file of JSON lines; anything else is
    one line naming the file and the line."""
    import json

    text = read_text(path)
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # perhaps JSON lines under a .json name, as datasets accepts
    read_jsonl(path)


def _quiet_local_load(builder: str, path: Path):
    """A local file loads in a blink; datasets' "Generating train split" bars would only be noise."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split=HUB_SPLIT)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_prompts(source: str, limit: int | None = None, instruction_column: str = "instruction",
                 label_column: str = "label") -> list[PromptRow]:
    """The first `limit` rows of `source` (all when None), validated: both columns present, every
    instruction non-empty text, every label harmful or benign (registry.is_harmful_label)."""
    dataset = _load_dataset(source)
    name = describe_source(source)
    missing = [c for c in (instruction_column, label_column) if c not in dataset.column_names]
    if missing:
        raise PromptError(
            f"{name}: missing column(s) {', '.join(missing)}; it has: {', '.join(dataset.column_names) or 'none'} "
            "(pick others with --instruction-column/--label-column)"
        )
    if len(dataset) == 0:
        raise PromptError(f"{name}: no prompts in the file")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = []
    for index, (instruction, label) in enumerate(zip(dataset[instruction_column], dataset[label_column])):
        if not isinstance(instruction, str) or not instruction.strip():
            raise PromptError(f"{name}: row {index}: empty or non-text {instruction_column!r}")
        try:
            harmful = is_harmful_label(label)
        except RegistryError as err:
            raise PromptError(f"{name}: row {index}: {err}") from None
        rows.append(PromptRow(prompt_id(index, instruction, str(label)), instruction, str(label), harmful))
    return rows
