import re

import pytest

from thinksafe.errors import ThinksafeError
from thinksafe.plan import resolve_plan
from thinksafe.registry import (
    DATASETS,
    FAMILIES,
    RegistryError,
    RunConfig,
    paths_for_name,
    resolve_dataset,
    resolve_model,
    run_name,
    run_paths,
)

EXPECTED_IDS = {
    ("qwen", "0.6B"): "Qwen/Qwen3-0.6B",
    ("qwen", "1.7B"): "Qwen/Qwen3-1.7B",
    ("qwen", "4B"): "Qwen/Qwen3-4B",
    ("qwen", "8B"): "Qwen/Qwen3-8B",
    ("qwen", "14B"): "Qwen/Qwen3-14B",
    ("qwen", "32B"): "Qwen/Qwen3-32B",
    ("r1-distill", "1.5B"): "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    ("r1-distill", "7B"): "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    ("r1-distill", "14B"): "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    ("r1-distill", "32B"): "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    ("r1-distill", "8B"): "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    ("r1-distill", "70B"): "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
    ("demo", "135M"): "demo",
}


@pytest.mark.parametrize(("model_type", "size"), sorted(EXPECTED_IDS))
def test_every_documented_model_resolves(model_type, size):
    spec = resolve_model(model_type, size)
    assert spec.source == EXPECTED_IDS[(model_type, size)]
    assert resolve_model(f"{model_type}/{size}").source == spec.source
    # every family/size pair is in the registry and nothing else is
    assert set(EXPECTED_IDS) == {(f, s) for f, fam in FAMILIES.items() for s in fam.sizes}


def test_sampling_defaults_per_family():
    assert FAMILIES["qwen"].sampling.top_k == 20
    assert FAMILIES["r1-distill"].sampling.top_k is None
    for name in ("qwen", "r1-distill"):
        s = FAMILIES[name].sampling
        assert (s.temperature, s.top_p, s.max_new_tokens) == (0.6, 0.95, 16384)
    assert not FAMILIES["demo"].reasoning and FAMILIES["qwen"].reasoning


@pytest.mark.parametrize(("model_type", "size", "message"), [
    ("qwen", "3B", "choose one of: 0.6B, 1.7B, 4B, 8B, 14B, 32B"),
    ("r1-distill", "0.6B", "choose one of: 1.5B, 7B, 14B, 32B, 8B, 70B"),
    ("llama", "8B", "choose one of: qwen, r1-distill, demo"),
])
def test_bad_model_rejected_with_choices(model_type, size, message):
    with pytest.raises(RegistryError, match=re.escape(message)):
        resolve_plan({"devices": "cpu", "model_type": model_type, "size": size})


def test_hub_ids_and_dirs_pass_through(tmp_path):
    assert resolve_model("Qwen/Qwen3-8B").source == "Qwen/Qwen3-8B"
    assert resolve_model("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B").family.name == "r1-distill"
    assert resolve_model(str(tmp_path)).source == str(tmp_path)


def test_published_dataset_ids_are_clean():
    # the paper's table had a trailing space in one id; its README default was not a key
    for short, hub_id in DATASETS.items():
        assert hub_id == hub_id.strip() and re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id), short
    assert resolve_dataset("thinksafe-0.6B").source == "icml2026-7516/ThinkSafe-Qwen3-0.6B"
    assert resolve_dataset("thinksafe").kind == "self"
    assert resolve_dataset("thinksafe-wildguard").source == "wildguard"
    assert resolve_dataset("thinksafe", FAMILIES["demo"]).source == "refusal-judge"


def test_local_dataset_and_unknown_dataset(tmp_path):
    file = tmp_path / "my data.jsonl"
    file.write_text("{}\n")
    spec = resolve_dataset(str(file))
    assert spec.kind == "local" and spec.name == "my-data"
    with pytest.raises(RegistryError, match="unknown dataset"):
        resolve_dataset("no such thing")


def test_run_name_always_has_epoch_suffix():
    model = resolve_model("qwen", "0.6B")
    one = run_name(RunConfig(model, "thinksafe", prompt_masking=True, rank=32, use_kl=False, epochs=1))
    three_kl = run_name(RunConfig(model, "thinksafe", prompt_masking=False, rank=16, use_kl=True, epochs=3))
    assert one == "qwen3-0.6B_thinksafe_r32_ep1_mask"
    assert three_kl == "qwen3-0.6B_thinksafe_r16_ep3_kl"
    # KL on cut benign samples trains on other rows: its own run (no resuming the other's checkpoints)
    kl_cut = RunConfig(model, "thinksafe", rank=16, epochs=3, use_kl=True, kl_on_unfinished=True)
    assert run_name(kl_cut) == "qwen3-0.6B_thinksafe_r16_ep3_mask_kl_unfinished"
    assert run_name(RunConfig(model, "thinksafe", rank=16, epochs=3, kl_on_unfinished=True)) == "qwen3-0.6B_thinksafe_r16_ep3_mask"


def test_token_weighted_kl_is_its_own_run_and_row_is_the_default():
    model = resolve_model("qwen", "0.6B")
    assert RunConfig(model, "thinksafe", 32, 3, use_kl=True).kl_weighting == "row"
    token = RunConfig(model, "thinksafe", 32, 3, use_kl=True, kl_weighting="token")
    assert run_name(token) == "qwen3-0.6B_thinksafe_r32_ep3_mask_kl_tokenw"
    assert run_name(RunConfig(model, "thinksafe", 32, 3, use_kl=True)) == "qwen3-0.6B_thinksafe_r32_ep3_mask_kl"
    with pytest.raises(ThinksafeError, match="choose one of: row, token"):
        RunConfig(model, "thinksafe", 32, 3, use_kl=True, kl_weighting="rows")


@pytest.mark.parametrize("bad", [0, -1, True, "3"])
def test_rank_and_epochs_must_be_positive_ints(bad):
    with pytest.raises(RegistryError, match="positive integer"):
        RunConfig(resolve_model("qwen"), "thinksafe", rank=bad, epochs=3)


def test_paths_derive_from_run_name(output_root):
    cfg = RunConfig(resolve_model("qwen", "4B"), "safechain", rank=32, epochs=2)
    paths = run_paths(cfg)
    assert paths == paths_for_name(run_name(cfg))
    assert paths.adapter == output_root / "runs" / paths.name / "adapter"
    assert paths.task_dir("gsm8k") == output_root / "results" / paths.name / "gsm8k"


def test_plan_defaults_match_paper_interface(output_root):
    plan = resolve_plan({"devices": "cpu"}, check_devices=False)
    assert (plan.model_type, plan.size, plan.dataset, plan.use_kl, plan.prompt_masking,
            plan.rank, plan.epochs) == ("qwen", "0.6B", "thinksafe", False, True, 32, 3)
    assert re.fullmatch(r"qwen3-0\.6B_thinksafe_r32_ep3_mask_h[0-9a-f]{8}", plan.paths.name)
    assert plan.guard == "llama-guard-3"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("devices", "gpu0", "devices must be 'cpu' or a comma list"),
    ("devices", "0,0", "lists a GPU twice"),
    ("use_kl", "yes please", "use_kl must be true or false"),
    ("prompt_masking", "maybe", "prompt_masking must be true or false"),
    ("rank", "0", "rank must be a positive integer"),
    ("epochs", "2.5", "epochs must be a positive integer"),
])
def test_plan_rejects_bad_arguments(field, value, message):
    args = {"devices": "cpu", field: value}
    with pytest.raises(RegistryError, match=re.escape(message)):
        resolve_plan(args, check_devices=False)


def test_prompt_labels():
    from thinksafe.registry import is_harmful_label

    assert is_harmful_label("vanilla_harmful") and is_harmful_label("adversarial_harmful")
    assert not is_harmful_label("vanilla_benign") and not is_harmful_label("Benign")
    for bad in ("unsafe", "", "harmful_benign"):
        with pytest.raises(RegistryError, match="unknown prompt label"):
            is_harmful_label(bad)


def test_a_directory_family_is_guessed_from_its_own_name_not_its_folders(tmp_path):
    from thinksafe.registry import family_for_model

    qwen = tmp_path / "deepseek-r1-study" / "my-qwen3-run"
    qwen.mkdir(parents=True)
    assert family_for_model(str(qwen)).name == "qwen"  # the folder above says R1; the model is not
    r1 = tmp_path / "plain" / "DeepSeek-R1-Distill-Qwen-1.5B"
    r1.mkdir(parents=True)
    assert family_for_model(str(r1)).name == "r1-distill"
    assert family_for_model("deepseek-ai/DeepSeek-R1-Distill-Llama-8B").name == "r1-distill"  # a hub id: its name
