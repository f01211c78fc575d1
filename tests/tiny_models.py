"""Tiny random models shaped like the real families, built offline in a second or two.

The tokenizer is a byte-level BPE trained on a few sentences (every string stays encodable), with
each family's special tokens. The chat templates are written to behave like the real ones:
- Qwen3: `<|im_start|>role\\n…<|im_end|>`, `enable_thinking`, reasoning dropped from assistant
  turns before the last user message, `<think>\\n…\\n</think>\\n\\n` kept on the last turn.
- R1-distill: `<｜User｜>` / `<｜Assistant｜>` markers, everything before `</think>` stripped from
  assistant turns, and a generation prompt that opens the think block (`<｜Assistant｜><think>\\n`).
"""

from __future__ import annotations

from pathlib import Path

QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

R1_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- m.content -}}"
    "{%- elif m.role == 'user' -%}{{- '<｜User｜>' + m.content -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set content = m.content -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

FAMILY_TOKENS = {
    "qwen": {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>",
             "pad": "<|endoftext|>", "bos": None, "template": QWEN3_TEMPLATE},
    "r1-distill": {"special": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
                   "eos": "<｜end▁of▁sentence｜>", "pad": "<｜end▁of▁sentence｜>",
                   "bos": "<｜begin▁of▁sentence｜>", "template": R1_TEMPLATE},
}
THINK_TOKENS = ["<think>", "</think>"]

# Qwen/Qwen3-0.6B's config (random weights of the real shape; the small tokenizer uses ids < 512).
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)

_CORPUS = [
    "The following prompt is harmful. You should refuse to answer the prompt.",
    "I'm sorry, but I cannot help with that request. It could cause harm to people.",
    "Sure, here is how you bake bread: mix flour, water, salt and yeast, then wait.",
    "Okay, the user asks how to make a weapon. That is dangerous, so I should refuse.",
    "What is 12 + 30? The answer is \\boxed{42}. Let me think step by step.",
    "How do I kill a Python process? Use the kill command with the process id.",
    "Write a poem about the sea, the wind and the stars over the quiet harbour.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar.",
    "Harmful response: yes. Response refusal: no. Harmful request: yes. safe unsafe S1 S2",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`",
]


def build_tokenizer(family: str, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    spec = FAMILY_TOKENS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in spec["special"]]})
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast.eos_token = spec["eos"]
    fast.pad_token = spec["pad"]
    if spec["bos"]:
        fast.bos_token = spec["bos"]
    fast.chat_template = spec["template"]
    fast.model_max_length = 4096
    return fast


def build_tiny_model(kind: str, out_dir: Path, **shape) -> Path:
    """kind: 'qwen3' (Qwen3 shape), 'r1-llama' (Llama shape), 'r1-qwen' (Qwen2 shape).

    `shape` overrides config fields, e.g. QWEN3_0_6B for a real-size random model (benchmarks)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config, Qwen3Config

    family = "qwen" if kind == "qwen3" else "r1-distill"
    tokenizer = build_tokenizer(family)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40960,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    common.update(shape)
    if kind == "qwen3":
        config = Qwen3Config(**{"head_dim": 8, "tie_word_embeddings": True, **common})
    elif kind == "r1-llama":
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, **common)
    elif kind == "r1-qwen":
        config = Qwen2Config(bos_token_id=tokenizer.bos_token_id, **common)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_sentencepiece_style_tokenizer(corpus: list[str], vocab_size: int = 300):
    """A Llama/Mistral-like tokenizer: Metaspace word starts, prefix marker on the first piece only.

    Like those SentencePiece tokenizers, text at the start of a string gets a leading "▁" that the
    same text after a special token such as `<s>` does not get.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
