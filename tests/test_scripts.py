"""The bash entry points themselves: argument validation and the paths they resolve."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from thinksafe.registry import RunConfig, base_run_name, paths_for_name, resolve_model, run_paths, synthesized_data_dir

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def run_script(name, *args, env=None, timeout=120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


BAD_ARGS = [
    (("gpu0", "qwen"), "devices"),
    (("0,x", "qwen"), "devices"),
    (("7", "qwen"), "devices"),  # not visible to torch on a machine without that GPU
    (("cpu", "llama"), "model_type"),
    (("cpu", "qwen", "3B"), "size"),
    (("cpu", "r1-distill", "0.6B"), "size"),
    (("cpu", "qwen", "0.6B", "no/such/dataset!"), "dataset"),
    (("cpu", "qwen", "0.6B", "thinksafe", "maybe"), "use_kl"),
    (("cpu", "qwen", "0.6B", "thinksafe", "false", "yes!"), "prompt_masking"),
    (("cpu", "qwen", "0.6B", "thinksafe", "false", "true", "0"), "rank"),
    (("cpu", "qwen", "0.6B", "thinksafe", "false", "true", "32", "-1"), "epochs"),
    (("cpu", "qwen", "0.6B", "thinksafe", "false", "true", "32", "3", "extra"), "at most 8 arguments"),
]


@pytest.mark.parametrize("script", ["train_and_eval.sh", "eval.sh"])
@pytest.mark.parametrize(("args", "named"), BAD_ARGS)
def test_bad_arguments_exit_2_naming_the_argument(script, args, named, tmp_path):
    result = run_script(script, *args, env={"THINKSAFE_OUTPUT_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written before validation passes"


@pytest.mark.parametrize(("args", "named"), [
    (("cpu", "demo", "", "llama-guard-9"), "guard"),
    (("cpu", "demo", "7B"), "size"),
    (("cpu", "demo", "135M", "wildguard", "x"), "at most 4 arguments"),
])
def test_synthesize_script_bad_arguments(args, named):
    result = run_script("synthesize.sh", *args)
    assert result.returncode == 2 and named in result.stderr


RESOLVED_SYNTHESIS = """
import json, sys
from thinksafe.synthesize import config_from_args, parse_args
cfg = config_from_args(parse_args(sys.argv[1:]))
print(json.dumps({**cfg.manifest(), "out": str(cfg.out), "n": cfg.sampling.n, "limit": cfg.limit,
                  "max_kept_per_prompt": cfg.max_kept_per_prompt, "batch_size": cfg.batch_size,
                  "keep_unfinished_benign": cfg.keep_unfinished_benign}))
"""


def test_synthesize_script_resolves_the_demo_recipe_as_the_pipeline_does(tmp_path, monkeypatch):
    """scripts/synthesize.sh cpu demo and the pipeline's synthesis resolve the same configuration (the
    demo recipe's), so the data the script writes is the data `train_and_eval.sh cpu demo` trains on."""
    import sys

    from thinksafe import pipeline
    from thinksafe.plan import resolve_plan
    from thinksafe.recipes import recipe_values

    resolver = tmp_path / "resolve.py"
    resolver.write_text(RESOLVED_SYNTHESIS)
    shim = tmp_path / "python"  # the scripts run "${PYTHON}" -m thinksafe <stage>: resolve, don't generate
    shim.write_text(f'#!/usr/bin/env bash\nif [[ "$3" == synthesize ]]; then shift 3; exec "{sys.executable}" '
                    f'"{resolver}" "$@"; fi\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = {"PYTHON": str(shim), "THINKSAFE_OUTPUT_DIR": str(tmp_path / "outputs")}
    monkeypatch.delenv("THINKSAFE_RECIPE", raising=False)
    result = run_script("synthesize.sh", "cpu", "demo", env={**env, "THINKSAFE_RECIPE": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    from_script = json.loads(result.stdout.strip().splitlines()[-1])

    monkeypatch.setenv("THINKSAFE_OUTPUT_DIR", env["THINKSAFE_OUTPUT_DIR"])
    steps = []
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append(cmd))
    pipeline.synthesize_if_needed(resolve_plan({"devices": "cpu", "model_type": "demo"}))
    done = subprocess.run([sys.executable, str(resolver), *steps[0][4:]], capture_output=True, text=True, check=True)
    from_pipeline = json.loads(done.stdout.strip().splitlines()[-1])

    recipe = recipe_values("demo", "synthesize")
    assert from_script == from_pipeline
    assert from_script["n"] == recipe["samples_per_prompt"] and from_script["steer_prefix"] == recipe["steer_prefix"]
    assert from_script["sampling"]["max_new_tokens"] == recipe["max_new_tokens"]
    assert from_script["keep_unfinished_benign"] is True and from_script["batch_size"] == recipe["batch_size"]


def test_plan_paths_match_python_registry(tmp_path):
    env = {**os.environ, "THINKSAFE_OUTPUT_DIR": str(tmp_path)}
    out = subprocess.run(["python3", "-m", "thinksafe", "plan", "cpu", "r1-distill", "7B", "thinksafe", "true",
                          "false", "16", "2", "--format", "json"], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout
    plan = json.loads(out)
    os.environ["THINKSAFE_OUTPUT_DIR"] = str(tmp_path)
    try:
        model = resolve_model("r1-distill", "7B")
        readable = run_paths(RunConfig(model, "thinksafe", prompt_masking=False, rank=16, use_kl=True, epochs=2)).name
        assert readable == "r1-distill-7B_thinksafe_r16_ep2_kl"
        assert re.fullmatch(rf"{readable}_h[0-9a-f]{{8}}", plan["run_name"])  # + the hash of the other settings
        paths = paths_for_name(plan["run_name"])
        for key, value in paths.to_dict().items():
            if key != "name":
                assert plan[f"path_{key}"] == value
        assert plan["base_run_name"] == base_run_name(model)
        assert plan["data_file"] == str(synthesized_data_dir(model, "llama-guard-3") / "train.jsonl")
    finally:
        del os.environ["THINKSAFE_OUTPUT_DIR"]


@pytest.mark.demo
def test_demo_end_to_end_with_tiny_limits(tmp_path, demo_model):
    """./scripts/train_and_eval.sh cpu demo, with a few prompts, few tokens and one step."""
    out = tmp_path / "outputs"
    env = {"THINKSAFE_OUTPUT_DIR": str(out), "THINKSAFE_RECIPE": str(ROOT / "tests/data/smoke_recipe.yaml"),
           "WANDB_MODE": "disabled"}
    result = run_script("train_and_eval.sh", "cpu", "demo", env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plan = json.loads(subprocess.run(["python3", "-m", "thinksafe", "plan", "cpu", "demo", "--format", "json"],
                                     capture_output=True, text=True, check=True, cwd=ROOT,
                                     env={**os.environ, **env}).stdout)
    data = Path(plan["data_dir"])
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    stats = json.loads((data / "stats.json").read_text())
    assert rows and len(rows) == stats["kept"]["total"]
    assert {"instruction", "response", "prompt_label", "response_label"} <= set(rows[0])
    assert (Path(plan["path_adapter"]) / "adapter_config.json").exists()
    assert (Path(plan["path_merged"]) / "config.json").exists()
    for results in (Path(plan["path_results"]), Path(plan["base_results"])):
        for task in ("xstest",):
            metrics = json.loads((results / task / "metrics.json").read_text())
            assert metrics["n"] > 0 and (results / task / "generations.jsonl").exists()
    summary = (out / "results" / "summary.md").read_text()
    assert plan["run_name"] in summary and plan["base_run_name"] in summary
    assert (out / "results" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "thinksafe pipeline finished" in result.stdout

    # a rerun of the finished run: no training, nothing evaluated again, the logs kept and appended to
    again = run_script("train_and_eval.sh", "cpu", "demo", env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "same data and settings: skipping training" in again.stdout
    train_log = (Path(plan["path_logs"]) / "train.log").read_text()
    assert train_log.count("=== ") == 2 and "trained " in train_log
    eval_log = (Path(plan["path_logs"]) / "eval_xstest.log").read_text()
    assert "same settings, skipped" in eval_log.split("=== ")[-1]

    # the first command trains ThinkSafe+KL (the demo recipe): KL also over the cut benign samples
    unfinished = [json.loads(line) for line in (data / "unfinished_benign.jsonl").read_text().splitlines()]
    assert len(unfinished) == stats["unfinished_benign"]["kept"]
    assert all(r["finished"] is False and "benign" in r["prompt_label"] for r in unfinished)
    info = json.loads((Path(plan["path_run_dir"]) / "run_info.json").read_text())
    assert info["use_kl"] and info["kl_on_unfinished"]
    assert info["kl_rows"] == stats["kept"]["benign"] + len(unfinished)
    assert info["rows"] == stats["kept"]["total"] + len(unfinished)

    # use_kl=false (the paper's default) trains ThinkSafe with CE on the same data, a run of its own
    ce = run_script("train_and_eval.sh", "cpu", "demo", "", "", "false", env=env, timeout=900)
    assert ce.returncode == 0, ce.stdout[-3000:] + ce.stderr[-3000:]
    ce_plan = json.loads(subprocess.run(["python3", "-m", "thinksafe", "plan", "cpu", "demo", "", "", "false",
                                         "--format", "json"], capture_output=True, text=True, check=True, cwd=ROOT,
                                        env={**os.environ, **env}).stdout)
    assert "exists, skipping synthesis" in ce.stdout and ce_plan["run_name"] != plan["run_name"]
    info = json.loads((Path(ce_plan["path_run_dir"]) / "run_info.json").read_text())
    assert not info["use_kl"] and info["kl_rows"] == 0 and info["rows"] == stats["kept"]["total"]


@pytest.mark.demo
def test_failing_evaluation_task_fails_the_script_and_names_it(tmp_path, demo_model):
    env = {"THINKSAFE_OUTPUT_DIR": str(tmp_path / "outputs"),
           "THINKSAFE_RECIPE": str(ROOT / "tests/data/failing_task_recipe.yaml"), "WANDB_MODE": "disabled"}
    result = run_script("eval.sh", "cpu", "demo", env=env, timeout=600)
    assert result.returncode == 1
    assert "FAILED evaluation tasks" in result.stderr
    failed = [line for line in result.stderr.splitlines() if "exit" in line and "log:" in line]
    assert len(failed) == 1 and "aime24" in failed[0]
    assert Path(failed[0].split("log: ")[1]).exists()
    # the task that worked kept its results
    assert (tmp_path / "outputs/results/smollm2-135M_base/heldout_harmful/metrics.json").exists()
