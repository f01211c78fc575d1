"""Benchmark registry: one YAML per benchmark in eval/tasks/ (a new benchmark is a new file).

A task file names its hub source (id, config, split, gated), the bundled subset in eval/ (if its
license allows one), the row keys, the prompt template, the metric, the sampling budget, the
judge, and where it stands among the others: `group` (reasoning | safety: `--tasks reasoning`,
`--tasks safety`, what the pipeline evaluates), `order` (report column and run order) and `paper`
(one of the paper's headline tasks: `--tasks paper`, and the set the report's means are checked
against). This module turns a task name plus a data choice into `EvalItem`s; nothing here runs a model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import read_jsonl
from thinksafe.model_loading import require_reachable_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO_ROOT / "eval" / "tasks"

KINDS = ("reasoning", "harmful", "overrefusal", "refusal")
ANSWER_FORMATS = ("math", "number", "choice")  # thinksafe.evaluate.reasoning.CHECKERS
JUDGE_INPUTS = ("whole", "final")  # whole output (reasoning included) or the final answer only
DATA_SOURCES = ("auto", "hub", "bundled")
PROMPT_PLACEHOLDER = "{prompt}"
CHOICE_LETTERS = "ABCD"

GROUPS = ("reasoning", "safety")  # a task file's `group:`
# Groups accepted by --tasks next to single task names, each built from the task files (task_groups):
# the two above, `paper` (files with `paper: true`) and `bundled` (files with a bundled subset: offline).
GROUP_NAMES = (*GROUPS, "paper", "bundled")


class TaskError(ThinksafeError, ValueError):
    """An unknown task, a malformed task file or data that cannot be loaded; names the fix."""


@dataclass(frozen=True)
class HubSource:
    id: str
    split: str
    config: str | None = None
    gated: bool = False

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.id}"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    metric: str
    template: str
    n: int
    max_new_tokens: int
    keys: dict
    hub: HubSource | None = None
    bundled: str | None = None  # path relative to the repository root
    answer_format: str | None = None
    answer_transform: str | None = None
    prompt_builder: str | None = None
    filter: dict = field(default_factory=dict)
    judge: str | None = None
    judge_input: str = "whole"
    skythought: str | None = None  # the SkyThought task name, for the hand-off
    group: str | None = None  # GROUPS; None: only asked for by name (or through `bundled`)
    order: int | None = None  # report column and run order; a file without one comes last
    paper: bool = False  # in the paper's headline table
    # The name of each data set in metrics.json and the report, by source (hub, bundled, file), laid
    # over DEFAULT_SET_NAMES; a task that declares names also writes `<task>_set` (harmbench_set).
    set_names: dict = field(default_factory=dict)
    # The set the paper evaluated on when it is not the hub's: {name, rows, distinct_key, distinct,
    # origin}; a --data-file with that many rows and distinct values of distinct_key is named `name`.
    paper_set: dict | None = None
    path: Path | None = None

    @property
    def is_reasoning(self) -> bool:
        return self.kind == "reasoning"

    @property
    def higher_is_better(self) -> bool:
        """pass@1 and refusal on harmful prompts go up; harmful and over-refusal rates go down."""
        return self.kind in ("reasoning", "refusal")

    @property
    def bundled_path(self) -> Path | None:
        return REPO_ROOT / self.bundled if self.bundled else None


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str  # the user message sent to the model (template applied)
    question: str  # the benchmark's own prompt text (what a guard sees as the user turn)
    answer: str | None = None  # gold answer (reasoning tasks)
    label: str | None = None  # XSTest: safe | unsafe


# --- the registry ---------------------------------------------------------------------------


def task_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def list_tasks() -> list[str]:
    return list(task_files())


def get_task(name: str) -> TaskSpec:
    files = task_files()
    if name not in files:
        raise TaskError(
            f"unknown task {name!r}; choose from: {', '.join(files)} "
            f"(or a group: {', '.join(GROUP_NAMES)}), or add {TASKS_DIR / name}.yaml"
        )
    return _parse_task(files[name])


def all_tasks() -> list[TaskSpec]:
    """Every task file, in report order."""
    return sorted((_parse_task(path) for path in task_files().values()), key=_order_key)


def _order_key(task: TaskSpec) -> tuple:
    return (task.order is None, task.order or 0, task.name)


def report_order(names) -> list[str]:
    """Task names in the task files' `order`; a name without a task file (a result of a task file
    since removed) comes last, by name."""
    known = {task.name: position for position, task in enumerate(all_tasks())}
    return sorted(set(names), key=lambda name: (known.get(name, len(known)), name))


def task_groups() -> dict[str, tuple[str, ...]]:
    """{group: task names in report order} for every name in GROUP_NAMES, read from the task files."""
    tasks = all_tasks()
    groups = {group: tuple(t.name for t in tasks if t.group == group) for group in GROUPS}
    groups["paper"] = tuple(t.name for t in tasks if t.paper)
    groups["bundled"] = tuple(t.name for t in tasks if t.bundled)
    return groups


def expand_tasks(spec: str) -> list[str]:
    """`gsm8k,xstest` or a group name (`bundled`, `paper`, ...) -> task names, in order, no repeats."""
    groups = task_groups()
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        for name in groups.get(part, (part,)):
            get_task(name)  # raises, listing the valid names
            if name not in names:
                names.append(name)
    if not names:
        raise TaskError(f"no task given; choose from: {', '.join(list_tasks())}")
    return names


def _parse_task(path: Path) -> TaskSpec:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    where = f"{path}"
    try:
        hub = data.pop("hub", None)
        spec = TaskSpec(hub=HubSource(**hub) if hub else None, path=path, **data)
    except TypeError as err:
        raise TaskError(f"{where}: {err}") from None
    if spec.name != path.stem:
        raise TaskError(f"{where}: name {spec.name!r} must equal the file name {path.stem!r}")
    if spec.name in GROUP_NAMES:
        raise TaskError(f"{where}: {spec.name!r} is a group name; name the task otherwise")
    if spec.group is not None and spec.group not in GROUPS:
        raise TaskError(f"{where}: group must be one of {', '.join(GROUPS)} (or left out)")
    if spec.group is not None and (spec.group == "reasoning") != spec.is_reasoning:
        raise TaskError(f"{where}: group {spec.group} does not fit kind {spec.kind}")
    if spec.order is not None and (not isinstance(spec.order, int) or isinstance(spec.order, bool)):
        raise TaskError(f"{where}: order must be an integer, got {spec.order!r}")
    if not isinstance(spec.paper, bool):
        raise TaskError(f"{where}: paper must be true or false, got {spec.paper!r}")
    for attr, allowed in (("kind", KINDS), ("judge_input", JUDGE_INPUTS)):
        if getattr(spec, attr) not in allowed:
            raise TaskError(f"{where}: {attr} must be one of {', '.join(allowed)}")
    if spec.is_reasoning and spec.answer_format not in ANSWER_FORMATS:
        raise TaskError(f"{where}: a reasoning task needs answer_format: {' or '.join(ANSWER_FORMATS)}")
    if not spec.is_reasoning and not spec.judge:
        raise TaskError(f"{where}: a safety task needs a judge (a guard name)")
    if PROMPT_PLACEHOLDER not in spec.template:
        raise TaskError(f"{where}: template must contain {PROMPT_PLACEHOLDER}")
    if not spec.hub and not spec.bundled:
        raise TaskError(f"{where}: give a hub source, a bundled file, or both")
    if spec.answer_transform and spec.answer_transform not in ANSWER_TRANSFORMS:
        raise TaskError(f"{where}: answer_transform must be one of {', '.join(ANSWER_TRANSFORMS)}")
    if spec.prompt_builder and spec.prompt_builder not in PROMPT_BUILDERS:
        raise TaskError(f"{where}: prompt_builder must be one of {', '.join(PROMPT_BUILDERS)}")
    if set(spec.set_names) - set(DEFAULT_SET_NAMES):
        raise TaskError(f"{where}: set_names keys must be among {', '.join(DEFAULT_SET_NAMES)}")
    if spec.paper_set is not None and set(spec.paper_set) != PAPER_SET_KEYS:
        raise TaskError(f"{where}: paper_set needs exactly {', '.join(sorted(PAPER_SET_KEYS))}")
    return spec


PAPER_SET_KEYS = {"name", "rows", "distinct_key", "distinct", "origin"}


# --- loading rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataChoice:
    """Where a task's rows came from, recorded in metrics.json."""

    source: str  # hub | bundled | file
    location: str
    total: int  # rows before --limit
    set: str = ""  # the set's name (data_set_name): standard, paper, bundled-subset, ...


# What a set is called when its task file names none. "hub" is the paper's set for every task
# whose paper_set is not declared: the paper read the same hub datasets (ORIGINAL.md).
DEFAULT_SET_NAMES = {"hub": "hub", "bundled": "bundled-subset", "file": "file", "skythought": "hub"}


def data_set_name(task: TaskSpec, source: str, rows: list[dict] | None = None) -> str:
    """The name of the set a task's rows came from. A local file is the paper's own set only when its
    rows have the paper set's shape (a copy of dataset/eval/harmbench.json: 602 rows, 301 behaviours)."""
    if source == "file" and task.paper_set and rows is not None and _has_shape(task.paper_set, rows):
        return task.paper_set["name"]
    return {**DEFAULT_SET_NAMES, **task.set_names}.get(source, source)


def paper_set_name(task: TaskSpec) -> str:
    """The set the paper's table was computed on."""
    return task.paper_set["name"] if task.paper_set else data_set_name(task, "hub")


def _has_shape(shape: dict, rows: list[dict]) -> bool:
    if len(rows) != shape["rows"]:
        return False
    return len({str(row.get(shape["distinct_key"])) for row in rows}) == shape["distinct"]


def paper_departures(task: TaskSpec, data: dict, judge: str | None, max_new_tokens: int | None) -> list[str]:
    """Why a task's number is not comparable with the paper's table (empty: it is): another data set,
    part of it (--limit), another judge, a shorter token budget. Read from what metrics.json records."""
    departures = []
    used = data.get("set") or data_set_name(task, data.get("source", ""))
    if used != paper_set_name(task):
        departures.append(f"{task.name} on the {used} set (the paper's: {paper_set_name(task)})")
    if data.get("rows_used") is not None and data.get("rows_total") and data["rows_used"] < data["rows_total"]:
        departures.append(f"{task.name} on {data['rows_used']} of {data['rows_total']} rows")
    if task.judge and judge and judge != task.judge:
        departures.append(f"{task.name} judged by {judge} (the paper's: {task.judge})")
    if max_new_tokens is not None and max_new_tokens < task.max_new_tokens:
        departures.append(f"{task.name} cut at {max_new_tokens} new tokens (the paper's: {task.max_new_tokens})")
    return departures


def resolve_source(task: TaskSpec, data: str, data_file: str | None) -> tuple[str, str]:
    """(source, location) for `--data hub|bundled` and an optional `--data-file`."""
    if data_file:
        return "file", data_file
    if data == "bundled" or task.hub is None:
        if task.bundled is None:
            raise TaskError(
                f"{task.name} has no bundled subset (license or gated access); use --data hub "
                f"or pass --data-file {task.name}=FILE"
            )
        return "bundled", task.bundled
    return "hub", task.hub.id


def load_rows(task: TaskSpec, source: str, location: str) -> list[dict]:
    if source == "hub":
        return _load_hub(task)
    path = Path(location)
    if source == "bundled":
        path = REPO_ROOT / location
        if not path.exists():
            raise TaskError(f"{task.name}: bundled file {path} is missing; use --data hub or --data-file")
    return _read_local(path)


def _read_local(path: Path) -> list[dict]:
    if not path.exists():
        raise TaskError(f"{path}: data file not found")
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise TaskError(f"{path}: a .json data file must hold a list of objects")
        return rows
    return read_jsonl(path)


def _load_hub(task: TaskSpec) -> list[dict]:
    import datasets

    hub = task.hub
    require_reachable_dataset(hub.id, f"task {task.name} (or pass --data-file {task.name}=FILE)")
    try:
        ds = datasets.load_dataset(hub.id, hub.config, split=hub.split)
    except Exception as err:  # any hub failure becomes one line that names the fix
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if hub.gated:
            raise TaskError(
                f"{task.name}: cannot load the gated dataset {hub.id} ({reason}); request access at "
                f"{hub.url}, then `huggingface-cli login` (or set HF_TOKEN), or pass --data-file {task.name}=FILE"
            ) from None
        raise TaskError(
            f"{task.name}: cannot load {hub.id} from the hub ({reason}); check the network, "
            f"or pass --data-file {task.name}=FILE" + (" or --data bundled" if task.bundled else "")
        ) from None
    return [dict(row) for row in ds]


def select_evenly(rows: list, limit: int | None) -> list:
    """`limit` rows spread evenly over the file (first-N would take only XSTest's safe prompts)."""
    if not limit or limit >= len(rows):
        return list(rows)
    return [rows[(i * len(rows)) // limit] for i in range(limit)]


def load_items(task: TaskSpec, data: str = "hub", data_file: str | None = None,
               limit: int | None = None, seed: int = 0) -> tuple[list[EvalItem], DataChoice]:
    source, location = resolve_source(task, data, data_file)
    rows = [r for r in load_rows(task, source, location) if _keep(task, r)]
    if not rows:
        raise TaskError(f"{task.name}: no rows in {location} (after filter {task.filter or 'none'})")
    items = [_make_item(task, row, index, location, seed) for index, row in enumerate(rows)]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise TaskError(f"{task.name}: duplicate ids in {location}")
    return select_evenly(items, limit), DataChoice(source, location, len(items), data_set_name(task, source, rows))


def _keep(task: TaskSpec, row: dict) -> bool:
    return all(row.get(k) == v for k, v in task.filter.items())


def _first_present(row: dict, keys, what: str, task: TaskSpec, location: str):
    keys = [keys] if isinstance(keys, str) else list(keys)
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    raise TaskError(f"{task.name}: a row of {location} has no {what} (looked for: {', '.join(keys)})")


def _make_item(task: TaskSpec, row: dict, index: int, location: str, seed: int) -> EvalItem:
    keys = task.keys
    raw_id = row.get(keys.get("id", "id")) or row.get("id")
    item_id = str(raw_id) if raw_id not in (None, "") else f"{task.name}-{index:05d}"
    answer = None
    if task.prompt_builder:
        question, answer = PROMPT_BUILDERS[task.prompt_builder](task, row, item_id, location, seed)
    else:
        question = str(_first_present(row, keys["prompt"], "prompt", task, location))
    if task.is_reasoning and answer is None:
        answer = str(_first_present(row, keys.get("answer", "answer"), "answer", task, location))
        if task.answer_transform:
            answer = ANSWER_TRANSFORMS[task.answer_transform](answer)
    label = None
    if task.kind == "overrefusal":
        label = str(_first_present(row, keys.get("label", "label"), "label", task, location)).strip().lower()
        if label not in ("safe", "unsafe"):
            raise TaskError(f"{task.name}: label must be safe or unsafe, got {label!r} in {location}")
    prompt = task.template.replace(PROMPT_PLACEHOLDER, question)
    return EvalItem(id=item_id, prompt=prompt, question=question, answer=answer, label=label)


# --- per-benchmark row handling (named in the task files) ----------------------------------


def _after_hashes(answer: str) -> str:
    """GSM8K: the solution text ends in `#### 42`; a bare number is returned unchanged."""
    return answer.split("####")[-1].strip().replace(",", "")


def _multiple_choice(task: TaskSpec, row: dict, item_id: str, location: str, seed: int) -> tuple[str, str]:
    """GPQA: question + the four options in a fixed per-question order; returns (text, gold letter).
    SkyThought shuffles without a seed, so its letters change from run to run; here they do not.

    A row that already has `prompt` and a letter `answer` (a prepared local file) is used as is.
    """
    keys = task.keys
    if "prompt" in row and str(row.get("answer", "")).strip().upper() in CHOICE_LETTERS:
        return str(row["prompt"]), str(row["answer"]).strip().upper()
    question = str(_first_present(row, keys["prompt"], "question", task, location))
    correct = str(_first_present(row, keys["correct"], "correct answer", task, location)).strip()
    options = [correct] + [str(_first_present(row, k, k, task, location)).strip() for k in keys["incorrect"]]
    random.Random(f"{seed}:{item_id}").shuffle(options)  # str seeds are stable across runs
    letters = CHOICE_LETTERS[: len(options)]
    # SkyThought's layout: the question, a newline, then "A) x, B) y, C) z, D) w" on one line
    listing = ", ".join(f"{letter}) {option}" for letter, option in zip(letters, options))
    return f"{question}\n{listing}", letters[options.index(correct)]


ANSWER_TRANSFORMS = {"after_hashes": _after_hashes}
PROMPT_BUILDERS = {"multiple_choice": _multiple_choice}
