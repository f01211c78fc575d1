"""Which samples become rows (complete, kept by the guard's keep rule, within the per-prompt cap),
and the counts stats.json reports about them."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from thinksafe.guards import KeepRule
from thinksafe.prompts import PromptRow
from thinksafe.resumable import sample_key
from thinksafe.synthesize.completion import CUT_AT_LIMIT, OK
from thinksafe.synthesize.config import SynthConfig

RESPONSE_LABEL = "safe"
HARMFUL, BENIGN = "harmful", "benign"
GROUPS = (HARMFUL, BENIGN)
# A judged row is dropped for the reason its guard's keep rule gives (thinksafe.guards.keep_rule).
OVER_CAP = "over_cap"  # more kept samples for one prompt than --max-kept-per-prompt


@dataclass
class Tally:
    """What happened to every sample, per group (harmful, benign) unless counted per label."""

    generated: Counter = field(default_factory=Counter)
    drops: defaultdict = field(default_factory=lambda: defaultdict(Counter))  # reason -> group counts
    judged: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)  # guard inputs cut to fit its context
    guard_kept: Counter = field(default_factory=Counter)  # passed the keep rule, before the cap
    kept: Counter = field(default_factory=Counter)
    judged_by_label: Counter = field(default_factory=Counter)
    guard_kept_by_label: Counter = field(default_factory=Counter)
    kept_by_label: Counter = field(default_factory=Counter)
    kept_per_prompt: dict = field(default_factory=lambda: {g: Counter() for g in GROUPS})
    unfinished: Counter = field(default_factory=Counter)  # --keep-unfinished-benign: judged, kept, reasons


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


def complete_rows(cfg: SynthConfig, prompt: PromptRow, generations: dict[str, dict], verdicts: dict[str, dict],
                  keeps: KeepRule, tally: Tally) -> list[dict]:
    """One prompt's kept complete samples, in sample order, up to its cap."""
    group = group_of(prompt)
    rows = []
    for sample in range(cfg.sampling.n):
        gen = generations[sample_key(prompt.id, sample)]
        tally.generated[group] += 1
        if gen["status"] != OK:
            tally.drops[gen["status"]][group] += 1
            continue
        verdict = verdicts[gen["key"]]
        tally.judged[group] += 1
        tally.judged_by_label[prompt.label] += 1
        tally.truncated[group] += bool(verdict.get("truncated"))
        reason = keeps(verdict, prompt.harmful)
        if reason is not None:
            tally.drops[reason][group] += 1
            continue
        tally.guard_kept[group] += 1
        tally.guard_kept_by_label[prompt.label] += 1
        if at_cap(cfg, len(rows)):
            tally.drops[OVER_CAP][group] += 1
            continue
        tally.kept[group] += 1
        tally.kept_by_label[prompt.label] += 1
        rows.append(training_row(prompt, gen["response"]))
    tally.kept_per_prompt[group][len(rows)] += 1
    return rows


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
    tally = Tally()
    rows, unfinished_rows = [], []
    for prompt in prompts:
        kept = complete_rows(cfg, prompt, generations, verdicts, keeps, tally)
        rows += kept
        unfinished_rows += unfinished_benign_rows(cfg, prompt, generations, verdicts, len(kept), keeps,
                                                  tally.unfinished)
    return rows, unfinished_rows, dataset_counts(cfg, prompts, tally)


def _by_group(counter: Counter) -> dict:
    return {**{g: counter[g] for g in GROUPS}, "total": sum(counter[g] for g in GROUPS)}


def _ratio(num, den):
    return round(num / den, 4) if den else None


def dataset_counts(cfg: SynthConfig, prompts: list[PromptRow], tally: Tally) -> dict:
    """The counts part of stats.json, in the order it has always been written."""
    labels = Counter(p.label for p in prompts)
    per_prompt = tally.kept_per_prompt
    counts = {
        "prompts": {**_by_group(Counter(group_of(p) for p in prompts)), "by_label": dict(sorted(labels.items()))},
        "generated": _by_group(tally.generated),
        "dropped": {reason: _by_group(c) for reason, c in sorted(tally.drops.items())},
        "judged": _by_group(tally.judged),
        "guard_truncated_inputs": _by_group(tally.truncated),
        "kept": {**_by_group(tally.kept), "by_label": dict(sorted(tally.kept_by_label.items()))},
        # share of judged responses the guard (or refusal rule) let through, before the per-prompt cap
        "safe_ratio": {
            **{g: _ratio(tally.guard_kept[g], tally.judged[g]) for g in GROUPS},
            "total": _ratio(sum(tally.guard_kept.values()), sum(tally.judged.values())),
            "by_label": {label: _ratio(tally.guard_kept_by_label[label], tally.judged_by_label[label])
                         for label in sorted(labels)},
        },
        "per_prompt": {
            "samples_per_prompt": cfg.sampling.n,
            "max_kept_per_prompt": cfg.max_kept_per_prompt,
            "prompts_by_kept_count": {g: {str(k): v for k, v in sorted(per_prompt[g].items())} for g in GROUPS},
            "prompts_with_a_kept_row": {g: sum(v for k, v in per_prompt[g].items() if k > 0) for g in GROUPS},
        },
    }
    if cfg.keep_unfinished_benign:
        unfinished = tally.unfinished
        counts["unfinished_benign"] = {
            "judged": unfinished["judged"], "kept": unfinished["kept"],
            "dropped": {k: v for k, v in sorted(unfinished.items()) if k not in ("judged", "kept")},
        }
    return counts
