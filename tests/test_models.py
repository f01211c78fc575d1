"""The embedded demo model: GGUF -> plain HF directory conversion."""

import pytest
import torch

from thinksafe.generation import HFGenerator
from thinksafe.models import ModelLoadError, find_demo_gguf, load_model, load_tokenizer
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
