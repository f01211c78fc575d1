"""wandb without a login prompt or a network stall: offline unless online was asked for, or off.

`--report-to` values: `auto` (default: offline, `wandb sync` uploads later), `wandb` (online),
`offline`, `none`. WANDB_MODE set by the user always wins. `auto` never goes online by itself: a
configured key says nothing about the network, and an unreachable or rejected server stalled the
first log call ~90 s and then crashed training. Offline runs are written under the output
directory (outputs/wandb/), not the current one. We never read, print or ask for the key itself.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path

REPORT_CHOICES = ("auto", "wandb", "offline", "none")
WANDB_PROJECT = os.environ.get("WANDB_PROJECT", "thinksafe")


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(report_to: str = "auto") -> str:
    """'online', 'offline' or 'disabled'."""
    if report_to not in REPORT_CHOICES:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_CHOICES)}, got {report_to!r}")
    if report_to == "none" or importlib.util.find_spec("wandb") is None:
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if report_to == "wandb":
        if not wandb_logged_in():
            from thinksafe.errors import ThinksafeError

            raise ThinksafeError("--report-to wandb: not logged in (run `wandb login` or set WANDB_API_KEY); "
                                 "or log offline with --report-to offline")
        return "online"
    return "offline"


def wandb_dir() -> Path:
    """wandb writes <dir>/wandb/<run>; ours go beside data/, runs/ and results/."""
    from thinksafe.registry import output_root

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
