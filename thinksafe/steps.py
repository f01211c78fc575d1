"""Running the pipeline's steps: each a `python -m thinksafe <stage>` subprocess whose output goes to
the console and to its log (appended under a dated header), evaluation processes one per free device."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from thinksafe.errors import ThinksafeError

POLL_SECONDS = 2.0


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


def run_step(name: str, cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run one step, its output both on the console (progress) and in its log file."""
    print(f"\n=== {name}: {' '.join(cmd)}\n    log: {log}", flush=True)
    start = time.time()
    with open_log(log, cmd) as handle:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            handle.write(line)
        code = proc.wait()
    if code != 0:
        raise StepFailed(f"{name} failed (exit {code}); log: {log}")
    print(f"=== {name}: done in {time.time() - start:.0f} s", flush=True)


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
    while pending or running:
        for device in devices:
            if device not in running and pending:
                task = pending.pop(0)
                cmd = thinksafe_cmd("evaluate", "--model", task.model, "--tasks", task.name,
                                    "--run-name", task.run_name, *task.extra)
                handle = open_log(task.log, cmd)
                proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=device_env(device))
                handle.close()
                running[device] = (task, proc, time.time())
                print(f"[eval] {task.run_name} / {task.name} started on {device} (log: {task.log})", flush=True)
        time.sleep(POLL_SECONDS if running else 0)
        for device, (task, proc, started) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[device]
            results.append((task, code))
            status = "ok" if code == 0 else f"FAILED (exit {code})"
            print(f"[eval] {task.run_name} / {task.name} {status} after {time.time() - started:.0f} s", flush=True)
    return results
