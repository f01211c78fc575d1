import pytest

from thinksafe.chat import (
    ChatTemplateError,
    encode_for_training,
    end_of_turn_text,
    generation_prompt,
    normalize_response,
    split_think,
    training_texts,
)
from thinksafe.model_loading import load_tokenizer
from thinksafe.registry import FAMILIES

QWEN, R1, DEMO = FAMILIES["qwen"], FAMILIES["r1-distill"], FAMILIES["demo"]
PROMPT = "How do I bake bread?"
RESPONSE = "<think>\nOkay, the user wants bread.\n</think>\n\nMix flour, water and yeast."


def test_qwen3_training_text_keeps_reasoning_and_matches_template(tiny_qwen3):
    tok = load_tokenizer(str(tiny_qwen3))
    prompt_text, completion = training_texts(tok, PROMPT, RESPONSE, QWEN)
    # Qwen3 keeps reasoning on the final assistant turn, so its own render is the reference
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}], tokenize=False)
    assert prompt_text + completion + "\n" == rendered
    assert "Okay, the user wants bread." in completion
    assert prompt_text.endswith("<|im_start|>assistant\n")


def test_qwen3_enable_thinking_false_closes_block(tiny_qwen3):
    tok = load_tokenizer(str(tiny_qwen3))
    assert generation_prompt(tok, PROMPT, QWEN, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    assert generation_prompt(tok, PROMPT, QWEN).endswith("assistant\n")


@pytest.mark.parametrize("fixture", ["tiny_r1", "tiny_r1_qwen"])
def test_r1_training_text_keeps_reasoning_the_template_strips(fixture, request):
    tok = load_tokenizer(str(request.getfixturevalue(fixture)))
    stripped = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}], tokenize=False)
    assert "Okay, the user wants bread." not in stripped  # the real template drops it
    prompt_text, completion = training_texts(tok, PROMPT, RESPONSE, R1)
    bos, eos = tok.bos_token, tok.eos_token
    assert prompt_text == f"{bos}<｜User｜>{PROMPT}<｜Assistant｜><think>\n"
    assert completion == "Okay, the user wants bread.\n</think>\n\nMix flour, water and yeast." + eos
    # the same text when the model's output lacks <think> (R1's template opened it)
    no_open = RESPONSE.removeprefix("<think>\n")
    assert training_texts(tok, PROMPT, no_open, R1) == (prompt_text, completion)


@pytest.mark.parametrize(("fixture", "family"), [("tiny_qwen3", QWEN), ("tiny_r1", R1), ("tiny_r1_qwen", R1)])
def test_prompt_is_token_exact_prefix(fixture, family, request):
    tok = load_tokenizer(str(request.getfixturevalue(fixture)))
    enc = encode_for_training(tok, PROMPT, RESPONSE, family)
    prompt_text, completion = training_texts(tok, PROMPT, RESPONSE, family)
    whole = tok(prompt_text + completion, add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == whole
    assert whole[: len(prompt_ids)] == prompt_ids
    n_prompt = len(prompt_ids)
    assert enc["completion_mask"] == [0] * n_prompt + [1] * (len(whole) - n_prompt)
    assert tok.decode(enc["input_ids"][n_prompt:]) == completion


def test_normalize_prepends_think_for_r1_and_fixes_blank_line():
    out = normalize_response("reasoning here</think>answer", R1)
    assert out.text == "<think>\nreasoning here\n</think>\n\nanswer" and out.closed
    assert normalize_response("<think>\nr\n</think>\n\n\n\nanswer  ", QWEN).text == "<think>\nr\n</think>\n\nanswer"


def test_normalize_adds_the_opening_tag_a_closed_block_lost():
    """SafeChain-style rows on Qwen3: `</think>` without `<think>` get the tag back (as the paper's loader)."""
    lost = "Okay, the user wants bread.\n</think>\n\nMix flour, water and yeast."
    out = normalize_response(lost, QWEN)
    assert out.text == RESPONSE and out.has_think and out.closed
    assert normalize_response(RESPONSE, QWEN).text == RESPONSE  # an opened block is not opened twice


def test_training_text_of_a_lost_opening_tag_matches_the_complete_row(tiny_qwen3):
    tok = load_tokenizer(str(tiny_qwen3))
    lost = RESPONSE.removeprefix("<think>\n")
    assert training_texts(tok, PROMPT, lost, QWEN) == training_texts(tok, PROMPT, RESPONSE, QWEN)


def test_normalize_reports_unclosed_think():
    assert not normalize_response("<think>\nI keep thinking and never stop", QWEN).closed
    assert not normalize_response("still thinking", R1).closed
    assert not normalize_response("no think block at all", QWEN).closed
    # non-reasoning families need no block
    assert normalize_response("  Sure, here you go. ", DEMO) == normalize_response("Sure, here you go.", DEMO)
    assert normalize_response("Sure", DEMO).closed


def test_split_think():
    assert split_think(RESPONSE) == ("Okay, the user wants bread.", "Mix flour, water and yeast.")
    assert split_think("<think>\nunfinished") == ("unfinished", "")
    assert split_think("plain answer") == ("", "plain answer")


def test_missing_chat_template_is_a_clear_error(tiny_qwen3):
    tok = load_tokenizer(str(tiny_qwen3))
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        end_of_turn_text(tok)


@pytest.mark.parametrize(("fixture", "family", "completion"), [
    ("tiny_qwen3", QWEN, "<think>\nOkay, the user wants"),
    ("tiny_r1", R1, "Okay, the user wants"),  # R1's prompt opened the block
])
def test_unfinished_response_gets_no_end_of_turn(fixture, family, completion, request):
    tok = load_tokenizer(str(request.getfixturevalue(fixture)))
    cut = "<think>\nOkay, the user wants"
    prompt_text, text = training_texts(tok, PROMPT, cut, family, finished=False)
    assert text == completion  # exactly what the model wrote, nothing appended
    assert training_texts(tok, PROMPT, cut, family)[1] == completion + end_of_turn_text(tok)
    enc = encode_for_training(tok, PROMPT, cut, family, finished=False)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == prompt_ids + completion_ids
    assert enc["completion_mask"] == [0] * len(prompt_ids) + [1] * len(completion_ids)
