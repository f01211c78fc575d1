"""wandb without a login prompt or a network stall: offline unless online was asked for, or off.

`--report-to` values: `auto` (default: offline, `wandb sync` uploads later), `wandb` (online),
`offline`, `none`. WANDB_MODE set by the user always wins. `auto` never goes online by itself: a
configured key says nothing about the network, and an unreachable or rejected server stalled the
first log call ~90 s and then crashed training. Offline runs are written under the output
directory (outputs/wandb/), not the current one. `wandb` (online) is checked before anything is
written: one request with a short timeout asks the server who the key belongs to, so a rejected key
or an unreachable server is one line then, not a traceback after the model loaded (a wrong key
stalled 98 s there). The key is sent to the wandb server only, and never printed.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path

from thinksafe.errors import ThinksafeError
from thinksafe.registry import output_root

REPORT_CHOICES = ("auto", "wandb", "offline", "none")
WANDB_PROJECT = os.environ.get("WANDB_PROJECT", "thinksafe")


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def wandb_mode(report_to: str = "auto") -> str:
    """'online', 'offline' or 'disabled'."""
    if report_to not in REPORT_CHOICES:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_CHOICES)}, got {report_to!r}")
    if report_to == "none" or not wandb_installed():
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if report_to == "wandb":
        if not wandb_logged_in():
            raise ThinksafeError("--report-to wandb: not logged in (run `wandb login` or set WANDB_API_KEY); "
                                 "or log offline with --report-to offline")
        check_wandb_online()
        return "online"
    return "offline"


WANDB_PROBE_TIMEOUT_S = 10


def _wandb_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        entry = netrc.netrc().authenticators(_wandb_host())
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return entry[2] if entry else None


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def _wandb_host() -> str:
    from urllib.parse import urlparse

    return urlparse(_wandb_base_url()).hostname or "api.wandb.ai"


_checked_online: set[str] = set()


def check_wandb_online() -> None:
    """One GraphQL request (`viewer`) with the key, no retries: a ThinksafeError naming the fix when
    the server is out of reach or rejects the key. Checked once per process."""
    import base64
    import json
    import urllib.error
    import urllib.request

    base = _wandb_base_url()
    if base in _checked_online:
        return
    key = _wandb_key() or ""
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": "query { viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()})
    offline = "or log offline with --report-to offline (`wandb sync` uploads it later)"
    try:
        with urllib.request.urlopen(request, timeout=WANDB_PROBE_TIMEOUT_S) as response:
            viewer = (json.loads(response.read() or b"{}").get("data") or {}).get("viewer")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ThinksafeError(f"--report-to wandb: {base} rejected the API key (HTTP {err.code}): run "
                                 f"`wandb login --relogin` or fix WANDB_API_KEY, {offline}") from None
        raise ThinksafeError(f"--report-to wandb: {base} answered HTTP {err.code}; {offline}") from None
    except (OSError, ValueError) as err:  # DNS, refused, TLS, timeout, a non-JSON answer
        reason = getattr(err, "reason", None) or err
        raise ThinksafeError(f"--report-to wandb: cannot reach {base} ({reason}); {offline}") from None
    if not viewer:
        raise ThinksafeError(f"--report-to wandb: {base} does not know this API key: run `wandb login --relogin` "
                             f"or fix WANDB_API_KEY, {offline}")
    _checked_online.add(base)


def wandb_dir() -> Path:
    """wandb writes <dir>/wandb/<run>; ours go beside data/, runs/ and results/."""
    target = output_root().resolve()
    target.mkdir(parents=True, exist_ok=True)
    return target


def configure_wandb(report_to: str = "auto") -> list[str]:
    """Set WANDB_MODE for libraries that start wandb themselves (TRL); return HF `report_to`."""
    mode = wandb_mode(report_to)
    if mode == "disabled":
        return []
    os.environ.setdefault("WANDB_MODE", mode)
    os.environ.setdefault("WANDB_DIR", str(wandb_dir()))
    os.environ.setdefault("WANDB_PROJECT", WANDB_PROJECT)
    os.environ.setdefault("WANDB_SILENT", "true")
    return ["wandb"]


def log_metrics(run_name: str, metrics: dict, config: dict | None = None, report_to: str = "auto",
                group: str | None = None) -> None:
    """Log one dict of final metrics to the wandb run named after the thinksafe run."""
    if not configure_wandb(report_to):
        return
    import wandb

    run = wandb.init(project=os.environ["WANDB_PROJECT"], name=run_name, group=group, config=config or {},
                     reinit="finish_previous", mode=os.environ["WANDB_MODE"])
    run.log(metrics)
    run.finish()


# --- what the peers log: results as summary metrics, sample generations as tables -------------

TABLE_ROWS = 64  # rows sampled into each wandb.Table: enough to read, small enough to sync
TABLE_SEED = 0  # the same rows every time a run is logged again


def sample_rows(rows: list, limit: int = TABLE_ROWS) -> list:
    """At most `limit` rows, chosen with a fixed seed and kept in their file order."""
    import random

    if len(rows) <= limit:
        return list(rows)
    keep = sorted(random.Random(TABLE_SEED).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def verdict(row: dict) -> str:
    """One word a reader scans a table by: a reasoning row's check, a safety row's judge and phrase."""
    if "correct" in row:
        return row.get("reason") or ("correct" if row["correct"] else "wrong answer")
    judge = row.get("judge") or {}
    parts = [str(judge.get("raw") or ("safe" if judge.get("safe") else "unsafe"))] if judge else []
    if row.get("refusal_phrase") is not None:
        parts.append("refusal phrase" if row["refusal_phrase"] else "no refusal phrase")
    return "; ".join(parts)


GENERATION_COLUMNS = ("id", "sample", "label", "prompt", "response", "verdict")


def generation_table(rows: list[dict]):
    import wandb

    return wandb.Table(columns=list(GENERATION_COLUMNS), data=[
        [str(r.get("id")), r.get("sample"), r.get("label"), r.get("prompt"), r.get("response"), verdict(r)]
        for r in sample_rows(rows)])


def start_run(name: str, report_to: str, job_type: str, config: dict | None = None):
    """A wandb run in the grid's group (WANDB_RUN_GROUP, set by `thinksafe grid`), or None when off."""
    if not configure_wandb(report_to):
        return None
    import wandb

    return wandb.init(project=os.environ["WANDB_PROJECT"], name=name, job_type=job_type, config=config or {},
                      group=os.environ.get("WANDB_RUN_GROUP") or None, dir=str(wandb_dir()),
                      reinit="finish_previous", mode=os.environ["WANDB_MODE"])


def log_evaluation(run_name: str, metrics: dict, tables: dict[str, list[dict]], config: dict | None = None,
                   report_to: str = "auto") -> None:
    """Final metrics as the run's summary (what the wandb table view compares across runs) and in its
    history, and one table of sampled generations per task (prompt, response, verdict)."""
    run = start_run(run_name, report_to, "eval", config)
    if run is None:
        return
    try:
        run.summary.update(metrics)
        run.log({**metrics, **{f"eval/{task}/samples": generation_table(rows) for task, rows in tables.items()}})
    finally:
        run.finish()


def csv_table(path: Path):
    import csv

    import wandb

    with open(path, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    return wandb.Table(columns=lines[0], data=lines[1:])


def log_grid_report(name: str, files: dict[str, Path], report_to: str = "auto") -> None:
    """The grid's table (its CSV) and plot, in the grid's group."""
    run = start_run(f"{name}-report", report_to, "report", {"grid": name})
    if run is None:
        return
    import wandb

    try:
        run.log({"grid/table": csv_table(files["csv"]), "grid/plot": wandb.Image(str(files["png"]))})
    finally:
        run.finish()


SYNTHESIS_COLUMNS = ("kept", "prompt_label", "reason", "instruction", "response")


def log_synthesis(name: str, stats: dict, kept: list[dict], dropped: list[dict], report_to: str = "auto") -> None:
    """Synthesis statistics as the run's summary, and a sample of kept and dropped rows as a table."""
    run = start_run(name, report_to, "synthesize", {"data": name})
    if run is None:
        return
    import wandb

    rows = [[True, r.get("prompt_label"), "kept", r.get("instruction"), r.get("response")] for r in sample_rows(kept)]
    rows += [[False, r.get("prompt_label"), r.get("reason"), r.get("instruction"), r.get("response")]
             for r in sample_rows(dropped)]
    try:
        run.summary.update(flat_numbers(stats, "synthesis"))
        run.log({"synthesis/rows": wandb.Table(columns=list(SYNTHESIS_COLUMNS), data=rows)})
    finally:
        run.finish()


def flat_numbers(value, prefix: str) -> dict:
    """{'a/b/c': number} of a nested dict's numbers (wandb's summary holds flat keys best)."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: value}
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flat_numbers(sub, f"{prefix}/{key}").items()}
    return {}
