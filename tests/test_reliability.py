"""Concurrency, interruption, file modes and the limits checked up front (issue 28).

Each section is one numbered case of the issue; every test here failed on 62be01f. The fault
injection (kills at random points, reruns, concurrent commands) is tests/test_faults.py.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    FAST_EVAL,
    FAST_TRAIN,
    ROOT,
    one_line_error,
    run_cli,
    train_paths,
    train_rows,
    write_rows,
)

from thinksafe.locks import lock_path, writer_lock

SYNTH = ["--model-type", "qwen", "--guard", "refusal-judge", "--backend", "transformers", "--device", "cpu",
         "--max-new-tokens", "4", "--samples-per-prompt", "1"]


def prompts_file(path: Path, n: int = 2) -> Path:
    return write_rows(path, [{"instruction": f"question {i}", "label": "vanilla_benign" if i % 2 else
                              "vanilla_harmful"} for i in range(n)])


def hold_lock(directory: Path, what: str = "run directory") -> subprocess.Popen:
    """Another command holding `directory`'s writer lock: a process that takes it and waits."""
    code = ("import sys, time; from thinksafe.locks import writer_lock\n"
            f"with writer_lock({str(directory)!r}, {what!r}):\n"
            "    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


# --- 1. one writer per run directory and per data directory ----------------------------------


def test_1_a_second_train_on_a_held_run_is_refused_naming_the_holder(tiny_qwen3, tmp_path, output_root, capsys,
                                                                       no_model_load):

    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    run_dir = train_paths(tiny_qwen3, dataset).run_dir
    holder = hold_lock(run_dir)
    try:
        code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN)
    finally:
        stop(holder)
    one_line_error(code, err, f"run directory {run_dir} is in use by pid {holder.pid} ({sys.executable} -c ", "writer_lock")
    assert not run_dir.exists()  # refused before anything in it was touched


def test_1_a_second_synthesize_and_evaluate_and_merge_are_refused(tiny_qwen3, tmp_path, output_root, capsys,
                                                                   no_model_load):
    out = tmp_path / "data"
    holder = hold_lock(out, "--out")
    try:
        code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--prompts",
                               str(prompts_file(tmp_path / "p.jsonl")), "--out", str(out), *SYNTH)
        one_line_error(code, err, f"--out {out} is in use by pid {holder.pid}")
        assert not out.exists()
    finally:
        stop(holder)
    task_dir = output_root / "results" / "r" / "xstest"
    holder = hold_lock(task_dir, "results directory")
    try:
        code, _, err = run_cli(capsys, "evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen",
                               "--run-name", "r", *FAST_EVAL)
        one_line_error(code, err, f"results directory {task_dir} is in use by pid {holder.pid}")
        assert not task_dir.exists()
    finally:
        stop(holder)
    run_dir = output_root / "runs" / "some-run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    holder = hold_lock(run_dir)
    try:
        code, _, err = run_cli(capsys, "merge", str(run_dir))
        one_line_error(code, err, f"run directory {run_dir} is in use by pid {holder.pid}")
    finally:
        stop(holder)


def test_1_a_second_pipeline_on_the_same_run_is_refused(output_root, capsys, monkeypatch):
    import thinksafe.pipeline as pipeline
    from thinksafe.plan import resolve_plan

    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("a stage ran"))
    plan = resolve_plan({"devices": "cpu", "model_type": "demo"})
    holder = hold_lock(plan.paths.run_dir)
    try:
        code, _, err = run_cli(capsys, "pipeline", "cpu", "demo")
    finally:
        stop(holder)
    one_line_error(code, err, f"is in use by pid {holder.pid}")


def test_1_a_lock_left_by_a_killed_holder_is_taken_over_with_a_line(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r"
    holder = hold_lock(run_dir)
    holder.kill()  # SIGKILL: no cleanup; the kernel drops its flock, its record stays in the file
    holder.wait(timeout=10)
    assert str(holder.pid) in lock_path(run_dir).read_text()
    with writer_lock(run_dir, "run directory"):
        assert str(os.getpid()) in lock_path(run_dir).read_text()
    err = capsys.readouterr().err
    assert f"taking over the lock left by pid {holder.pid}" in err and "no longer running" in err
    assert not lock_path(run_dir).exists()  # a clean exit leaves no lock file


def test_1_the_pipelines_stages_write_under_its_lock(tmp_path):
    """A child started by the lock's holder (a pipeline stage) is not refused; an unrelated one is."""
    run_dir = tmp_path / "runs" / "r"
    child = ("import sys; from thinksafe.locks import writer_lock\n"
             f"with writer_lock({str(run_dir)!r}, 'run directory'): print('wrote')")
    with writer_lock(run_dir, "run directory"):
        inherited = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT)
        env = {k: v for k, v in os.environ.items() if k != "THINKSAFE_LOCK_HOLDER"}
        stranger = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, env=env)
    assert inherited.returncode == 0 and inherited.stdout.strip() == "wrote", inherited.stderr
    assert stranger.returncode != 0 and f"is in use by pid {os.getpid()}" in stranger.stderr


# --- 3. files honour the umask, weights included ---------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_3_weights_follow_the_umask(umask, tiny_qwen3, tmp_path, output_root, capsys):

    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    previous = os.umask(umask)
    try:
        assert run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN)[0] == 0
        paths = train_paths(tiny_qwen3, dataset)
        assert run_cli(capsys, "merge", str(paths.run_dir))[0] == 0
    finally:
        os.umask(previous)
    weights = [*paths.adapter.glob("*.safetensors"), *paths.checkpoints.glob("checkpoint-*/*.safetensors"),
               *paths.merged.glob("*.safetensors")]
    assert {p.parent.name for p in weights} >= {"adapter", "merged"} and any("checkpoint-" in str(p) for p in weights)
    for path in weights:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for directory in (paths.adapter, paths.merged):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask, directory


# --- 4. the token budget against the model's context, before any engine ----------------------


def test_4_a_budget_over_the_context_is_one_line_before_the_engine(tiny_qwen3, tmp_path, output_root, capsys,
                                                                   monkeypatch, no_model_load):
    import thinksafe.engines as engines

    monkeypatch.setattr(engines, "VLLMGenerator", lambda *a, **k: pytest.fail("the engine started"))
    prompts = prompts_file(tmp_path / "p.jsonl")
    args = [a for a in SYNTH if a not in ("transformers",)]
    args[args.index("--backend") + 1:args.index("--backend") + 1] = ["vllm"]
    args[args.index("--max-new-tokens") + 1] = "100000000"
    code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--prompts", str(prompts),
                           "--out", str(tmp_path / "data"), *args)
    line = one_line_error(code, err, "--max-new-tokens 100000000", "40960 tokens (max_position_embeddings")
    assert "lower --max-new-tokens to at most" in line
    assert not (tmp_path / "data").exists()
    code, _, err = run_cli(capsys, "evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "r",
                           *[a if a != "4" else "40960" for a in FAST_EVAL])
    one_line_error(code, err, "xstest: --max-new-tokens 40960 + the longest prompt", "40960 tokens")


# --- 5. a non-UTF-8 --config or THINKSAFE_RECIPE ----------------------------------------------


@pytest.mark.parametrize("stage", ["train", "synthesize", "evaluate"])
@pytest.mark.parametrize("route", ["--config", "THINKSAFE_RECIPE"])
def test_5_a_non_utf8_config_file_is_one_line(stage, route, tiny_qwen3, tmp_path, output_root, capsys, monkeypatch,
                                              no_model_load):
    config = tmp_path / "recipe.yaml"
    config.write_bytes(b"sft:\n  learning_rate: 1e-4\n# caf\xe9\n")
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    argv = {"train": ["train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN],
            "synthesize": ["synthesize", "--model", str(tiny_qwen3), "--prompts",
                           str(prompts_file(tmp_path / "p.jsonl")), "--out", str(tmp_path / "d"), *SYNTH],
            "evaluate": ["evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "r",
                         *FAST_EVAL]}[stage]
    if route == "--config":
        argv += ["--config", str(config)]
    else:
        monkeypatch.setenv("THINKSAFE_RECIPE", str(config))
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, f"{config}:3: not UTF-8 text", "save the file as UTF-8")


# --- 6. --report-to wandb whose server rejects the key or is out of reach ---------------------


class _Rejects(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.send_response(401)
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

    def log_message(self, *args):
        pass


@pytest.fixture()
def rejecting_wandb(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Rejects)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")  # 40 characters, fake
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_6_wandb_rejecting_the_key_is_one_line_before_the_model(stage, rejecting_wandb, tiny_qwen3, tmp_path,
                                                                 output_root, capsys, no_model_load):
    pytest.importorskip("wandb")
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    options = [a if a != "none" else "wandb" for a in (FAST_TRAIN if stage == "train" else FAST_EVAL)]
    argv = (["train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *options] if stage == "train" else
            ["evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "r", *options])
    started = time.time()
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, "--report-to wandb:", "rejected the API key (HTTP 401)", "--report-to offline")
    assert time.time() - started < 30
    assert not output_root.exists() or not any(output_root.rglob("run_record.json"))  # no run folder begun


def test_6_wandb_out_of_reach_is_one_line(monkeypatch, tiny_qwen3, tmp_path, output_root, capsys, no_model_load):
    pytest.importorskip("wandb")
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    options = [a if a != "none" else "wandb" for a in FAST_TRAIN]
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *options)
    one_line_error(code, err, f"cannot reach http://127.0.0.1:{port}", "--report-to offline")


# --- 7. Ctrl-C / SIGTERM around generation (the real vLLM engine: tests/test_faults.py) -------


# --- 8. an unknown key is blamed on the file that holds it -------------------------------------


def test_8_an_unknown_key_in_thinksafe_recipe_names_that_file(tmp_path, output_root, capsys, monkeypatch,
                                                              no_model_load):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("sft:\n  learning_rat: 1e-4\n")
    monkeypatch.setenv("THINKSAFE_RECIPE", str(recipe))
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    code, _, err = run_cli(capsys, "train", "--model", "demo", "--dataset", str(dataset), *FAST_TRAIN)
    line = one_line_error(code, err, f"THINKSAFE_RECIPE={recipe}: unknown option(s) learning_rat")
    assert "configs/recipes/demo" not in line


# --- 9. a hub dataset with the hub out of reach: one probe, one line ---------------------------


@pytest.fixture()
def hub_out_of_reach(monkeypatch):
    import datasets
    import huggingface_hub

    probes = []

    def unreachable(self, repo_id, timeout=None, **kwargs):
        probes.append((repo_id, timeout))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the load (and its retries) ran"))
    return probes


def test_9_an_unreachable_hub_dataset_is_one_probe_and_one_line(hub_out_of_reach, tiny_qwen3, tmp_path, output_root,
                                                                 capsys, no_model_load):
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", "nobody/some-dataset",
                           *FAST_TRAIN)
    one_line_error(code, err, "cannot reach the hub to load the dataset nobody/some-dataset", "HF_HUB_OFFLINE=1")
    code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--prompts", "nobody/prompts",
                           "--out", str(tmp_path / "d"), *SYNTH)
    one_line_error(code, err, "cannot reach the hub to load the dataset nobody/prompts", "HF_HUB_OFFLINE=1")
    code, _, err = run_cli(capsys, "evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "r",
                           *[a if a != "bundled" else "hub" for a in FAST_EVAL])
    one_line_error(code, err, "cannot reach the hub to load the dataset", "xstest")
    assert [timeout for _, timeout in hub_out_of_reach] == [10, 10, 10]


# --- 10. eval.sh on a run that was never trained -----------------------------------------------


def test_10_eval_only_on_an_untrained_run_says_so(output_root, capsys, monkeypatch):
    import thinksafe.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_tasks_on_devices", lambda tasks, devices: [(t, 0) for t in tasks])
    monkeypatch.setattr(pipeline, "report", lambda: None)
    code, out, _ = run_cli(capsys, "pipeline", "cpu", "demo", "--eval-only")
    assert code == 0
    assert "no trained run at" in out and "evaluating the base model only" in out


# --- 11. a malformed prompts file names its line ------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_11_a_malformed_prompts_file_names_its_line(suffix, tiny_qwen3, tmp_path, capsys, no_model_load):
    prompts = tmp_path / f"p{suffix}"
    prompts.write_text('{"instruction": "a", "label": "vanilla_benign"}\n{"instruction": "b", "label": \n')
    code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--prompts", str(prompts),
                           "--out", str(tmp_path / "d"), *SYNTH)
    one_line_error(code, err, f"{prompts}:2: not valid JSON")


# --- 12. a read-only tokenisation cache ------------------------------------------------------------


def test_12_a_read_only_tokenisation_cache_names_the_cache_and_the_fix(tiny_qwen3, tmp_path, output_root, capsys,
                                                                        monkeypatch, no_model_load):
    import datasets

    def read_only(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(path) / "data-00000-of-00001.arrow"))

    monkeypatch.setenv("THINKSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", read_only)
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN)
    one_line_error(code, err, f"cannot write the tokenisation cache {tmp_path / 'cache' / 'tokenized'}",
                   "Read-only file system", "set THINKSAFE_CACHE to a writable directory")


# --- 13. an empty synthesis says where its responses went ---------------------------------------


def test_13_an_empty_synthesis_counts_what_was_judged(tiny_qwen3, tmp_path):
    from test_synthesize import ScriptedGenerator, _config, _tokenizer, write_prompts

    from thinksafe.errors import ThinksafeError
    from thinksafe.synthesize import synthesize

    cfg = _config(tmp_path, write_prompts(tmp_path / "p.jsonl"), family="demo", keep_unfinished_benign=True)
    generator = ScriptedGenerator(_tokenizer(tiny_qwen3), cfg.model.family, finished=False)
    with pytest.raises(ThinksafeError) as raised:
        synthesize(cfg, generator=generator)
    message = str(raised.value)
    stats = json.loads((cfg.out / "stats.json").read_text())
    judged = stats["unfinished_benign"]["judged"]
    assert judged > 0 and "kept 0 of 0 responses" not in message
    assert f"the guard kept 0 of the 0 complete responses it judged ({stats['generated']['total']} generated" in message
    assert f"the {judged} unfinished benign responses judged for the KL term" in message


def test_1_a_command_refused_just_after_the_holder_took_the_lock_still_names_it(tmp_path):
    """The holder writes its record just after taking the lock (and a dead holder's record may still be
    there): a command refused in that moment waits for the record rather than naming `pid ?` (seen in
    CI when two synthesis commands started at once)."""
    import fcntl
    import json
    import os
    import socket

    from thinksafe.locks import DirectoryInUse

    directory = tmp_path / "data"
    directory.mkdir()
    path = lock_path(directory)
    # a lock file left by a holder that died, then taken by a live one that has not written yet
    path.write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(), "command": "dead one"}) + "\n")
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "thinksafe synthesize"})
    writer = threading.Timer(0.3, lambda: (os.ftruncate(fd, 0), os.pwrite(fd, (record + "\n").encode(), 0)))
    writer.start()
    try:
        with pytest.raises(DirectoryInUse, match=rf"in use by pid {os.getpid()} \(thinksafe synthesize\)"):
            with writer_lock(directory, "--out"):
                pass
    finally:
        writer.join()
        os.close(fd)
