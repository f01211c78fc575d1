"""Files between stages: resumable JSONL logs and atomic writes.

Long stages (synthesis, evaluation) append finished rows to a `*.partial.jsonl` log, flushed and
fsynced per chunk, so killing the process loses at most the chunk in flight. A rerun reads the log,
skips keys already done and never duplicates a row; a half-written last line (the process died
mid-write) is dropped. The final file is written atomically (temp file + rename), with the mode
the umask gives (not mkstemp's 0600). A result made of several files (a run, a task's results, a
synthesized set) is built in a staging directory beside the old one and swapped in last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from thinksafe.errors import ThinksafeError


def current_umask() -> int:
    """The process umask (reading it means setting it; we put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 whatever the umask; a finished file gets what open() would give."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def give_tree_normal_mode(root: Path) -> None:
    """Every file and directory under `root` (itself included) gets the mode the umask gives.

    For what libraries write with their own modes: safetensors (0.8) creates its files 0600 whatever
    the umask, so a group directory could not read a colleague's adapter or merged model while every
    other file there was readable. Called on weights we just wrote, never on a user's directory.
    """
    root = Path(root)
    if root.is_file():
        give_normal_mode(root)
        return
    if not root.is_dir():
        return
    give_normal_mode(root, directory=True)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            give_normal_mode(Path(dirpath) / name, directory=True)
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                give_normal_mode(Path(dirpath) / name)


def make_staging_dir(target: Path) -> Path:
    """An empty directory beside `target` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".new"))
    give_normal_mode(staging, directory=True)
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Replace directory `target` by `staging`: the old one is renamed aside first and removed only
    once the new one is in place, so a failure leaves one complete directory, never none."""
    staging, target = Path(staging), Path(target)
    retired = None
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
    os.replace(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def sha256_of_files(paths: Iterable[Path]) -> str:
    """One content hash over files, in the order given (their bytes, not their names)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def require_writable_dir(path: Path, what: str) -> None:
    """Fail now, with one line, on an output directory we could not write to later."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ThinksafeError(f"{what} {path} is a file, not a directory: pass a directory")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ThinksafeError(f"{what} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ThinksafeError(f"{what} {path}: {existing} is not writable")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        give_normal_mode(Path(tmp))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_text(path: Path) -> str:
    """A UTF-8 text file; anything else is one line naming the file and the line of the bad byte."""
    path = Path(path)
    if not path.exists():
        raise ThinksafeError(f"{path}: file not found")
    if path.is_dir():
        raise ThinksafeError(f"{path} is a directory, expected a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ThinksafeError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); "
                             "save the file as UTF-8") from None


def read_json(path: Path) -> dict:
    """A JSON object file (metrics, stats, records); a corrupt one is one line that says what to do."""
    path = Path(path)
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ThinksafeError(f"{path}: not valid JSON (line {err.lineno}); delete it to recompute") from None
    if not isinstance(obj, dict):
        raise ThinksafeError(f"{path}: expected a JSON object; delete it to recompute")
    return obj


def read_jsonl(path: Path, tolerate_torn_tail: bool = False) -> list[dict]:
    """Rows of a JSONL file. A malformed line is an error naming file and line, except a torn
    last line of a log being resumed (tolerate_torn_tail)."""
    path = Path(path)
    lines = read_text(path).splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if tolerate_torn_tail and number == len(lines):
                break
            raise ThinksafeError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise ThinksafeError(f"{path}:{number}: expected a JSON object per line")
        rows.append(row)
    return rows


class ResumableLog:
    """Append-only JSONL log keyed by `key(row)`; `done` holds the keys already written."""

    def __init__(self, path: Path, key: Callable[[dict], str]):
        self.path = Path(path)
        self.key = key
        self.rows: list[dict] = []
        if self.path.exists():
            self.rows = read_jsonl(self.path, tolerate_torn_tail=True)
            # rewrite without a torn tail, so the next append starts on a clean line
            atomic_write_jsonl(self.path, self.rows)
        self.done: set[str] = {key(r) for r in self.rows}

    def append(self, rows: Iterable[dict]) -> int:
        """Write the rows whose key is new; returns how many were written."""
        fresh = []
        for row in rows:
            k = self.key(row)
            if k not in self.done:
                self.done.add(k)
                fresh.append(row)
        if not fresh:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh))
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.extend(fresh)
        return len(fresh)
