"""Live progress lines: done/total, rate and ETA, printed at most every few seconds and at the end."""

import io
import os

import pytest

from thinksafe.engines import HFGenerator
from thinksafe.progress import Progress, format_seconds
from thinksafe.registry import FAMILIES


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_give_done_total_rate_and_eta_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    with Progress("generate", 100, "samples", every_s=10, stream=out, clock=clock) as progress:
        clock.now = 5.0
        progress.update(10)  # too soon: nothing printed
        clock.now = 20.0
        progress.update(30)
    lines = out.getvalue().splitlines()
    assert lines[0] == "generate: 40/100 samples (40%), 2.00 samples/s, elapsed 20s, ETA 30s"
    assert len(lines) == 2 and lines[1].startswith("generate: 40/100 samples")  # the closing line
    assert format_seconds(3725) == "1h02m" and format_seconds(125) == "2m05s"


def test_transformers_generation_reports_every_sample_batch_by_batch(tiny_qwen3):
    out = io.StringIO()
    generator = HFGenerator(str(tiny_qwen3), FAMILIES["qwen"], device="cpu", batch_size=2)
    sampling = FAMILIES["qwen"].sampling.replace(max_new_tokens=3, n=3)
    progress = Progress("generate", 9, "samples", every_s=0, stream=out)
    generator.chat(["a", "b", "c"], sampling, progress=progress)
    done = [line.split(":")[1].split("/")[0].strip() for line in out.getvalue().splitlines()]
    assert done == ["2", "4", "6", "8", "9"]  # one line per batch of 2 samples, the last batch of 1


def test_cpu_threads_leave_the_cores_other_processes_run_on(monkeypatch):
    from thinksafe import model_loading

    monkeypatch.delenv(model_loading.THREADS_ENV, raising=False)
    monkeypatch.setattr(model_loading.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(model_loading, "runnable_processes", lambda: 1)  # only this process
    assert model_loading.cpu_threads() == 4
    monkeypatch.setattr(model_loading, "runnable_processes", lambda: 3)  # two others running
    assert model_loading.cpu_threads() == 2
    monkeypatch.setattr(model_loading, "runnable_processes", lambda: 9)
    assert model_loading.cpu_threads() == 1
    monkeypatch.setenv(model_loading.THREADS_ENV, "3")
    assert model_loading.cpu_threads() == 3


def test_run_queue_is_read_from_proc():
    from thinksafe.model_loading import runnable_processes

    assert runnable_processes(samples=3, interval_s=0.0) >= 1  # this process is running while it reads


def test_this_process_threads_count_once_in_the_run_queue(monkeypatch):
    """Read between batches, this process's own torch threads (still spinning) are not other processes:
    the real /proc count of them, and the run queue minus them."""
    import threading

    import torch

    from thinksafe import model_loading

    stop = threading.Event()

    def busy():  # torch releases the GIL in matmul: its OpenMP threads run beside this one
        a = torch.randn(400, 400)
        while not stop.is_set():
            a @ a

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    worker = threading.Thread(target=busy)
    worker.start()
    try:
        seen = max(model_loading._running_threads_of_this_process() for _ in range(50))
    finally:
        stop.set()
        worker.join()
        torch.set_num_threads(threads)
    assert seen >= 2  # the reading thread and at least one torch thread
    monkeypatch.setattr(model_loading, "_running_tasks_of_the_machine", lambda: 5)
    monkeypatch.setattr(model_loading, "_running_threads_of_this_process", lambda: 3)
    monkeypatch.setattr(model_loading, "_running_threads_of_lower_priority", lambda: 0)
    assert model_loading.runnable_processes(samples=3, interval_s=0.0) == 3  # 5 running, 3 of them ours: 2 others + us
    monkeypatch.setattr(model_loading, "_running_threads_of_lower_priority", lambda: 2)
    assert model_loading.runnable_processes(samples=3, interval_s=0.0) == 1  # the 2 others are niced below us


@pytest.mark.skipif(os.nice(0) >= 19, reason="nothing can be niced below a process at nice 19")
def test_a_busy_process_niced_below_this_one_is_read_from_proc():
    """A `nice -n 19` busy loop is seen as lower-priority work (it does not take a core from a stage)."""
    import subprocess
    import sys
    import time

    from thinksafe import model_loading

    busy = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        seen = 0
        while not seen and time.monotonic() < deadline:
            seen = model_loading._running_threads_of_lower_priority()
            time.sleep(0.05)
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 1


def test_threads_are_re_read_at_most_every_so_often(monkeypatch):
    from thinksafe import model_loading

    reads = []
    monkeypatch.delenv(model_loading.THREADS_ENV, raising=False)
    monkeypatch.setattr(model_loading, "cpu_threads", lambda: reads.append(1) or 1)
    monkeypatch.setitem(model_loading._last_thread_check, "at", float("-inf"))
    model_loading.use_idle_cpu_threads()
    model_loading.use_idle_cpu_threads(every_s=60)  # within a minute of the last read: no read
    assert len(reads) == 1
    model_loading.use_idle_cpu_threads()  # a new phase reads again
    assert len(reads) == 2
