"""Generators that misbehave on purpose inside a Ray replica (tests/test_replicas.py): built by the
replica's own process from these module-level factories (Ray pickles them by reference)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from thinksafe.engines import make_generator

STALL_S = 600  # far longer than a test: the replica is killed while it waits


def stalling_generator(marker: str, pid_file: str, **kwargs):
    """A generator that, given a prompt containing `marker`, writes its pid to `pid_file` and waits
    (to be killed there: a replica lost mid-run with a call in flight)."""
    generator = make_generator(**kwargs)
    chat = generator.chat

    def stalling_chat(prompts, sampling, enable_thinking=True, progress=None):
        if any(marker in prompt for prompt in prompts):
            Path(pid_file).write_text(str(os.getpid()))
            time.sleep(STALL_S)
        return chat(prompts, sampling, enable_thinking=enable_thinking, progress=progress)

    generator.chat = stalling_chat
    return generator


def failing_generator(marker: str, **kwargs):
    """A generator whose engine raises on a prompt containing `marker` (a replica's failure)."""
    generator = make_generator(**kwargs)
    chat = generator.chat

    def failing_chat(prompts, sampling, enable_thinking=True, progress=None):
        if any(marker in prompt for prompt in prompts):
            raise RuntimeError(f"engine error on {marker}")
        return chat(prompts, sampling, enable_thinking=enable_thinking, progress=progress)

    generator.chat = failing_chat
    return generator
