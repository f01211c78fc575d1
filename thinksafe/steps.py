"""Running the pipeline's steps: each a `python -m thinksafe <stage>` subprocess whose whole output
goes to its log (appended under a dated header) and whose own lines (thinksafe.console) go to the
terminal; evaluation processes one per free device. `--verbose` / THINKSAFE_VERBOSE=1 streams a
step's whole output to the terminal too, as the stage prints it when run alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.console import TERMINAL, Relay, verbose_from_env
from thinksafe.errors import ThinksafeError

POLL_SECONDS = 2.0
FAILED_LOG_LINES = 15  # of a failed step's log, shown under its error line


class StepFailed(ThinksafeError):
    pass


def thinksafe_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "thinksafe", stage, *args]


def device_env(device: str | None) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def open_log(log: Path, cmd: list[str]):
    """Append to a step's log under a dated header: a rerun never erases the log of a finished run."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("a")
    handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
    handle.flush()
    return handle


def run_step(name: str, cmd: list[str], log: Path, env: dict | None = None, relay: bool = True) -> None:
    """Run one step into its log; its own lines (or, verbose, all its output) on the terminal.
    `relay` False: no console pipe (a launcher of several processes: only the start and end show)."""
    TERMINAL.line(f"\n[{name}] started; log: {log}")
    start = time.time()
    with open_log(log, cmd) as handle:
        if verbose_from_env():
            code = _tee(cmd, handle, env)
        elif relay:
            code = _quiet(cmd, handle, env, name)
        else:
            code = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env).wait()
    if code != 0:
        if not verbose_from_env():
            print(log_tail(log), file=sys.stderr, flush=True)
        raise StepFailed(f"{name} failed (exit {code}); log: {log}")
    TERMINAL.line(f"[{name}] done in {time.time() - start:.0f} s")


def _tee(cmd: list[str], handle, env: dict | None) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        handle.write(line)
    return proc.wait()


def _quiet(cmd: list[str], handle, env: dict | None, name: str) -> int:
    relay = Relay(prefix=f"[{name}] ")
    try:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=relay.env(env or dict(os.environ)),
                                pass_fds=(relay.fd,))
    finally:
        relay.child_started()
    try:
        return proc.wait()
    finally:
        relay.close()


def log_tail(log: Path, lines: int = FAILED_LOG_LINES) -> str:
    """The last lines of a step's log, for the terminal when the step failed."""
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join([f"--- last {len(tail)} lines of {log}:", *tail, "---"])


@dataclass
class Task:
    name: str
    model: str
    run_name: str
    log: Path
    extra: list[str] = field(default_factory=list)


def run_tasks_on_devices(tasks: list[Task], devices: list[str]) -> list[tuple[Task, int]]:
    """One evaluation process (a task or a comma list of tasks) per free device, the next as soon as
    one frees up; returns (task, exit code)."""
    pending = list(tasks)
    running: dict[str, tuple[Task, subprocess.Popen, float]] = {}
    results: list[tuple[Task, int]] = []
    relays: dict[str, Relay] = {}
    while pending or running:
        for device in devices:
            if device not in running and pending:
                task = pending.pop(0)
                cmd = thinksafe_cmd("evaluate", "--model", task.model, "--tasks", task.name,
                                    "--run-name", task.run_name, *task.extra)
                handle = open_log(task.log, cmd)
                relay = Relay(prefix=f"[eval {task.run_name} / {task.name}] ")
                try:
                    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                            env=relay.env(device_env(device)), pass_fds=(relay.fd,))
                finally:
                    relay.child_started()
                    handle.close()
                relays[device] = relay
                running[device] = (task, proc, time.time())
                TERMINAL.line(f"[eval] {task.run_name} / {task.name} started on {device} (log: {task.log})")
        time.sleep(POLL_SECONDS if running else 0)
        for device, (task, proc, started) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[device]
            relays.pop(device).close()
            results.append((task, code))
            status = "ok" if code == 0 else f"FAILED (exit {code})"
            TERMINAL.line(f"[eval] {task.run_name} / {task.name} {status} after {time.time() - started:.0f} s")
    return results
