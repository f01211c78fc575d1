"""The embedded demo model: GGUF -> plain HF directory conversion."""

import pytest
import torch

from thinksafe.engines import HFGenerator
from thinksafe.model_loading import ModelLoadError, find_demo_gguf, load_model, load_tokenizer
from thinksafe.registry import FAMILIES

pytestmark = pytest.mark.demo


def test_converted_demo_model_matches_gguf_logits(demo_model):
    from transformers import AutoModelForCausalLM

    gguf = find_demo_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = load_model("demo", device="cpu")
    tok = load_tokenizer("demo")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(ids).logits
        got = converted(ids).logits
    assert sum(p.numel() for p in converted.parameters()) == pytest.approx(134.5e6, rel=0.01)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (demo_model / "config.json").exists() and tok.chat_template


def test_demo_model_generates(demo_model):
    gen = HFGenerator("demo", FAMILIES["demo"], batch_size=2)
    sampling = FAMILIES["demo"].sampling.replace(max_new_tokens=12, temperature=0.0)
    (first,), (second,) = gen.chat(["What is 2+2?", "Name a colour."], sampling)
    assert first.text.strip() and second.text.strip()
    assert 0 < first.num_tokens <= 12


def test_unknown_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory .*nope does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer from 'nobody/no-such-model'"):
        load_tokenizer("nobody/no-such-model")


@pytest.mark.slow  # over 10 s on 2 cores
def test_processes_asking_for_the_demo_model_at_once_convert_it_once(tmp_path, monkeypatch):
    """Parallel evaluation tasks or test workers: one converts, the other waits on the lock and reuses it."""
    import subprocess
    import sys

    monkeypatch.setenv("THINKSAFE_CACHE", str(tmp_path / "cache"))
    code = "from thinksafe.model_loading import ensure_demo_model; print(ensure_demo_model())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count("converting the embedded demo model") for out in outputs) == 1
    target = tmp_path / "cache" / "models"
    assert {out.strip().splitlines()[-1] for out in outputs} == {str(d) for d in target.iterdir() if not d.name.startswith(".")}
    assert not [d for d in target.iterdir() if d.name.endswith((".new", ".old"))]  # no staging left behind
