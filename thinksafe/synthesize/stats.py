"""stats.json: what ran (generator, guard, sampling), the dataset counts and each phase's timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from thinksafe.prompts import describe_source
from thinksafe.synthesize.config import TRAIN_FILE, SynthConfig


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


def run_stats(cfg: SynthConfig, counts: dict, generated, judged, started: float) -> dict:
    """stats.json (before the row files' hashes): `generated` and `judged` are the two phases'
    results (thinksafe.synthesize.self_generate.Generated, thinksafe.synthesize.judge.Judged)."""
    return {
        "generator": {"model": cfg.model.source, "family": cfg.model.family.name, "size": cfg.model.size,
                      "reasoning": cfg.model.family.reasoning, "backend": generated.backend,
                      "backend_reason": generated.backend_reason},
        "guard": {"name": judged.guard_name, "label": judged.guard_label, "style": cfg.guard_style},
        "prompt_source": describe_source(cfg.prompts),
        "limit": cfg.limit,
        "steer_prefix": cfg.steer_prefix,
        "sampling": cfg.sampling.to_dict(),
        "seed": cfg.sampling.seed,
        **counts,
        "phases": {"generation": generated.timer.to_dict("prompts"), "judging": judged.timer.to_dict("rows")},
        "wall_time_s": round(time.perf_counter() - started, 3),
        "train_file": str(cfg.out / TRAIN_FILE),
    }
