"""The one list of guards: name -> GuardSpec (the judging class, hub id, template).

Everything that needs to know the guards reads GUARD_SPECS: the CLIs' accepted names, the keep
rule of synthesis (the class's `keeps`), whether a guard judges refusals, its label. Adding a named
guard is one line in GUARD_SPECS (plus a file with its class if it judges in a new way; docs/layout.md).
A hub id or directory that is not named here gets its spec from `spec_for`, the only place where a
guard's style is inferred from its name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from thinksafe.guards.base import STYLE_LLAMA_GUARD, STYLE_WILDGUARD, STYLES, Guard, GuardError
from thinksafe.guards.llama_guard import LogprobGuard
from thinksafe.guards.refusal import REFUSAL_JUDGE, RefusalJudge
from thinksafe.guards.wildguard import WildGuard

DEMO_MODEL = "demo"  # the bundled demo model (thinksafe.model_loading): usable in Llama-Guard style
KeepRule = Callable[[Mapping, bool], str | None]  # (stored verdict, harmful prompt) -> drop reason or None


@dataclass(frozen=True)
class GuardSpec:
    """name: the registry key (or the hub id / directory typed); kind: the Guard class that judges;
    source: hub id or directory of its weights ("" for a text-only judge); official_template: a
    Llama-Guard model read through its own chat template rather than an instruction."""

    name: str
    kind: type[Guard]
    source: str = ""
    official_template: bool = False

    @property
    def judges_refusal(self) -> bool:
        return self.kind.judges_refusal

    @property
    def label(self) -> str:
        return self.kind.describe(self)

    def keeps(self, verdict: Mapping, harmful: bool) -> str | None:
        """Synthesis's rule: None keeps the judged row, else why it is dropped (Guard.keeps)."""
        return self.kind.keeps(verdict, harmful)


GUARD_SPECS: dict[str, GuardSpec] = {spec.name: spec for spec in (
    GuardSpec("llama-guard-3", LogprobGuard, "meta-llama/Llama-Guard-3-8B", official_template=True),
    GuardSpec("llama-guard-3-1b", LogprobGuard, "meta-llama/Llama-Guard-3-1B", official_template=True),
    GuardSpec("wildguard", WildGuard, "allenai/wildguard"),
    GuardSpec(REFUSAL_JUDGE, RefusalJudge),
)}

# Named guard -> hub id, for callers that need only the weights (GRPO's guard server, plans).
GUARDS: dict[str, str] = {name: spec.source for name, spec in GUARD_SPECS.items() if not spec.kind.text_only}


def keep_rule(guard_name: str) -> KeepRule:
    """The keep rule of the guard that judged a synthesis run: its class's `keeps` when the name is
    registered; the safety rule (keep parsed and safe) for a hub id, a directory or a test's guard."""
    spec = GUARD_SPECS.get(guard_name)
    return spec.keeps if spec is not None else Guard.keeps


def spec_for(name_or_path: str, style: str | None = None) -> GuardSpec:
    """The spec of a registered guard, or one inferred for a hub id or directory; `style`
    (--guard-style: "llama-guard" or "wildguard") overrides either. A text-only judge has no model
    to restyle and ignores it."""
    registered = GUARD_SPECS.get(name_or_path)
    if registered is not None and registered.kind.text_only:
        return registered
    if style is not None and style not in STYLES:
        raise GuardError(f"unknown guard style {style!r}; choose one of: {', '.join(STYLES)}")
    if registered is not None and style in (None, registered.kind.style):
        return registered
    source = registered.source if registered is not None else name_or_path
    lowered = f"{name_or_path} {source}".lower()
    if style == STYLE_WILDGUARD or (style is None and "wildguard" in lowered):
        return GuardSpec(name_or_path, WildGuard, source)
    official = "llama-guard" in lowered.replace("_", "-") or "llamaguard" in lowered
    if style == STYLE_LLAMA_GUARD or official or name_or_path == DEMO_MODEL:
        return GuardSpec(name_or_path, LogprobGuard, source, official_template=official)
    raise GuardError(
        f"cannot tell how to use {name_or_path!r} as a guard: pass style='llama-guard' (any chat LM, judged by "
        "P(safe) vs P(unsafe)) or style='wildguard'"
    )


def looks_like_model(name: str) -> bool:
    """A hub id, an existing directory or the demo model: something load_guard can try to load."""
    return name == DEMO_MODEL or Path(name).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
