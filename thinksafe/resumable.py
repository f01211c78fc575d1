"""Resumable generation: n samples per prompt, appended to a log one chunk at a time.

The log (thinksafe.io.ResumableLog, one fsynced JSON line per sample, keyed by `sample_key`) says
which samples exist; a rerun generates only the others, so a run killed at any point loses at most
the chunk in flight. `thinksafe evaluate` and `thinksafe synthesize` both generate through
`generate_missing`; synthesis (thinksafe/synthesize/self_generate.py) with `whole_prompt=True` and a
seed per chunk (`chunk_sampling`), and its own row builder.
"""

from __future__ import annotations

from collections.abc import Callable

from thinksafe.io import ResumableLog
from thinksafe.progress import Progress
from thinksafe.registry import Sampling

# (prompt id, sample index, prompt text, completion) -> the row appended to the log; its log key
# must be sample_key(prompt id, sample index).
RowMaker = Callable[[str, int, str, object], dict]


def sample_key(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}#{sample}"


def missing_samples(log: ResumableLog, prompt_ids, n: int) -> dict[str, list[int]]:
    """{prompt id: the sample indices in 0..n-1 the log lacks}, for the prompts that lack any."""
    missing = {}
    for prompt_id in prompt_ids:
        absent = [s for s in range(n) if sample_key(prompt_id, s) not in log.done]
        if absent:
            missing[prompt_id] = absent
    return missing


def generate_missing(generator, prompts: list[tuple[str, str]], sampling: Sampling, log: ResumableLog,
                     make_row: RowMaker, chunk_size: int, label: str,
                     chunk_sampling: Callable[[list[tuple[str, str]]], Sampling] | None = None,
                     whole_prompt: bool = False) -> int:
    """Generate every sample of `prompts` ((id, text) pairs) the log lacks; returns how many rows
    were appended.

    Each chunk of `chunk_size` prompts is one or more `generator.chat` calls, appended before the
    next starts; with replicas (a generator with `chat_each`, thinksafe.replicas) the calls run on
    all replicas at once and each is appended as it finishes. By default a prompt asks only for its
    missing samples (prompts missing as many go in one call). `whole_prompt`: a prompt missing any
    sample is generated with all n and only the missing ones are kept, so that with a seed per chunk
    (`chunk_sampling`, e.g. from the position of the chunk's first prompt) the prompts of a chunk
    lost to an interruption are sampled again as the uninterrupted run sampled them (chunks are
    appended whole, so the lost ones keep their bounds).
    """
    missing = missing_samples(log, (prompt_id for prompt_id, _ in prompts), sampling.n)
    pending = [(prompt_id, text) for prompt_id, text in prompts if prompt_id in missing]
    total = len(pending) * sampling.n if whole_prompt else sum(len(m) for m in missing.values())
    calls = []  # (group of (id, text), the sample indices each asks for, sampling): one generate call each
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start : start + chunk_size]
        chunk_base = chunk_sampling(chunk) if chunk_sampling else sampling
        for samples, group in _group_by_samples(chunk, missing, sampling.n, whole_prompt):
            calls.append((group, samples, chunk_base.replace(n=len(samples[0]))))

    def rows(call, outputs):
        group, samples, _ = call
        return (make_row(prompt_id, sample, text, completion)
                for (prompt_id, text), wanted, completions in zip(group, samples, outputs)
                for sample, completion in zip(wanted, completions)
                if sample in missing[prompt_id])

    written = 0
    with Progress(label, total, "samples") as progress:
        if hasattr(generator, "chat_each"):  # replicas (thinksafe.replicas): each call appended as it finishes
            requests = [([text for _, text in group], call_sampling, True, _describe(group))
                        for group, _, call_sampling in calls]
            for index, outputs in generator.chat_each(requests, progress=progress):
                written += log.append(rows(calls[index], outputs))
            return written
        for call in calls:
            group, _, call_sampling = call
            outputs = generator.chat([text for _, text in group], call_sampling, enable_thinking=True,
                                     progress=progress)
            written += log.append(rows(call, outputs))
    return written


def _describe(group: list[tuple[str, str]]) -> str:
    """A call's prompts as a failure report names them (the shard a rerun generates again)."""
    ids = [prompt_id for prompt_id, _ in group]
    return f"{len(ids)} prompt(s) {ids[0]}..{ids[-1]}" if len(ids) > 1 else f"prompt {ids[0]}"


def _group_by_samples(chunk: list[tuple[str, str]], missing: dict[str, list[int]], n: int,
                      whole_prompt: bool) -> list[tuple[list[list[int]], list[tuple[str, str]]]]:
    """[(the sample indices each prompt gets, the prompts)]: one generate call per group, all of
    whose prompts ask for the same number of samples."""
    groups: dict[int, tuple[list[list[int]], list[tuple[str, str]]]] = {}
    for prompt in chunk:
        wanted = list(range(n)) if whole_prompt else missing[prompt[0]]
        samples, prompts = groups.setdefault(len(wanted), ([], []))
        samples.append(wanted)
        prompts.append(prompt)
    return list(groups.values())
