import json
import os

import pytest

from thinksafe.errors import ThinksafeError
from thinksafe.io import ResumableLog, atomic_write_json, read_jsonl
from thinksafe.tracking import wandb_mode


def test_resumable_log_skips_done_keys_and_drops_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ResumableLog(path, key=lambda r: r["id"])
    assert log.append([{"id": "a"}, {"id": "b"}]) == 2
    with path.open("a") as handle:  # the process died mid-write
        handle.write('{"id": "c", "resp')
    again = ResumableLog(path, key=lambda r: r["id"])
    assert again.done == {"a", "b"}
    assert again.append([{"id": "b"}, {"id": "c"}]) == 1
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": 1}\nnot json\n{"ok": 2}\n')
    with pytest.raises(ThinksafeError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(ThinksafeError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "a" / "m.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["m.json"]


def test_wandb_never_online_without_login(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("none") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "offline"  # a key says nothing about the network: online only when asked
    probed = []
    # online only when asked, and only after one probe of the server (which this machine cannot reach)
    monkeypatch.setattr("thinksafe.tracking.check_wandb_online", lambda: probed.append(True))
    assert wandb_mode("wandb") == "online" and probed == [True]


def test_an_offline_wandb_run_is_finished_before_the_command_stops_its_children(tiny_qwen3, tmp_path):
    """wandb's service process is a child of the command, which stops every child on its way out: the
    run must be finished first, or its summary (the final train loss) never reaches the run's files."""
    import subprocess
    import sys

    from helpers import FAST_TRAIN, ROOT, train_rows, write_rows

    pytest.importorskip("wandb")
    data = write_rows(tmp_path / "t.jsonl", train_rows())
    argv = [*FAST_TRAIN]
    argv[argv.index("--report-to") + 1] = "offline"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_MODE": "offline",
           "THINKSAFE_OUTPUT_DIR": str(tmp_path / "out"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "thinksafe", "train", "--model", str(tiny_qwen3), "--dataset",
                           str(data), *argv], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]  # before: ConnectionResetError at exit
    (log,) = (tmp_path / "out" / "wandb").glob("offline-run-*/logs/debug-internal.log")
    assert '"msg":"stream: all finished"' in log.read_text()  # the run's stream closed, not cut off
