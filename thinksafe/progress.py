"""Live progress of a long phase: done/total, rate and ETA, as plain lines.

Hand-written rather than a tqdm bar on purpose: a stage's output goes to a log file, where a redrawn
bar is unreadable, and the units that matter (samples generated, rows judged) finish inside a batch,
below a chunk's granularity. A line is printed at most every `every_s` seconds, and once at the end;
under the pipeline each line also goes to its terminal (thinksafe.console), redrawn in place there.
"""

from __future__ import annotations

import sys
import time

from thinksafe import console

DEFAULT_EVERY_S = 10.0


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, label: str, total: int, unit: str, every_s: float = DEFAULT_EVERY_S, stream=None,
                 clock=time.monotonic):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0
        self.started = self.last_shown = clock()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 and self.total else "?"
        return (f"{self.label}: {self.done}/{self.total} {self.unit}{share}, {rate:.2f} {self.unit}/s, "
                f"elapsed {format_seconds(elapsed)}, ETA {eta}")

    def update(self, n: int) -> None:
        self.done += n
        if self.clock() - self.last_shown >= self.every_s:
            self.show()

    def show(self, final: bool = False) -> None:
        self.last_shown = self.clock()
        line = self.line()
        print(line, file=self.stream, flush=True)
        console.progress(line, final=final)

    def close(self) -> None:
        self.show(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vllm_progress(progress: Progress | None):
    """vLLM's `use_tqdm` argument that forwards its per-request counts (samples) to `progress`:
    a real tqdm (vLLM reads its `n` and elapsed time) that draws nowhere."""
    if progress is None:
        return False
    import os

    from tqdm import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed with the bar
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            progress.update(n)
            return super().update(n)

        def close(self):
            super().close()
            self.fp.close()

    return Forward


def trainer_progress_callback(label: str = "train"):
    """A TrainerCallback that reports optimizer steps through Progress (rate and ETA on the pipeline's
    terminal; the Trainer's own bar and loss dicts stay in the log), the last logged loss in its label."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        progress: Progress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(label, state.max_steps, "steps")
            self.progress.done = state.global_step  # a resumed run starts where it stopped

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(state.global_step - self.progress.done)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is not None and logs and "loss" in logs:
                self.progress.label = f"{label} (loss {logs['loss']:.4f})"

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return StepProgress()
