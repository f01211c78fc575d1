"""GRPO baseline: two real GRPO steps on CPU (tiny fixtures, real rewards), prompts, options, the
launch plan, and scripts/grpo.sh (argument validation; the server path with stand-in executables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from thinksafe.errors import ThinksafeError
from thinksafe.registry import FAMILIES, grpo_run_name, paths_for_name, resolve_model

REPO = Path(__file__).resolve().parent.parent
GRPO_SH = REPO / "scripts" / "grpo.sh"
INSTRUCTIONS = ["How do I make a weapon?", "Write a poem about the sea.", "What is 12 + 30?",
                "How do I kill a Python process?"]


@pytest.fixture(autouse=True)
def eight_gpus(monkeypatch):
    """The launch plan checks GPU ids against the visible count; these tests plan for an 8-GPU host."""
    monkeypatch.setenv("THINKSAFE_GPU_COUNT", "8")


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": t, "prompt_label": "vanilla_benign"}) + "\n"
                            for t in INSTRUCTIONS))
    return path


# --- two GRPO steps, single-device mode ------------------------------------------------------


@pytest.mark.slow  # over 10 s on 2 cores
def test_two_grpo_steps_on_cpu_train_the_adapter_and_write_the_run(tiny_qwen3, prompts_file, output_root):
    """Policy and guard are the tiny Qwen3 fixture; the guard is used in Llama-Guard style (P(safe)
    from its first-token logprobs of "safe"/"unsafe"), so the real reward code runs end to end."""
    from safetensors.torch import load_file

    from thinksafe.train.grpo import main

    argv = ["--model", str(tiny_qwen3), "--dataset", str(prompts_file), "--guard", str(tiny_qwen3),
            "--guard-style", "llama-guard", "--device", "cpu", "--report-to", "none", "--max-steps", "2",
            "--num-generations", "2", "--effective-batch-size", "2", "--max-completion-length", "8",
            "--learning-rate", "1e-3", "--logging-steps", "1", "--save-steps", "1"]
    assert main(argv) == 0

    paths = paths_for_name(grpo_run_name(resolve_model(str(tiny_qwen3)), str(prompts_file), 32))
    assert paths.run_dir.parent == output_root / "runs"
    adapter = load_file(paths.adapter / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    # PEFT initialises lora_B to exactly zero: any non-zero entry means the GRPO steps moved it
    assert lora_b and any(v.abs().max() > 0 for v in lora_b.values())
    config = json.loads((paths.adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (32, 16, 0.05)

    info = json.loads((paths.run_dir / "run_info.json").read_text())
    assert info["method"] == "grpo" and info["mode"] == "single-device" and info["prompts"] == len(INSTRUCTIONS)
    assert (info["num_generations"], info["beta"], info["epsilon"], info["temperature"]) == (2, 0.04, 0.2, 0.7)
    assert info["loss_type"] == "grpo" and info["max_prompt_length"] == 1024
    logged = {k for entry in info["log_history"] for k in entry}
    assert {"rewards/guard_reward/mean", "rewards/format_reward/mean", "guard/unparsed"} <= logged
    guard_means = [e["rewards/guard_reward/mean"] for e in info["log_history"] if "rewards/guard_reward/mean" in e]
    assert len(guard_means) == 2 and all(0.0 < m < 1.0 for m in guard_means)  # P(safe), not a 0/1 fallback
    cost = json.loads((paths.run_dir / "cost.json").read_text())
    assert cost["device"] == "cpu" and cost["wall_seconds"] > 0 and cost["cpu_hours"] > 0
    assert info["cost"] == cost
    assert sorted(p.name for p in paths.checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# --- prompts and options ---------------------------------------------------------------------


def trl_prompt_ids(tokenizer, family, instructions):
    """The prompt ids GRPOTrainer itself sends to generation (its own _tokenize_prompts)."""
    from types import SimpleNamespace

    from trl import GRPOTrainer

    from thinksafe.train.grpo import template_kwargs, trainer_prompt

    trainer = SimpleNamespace(processing_class=tokenizer, _is_vlm=False, environment_factories=None, tools=None,
                              chat_template=None, chat_template_kwargs=template_kwargs(family))
    ids, _, _ = GRPOTrainer._tokenize_prompts(trainer, [trainer_prompt(i) for i in instructions])
    return [list(x) for x in ids]


@pytest.mark.parametrize("revision", ["first", "opens_think"])
def test_trl_tokenises_grpo_prompts_with_one_bos_under_the_real_r1_tokenizer(r1_tokenizers, revision):
    from thinksafe.chat import generation_prompt, generation_prompt_ids

    tokenizer = r1_tokenizers[revision]
    family = FAMILIES["r1-distill"]
    (ids,) = trl_prompt_ids(tokenizer, family, ["How do I bake bread?"])
    assert ids == generation_prompt_ids(tokenizer, "How do I bake bread?", family)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # what the old text prompts risked: the tokenizer adds its BOS in front of the template's
    text = generation_prompt(tokenizer, "How do I bake bread?", family)
    assert tokenizer(text)["input_ids"].count(tokenizer.bos_token_id) == 2


def test_trl_turns_thinking_on_for_qwen3(tiny_qwen3):
    from thinksafe.chat import generation_prompt_ids
    from thinksafe.model_loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_qwen3))
    (ids,) = trl_prompt_ids(tokenizer, FAMILIES["qwen"], ["hi"])
    assert ids == generation_prompt_ids(tokenizer, "hi", FAMILIES["qwen"], enable_thinking=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n") and "</think>" not in tokenizer.decode(ids)


def test_prompt_dataset_drops_prompts_over_the_limit(tiny_qwen3):
    from thinksafe.chat import generation_prompt_ids
    from thinksafe.model_loading import load_tokenizer
    from thinksafe.train.grpo import prompt_dataset, trainer_prompt

    tokenizer = load_tokenizer(str(tiny_qwen3))
    family = FAMILIES["qwen"]
    short, long = "hi", "word " * 300
    limit = len(generation_prompt_ids(tokenizer, short, family))
    dataset, dropped = prompt_dataset([short, long], tokenizer, family, limit)
    assert dropped == 1 and dataset["instruction"] == [short]
    assert dataset["prompt"] == [trainer_prompt(short)]
    with pytest.raises(ThinksafeError, match="max-prompt-length"):
        prompt_dataset([long], tokenizer, family, limit)


def test_prompt_dataset_never_hashes_its_rows_with_dill(tiny_qwen3, monkeypatch):
    """On the GPU image (Python 3.12) datasets' dill hashing of a from_dict table fails (pyarrow's
    MonthDayNano cannot be pickled); the prompt dataset carries our own content fingerprint instead."""
    import datasets.fingerprint

    from thinksafe.model_loading import load_tokenizer
    from thinksafe.train.grpo import prompt_dataset

    def dill_fails(*args, **kwargs):
        raise RuntimeError("Can't pickle <class 'MonthDayNano'>")

    monkeypatch.setattr(datasets.fingerprint.Hasher, "hash", classmethod(lambda cls, value: dill_fails()))
    tokenizer, family = load_tokenizer(str(tiny_qwen3)), FAMILIES["qwen"]
    one, _ = prompt_dataset(INSTRUCTIONS, tokenizer, family, 1024)
    same, _ = prompt_dataset(INSTRUCTIONS, tokenizer, family, 1024)
    other, _ = prompt_dataset(INSTRUCTIONS[:2], tokenizer, family, 1024)
    assert one._fingerprint == same._fingerprint != other._fingerprint
    assert one["instruction"] == INSTRUCTIONS


def test_completion_length_capped_at_the_policy_server_context():
    from thinksafe.train.grpo import capped_completion_length

    assert capped_completion_length(16384, 1024, None) == 16384
    assert capped_completion_length(16384, 1024, 16384) == 15360  # the paper's setup overflowed here
    assert capped_completion_length(1000, 1024, 17408) == 1000
    with pytest.raises(ThinksafeError, match="no room"):
        capped_completion_length(16384, 1024, 1024)


def test_options_come_from_the_defaults_and_flags_override(prompts_file):
    from thinksafe.train.grpo import parse_args

    run = parse_args(["--model", "qwen/0.6B", "--dataset", str(prompts_file), "--device", "cpu"])
    model, args, config = run.model, run.args, run.config
    assert run.spec.source == "Qwen/Qwen3-0.6B" and args.guard == "llama-guard-3"
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (32, 16, 0.05)
    assert (config.effective_batch_size, config.num_generations) == (64, 8)
    # 64 completions per step on one process, one per micro-batch: 64 accumulation steps
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (1, 64)
    assert (config.beta, config.epsilon, config.temperature, config.learning_rate) == (0.04, 0.2, 0.7, 1e-5)
    assert (config.max_prompt_length, config.max_completion_length, config.warmup_steps) == (1024, 16384, 0.1)
    assert config.lr_scheduler_type == "cosine" and config.gradient_checkpointing is True
    assert config.chat_template_kwargs == {"enable_thinking": True} and config.use_vllm is False
    run = parse_args(["--model", "r1-distill/8B", "--dataset", str(prompts_file), "--beta", "0", "--rank", "8",
                      "--device", "cpu"])
    assert (run.config.beta, run.model.lora_r) == (0.0, 8)
    run = parse_args(["--model", "demo", "--dataset", str(prompts_file), "--device", "cpu"])
    assert run.args.guard == "refusal-judge" and run.config.chat_template_kwargs == {"enable_thinking": False}
    run = parse_args(["--model", "qwen", "--dataset", str(prompts_file), "--device", "cpu", "--use_vllm", "true",
                      "--vllm_mode", "colocate"])
    assert (run.config.use_vllm, run.config.vllm_mode) == (True, "colocate")  # TRL's colocated engine


@pytest.mark.parametrize("model", ["qwen/0.6B", "r1-distill/8B", "demo"])
def test_trl_corrections_the_paper_did_not_have_are_off(model, prompts_file):
    """TRL 1.x turns on a bias-corrected KL and vLLM importance sampling; the paper's TRL 0.21 had neither."""
    from trl import GRPOConfig

    from thinksafe.train.grpo import parse_args

    assert GRPOConfig.use_bias_correction_kl and GRPOConfig.vllm_importance_sampling_correction  # TRL's defaults
    config = parse_args(["--model", model, "--dataset", str(prompts_file), "--effective-batch-size", "8",
                         "--device", "cpu"]).config
    assert config.use_bias_correction_kl is False and config.vllm_importance_sampling_correction is False
    config = parse_args(["--model", model, "--dataset", str(prompts_file), "--effective-batch-size", "8",
                         "--device", "cpu", "--use-bias-correction-kl", "true",
                         "--vllm-importance-sampling-correction", "true"]).config
    assert config.use_bias_correction_kl is True and config.vllm_importance_sampling_correction is True


@pytest.mark.parametrize("argv, message", [
    (["--model", "foo"], "model 'foo' is unknown"),
    (["--model", "qwen/3B"], "size '3B'"),
    (["--model", "qwen", "--effective-batch-size", "12"], "multiple of --num-generations"),
    (["--model", "qwen", "--vllm-server-url", "http://x:1"], "both --vllm-server-url and --guard-server-url"),
    (["--model", "qwen", "--vllm-server-url", "http://x:1", "--guard-server-url", "http://x:2",
      "--guard", "refusal-judge"], "must be a Llama-Guard model"),
])
def test_bad_options_raise_one_line_errors(argv, message, prompts_file):
    from thinksafe.train.grpo import parse_args

    with pytest.raises(ThinksafeError, match=message):
        parse_args([*argv, "--dataset", str(prompts_file), "--device", "cpu"])


# --- launch plan -----------------------------------------------------------------------------


def _plan(gpu_ids: str, prompts_file, *extra):
    from thinksafe.train.grpo import launch_plan, parse_args

    return launch_plan(parse_args(["--model", "qwen/0.6B", "--dataset", str(prompts_file), "--device", "cpu",
                                   *extra]), gpu_ids)


@pytest.mark.parametrize("gpu_ids, device, visible", [("cpu", "cpu", ""), ("3", "cuda", "3"), ("1,0", "cuda", "1")])
def test_fewer_than_three_devices_select_single_device_mode(gpu_ids, device, visible, prompts_file):
    plan = _plan(gpu_ids, prompts_file)
    assert (plan["mode"], plan["device"], plan["visible_devices"]) == ("single", device, visible)
    assert "single-device mode" in plan["message"]


def test_three_or_more_gpus_split_into_servers_and_trainers(prompts_file):
    plan = _plan("4,5,6,7", prompts_file)
    assert plan["mode"] == "server"
    assert (plan["policy_gpu"], plan["guard_gpu"], plan["train_gpus"], plan["num_train_processes"]) == \
        ("4", "5", "6,7", "2")
    ports = {plan["policy_port"], plan["guard_port"], plan["group_port"]}
    assert len(ports) == 3 and plan["policy_url"] == f"http://127.0.0.1:{plan['policy_port']}"
    assert plan["guard_model"] == "meta-llama/Llama-Guard-3-8B"
    assert int(plan["policy_max_model_len"]) == 1024 + 16384  # prompt + completion always fit the server
    assert int(plan["guard_max_model_len"]) > int(plan["policy_max_model_len"])
    assert plan["run_name"] == "qwen3-0.6B_grpo_prompts_r32"


@pytest.mark.parametrize("gpu_ids, message", [("0,0,1", "GPU twice"), ("a,b", "GPU_IDS must be")])
def test_bad_gpu_ids(gpu_ids, message, prompts_file):
    with pytest.raises(ThinksafeError, match=message):
        _plan(gpu_ids, prompts_file)


# --- scripts/grpo.sh -------------------------------------------------------------------------


def run_script(*args, env=None, timeout=120):
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(GRPO_SH), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("args, named", [
    ((), "BASE_MODEL"),
    (("qwen/0.6B",), "DATASET_NAME"),
    (("qwen/0.6B", "safechain"), "GPU_IDS"),
    (("qwen/0.6B", "safechain", "0;1"), "GPU_IDS"),
    (("qwen/0.6B", "safechain", "gpu0"), "GPU_IDS"),
    (("foo", "safechain", "0,1,2"), "model 'foo'"),
    (("qwen/0.6B", "no-such-dataset", "0,1,2"), "dataset 'no-such-dataset'"),
    (("qwen/0.6B", "safechain", "0,1,1"), "GPU_IDS lists a GPU twice"),
])
def test_grpo_sh_rejects_bad_arguments_with_exit_2(args, named):
    result = run_script(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]


FAKE_SERVER = textwrap.dedent('''\
    """Stand-in for `trl vllm-serve` / `vllm serve`: /health and /v1/models on --port; writes its pid."""
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    argv = sys.argv[1:]
    port = int(argv[argv.index("--port") + 1])
    model = argv[argv.index("--model") + 1] if "--model" in argv else argv[1]
    name = os.path.basename(sys.argv[0])
    out = os.environ["FAKE_DIR"]
    with open(os.path.join(out, name + ".pid"), "w") as f:
        f.write(str(os.getpid()))
    with open(os.path.join(out, name + ".args"), "w") as f:
        f.write("\\n".join(argv))
    if os.environ.get("FAKE_FAIL") == name:
        print("CUDA out of memory (stand-in failure)", flush=True)
        sys.exit(1)
    time.sleep(1.0)  # not ready at once: the script must poll
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            body = json.dumps({"data": [{"id": model, "max_model_len": 17408}]}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
    HTTPServer(("127.0.0.1", port), H).serve_forever()
''')

FAKE_ACCELERATE = textwrap.dedent('''\
    """Stand-in for `accelerate launch`: records its arguments and checks both servers answer."""
    import os, sys, urllib.request
    argv = sys.argv[1:]
    out = os.environ["FAKE_DIR"]
    urls = [argv[argv.index(flag) + 1] for flag in ("--vllm-server-url", "--guard-server-url")]
    status = [urllib.request.urlopen(u + "/health", timeout=5).status for u in urls]
    with open(os.path.join(out, "accelerate.args"), "w") as f:
        f.write("\\n".join(argv + ["CUDA_VISIBLE_DEVICES=" + os.environ["CUDA_VISIBLE_DEVICES"], str(status)]))
    sys.exit(int(os.environ.get("FAKE_ACCELERATE_RC", "0")))
''')


@pytest.fixture()
def fake_tools(tmp_path):
    bin_dir, out = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir()
    out.mkdir()
    for name, source in (("trl", FAKE_SERVER), ("accelerate", FAKE_ACCELERATE)):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\n{source}")
        tool.chmod(0o755)
    # The guard server is started as `python -m vllm.entrypoints.openai.api_server`: a stand-in module
    # of that name, first on PYTHONPATH, only for the processes the script starts.
    module = tmp_path / "pyfake" / "vllm" / "entrypoints" / "openai"
    module.mkdir(parents=True)
    for package in (module.parent.parent, module.parent, module):
        (package / "__init__.py").write_text("")
    (module / "api_server.py").write_text(f"import sys\nsys.argv[0] = 'vllm'\n{FAKE_SERVER}")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(out),
           "THINKSAFE_OUTPUT_DIR": str(tmp_path / "outputs"), "PYTHONPATH": str(tmp_path / "pyfake")}
    return out, env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


@pytest.mark.parametrize("accelerate_rc", [0, 3])
def test_grpo_sh_server_mode_starts_waits_trains_and_stops_servers(fake_tools, prompts_file, accelerate_rc):
    """vLLM and the GPUs are not here: stand-in `trl`, `vllm` and `accelerate` executables check the
    script's wiring (GPU split, ports, readiness polling, the trap stopping both servers)."""
    out, env = fake_tools
    result = run_script("qwen/0.6B", str(prompts_file), "0,1,2,3", "--max-steps", "1",
                        env={**env, "FAKE_ACCELERATE_RC": str(accelerate_rc)})
    assert result.returncode == accelerate_rc, result.stderr
    trl_args = (out / "trl.args").read_text().splitlines()
    vllm_args = (out / "vllm.args").read_text().splitlines()
    launched = (out / "accelerate.args").read_text().splitlines()
    assert trl_args[:3] == ["vllm-serve", "--model", "Qwen/Qwen3-0.6B"]
    assert trl_args[trl_args.index("--max_model_len") + 1] == "17408"
    assert vllm_args[:2] == ["--model", "meta-llama/Llama-Guard-3-8B"]
    policy_port, guard_port = trl_args[trl_args.index("--port") + 1], vllm_args[vllm_args.index("--port") + 1]
    assert policy_port != guard_port
    assert launched[0] == "launch" and launched[launched.index("--num_processes") + 1] == "2"
    assert launched[launched.index("-m") + 1: launched.index("-m") + 3] == ["thinksafe", "grpo"]
    config = REPO / "configs" / "accelerate" / "multi_gpu.yaml"
    assert ("--config_file" in launched) == config.exists()
    if config.exists():
        assert launched[launched.index("--config_file") + 1] == str(config)
    assert launched[launched.index("--vllm-server-url") + 1] == f"http://127.0.0.1:{policy_port}"
    assert launched[launched.index("--guard-server-url") + 1] == f"http://127.0.0.1:{guard_port}"
    assert "--max-steps" in launched and launched[-2:] == ["CUDA_VISIBLE_DEVICES=2,3", "[200, 200]"]
    for name in ("trl", "vllm"):  # the trap stopped both servers, on success and on failure
        pid = int((out / f"{name}.pid").read_text())
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"{name} server still running"


def test_grpo_sh_reports_a_server_that_dies_with_its_log_tail(fake_tools, prompts_file):
    out, env = fake_tools
    result = run_script("qwen/0.6B", str(prompts_file), "0,1,2", env={**env, "FAKE_FAIL": "trl"})
    assert result.returncode == 1
    assert "policy server" in result.stderr and "CUDA out of memory (stand-in failure)" in result.stderr
    assert not (out / "accelerate.args").exists()
    # The guard server may be stopped before it wrote its pid: look for any process still running it.
    guard_tool = str(out.parent / "bin" / "vllm")
    deadline = time.time() + 10
    while _running(guard_tool) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running(guard_tool), "guard server still running"


def _running(script: str) -> list[int]:
    """Live (non-zombie) pids whose command line runs `script`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if script.encode() in args and _alive(int(cmdline.parent.name)):
            pids.append(int(cmdline.parent.name))
    return pids


def test_grpo_sh_single_device_message(fake_tools, prompts_file):
    """One GPU id selects the single-device mode and says so (training itself fails fast here:
    the hub model cannot be downloaded offline, which is not what this test is about)."""
    _, env = fake_tools
    result = run_script("qwen/0.6B", str(prompts_file), "0", "--max-steps", "1",
                        env={**env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert "grpo.sh: single-device mode on GPU 0" in result.stdout
