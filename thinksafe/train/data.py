"""Training data: load rows (published name, hub id, local JSONL, self-generated), tokenise once, collate.

Rows are what `thinksafe synthesize` writes: `instruction`, `response`, `prompt_label`, `response_label`.
Each row becomes `input_ids` + `completion_mask` (thinksafe.chat.encode_for_training: reasoning kept,
prompt a token-exact prefix) + `kl` (1 on benign rows when the KL loss is on). TRL's SFTTrainer turns
`completion_mask` into labels (-100 on the prompt) when `completion_only_loss` is set.

Finished rows whose think block never closes are dropped and counted (`dropped_unclosed` in
run_info.json): with an end-of-turn token after an open block they would teach stopping mid-thought.
Rows with `finished: false` (benign samples cut at the token limit, synthesize
--keep-unfinished-benign) are used only as KL rows and only with --kl-on-unfinished: they carry no
end-of-turn token, and cross-entropy on them would teach the model to stop mid-answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from thinksafe.chat import encode_for_training, normalize_response
from thinksafe.cli import FILESYSTEM_REFUSALS
from thinksafe.errors import ThinksafeError
from thinksafe.guards import check_named_guard
from thinksafe.io import read_json, read_jsonl, sha256_of_files
from thinksafe.model_loading import cache_dir, require_reachable_dataset
from thinksafe.reference_topk import REFERENCE_TOPK_FILE, read_store, row_key
from thinksafe.registry import (
    SYNTH_STATS_FILE,
    SYNTH_TRAIN_FILE,
    SYNTH_UNFINISHED_BENIGN_FILE,
    DatasetSpec,
    ModelSpec,
    is_harmful_label,
    resolve_dataset,
    synthesized_data_dir,
)
from thinksafe.train.common import distributed_state

# Column names accepted for the prompt and its label (the published SafeChain-style sets use `label`).
PROMPT_COLUMNS = ("instruction", "prompt")
RESPONSE_COLUMNS = ("response",)
LABEL_COLUMNS = ("prompt_label", "label")
SAFE_RESPONSE_LABEL = "safe"
KL_COLUMN = "kl"
# --kl_reference cached: the base's stored top-k per completion token of a KL row (empty on other rows)
REFERENCE_COLUMNS = ("ref_ids", "ref_logprobs", "ref_tail")
REFERENCE_START_COLUMN = "ref_start"  # index of a KL row's first completion token in input_ids
REFERENCE_DROPS_FILE = "reference_drops.json"  # in a tokenised cache dir: KL rows the store could not serve
FINISHED_COLUMN = "finished"
TOKENIZED_VERSION = 4  # bump when the tokenised format changes, so old caches are not reused

logger = logging.getLogger(__name__)


class DatasetError(ThinksafeError, ValueError):
    """A training dataset that cannot be used as given."""


@dataclass(frozen=True)
class TrainRow:
    prompt: str
    response: str
    harmful: bool | None  # None when the dataset has no label column (allowed without --use-kl)
    finished: bool = True  # False: cut at the token limit (a KL row only, no end-of-turn token)


def dataset_source(dataset: str, model: ModelSpec) -> tuple[DatasetSpec, str]:
    """(spec, where to read): `thinksafe[-<guard>]` -> data/<model>_<guard>/train.jsonl from synthesize."""
    spec = resolve_dataset(dataset, model.family)
    if spec.kind == "self":
        check_named_guard(spec.source, f"dataset {dataset!r}")
        path = synthesized_data_dir(model, spec.source) / SYNTH_TRAIN_FILE
        if not path.exists():
            raise DatasetError(
                f"{path} does not exist: run `thinksafe synthesize --model {model.source} --guard {spec.source}` first"
            )
        return spec, str(path)
    return spec, spec.source


def read_records(spec: DatasetSpec, source: str) -> list[dict]:
    """Raw records from a local JSONL/JSON file or directory, or a hub dataset's train split."""
    import datasets

    path = Path(source)
    if spec.kind in ("self", "local"):
        files = local_files(source)
        if not files:
            raise DatasetError(f"{path} holds no .jsonl file")
        return [record for file in files for record in read_jsonl(file)]  # errors name file:line
    else:
        require_reachable_dataset(source, "training")
        try:
            loaded = datasets.load_dataset(source, split="train")
        except Exception as err:  # the hub raises many types; the user needs one line
            raise DatasetError(f"cannot load dataset {source!r} from the hub: {str(err).splitlines()[0]}") from None
    return loaded.to_list()


def _pick(columns, candidates: tuple[str, ...]) -> str | None:
    return next((name for name in candidates if name in columns), None)


def unfinished_benign_source(source: str) -> str:
    """The unfinished-benign file beside a self-generated train.jsonl (--kl-on-unfinished)."""
    path = Path(source).with_name(SYNTH_UNFINISHED_BENIGN_FILE)
    if not path.exists():
        raise DatasetError(f"{path} does not exist: --kl-on-unfinished needs `thinksafe synthesize "
                           f"--keep-unfinished-benign` (rerunning it with the flag reuses the generations)")
    return str(path)


def is_finished(record: dict) -> bool:
    value = record.get(FINISHED_COLUMN, True)
    return value if isinstance(value, bool) else str(value).strip().lower() not in ("false", "0", "no")


# TianshengHuang/DirectRefusal (`direct-refusal`): one `refusal` column of "Question: ... Answer: ...";
# the paper's loader splits it and puts a fixed think block before the answer. All rows are refusals.
REFUSAL_COLUMN = "refusal"
_QUESTION_ANSWER = re.compile(r"Question:\s*(.+?)\s*Answer:\s*(.+)", re.IGNORECASE | re.DOTALL)
DIRECT_REFUSAL_THINK = "<think>\nI should not answer this question!\n</think>\n\n"
DIRECT_REFUSAL_LABEL = "harmful"


def from_refusal_column(records: list[dict], name: str) -> list[dict]:
    """DirectRefusal rows -> instruction / response / prompt_label rows, as the paper parses them."""
    parsed = []
    for index, record in enumerate(records):
        match = _QUESTION_ANSWER.search(str(record[REFUSAL_COLUMN] or ""))
        if match is None:
            raise DatasetError(f"dataset {name} row {index}: `{REFUSAL_COLUMN}` is not 'Question: ... Answer: ...'")
        parsed.append({"instruction": match.group(1).strip(),
                       "response": DIRECT_REFUSAL_THINK + match.group(2).strip(),
                       "prompt_label": DIRECT_REFUSAL_LABEL})
    return parsed


def _text_field(record: dict, column: str, name: str, number: int) -> str:
    """A row's prompt or response: present and a string, or one line naming the row."""
    if column not in record or record[column] is None:
        raise DatasetError(f"dataset {name} row {number}: missing {column!r}")
    value = record[column]
    if not isinstance(value, str):
        raise DatasetError(f"dataset {name} row {number}: {column!r} must be a string, got {type(value).__name__}")
    return value


def _row_label(record: dict, column: str, name: str, number: int) -> bool:
    if column not in record or record[column] is None:
        raise DatasetError(f"dataset {name} row {number}: missing {column!r}")
    try:
        return is_harmful_label(record[column])
    except ThinksafeError as err:
        raise DatasetError(f"dataset {name} row {number}: {err}") from None


def to_rows(records: list[dict], name: str, need_labels: bool, unfinished_as_kl: bool = False) -> list[TrainRow]:
    """Validate columns, keep rows whose response is non-empty and judged safe (when labelled).

    Unfinished rows are kept only when `unfinished_as_kl` (KL mode with --kl-on-unfinished) and benign.
    """
    if not records:
        raise DatasetError(f"dataset {name} is empty")
    if REFUSAL_COLUMN in records[0] and not _pick(records[0], PROMPT_COLUMNS):
        records = from_refusal_column(records, name)
    columns = set(records[0])
    prompt_col, response_col = _pick(columns, PROMPT_COLUMNS), _pick(columns, RESPONSE_COLUMNS)
    label_col = _pick(columns, LABEL_COLUMNS)
    missing = ["/".join(columns) for columns, got in ((PROMPT_COLUMNS, prompt_col), (RESPONSE_COLUMNS, response_col))
               if not got]
    if need_labels and not label_col:
        missing.append("/".join(LABEL_COLUMNS) + " (needed by --use-kl)")
    if missing:
        raise DatasetError(f"dataset {name} lacks column(s) {', '.join(missing)}; it has: {', '.join(sorted(columns))}")
    rows = []
    for number, record in enumerate(records, 1):
        # every row is checked, not only the first: one bad row must not surface as a traceback mid-run
        prompt = _text_field(record, prompt_col, name, number)
        response = record.get(response_col)
        response = "" if response is None else _text_field(record, response_col, name, number)
        harmful = _row_label(record, label_col, name, number) if label_col else None
        verdict = record.get("response_label")
        if not response.strip() or (verdict is not None and str(verdict).strip().lower() != SAFE_RESPONSE_LABEL):
            continue
        finished = is_finished(record)
        if not finished and not (unfinished_as_kl and harmful is False):
            continue
        rows.append(TrainRow(prompt=prompt, response=response, harmful=harmful, finished=finished))
    if not rows:
        raise DatasetError(f"dataset {name} has no rows left after filtering (empty or unsafe responses, or "
                           "`finished: false` rows, used only with --use-kl --kl-on-unfinished)")
    return rows


def drop_unclosed(rows: list[TrainRow], family) -> tuple[list[TrainRow], int]:
    """(rows kept, rows dropped): a finished row whose think block never closes is dropped.

    Hub and published sets hold such rows; trained as they are, each would end an open reasoning
    block with the end-of-turn token and teach the model to stop mid-thought (the paper's loader
    skips them too). Cut rows (`finished: false`, KL only) are the exception: no end-of-turn is
    added to them. Synthesized data never holds one (synthesize drops them before the guard).
    """
    kept = [row for row in rows if not row.finished or _closes_its_block(row.response, family)]
    return kept, len(rows) - len(kept)


def _closes_its_block(response: str, family) -> bool:
    normalized = normalize_response(response, family)
    return normalized.closed or not normalized.has_think


def check_kl_rows(rows: list[TrainRow], name: str) -> None:
    """--use-kl needs both kinds: benign rows carry the KL term, harmful rows the cross-entropy.

    Without benign rows the run would be plain SFT named `_kl`; without harmful rows every row is a
    KL row toward the base model, which the LoRA model equals at step 0: the loss is exactly 0 and
    the adapter never moves.
    """
    benign = sum(row.harmful is False for row in rows)
    if benign == 0:
        raise DatasetError(f"--use-kl: dataset {name} has no benign rows (prompt_label containing 'benign'), "
                           "so the KL term never applies; drop --use-kl or add benign rows")
    if benign == len(rows):
        raise DatasetError(f"--use-kl: every row of dataset {name} is benign, so nothing trains on cross-entropy "
                           "(the loss would be 0 and the adapter would never move); add harmful rows or drop --use-kl")


GENERATED_IDS = "trained_on_generated_ids"  # not a drop: KL rows kept on the ids the base generated


def same_text(tokenizer, generated: list[int], completion: list[int]) -> bool:
    """Whether two id sequences spell one completion; the generated one may end in whitespace that
    the synthesis stripped from the response text."""
    return tokenizer.decode(generated).rstrip() == tokenizer.decode(completion).rstrip()


def tokenize_rows(rows: list[TrainRow], tokenizer, family, use_kl: bool, reference: dict | None = None,
                  dropped: dict | None = None) -> dict[str, list]:
    """Columns input_ids, completion_mask, kl (kl=1 marks benign rows trained with KL instead of CE).

    With `reference` ({row_key: TopK}, --kl_reference cached) each KL row also gets its stored top-k
    (REFERENCE_COLUMNS), one entry per completion token. The stored positions are those of the ids
    the base generated. Where re-tokenising the response text gives other ids (a sampled model may
    write a text in a segmentation the tokenizer would not choose, e.g. "1" "." for "1."; the
    synthesis strips trailing whitespace; 23% of the demo's KL rows), the row trains on the generated
    ids, provided they decode to the same completion text, and is counted in `dropped` under
    GENERATED_IDS. A KL row without an entry, or whose stored ids spell another text, is dropped
    and counted by its reason.
    """

    columns = {"input_ids": [], "completion_mask": [], KL_COLUMN: []}
    if reference is not None:
        columns.update({name: [] for name in (*REFERENCE_COLUMNS, REFERENCE_START_COLUMN)})
    for row in rows:
        encoded = encode_for_training(tokenizer, row.prompt, row.response, family, row.finished)
        is_kl = use_kl and row.harmful is False
        if reference is not None:
            entry = reference.get(row_key(row.prompt, row.response)) if is_kl else None
            if is_kl:
                start = encoded["completion_mask"].index(1)
                completion = encoded["input_ids"][start:]
                generated = entry.tokens.tolist() if entry is not None else None
                if generated is not None and generated != completion and same_text(tokenizer, generated, completion):
                    encoded = {"input_ids": encoded["input_ids"][:start] + generated,
                               "completion_mask": [0] * start + [1] * len(generated)}
                    if dropped is not None:
                        dropped[GENERATED_IDS] = dropped.get(GENERATED_IDS, 0) + 1
                    completion = generated
                reason = ("no_reference" if entry is None else
                          "tokens_differ" if generated != completion else None)
                if reason is not None:
                    if dropped is not None:
                        dropped[reason] = dropped.get(reason, 0) + 1
                    continue
            # where the completion starts: TRL replaces completion_mask by labels, which without
            # prompt masking no longer say where the prompt ends
            columns[REFERENCE_START_COLUMN].append(encoded["completion_mask"].index(1) if entry is not None else 0)
            columns["ref_ids"].append(entry.ids.tolist() if entry is not None else [])
            columns["ref_logprobs"].append(entry.logprobs.astype("float32").tolist() if entry is not None else [])
            columns["ref_tail"].append(entry.tail.tolist() if entry is not None else [])
        columns["input_ids"].append(encoded["input_ids"])
        columns["completion_mask"].append(encoded["completion_mask"])
        columns[KL_COLUMN].append(int(is_kl))
    return columns


def load_reference(source: str) -> tuple[dict, str]:
    """({row_key: TopK}, sha256) of the store beside a self-generated train.jsonl (--kl_reference cached)."""

    path = Path(source).with_name(REFERENCE_TOPK_FILE)
    if not path.exists():
        raise DatasetError(f"{path} does not exist: --kl_reference cached needs `thinksafe synthesize "
                           "--store_reference_topk K` (e.g. 256) for this dataset")
    entries, _k = read_store(path)
    return entries, sha256_of_files([path])


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by what changes its output: vocabulary, special tokens and chat template."""
    payload = json.dumps(
        [tokenizer.name_or_path, len(tokenizer),
         sorted(tokenizer.get_vocab().items())[:: max(1, len(tokenizer) // 997)],
         tokenizer.all_special_tokens, tokenizer.chat_template],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_key(rows: list[TrainRow], tokenizer, family_name: str, use_kl: bool,
              reference_sha256: str | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([TOKENIZED_VERSION, tokenizer_fingerprint(tokenizer), family_name, use_kl]
                             + ([reference_sha256] if reference_sha256 else [])).encode())
    for row in rows:
        digest.update(json.dumps([row.prompt, row.response, row.harmful, row.finished]).encode())
    return digest.hexdigest()[:24]


def tokenized_cache_dir() -> Path:
    return cache_dir() / "tokenized"


def fingerprinted_dataset(columns: dict, fingerprint: str):
    """A datasets.Dataset with our own content key as its fingerprint: Dataset.from_dict would hash the
    table with dill, which fails on Python 3.12 (pickling pyarrow's MonthDayNano type; found on the
    H200 image)."""
    import datasets

    return datasets.Dataset(datasets.table.InMemoryTable.from_pydict(columns), fingerprint=fingerprint)


def build_train_dataset(rows: list[TrainRow], tokenizer, family, use_kl: bool, cache_root: Path | None = None,
                        reference: tuple[dict, str] | None = None, dropped: dict | None = None):
    """A datasets.Dataset, tokenised once on the main process and cached by tokenizer + settings + rows.

    Other processes wait (main_process_first) and then load the cached copy from disk. `reference`:
    (entries, the store's sha256) from load_reference; KL rows it cannot serve are dropped, logged and
    counted into `dropped` (kept beside the cached copy, so a run that reuses it reports them too).
    """
    import datasets

    key = cache_key(rows, tokenizer, family.name, use_kl, reference[1] if reference else None)
    target = (cache_root or tokenized_cache_dir()) / key
    with distributed_state().main_process_first():
        if not (target / "dataset_info.json").exists():
            drops: dict = {}
            columns = tokenize_rows(rows, tokenizer, family, use_kl, reference[0] if reference else None, drops)
            if drops.get(GENERATED_IDS):
                logger.info("--kl_reference cached: %d KL rows train on the ids the base generated (the "
                            "response text re-tokenises differently)", drops[GENERATED_IDS])
            if set(drops) - {GENERATED_IDS}:
                logger.warning("--kl_reference cached: dropped KL rows %s",
                               {k: v for k, v in drops.items() if k != GENERATED_IDS})
            dataset = fingerprinted_dataset(columns, key)
            try:
                _save_tokenized(dataset, drops, target)
            except OSError as err:
                if err.errno not in FILESYSTEM_REFUSALS:
                    raise
                raise DatasetError(f"cannot write the tokenisation cache {target.parent} ({err.strerror}): set "
                                   "THINKSAFE_CACHE to a writable directory (the cache moves with it)") from None
        if dropped is not None and (target / REFERENCE_DROPS_FILE).exists():
            dropped.update(json.loads((target / REFERENCE_DROPS_FILE).read_text()))
        return datasets.load_from_disk(str(target))


def _save_tokenized(dataset, drops: dict, target: Path) -> None:
    staging = target.with_name(target.name + ".partial")
    dataset.save_to_disk(str(staging))
    (staging / REFERENCE_DROPS_FILE).write_text(json.dumps(drops))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)


class LoadedDataset(NamedTuple):
    dataset: object  # datasets.Dataset, tokenised
    spec: DatasetSpec
    dropped_unclosed: int  # finished rows dropped because their think block never closes


@dataclass(frozen=True)
class TrainData:
    """Validated training rows and what identifies them: the dataset's content hash (sha256)."""

    rows: list[TrainRow]
    spec: DatasetSpec
    sha256: str
    dropped_unclosed: int = 0  # finished rows dropped because their think block never closes


def records_sha256(records: list[dict]) -> str:
    """A hub dataset has no local file to hash: hash its rows, canonically serialised."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()


def local_files(source: str) -> list[Path]:
    path = Path(source)
    return sorted(path.glob("*.jsonl")) if path.is_dir() else [path]


def check_synthesized_set(files: list[Path]) -> None:
    """A self-generated set is trained only as the set its stats.json describes (synthesize writes
    stats.json last, with the sha256 of each row file): never a train.jsonl from another run."""

    stats_path = files[0].with_name(SYNTH_STATS_FILE)
    recorded = read_json(stats_path).get("files_sha256", {}) if stats_path.exists() else {}
    for path in files:
        if path.name in recorded and recorded[path.name] != sha256_of_files([path]):
            raise DatasetError(f"{path} is not the file its {stats_path.name} describes (an interrupted or "
                               "mixed synthesis): rerun the same `thinksafe synthesize` command")


def read_train_rows(dataset: str, model: ModelSpec, use_kl: bool, kl_on_unfinished: bool = False) -> TrainData:
    """Everything about --dataset that can be checked without a tokenizer or a model: the rows,
    their columns and labels, the KL mix, and the content hash that identifies the run's data.

    With `use_kl` and `kl_on_unfinished`, a self-generated dataset also reads unfinished_benign.jsonl;
    other datasets contribute their own `finished: false` benign rows.
    """

    spec, source = dataset_source(dataset, model)
    unfinished_as_kl = use_kl and kl_on_unfinished
    records = read_records(spec, source)
    files = local_files(source) if spec.kind in ("self", "local") else []
    if unfinished_as_kl and spec.kind == "self":
        side_file = unfinished_benign_source(source)
        records += read_records(spec, side_file)
        files.append(Path(side_file))
    if spec.kind == "self":
        check_synthesized_set(files)
    rows, dropped = drop_unclosed(to_rows(records, dataset, need_labels=use_kl, unfinished_as_kl=unfinished_as_kl),
                                  model.family)
    if dropped:
        logger.warning("%s: dropped %d row(s) whose think block never closes", dataset, dropped)
    if not rows:
        raise DatasetError(f"dataset {dataset} has no rows left: all {dropped} open a think block they never close")
    if use_kl:
        check_kl_rows(rows, dataset)
    sha256 = sha256_of_files(files) if files else records_sha256(records)
    return TrainData(rows, spec, sha256, dropped)


def load_train_dataset(dataset: str, model: ModelSpec, tokenizer, use_kl: bool, cache_root: Path | None = None,
                       kl_on_unfinished: bool = False) -> LoadedDataset:
    """Everything from the --dataset argument to a tokenised Dataset."""
    data = read_train_rows(dataset, model, use_kl, kl_on_unfinished)
    return LoadedDataset(build_train_dataset(data.rows, tokenizer, model.family, use_kl, cache_root), data.spec,
                         data.dropped_unclosed)


def make_collator(pad_token_id: int):
    """TRL's language-modelling collator plus the per-row `kl` flag (TRL's drops unknown keys)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    @dataclass
    class KLFlagCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch[KL_COLUMN] = torch.tensor([int(example.get(KL_COLUMN, 0)) for example in examples], dtype=torch.bool)
            if REFERENCE_COLUMNS[0] in examples[0]:
                batch.update(reference_batch(examples, batch["input_ids"].shape[1]))
            return batch

    return KLFlagCollator(pad_token_id=pad_token_id)


def reference_batch(examples: list[dict], width: int) -> dict:
    """REFERENCE_COLUMNS as [B, width, k] / [B, width] tensors aligned with input_ids: the j-th stored
    position sits on the j-th completion token (the one it predicts), so `[:, 1:]` lines them up with
    the labels as the KL positions are taken. Completions cut by max_length keep their first entries.
    Rows without entries (CE rows) hold zeros there, never read.
    """
    import torch

    k = max((len(e["ref_ids"][0]) for e in examples if e["ref_ids"]), default=1)
    ids = torch.zeros(len(examples), width, k, dtype=torch.long)
    logprobs = torch.zeros(len(examples), width, k)
    tail = torch.zeros(len(examples), width)
    for row, example in enumerate(examples):
        if not example["ref_ids"]:
            continue
        start = example[REFERENCE_START_COLUMN]
        length = max(0, min(len(example["ref_ids"]), width - start))
        ids[row, start:start + length] = torch.tensor(example["ref_ids"][:length])
        logprobs[row, start:start + length] = torch.tensor(example["ref_logprobs"][:length])
        tail[row, start:start + length] = torch.tensor(example["ref_tail"][:length])
    return {"ref_ids": ids, "ref_logprobs": logprobs, "ref_tail": tail}
