"""One writer per output directory: a run dir, a data dir, a task's results.

Two commands writing one directory at once mixed their rows (two pipelines on one run each logged
every sample into the same generations.partial.jsonl, then one died on the other's rename). Every
command that writes a directory (synthesize, train, merge, evaluate, pipeline) first takes an
exclusive `fcntl.flock` on a lock file beside it, `<parent>/.<name>.lock`: beside, not inside,
because `--overwrite` swaps the whole directory for a staged one (thinksafe.io.swap_in), and a lock
file inside would leave with the old directory while a newcomer locked the new one's copy. A second
command finds the lock held and stops at once (exit 2), naming the holder's pid and command, which
the holder writes into the lock file. Readers (report) take no lock: they read finished files
written by atomic rename.

A process that dies, even by SIGKILL, loses its flock with its file descriptors (the kernel
releases it), so there is no stale lock to break by hand: a lock file whose flock is free but which
still names a holder was left by a process that did not get to clear it, and the next command takes
it over with a line saying so.

The pipeline runs each stage as a child process on directories it already holds: it puts its pid in
THINKSAFE_LOCK_HOLDER, and a child blocked by a lock whose holder is that pid and one of its own
ancestors writes under its parent's lock instead of refusing. Under `accelerate launch` only rank 0
locks (every rank writes the same run, through rank 0).

Filesystems: flock is exclusive between processes of one machine on any local filesystem. On NFS,
Linux (since 2.6.12) implements flock with NFS byte-range locks, held by the server, so it is
exclusive across clients too; a client that dies holds its lock until the server's lease expires
(NFSv4: 90 s by default). Filesystems without lock support (some FUSE mounts, Lustre without
`-o flock`) answer ENOLCK or EOPNOTSUPP: the command then says it runs unprotected and goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.io import require_writable_dir

HOLDER_ENV = "THINKSAFE_LOCK_HOLDER"  # the pid of a pipeline whose children write under its locks
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
HOLDER_PATIENCE_S = 2.0  # how long a refused command waits for the holder's record to name it


class DirectoryInUse(ThinksafeError):
    """Another live command holds the directory's lock."""


def lock_path(directory: Path) -> Path:
    # resolved: a relative, absolute or symlinked spelling of one directory shares one lock
    directory = Path(directory).resolve()
    return directory.parent / f".{directory.name}.lock"


def this_command() -> str:
    """This process's command line as typed (`python -m thinksafe train ...` shortened to `thinksafe
    train ...`): from /proc, since sys.argv loses `-c` code and the interpreter."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().decode("utf-8", "replace").split("\0")[:-1]
    except OSError:
        argv = list(sys.argv)
    if "-m" in argv[:3] and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["thinksafe"]:
        argv = ["thinksafe", *argv[argv.index("-m") + 2:]]
    text = " ".join(shlex.quote(arg) for arg in argv)
    return text if len(text) <= 300 else text[:297] + "..."


def ancestors(pid: int | None = None) -> set[int]:
    """The pids above `pid` (default: this process), read from /proc."""
    found: set[int] = set()
    pid = os.getpid() if pid is None else pid
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        # the command name (field 2) is in parentheses and may hold spaces: read after the last ')'
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        found.add(pid)
    return found


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        holder = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _current_holder(fd: int, patience_s: float = HOLDER_PATIENCE_S) -> dict:
    """The record of the process holding the lock. It writes it just after taking the lock, so a
    command that finds the lock taken a moment ago may read nothing yet, or the record of an earlier
    holder that died: read again, for a moment, until the record names a running process."""
    deadline = time.monotonic() + patience_s
    while True:
        holder = _read_holder(fd)
        if _names_a_running_process(holder) or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def _names_a_running_process(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: not ours to look up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # running, as another user
    return True


def _describe(holder: dict) -> str:
    where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
    return f"pid {holder.get('pid', '?')}{where} ({holder.get('command', 'unknown command')})"


def _inherited(holder: dict) -> bool:
    """Held by the pipeline that started this process (directly or through a launcher)."""
    parent = os.environ.get(HOLDER_ENV)
    if parent is None or holder.get("host") != socket.gethostname() or str(holder.get("pid")) != parent:
        return False
    # this very process (a stage called in-process) or one above it
    return int(parent) == os.getpid() or int(parent) in ancestors()


def _is_worker_rank() -> bool:
    return os.environ.get("RANK", "0") != "0"


@contextmanager
def writer_lock(directory: Path, what: str = "directory"):
    """Hold the exclusive writer lock of `directory` for the block (see the module docstring)."""
    if _is_worker_rank():
        yield
        return

    directory = Path(directory)
    require_writable_dir(directory, what)  # a file in the way or a read-only parent: its own one line
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, state = _open_and_take(directory, path, what)
    try:
        if state != "held":  # inherited from the pipeline, or no locks on this filesystem
            yield
            return
        previous_env = os.environ.get(HOLDER_ENV)
        os.environ[HOLDER_ENV] = str(os.getpid())  # children (pipeline stages) write under this lock
        try:
            yield
        finally:
            if previous_env is None:
                os.environ.pop(HOLDER_ENV, None)
            else:
                os.environ[HOLDER_ENV] = previous_env
            # removed while still held, so that no directory keeps a lock file after a clean exit; a
            # newcomer that opened it meanwhile sees it unlinked and opens a fresh one (_open_and_take)
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def _open_and_take(directory: Path, path: Path, what: str) -> tuple[int, str]:
    """Open the lock file and take it: retried when the file we locked was unlinked by its holder
    in between (then the path names a newer lock file, the one that counts)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as to every file we write
        try:
            state = _take(fd, directory, path, what)
        except BaseException:
            os.close(fd)
            raise
        if state != "held":
            return fd, state
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _claim(fd, directory, what)
            return fd, state
        os.close(fd)


def _take(fd: int, directory: Path, path: Path, what: str) -> str:
    """'held' (ours now), 'inherited' (our pipeline's) or 'unsupported'; raises DirectoryInUse."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _current_holder(fd)
        if _inherited(holder):
            return "inherited"
        raise DirectoryInUse(f"{what} {directory} is in use by {_describe(holder)}: wait for it to finish "
                             f"or stop it (lock: {path})") from None
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        print(f"warning: {path}: this filesystem has no file locks ({err.strerror}); nothing stops a second "
              f"command from writing {directory} at the same time", file=sys.stderr, flush=True)
        return "unsupported"
    return "held"


def _claim(fd: int, directory: Path, what: str) -> None:
    """Write our pid and command into the lock we hold; a holder already named there died holding it."""
    previous = _read_holder(fd)
    if previous:
        print(f"note: {what} {directory}: taking over the lock left by {_describe(previous)}, which is no "
              "longer running", file=sys.stderr, flush=True)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": this_command()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)


@contextmanager
def writer_locks(directories: list[tuple[Path, str]]):
    """Several locks, taken in a fixed order (by lock path) so that two commands never wait on each
    other crosswise; refused as a whole when one is held."""
    with ExitStack() as stack:
        seen = set()
        for directory, what in sorted(directories, key=lambda item: str(lock_path(item[0]))):
            if lock_path(directory) in seen:
                continue
            seen.add(lock_path(directory))
            stack.enter_context(writer_lock(directory, what))
        yield
