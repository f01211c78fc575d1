"""`thinksafe evaluate` options as a dataclass for TRL's parser.

Unlike training and synthesis, evaluate reads no family recipe by itself: which family a model
directory belongs to is known only from its run record (thinksafe/evaluate/eval_model.py). The pipeline
passes the family's `evaluate` recipe through the run record (`--config runs/<run>/run_plan.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thinksafe.engines import BACKENDS
from thinksafe.evaluate.responses import DEFAULT_CHUNK
from thinksafe.evaluate.tasks import DATA_SOURCES
from thinksafe.recipes import ConfigError
from thinksafe.registry import FAMILIES
from thinksafe.replicas import check_fits_here, parse_data_parallel
from thinksafe.tracking import REPORT_CHOICES

REASONING_BACKENDS = ("auto", "builtin", "skythought")


@dataclass
class EvaluationArguments:
    model: str | None = field(default=None, metadata={
        "help": "merged model dir, LoRA adapter dir, hub id, model_type/size (qwen/0.6B) or demo"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma list of task names (eval/tasks/*.yaml) or a group: reasoning, safety, bundled, all"})
    run_name: str | None = field(default=None, metadata={
        "help": "results/<run-name>/ (default: the model dir's training run record, or <slug>_base)"})
    also_model: str | None = field(default=None, metadata={
        "help": "a second model evaluated on the same tasks in the same process, after --model (the pipeline: the "
                "base model with the trained adapter, on its one shared engine)"})
    also_run_name: str | None = field(default=None, metadata={"help": "--run-name of --also-model"})
    model_type: str | None = field(default=None, metadata={
        "help": "the model's family (default: the training run record, or the registry for a hub id; needed "
                "for a model dir outside a training run)"})
    backend: str = field(default="auto", metadata={
        "choices": BACKENDS, "help": "auto: vLLM when installed with a GPU, else transformers"})
    reasoning_backend: str = field(default="auto", metadata={
        "choices": REASONING_BACKENDS,
        "help": "auto: SkyThought for reasoning tasks when installed and the backend is vLLM"})
    data: str = field(default="auto", metadata={
        "choices": DATA_SOURCES, "help": "hub (full benchmarks) or bundled (eval/ subsets); auto: the family's"})
    data_file: str | None = field(default=None, metadata={
        "action": "append", "metavar": "TASK=PATH",
        "help": "a local .jsonl/.json for a task (repeatable); needed for gated sets without access"})
    limit: int | None = field(default=None, metadata={"help": "use N items per task, spread evenly over the set"})
    n: int | None = field(default=None, metadata={
        "help": "samples per prompt (default: the task file: 8 reasoning, 1 safety)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "default: the task file (32768 / 16384)"})
    temperature: float | None = field(default=None, metadata={"help": "default: the model family's"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})
    guard: str | None = field(default=None, metadata={
        "help": "judge of harmful-rate tasks (default: the task's, llama-guard-3; the demo: refusal-judge)"})
    refusal_guard: str | None = field(default=None, metadata={
        "help": "judge of refusal tasks: XSTest, held-out harmful (default: wildguard / refusal-judge)"})
    device: str | None = field(default=None, metadata={
        "help": "transformers device (default: cuda if available, else cpu)"})
    batch_size: int | None = field(default=None, metadata={"help": "transformers generation batch size"})
    chunk_size: int = field(default=DEFAULT_CHUNK, metadata={"help": "prompts per resumable chunk"})
    tensor_parallel_size: int | None = field(default=None, metadata={"help": "vLLM / SkyThought"})
    data_parallel: str = field(default="1", metadata={
        "help": "replicas of the policy and of a model guard, one engine each on Ray (auto: one per GPU when the "
                "model fits on one; docs/scale.md); 1: one engine in this process"})
    ray_address: str | None = field(default=None, metadata={
        "help": "a Ray cluster to join (default: RAY_ADDRESS, else a local Ray for this command)"})
    gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "vLLM / SkyThought, policy and guard (lower it if the guard does not fit after the policy)"})
    overwrite: bool = field(default=False, metadata={"help": "delete this run's results for the tasks and redo them"})
    rescore: bool = field(default=False, metadata={"help": "re-judge existing generations (e.g. with another guard)"})
    report_to: str = field(default="auto", metadata={"choices": REPORT_CHOICES, "help": "wandb mode"})

    def __post_init__(self):
        if not self.model or not self.tasks:
            raise ConfigError("--model and --tasks are required")
        if self.also_run_name and not self.also_model:
            raise ConfigError("--also-run-name names the run of --also-model: pass --also-model too")
        if isinstance(self.tasks, (list, tuple)):  # a YAML list in a recipe or run record
            self.tasks = ",".join(map(str, self.tasks))
        if self.model_type is not None and self.model_type not in FAMILIES:
            raise ConfigError(f"--model-type {self.model_type!r} is unknown; choose one of: {', '.join(FAMILIES)}")
        self.data_parallel = parse_data_parallel(self.data_parallel)
        check_fits_here(self.data_parallel, self.tensor_parallel_size, self.ray_address)
        for name in ("limit", "n", "max_new_tokens", "batch_size", "chunk_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
