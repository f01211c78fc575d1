"""Data-parallel generation on a local Ray (thinksafe.replicas), on this CPU with the transformers
backend and a tiny random model: two replicas generate what one does, in the input order; a replica
killed mid-run loses only the calls it held, named in the error, and the rerun generates exactly
those; a replica whose engine raises is reported with its shard; a command leaves no Ray process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("ray")

from replica_helpers import failing_generator, stalling_generator  # noqa: E402

from thinksafe.engines import BackendChoice, make_generator  # noqa: E402
from thinksafe.io import ResumableLog, read_jsonl  # noqa: E402
from thinksafe.registry import FAMILIES  # noqa: E402
from thinksafe.replicas import CALLS_PER_REPLICA, GeneratorReplicas, Layout, ReplicaFailure  # noqa: E402
from thinksafe.resumable import generate_missing, sample_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILY = FAMILIES["qwen"]
GREEDY = FAMILY.sampling.replace(temperature=0.0, max_new_tokens=6, n=1)
PROMPTS = [(f"p{i:02d}", f"question {i}: what is {i} plus {i}?") for i in range(16)]
CHUNK = 2  # prompts per call: 8 calls over the replicas
BACKEND = BackendChoice("transformers", "test")


def engine_kwargs(model: Path) -> dict:
    return {"model_source": str(model), "family": FAMILY, "backend": BACKEND, "device": "cpu", "batch_size": 4}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start is ~10-20 s on 2 cores); a short temp dir (socket paths)."""
    import ray
    import replica_helpers
    from ray import cloudpickle

    # the workers' Python does not have tests/ on its path: the helpers travel by value
    cloudpickle.register_pickle_by_value(replica_helpers)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # logical CPUs: each CPU replica asks for one, and a module-wide pool holds two while others start
    # and one logical GPU (none is there): replicas sharing a GPU are scheduled as on the H200
    ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, _temp_dir=temp)
    yield temp
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def start_pool(model: Path, factory=make_generator, replicas: int = 2) -> GeneratorReplicas:
    return GeneratorReplicas(factory, engine_kwargs(model), Layout(replicas, 1, 0, None, "test"))


@pytest.fixture(scope="module")
def pool(local_ray, tiny_qwen3):
    generators = start_pool(tiny_qwen3)
    yield generators
    generators.close()


@pytest.fixture(scope="module")
def one_engine(tiny_qwen3):
    return make_generator(**engine_kwargs(tiny_qwen3))


def generate(generator, log_path: Path) -> int:
    log = ResumableLog(log_path, key=lambda r: r["key"])

    def row(prompt_id, sample, _text, completion):
        return {"key": sample_key(prompt_id, sample), "text": completion.text, "num_tokens": completion.num_tokens}

    return generate_missing(generator, PROMPTS, GREEDY, log, row, CHUNK, "test")


def texts_by_key(log_path: Path) -> dict[str, str]:
    return {r["key"]: r["text"] for r in read_jsonl(log_path)}


def test_two_replicas_generate_what_one_engine_does_in_the_input_order(pool, one_engine, tmp_path):
    texts = [text for _, text in PROMPTS]
    assert pool.chat(texts, GREEDY) == one_engine.chat(texts, GREEDY)  # one call, split in two shards

    assert generate(pool, tmp_path / "two.jsonl") == len(PROMPTS)
    assert generate(one_engine, tmp_path / "one.jsonl") == len(PROMPTS)
    assert texts_by_key(tmp_path / "two.jsonl") == texts_by_key(tmp_path / "one.jsonl")
    assert min(pool.replicas.calls_done) > 0, "both replicas must have worked"


def named_prompts(message: str) -> set[str]:
    """The prompt ids a failure report names: 'N prompt(s) pA..pB' ranges and single 'prompt pA'."""
    ids = [prompt_id for prompt_id, _ in PROMPTS]
    named = set()
    for first, last in re.findall(r"prompt\(s\) (p\d+)\.\.(p\d+)", message):
        named.update(ids[ids.index(first): ids.index(last) + 1])
    named.update(re.findall(r"prompt (p\d+)", message))
    return named


def test_a_replica_killed_mid_run_loses_its_calls_in_flight_and_the_rerun_generates_exactly_those(
        local_ray, tiny_qwen3, pool, tmp_path):
    log_path, pid_file = tmp_path / "log.jsonl", tmp_path / "stalled.pid"
    stalling = start_pool(tiny_qwen3, partial(stalling_generator, "question 9:", str(pid_file)))

    def kill_the_stalled_replica():
        deadline = time.monotonic() + 300
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(int(pid_file.read_text()), 9)  # SIGKILL: the replica's process is gone, as on a lost node

    killer = threading.Thread(target=kill_the_stalled_replica)
    killer.start()
    try:
        with pytest.raises(ReplicaFailure) as failure:
            generate(stalling, log_path)
    finally:
        killer.join()
        stalling.close()
    logged = set(texts_by_key(log_path))
    missing = {prompt_id for prompt_id, _ in PROMPTS if sample_key(prompt_id, 0) not in logged}
    assert "p09" in missing and len(missing) <= CALLS_PER_REPLICA * CHUNK  # only the calls it held
    assert named_prompts(str(failure.value)) == missing  # the report names exactly what was lost
    assert "rerun" in str(failure.value)

    assert generate(pool, log_path) == len(missing)  # the rerun: exactly the missing rows
    rows = read_jsonl(log_path)
    assert len(rows) == len(PROMPTS) and len({r["key"] for r in rows}) == len(PROMPTS)  # no loss, no duplicate
    assert generate(pool, tmp_path / "whole.jsonl") == len(PROMPTS)
    assert texts_by_key(log_path) == texts_by_key(tmp_path / "whole.jsonl")  # as an uninterrupted run


def test_a_failing_replica_is_reported_with_its_shard_and_the_others_rows_are_kept(local_ray, tiny_qwen3, tmp_path):
    failing = start_pool(tiny_qwen3, partial(failing_generator, "question 5:"))
    try:
        with pytest.raises(ReplicaFailure) as failure:
            generate(failing, tmp_path / "log.jsonl")
    finally:
        failing.close()
    message = str(failure.value)
    assert re.search(r"replica [01] of 2 \(node .*, pid \d+\) failed holding 2 prompt\(s\) p04\.\.p05: "
                     r"RuntimeError: engine error on question 5:", message), message
    logged = set(texts_by_key(tmp_path / "log.jsonl"))
    assert logged == {sample_key(p, 0) for p, _ in PROMPTS} - {sample_key("p04", 0), sample_key("p05", 0)}


def ray_processes(temp_dir: str) -> list[str]:
    """Command lines of live processes of the Ray whose session lives in `temp_dir`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_synthesis_on_two_replicas_prints_start_up_apart_and_leaves_no_ray_process(tiny_qwen3, tmp_path):
    """The command starts its own local Ray (no cluster given) and stops it: raylet, GCS and the
    replicas' workers are gone when it returns."""
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "thinksafe", "synthesize", "--model", str(tiny_qwen3), "--model-type", "qwen",
           "--prompts", str(ROOT / "tests/data/smoke_prompts.jsonl"), "--guard", "refusal-judge",
           "--backend", "transformers", "--device", "cpu", "--data-parallel", "2", "--chunk-size", "2",
           "--max-new-tokens", "6", "--out", str(tmp_path / "data")]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        # a tiny random model never closes its think block: the set is refused (exit 2) after every phase ran
        assert done.returncode == 2 and "nothing to train on" in done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
        assert re.search(r"synthesize: generator start-up [\d.]+ s, generation [\d.]+ s; guard start-up", done.stdout)
        assert "2 replica(s)" in done.stdout + done.stderr
        generated = read_jsonl(tmp_path / "data" / "generations.partial.jsonl")
        assert len(generated) == len(read_jsonl(ROOT / "tests/data/smoke_prompts.jsonl"))
        assert list(Path(temp).rglob("session_*")), "the command's Ray did not run under RAY_TMPDIR"
        time.sleep(1)  # ray.shutdown returns once its processes are signalled
        assert ray_processes(temp) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_bad_data_parallel_values_are_one_line_and_exit_2(capsys):
    from thinksafe.cli import main

    for value in ("0", "two", "-1"):
        assert main(["synthesize", "--model", "demo", "--data-parallel", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --data-parallel must be a positive integer or auto, got '{value}'"]


def test_replicas_sharing_a_gpu_start_one_after_the_other(local_ray, tiny_qwen3):
    """Two vLLM engines profiling the free memory of one GPU at once failed on the H200: replicas that
    share a GPU (a fractional num_gpus) start in turn; Ray places both on the one (logical) GPU."""
    shared = GeneratorReplicas(make_generator, engine_kwargs(tiny_qwen3), Layout(2, 1, 0.5, 0.45, "test"))
    try:
        first, second = shared.replicas.info
        assert second["started_at"] >= first["ready_at"]
        assert first["gpus"] == second["gpus"] == "0"
    finally:
        shared.close()


def test_a_guard_on_two_replicas_gives_one_guards_verdicts_in_order(local_ray, tiny_qwen3):
    """The guard path (thinksafe.guards.backends.ReplicatedBackend): each judging chunk split over the
    replicas and put back in order; the verdicts are those of the in-process guard. A shard batches
    its rows with other neighbours than the whole chunk does, and a padded row's logits move in the
    last float bits with its batch (CI saw 0.46821133 against 0.46821146), so p_safe is compared to
    1e-6 and every other field exactly."""
    import dataclasses

    from thinksafe.guards import load_guard
    from thinksafe.guards.backends import ReplicatedBackend

    prompts = [f"question {i}: how do I do thing {i}?" for i in range(7)]
    responses = [f"answer {i}: " + ("I'm sorry, I cannot help." if i % 2 else "Here is how.") for i in range(7)]
    options = {"style": "llama-guard", "device": "cpu", "backend": "transformers", "batch_size": 2}
    replicated = load_guard(str(tiny_qwen3), data_parallel=2, **options)
    try:
        assert isinstance(replicated.backend, ReplicatedBackend)
        split = replicated.judge(prompts, responses)
        whole = load_guard(str(tiny_qwen3), **options).judge(prompts, responses)
        assert len(split) == len(whole) == len(prompts)
        for mine, theirs in zip(split, whole):
            assert mine.p_safe == pytest.approx(theirs.p_safe, abs=1e-6)
            assert dataclasses.replace(mine, p_safe=theirs.p_safe) == theirs
    finally:
        replicated.backend.close()


def test_sigterm_during_replicated_generation_unwinds_as_ctrl_c_and_leaves_no_ray_process(tiny_qwen3, tmp_path):
    """Ray's core worker installs its own SIGTERM handler in the driver (it logged and aborted: exit 134);
    the command keeps its own (thinksafe.interrupt): one line, exit 143, and the local Ray stopped."""
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "thinksafe", "synthesize", "--model", str(tiny_qwen3), "--model-type", "qwen",
           "--prompts", str(ROOT / "tests/data/smoke_prompts.jsonl"), "--guard", "refusal-judge",
           "--backend", "transformers", "--device", "cpu", "--data-parallel", "2", "--chunk-size", "1",
           "--samples-per-prompt", "256", "--max-new-tokens", "64", "--out", str(tmp_path / "data")]
    output = tmp_path / "output.txt"
    try:
        with output.open("w") as sink:
            proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
            deadline = time.monotonic() + 300
            while "started in" not in output.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
            time.sleep(2)  # generating on both replicas
            proc.terminate()
            code = proc.wait(timeout=120)
        text = output.read_text()
        assert code == 143, text[-3000:]
        assert "interrupted; rerun the same command to resume" in text
        assert list(Path(temp).rglob("session_*"))
        time.sleep(1)
        assert ray_processes(temp) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)
