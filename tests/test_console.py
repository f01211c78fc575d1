"""The pipeline's terminal: a stage's own lines there, everything in its log; --verbose streams it all."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from thinksafe import console, steps
from thinksafe.console import Terminal

# A stage stand-in: library noise on stdout and stderr around its own lines, progress included.
STAGE = """
import sys, warnings
from thinksafe import console
from thinksafe.progress import Progress
console.attach_from_env()
print("Loading checkpoint shards: 100%|#####| 2/2")
warnings.warn("a library's FutureWarning")
console.say("stage: own line")
with Progress("generate", 4, "samples", every_s=0) as progress:
    for _ in range(4):
        progress.update(1)
print("INFO vllm engine noise", file=sys.stderr)
import logging
logging.basicConfig(level=logging.INFO)
logging.getLogger("thinksafe.stage").info("logged by thinksafe")
logging.getLogger("vllm.engine").info("logged by vllm")
sys.exit(int(sys.argv[1]))
"""


class FakeTty(io.StringIO):
    def isatty(self):
        return True


def run_stage(tmp_path, monkeypatch, capsys, code=0, verbose=False):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    log = tmp_path / "logs" / "stage.log"
    if verbose:
        monkeypatch.setenv(console.VERBOSE_ENV, "1")
    else:
        monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    failed = None
    try:
        steps.run_step("stage", [sys.executable, str(script), str(code)], log, env=env)
    except steps.StepFailed as err:
        failed = err
    out = capsys.readouterr()
    return out.out, out.err, log.read_text(), failed


def test_quiet_step_shows_its_own_lines_and_logs_everything(tmp_path, monkeypatch, capsys):
    out, err, log, failed = run_stage(tmp_path, monkeypatch, capsys)
    assert failed is None
    assert "[stage] stage: own line" in out and "[stage] logged by thinksafe" in out
    # the last progress line of the phase reaches a non-terminal stdout; the first one too (a minute apart)
    assert "[stage] generate: 4/4 samples (100%)" in out
    for noise in ("Loading checkpoint shards", "FutureWarning", "engine noise", "logged by vllm"):
        assert noise not in out + err
        assert noise in log
    assert "stage: own line" in log and "generate: 4/4 samples" in log


def test_quiet_step_failure_shows_its_error_and_the_logs_last_lines(tmp_path, monkeypatch, capsys):
    out, err, log, failed = run_stage(tmp_path, monkeypatch, capsys, code=3)
    assert failed is not None and "exit 3" in str(failed) and "stage.log" in str(failed)
    assert "--- last" in err and "logged by vllm" in err  # the tail of the log, noise included


def test_verbose_step_streams_everything(tmp_path, monkeypatch, capsys):
    out, _, log, failed = run_stage(tmp_path, monkeypatch, capsys, verbose=True)
    assert failed is None
    for line in ("Loading checkpoint shards", "engine noise", "logged by vllm", "stage: own line"):
        assert line in out and line in log
    assert "[stage] stage: own line" not in out  # no relay: the stage's output as when run alone


def test_terminal_redraws_one_progress_line_on_a_tty():
    tty = FakeTty()
    terminal = Terminal(stream=tty)
    terminal.progress("gen: 1/3", final=False, key="gen")
    terminal.progress("gen: 2/3", final=False, key="gen")
    terminal.line("a stage line")
    terminal.progress("gen: 3/3", final=True, key="gen")
    assert tty.getvalue() == ("\r\x1b[Kgen: 1/3" "\r\x1b[Kgen: 2/3" "\r\x1b[K" "a stage line\n"
                              "\r\x1b[Kgen: 3/3\n")


def test_terminal_prints_progress_once_a_minute_when_not_a_tty():
    now = [0.0]
    out = io.StringIO()
    terminal = Terminal(stream=out, clock=lambda: now[0])
    for second, text in ((0, "1/9"), (30, "2/9"), (61, "3/9"), (90, "4/9")):
        now[0] = second
        terminal.progress(f"gen: {text}", final=False, key="gen")
    terminal.progress("gen: 9/9", final=True, key="gen")
    assert out.getvalue().splitlines() == ["gen: 1/9", "gen: 3/9", "gen: 9/9"]


def test_a_stage_run_alone_prints_as_before(capsys, monkeypatch):
    monkeypatch.delenv(console.CONSOLE_FD_ENV, raising=False)
    monkeypatch.setattr(console, "_console", None)
    console.attach_from_env()
    console.say("alone")
    console.progress("gen: 1/1", final=True)  # no pipe: nothing extra
    assert capsys.readouterr().out == "alone\n"


@pytest.mark.parametrize("value", ["not-a-number", "987654"])
def test_a_stale_console_variable_is_ignored(monkeypatch, capsys, value):
    monkeypatch.setenv(console.CONSOLE_FD_ENV, value)
    monkeypatch.setattr(console, "_console", None)
    console.attach_from_env()
    console.say("still printed")
    assert capsys.readouterr().out == "still printed\n" and console._console is None
