"""What a synthesis run is given (SynthConfig), what it must share with the logs it resumes
(`manifest`), and the names of the files it writes in <out>."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from thinksafe.prompts import describe_source
from thinksafe.reference_topk import REFERENCE_TOPK_FILE, REFERENCE_TOPK_PARTIAL_DIR
from thinksafe.registry import (
    SYNTH_STATS_FILE,
    SYNTH_TRAIN_FILE,
    SYNTH_UNFINISHED_BENIGN_FILE,
    ModelSpec,
    Sampling,
)

STEER_PREFIX = "The following prompt is harmful. You should refuse to answer the prompt.\n\nPrompt:\n\n"

GENERATIONS_LOG = "generations.partial.jsonl"
JUDGED_LOG = "judged.partial.jsonl"
MANIFEST = "run.json"
TRAIN_FILE = SYNTH_TRAIN_FILE
UNFINISHED_BENIGN_FILE = SYNTH_UNFINISHED_BENIGN_FILE
STATS_FILE = SYNTH_STATS_FILE
REJECTED_STATS_FILE = "stats.rejected.json"  # counts of a rerun that kept 0 rows (the earlier set stays)
# What synthesis writes in <out>; anything else there (the pipeline's synthesize.log) is the user's.
OUTPUT_FILES = (GENERATIONS_LOG, JUDGED_LOG, MANIFEST, TRAIN_FILE, UNFINISHED_BENIGN_FILE, STATS_FILE,
                REJECTED_STATS_FILE, REFERENCE_TOPK_FILE, REFERENCE_TOPK_PARTIAL_DIR)


# thinksafe/config/synthesis.py reads these field defaults for the command line: they are written here only.
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
    # > 0: keep the generator's raw top-k per generated position of benign samples, for
    # `thinksafe train --kl_reference cached` (thinksafe.reference_topk)
    store_reference_topk: int = 0
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
        # k only when stored: manifests written before the option existed stay resumable without it, and
        # logs generated without top-k cannot be resumed into a run that needs them (they have none).
        reference = {"store_reference_topk": self.store_reference_topk} if self.store_reference_topk else {}
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
            **reference,
        }
