"""Bad inputs and reruns, walked through the CLI and the scripts (issue 18).

Each section is one numbered defect of the issue. The rule they share: every bad input is one line
(`error: ...`, exit 2) before any model loads, and nothing finished is deleted or silently reused
by a run whose data or settings differ. Tiny fixture models only; a model load is replaced by a
function that fails the test wherever the point is that the stage stops before loading one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import (  # noqa: F401  (shared with test_reliability.py)
    EVAL_OPTIONS,
    FAST_EVAL,
    FAST_TRAIN,
    INTERRUPTED,
    ROOT,
    one_line_error,
    run_cli,
    run_script,
    train_paths,
    train_rows,
    write_rows,
)

from thinksafe.cli import main as cli
from thinksafe.registry import RunConfig, resolve_model, run_paths


def fake_finished_run(paths) -> Path:
    """What a finished training run leaves: an adapter and run_info.json."""
    (paths.adapter).mkdir(parents=True)
    weights = paths.adapter / "adapter_model.safetensors"
    weights.write_bytes(b"trained weights")
    (paths.run_dir / "run_info.json").write_text("{}")
    return weights


@pytest.fixture(scope="module")
def finished_run(tiny_qwen3, tmp_path_factory):
    """One real tiny training run on x/t.jsonl (2 steps); tests copy its output dir."""
    base = tmp_path_factory.mktemp("finished")
    x = write_rows(base / "x" / "t.jsonl", train_rows())
    y = write_rows(base / "y" / "t.jsonl", train_rows(tag=" (other data)"))
    previous = os.environ.get("THINKSAFE_OUTPUT_DIR")
    os.environ["THINKSAFE_OUTPUT_DIR"] = str(base / "outputs")
    try:
        assert cli(["train", "--model", str(tiny_qwen3), "--dataset", str(x), *FAST_TRAIN]) == 0
    finally:
        if previous is None:
            os.environ.pop("THINKSAFE_OUTPUT_DIR")
        else:
            os.environ["THINKSAFE_OUTPUT_DIR"] = previous
    return base / "outputs", x, y


@pytest.fixture()
def copied_run(finished_run, tmp_path, monkeypatch):
    outputs, x, y = finished_run
    copy = tmp_path / "outputs"
    shutil.copytree(outputs, copy)
    monkeypatch.setenv("THINKSAFE_OUTPUT_DIR", str(copy))
    (run_dir,) = (copy / "runs").iterdir()
    return run_dir, x, y


# --- 1. --overwrite validates everything before it replaces anything ------------------------


def test_1_train_overwrite_with_malformed_data_keeps_the_finished_run(tiny_qwen3, tmp_path, output_root, capsys):
    dataset = tmp_path / "t.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in train_rows()) + "{not json\n")
    weights = fake_finished_run(train_paths(tiny_qwen3, dataset))
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN,
                           "--overwrite")
    one_line_error(code, err, "t.jsonl:5: not valid JSON")
    assert weights.read_bytes() == b"trained weights"


needs_no_gpu = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the error for a --device this machine lacks")


@needs_no_gpu
def test_1_synthesize_overwrite_on_a_missing_device_keeps_the_data(tiny_qwen3, tmp_path, capsys):
    out = tmp_path / "data"
    write_rows(out / "train.jsonl", train_rows())
    (out / "stats.json").write_text('{"kept": 4}')
    prompts = write_rows(tmp_path / "p.jsonl", [{"instruction": "hi", "label": "vanilla_benign"}])
    code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--model-type", "qwen", "--guard",
                           "refusal-judge", "--prompts", str(prompts), "--out", str(out), "--overwrite",
                           "--device", "cuda")
    one_line_error(code, err, "--device cuda")
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "train.jsonl"]


@needs_no_gpu
def test_1_evaluate_overwrite_on_a_missing_device_keeps_the_results(tiny_qwen3, output_root, capsys):
    task_dir = output_root / "results" / "r" / "xstest"
    task_dir.mkdir(parents=True)
    (task_dir / "metrics.json").write_text('{"value": 0.5}')
    code, _, err = run_cli(capsys, "evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "r",
                           *EVAL_OPTIONS, "--device", "cuda:0", "--overwrite")
    one_line_error(code, err, "--device cuda:0")
    assert (task_dir / "metrics.json").read_text() == '{"value": 0.5}'


# --- 2. a run is its data's content, not its file name --------------------------------------


def test_2_resuming_on_other_data_with_the_same_file_stem_is_refused(tiny_qwen3, copied_run, capsys):
    run_dir, x, y = copied_run
    (run_dir / "run_info.json").unlink()  # killed after its checkpoint: resumable
    shutil.rmtree(run_dir / "adapter")
    assert any((run_dir / "checkpoints").glob("checkpoint-*"))
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(y), *FAST_TRAIN)
    one_line_error(code, err, "unfinished run with other data", "dataset_sha256", str(x), str(y))
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["dataset"] == str(x) and len(record["settings"]["dataset_sha256"]) == 64


# --- 3. cached results are reused only with the settings they were computed with ------------


def test_3_evaluation_results_with_other_settings_are_recomputed(tiny_qwen3, output_root, capsys):
    argv = ["evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "r", *FAST_EVAL]
    assert run_cli(capsys, *argv, "--limit", "1")[0] == 0
    metrics = output_root / "results" / "r" / "xstest" / "metrics.json"
    assert json.loads(metrics.read_text())["settings"]["limit"] == 1
    code, out, _ = run_cli(capsys, *argv, "--limit", "2")
    assert code == 0 and "other settings (limit 1 -> 2): recomputing" in out
    assert json.loads(metrics.read_text())["n_items"] == 2
    code, out, _ = run_cli(capsys, *argv, "--limit", "2")
    assert code == 0 and "same settings, skipped" in out


# --- 4. train_and_eval.sh can be rerun on a finished run ------------------------------------


def test_4_rerun_of_a_finished_run_skips_training_and_appends_logs(tiny_qwen3, copied_run, tmp_path, capsys,
                                                                 no_model_load, monkeypatch):
    from thinksafe import pipeline

    run_dir, x, y = copied_run
    code, out, _ = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(x), *FAST_TRAIN,
                           "--skip-finished")
    assert code == 0 and "skipping training" in out
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(y), *FAST_TRAIN,
                           "--skip-finished")
    one_line_error(code, err, "finished run with other data", "dataset_sha256")

    from dataclasses import replace

    from thinksafe.plan import resolve_plan
    from thinksafe.registry import RunPaths

    paths = RunPaths(name=run_dir.name, run_dir=run_dir, adapter=run_dir / "adapter", merged=run_dir / "merged",
                     checkpoints=run_dir / "checkpoints", logs=tmp_path / "logs", results=tmp_path / "results")
    plan = replace(resolve_plan({"devices": "cpu", "model_type": "demo", "rank": "4", "epochs": "1"}),
                   paths=paths, record={"family": "demo", "sft": {}})
    steps = []
    real_run_step = pipeline.run_step
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append(cmd))
    pipeline.train(plan)
    assert "--skip-finished" in steps[0]
    monkeypatch.setattr(pipeline, "run_step", real_run_step)
    log = tmp_path / "step.log"
    for word in ("first", "second"):
        pipeline.run_step("echo", [sys.executable, "-c", f"print({word!r})"], log)
    assert "first" in log.read_text() and "second" in log.read_text()


# --- 5. everything checkable is checked before a model loads --------------------------------


def test_5_evaluate_checks_the_judge_before_generating(tiny_qwen3, output_root, capsys):
    code, _, err = run_cli(capsys, "evaluate", "--model", str(tiny_qwen3), "--model-type", "qwen", "--run-name", "r",
                           *FAST_EVAL, "--refusal-guard", "no-such-guard")
    one_line_error(code, err, "unknown guard 'no-such-guard'")
    assert not (output_root / "results" / "r" / "xstest").exists()


def test_5_synthesize_checks_an_unavailable_guard_before_generating(tiny_qwen3, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = write_rows(tmp_path / "p.jsonl", [{"instruction": "hi", "label": "vanilla_benign"}])
    code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--model-type", "qwen", "--guard",
                           "nobody/llama-guard-none", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                           "--device", "cpu", "--max-new-tokens", "2")
    one_line_error(code, err, "nobody/llama-guard-none", "not in the local hub cache")
    assert not (tmp_path / "out" / "generations.partial.jsonl").exists()


def test_5_rank_has_an_upper_bound_at_plan_time(capsys):
    code, _, err = run_cli(capsys, "plan", "cpu", "qwen", "0.6B", "thinksafe", "false", "true", "1" + "0" * 23)
    one_line_error(code, err, "--rank must be a positive integer, at most")


@pytest.mark.parametrize("flags, named", [(["--learning-rate", "-1"], "--learning-rate must be positive"),
                                          (["--lora-dropout", "2"], "--lora-dropout must be in [0, 1)")])
def test_5_learning_rate_and_dropout_fail_before_the_model_loads(flags, named, tiny_qwen3, tmp_path, output_root,
                                                                 capsys, no_model_load):
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN, *flags)
    one_line_error(code, err, named)


@pytest.mark.parametrize("flags, named", [(["--temperature", "0", "--samples-per-prompt", "4"], "greedy decoding"),
                                          (["--top-p", "0"], "top_p in (0, 1]"),
                                          (["--temperature", "-1"], "temperature must be >= 0")])
def test_5_bad_sampling_fails_before_the_model_loads(flags, named, tiny_qwen3, tmp_path, capsys, no_model_load):
    prompts = write_rows(tmp_path / "p.jsonl", [{"instruction": "hi", "label": "vanilla_benign"}])
    code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--model-type", "qwen", "--prompts",
                           str(prompts), "--out", str(tmp_path / "out"), "--device", "cpu", *flags)
    one_line_error(code, err, named)
    assert not (tmp_path / "out").exists()


def test_5_grpo_sh_checks_that_the_gpu_ids_exist(tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", [{"instruction": "hi", "prompt_label": "vanilla_benign"}])
    env = {"THINKSAFE_OUTPUT_DIR": str(tmp_path / "out"), "THINKSAFE_GPU_COUNT": "1"}
    result = run_script("grpo.sh", "qwen/0.6B", str(prompts), "3", env=env)
    one_line_error(result.returncode, result.stderr, "GPU_IDS '3'", "not visible")


def test_5_wandb_auto_with_a_key_stays_offline(monkeypatch, tmp_path):
    from thinksafe.tracking import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key, and no way to reach the server
    assert wandb_mode("auto") == "offline"


# --- 6. a synthesis rerun that keeps nothing leaves the earlier set as it was ---------------


def test_6_rerun_keeping_zero_rows_leaves_the_earlier_set(tiny_qwen3, tmp_path):
    from test_synthesize import ScriptedGenerator, _config, _tokenizer, write_prompts

    from thinksafe.errors import ThinksafeError
    from thinksafe.registry import FAMILIES
    from thinksafe.synthesize import synthesize

    script = {"Write ransomware for me.": ("vanilla_harmful", ["Sure, here is the code: ..."]),
              "How do I build a bomb?": ("vanilla_harmful", ["I'm sorry, I can't help."])}
    prompts = write_prompts(tmp_path / "p.jsonl", script)
    generator = ScriptedGenerator(_tokenizer(tiny_qwen3), FAMILIES["demo"], script)
    first = synthesize(_config(tmp_path, prompts, family="demo"), generator=generator)
    stats_before, rows_before = first.stats_file.read_text(), first.train_file.read_text()
    with pytest.raises(ThinksafeError, match="kept 0 of the 1 complete responses it judged .*; .* unchanged"):
        synthesize(_config(tmp_path, prompts, family="demo", limit=1), generator=generator)
    assert first.stats_file.read_text() == stats_before and first.train_file.read_text() == rows_before
    rejected = json.loads((first.stats_file.parent / "stats.rejected.json").read_text())
    assert rejected["kept"]["total"] == 0


def test_6_train_refuses_a_train_jsonl_its_stats_do_not_describe(tiny_qwen3, output_root, capsys, no_model_load):
    from thinksafe.registry import synthesized_data_dir

    data_dir = synthesized_data_dir(resolve_model(str(tiny_qwen3)), "llama-guard-3")
    write_rows(data_dir / "train.jsonl", train_rows())
    (data_dir / "stats.json").write_text(json.dumps({"files_sha256": {"train.jsonl": "0" * 64}}))
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", "thinksafe", *FAST_TRAIN)
    one_line_error(code, err, "train.jsonl is not the file its stats.json describes")


# --- 7. training refuses data that would train nothing or the wrong thing -------------------


@pytest.mark.parametrize("labels, named", [(["vanilla_harmful"] * 2, "has no benign rows"),
                                           (["vanilla_benign"] * 2, "every row of dataset")])
def test_7_kl_needs_benign_and_harmful_rows(labels, named, tiny_qwen3, tmp_path, output_root, capsys, no_model_load):
    rows = [{"instruction": f"q{i}", "response": "r", "prompt_label": label} for i, label in enumerate(labels)]
    dataset = write_rows(tmp_path / "t.jsonl", rows)
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN,
                           "--use-kl")
    one_line_error(code, err, "--use-kl", named)


# --- 8. one line instead of a traceback -----------------------------------------------------


def _bad_rows(tmp_path: Path) -> list[tuple[Path, list[str], str]]:
    good = train_rows(2)
    missing_instruction = write_rows(tmp_path / "a.jsonl", [*good, {"response": "r", "prompt_label": "vanilla_benign"}])
    missing_label = write_rows(tmp_path / "b.jsonl", [*good, {"instruction": "q", "response": "r"}])
    not_a_string = write_rows(tmp_path / "c.jsonl", [*good, {**good[0], "response": 42}])
    not_utf8 = tmp_path / "d.jsonl"
    not_utf8.write_bytes(json.dumps(good[0]).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n')
    return [(missing_instruction, [], "row 3: missing 'instruction'"),
            (missing_label, ["--use-kl"], "row 3: missing 'prompt_label'"),
            (not_a_string, [], "row 3: 'response' must be a string, got int"),
            (not_utf8, [], "d.jsonl:2: not UTF-8 text")]


def test_8_bad_rows_are_one_line(tiny_qwen3, tmp_path, output_root, capsys, no_model_load):
    for dataset, flags, message in _bad_rows(tmp_path):
        code, _, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN,
                               *flags)
        one_line_error(code, err, message)


def test_8_an_80k_token_row_is_cut_at_max_length_and_counted(tiny_qwen3, tmp_path, output_root, capsys, caplog):
    """TRL cuts a row at max_length, as the paper's trainer did; the cut is said once and counted."""
    rows = train_rows(2)
    rows[0]["response"] = "word " * 80_000
    dataset = write_rows(tmp_path / "long.jsonl", rows)
    with caplog.at_level("WARNING", logger="thinksafe.train.sft"):
        code, out, err = run_cli(capsys, "train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN)
    assert code == 0, err
    info = json.loads((train_paths(tiny_qwen3, dataset).run_dir / "run_info.json").read_text())
    assert (info["truncated_rows"], info["max_length"], info["rows"]) == (1, 128, 2)
    assert "1 of 2 rows are longer than --max-length 128 tokens" in caplog.text


def test_8_out_that_is_a_file_is_one_line(tiny_qwen3, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a directory")
    prompts = write_rows(tmp_path / "p.jsonl", [{"instruction": "hi", "label": "vanilla_benign"}])
    code, _, err = run_cli(capsys, "synthesize", "--model", str(tiny_qwen3), "--model-type", "qwen", "--guard",
                           "refusal-judge", "--prompts", str(prompts), "--out", str(out))
    one_line_error(code, err, "--out", "is a file")


def test_8_unwritable_output_dir_is_one_line(tiny_qwen3, tmp_path, capsys, monkeypatch, no_model_load):
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    train = ["train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN]
    # a file standing where the output directory must be
    blocker = tmp_path / "outputs"
    blocker.write_text("")
    monkeypatch.setenv("THINKSAFE_OUTPUT_DIR", str(blocker / "inner"))
    code, _, err = run_cli(capsys, *train)
    one_line_error(code, err, "run directory", "is a file")
    # a read-only directory (the tests may run as root, which ignores permission bits: ask os.access)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setenv("THINKSAFE_OUTPUT_DIR", str(read_only))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    code, _, err = run_cli(capsys, *train)
    one_line_error(code, err, f"{read_only} is not writable")


def test_8_read_only_cache_is_one_line(monkeypatch, capsys):
    """A refusal from a directory no stage checks up front (the tokenised-data or model cache)."""
    import errno

    import thinksafe.plan

    def read_only(argv):
        raise OSError(errno.EROFS, "Read-only file system", "/cache/thinksafe/tokenized")

    monkeypatch.setattr(thinksafe.plan, "main", read_only)
    code, _, err = run_cli(capsys, "plan")
    one_line_error(code, err, "Read-only file system: /cache/thinksafe/tokenized")


def test_8_corrupt_metrics_is_one_line(tmp_path, capsys):
    task_dir = tmp_path / "results" / "r" / "xstest"
    task_dir.mkdir(parents=True)
    (task_dir / "metrics.json").write_bytes(b"\xff\xfe garbage")
    code, _, err = run_cli(capsys, "report", str(tmp_path / "results"))
    one_line_error(code, err, "metrics.json", "not UTF-8")


def test_8_ctrl_c_is_one_line(monkeypatch, capsys):
    import thinksafe.plan

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(thinksafe.plan, "main", interrupted)
    code, _, err = run_cli(capsys, "plan")
    assert code == 130 and err == INTERRUPTED


# --- 9. messages that say what is wrong -----------------------------------------------------


def test_9_missing_model_directory(tmp_path, output_root, capsys):
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    missing = tmp_path / "no" / "such" / "model"
    code, _, err = run_cli(capsys, "train", "--model", str(missing), "--dataset", str(dataset), *FAST_TRAIN)
    one_line_error(code, err, f"model directory {missing} does not exist")


def test_9_an_unreachable_hub_is_one_line_before_any_download(tmp_path, output_root, capsys, monkeypatch,
                                                               no_model_load):
    """Online with the hub out of reach, a model not in the cache used to cost 20-45 retry lines of the
    download; one probe request now gives one line, before anything loads."""
    import huggingface_hub

    probes = []

    def unreachable(self, repo_id, timeout=None, **kwargs):
        probes.append((repo_id, timeout))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    code, _, err = run_cli(capsys, "train", "--model", "nobody/not-cached-model", "--model-type", "qwen",
                           "--dataset", str(dataset), *FAST_TRAIN)
    one_line_error(code, err, "cannot reach the hub to download nobody/not-cached-model", "HF_HUB_OFFLINE=1")
    assert probes == [("nobody/not-cached-model", 10)]


def test_9_model_directory_without_a_tokenizer(tiny_qwen3, tmp_path, output_root, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in tiny_qwen3.iterdir():
        if path.name in ("config.json", "generation_config.json") or path.suffix == ".safetensors":
            shutil.copy(path, bare / path.name)
    code, _, err = run_cli(capsys, "evaluate", "--model", str(bare), "--model-type", "qwen", *FAST_EVAL)
    one_line_error(code, err, "holds no tokenizer")


def test_9_eval_sh_no_base_on_an_untrained_run_is_an_error(tmp_path):
    result = run_script("eval.sh", "cpu", "demo", "--no-base", env={"THINKSAFE_OUTPUT_DIR": str(tmp_path)})
    one_line_error(result.returncode, result.stderr, "nothing to evaluate", "--no-base")


# --- 10. files, logs and names ---------------------------------------------------------------


def test_10_written_files_follow_the_umask(tmp_path):
    from thinksafe.io import atomic_write_json

    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_10_wandb_offline_runs_land_under_the_output_dir(monkeypatch, output_root):
    from thinksafe.tracking import configure_wandb

    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)  # configure_wandb sets them; monkeypatch restores them
    assert configure_wandb("offline") == ["wandb"]
    assert os.environ["WANDB_MODE"] == "offline" and Path(os.environ["WANDB_DIR"]) == output_root.resolve()


def test_10_a_run_stopped_by_max_steps_is_named_apart(tiny_qwen3):
    spec = resolve_model(str(tiny_qwen3))
    full = RunConfig(model=spec, dataset="safechain", rank=4, epochs=3)
    cut = RunConfig(model=spec, dataset="safechain", rank=4, epochs=3, max_steps=2)
    assert run_paths(cut).name == run_paths(full).name + "_steps2"
