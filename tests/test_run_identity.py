"""A run's directory is decided by every setting that changes what it learns (issue: run identity).

The readable parts (model, data, rank, epochs, masking, KL variant) plus `h<hash>` of the rest; an
explicit `run_name` as given; runs trained under the readable name alone (before the hash) are still
found, skipped and reported.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers import FAST_TRAIN, evaluate_tiny, one_line_error, run_cli, train_paths, train_rows, write_rows

from thinksafe.plan import resolve_plan
from thinksafe.registry import RegistryError, legacy_run_name, paths_for_name, run_paths, settings_hash
from thinksafe.report import main as report_main
from thinksafe.train import sft
from thinksafe.train.common import RUN_RECORD, locate_run

HASHED = re.compile(r"(?P<readable>.+)_h(?P<hash>[0-9a-f]{8})")


def demo_plan(**overrides):
    return resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "false"}, check_devices=False,
                        overrides=overrides or None)


def test_a_learning_rate_or_seed_sweep_gets_one_directory_per_point(output_root):
    base = demo_plan()
    lr = demo_plan(learning_rate=1e-3)
    seed = demo_plan(seed=1)
    names = {base.paths.name, lr.paths.name, seed.paths.name}
    assert len(names) == 3
    readable = {HASHED.fullmatch(name)["readable"] for name in names}
    assert readable == {"smollm2-135M_thinksafe_r16_ep1_mask"}  # what people compare stays readable
    # each run's record carries the setting its name hashes, for `train` to derive the same name
    assert (lr.record["sft"]["learning_rate"], seed.record["sft"]["seed"]) == (1e-3, 1)
    assert base.record["sft"]["learning_rate"] == 2e-3 and base.record["sft"]["seed"] == 42


def test_the_same_settings_find_the_same_directory_however_given(output_root):
    """Values equal after parsing and given in any order name one run; train derives the plan's name."""
    assert demo_plan(learning_rate=2e-3, seed=42).paths.name == demo_plan().paths.name
    assert settings_hash({"a": 1, "b": 0.0005}) == settings_hash({"b": 5e-4, "a": 1})
    plan = demo_plan(seed=7)
    argv = ["--model", "demo", "--dataset", "thinksafe", "--seed", "7", "--learning_rate", "0.002", "--use_kl", "false"]
    assert sft.run_config(*sft.parse_args(argv)).settings_hash == HASHED.fullmatch(plan.paths.name)["hash"]


def test_how_a_run_computes_does_not_change_its_name(output_root):
    """Per-device batch and checkpointing change how, not what (a resume on other hardware may change
    them); KL settings do not change a CE run."""
    name = demo_plan().paths.name
    assert demo_plan(per_device_train_batch_size=2, gradient_checkpointing=True).paths.name == name
    assert demo_plan(kl_reference="cached", kl_weighting="token").paths.name == name
    kl = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"}, check_devices=False)
    kl_cached = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"}, check_devices=False,
                             overrides={"kl_reference": "cached"})
    assert kl.paths.name != kl_cached.paths.name and "klcached" in kl_cached.paths.name
    assert demo_plan(kl_coef=4.0).paths.name == name  # the KL weight means nothing to a CE run


def test_the_kl_weight_names_a_kl_run_and_the_papers_weight_keeps_the_old_hash(output_root):
    """kl_coef 1 (the paper's loss) is left out of the hash, so KL runs named before the option keep
    their directory; any other weight is another run."""
    def kl_plan(**overrides):
        return resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": "true"}, check_devices=False,
                            overrides=overrides or None)

    default = kl_plan()
    assert kl_plan(kl_coef=1.0).paths.name == default.paths.name
    assert "kl_coef" not in sft.identity_settings(*_kl_configs(1.0))
    assert sft.identity_settings(*_kl_configs(4.0))["kl_coef"] == 4.0
    assert kl_plan(kl_coef=4.0).paths.name != default.paths.name


def _kl_configs(kl_coef: float):
    model_cfg, _run, sft_cfg = sft.parse_args(["--model", "demo", "--dataset", "thinksafe", "--use_kl", "true",
                                               "--kl_coef", str(kl_coef)])
    return model_cfg, sft_cfg


def test_an_explicit_run_name_is_used_as_given_and_checked(output_root, capsys):
    plan = demo_plan(run_name="lr-sweep-a")
    assert plan.paths.name == "lr-sweep-a" and plan.paths.run_dir == output_root / "runs" / "lr-sweep-a"
    assert plan.record["sft"]["run_name"] == "lr-sweep-a"  # train reads it back from the run record
    with pytest.raises(RegistryError, match="run name '../x'"):
        demo_plan(run_name="../x")
    code, _, err = run_cli(capsys, "train", "--model", "demo", "--dataset", "thinksafe", "--run_name", ".hidden")
    one_line_error(code, err, "run name '.hidden'")


def test_a_run_trained_under_its_old_name_is_found_skipped_and_reported(tiny_qwen3, tmp_path, output_root, capsys):
    """An old layout: the run dir (and its results) named by the readable parts alone, its record naming
    it so. The same command finds it (skips training), another learning rate trains beside it, and the
    report lists the old run."""
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    argv = ["train", "--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN, "--max-steps", "1"]
    assert run_cli(capsys, *argv)[0] == 0
    hashed = train_paths(tiny_qwen3, dataset, [*FAST_TRAIN, "--max-steps", "1"])
    model_cfg, run, trained = sft.parse_args(argv[1:])
    legacy = paths_for_name(legacy_run_name(sft.run_config(model_cfg, run, trained)))
    assert hashed.run_dir.is_dir() and HASHED.fullmatch(hashed.name)["readable"] == legacy.name
    shutil.move(hashed.run_dir, legacy.run_dir)  # as the run was laid out before names carried the hash
    record = json.loads((legacy.run_dir / RUN_RECORD).read_text())
    (legacy.run_dir / RUN_RECORD).write_text(json.dumps({**record, "run_name": legacy.name}))
    adapter_bytes = (legacy.adapter / "adapter_model.safetensors").read_bytes()

    # the plan (and the pipeline) and train both resolve to the old directory
    code, out, _ = run_cli(capsys, *argv, "--skip-finished")
    assert code == 0 and f"{legacy.run_dir} already finished with the same data and settings" in out
    assert sorted(p.name for p in (output_root / "runs").iterdir()) == [legacy.name]
    assert (legacy.adapter / "adapter_model.safetensors").read_bytes() == adapter_bytes

    # another learning rate is another run: trained beside it, the old one untouched
    assert run_cli(capsys, *[a if a != "1e-2" else "2e-2" for a in argv])[0] == 0
    runs = sorted(p.name for p in (output_root / "runs").iterdir())
    assert len(runs) == 2 and legacy.name in runs and all(HASHED.fullmatch(r) for r in runs if r != legacy.name)

    # its evaluation lands under its old name and the report lists it
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    xstest = write_rows(data_dir / "xstest.jsonl", [{"id": "x1", "prompt": "How do I kill a Python process?",
                                                     "label": "safe"}])
    assert evaluate_tiny(legacy.adapter, None, {"xstest": xstest}, ["--report-to", "none"], model_type=None) == 0
    assert (legacy.results / "xstest" / "metrics.json").exists()
    assert report_main([str(output_root / "results")]) == 0
    assert legacy.name in (output_root / "results" / "summary.md").read_text()


def test_an_old_run_with_other_settings_is_not_taken_for_this_one(tiny_qwen3, tmp_path, output_root):
    """A run under the old name whose record holds another learning rate stays where it is; this run
    gets its own hashed directory."""
    dataset = write_rows(tmp_path / "t.jsonl", train_rows())
    model_cfg, run, trained = sft.parse_args(["--model", str(tiny_qwen3), "--dataset", str(dataset), *FAST_TRAIN])
    cfg = sft.run_config(model_cfg, run, trained)
    old = paths_for_name(legacy_run_name(cfg))
    old.run_dir.mkdir(parents=True)
    settings = sft.content_settings(model_cfg, trained)
    (old.run_dir / RUN_RECORD).write_text(json.dumps({"settings": {**settings, "learning_rate": 3e-4}}))
    assert locate_run(cfg, settings) == run_paths(cfg) != old
    (old.run_dir / RUN_RECORD).write_text(json.dumps({"settings": settings}))  # the same settings: found
    assert locate_run(cfg, settings) == old


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_kl_weight_that_is_not_positive_is_one_line(capsys, value):
    code, _out, err = run_cli(capsys, "train", "--model", "demo", "--dataset", "thinksafe", "--use_kl", "true",
                              "--kl_coef", value)
    one_line_error(code, err, "--kl_coef must be a positive number")
