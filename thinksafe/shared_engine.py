"""One generation engine for a pipeline's stages: started once, asleep while no stage uses it.

Each stage is its own process (a failure never loses an earlier stage's files), and each used to
start its own engine: on the demo on an H200, engine start-up was most of every stage's time
(bench/README.md, "Engines started once and warm"). The pipeline now starts one engine server
(`python -m thinksafe engine`) for the run's base model, with LoRA enabled, and the stages that
generate from that model (synthesis, the base model's evaluation, the trained adapter's through
vLLM's LoRARequest) use it instead of starting their own:

- **The server** builds the engine as the stages would (`engines.make_generator`), listens on a Unix
  socket in a private directory (`multiprocessing.connection`, with a key the pipeline passes in its
  environment) and serves one stage at a time. On a GPU it sleeps (vLLM sleep mode, level 1: weights
  to CPU memory, KV cache freed) whenever no stage holds it, so training, the merge and a guard get
  the GPU, and wakes when the next stage connects.
- **A stage** finds the server in SOCKET_ENV and uses it through `SharedGenerator` (the `Generator`
  interface: `chat`, `close`) when the server serves its request (`not_served`: same model, same
  backend, LoRA rank and top-k within what the engine was built with, same seed where the engine
  seeds the run); otherwise, or when the server cannot be reached, it starts its own engine as before,
  saying why in one line. The resumable logs stay the unit of progress: a server lost mid-call fails
  the stage (exit 1) and a rerun generates only what is missing.
- **Stopping**: the pipeline stops the server when it ends (also on Ctrl-C, SIGTERM and failure: it
  is the pipeline's child, and thinksafe.interrupt stops every descendant on the way out).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

from thinksafe.console import TERMINAL, Relay, say
from thinksafe.errors import ThinksafeError
from thinksafe.serving import process_alive  # the launch scripts' check: a zombie has exited too
from thinksafe.steps import open_log, thinksafe_cmd

SOCKET_ENV = "THINKSAFE_ENGINE_SERVER"  # JSON {socket, pid, log}: set by the pipeline for its stages
MODE_ENV = "THINKSAFE_SHARED_ENGINE"  # the pipeline's --shared-engine default: auto, on or off
MODES = ("auto", "on", "off")
KEY_ENV = "THINKSAFE_SHARED_ENGINE_KEY"  # the connection key (hex), for the server and its clients
SOCKET_WAIT_S = 300.0  # for the server's socket to appear (its imports) before a stage gives up on it
STOP_WAIT_S = 10.0  # for the server to stop its engine in order before it is terminated (then killed)
SERVED_OPTIONS = ("dtype", "max_model_len")  # engine options that change outputs: a stage's must match


class SharedEngineError(ThinksafeError, RuntimeError):
    """The shared engine failed or went away while serving a stage: a runtime failure, exit 1."""

    exit_code = 1


# --- the server (`python -m thinksafe engine`, started by the pipeline) -------------------------------


class EngineServer:
    """Serves one generator to one client at a time; asleep between clients where it can sleep.
    `build() -> (generator, info)` runs at once, or (lazy) when the first client connects: a pipeline
    with nothing left to generate (a rerun) then starts no engine."""

    def __init__(self, build, lazy: bool = False):
        self.build, self.lazy = build, lazy
        self.generator, self.info = None, {}
        self.awake = True

    def start(self) -> None:
        if self.generator is None:
            self.generator, self.info = self.build()
            self.awake = True

    def serve(self, listener) -> None:
        """Until a client asks it to stop (or a signal unwinds it); the engine is stopped in order then."""
        try:
            if not self.lazy:
                self.start()
            while True:
                self.sleep()  # nobody holds it: the GPU goes to whatever runs between stages
                with listener.accept() as connection:
                    self.start()
                    if not self.session(connection):
                        return
        finally:
            getattr(self.generator, "close", lambda: None)()

    def session(self, connection) -> bool:
        """Answer one client's requests until it disconnects (True) or asks the server to stop (False)."""
        calls, samples, busy = 0, 0, 0.0
        try:
            while True:
                try:
                    kind, *args = connection.recv()
                except (EOFError, OSError):
                    return True
                if kind == "stop":
                    try:
                        connection.send(("ok", None))
                    except OSError:  # the pipeline did not wait for the answer: it is stopping anyway
                        pass
                    return False
                if kind == "info":
                    connection.send(("ok", self.info))
                    continue
                started = time.monotonic()
                try:
                    outputs = self.chat(*args)
                except Exception as err:  # the client fails with this line; an engine that died ends the server
                    connection.send(("error", f"{type(err).__name__}: {err}"))
                    if type(err).__name__ in ("EngineDeadError", "EngineGenerateError"):
                        return False
                    continue
                busy += time.monotonic() - started
                calls, samples = calls + 1, samples + sum(len(o) for o in outputs)
                connection.send(("ok", outputs))
        finally:
            if calls:
                say(f"engine: served a stage: {calls} call(s), {samples} samples, generation {busy:.1f} s")

    def chat(self, prompts, sampling, enable_thinking: bool, adapter: str | None, reference_topk: int):
        self.wake()
        generator = self.generator
        if hasattr(generator, "use_adapter"):
            generator.use_adapter(adapter)
        elif adapter is not None:
            raise SharedEngineError(f"the {generator.name} engine serves no LoRA adapter")
        generator.reference_topk = reference_topk  # per call, within the engine's max_logprobs
        return generator.chat(prompts, sampling, enable_thinking=enable_thinking)

    def sleep(self) -> None:
        if self.generator is None or not self.awake:
            return
        if hasattr(self.generator, "sleep"):
            self.generator.sleep()
        self.awake = False

    def wake(self) -> None:
        if not self.awake and hasattr(self.generator, "wake"):
            self.generator.wake()
        self.awake = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinksafe engine", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry name, hub id or model dir (the run's base model)")
    parser.add_argument("--model-type", default=None, help="the model's family (default: the registry's)")
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--backend", default="vllm", choices=("vllm", "transformers"))
    parser.add_argument("--max-lora-rank", type=int, default=0, help="0: no LoRA; else the largest adapter rank")
    parser.add_argument("--reference-topk", type=int, default=0, help="the largest top-k a stage may ask for")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile, no CUDA graphs")
    parser.add_argument("--seed", type=int, default=42, help="the engine's seed (the stages' default sampling seed)")
    parser.add_argument("--lazy", action="store_true", help="start the engine when the first stage connects")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = bytes.fromhex(os.environ[KEY_ENV])
    # vLLM's engine core in this process: the server is already the engine's own process, and a second
    # one (spawned: imports, CUDA initialisation) would add its cold start to every run's first stage
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # the socket first: a stage may connect while the engine starts, and waits for its first answer
    with Listener(args.socket, "AF_UNIX", authkey=key) as listener:
        EngineServer(lambda: build_engine(args), lazy=args.lazy).serve(listener)
    return 0


def build_engine(args):
    """The generator the stages would build for this model, plus what a stage checks before using it."""
    # deferred: torch and the engines load in the server only; the pipeline imports this module light
    from thinksafe.engines import BackendChoice, make_generator
    from thinksafe.model_loading import default_device, resolve_model_path  # deferred: as above
    from thinksafe.registry import resolve_model  # deferred: as above

    spec = resolve_model(args.model, model_type=args.model_type)
    on_gpu = default_device() == "cuda"
    options = {"seed": args.seed, "reference_topk": args.reference_topk}
    if args.backend == "vllm":
        options |= {"enable_lora": args.max_lora_rank > 0, "max_lora_rank": max(args.max_lora_rank, 16),
                    "enforce_eager": args.enforce_eager or not on_gpu, "enable_sleep_mode": on_gpu}
    started = time.monotonic()
    choice = BackendChoice(args.backend, "the pipeline's shared engine")
    generator = make_generator(spec.source, spec.family, choice, **options)
    startup_s = time.monotonic() - started
    info = {"model": model_identity(resolve_model_path(spec.source)), "family": spec.family.name,
            "backend": generator.name, "max_lora_rank": options.get("max_lora_rank", 0) if args.max_lora_rank else 0,
            "reference_topk": args.reference_topk, "seed": args.seed, "startup_s": startup_s, "pid": os.getpid(),
            "per_request_seed": getattr(generator, "per_request_seed", False),
            **{name: getattr(generator, name, None) for name in SERVED_OPTIONS}}
    lora = f", LoRA up to rank {info['max_lora_rank']}" if info["max_lora_rank"] else ""
    say(f"engine: {spec.source} on {generator.name} started in {startup_s:.1f} s{lora}"
        f"{', sleeps between stages' if options.get('enable_sleep_mode') else ''}")
    return generator, info


def model_identity(path: str) -> str:
    """A local model dir by its real path (a registry name and the path an adapter names are one model)."""
    return os.path.realpath(path) if Path(path).is_dir() else path


# --- a stage's side ---------------------------------------------------------------------------------


class SharedGenerator:
    """The `Generator` interface over the pipeline's shared engine; `adapter` goes with every call."""

    def __init__(self, connection, info: dict, adapter: str | None, reference_topk: int, waited_s: float):
        self.connection = connection
        self.info = info
        self.adapter = adapter
        self.reference_topk = reference_topk
        self.name = info["backend"]
        self.reason = f"the pipeline's shared engine (pid {info['pid']}, started once in {info['startup_s']:.1f} s)"
        self.startup_s = waited_s  # this stage's start-up: the wait for the engine (its start, if still under way)

    def chat(self, prompts: list[str], sampling, enable_thinking: bool = True, progress=None) -> list[list]:
        if not prompts:
            return []
        outputs = self.request("chat", prompts, sampling, enable_thinking, self.adapter, self.reference_topk)
        if progress is not None:
            progress.update(sum(len(samples) for samples in outputs))
        return outputs

    def request(self, kind: str, *args):
        try:
            self.connection.send((kind, *args))
            status, value = self.connection.recv()
        except (EOFError, OSError) as err:
            raise SharedEngineError(f"the shared engine (pid {self.info['pid']}) went away ({type(err).__name__}); "
                                    "what was generated is kept: rerun the same command to resume") from None
        if status != "ok":
            raise SharedEngineError(f"the shared engine failed: {value}; rerun the same command to resume")
        return value

    def close(self) -> None:
        """Hand the engine back (it sleeps until the next stage): the guard may need the GPU now."""
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()


def advertised() -> dict | None:
    value = os.environ.get(SOCKET_ENV)
    return json.loads(value) if value else None


def shared_generator(model_source: str, backend: str, kwargs: dict) -> SharedGenerator | None:
    """The shared engine, when the pipeline started one and it serves this request; else None (the
    caller starts its own engine), with one line saying why when one was there."""
    server = advertised()
    if server is None:
        return None
    started = time.monotonic()
    try:
        connection = connect(server)
        connection.send(("info",))
        _, info = connection.recv()  # answered once the engine is up: the wait is this stage's start-up
    except (OSError, EOFError, SharedEngineError) as err:
        say(f"shared engine unavailable ({err or type(err).__name__}; its log: {server['log']}): "
            "starting this stage's own engine")
        return None
    why = not_served(info, model_source, backend, kwargs)
    if why:
        connection.close()
        say(f"shared engine not used: {why}; starting this stage's own engine")
        return None
    waited = time.monotonic() - started
    say(f"shared engine: {model_source}{' + adapter ' + str(kwargs['adapter']) if kwargs.get('adapter') else ''} "
        f"served by the pipeline's engine (waited {waited:.1f} s for it)")
    return SharedGenerator(connection, info, kwargs.get("adapter"), kwargs.get("reference_topk", 0), waited)


def connect(server: dict):
    """Connect once the server's socket exists; fail when its process is gone or it never appears."""
    deadline = time.monotonic() + SOCKET_WAIT_S
    while not Path(server["socket"]).exists():
        if not process_alive(server["pid"]):
            raise SharedEngineError(f"the engine process {server['pid']} has exited")
        if time.monotonic() > deadline:
            raise SharedEngineError(f"no socket at {server['socket']} after {SOCKET_WAIT_S:.0f} s")
        time.sleep(0.2)
    return Client(server["socket"], "AF_UNIX", authkey=bytes.fromhex(os.environ[KEY_ENV]))


def not_served(info: dict, model_source: str, backend: str, kwargs: dict) -> str | None:
    """Why the shared engine cannot answer as the stage's own engine would; None when it can."""
    from thinksafe.model_loading import resolve_model_path  # deferred: the pipeline imports this module light

    if backend != info["backend"]:
        return f"this stage generates with {backend}, the engine is {info['backend']}"
    if model_identity(resolve_model_path(model_source)) != info["model"]:
        return f"it serves {info['model']}, not {model_source}"
    if kwargs.get("adapter") and kwargs.get("max_lora_rank", 0) > info["max_lora_rank"]:
        return f"the adapter needs LoRA rank {kwargs['max_lora_rank']}, the engine serves up to {info['max_lora_rank']}"
    if kwargs.get("reference_topk", 0) > info["reference_topk"]:
        return f"top-{kwargs['reference_topk']} asked for, the engine returns at most {info['reference_topk']}"
    if not info["per_request_seed"] and kwargs.get("seed", info["seed"]) != info["seed"]:
        return f"seed {kwargs['seed']}: the engine's seed ({info['seed']}) seeds its samples here"
    for name in SERVED_OPTIONS:
        if kwargs.get(name) is not None and info.get(name) is not None and kwargs[name] != info[name]:
            return f"{name} {kwargs[name]} asked for, the engine runs {info[name]}"
    return None


# --- the pipeline's side -------------------------------------------------------------------------------


class EngineProcess:
    """The server process the pipeline starts and stops, its own lines on the terminal as `[engine] ...`."""

    def __init__(self, args: list[str], log: Path, env: dict):
        self.directory = Path(tempfile.mkdtemp(prefix="thinksafe-engine-"))  # private (0700); socket paths are short
        self.socket = self.directory / "engine.sock"
        self.key = secrets.token_hex(16)
        self.log = log
        cmd = thinksafe_cmd("engine", *args, "--socket", str(self.socket))
        self.relay = Relay(prefix="[engine] ")
        env = {**env, KEY_ENV: self.key}
        env.pop(SOCKET_ENV, None)
        with open_log(log, cmd) as handle:
            try:
                self.process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.relay.env(env),
                                                pass_fds=(self.relay.fd,))
            finally:
                self.relay.child_started()
        TERMINAL.line(f"[engine] started for the run's stages (pid {self.process.pid}; log: {log})")

    def environment(self) -> dict:
        """What a stage needs to find and use the server."""
        value = {"socket": str(self.socket), "pid": self.process.pid, "log": str(self.log)}
        return {SOCKET_ENV: json.dumps(value), KEY_ENV: self.key}

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Ask the server to stop its engine in order; terminate it (then kill it) when it has not within
        STOP_WAIT_S. The asking runs beside: a stage still connected (the pipeline interrupted under it)
        keeps the server from answering, and the pipeline must not wait on that."""
        try:
            if self.alive():
                threading.Thread(target=self._ask_to_stop, name="engine-stop", daemon=True).start()
                try:
                    self.process.wait(STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    self.process.terminate()  # SIGTERM: the server unwinds and stops its engine (thinksafe.interrupt)
                    try:
                        self.process.wait(STOP_WAIT_S)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                        self.process.wait()
        finally:
            self.relay.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _ask_to_stop(self) -> None:
        try:
            with Client(str(self.socket), "AF_UNIX", authkey=bytes.fromhex(self.key)) as connection:
                connection.send(("stop",))
                connection.recv()
        except (OSError, EOFError):  # not listening yet, or gone: stop() terminates it
            pass
