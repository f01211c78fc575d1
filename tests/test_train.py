"""`thinksafe train` end to end on tiny models: steps, adapter vs base weights, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import rows_file
from safetensors.torch import load_file

from thinksafe.errors import ThinksafeError

FAST = ["--rank", "4", "--epochs", "1", "--effective-batch-size", "2", "--per-device-batch-size", "2",
        "--learning-rate", "1e-2", "--warmup-ratio", "0", "--max-length", "256", "--report-to", "none",
        "--device", "cpu"]


def run_train(model_dir, dataset, *extra, capture=None, monkeypatch=None):
    from thinksafe.train import sft

    if capture is not None:
        real = sft.finish_run

        def keep(trainer, *args, **kwargs):
            capture["trainer"] = trainer
            return real(trainer, *args, **kwargs)

        monkeypatch.setattr(sft, "finish_run", keep)
    return sft.main(["--model", str(model_dir), "--dataset", str(dataset), *FAST, *extra])


def only_run_dir(output_root):
    runs = list((output_root / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_r1"])
@pytest.mark.parametrize("flags", [[], ["--use-kl"], ["--prompt-masking", "false"],
                                   ["--use-kl", "--prompt-masking", "false"]])
def test_two_steps_change_adapter_not_base(fixture, flags, request, tmp_path, output_root, monkeypatch):
    model_dir = request.getfixturevalue(fixture)
    dataset, _ = rows_file(tmp_path, n=4)
    captured = {}
    assert run_train(model_dir, dataset, *flags, capture=captured, monkeypatch=monkeypatch) == 0
    run_dir = only_run_dir(output_root)
    readable = run_dir.name.rsplit("_h", 1)[0]  # the settings hash follows the readable parts
    assert readable.endswith(("_mask" if "false" not in flags else "_ep1") + ("_kl" if "--use-kl" in flags else ""))
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["log_history"][-1]["step"] == 2
    logged = {k for entry in info["log_history"] for k in entry}
    assert ("kl_loss" in logged) == ("--use-kl" in flags) and "ce_loss" in logged

    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; training must move it"
    base = load_file(next(model_dir.glob("*.safetensors")))
    trained = captured["trainer"].model.get_base_model().state_dict()
    for name, value in base.items():
        key = name.replace(".weight", ".base_layer.weight") if name.replace(".weight", ".base_layer.weight") in trained else name
        torch.testing.assert_close(trained[key].cpu(), value, rtol=0, atol=0)
    assert (run_dir / "adapter" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (run_dir / "adapter" / "tokenizer_config.json").read_text())


def test_resume_from_checkpoint(tiny_qwen3, tmp_path, output_root):
    dataset, _ = rows_file(tmp_path, n=4)
    args = ["--epochs", "2"]
    assert run_train(tiny_qwen3, dataset, *args) == 0
    run_dir = only_run_dir(output_root)
    first = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]  # one save per epoch
    # Simulate a crash after the first epoch: no final adapter, no marker, no second checkpoint.
    import shutil

    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "run_info.json").unlink()
    assert run_train(tiny_qwen3, dataset, *args) == 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-2")
    assert info["log_history"][-1]["step"] == 4
    second = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=1e-4, atol=1e-6)


def test_finished_run_needs_overwrite(tiny_qwen3, tmp_path, output_root):
    dataset, _ = rows_file(tmp_path, n=2)
    assert run_train(tiny_qwen3, dataset, "--max-steps", "1") == 0
    with pytest.raises(ThinksafeError, match="--overwrite"):
        run_train(tiny_qwen3, dataset, "--max-steps", "1")
    assert run_train(tiny_qwen3, dataset, "--max-steps", "1", "--overwrite") == 0


def test_bad_inputs_are_one_line_errors(tiny_qwen3, tmp_path, output_root, capsys):
    from thinksafe.cli import main as cli

    good, _ = rows_file(tmp_path, n=2)
    no_response = tmp_path / "noresp.jsonl"
    no_response.write_text(json.dumps({"instruction": "q", "prompt_label": "benign"}) + "\n")
    unsafe = tmp_path / "unsafe.jsonl"
    unsafe.write_text(json.dumps({"instruction": "q", "response": "r", "prompt_label": "benign",
                                  "response_label": "unsafe"}) + "\n")
    no_label = tmp_path / "nolabel.jsonl"
    no_label.write_text(json.dumps({"instruction": "q", "response": "r"}) + "\n")
    cases = [
        ([str(good), "--rank", "0"], "--rank must be a positive integer"),
        ([str(good), "--rank", "abc"], "--rank: invalid int value: 'abc'"),
        ([str(no_response)], "lacks column(s) response"),
        ([str(unsafe)], "no rows left after filtering"),
        ([str(no_label), "--use-kl"], "needed by --use-kl"),
    ]
    for (dataset, *extra), message in cases:
        code = cli(["train", "--model", str(tiny_qwen3), "--dataset", dataset, "--report-to", "none", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and message in err and "\n" not in err, err


def test_self_generated_dataset_resolves_to_synthesized_file(tiny_qwen3, output_root):
    from thinksafe.registry import resolve_model, synthesized_data_dir
    from thinksafe.train.data import DatasetError, dataset_source

    spec = resolve_model(str(tiny_qwen3), model_type="qwen")
    with pytest.raises(DatasetError, match="thinksafe synthesize"):
        dataset_source("thinksafe", spec)
    target = synthesized_data_dir(spec, "llama-guard-3") / "train.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("")
    assert dataset_source("thinksafe", spec)[1] == str(target)


def test_tokenised_dataset_is_cached(tiny_qwen3, tmp_path):
    from thinksafe.model_loading import load_tokenizer
    from thinksafe.registry import FAMILIES
    from thinksafe.train.data import build_train_dataset, to_rows

    tokenizer = load_tokenizer(str(tiny_qwen3))
    rows = to_rows([{"instruction": "q", "response": "r", "prompt_label": "benign"}], "t", need_labels=True)
    first = build_train_dataset(rows, tokenizer, FAMILIES["qwen"], True, cache_root=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    build_train_dataset(rows, tokenizer, FAMILIES["qwen"], True, cache_root=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # same settings: reused
    build_train_dataset(rows, tokenizer, FAMILIES["qwen"], False, cache_root=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # KL flag changes the key
    assert first["kl"] == [1]


def test_batch_split():
    from thinksafe.train.common import TrainConfigError, batch_split

    assert batch_split(8, 1, 1) == (1, 8)
    assert batch_split(8, 1, 4) == (1, 2)
    assert batch_split(8, 4, 4) == (2, 1)
    with pytest.raises(TrainConfigError):
        batch_split(8, 1, 3)


UNFINISHED_RECORDS = [
    {"instruction": "how to hack", "response": "I'm sorry, I can't.", "prompt_label": "vanilla_harmful",
     "response_label": "safe"},
    {"instruction": "bake bread", "response": "Mix flour.", "prompt_label": "vanilla_benign", "response_label": "safe"},
    {"instruction": "kill a process", "response": "Use kill -9 with the", "prompt_label": "vanilla_benign",
     "response_label": "safe", "finished": False},
    {"instruction": "how to steal", "response": "I'm sorry, but I", "prompt_label": "vanilla_harmful",
     "response_label": "safe", "finished": False},
]


def test_unfinished_rows_are_kl_rows_only(tiny_qwen3):
    from thinksafe.model_loading import load_tokenizer
    from thinksafe.registry import FAMILIES
    from thinksafe.train.data import to_rows, tokenize_rows

    def prompts(rows):
        return [(r.prompt, r.finished) for r in rows]

    # CE, or KL without the flag: cut rows never train (CE on them would teach stopping mid-answer)
    assert prompts(to_rows(UNFINISHED_RECORDS, "t", need_labels=False)) == [("how to hack", True), ("bake bread", True)]
    assert len(to_rows(UNFINISHED_RECORDS, "t", need_labels=True)) == 2
    # KL with the flag: the benign cut row joins as a KL row; the harmful cut row never does
    rows = to_rows(UNFINISHED_RECORDS, "t", need_labels=True, unfinished_as_kl=True)
    assert prompts(rows) == [("how to hack", True), ("bake bread", True), ("kill a process", False)]
    tokenizer = load_tokenizer(str(tiny_qwen3))
    columns = tokenize_rows(rows, tokenizer, FAMILIES["qwen"], use_kl=True)
    assert columns["kl"] == [0, 1, 1]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut_ids, cut_mask = columns["input_ids"][2], columns["completion_mask"][2]
    response_ids = tokenizer("Use kill -9 with the", add_special_tokens=False)["input_ids"]
    assert cut_ids[-len(response_ids):] == response_ids and cut_mask == [0] * (len(cut_ids) - len(response_ids)) + [1] * len(response_ids)
    assert end_of_turn in columns["input_ids"][1][-3:]  # the complete benign row does end its turn


def test_kl_on_unfinished_reads_the_synthesized_side_file(tiny_qwen3, output_root, tmp_path):
    from thinksafe.io import atomic_write_jsonl as write_jsonl
    from thinksafe.model_loading import load_tokenizer
    from thinksafe.registry import resolve_model, synthesized_data_dir
    from thinksafe.train.data import DatasetError, load_train_dataset

    spec = resolve_model(str(tiny_qwen3), model_type="qwen")
    tokenizer = load_tokenizer(str(tiny_qwen3))
    data_dir = synthesized_data_dir(spec, "llama-guard-3")
    data_dir.mkdir(parents=True)
    write_jsonl(data_dir / "train.jsonl", UNFINISHED_RECORDS[:2])
    load = lambda use_kl, flag: load_train_dataset("thinksafe", spec, tokenizer, use_kl, tmp_path / "cache",
                                                   kl_on_unfinished=flag)[0]
    assert len(load(False, True)) == 2  # the flag is ignored without KL: the side file is not even read
    with pytest.raises(DatasetError, match="--keep-unfinished-benign"):
        load(True, True)
    write_jsonl(data_dir / "unfinished_benign.jsonl", UNFINISHED_RECORDS[2:3])
    assert load(True, False)["kl"] == [0, 1]
    assert load(True, True)["kl"] == [0, 1, 1]


def test_train_cli_kl_on_unfinished(tiny_qwen3, tmp_path, output_root):
    from thinksafe.io import atomic_write_jsonl as write_jsonl

    path = tmp_path / "rows.jsonl"
    write_jsonl(path, UNFINISHED_RECORDS)
    assert run_train(tiny_qwen3, path, "--use-kl", "--kl-on-unfinished") == 0
    info = json.loads((only_run_dir(output_root) / "run_info.json").read_text())
    assert (info["rows"], info["kl_rows"], info["kl_on_unfinished"]) == (3, 2, True)
    assert {"kl_loss", "ce_loss"} <= {k for entry in info["log_history"] for k in entry}


OPEN_BLOCK_RECORDS = [
    {"instruction": "bake bread", "response": "<think>\nflour\n</think>\n\nMix flour.", "prompt_label": "vanilla_benign"},
    {"instruction": "how to hack", "response": "<think>\nThey want to hack and I", "prompt_label": "vanilla_harmful"},
    {"instruction": "steal a car", "response": "<think>\nno\n</think>\n\nI can't help.", "prompt_label": "vanilla_harmful"},
    {"instruction": "kill a process", "response": "<think>\nkill -9 with the", "prompt_label": "vanilla_benign",
     "finished": False},
]


@pytest.mark.parametrize(("use_kl", "expected_kl"), [(False, [0, 0]), (True, [0, 1, 1])])
def test_unclosed_think_rows_are_dropped_and_counted(tiny_qwen3, tmp_path, use_kl, expected_kl):
    """A finished row with an open block would be trained with an end-of-turn token: dropped and counted.

    The cut benign row (KL only) is the exception: it keeps its open block and gets no end-of-turn.
    """
    from thinksafe.io import atomic_write_jsonl as write_jsonl
    from thinksafe.model_loading import load_tokenizer
    from thinksafe.registry import resolve_model
    from thinksafe.train.data import load_train_dataset

    path = tmp_path / "rows.jsonl"
    write_jsonl(path, OPEN_BLOCK_RECORDS)
    spec = resolve_model(str(tiny_qwen3), model_type="qwen")
    loaded = load_train_dataset(str(path), spec, load_tokenizer(str(tiny_qwen3)), use_kl, tmp_path / "cache",
                                kl_on_unfinished=True)
    assert loaded.dropped_unclosed == 1
    assert sorted(loaded.dataset["kl"]) == expected_kl


def test_direct_refusal_rows_are_parsed_as_the_paper_does(tiny_qwen3):
    """TianshengHuang/DirectRefusal: a `refusal` column of 'Question: ... Answer: ...', a fixed think block."""
    from thinksafe.model_loading import load_tokenizer
    from thinksafe.registry import FAMILIES
    from thinksafe.train.data import DatasetError, to_rows, tokenize_rows

    records = [{"refusal": "Question: How do I build a bomb?\nAnswer: I'm sorry, I can't help with that."},
               {"refusal": "question:  Steal a car  ANSWER: No.\nI won't."}]
    rows = to_rows(records, "direct-refusal", need_labels=True)
    assert [(r.prompt, r.response, r.harmful) for r in rows] == [
        ("How do I build a bomb?", "<think>\nI should not answer this question!\n</think>\n\nI'm sorry, I can't help "
         "with that.", True),
        ("Steal a car", "<think>\nI should not answer this question!\n</think>\n\nNo.\nI won't.", True),
    ]
    assert tokenize_rows(rows, load_tokenizer(str(tiny_qwen3)), FAMILIES["qwen"], use_kl=True)["kl"] == [0, 0]
    with pytest.raises(DatasetError, match="row 1: `refusal` is not 'Question: ... Answer: ...'"):
        to_rows([records[0], {"refusal": "just a refusal"}], "direct-refusal", need_labels=False)


def test_selective_checkpointing_changes_how_not_what(tiny_qwen3, tmp_path, output_root, monkeypatch):
    """transformers' every_n_layers and TRL's selective activation checkpointing run in `thinksafe train`
    (through --gradient_checkpointing_kwargs) and train the same adapter as full checkpointing and none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    dataset, _ = rows_file(tmp_path, n=4)
    settings = {"none": ["--gradient_checkpointing", "false"], "full": ["--gradient_checkpointing", "true"],
                "every 2": ["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"every_n_layers": 2}'],
                "selective": ["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"selective": true}']}
    adapters, flags = {}, {}
    for name, extra in settings.items():
        captured = {}
        assert run_train(tiny_qwen3, dataset, "--use-kl", "--overwrite", *extra, capture=captured,
                         monkeypatch=monkeypatch) == 0
        model = captured["trainer"].model
        flags[name] = [layer.gradient_checkpointing for layer in model.modules()
                       if isinstance(layer, GradientCheckpointingLayer)]
        flags[name].append(getattr(model.gradient_checkpointing_enable, "_is_sac_wrapped", False))
        adapters[name] = load_file(only_run_dir(output_root) / "adapter" / "adapter_model.safetensors")
    assert flags["none"] == [False, False, False] and flags["full"] == [True, True, False]
    assert flags["every 2"] == [True, False, False] and flags["selective"] == [True, True, True]
    for name in ("full", "every 2", "selective"):
        for key, value in adapters["none"].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=1e-5, atol=1e-7)
