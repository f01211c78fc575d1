"""What `./scripts/train_and_eval.sh cpu demo` runs: the stage commands come from the demo recipe."""

from pathlib import Path

from thinksafe import pipeline
from thinksafe.plan import resolve_plan
from thinksafe.recipes import load_recipe


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_demo_run_uses_the_demo_recipe(monkeypatch, output_root):
    monkeypatch.delenv("THINKSAFE_RECIPE", raising=False)
    steps = []
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append((name, cmd, log)))
    plan = resolve_plan({"devices": "cpu", "model_type": "demo"})

    sft = load_recipe("demo", "sft")
    assert (plan["rank"], plan["epochs"]) == (str(sft["rank"]), str(sft["epochs"]))
    assert plan["guard"] == "refusal-judge"

    pipeline.synthesize_if_needed(plan)
    (name, cmd, log), = steps
    synth = load_recipe("demo", "synthesize")
    assert name == "synthesize" and flag(cmd, "--guard") == "refusal-judge"
    assert flag(cmd, "--samples-per-prompt") == str(synth["samples_per_prompt"])
    assert flag(cmd, "--max-new-tokens") == str(synth["max_new_tokens"])
    assert flag(cmd, "--steer-prefix") == synth["steer_prefix"]
    assert synth["keep_unfinished_benign"] is True and "--keep-unfinished-benign" in cmd
    assert flag(cmd, "--out") == plan["data_dir"] and Path(log).parent == Path(plan["data_dir"])

    # the KL run's name, and the flag `train` gets, come from the recipe's sft section
    kl_plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"})
    assert sft["kl_on_unfinished"] is True and kl_plan["kl_on_unfinished"] == "true"
    assert kl_plan["run_name"] == plan["run_name"] + "_kl_unfinished" and plan["kl_on_unfinished"] == "false"
    steps.clear()
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append((name, cmd, log)))
    Path(kl_plan["path_adapter"]).mkdir(parents=True)  # what a finished train step leaves
    pipeline.train(kl_plan)
    (name, cmd, log), = steps
    assert flag(cmd, "--use-kl") == "true" and flag(cmd, "--kl-on-unfinished") == "true"

    monkeypatch.setattr(pipeline, "run_tasks_on_devices", lambda tasks, devices: [(t, 0) for t in tasks])
    results = pipeline.evaluate(plan)
    evaluate = load_recipe("demo", "evaluate")
    assert [t.name for t, _ in results] == evaluate["tasks"] * 2  # the trained run, then the base model
    assert {t.run_name for t, _ in results} == {plan["run_name"], plan["base_run_name"]}
    extra = results[0][0].extra
    assert flag(extra, "--n") == str(evaluate["n"]) and flag(extra, "--limit") == str(evaluate["limit"])


def test_existing_data_skips_synthesis_unless_the_kl_run_lacks_its_side_file(monkeypatch, output_root):
    monkeypatch.setenv("THINKSAFE_RECIPE", str(Path(__file__).parent / "data" / "failing_task_recipe.yaml"))
    steps = []
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append(cmd))
    plan = resolve_plan({"devices": "cpu", "model_type": "demo"})
    kl_plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"})
    data_file = Path(plan["data_file"])
    data_file.parent.mkdir(parents=True)
    data_file.write_text('{"instruction": "x"}\n')
    pipeline.synthesize_if_needed(plan)
    assert steps == []  # the CE run needs train.jsonl only
    # a KL run on cut benign rows, with data from before (and a recipe override without the flag):
    # synthesis reruns with the flag, resuming from its logs
    pipeline.synthesize_if_needed(kl_plan)
    (cmd,) = steps
    assert "--keep-unfinished-benign" in cmd
    (data_file.parent / "unfinished_benign.jsonl").write_text("")
    pipeline.synthesize_if_needed(kl_plan)
    assert len(steps) == 1  # both files there: skipped
