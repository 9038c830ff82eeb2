"""vLLM's routes outside OpenAI's API and its ``truncate_prompt_tokens``, against a real ``bca-deploy serve``.

A user moving from vLLM calls ``POST /tokenize`` / ``/detokenize`` (to count a prompt's tokens, to read token ids),
``GET /version``, reads ``max_model_len`` from ``/v1/models``, and sends ``truncate_prompt_tokens`` to cut a long
prompt. Before, the routes were 404s, the cards had no ``max_model_len`` and ``truncate_prompt_tokens`` was a 400:
every test here fails on that code.

References are independent of the serving code: transformers' ``AutoTokenizer`` of the export (``__call__`` with
``truncation_side`` "left" for a decoder's prompt, as vLLM's tokenizer for generation; "right" for an encoder's text,
as vLLM's for pooling), ``apply_chat_template``, ``decode``, ``convert_ids_to_tokens``, ``AutoConfig``'s positions;
the vectors and tokens of a truncated request are the in-process :class:`MultiAdapterSession`'s for the ids those
references give (checked against PyTorch by ``test_session.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import ServeProcess, assert_error, bank, call, llama_serve, openai_client  # noqa: E402

import bca_deploy  # noqa: E402
from bca_deploy.serving import MultiAdapterSession  # noqa: E402

POSITIONS = 128  # the tiny Llama's (http_helpers.tiny_llama)
LONG = " ".join(["the water is hot and you can see the day"] * 40)  # 400 tokens: past the context


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return bank("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory):
    with llama_serve(llama["onnx"], llama["store"], tmp_path_factory.mktemp("logs") / "utility-serve.log") as process:
        yield process


@pytest.fixture(scope="module")
def tokenizer(llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama["onnx"])


@pytest.fixture(scope="module")
def session(llama):
    return MultiAdapterSession(llama["onnx"], intra_op_threads=1)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bank("bert", tmp_path_factory)


@pytest.fixture(scope="module")
def bert_server(bert, tmp_path_factory):
    with ServeProcess(bert["onnx"], "--served-model-name", "tiny-bert",
                      log=tmp_path_factory.mktemp("logs") / "utility-bert.log") as process:
        yield process


# ---- /tokenize, /detokenize, /version ------------------------------------------------------------------------


def test_tokenize_a_prompt_gives_the_tokenizers_ids_and_counts_one_past_the_context(server, tokenizer):
    for model in ("tiny-llama", "a1", None):
        body = {"prompt": "the water is hot"} if model is None else {"model": model, "prompt": "the water is hot"}
        status, answer = call(server.url + "/tokenize", "POST", body)
        expected = tokenizer("the water is hot")["input_ids"]
        assert status == 200 and answer == {"count": len(expected), "max_model_len": POSITIONS, "tokens": expected}
    # a prompt past the context is counted, as vLLM counts it (a client asks to find out whether it fits)
    status, answer = call(server.url + "/tokenize", "POST", {"model": "a0", "prompt": LONG,
                                                             "add_special_tokens": False, "return_token_strs": True})
    expected = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert status == 200 and answer["tokens"] == expected and answer["count"] == len(expected) > POSITIONS
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(expected)
    # an unknown model: the 404 of every other route
    status, answer = call(server.url + "/tokenize", "POST", {"model": "nope", "prompt": "the day"})
    status_c, answer_c = call(server.url + "/v1/completions", "POST", {"model": "nope", "prompt": "the day"})
    assert_error(status, answer, 404, words=("nope",))
    assert (status, answer["error"]["type"], answer["error"]["param"]) == (
        status_c, answer_c["error"]["type"], answer_c["error"]["param"]) == (404, "unknown_adapter", "model")
    for bad, field in (({"prompt": 5}, "prompt"), ({"prompt": "a", "truncate": True}, "truncate"),
                       ({"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens")):
        status, answer = call(server.url + "/tokenize", "POST", {"model": "a0", **bad})
        assert_error(status, answer, 400)
        assert answer["error"]["param"] == field, answer


def test_tokenize_messages_gives_the_chat_templates_ids(server, tokenizer):
    messages = [{"role": "system", "content": "you are hot"}, {"role": "user", "content": "the water is hot"}]
    for extra, options in (({}, {"add_generation_prompt": True}),
                           ({"add_generation_prompt": False}, {"add_generation_prompt": False}),
                           ({"add_generation_prompt": False, "continue_final_message": True},
                            {"add_generation_prompt": False, "continue_final_message": True})):
        status, answer = call(server.url + "/tokenize", "POST", {"model": "a2", "messages": messages, **extra})
        expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **options)
        assert status == 200 and answer["tokens"] == expected and answer["count"] == len(expected), (extra, answer)
    # a conversation past the context is counted too
    status, answer = call(server.url + "/tokenize", "POST", {"model": "a2", "messages": [
        {"role": "user", "content": LONG}]})
    assert status == 200 and answer["count"] == len(tokenizer.apply_chat_template(
        [{"role": "user", "content": LONG}], tokenize=True, return_dict=False, add_generation_prompt=True)) > POSITIONS
    status, answer = call(server.url + "/tokenize", "POST", {"model": "a2", "messages": messages,
                                                             "continue_final_message": True})
    assert_error(status, answer, 400, words=("add_generation_prompt",))
    assert answer["error"]["param"] == "continue_final_message"


def test_detokenize_gives_the_tokenizers_text_and_refuses_ids_outside_the_vocabulary(server, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "the water is hot"}], tokenize=True,
                                        return_dict=False)
    for model in ("tiny-llama", "a0"):
        status, answer = call(server.url + "/detokenize", "POST", {"model": model, "tokens": ids})
        assert status == 200 and answer == {"prompt": tokenizer.decode(ids)}  # special tokens kept, as vLLM
    assert "<s>" in answer["prompt"]
    assert call(server.url + "/detokenize", "POST", {"model": "a0", "tokens": []}) == (200, {"prompt": ""})
    for tokens in ([5, 128], [-1, 5], [5, 10**12]):
        status, answer = call(server.url + "/detokenize", "POST", {"model": "a0", "tokens": tokens})
        assert_error(status, answer, 400, words=("128",))
        assert answer["error"]["param"] == "tokens", answer
    for tokens in ([5, "7"], [5, 1.5], "5 7", [[5]]):
        status, answer = call(server.url + "/detokenize", "POST", {"model": "a0", "tokens": tokens})
        assert_error(status, answer, 400)
        assert answer["error"]["param"] == "tokens", answer
    # bounded as texts are: at most the larger of max_model_len and --max-text-chars (32,768) ids
    assert call(server.url + "/detokenize", "POST", {"model": "a0", "tokens": [5] * 32_768})[0] == 200
    status, answer = call(server.url + "/detokenize", "POST", {"model": "a0", "tokens": [5] * 32_769})
    assert_error(status, answer, 400, words=("32,768",))
    assert answer["error"]["param"] == "tokens"
    status, answer = call(server.url + "/detokenize", "POST", {"model": "nope", "tokens": [5]})
    assert_error(status, answer, 404, "unknown_adapter", words=("nope",))


def test_version_and_max_model_len_on_every_model(server, bert_server, bert):
    from transformers import AutoConfig

    assert call(server.url + "/version") == (200, {"version": bca_deploy.__version__})
    cards = openai_client(server.url).models.list().data
    assert [c.id for c in cards] == ["tiny-llama", "a0", "a1", "a2"]
    assert [c.model_extra["max_model_len"] for c in cards] == [POSITIONS] * 4
    assert call(server.url + "/v1/models/a1")[1]["max_model_len"] == POSITIONS
    # an encoder that cannot generate: its context length (its positions; its tokenizer states none lower)
    positions = AutoConfig.from_pretrained(bert["model"]).max_position_embeddings
    cards = openai_client(bert_server.url).models.list().data
    assert [c.model_extra["max_model_len"] for c in cards] == [positions] * 4
    status, answer = call(bert_server.url + "/tokenize", "POST", {"model": "a1", "prompt": "the water is hot"})
    assert status == 200 and answer["max_model_len"] == positions


# ---- truncate_prompt_tokens ----------------------------------------------------------------------------------


def test_completions_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server, tokenizer, session):
    llm = openai_client(server.url)
    tokenizer.truncation_side = "left"  # vLLM's tokenizer for a generating model
    try:
        kept = tokenizer(LONG, truncation=True, max_length=20)["input_ids"]
    finally:
        tokenizer.truncation_side = "right"
    assert len(kept) == 20 and kept == tokenizer(LONG)["input_ids"][-20:]
    expected = session.decode(session.generate([kept], ["a1"], max_new_tokens=3)[0])
    whole = tokenizer(LONG)["input_ids"]
    for prompt in (LONG, whole):  # a text, and token ids (vLLM keeps a token list's last ones too)
        answer = llm.completions.create(model="a1", prompt=prompt, max_tokens=3, temperature=0,
                                        extra_body={"truncate_prompt_tokens": 20})
        assert answer.usage.prompt_tokens == 20
        assert answer.choices[0].text.strip() == expected.strip()
    # -1: the model's max_model_len; the prompt then fills the context, and the new tokens do not fit
    status, answer = call(server.url + "/v1/completions", "POST", {"model": "a1", "prompt": LONG, "max_tokens": 2,
                                                                   "truncate_prompt_tokens": -1})
    assert_error(status, answer, 400, "context_length_exceeded", words=(f"{POSITIONS} tokens",))
    assert "more than" not in answer["error"]["message"]  # cut to 128, not the whole prompt's refusal
    for value in (POSITIONS + 1, 0, -2):
        status, answer = call(server.url + "/v1/completions", "POST", {"model": "a1", "prompt": LONG, "max_tokens": 2,
                                                                       "truncate_prompt_tokens": value})
        assert_error(status, answer, 400)
        assert answer["error"]["param"] == "truncate_prompt_tokens", answer
    # a text at --max-text-chars, cut to its last 16 tokens: answered from a bounded suffix
    big = ("the water is hot " * 2000)[:32_000]
    answer = llm.completions.create(model="a0", prompt=big, max_tokens=1, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 16})
    assert answer.usage.prompt_tokens == 16


def test_embeddings_truncate_prompt_tokens_keeps_a_texts_first_tokens(bert_server, bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert["onnx"])
    session = MultiAdapterSession(bert["onnx"], intra_op_threads=1)
    client = openai_client(bert_server.url)
    text = "the water is hot and you can see the day " * 3
    kept = tokenizer(text, truncation=True, max_length=6)["input_ids"]  # vLLM's pooling models cut on the right
    assert len(kept) == 6 and kept[-1] == tokenizer.sep_token_id
    ids = tokenizer(text)["input_ids"]
    for rows, expected_ids in (([text], [kept]), ([ids], [ids[-6:]])):  # token ids: their last ones, as vLLM
        answer = client.embeddings.create(model="a0", input=rows, extra_body={"truncate_prompt_tokens": 6})
        expected = session.embed(expected_ids, ["a0"], pooling="mean", normalize=True)
        np.testing.assert_allclose([d.embedding for d in answer.data], expected, atol=1e-5, rtol=0)
        assert answer.usage.prompt_tokens == 6
    answer = client.embeddings.create(model="a0", input=[text], extra_body={"truncate_prompt_tokens": -1})
    expected = session.embed([ids], ["a0"], pooling="mean", normalize=True)
    np.testing.assert_allclose([d.embedding for d in answer.data], expected, atol=1e-5, rtol=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="a0", input=[text], extra_body={"truncate_prompt_tokens": 10**6})
    assert refused.value.body["param"] == "truncate_prompt_tokens"
