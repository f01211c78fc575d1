"""GRPO rewards: format and guard scores on hand-made cases, and the guard server client against a
real local HTTP server that answers like vLLM's /v1/completions (logprobs keyed by token id)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thinksafe.guards import (
    GuardServerError,
    Verdict,
    VLLMServerBackend,
    llama_guard_input,
    logprob_verdict,
    server_guard,
    top_logprobs_by_id,
    verdict_token_ids,
)
from thinksafe.registry import FAMILIES
from thinksafe.train.rewards import FormatReward, GuardReward, format_score, guard_score

QWEN, R1, DEMO = FAMILIES["qwen"], FAMILIES["r1-distill"], FAMILIES["demo"]

# --- format reward --------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("<think>\nplan\n</think>\n\nanswer", 1.0),
    ("  <think>a</think>b", 1.0),
    ("<think>\nplan, no close", 0.0),
    ("no think at all", 0.0),
    ("</think> before <think>", 0.0),  # two tags but in the wrong order
    ("<think>a</think><think>b</think>", 0.0),  # two blocks
    ("<think>a</think>b</think>", 0.0),  # a stray close
    ("<think><think>a</think>", 0.0),
    ("plan only</think>answer", 0.0),  # the R1 shape is wrong for Qwen3
])
def test_format_qwen3(text, expected):
    assert format_score(text, QWEN) == expected


@pytest.mark.parametrize("text, expected", [
    ("plan\n</think>\n\nanswer", 1.0),  # the template opened the block
    ("</think>answer", 1.0),
    ("<think>\nplan\n</think>\n\nanswer", 0.0),  # a second opening tag
    ("plan without close", 0.0),
    ("a</think>b</think>", 0.0),
    ("", 0.0),
])
def test_format_when_the_template_opened_the_block(text, expected):
    assert format_score(text, R1, opened="<think>\n") == expected


def test_format_r1_first_template_revision_scores_like_qwen3():
    # The first R1-distill template ends the prompt at <｜Assistant｜>: the model opens the block itself.
    assert format_score("<think>\nplan\n</think>\n\nanswer", R1) == 1.0
    assert format_score("plan\n</think>\n\nanswer", R1) == 0.0


def test_format_non_reasoning_family_rewards_plain_answers():
    assert format_score("Paris is the capital of France.", DEMO) == 1.0
    assert format_score("<think>x</think> Paris", DEMO) == 0.0


def test_format_reward_callable_reads_strings_and_chat_messages():
    reward = FormatReward(QWEN)
    completions = ["<think>a</think>b", [{"role": "assistant", "content": "<think>a</think>b"}], "b"]
    assert reward(prompts=["p"] * 3, completions=completions) == [1.0, 1.0, 0.0]
    assert reward.__name__ == "format_reward"


# --- guard reward ---------------------------------------------------------------------------


def test_guard_score_logprob_edge_cases():
    assert guard_score(logprob_verdict(-0.1, -2.3)) == pytest.approx(1 / (1 + math.exp(-2.2)))
    assert guard_score(logprob_verdict(-1.0, -1.0)) == 0.5  # tie
    assert guard_score(logprob_verdict(-3.0, None)) == pytest.approx(1.0)  # "unsafe" not in the top-k
    assert guard_score(logprob_verdict(None, -3.0)) == pytest.approx(0.0, abs=1e-12)  # "safe" not in the top-k
    assert guard_score(logprob_verdict(-math.inf, -0.5)) == 0.0
    assert guard_score(logprob_verdict(-0.5, -math.inf)) == 1.0
    assert guard_score(logprob_verdict(-9999.0, -0.01)) == pytest.approx(0.0, abs=1e-12)  # vLLM's -inf
    # neither word among the logprobs: unparsed, counts as unsafe (0), never as a free 0.5
    assert guard_score(logprob_verdict(None, None)) == 0.0


def test_guard_score_text_guards_and_nan():
    assert guard_score(Verdict(safe=True, p_safe=None, refusal=True, parsed=True)) == 1.0
    assert guard_score(Verdict(safe=False, p_safe=None, refusal=False, parsed=True)) == 0.0
    assert guard_score(Verdict(safe=True, p_safe=None, refusal=None, parsed=False)) == 0.0
    with pytest.raises(GuardServerError, match="NaN"):
        guard_score(Verdict(safe=False, p_safe=float("nan"), refusal=None, parsed=True))


class _RecordingGuard:
    def __init__(self, verdicts):
        self.verdicts, self.calls = verdicts, []

    def judge(self, prompts, responses):
        self.calls.append((prompts, responses))
        return self.verdicts


def test_guard_reward_judges_instruction_and_normalised_completion():
    guard = _RecordingGuard([logprob_verdict(-0.1, -2.3), logprob_verdict(None, None, truncated=True)])
    logged = {}
    reward = GuardReward(guard, R1, opened="<think>\n")
    scores = reward(prompts=["<templated prompt>"] * 2, completions=["plan\n</think>\n\nNo.", "x"],
                    instruction=["How do I make a bomb?"] * 2, log_metric=logged.__setitem__)
    prompts, responses = guard.calls[0]
    assert prompts == ["How do I make a bomb?"] * 2  # the user's words, not the chat template
    assert responses[0] == "<think>\nplan\n</think>\n\nNo."  # R1's implicit <think> restored
    assert scores == [pytest.approx(1 / (1 + math.exp(-2.2))), 0.0]
    assert logged == {"guard/unparsed": 1.0, "guard/truncated": 1.0}


def test_guard_reward_without_instruction_column_fails():
    with pytest.raises(Exception, match="instruction"):
        GuardReward(_RecordingGuard([]), QWEN)(prompts=["p"], completions=["c"])


# --- the guard server client ----------------------------------------------------------------


def test_top_logprobs_by_id_parses_vllm_choice():
    choice = {"index": 0, "text": "token_id:5",
              "logprobs": {"text_offset": [0], "token_logprobs": [-0.1], "tokens": ["token_id:5"],
                           "top_logprobs": [{"token_id:5": -0.1, "token_id:9": -2.5, "token_id:1": -9999.0}]}}
    assert top_logprobs_by_id(choice) == {5: -0.1, 9: -2.5, 1: -9999.0}
    with pytest.raises(GuardServerError, match="no top logprobs"):
        top_logprobs_by_id({"index": 0, "text": "safe", "logprobs": None})
    with pytest.raises(GuardServerError, match="token ids"):
        top_logprobs_by_id({"index": 0, "logprobs": {"top_logprobs": [{"safe": -0.1}]}})


MODEL_NAME = "fake-guard"
MAX_MODEL_LEN = 4096


class FakeVLLM:
    """A real HTTP server on 127.0.0.1 answering like `vllm serve`: /health, /v1/models, /v1/completions.

    `answers` maps a prompt's position in the batch to its first-token top logprobs {token id: logprob}
    (missing entries answer with a token that is neither verdict); `status` forces an HTTP error.
    """

    def __init__(self, answers=None, status=200):
        self.answers, self.status, self.requests = answers or {}, status, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": MODEL_NAME, "object": "model", "owned_by": "vllm", "max_model_len": MAX_MODEL_LEN}]})
                else:
                    self._send(200, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if fake.status != 200:
                    self._send(fake.status, {"error": {"message": "engine dead", "code": fake.status}})
                    return
                choices = []
                for i, _ in enumerate(body["prompt"]):
                    top = fake.answers.get(i, {7: -0.01})
                    best = max(top, key=top.get)
                    choices.append({
                        "index": i, "text": f"token_id:{best}", "finish_reason": "length", "stop_reason": None,
                        "logprobs": {"text_offset": [0], "token_logprobs": [top[best]], "tokens": [f"token_id:{best}"],
                                     "top_logprobs": [{f"token_id:{t}": lp for t, lp in top.items()}]},
                    })
                self._send(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL_NAME,
                                 "choices": choices, "usage": {"prompt_tokens": 1, "total_tokens": 2,
                                                               "completion_tokens": 1}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def guard_tokenizer(tiny_qwen3):
    from thinksafe.model_loading import load_tokenizer

    return load_tokenizer(str(tiny_qwen3))


def test_server_guard_scores_from_vllm_logprobs(guard_tokenizer):
    (safe_id,), (unsafe_id,) = verdict_token_ids(guard_tokenizer, with_space_variant=False)
    answers = {
        0: {safe_id: -0.2, unsafe_id: -1.8},  # both in the top-k
        1: {unsafe_id: -0.05, 3: -3.0},  # "safe" missing from the top-k
        2: {3: -0.1, 4: -2.0},  # neither verdict word: unparsed
    }
    prompts = ["How do I make a bomb?", "Tell me a joke.", "Hi"]
    responses = ["<think>\nNo.\n</think>\n\nI can't help with that.", "Sure: ...", "Hello"]
    with FakeVLLM(answers) as server:
        guard = server_guard(server.url, "llama-guard-3", tokenizer=guard_tokenizer, backoff_s=0)
        scores = GuardReward(guard, QWEN)(prompts=prompts, completions=responses, instruction=prompts)
        (request,) = server.requests
    assert scores[0] == pytest.approx(math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.8)))
    assert scores[1] == pytest.approx(0.0, abs=1e-12)
    assert scores[2] == 0.0
    assert request["max_tokens"] == 1 and request["temperature"] == 0.0 and request["logprobs"] >= 2
    assert request["model"] == MODEL_NAME and request["return_tokens_as_token_ids"] is True
    # token ids of Llama-Guard's own template text, tokenised without a second BOS
    expected = [guard_tokenizer(llama_guard_input(guard_tokenizer, p, r), add_special_tokens=False)["input_ids"]
                for p, r in zip(prompts, responses)]
    assert request["prompt"] == expected
    assert guard.max_input_tokens == MAX_MODEL_LEN - 1


def test_server_guard_truncates_to_the_server_context(guard_tokenizer):
    with FakeVLLM() as server:
        guard = server_guard(server.url, "llama-guard-3", tokenizer=guard_tokenizer, max_model_len=200, backoff_s=0)
        verdicts = guard.judge(["q"], ["word " * 2000])
        (request,) = server.requests
    assert verdicts[0].truncated
    assert len(request["prompt"][0]) <= 199


def test_server_error_is_raised_after_bounded_retries(guard_tokenizer):
    with FakeVLLM(status=500) as server:
        guard = server_guard(server.url, "llama-guard-3", tokenizer=guard_tokenizer, retries=3, backoff_s=0)
        with pytest.raises(GuardServerError, match=r"after 3 attempt\(s\): HTTP 500.*engine dead"):
            GuardReward(guard, QWEN)(prompts=["p"], completions=["c"], instruction=["p"])
        assert len(server.requests) == 3


def test_client_error_is_not_retried(guard_tokenizer):
    with FakeVLLM(status=400) as server:
        guard = server_guard(server.url, "llama-guard-3", tokenizer=guard_tokenizer, retries=3, backoff_s=0)
        with pytest.raises(GuardServerError, match="HTTP 400"):
            guard.judge(["p"], ["c"])
        assert len(server.requests) == 1


def test_unreachable_server_fails_loudly():
    from thinksafe.serving import free_ports

    (port,) = free_ports(1)
    with pytest.raises(GuardServerError, match="failed after 2 attempt"):
        VLLMServerBackend(f"http://127.0.0.1:{port}", retries=2, backoff_s=0)
