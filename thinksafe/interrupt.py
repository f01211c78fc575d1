"""Ctrl-C, SIGTERM and a dying engine end a command within seconds, with one line and no child left.

The stages write through resumable logs and atomic renames (thinksafe.io), so the state on disk
after an interruption is the one a crash leaves, and a rerun resumes it; what remained to do was to
get out. Two things kept a command alive: vLLM's engine runs in child processes (EngineCore), and
its shutdown path, entered on a KeyboardInterrupt, could wait for ever on an engine that was
already gone (Ctrl-C while the engine started hung 10 minutes, until a second Ctrl-C); and SIGTERM
(`timeout`, a scheduler) killed the main process outright, leaving its engine running ~20 s.

So the command's entry point (`python -m thinksafe`, thinksafe/__main__.py) runs `main` under
`run_entry_point`:
- SIGTERM is taken like Ctrl-C (a KeyboardInterrupt, `Terminated`), so both unwind the same way:
  locks released, one line (thinksafe.cli.INTERRUPTED), exit 130 (SIGINT) or 143 (SIGTERM);
- the first signal also arms a watchdog: if the process is not out GRACE_S later (a library's
  cleanup is stuck), it prints the line, stops the children and exits; a second signal does it at once;
- on the way out, every descendant process still running (the engine, its workers) gets SIGTERM,
  then SIGKILL after CHILD_GRACE_S, and is reaped; then the process leaves with os._exit, so that no
  library's exit hook waits on an engine that is gone.
In-process callers (tests, notebooks) call thinksafe.cli.main and get none of this: only the
program's entry point owns its signals.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

GRACE_S = 10.0  # after the first signal: the unwinding has this long before the watchdog ends it
CHILD_GRACE_S = 3.0  # SIGTERM -> SIGKILL for children still running on the way out
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # the shell's codes for a process ended by the signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C."""


_signals_seen: list[int] = []


def descendants(pid: int | None = None) -> list[int]:
    """Every process below `pid` (default: this one), children before grandchildren, from /proc."""
    root = os.getpid() if pid is None else pid
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces: read after the last ')'
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        children = [child for pid_ in frontier for child in parents.get(pid_, [])]
        found.extend(children)
        frontier = children
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited (its parent reaps it)


def _reap() -> None:
    """Collect exited children (zombies) without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_descendants(grace_s: float = CHILD_GRACE_S) -> int:
    """SIGTERM every descendant, SIGKILL those still running after `grace_s`; reap ours. Returns how
    many there were. Grandchildren are signalled too: an engine's workers must not outlive it."""
    pids = descendants()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        living = [pid for pid in pids if _alive(pid)]
        for pid in living:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            _reap()
            if not any(_alive(pid) for pid in living):
                break
            time.sleep(0.05)
    _reap()
    return len(pids)


def _exit_code() -> int:
    return EXIT_SIGTERM if signal.SIGTERM in _signals_seen else EXIT_SIGINT


def _leave(code: int, line: str | None) -> None:
    if line:
        try:
            from thinksafe.console import say

            say(f"\n{line}", error=True)
        except Exception:  # the way out must not fail on the way it prints
            print(f"\n{line}", file=sys.stderr, flush=True)
    stop_descendants()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _watchdog() -> None:
    from thinksafe.cli import INTERRUPTED

    _leave(_exit_code(), INTERRUPTED)


def _on_signal(signum, _frame) -> None:
    from thinksafe.cli import INTERRUPTED

    _signals_seen.append(signum)
    if len(_signals_seen) > 1:  # a second Ctrl-C: out now
        _leave(_exit_code(), INTERRUPTED)
    timer = threading.Timer(GRACE_S, _watchdog)
    timer.daemon = True
    timer.start()
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _exit_at_once(signum, _frame) -> None:
    from thinksafe.cli import INTERRUPTED

    _signals_seen.append(signum)
    _leave(_exit_code(), INTERRUPTED)


def install() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(sig, _on_signal)


def run_entry_point(module: str) -> None:
    """Run `module`'s main() (thinksafe.cli) as the program: see the module docstring. The handlers
    come first, so that a signal during the imports (seconds: torch, transformers) unwinds the same way."""
    import importlib

    install()
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        from thinksafe.cli import INTERRUPTED

        _leave(_exit_code(), INTERRUPTED)
    code = main()
    # From here on a signal ends the process at once: the work is done or unwound; raised as a
    # KeyboardInterrupt now it would escape main's handling (or land in the interpreter's shutdown).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_at_once)
    if _signals_seen and code == EXIT_SIGINT:
        code = _exit_code()
    if _signals_seen or code != 0:
        # children (an engine, its workers) never outlive the command; and an engine's exit hooks
        # are skipped once it is stopped (they could wait on it for ever)
        _leave(code, None)
    stop_descendants()  # a finished command leaves no process behind either
    sys.exit(code)
