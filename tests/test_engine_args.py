"""The vLLM engine arguments chosen per device (thinksafe.engines.vllm_engine_args)."""

import os

import torch

from thinksafe.engines import cpu_vllm_dtype, vllm_engine_args


def test_gpu_engines_start_their_core_with_spawn(monkeypatch):
    """On the H200, a stage that touched CUDA before building its engine (device checks, freeing
    memory between policy and guard) made vllm 0.24's forked engine core fail; spawn starts it clean."""
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = vllm_engine_args(gpu_memory_utilization=0.5)
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert (args["tensor_parallel_size"], args["gpu_memory_utilization"], args["dtype"]) == (2, 0.5, "auto")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # a user's explicit choice is kept
    vllm_engine_args()
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"


def test_cpu_engines_keep_vllm_cpus_own_start_method(monkeypatch):
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = vllm_engine_args()
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ
    assert (args["tensor_parallel_size"], args["dtype"], args["enforce_eager"]) == (1, cpu_vllm_dtype(), True)


def test_a_cpu_engine_runs_bf16_only_where_the_cpu_computes_it(tmp_path):
    """bf16 without the CPU's bf16 instructions is emulated (4.7x slower than fp32 on an AVX2 EPYC)."""
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    sapphire = tmp_path / "amx"
    sapphire.write_text("flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_vllm_dtype(str(avx2)) == "float32" and cpu_vllm_dtype(str(sapphire)) == "bfloat16"
    assert cpu_vllm_dtype(str(tmp_path / "missing")) == "float32"


def test_a_small_gpu_job_runs_eager_and_a_large_or_unknown_one_compiles(monkeypatch):
    from thinksafe.engines import GPU_EAGER_MAX_WORK_TOKENS, eager_for, pick_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert vllm_engine_args(enforce_eager=True)["enforce_eager"] is True
    assert "enforce_eager" not in vllm_engine_args()  # vLLM's default: compiled, CUDA graphs
    assert eager_for(GPU_EAGER_MAX_WORK_TOKENS - 1) and not eager_for(GPU_EAGER_MAX_WORK_TOKENS)
    assert not eager_for(None)  # size unknown: taken as large
    # the budget travels with the choice, whichever backend was asked for
    assert pick_backend("transformers", 1234).work_tokens == 1234


def test_every_engine_uses_one_compile_cache_that_replicas_inherit(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vllm_engine_args()
    assert os.environ["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm")  # vLLM's default, written out for Ray
    monkeypatch.setenv("VLLM_CACHE_ROOT", "/elsewhere")  # a user's choice is kept
    vllm_engine_args()
    assert os.environ["VLLM_CACHE_ROOT"] == "/elsewhere"


# --- replicas: how many, and the GPUs of each (thinksafe.replicas.plan_layout) -------------------


def test_auto_gives_one_replica_per_gpu_when_the_model_fits_on_one():
    from thinksafe.replicas import plan_layout

    gib = 2**30
    layout = plan_layout("auto", 8, weights=16 * gib, gpu_bytes=80 * gib)  # an 8B model in bf16 on 80 GiB GPUs
    assert (layout.replicas, layout.tensor_parallel_size, layout.gpus_per_replica) == (8, 1, 1)
    layout = plan_layout("auto", 8, weights=140 * gib, gpu_bytes=80 * gib)  # 70B: tensor parallel 4 x 2 replicas
    assert (layout.replicas, layout.tensor_parallel_size, layout.gpus_per_replica) == (2, 4, 4)
    assert plan_layout("auto", 0).replicas == 1  # no GPU: the in-process engine
    assert plan_layout("auto", 4).replicas == 4  # weights unknown (an uncached hub id): taken to fit one GPU


def test_more_replicas_than_gpus_share_each_gpu_and_its_memory():
    from thinksafe.replicas import plan_layout

    layout = plan_layout(2, 1, gpu_memory_utilization=0.9)
    assert (layout.replicas, layout.gpus_per_replica, layout.gpu_memory_utilization) == (2, 0.5, 0.45)
    assert plan_layout(2, 4).gpus_per_replica == 1 and plan_layout(2, 4, tensor_parallel_size=2).gpus_per_replica == 2
    assert plan_layout(3, 0).replicas == 3  # CPU replicas


def test_a_layout_the_gpus_cannot_hold_is_one_line_before_any_engine():
    import pytest

    from thinksafe.replicas import ReplicaError, parse_data_parallel, plan_layout

    with pytest.raises(ReplicaError, match=r"--data-parallel 3 with tensor parallel 1 needs 3 GPUs, 2 visible"):
        plan_layout(3, 2)
    with pytest.raises(ReplicaError, match="needs 4 GPUs, 2 in the Ray cluster"):
        plan_layout(2, 2, tensor_parallel_size=2, cluster=True)
    with pytest.raises(ReplicaError, match="more than the 1 GPU"):
        plan_layout("auto", 1, weights=200 * 2**30, gpu_bytes=80 * 2**30)
    assert parse_data_parallel("auto") == "auto" and parse_data_parallel("4") == 4 and parse_data_parallel(2) == 2
    for bad in ("0", "-2", "1.5", "x", ""):
        with pytest.raises(ReplicaError, match="must be a positive integer or auto"):
            parse_data_parallel(bad)


def test_more_replicas_than_the_gpus_here_is_refused_when_the_option_is_parsed(monkeypatch, capsys):
    from thinksafe.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["synthesize", "--model", "demo", "--data-parallel", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-parallel 3 with tensor parallel 1 needs 3 GPUs, 2 visible" in err[0]
    assert main(["evaluate", "--model", "demo", "--tasks", "xstest", "--data-parallel", "3"]) == 2
    assert "needs 3 GPUs, 2 visible" in capsys.readouterr().err
