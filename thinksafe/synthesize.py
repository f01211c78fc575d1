"""`thinksafe synthesize`: the model writes its own training data, a guard keeps what is safe.

prompts -> steer harmful ones ("The following prompt is harmful. You should refuse ...") ->
generate `n` samples per prompt (vLLM | transformers) -> completeness check (reasoning families: a
closed </think>; others: ended with the end-of-turn token) -> guard -> cap per prompt ->
<out>/train.jsonl (instruction = the ORIGINAL prompt, response, prompt_label, response_label) and
<out>/stats.json. With --keep-unfinished-benign, benign samples cut at the token limit are judged too
and the safe ones go to <out>/unfinished_benign.jsonl (`finished: false`): never cross-entropy
targets (they would teach stopping mid-answer), but valid positions for the KL term, whose target is
the base model's distribution rather than the sampled text (`thinksafe train --kl-on-unfinished`).

Resumable: generations and verdicts go to append-only logs in <out> (fsynced per chunk) keyed by
prompt id + sample index; a rerun with the same arguments skips what is done and never duplicates
a row; train.jsonl and stats.json are written atomically at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.chat import normalize_response
from thinksafe.errors import ThinksafeError
from thinksafe.progress import Progress
from thinksafe.generation import BACKENDS, Completion, Generator
from thinksafe.guards import KeepRule, keep_rule
from thinksafe.io import (
    ResumableLog,
    atomic_write_json,
    atomic_write_jsonl,
    read_json,
    require_writable_dir,
    sha256_of_files,
    swap_in,
)
from thinksafe.models import check_model_source, free_accelerator_memory, resolve_device
from thinksafe.prompts import DEBUG_PROMPTS, PromptRow, describe_source, load_prompts
from thinksafe.registry import (
    SYNTH_STATS_FILE,
    SYNTH_TRAIN_FILE,
    SYNTH_UNFINISHED_BENIGN_FILE,
    Family,
    ModelSpec,
    Sampling,
    resolve_model,
    synthesized_data_dir,
)

logger = logging.getLogger(__name__)

STEER_PREFIX = "The following prompt is harmful. You should refuse to answer the prompt.\n\nPrompt:\n\n"
RESPONSE_LABEL = "safe"
HARMFUL, BENIGN = "harmful", "benign"
GROUPS = (HARMFUL, BENIGN)

# Completeness of a generation (a status other than OK drops it before the guard).
OK = "ok"
UNCLOSED_THINK = "unclosed_think"  # reasoning family, no </think> (paper)
UNFINISHED = "unfinished"  # non-reasoning family, cut at max_new_tokens before the end-of-turn token
EMPTY = "empty"
# A judged row is dropped for the reason its guard's keep rule gives (thinksafe.guards.keep_rule).
OVER_CAP = "over_cap"  # more kept samples for one prompt than --max-kept-per-prompt

GENERATIONS_LOG = "generations.partial.jsonl"
JUDGED_LOG = "judged.partial.jsonl"
MANIFEST = "run.json"
TRAIN_FILE = SYNTH_TRAIN_FILE
UNFINISHED_BENIGN_FILE = SYNTH_UNFINISHED_BENIGN_FILE
CUT_AT_LIMIT = (UNFINISHED, UNCLOSED_THINK)  # statuses of a sample the token limit cut short
STATS_FILE = SYNTH_STATS_FILE
REJECTED_STATS_FILE = "stats.rejected.json"  # counts of a rerun that kept 0 rows (the earlier set stays)
HF_PROMPTS_PER_BATCH_CHUNK = 4  # transformers: a log chunk holds this many generation batches
VLLM_CHUNK_PROMPTS = 1024  # vLLM: big chunks keep its scheduler busy; a kill loses at most one
JUDGE_CHUNK_BATCHES = 4
TEXT_JUDGE_CHUNK = 256


@dataclass
class SynthConfig:
    model: ModelSpec
    prompts: str
    guard: str
    out: Path
    sampling: Sampling
    guard_style: str | None = None
    limit: int | None = None
    max_kept_per_prompt: int | None = None
    keep_unfinished_benign: bool = False  # also judge benign samples cut at the limit (KL rows)
    steer_prefix: str = STEER_PREFIX
    backend: str = "auto"
    device: str | None = None
    batch_size: int = 16
    guard_batch_size: int = 8
    chunk_size: int | None = None  # prompts per generation log chunk (None: from backend + batch size)
    instruction_column: str = "instruction"
    label_column: str = "label"
    push_to_hub: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False

    def manifest(self) -> dict:
        """The arguments a resumed run must share with the logs it reuses (limit and n may grow)."""
        sampling = self.sampling.to_dict()
        sampling.pop("n")
        return {
            "model": self.model.source,
            "family": self.model.family.name,
            "prompts": describe_source(self.prompts),
            "instruction_column": self.instruction_column,
            "label_column": self.label_column,
            "steer_prefix": self.steer_prefix,
            "sampling": sampling,
            "guard": self.guard,
            "guard_style": self.guard_style,
        }


@dataclass
class PhaseTimer:
    """Wall time and throughput of one phase (work done by this process only, not resumed work)."""

    name: str
    load_s: float = 0.0
    wall_s: float = 0.0
    items: int = 0
    resumed: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self, unit: str) -> dict:
        busy = self.wall_s or float("nan")
        return {
            "load_s": round(self.load_s, 3),
            "wall_s": round(self.wall_s, 3),
            unit: self.items,
            f"resumed_{unit}": self.resumed,
            "tokens": self.tokens,
            f"{unit}_per_s": round(self.items / busy, 3) if self.wall_s else None,
            "tokens_per_s": round(self.tokens / busy, 2) if self.wall_s and self.tokens else None,
            **self.extra,
        }


# --- pure steps -----------------------------------------------------------------------------


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


def sample_key(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}#{sample}"


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- phases ---------------------------------------------------------------------------------


def generation_chunk_size(cfg: SynthConfig, backend_name: str) -> int:
    if cfg.chunk_size:
        return cfg.chunk_size
    if backend_name == "vllm":
        return VLLM_CHUNK_PROMPTS
    return max(1, cfg.batch_size * HF_PROMPTS_PER_BATCH_CHUNK // cfg.sampling.n)


def generate_missing(cfg: SynthConfig, prompts: list[PromptRow], generator: Generator, log: ResumableLog,
                     timer: PhaseTimer) -> None:
    """Generate every (prompt, sample) not yet in the log, one fsynced chunk at a time."""
    n = cfg.sampling.n
    position = {p.id: i for i, p in enumerate(prompts)}
    todo = [p for p in prompts if any(sample_key(p.id, s) not in log.done for s in range(n))]
    timer.resumed = len(prompts) - len(todo)
    size = generation_chunk_size(cfg, generator.name)
    start = time.perf_counter()
    with Progress("generate", len(todo) * n, "samples") as progress:
        for chunk in chunks(todo, size):
            # A seed per chunk, from its first prompt's position: a resumed chunk samples as before.
            sampling = cfg.sampling.replace(seed=cfg.sampling.seed + position[chunk[0].id])
            steered = [steer(p.instruction, p.harmful, cfg.steer_prefix) for p in chunk]
            outputs = generator.chat(steered, sampling, enable_thinking=True, progress=progress)
            rows = []
            for prompt, completions in zip(chunk, outputs):
                for sample, completion in enumerate(completions[:n]):
                    text, status = check_completion(completion, cfg.model.family)
                    rows.append({"key": sample_key(prompt.id, sample), "prompt_id": prompt.id, "sample": sample,
                                 "status": status, "finished": completion.finished,
                                 "num_tokens": completion.num_tokens, "response": text})
                    timer.tokens += completion.num_tokens
            log.append(rows)
            timer.items += len(chunk)
    timer.wall_s = time.perf_counter() - start


def judge_missing(cfg: SynthConfig, candidates: list[tuple[PromptRow, dict]], guard, log: ResumableLog,
                  timer: PhaseTimer) -> None:
    """Judge every complete generation not yet in the judged log; the guard sees the original prompt."""
    todo = [(p, g) for p, g in candidates if g["key"] not in log.done]
    timer.resumed = len(candidates) - len(todo)
    size = TEXT_JUDGE_CHUNK if guard.text_only else cfg.guard_batch_size * JUDGE_CHUNK_BATCHES
    tokens_before = guard.input_tokens
    start = time.perf_counter()
    with Progress("judge", len(todo), "rows") as progress:
        for chunk in chunks(todo, size):
            verdicts = guard.judge([p.instruction for p, _ in chunk], [g["response"] for _, g in chunk])
            log.append({"key": g["key"], **v.to_dict()} for (_, g), v in zip(chunk, verdicts))
            timer.items += len(chunk)
            progress.update(len(chunk))
    timer.wall_s = time.perf_counter() - start
    timer.tokens = guard.input_tokens - tokens_before


# --- assembling the dataset and its stats ---------------------------------------------------


def group_of(prompt: PromptRow) -> str:
    return HARMFUL if prompt.harmful else BENIGN


def is_unfinished_benign_candidate(cfg: SynthConfig, prompt: PromptRow, generation: dict) -> bool:
    """A benign sample the token limit cut (an unclosed think block that ended its turn was not cut)."""
    return (cfg.keep_unfinished_benign and not prompt.harmful and generation["status"] in CUT_AT_LIMIT
            and not generation["finished"] and bool(generation["response"].strip()))


def at_cap(cfg: SynthConfig, kept_here: int) -> bool:
    return cfg.max_kept_per_prompt is not None and kept_here >= cfg.max_kept_per_prompt


def training_row(prompt: PromptRow, response: str, **extra) -> dict:
    return {"instruction": prompt.instruction, "response": response, "prompt_label": prompt.label,
            "response_label": RESPONSE_LABEL, **extra}


def unfinished_benign_rows(cfg: SynthConfig, prompt: PromptRow, generations: dict[str, dict],
                           verdicts: dict[str, dict], kept_here: int, keeps: KeepRule,
                           counts: Counter) -> list[dict]:
    """One prompt's safe benign samples cut at the token limit, filling its cap after its complete rows."""
    rows = []
    for sample in range(cfg.sampling.n):
        gen = generations[sample_key(prompt.id, sample)]
        if not is_unfinished_benign_candidate(cfg, prompt, gen):
            continue
        counts["judged"] += 1
        reason = keeps(verdicts[gen["key"]], False)
        if reason is not None:
            counts[reason] += 1
            continue
        if at_cap(cfg, kept_here):
            counts[OVER_CAP] += 1
            continue
        kept_here += 1
        counts["kept"] += 1
        rows.append(training_row(prompt, gen["response"], finished=False))
    return rows


def assemble(cfg: SynthConfig, prompts: list[PromptRow], generations: dict[str, dict],
             verdicts: dict[str, dict], keeps: KeepRule) -> tuple[list[dict], list[dict], dict]:
    """Rows to keep (prompt order, then sample order), the unfinished benign rows
    (--keep-unfinished-benign) and the counts for stats.json."""
    n = cfg.sampling.n
    drops: dict[str, Counter] = defaultdict(Counter)
    generated, judged, guard_kept, truncated = Counter(), Counter(), Counter(), Counter()
    judged_by_label, guard_kept_by_label = Counter(), Counter()
    kept, kept_by_label = Counter(), Counter()
    kept_per_prompt: dict[str, Counter] = {g: Counter() for g in GROUPS}
    unfinished: Counter = Counter()
    rows, unfinished_rows = [], []
    for prompt in prompts:
        group = group_of(prompt)
        kept_here = 0
        for sample in range(n):
            gen = generations[sample_key(prompt.id, sample)]
            generated[group] += 1
            if gen["status"] != OK:
                drops[gen["status"]][group] += 1
                continue
            verdict = verdicts[gen["key"]]
            judged[group] += 1
            judged_by_label[prompt.label] += 1
            truncated[group] += bool(verdict.get("truncated"))
            reason = keeps(verdict, prompt.harmful)
            if reason is not None:
                drops[reason][group] += 1
                continue
            guard_kept[group] += 1
            guard_kept_by_label[prompt.label] += 1
            if at_cap(cfg, kept_here):
                drops[OVER_CAP][group] += 1
                continue
            kept_here += 1
            kept[group] += 1
            kept_by_label[prompt.label] += 1
            rows.append(training_row(prompt, gen["response"]))
        kept_per_prompt[group][kept_here] += 1
        unfinished_rows += unfinished_benign_rows(cfg, prompt, generations, verdicts, kept_here, keeps,
                                                  unfinished)

    def by_group(counter: Counter) -> dict:
        return {**{g: counter[g] for g in GROUPS}, "total": sum(counter[g] for g in GROUPS)}

    def ratio(num, den):
        return round(num / den, 4) if den else None

    labels = Counter(p.label for p in prompts)
    counts = {
        "prompts": {**by_group(Counter(group_of(p) for p in prompts)), "by_label": dict(sorted(labels.items()))},
        "generated": by_group(generated),
        "dropped": {reason: by_group(c) for reason, c in sorted(drops.items())},
        "judged": by_group(judged),
        "guard_truncated_inputs": by_group(truncated),
        "kept": {**by_group(kept), "by_label": dict(sorted(kept_by_label.items()))},
        # share of judged responses the guard (or refusal rule) let through, before the per-prompt cap
        "safe_ratio": {
            **{g: ratio(guard_kept[g], judged[g]) for g in GROUPS},
            "total": ratio(sum(guard_kept.values()), sum(judged.values())),
            "by_label": {label: ratio(guard_kept_by_label[label], judged_by_label[label]) for label in sorted(labels)},
        },
        "per_prompt": {
            "samples_per_prompt": n,
            "max_kept_per_prompt": cfg.max_kept_per_prompt,
            "prompts_by_kept_count": {g: {str(k): v for k, v in sorted(kept_per_prompt[g].items())} for g in GROUPS},
            "prompts_with_a_kept_row": {g: sum(v for k, v in kept_per_prompt[g].items() if k > 0) for g in GROUPS},
        },
    }
    if cfg.keep_unfinished_benign:
        counts["unfinished_benign"] = {
            "judged": unfinished["judged"], "kept": unfinished["kept"],
            "dropped": {k: v for k, v in sorted(unfinished.items()) if k not in ("judged", "kept")},
        }
    return rows, unfinished_rows, counts


# --- run ------------------------------------------------------------------------------------


# What synthesis writes in <out>; anything else there (the pipeline's synthesize.log) is the user's.
OUTPUT_FILES = (GENERATIONS_LOG, JUDGED_LOG, MANIFEST, TRAIN_FILE, UNFINISHED_BENIGN_FILE, STATS_FILE,
                REJECTED_STATS_FILE)


def overwrite_dir(out: Path) -> Path:
    """Where --overwrite synthesizes: beside <out>, swapped in only once the new set is complete."""
    return out.with_name(f".{out.name}.overwrite")


def manifest_differences(out: Path, manifest: dict) -> list[str]:
    path = out / MANIFEST
    if not path.exists():
        return []
    previous = read_json(path)
    return sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))


def check_out_dir(cfg: SynthConfig) -> None:
    """--out is a writable directory, and its logs come from a run with these arguments (or --overwrite)."""
    require_writable_dir(cfg.out, "--out")
    changed = manifest_differences(cfg.out, cfg.manifest())
    if changed and not cfg.overwrite:
        raise ThinksafeError(
            f"{cfg.out} holds a synthesis run with other {', '.join(changed)}: pass --overwrite to restart "
            "there, or choose another --out"
        )


def prepare_out_dir(cfg: SynthConfig) -> Path:
    """The directory this run writes its logs and set into: <out> itself, or with --overwrite a
    staging dir beside it (nothing in <out> is deleted before the new set is complete)."""
    check_out_dir(cfg)
    work = cfg.out
    if cfg.overwrite and cfg.out.exists() and any(cfg.out.iterdir()):
        work = overwrite_dir(cfg.out)
        if manifest_differences(work, cfg.manifest()):  # an interrupted --overwrite with other arguments
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / MANIFEST, cfg.manifest())
    return work


def move_user_files(old: Path, new: Path) -> None:
    """Files in <out> that synthesis did not write (a pipeline log) follow <out> when it is replaced."""
    for path in old.iterdir():
        if path.name not in OUTPUT_FILES and not (new / path.name).exists():
            os.replace(path, new / path.name)


def write_dataset_set(work: Path, rows: list[dict], unfinished_rows: list[dict] | None, stats: dict) -> None:
    """train.jsonl, unfinished_benign.jsonl and stats.json as one set: stats.json, written last,
    records the sha256 of the two row files it describes."""
    atomic_write_jsonl(work / TRAIN_FILE, rows)
    files = {TRAIN_FILE: sha256_of_files([work / TRAIN_FILE])}
    if unfinished_rows is not None:
        atomic_write_jsonl(work / UNFINISHED_BENIGN_FILE, unfinished_rows)
        files[UNFINISHED_BENIGN_FILE] = sha256_of_files([work / UNFINISHED_BENIGN_FILE])
    else:
        (work / UNFINISHED_BENIGN_FILE).unlink(missing_ok=True)  # never a side file older than train.jsonl
    (work / REJECTED_STATS_FILE).unlink(missing_ok=True)
    atomic_write_json(work / STATS_FILE, {**stats, "files_sha256": files})


def refuse_empty_set(cfg: SynthConfig, work: Path, stats: dict, judged: int) -> None:
    """The guard kept nothing: never leave stats.json saying so beside an older train.jsonl.

    An earlier complete set in <out> stays as it was; this attempt's counts go to stats.rejected.json.
    With no earlier set, stats.json (kept 0) is the whole state, and no train.jsonl tells
    train_and_eval.sh that synthesis has not succeeded.
    """
    kept_earlier = (cfg.out / TRAIN_FILE).exists()
    if kept_earlier:
        counts_file = work / REJECTED_STATS_FILE
        outcome = f"{cfg.out / TRAIN_FILE} and its stats.json are unchanged"
    else:
        counts_file = work / STATS_FILE
        (work / UNFINISHED_BENIGN_FILE).unlink(missing_ok=True)
        outcome = "nothing to train on"
    atomic_write_json(counts_file, stats)
    raise ThinksafeError(f"the guard kept 0 of {judged} responses; {outcome} (counts in {counts_file}; "
                         "try more prompts, --samples-per-prompt or --max-new-tokens)")


def make_default_generator(cfg: SynthConfig, prompts_to_generate: int) -> Generator:
    from thinksafe.generation import make_generator, pick_backend

    try:
        work = prompts_to_generate * cfg.sampling.n * cfg.sampling.max_new_tokens
        return make_generator(cfg.model.source, cfg.model.family, backend=pick_backend(cfg.backend, work),
                              batch_size=cfg.batch_size, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, RuntimeError) as err:
        if isinstance(err, ThinksafeError):
            raise
        raise ThinksafeError(str(err)) from None


def make_default_guard(cfg: SynthConfig, rows_to_judge: int):
    from thinksafe.guards import load_guard

    return load_guard(cfg.guard, device=cfg.device, backend=cfg.backend, style=cfg.guard_style,
                      batch_size=cfg.guard_batch_size, trust_remote_code=cfg.trust_remote_code,
                      work_tokens=rows_to_judge * cfg.sampling.max_new_tokens)


@dataclass
class SynthResult:
    train_file: Path
    stats_file: Path
    stats: dict


def synthesize(cfg: SynthConfig, generator: Generator | None = None, guard=None) -> SynthResult:
    """Run (or resume) synthesis. `generator`/`guard` replace the default ones (tests, notebooks)."""
    from thinksafe.guards import validate_guard_name

    started = time.perf_counter()
    # Everything checkable without a model, before anything in --out is touched.
    if guard is None:
        validate_guard_name(cfg.guard, cfg.guard_style)
    if generator is None:
        check_model_source(cfg.model.source)
    if cfg.device is not None:
        resolve_device(cfg.device)
    prompts = load_prompts(cfg.prompts, cfg.limit, cfg.instruction_column, cfg.label_column)
    work = prepare_out_dir(cfg)
    n = cfg.sampling.n

    gen_timer = PhaseTimer("generation")
    gen_log = ResumableLog(work / GENERATIONS_LOG, key=lambda r: r["key"])
    missing = [p for p in prompts if any(sample_key(p.id, s) not in gen_log.done for s in range(n))]
    backend_name = generator.name if generator is not None else None
    backend_reason = generator.reason if generator is not None else None
    if missing:
        load_start = time.perf_counter()
        owned = generator is None
        generator = generator or make_default_generator(cfg, len(missing))
        backend_name, backend_reason = generator.name, generator.reason
        gen_timer.load_s = time.perf_counter() - load_start
        generate_missing(cfg, prompts, generator, gen_log, gen_timer)
        gen_timer.extra["completions"] = gen_timer.items * n
        generator = None
        if owned:
            free_accelerator_memory()
    else:
        gen_timer.resumed = len(prompts)
    generations = {r["key"]: r for r in gen_log.rows}

    samples = [(p, generations[sample_key(p.id, s)]) for p in prompts for s in range(n)]
    candidates = [(p, g) for p, g in samples if g["status"] == OK]
    to_judge = candidates + [(p, g) for p, g in samples if is_unfinished_benign_candidate(cfg, p, g)]
    judge_timer = PhaseTimer("judging")
    judged_log = ResumableLog(work / JUDGED_LOG, key=lambda r: r["key"])
    guard_name, guard_label = cfg.guard, None
    if any(g["key"] not in judged_log.done for _, g in to_judge):
        load_start = time.perf_counter()
        guard = guard or make_default_guard(cfg, sum(g["key"] not in judged_log.done for _, g in to_judge))
        judge_timer.load_s = time.perf_counter() - load_start
        judge_missing(cfg, to_judge, guard, judged_log, judge_timer)
    else:
        judge_timer.resumed = len(to_judge)
    if guard is not None:
        guard_name, guard_label = guard.name, guard.label
    else:
        from thinksafe.guards import guard_label as describe_guard

        guard_label = describe_guard(cfg.guard, cfg.guard_style)
    verdicts = {r["key"]: r for r in judged_log.rows}

    rows, unfinished_rows, counts = assemble(cfg, prompts, generations, verdicts, keep_rule(guard_name))
    train_file, stats_file = cfg.out / TRAIN_FILE, cfg.out / STATS_FILE
    stats = {
        "generator": {"model": cfg.model.source, "family": cfg.model.family.name, "size": cfg.model.size,
                      "reasoning": cfg.model.family.reasoning, "backend": backend_name,
                      "backend_reason": backend_reason},
        "guard": {"name": guard_name, "label": guard_label, "style": cfg.guard_style},
        "prompt_source": describe_source(cfg.prompts),
        "limit": cfg.limit,
        "steer_prefix": cfg.steer_prefix,
        "sampling": cfg.sampling.to_dict(),
        "seed": cfg.sampling.seed,
        **counts,
        "phases": {"generation": gen_timer.to_dict("prompts"), "judging": judge_timer.to_dict("rows")},
        "wall_time_s": round(time.perf_counter() - started, 3),
        "train_file": str(train_file),
    }
    if not rows:
        refuse_empty_set(cfg, work, stats, len(candidates))
    write_dataset_set(work, rows, unfinished_rows if cfg.keep_unfinished_benign else None, stats)
    if work != cfg.out:
        move_user_files(cfg.out, work)
        swap_in(work, cfg.out)
    if cfg.push_to_hub:
        push_to_hub(train_file, cfg.push_to_hub)
    return SynthResult(train_file, stats_file, stats)


def push_to_hub(train_file: Path, repo: str) -> None:
    from datasets import load_dataset

    try:
        load_dataset("json", data_files=str(train_file), split="train").push_to_hub(repo)
    except Exception as err:  # network/auth errors come in many types: one line naming the repo
        raise ThinksafeError(f"push to the hub repo {repo!r} failed: {str(err).strip().splitlines()[0]}") from None


def summary(result: SynthResult) -> str:
    s = result.stats
    gen, judge = s["phases"]["generation"], s["phases"]["judging"]
    dropped = ", ".join(f"{k} {v['total']}" for k, v in s["dropped"].items()) or "none"
    ratio = s["safe_ratio"]
    lines = [
        "=" * 72,
        f"synthesize: {s['generator']['model']} ({s['generator']['family']}), guard {s['guard']['name']}",
        f"  guard:     {s['guard']['label']}",
        f"  prompts:   {s['prompts']['total']} ({s['prompts']['harmful']} harmful, {s['prompts']['benign']} benign)"
        f" x {s['per_prompt']['samples_per_prompt']} samples",
        f"  generated: {s['generated']['total']}   dropped: {dropped}",
        f"  kept:      {s['kept']['total']} ({s['kept']['harmful']} harmful, {s['kept']['benign']} benign); "
        f"safe ratio harmful {ratio['harmful']}, benign {ratio['benign']}",
        *([f"  unfinished benign (KL rows): {s['unfinished_benign']['kept']} kept of "
           f"{s['unfinished_benign']['judged']} judged, in {UNFINISHED_BENIGN_FILE}"] if "unfinished_benign" in s else []),
        f"  generation: {gen['prompts']} prompts in {gen['wall_s']} s ({gen['prompts_per_s']} prompts/s, "
        f"{gen['tokens_per_s']} tokens/s), {gen['resumed_prompts']} resumed",
        f"  judging:    {judge['rows']} rows in {judge['wall_s']} s ({judge['rows_per_s']} rows/s, "
        f"{judge['tokens_per_s']} tokens/s), {judge['resumed_rows']} resumed",
        f"  wrote {result.train_file} and {result.stats_file}",
        "=" * 72,
    ]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    """Flags over --config over the family's recipe (configs/recipes/<family>/synthesize.yaml) over
    the defaults: so `scripts/synthesize.sh cpu demo` writes the same data as the demo pipeline."""
    from thinksafe.config import parse_training
    from thinksafe.config.synthesis import SynthesisArguments

    (args,) = parse_training("synthesize", (SynthesisArguments,), argv, "thinksafe synthesize")
    return args


def config_from_args(args) -> SynthConfig:
    model = resolve_model(args.model, model_type=args.model_type)
    family = model.family
    guard = args.guard or family.default_guard
    sampling = family.sampling.replace(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       max_new_tokens=args.max_new_tokens, seed=args.seed, n=args.samples_per_prompt)
    prompts = args.prompts or family.synthesis_prompts
    limit = args.limit or (DEBUG_PROMPTS if args.debug else None)
    return SynthConfig(
        model=model, prompts=prompts, guard=guard, out=Path(args.out) if args.out else synthesized_data_dir(model, guard),
        sampling=sampling, guard_style=args.guard_style, limit=limit, max_kept_per_prompt=args.max_kept_per_prompt,
        keep_unfinished_benign=args.keep_unfinished_benign, steer_prefix=args.steer_prefix, backend=args.backend,
        device=args.device, batch_size=args.batch_size,
        guard_batch_size=args.guard_batch_size, chunk_size=args.chunk_size,
        instruction_column=args.instruction_column, label_column=args.label_column,
        push_to_hub=args.push_to_hub, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
    )


def main(argv: list[str] | None = None) -> int:
    result = synthesize(config_from_args(parse_args(argv)))
    print(summary(result), flush=True)
    return 0


__all__ = [
    "STEER_PREFIX",
    "SynthConfig",
    "SynthResult",
    "assemble",
    "check_completion",
    "main",
    "steer",
    "synthesize",
]
