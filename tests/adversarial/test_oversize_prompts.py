"""A request of long texts costs what the model could take, not what its body holds (helper-98's probe p10).

``POST /v1/completions`` with 120 prompts of 32,300 characters (3.9 MB, each within --max-text-chars, the body
within --max-body-bytes) was tokenized whole, 7 s of CPU, before its 400 ``context_length_exceeded``, and another
tenant's time to first token went from 15 to 80 ms meanwhile; the same through /v1/generate, a chat conversation,
and /v1/embeddings (texts tokenized whole to keep 64 tokens). Now only a prefix of the first text past the context
is tokenized (:mod:`bca_deploy.serving.prefix`); a text within it gets exactly the tokens it had. The work is
counted in characters handed to the server's tokenizer, never timed. Tiny Llama (128 positions, word-level
tokenizer that drops whitespace) and tiny BERT (64 positions, WordPiece behind BERT's normalizer) banks, loopback.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from http_helpers import bank, call  # noqa: E402

LONG = "the water is hot " * 1_900  # 32,300 characters, 7,600 tokens
#: The characters a refusal or a truncation of the 128- or 64-position models may read: the first prefix
#: (bca_deploy.serving.prefix: (128 + 1 + 16) x 8 + 256 = 1,416) with room to spare, against 3.9 million.
READ_AT_MOST = 3_000


class Recording:
    """The server's tokenizer, counting the characters it is handed."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text, **options):
        self.chars += len(text)
        return self.tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __setattr__(self, name, value):  # truncation_side, set by the server for a text kept from its end
        if name in ("tokenizer", "chars"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.tokenizer, name, value)


def _serve(art):
    from bca_deploy.serving.http import ServerThread, build
    from bca_deploy.serving.session import TurnPool

    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    session = app.state.session
    recording = Recording(copy.deepcopy(session.tokenizer))
    session._tokenizers = TurnPool([recording])  # every text the routes tokenize goes through it
    return ServerThread(app), recording


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    art = bank("llama", tmp_path_factory)
    thread, recording = _serve(art)
    with thread as server:
        yield art, server.url, recording


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    art = bank("bert", tmp_path_factory)
    thread, recording = _serve(art)
    with thread as server:
        yield art, server.url, recording


def _refused(answer: dict, param: str) -> str:
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}, error  # OpenAI's shape, as before
    assert error["type"] == "context_length_exceeded" and error["param"] == param and error["code"] == 400, error
    assert "maximum context length is 128 positions" in error["message"], error
    return error["message"]


@pytest.mark.parametrize("path, field, extra", [("/v1/completions", "prompt", {"model": "a0", "max_tokens": 1}),
                                                ("/v1/generate", "input", {"adapter": "a0", "max_new_tokens": 1})])
def test_many_prompts_past_the_context_are_refused_from_a_prefix_of_the_first(llama, path, field, extra):
    _, url, recording = llama
    recording.chars = 0
    status, answer = call(url + path, "POST", {field: [LONG] * 120, **extra})
    assert status == 400, answer
    message = _refused(answer, field)
    assert recording.chars <= READ_AT_MOST, recording.chars  # before: 3,876,000
    assert message.startswith(f"{field}: more than 128 tokens (its first "), message


def test_many_prompts_cut_to_their_last_tokens_are_read_from_a_suffix_each(llama):
    """vLLM's truncate_prompt_tokens on 120 prompts of 32,300 characters (3.9 MB): each is cut to its last 16 tokens
    from a suffix of about a thousand characters (one look, one truncation of it), not tokenized whole."""
    from transformers import AutoTokenizer

    art, url, recording = llama
    tokenizer = AutoTokenizer.from_pretrained(art["onnx"])
    recording.chars = 0
    status, answer = call(url + "/v1/completions", "POST", {"model": "a0", "prompt": [LONG] * 120, "max_tokens": 1,
                                                            "temperature": 0, "truncate_prompt_tokens": 16})
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == 120 * 16
    assert recording.chars <= 120 * 2 * ((16 + 1 + 16) * 8 + 256), recording.chars  # whole: 3,876,000
    assert recording.truncation_side == "right"  # the server's copy is left as it was
    # the same answer as the tokenizer's own last 16 tokens sent as ids
    tokenizer.truncation_side = "left"
    kept = tokenizer(LONG, truncation=True, max_length=16)["input_ids"]
    status, by_ids = call(url + "/v1/completions", "POST", {"model": "a0", "prompt": kept, "max_tokens": 1,
                                                            "temperature": 0})
    assert status == 200 and {c["text"] for c in answer["choices"]} == {by_ids["choices"][0]["text"]}, by_ids


def test_a_conversation_past_the_context_is_refused_from_a_prefix(llama):
    _, url, recording = llama
    recording.chars = 0
    half = "the water is hot " * 880  # two messages, 30,000 characters rendered: within the rendered-size bound
    status, answer = call(url + "/v1/chat/completions", "POST", {
        "model": "a0", "max_tokens": 1, "messages": [{"role": "user", "content": half}] * 2})
    assert status == 400, answer
    message = _refused(answer, "messages")
    assert recording.chars <= READ_AT_MOST, recording.chars  # before: 29,954 (the whole rendering)
    assert message.startswith("messages: more than 128 tokens"), message


def test_a_prompt_just_within_the_context_keeps_its_tokens_and_one_past_it_is_counted_exactly(llama):
    """127 words 20 spaces apart (2,921 characters, more than the first prefix: the whitespace the tokenizer drops
    makes the prefix grow to the whole text) are answered as their token ids are; 129 are refused with their count."""
    from transformers import AutoTokenizer

    art, url, recording = llama
    tokenizer = AutoTokenizer.from_pretrained(art["onnx"])
    spaced = ("the" + " " * 20) * 126 + "water"
    ids = tokenizer(spaced)["input_ids"]
    assert len(ids) == 127 and len(spaced) > 1_416
    body = {"model": "a0", "max_tokens": 1, "temperature": 0}
    status, by_text = call(url + "/v1/completions", "POST", {**body, "prompt": spaced})
    assert status == 200 and by_text["usage"]["prompt_tokens"] == 127, by_text
    status, by_ids = call(url + "/v1/completions", "POST", {**body, "prompt": ids})
    assert status == 200 and by_ids["choices"][0]["text"] == by_text["choices"][0]["text"], (by_ids, by_text)

    recording.chars = 0
    status, answer = call(url + "/v1/completions", "POST", {**body, "prompt": spaced + " hot hot"})
    assert status == 400 and _refused(answer, "prompt").startswith("prompt: 129 tokens;"), answer
    assert recording.chars < 3 * len(spaced)  # prefixes doubling to the whole text


def _vectors(url: str, inputs) -> np.ndarray:
    status, answer = call(url + "/v1/embeddings", "POST", {"model": "a1", "input": inputs})
    assert status == 200, answer
    return np.array([item["embedding"] for item in answer["data"]])


def test_long_texts_to_embed_are_truncated_from_a_prefix_with_the_same_tokens(bert):
    """120 texts of 32,300 characters, cut to the model's 64 positions: the same vectors as the ids the tokenizer
    keeps of each whole text, from a prefix of each; and a text whose first 28,000 characters BERT's normalizer
    deletes (whitespace, zero-width spaces) still gets the ids of the whole text."""
    from transformers import AutoTokenizer

    art, url, recording = bert
    tokenizer = AutoTokenizer.from_pretrained(art["onnx"])
    kept = tokenizer(LONG, truncation=True, max_length=64)["input_ids"]
    assert len(kept) == 64
    recording.chars = 0
    by_text = _vectors(url, [LONG] * 120)
    assert recording.chars <= 120 * READ_AT_MOST // 2, recording.chars  # before: 3,876,000
    np.testing.assert_allclose(by_text, np.repeat(_vectors(url, [kept]), 120, axis=0), rtol=1e-5, atol=1e-6)

    hidden = "  \t\u200b" * 7_000 + "The WATER is Hót " * 40
    kept = tokenizer(hidden, truncation=True, max_length=64)["input_ids"]
    plain = tokenizer("the water is hot", add_special_tokens=False)["input_ids"]
    assert kept[1:1 + len(plain)] == plain, kept  # the deleted text gone, lowercased, the accent stripped
    np.testing.assert_allclose(_vectors(url, [hidden]), _vectors(url, [kept]), rtol=1e-5, atol=1e-6)
