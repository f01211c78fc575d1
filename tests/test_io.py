import json

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
