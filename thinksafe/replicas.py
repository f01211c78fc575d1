"""Data-parallel generation on Ray core: N replicas, each a Ray actor owning one engine.

Every model the paper uses (0.6B-8B) fits on one GPU many times over, and vLLM's own offline data
parallelism refuses dense models (vLLM PR #30739), so replicas are separate engines, one per GPU (or
per group of GPUs when a model needs tensor parallelism), as SkyThought's Ray backend and verl run
them. Not `ray.data.llm`: Ray's LLM package pins its own vLLM (ray 2.60 pins vllm 0.29.0; the GPU set
here is vllm 0.24.0), so each actor holds our own `make_generator` engine instead (docs/scale.md).

- `plan_layout`: how many replicas, tensor parallel within each, the GPUs (possibly a share) each asks Ray for.
- `Replicas`: the actors; `submit` sends a method call to a free replica, `completed` yields the calls as
  they finish, and a replica that fails is reported with the requests it held (`ReplicaFailure`), its
  results before that kept and the other replicas working on.
- `GeneratorReplicas`: a `Generator`-like pool for synthesis and evaluation; `chat_each` feeds
  thinksafe.resumable, which appends each finished chunk to the resumable log as it comes back, so a
  lost replica (or a killed run) loses only the chunks in flight and a rerun generates only those.

With one replica (the default) nothing here runs: the stages build their engine in-process as before.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from thinksafe.errors import ThinksafeError

logger = logging.getLogger(__name__)

AUTO = "auto"
# `auto` keeps a model on one GPU when its weights take at most this share of the engine's memory
# (the GPU's memory x gpu_memory_utilization): the rest is KV cache, and at the paper's 16k-32k tokens
# per sample a replica with less than half its memory for KV cache runs few sequences at once.
ONE_GPU_WEIGHT_SHARE = 0.5
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
# Calls queued per replica: one running and one waiting, so an engine never idles for a round trip.
CALLS_PER_REPLICA = 2
CLOSE_WAIT_S = 15  # for the engines to stop in order before their actors are killed
# Environment a replica on another node needs to see as the driver does (a local Ray inherits it all).
FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "THINKSAFE_", "TRANSFORMERS_", "TOKENIZERS_", "PYTHONPATH")


class ReplicaError(ThinksafeError, ValueError):
    """A data-parallel setting that cannot run here (checked before any engine starts)."""


class ReplicaFailure(ThinksafeError, RuntimeError):
    """One or more replicas failed; the message names each with the prompts it held. A failure at run
    time, not a bad input: one line, exit 1 (thinksafe.cli)."""

    exit_code = 1


def parse_data_parallel(value) -> int | str:
    """`--data-parallel N|auto` -> N (a positive int) or "auto"; anything else one clear line."""
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ReplicaError(f"--data-parallel must be a positive integer or auto, got {value!r}") from None
    if number < 1 or str(number) != str(value).strip():
        raise ReplicaError(f"--data-parallel must be a positive integer or auto, got {value!r}")
    return number


@dataclass(frozen=True)
class Layout:
    replicas: int
    tensor_parallel_size: int  # GPUs of one engine (1 on CPU)
    gpus_per_replica: float  # what each actor asks Ray for: tensor_parallel_size, or a share of one GPU
    gpu_memory_utilization: float | None  # each engine's share of its GPU (None: the engine's default)
    reason: str

    @property
    def parallel(self) -> bool:
        return self.replicas > 1

    def describe(self) -> str:
        where = f"{self.gpus_per_replica:g} GPU each" if self.gpus_per_replica else "CPU"
        return f"{self.replicas} replica(s), tensor parallel {self.tensor_parallel_size}, {where} ({self.reason})"


def weights_bytes(model_dir: str | None) -> int | None:
    """Bytes of a local model's weight files; None when they cannot be read here (a hub id not cached)."""
    if not model_dir or not Path(model_dir).is_dir():
        return None
    total = sum(f.stat().st_size for pattern in WEIGHT_FILES for f in Path(model_dir).glob(pattern))
    return total or None


def tensor_parallel_needed(weights: int | None, gpu_bytes: int | None, utilization: float) -> int:
    """The smallest power of two of GPUs whose engine memory holds the weights within ONE_GPU_WEIGHT_SHARE."""
    if not weights or not gpu_bytes:
        return 1
    size = 1
    while weights > ONE_GPU_WEIGHT_SHARE * utilization * gpu_bytes * size:
        size *= 2
    return size


def plan_layout(data_parallel, gpus: int, *, weights: int | None = None, gpu_bytes: int | None = None,
                tensor_parallel_size: int | None = None, gpu_memory_utilization: float = 0.9,
                cluster: bool = False) -> Layout:
    """Replicas and the GPUs of each, from `--data-parallel` and the GPUs Ray can give (`gpus`: the
    visible ones, or a cluster's total).

    `auto`: tensor parallel only as wide as the model needs (`tensor_parallel_needed`: its weight
    files against ONE_GPU_WEIGHT_SHARE of one GPU's engine memory), and as many replicas as the GPUs
    hold at that width; with no GPU, one replica (the in-process path). N: N replicas of
    `tensor_parallel_size` (default 1) GPUs each; more replicas than GPUs share them (N a multiple of
    the GPUs, 1/k of a GPU and of its memory each: Ray packs fractional GPUs within one GPU).
    """
    utilization = gpu_memory_utilization
    if data_parallel == AUTO:
        if gpus < 1:
            return Layout(1, 1, 0, None, "auto: no GPU, one in-process engine")
        width = tensor_parallel_size or tensor_parallel_needed(weights, gpu_bytes, utilization)
        if width > gpus:
            raise ReplicaError(f"--data-parallel auto: the model needs tensor parallel {width} "
                               f"(weights {weights / 2**30:.1f} GiB), more than the {gpus} GPU(s) here")
        why = ("weights unknown here, taken to fit one GPU" if not weights or not gpu_bytes else
               f"weights {weights / 2**30:.1f} GiB, {'fit' if width == 1 else 'need'} "
               f"{width} GPU(s) at {ONE_GPU_WEIGHT_SHARE:.0%} of each engine's memory")
        return Layout(gpus // width, width, width, None, f"auto: one replica per {width} of {gpus} GPU(s); {why}")
    replicas = int(data_parallel)
    if gpus < 1:
        if tensor_parallel_size and tensor_parallel_size > 1:
            raise ReplicaError(f"--tensor-parallel-size {tensor_parallel_size} needs GPUs; none is visible")
        return Layout(replicas, 1, 0, None, f"{replicas} asked for, on CPUs")
    width = tensor_parallel_size or 1
    if replicas * width <= gpus:
        return Layout(replicas, width, width, None, f"{replicas} asked for, {width} GPU(s) each")
    if width == 1 and replicas % gpus == 0:
        share = replicas // gpus
        return Layout(replicas, 1, 1 / share, round(utilization / share, 3),
                      f"{replicas} asked for on {gpus} GPU(s): {share} per GPU, each 1/{share} of its memory")
    where = "in the Ray cluster" if cluster else "visible (join a cluster with --ray-address for more)"
    raise ReplicaError(f"--data-parallel {replicas} with tensor parallel {width} needs {replicas * width} GPUs, "
                       f"{gpus} {where}; ask for at most {gpus // width} or a multiple of {gpus} (replicas "
                       "sharing each GPU)")


# --- Ray ------------------------------------------------------------------------------------------


def ray_address(flag: str | None) -> str | None:
    """The cluster to join: --ray-address, else RAY_ADDRESS; None starts a local Ray for this command."""
    return flag or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray (joining `address`) or start a local one; True when this call started it, so the
    caller stops it again (no process outlives its command)."""
    import ray  # deferred: ray is needed only with several replicas

    if ray.is_initialized():
        return False
    with python_signal_handlers_kept():
        if address:
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
            return True
        # A local Ray for this command only: no dashboard (its server and agent cost seconds and memory),
        # and no usage report (the GPU machines have no network).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        return True


@contextmanager
def python_signal_handlers_kept():
    """Ray's core worker installs its own SIGTERM handler in the driver, which logs and aborts (exit 134,
    seen here): the command's own handlers (thinksafe.interrupt: SIGTERM unwound like Ctrl-C, the logs
    and locks closed, exit 143) are put back once Ray is up."""
    kept = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for number, handler in kept.items():
                if callable(handler):
                    signal.signal(number, handler)


def cluster_gpus(address: str | None) -> int:
    """GPUs replicas can use: the cluster's (joined) or the ones visible to this process (local)."""
    if address:
        import ray  # deferred: ray is needed only with several replicas

        start_ray(address)
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_memory_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


class _Replica:
    """The actor's body: builds one object (an engine, a guard backend) with `factory(**kwargs)` in
    its own process, then runs its methods. Made a Ray actor class in `Replicas.start`."""

    def __init__(self, factory: Callable, kwargs: dict):
        self.started_at = time.time()
        self.target = factory(**kwargs)
        self.ready_at = time.time()

    def ready(self) -> dict:
        import socket

        return {"startup_s": self.ready_at - self.started_at, "started_at": self.started_at,
                "ready_at": self.ready_at, "pid": os.getpid(), "node": socket.gethostname(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def attribute(self, name: str):
        return getattr(self.target, name)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.target, method)(*args, **kwargs)

    def close(self) -> None:
        close = getattr(self.target, "close", None)
        if close is not None:
            close()


@dataclass
class Failed:
    replica: int
    where: str  # node / GPUs / pid, for the report
    shard: list[str]  # what the calls it held covered (the caller's description of each request)
    error: str


class Replicas:
    """`layout.replicas` Ray actors, each owning `factory(**kwargs)`; started together, stopped together."""

    def __init__(self, factory: Callable, kwargs: dict, layout: Layout, address: str | None = None):
        self.layout, self.address = layout, address
        self.actors: list = []
        self.info: list[dict] = []
        self.calls_done = [0] * layout.replicas  # per replica, for the log and the tests
        self.started_ray = False
        self.startup_s = 0.0
        self.start(factory, kwargs)

    def start(self, factory: Callable, kwargs: dict) -> None:
        import ray  # deferred: ray is needed only with several replicas

        begin = time.monotonic()
        # A local Ray gets at least one CPU per replica: on CPUs each replica is a whole engine process.
        self.started_ray = start_ray(self.address, num_cpus=max(self.layout.replicas, os.cpu_count() or 1))
        try:
            options = {"num_gpus": self.layout.gpus_per_replica, "num_cpus": 0 if self.layout.gpus_per_replica else 1,
                       "max_restarts": 0, "max_task_retries": 0}
            actor_class = ray.remote(_Replica).options(**options)
            if self.layout.gpus_per_replica and self.layout.gpus_per_replica < 1:
                # Replicas sharing a GPU start one after the other: vLLM sizes its KV cache from the memory
                # it profiles as free, and two engines profiling at once on one H200 failed ("Engine core
                # initialization failed", bench/README.md "Engines started once and warm").
                for _ in range(self.layout.replicas):
                    self.actors.append(actor_class.remote(factory, kwargs))
                    self.info.append(self._ready(len(self.actors) - 1))
            else:  # on their own GPUs (or CPUs) they start together
                self.actors = [actor_class.remote(factory, kwargs) for _ in range(self.layout.replicas)]
                self.info = [self._ready(index) for index in range(len(self.actors))]
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - begin
        logger.info("%s started in %.0f s: %s", self.layout.describe(), self.startup_s,
                    ", ".join(f"#{i} {info['node']} GPU {info['gpus'] or '-'} pid {info['pid']}"
                              for i, info in enumerate(self.info)))

    def _ready(self, index: int) -> dict:
        import ray  # deferred: ray is needed only with several replicas

        try:
            return ray.get(self.actors[index].ready.remote())
        except Exception as err:
            raise ReplicaFailure(f"replica {index} of {self.layout.replicas} failed to start: "
                                 f"{first_line(err)}") from None

    def where(self, replica: int) -> str:
        info = self.info[replica] if replica < len(self.info) else {}
        return f"node {info.get('node', '?')}, GPU {info.get('gpus') or '-'}, pid {info.get('pid', '?')}"

    def attribute(self, name: str):
        import ray  # deferred: ray is needed only with several replicas

        return ray.get(self.actors[0].attribute.remote(name))

    def run_all(self, requests: list[tuple[str, tuple, str]]) -> Iterator[tuple[int, object]]:
        """Run (method, args, description) requests over the replicas, CALLS_PER_REPLICA queued on each;
        yield (request index, result) as each finishes, in finishing order. A replica whose call fails
        gets no more; the others take the rest. At the end, ReplicaFailure names each failed replica
        with the requests it held (what a rerun redoes), after every other result was yielded."""
        import ray  # deferred: ray is needed only with several replicas

        queue = deque(range(len(requests)))
        running: dict = {}  # object ref -> (replica, request index)
        held: dict[int, list[int]] = {r: [] for r in range(len(self.actors))}
        failed: dict[int, Failed] = {}

        def dispatch() -> None:
            for replica, actor in enumerate(self.actors):
                while replica not in failed and len(held[replica]) < CALLS_PER_REPLICA and queue:
                    index = queue.popleft()
                    method, args, _ = requests[index]
                    running[actor.call.remote(method, *args)] = (replica, index)
                    held[replica].append(index)

        dispatch()
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            replica, index = running.pop(ref)
            held[replica].remove(index)
            try:
                result = ray.get(ref)
            except Exception as err:  # the actor died (RayActorError) or its engine raised (RayTaskError)
                record = failed.setdefault(replica, Failed(replica, self.where(replica), [], first_line(err)))
                record.shard.append(requests[index][2])
                continue
            self.calls_done[replica] += 1
            yield index, result
            dispatch()
        if failed:
            unrun = len(queue)  # left when every replica had failed
            raise ReplicaFailure(failure_message(list(failed.values()), len(self.actors), unrun))

    def close(self) -> None:
        """Stop each engine in order, then the actors, then the local Ray this command started."""
        import ray  # deferred: ray is needed only with several replicas

        if not ray.is_initialized():
            return
        stops = []
        for actor in self.actors:
            try:
                stops.append(actor.close.remote())
            except Exception:  # an actor already gone: nothing to stop
                continue
        try:  # an engine stops in a few seconds; on Ctrl-C the command must end within seconds too
            ray.wait(stops, num_returns=len(stops), timeout=CLOSE_WAIT_S)
        except Exception:  # a dead actor's stop raises: it is stopped
            pass
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                continue
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def first_line(err: BaseException) -> str:
    """The failure's own message: Ray wraps a remote exception in its traceback; keep the cause's last line."""
    cause = getattr(err, "cause", None)
    text = str(cause if cause is not None else err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(cause or err).__name__}: {lines[-1] if lines else ''}"


def failure_message(failed: list[Failed], total: int, unrun: int) -> str:
    parts = [f"replica {f.replica} of {total} ({f.where}) failed holding {'; '.join(f.shard)}: {f.error}"
             for f in failed]
    tail = f"; {unrun} more request(s) not run (no replica left)" if unrun else ""
    return (" | ".join(parts) + tail + ". The other replicas' results are kept in the log; "
            "rerun the same command to generate only what is missing")


# --- generation ------------------------------------------------------------------------------------


class GeneratorReplicas:
    """A `Generator`-like pool of `make_generator` engines, one per replica (thinksafe.engines).

    `chat` answers like one generator (outputs in the prompts' order); `chat_each` runs many calls and
    yields each as it finishes, which thinksafe.resumable appends to the log at once.
    """

    def __init__(self, factory: Callable, kwargs: dict, layout: Layout, address: str | None = None):
        self.replicas = Replicas(factory, kwargs, layout, address)
        try:
            self.name = self.replicas.attribute("name")
            self.reason = f"{self.replicas.attribute('reason')}; {layout.describe()}"
            self.reference_topk = self.replicas.attribute("reference_topk")
        except BaseException:
            self.replicas.close()
            raise
        self.layout = layout
        self.startup_s = self.replicas.startup_s

    def chat_each(self, calls: list[tuple[list[str], object, bool, str]], progress=None
                  ) -> Iterator[tuple[int, list]]:
        """calls: (prompts, sampling, enable_thinking, description); yields (call index, completions)."""
        requests = [("chat", (prompts, sampling, thinking), description)
                    for prompts, sampling, thinking, description in calls]
        for index, outputs in self.replicas.run_all(requests):
            if progress is not None:
                progress.update(sum(len(samples) for samples in outputs))
            yield index, outputs

    def chat(self, prompts: list[str], sampling, enable_thinking: bool = True, progress=None) -> list[list]:
        """One call's prompts split into contiguous shards, one per replica, put back in order."""
        if not prompts:
            return []
        count = min(self.layout.replicas, len(prompts))
        bounds = [(len(prompts) * i // count, len(prompts) * (i + 1) // count) for i in range(count)]
        calls = [(prompts[a:b], sampling, enable_thinking, f"prompts {a}-{b - 1} of this call") for a, b in bounds]
        outputs: list = [None] * count
        for index, result in self.chat_each(calls, progress):
            outputs[index] = result
        return [samples for shard in outputs for samples in shard]

    def close(self) -> None:
        self.replicas.close()


def start_generators(factory: Callable, kwargs: dict, layout: Layout, address: str | None) -> GeneratorReplicas:
    try:
        return GeneratorReplicas(factory, kwargs, layout, address)
    except ImportError as err:
        raise ReplicaError(f"--data-parallel {layout.replicas} needs Ray: pip install ray==2.60.0 ({err})") from None


def layout_for(data_parallel, model_source: str | None, address: str | None = None,
               tensor_parallel_size: int | None = None, gpu_memory_utilization: float | None = None) -> Layout:
    """The layout of `--data-parallel` for a model, from the GPUs this command (or the cluster) has."""
    from thinksafe.model_loading import resolve_model_path  # deferred: only when replicas are asked for

    address = ray_address(address)
    gpus = cluster_gpus(address)
    weights = None
    if data_parallel == AUTO and gpus and model_source:
        try:
            weights = weights_bytes(resolve_model_path(model_source))
        except Exception:  # a hub id not cached here: its size is unknown, taken to fit one GPU
            weights = None
    return plan_layout(data_parallel, gpus, weights=weights, gpu_bytes=gpu_memory_bytes(),
                       tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization or 0.9, cluster=bool(address))


def check_fits_here(data_parallel, tensor_parallel_size: int | None = None, address: str | None = None) -> None:
    """`--data-parallel N` against the GPUs this command sees, when the option is parsed (before any output
    is touched); a cluster's GPUs are counted once Ray is joined, `auto` once the model's size is known."""
    if data_parallel in (1, AUTO) or ray_address(address):
        return
    plan_layout(data_parallel, cluster_gpus(None), tensor_parallel_size=tensor_parallel_size)


def backend_name(backend) -> str:
    return getattr(backend, "name", backend)


def make_generators(model_source: str, family, backend, data_parallel=1, address: str | None = None, **kwargs):
    """`engines.make_generator`, or `layout.replicas` of it on Ray when more than one replica is asked for
    (and, for `auto`, when this command has more than one GPU's worth); kwargs go to each engine.
    One replica under the pipeline: its shared engine when that serves the request (thinksafe.shared_engine)."""
    from thinksafe.engines import make_generator  # deferred: engines import torch; layouts alone need none
    from thinksafe.shared_engine import shared_generator

    if data_parallel == 1:
        shared = shared_generator(model_source, backend_name(backend), kwargs)
        return shared or make_generator(model_source, family, backend, **kwargs)
    layout = layout_for(data_parallel, model_source, address, kwargs.get("tensor_parallel_size"),
                        kwargs.get("gpu_memory_utilization"))
    logger.info("data parallel: %s", layout.describe())
    engine = {**kwargs, "tensor_parallel_size": layout.tensor_parallel_size}
    if layout.gpu_memory_utilization is not None:
        engine["gpu_memory_utilization"] = layout.gpu_memory_utilization
    if not layout.parallel:
        return make_generator(model_source, family, backend, **engine)
    return start_generators(make_generator, {"model_source": model_source, "family": family, "backend": backend,
                                             **engine}, layout, ray_address(address))
