"""The vLLM engine arguments chosen per device (thinksafe.engines.vllm_engine_args)."""

import os

import torch

from thinksafe.engines import vllm_engine_args


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
    assert (args["tensor_parallel_size"], args["dtype"], args["enforce_eager"]) == (1, "bfloat16", True)
