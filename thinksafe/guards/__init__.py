"""Safety judges behind one interface: Llama-Guard-3, WildGuard, any chat LM in Llama-Guard style,
and a refusal-phrase judge.

- registry.py: the one list of guards (name -> class, hub id) and the style rule for other models;
- base.py: Verdict, the Guard interface and its keep rule, fitting inputs into a context;
- llama_guard.py, wildguard.py, refusal.py: one kind of judge each (format, parser, decision);
- backends.py (transformers, vLLM offline), server.py (a vLLM OpenAI server): token ids in,
  logprobs or text out;
- loading.py: check and load a guard by name.
Every public name is importable from `thinksafe.guards`.
"""

from thinksafe.guards.backends import VLLM_TOP_LOGPROBS, HFBackend, VLLMBackend
from thinksafe.guards.base import (
    DEFAULT_BATCH_SIZE,
    GUARD_UNPARSED,
    GUARD_UNSAFE,
    STYLE_LLAMA_GUARD,
    STYLE_WILDGUARD,
    STYLES,
    Guard,
    GuardError,
    ModelGuard,
    Verdict,
    fit_to_context,
)
from thinksafe.guards.llama_guard import (
    MISSING_LOGPROB,
    LogprobGuard,
    combine_logprobs,
    llama_guard_input,
    logprob_verdict,
    p_safe_from_logprobs,
    styled_guard_input,
    verdict_token_ids,
)
from thinksafe.guards.loading import check_named_guard, guard_label, load_guard, server_guard, validate_guard_name
from thinksafe.guards.refusal import (
    BENIGN_REFUSED,
    COMPLIANCE_PIVOTS,
    HARMFUL_NOT_REFUSED,
    REFUSAL_JUDGE,
    REFUSAL_PHRASES,
    RefusalJudge,
    is_refusal,
    refusal_verdict,
)
from thinksafe.guards.server import GuardServerError, VLLMServerBackend, top_logprobs_by_id
from thinksafe.guards.specs import GUARD_SPECS, GUARDS, GuardSpec, KeepRule, keep_rule, spec_for
from thinksafe.guards.wildguard import (
    WILDGUARD_MAX_INPUT_TOKENS,
    WILDGUARD_MAX_NEW_TOKENS,
    WildGuard,
    WildGuardParse,
    parse_wildguard,
    wildguard_input,
    wildguard_verdict,
)

__all__ = [
    "BENIGN_REFUSED",
    "check_named_guard",
    "COMPLIANCE_PIVOTS",
    "DEFAULT_BATCH_SIZE",
    "GUARDS",
    "GUARD_SPECS",
    "GUARD_UNPARSED",
    "GUARD_UNSAFE",
    "HARMFUL_NOT_REFUSED",
    "MISSING_LOGPROB",
    "REFUSAL_JUDGE",
    "REFUSAL_PHRASES",
    "STYLES",
    "STYLE_LLAMA_GUARD",
    "STYLE_WILDGUARD",
    "VLLM_TOP_LOGPROBS",
    "WILDGUARD_MAX_INPUT_TOKENS",
    "WILDGUARD_MAX_NEW_TOKENS",
    "Guard",
    "GuardError",
    "GuardServerError",
    "GuardSpec",
    "HFBackend",
    "KeepRule",
    "LogprobGuard",
    "ModelGuard",
    "RefusalJudge",
    "VLLMBackend",
    "VLLMServerBackend",
    "Verdict",
    "WildGuard",
    "WildGuardParse",
    "combine_logprobs",
    "fit_to_context",
    "guard_label",
    "is_refusal",
    "keep_rule",
    "llama_guard_input",
    "load_guard",
    "logprob_verdict",
    "p_safe_from_logprobs",
    "parse_wildguard",
    "refusal_verdict",
    "server_guard",
    "spec_for",
    "styled_guard_input",
    "top_logprobs_by_id",
    "validate_guard_name",
    "verdict_token_ids",
    "wildguard_input",
    "wildguard_verdict",
]
