"""The pipeline's terminal: each stage's own lines, apart from what its libraries print.

The pipeline sends a stage's whole stdout and stderr (vLLM's engine logs, warnings, loading bars)
to the stage's log file and gives the stage one more pipe, named by THINKSAFE_CONSOLE_FD, for the
lines that are its own: what it did (`say`), its thinksafe loggers, its progress, its error line.
Those lines also go to stdout/stderr as before, so the log file holds everything. Run alone
(`thinksafe train ...`) or with `--verbose`, there is no such pipe and a stage prints as it always did.

Progress lines travel marked, so that the parent can redraw one live line on a terminal and print
one line a minute into a file or a CI log.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time

CONSOLE_FD_ENV = "THINKSAFE_CONSOLE_FD"
VERBOSE_ENV = "THINKSAFE_VERBOSE"
PROGRESS_MARK = "\x1eP "  # a progress line, more may follow for the same phase
PROGRESS_END_MARK = "\x1eE "  # a phase's last progress line
PROGRESS_EVERY_S_NOT_TTY = 60.0

_console = None  # the stage's end of the console pipe, when the pipeline gave it one


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


# --- the stage's side ------------------------------------------------------------------------------

def attach_from_env() -> None:
    """Open the pipe the pipeline passed, if any. The variable is removed and the descriptor made
    non-inheritable, so that the stage's own subprocesses (vLLM's engine core) never write into it."""
    global _console
    fd = os.environ.pop(CONSOLE_FD_ENV, None)
    if _console is not None or not fd:
        return
    try:
        descriptor = int(fd)
        if not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
            return  # inherited through a launcher that closed it: that number is some other file now
        os.set_inheritable(descriptor, False)
        _console = os.fdopen(descriptor, "w", buffering=1, encoding="utf-8", errors="replace")
    except (ValueError, OSError):
        return  # not ours to use (a stale variable): the stage prints as when run alone
    handler = logging.StreamHandler(_console)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("thinksafe").addHandler(handler)


def _to_console(text: str) -> None:
    if _console is None:
        return
    try:
        _console.write(text + "\n")
        _console.flush()
    except (OSError, ValueError):
        pass  # the pipeline went away: the log still gets the line


def say(message: str, error: bool = False) -> None:
    """A stage's own line: into its output (the log) and onto the pipeline's terminal."""
    print(message, file=sys.stderr if error else sys.stdout, flush=True)
    _to_console(message)


def progress(line: str, final: bool = False) -> None:
    _to_console((PROGRESS_END_MARK if final else PROGRESS_MARK) + line)


# --- the pipeline's side ---------------------------------------------------------------------------

class Terminal:
    """Writes relayed lines to stdout: one live progress line redrawn on a terminal; elsewhere a
    progress line at most once a minute per phase, and each phase's last one."""

    def __init__(self, stream=None, clock=time.monotonic):
        self._stream = stream
        self.clock = clock
        self.lock = threading.Lock()
        self.live = False
        self.last_progress: dict[str, float] = {}

    @property
    def stream(self):
        return self._stream or sys.stdout  # looked up late: tests and callers may swap sys.stdout

    def is_tty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def line(self, text: str) -> None:
        with self.lock:
            self._end_live()
            self.stream.write(text + "\n")
            self.stream.flush()

    def progress(self, text: str, final: bool, key: str) -> None:
        with self.lock:
            if self.is_tty():
                self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
                self.live = not final
            else:
                now = self.clock()
                if final or now - self.last_progress.get(key, -1e9) >= PROGRESS_EVERY_S_NOT_TTY:
                    self.last_progress[key] = now
                    self.stream.write(text + "\n")
            self.stream.flush()

    def _end_live(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.live = False


TERMINAL = Terminal()


class Relay:
    """One stage's console pipe: `fd` goes to the child (pass_fds and THINKSAFE_CONSOLE_FD); a thread
    reads its lines onto the terminal, each behind `prefix`."""

    def __init__(self, prefix: str = "", terminal: Terminal | None = None):
        self.prefix = prefix
        self.terminal = terminal or TERMINAL
        self.read_fd, self.fd = os.pipe()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def env(self, env: dict) -> dict:
        return {**env, CONSOLE_FD_ENV: str(self.fd)}

    def child_started(self) -> None:
        """Close our copy of the write end: the reader then sees EOF once the child is gone."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _pump(self) -> None:
        with os.fdopen(self.read_fd, "r", encoding="utf-8", errors="replace") as lines:
            for raw in lines:
                try:
                    self._show(raw.rstrip("\n"))
                except Exception:  # noqa: BLE001  (a closed or odd terminal: keep draining, or the stage blocks)
                    continue  # on a full pipe the stage's next write would wait for ever

    def _show(self, text: str) -> None:
        for mark, final in ((PROGRESS_MARK, False), (PROGRESS_END_MARK, True)):
            if text.startswith(mark):
                body = text[len(mark):]
                phase = body.split(":", 1)[0].split(" (", 1)[0]  # "train (loss 1.2): 3/9" -> "train"
                self.terminal.progress(self.prefix + body, final, key=self.prefix + phase)
                return
        self.terminal.line(self.prefix + text)

    def close(self, timeout: float = 5.0) -> None:
        self.child_started()
        self.thread.join(timeout)
