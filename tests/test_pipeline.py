"""What `./scripts/train_and_eval.sh cpu demo` runs: each stage resolves the demo recipe, whether the
pipeline or a script started it (the commands are parsed back, as the stages parse them)."""

from pathlib import Path

from thinksafe import pipeline, synthesize
from thinksafe.plan import resolve_plan
from thinksafe.recipes import recipe_values
from thinksafe.train import sft as train_sft


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def stage_args(cmd: list[str]) -> list[str]:
    return cmd[cmd.index("thinksafe") + 2:]  # [python, -m, thinksafe, <stage>, args...]


def test_demo_run_uses_the_demo_recipe(monkeypatch, output_root):
    monkeypatch.delenv("THINKSAFE_RECIPE", raising=False)
    steps = []
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append((name, cmd, log)))
    plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "false"})

    sft = recipe_values("demo", "sft")
    assert plan.rank == sft["lora_r"] and plan.epochs == sft["num_train_epochs"] == 1  # the recipe's (typed)
    # left empty, use_kl is the recipe's: the demo's first command trains ThinkSafe+KL
    assert sft["use_kl"] is True and resolve_plan({"devices": "cpu", "model_type": "demo"}).use_kl is True
    assert resolve_plan({"devices": "cpu", "model_type": "qwen"}, check_devices=False).use_kl is False  # the paper's
    assert plan.guard == "refusal-judge" and plan.devices == ("cpu",) and plan.num_devices == 0

    pipeline.synthesize_if_needed(plan)
    (name, cmd, log), = steps
    synth = recipe_values("demo", "synthesize")
    cfg = synthesize.config_from_args(synthesize.parse_args(stage_args(cmd)))
    assert name == "synthesize" and cfg.guard == "refusal-judge" and cfg.out == plan.data_dir
    assert (cfg.sampling.n, cfg.sampling.max_new_tokens) == (synth["samples_per_prompt"], synth["max_new_tokens"])
    assert cfg.steer_prefix == synth["steer_prefix"] and cfg.keep_unfinished_benign is True
    assert cfg.max_kept_per_prompt == synth["max_kept_per_prompt"] and cfg.prompts == "demo"
    assert Path(log).parent == plan.data_dir

    # the KL run's name, and what `train` parses from the run record, come from the recipe's sft section
    kl_plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"})
    assert sft["kl_on_unfinished"] is True and kl_plan.kl_on_unfinished is True and kl_plan.use_kl is True
    readable = plan.paths.name.rsplit("_h", 1)[0]  # then the settings hash, another for the KL run
    assert kl_plan.paths.name.startswith(readable + "_kl_unfinished_h") and plan.kl_on_unfinished is False
    steps.clear()
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append((name, cmd, log)))
    kl_plan.paths.adapter.mkdir(parents=True)  # what a finished train step leaves
    pipeline.train(kl_plan)
    (name, cmd, log), = steps
    model_cfg, run, trained = train_sft.parse_args([*stage_args(cmd), "--device", "cpu", "--report_to", "none"])
    assert trained.use_kl and trained.kl_on_unfinished and model_cfg.lora_r == sft["lora_r"]
    assert trained.per_device_train_batch_size == sft["per_device_train_batch_size"]  # recipe, not in the record
    assert train_sft.run_config(model_cfg, run, trained).model.family.name == "demo"
    assert run_name_of(model_cfg, run, trained) == kl_plan.paths.name

    monkeypatch.setattr(pipeline, "run_tasks_on_devices", lambda tasks, devices: [(t, 0) for t in tasks])
    results = pipeline.evaluate(plan)
    evaluate = recipe_values("demo", "evaluate")
    # one device: one process per model for all its tasks (one engine start each), the trained run first
    assert [t.name for t, _ in results] == [",".join(evaluate["tasks"])] * 2
    assert [t.run_name for t, _ in results] == [plan.paths.name, plan.base.name]
    assert results[0][0].log == plan.paths.logs / f"eval_{'+'.join(evaluate['tasks'])}.log"
    # the trained run is evaluated through its adapter once it has one (LoRARequest on vLLM keeps the
    # update that a 16-bit merge rounds away), its merged model otherwise (a full fine-tune)
    assert results[0][0].model == str(plan.paths.merged) and results[1][0].model == "demo/135M"
    plan.paths.adapter.mkdir(parents=True, exist_ok=True)
    (plan.paths.adapter / "adapter_config.json").write_text("{}")
    assert pipeline.evaluate(plan)[0][0].model == str(plan.paths.adapter)
    from thinksafe.evaluate.run import parse_args as evaluate_args

    task = results[0][0]
    args = evaluate_args(["--model", task.model, "--tasks", task.name, "--run-name", task.run_name, *task.extra])
    assert (args.n, args.limit, args.data) == (evaluate["n"], evaluate["limit"], evaluate["data"])
    assert args.tasks == task.name  # the pipeline's task group, over the recipe's list


def test_evaluation_tasks_are_split_over_at_most_one_process_per_device():
    tasks = ["aime24", "gpqa_diamond", "math500", "gsm8k", "harmbench"]
    assert pipeline.task_groups(tasks, ["cpu"]) == [tasks]
    assert pipeline.task_groups(tasks, ["0", "1"]) == [["aime24", "math500", "harmbench"], ["gpqa_diamond", "gsm8k"]]
    assert pipeline.task_groups(tasks[:2], ["0", "1", "2", "3"]) == [["aime24"], ["gpqa_diamond"]]
    groups = pipeline.task_groups(tasks, [str(d) for d in range(8)])
    assert groups == [[t] for t in tasks]  # as many devices as tasks: one task each, in parallel


def run_name_of(model_cfg, run, trained) -> str:
    from thinksafe.registry import run_paths

    return run_paths(train_sft.run_config(model_cfg, run, trained)).name


def test_existing_data_skips_synthesis_unless_the_kl_run_lacks_its_side_file(monkeypatch, output_root):
    monkeypatch.setenv("THINKSAFE_RECIPE", str(Path(__file__).parent / "data" / "failing_task_recipe.yaml"))
    steps = []
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append(cmd))
    plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "false"})
    kl_plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"})
    data_file = plan.data_file
    data_file.parent.mkdir(parents=True)
    data_file.write_text('{"instruction": "x"}\n')
    pipeline.synthesize_if_needed(plan)
    assert steps == []  # the CE run needs train.jsonl only
    # a KL run on cut benign rows, with data from before (and a recipe override without the flag):
    # synthesis reruns with the flag, resuming from its logs
    pipeline.synthesize_if_needed(kl_plan)
    (cmd,) = steps
    assert synthesize.parse_args(stage_args(cmd)).keep_unfinished_benign is True
    (data_file.parent / "unfinished_benign.jsonl").write_text("")
    pipeline.synthesize_if_needed(kl_plan)
    assert len(steps) == 1  # both files there: skipped


def test_a_cached_kl_run_has_its_data_synthesized_with_the_base_models_top_k(monkeypatch, output_root, tmp_path):
    import pytest

    from thinksafe.errors import ThinksafeError
    from thinksafe.reference_topk import PIPELINE_REFERENCE_TOPK, REFERENCE_TOPK_FILE

    recipe = tmp_path / "cached.yaml"
    recipe.write_text("sft:\n  kl_reference: cached\n")
    monkeypatch.setenv("THINKSAFE_RECIPE", str(recipe))
    steps = []
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append(cmd))
    plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"})
    assert plan.kl_reference == "cached" and "_klcached" in plan.paths.name
    assert resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "false"}).kl_reference is None  # no KL

    pipeline.synthesize_if_needed(plan)
    (cmd,) = steps
    assert synthesize.parse_args(stage_args(cmd)).store_reference_topk == PIPELINE_REFERENCE_TOPK

    # data drawn without the top-k cannot gain it: refused in one line before any step runs
    data_dir = plan.data_dir
    data_dir.mkdir(parents=True)
    for name in ("train.jsonl", "unfinished_benign.jsonl"):
        (data_dir / name).write_text("")
    with pytest.raises(ThinksafeError, match="synthesized without the base model's top-k"):
        pipeline.synthesize_if_needed(plan)
    (data_dir / REFERENCE_TOPK_FILE).write_bytes(b"")
    pipeline.synthesize_if_needed(plan)
    assert len(steps) == 1  # data and its store there: skipped

    # the synthesis recipe's K wins over the pipeline's
    recipe.write_text("sft:\n  kl_reference: cached\nsynthesize:\n  store_reference_topk: 20\n")
    assert pipeline.reference_topk(plan) == 20



def test_a_failing_task_in_a_group_keeps_the_others_finishing(output_root, monkeypatch):
    """The group's process stops at the failing task; its tasks run again one per process, and the
    failure left is the failing task's alone."""
    plan = resolve_plan({"devices": "cpu", "model_type": "demo"})
    monkeypatch.setattr(pipeline, "evaluation_tasks", lambda family: ["heldout_harmful", "aime24", "xstest"])
    started: list[str] = []

    def run(tasks, devices):
        started.extend(t.name for t in tasks)
        return [(t, 1 if "aime24" in t.name.split(",") else 0) for t in tasks]

    monkeypatch.setattr(pipeline, "run_tasks_on_devices", run)
    results = pipeline.evaluate(plan, include_base=False)
    assert started == ["heldout_harmful,aime24,xstest", "heldout_harmful", "aime24", "xstest"]
    assert [(t.name, code) for t, code in results] == [("heldout_harmful", 0), ("aime24", 1), ("xstest", 0)]
    assert results[1][0].log == plan.paths.logs / "eval_aime24.log"


def test_settings_travel_typed_from_the_positional_arguments_to_the_trainer(monkeypatch, output_root, tmp_path):
    """use_kl, kl_reference and the devices are converted from text once (plan) and then travel typed:
    the train command carries no rebuilt flag, the run record holds YAML booleans, and train reads the
    same types back."""
    import yaml

    recipe = tmp_path / "cached.yaml"
    recipe.write_text("sft:\n  kl_reference: cached\n")
    monkeypatch.setenv("THINKSAFE_RECIPE", str(recipe))
    plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "yes", "prompt_masking": "0"})
    assert plan.use_kl is True and plan.prompt_masking is False and plan.kl_reference == "cached"
    assert plan.devices == ("cpu",) and plan.num_devices == 0
    steps = []
    monkeypatch.setattr(pipeline, "run_step", lambda name, cmd, log, env=None: steps.append((cmd, env)))
    plan.paths.adapter.mkdir(parents=True)
    pipeline.train(plan)
    (cmd, env), = steps
    assert not {"--use_kl", "--use-kl", "--completion_only_loss", "--kl_reference"} & set(cmd)
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # the device list, joined only for the environment
    section = yaml.safe_load((plan.paths.run_dir / pipeline.RUN_PLAN).read_text())["sft"]
    assert section["use_kl"] is True and section["completion_only_loss"] is False
    assert section["kl_reference"] == "cached"
    _, _, trained = train_sft.parse_args([*stage_args(cmd), "--device", "cpu", "--report_to", "none"])
    assert (trained.use_kl, trained.completion_only_loss, trained.kl_reference) == (True, False, "cached")
