"""Fault injection at tiny scale (issue 28): kill synthesis, training and evaluation at random
points with SIGKILL, SIGINT and SIGTERM, rerun, and compare with an uninterrupted run.

Each stage runs as the real command (`python -m thinksafe <stage>`) on a tiny random model. A kill
lands at a random point drawn from a seeded RNG: after a random number of rows reached the stage's
resumable log (or, for training, a random number of checkpoints), plus a random delay. After every
kill: the process ended by that signal (SIGINT 130, SIGTERM 143, each with the one interruption
line), no process of the run is left (each carries a marker in its environment, looked for in
/proc), and every line of every JSONL file is whole. After the last rerun: no row lost or
duplicated, and the outputs equal the uninterrupted run's (same seeds). Two concurrent commands on
one directory: one refused (exit 2) at once, the other's output unaffected.

The counts (kills, reruns, rows checked) are printed in pytest's closing summary (tests/conftest.py),
as CI runs it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
INTERRUPTED = "interrupted; rerun the same command to resume"
SEED = 28  # the RNG that places the kills
KILLS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)
EXIT = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}
COUNTS = {"kills": 0, "reruns": 0, "rows_checked": 0, "refused": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("faults-tiny"))


@pytest.fixture(scope="module")
def rng() -> random.Random:
    return random.Random(SEED)


def env_for(root: Path, mark: str) -> dict:
    return {**os.environ, "THINKSAFE_OUTPUT_DIR": str(root), "THINKSAFE_CACHE": str(root / "cache"),
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
            "THINKSAFE_CPU_THREADS": "1",  # one thread: the same float sums in every run (identical samples)
            "THINKSAFE_FAULT_MARK": mark}


def start(argv: list[str], root: Path, mark: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "thinksafe", *argv], cwd=ROOT, env=env_for(root, mark),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def processes_with(mark: str) -> list[int]:
    """Live processes whose environment carries `mark` (a run's processes, orphans included)."""
    found = []
    needle = f"THINKSAFE_FAULT_MARK={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_none_left(mark: str) -> None:
    deadline = time.time() + 5
    while processes_with(mark) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_with(mark), f"processes of the run outlived it: {processes_with(mark)}"


def finish(argv: list[str], root: Path, mark: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = start(argv, root, mark)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    assert_none_left(mark)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def in_process(argv: list[str], root: Path) -> None:
    """An uninterrupted reference run, in this process (a subprocess's start costs ~8 s of imports here),
    with the environment the killed runs get: the same seeds, one thread, so the same samples."""
    from thinksafe.cli import main

    saved = dict(os.environ)
    os.environ.update(env_for(root, "reference"))
    try:
        assert main(argv) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)


def count_lines(paths: list[Path]) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths if p.exists())


def kill_at_random(argv: list[str], root: Path, progress: list[Path], rng: random.Random, sig: int,
                   most: int, delay_s: float = 0.3) -> bool:
    """Run, and once `progress` files hold a random number (1..most) of lines, wait a random while
    and send `sig`. False when the command finished first (the kill missed)."""
    mark = uuid.uuid4().hex
    # counted from what the log held before: a rerun's first rows are the new ones
    target, delay = count_lines(progress) + rng.randint(1, most), rng.uniform(0.0, delay_s)
    proc = start(argv, root, mark)
    deadline = time.time() + 240
    while proc.poll() is None and count_lines(progress) < target and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]  # ended on its own: it must have finished, not failed
        return False
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    COUNTS["kills"] += 1
    assert proc.returncode == EXIT[sig], (sig, proc.returncode, err[-3000:])
    if sig != signal.SIGKILL:
        ours = [line for line in err.splitlines() if line == INTERRUPTED or line.startswith(("error:", "Traceback"))]
        assert ours == [INTERRUPTED], err[-3000:]
    assert_none_left(mark)
    return True


def assert_whole_jsonl(directory: Path, allow_torn_tail: bool) -> int:
    """Every line of every JSONL file under `directory` is one JSON object (a log killed mid-write
    may end in a torn line, which the rerun drops); returns the rows read."""
    rows = 0
    for path in directory.rglob("*.jsonl"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                assert isinstance(json.loads(line), dict)
                rows += 1
            except json.JSONDecodeError:
                assert allow_torn_tail and number == len(lines) and "partial" in path.name, f"{path}:{number}"
    return rows


def assert_unique_keys(path: Path, key) -> int:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [key(r) for r in rows]
    assert len(keys) == len(set(keys)), f"{path}: duplicated rows"
    return len(rows)


def kill_and_rerun(argv, root, progress, rng, most, delay_s: float = 0.3) -> None:
    """One kill by each signal at random points, a rerun after each (the last runs to the end)."""
    for sig in KILLS:
        hit = kill_at_random(argv, root, progress, rng, sig, most, delay_s)
        assert_whole_jsonl(root, allow_torn_tail=True)
        if not hit:  # finished before the kill: start over so that every signal lands mid-run
            pytest.fail(f"the command finished before the {signal.Signals(sig).name} landed: make the job larger")
        COUNTS["reruns"] += 1
    finish(argv, root, uuid.uuid4().hex)
    assert_whole_jsonl(root, allow_torn_tail=False)


# --- synthesis ---------------------------------------------------------------------------------


def prompts(path: Path, n: int) -> Path:
    rows = [{"instruction": f"Question number {i}: how do I do thing {i}?",
             "label": "vanilla_harmful" if i % 3 == 0 else "vanilla_benign"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synth_argv(tiny: Path, prompt_file: Path, out: Path) -> list[str]:
    return ["synthesize", "--model", str(tiny), "--model-type", "qwen", "--prompts", str(prompt_file),
            "--out", str(out), "--guard", "refusal-judge", "--backend", "transformers", "--device", "cpu",
            "--samples-per-prompt", "2", "--max-new-tokens", "24", "--chunk-size", "1", "--batch-size", "2",
            "--seed", "7"]


@pytest.fixture(scope="module")
def synth_reference(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """(prompts file, the uninterrupted run's data dir), shared by the synthesis tests."""
    base = tmp_path_factory.mktemp("synth-reference")
    prompt_file = prompts(base / "prompts.jsonl", 24)
    in_process(synth_argv(tiny, prompt_file, base / "data"), base)
    return prompt_file, base / "data"


def test_synthesis_killed_at_random_points_resumes_to_the_same_data(tiny, tmp_path, rng, synth_reference):
    prompt_file, reference_data = synth_reference
    root = tmp_path / "killed"
    out = root / "data"
    kill_and_rerun(synth_argv(tiny, prompt_file, out), root, [out / "generations.partial.jsonl"], rng, most=8)
    for name in ("train.jsonl", "generations.partial.jsonl"):
        assert (out / name).exists(), name
    generated = assert_unique_keys(out / "generations.partial.jsonl", lambda r: r["key"])
    assert generated == 24 * 2
    assert (out / "train.jsonl").read_text() == (reference_data / "train.jsonl").read_text()
    by_key = {json.loads(line)["key"]: json.loads(line)["response"]
              for line in (reference_data / "generations.partial.jsonl").read_text().splitlines()}
    resumed = {json.loads(line)["key"]: json.loads(line)["response"]
               for line in (out / "generations.partial.jsonl").read_text().splitlines()}
    assert resumed == by_key
    COUNTS["rows_checked"] += generated + count_lines([out / "train.jsonl"])


# --- training ----------------------------------------------------------------------------------


def train_argv(tiny: Path, dataset: Path) -> list[str]:
    return ["train", "--model", str(tiny), "--dataset", str(dataset), "--rank", "4", "--epochs", "4",
            "--effective-batch-size", "2", "--per-device-batch-size", "2", "--learning-rate", "1e-2",
            "--warmup-ratio", "0", "--max-length", "64", "--report-to", "none", "--device", "cpu",
            "--lora-dropout", "0", "--save_strategy", "steps", "--save_steps", "1"]  # a resume point per step


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_training_killed_at_random_points_resumes_to_the_same_adapter(tiny, tmp_path, rng):
    import numpy as np

    rows = [{"instruction": f"question {i}", "response": f"answer number {i}",
             "prompt_label": "vanilla_benign" if i % 2 else "vanilla_harmful", "response_label": "safe"}
            for i in range(16)]
    dataset = tmp_path / "set" / "t.jsonl"
    dataset.parent.mkdir()
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = tmp_path / "reference"
    in_process(train_argv(tiny, dataset), reference)
    (ref_run,) = [p for p in (reference / "runs").iterdir() if p.is_dir()]
    root = tmp_path / "killed"
    # progress: the checkpoints (one per step) written so far, as lines of a listing
    listing = root / "checkpoints.txt"

    def progress_files() -> list[Path]:
        runs = root / "runs"
        checkpoints = sorted(runs.glob("*/checkpoints/checkpoint-*/trainer_state.json")) if runs.exists() else []
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{p}\n" for p in checkpoints))
        return [listing]

    class Progress(list):
        def __iter__(self):
            return iter(progress_files())

    kill_and_rerun(train_argv(tiny, dataset), root, Progress(), rng, most=4, delay_s=0.1)  # ~20 steps/s
    (run,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    info = json.loads((run / "run_info.json").read_text())
    assert info["rows"] == 16
    ours, theirs = adapter_tensors(run), adapter_tensors(ref_run)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    COUNTS["rows_checked"] += info["rows"]


# --- evaluation --------------------------------------------------------------------------------


def eval_argv(tiny: Path) -> list[str]:
    return ["evaluate", "--model", str(tiny), "--model-type", "qwen", "--run-name", "faults", "--tasks", "xstest",
            "--data", "bundled", "--limit", "24", "--refusal-guard", "refusal-judge", "--backend", "transformers",
            "--n", "2", "--max-new-tokens", "24", "--chunk-size", "1", "--batch-size", "2", "--report-to", "none",
            "--device", "cpu"]


def comparable(metrics: dict) -> dict:
    drop = {"wall_time_s", "generation_s", "seconds", "timestamp", "created", "started", "finished"}
    return {k: v for k, v in metrics.items() if k not in drop and "time" not in k}


def test_evaluation_killed_at_random_points_resumes_to_the_same_results(tiny, tmp_path, rng):
    reference = tmp_path / "reference"
    in_process(eval_argv(tiny), reference)
    ref_task = reference / "results" / "faults" / "xstest"
    root = tmp_path / "killed"
    task = root / "results" / "faults" / "xstest"
    kill_and_rerun(eval_argv(tiny), root, [task / "generations.partial.jsonl"], rng, most=8)
    rows = assert_unique_keys(task / "generations.jsonl", lambda r: (r["id"], r["sample"]))
    assert rows == 24 * 2
    assert (task / "generations.jsonl").read_text() == (ref_task / "generations.jsonl").read_text()
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (task, ref_task))
    assert comparable(ours)["value"] == comparable(theirs)["value"] and ours["n"] == theirs["n"]
    COUNTS["rows_checked"] += rows


# --- two commands on one directory -------------------------------------------------------------


def test_two_synthesis_commands_on_one_out_one_refused_the_other_unaffected(tiny, tmp_path, synth_reference):
    """Both started at once, as two train_and_eval.sh were: whichever takes --out first runs, the
    other stops at once naming it; the set equals an uninterrupted run's, every sample once (the two
    used to log every sample twice into one generations.partial.jsonl)."""
    prompt_file, reference_data = synth_reference
    root = tmp_path / "both"
    out = root / "data"
    marks = [uuid.uuid4().hex, uuid.uuid4().hex]
    procs = [start(synth_argv(tiny, prompt_file, out), root, mark) for mark in marks]
    results = [(proc, *proc.communicate(timeout=240)) for proc in procs]
    (winner, _, _), = [r for r in results if r[0].returncode == 0]
    (loser, _, err), = [r for r in results if r[0].returncode != 0]
    assert loser.returncode == 2, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith(("error:", "Traceback"))]
    assert len(ours) == 1 and ours[0].startswith(f"error: --out {out} is in use by pid {winner.pid} ("), err[-3000:]
    assert f"(thinksafe synthesize --model {tiny} " in ours[0] and "wait for it to finish or stop it" in ours[0]
    for mark in marks:
        assert_none_left(mark)
    COUNTS["refused"] += 1
    assert (out / "train.jsonl").read_text() == (reference_data / "train.jsonl").read_text()
    generated = assert_unique_keys(out / "generations.partial.jsonl", lambda r: r["key"])
    assert generated == 24 * 2
    COUNTS["rows_checked"] += generated
    report_counts()


def report_counts() -> None:
    """The counts, for the session's summary (tests/conftest.py prints them, from an xdist worker too)."""
    import tempfile

    session = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
    line = (f"fault injection: {COUNTS['kills']} kills ({', '.join(s.name for s in KILLS)}, each at a random "
            f"point, seed {SEED}), {COUNTS['reruns']} reruns, {COUNTS['rows_checked']} rows checked, "
            f"{COUNTS['refused']} concurrent command(s) refused")
    print(f"\n{line}", flush=True)
    (Path(tempfile.gettempdir()) / f"thinksafe-faults-{session}.txt").write_text(line + "\n")


