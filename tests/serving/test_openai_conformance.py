"""What real OpenAI clients send, against a real ``bca-deploy serve``: the official ``openai`` client's own habits
(a conversation sent back with ``message.model_dump()``), vLLM's reading of chat messages (text parts, ``name``),
batched prompts with a seed (LangChain batches prompts into one completions request), fields whose "neutral"
value is not neutral (``logprobs: 0``), and vLLM's adapter-loading routes.

The server runs the tiny Llama export of ``http_helpers.llama_bank`` with a chat template that shows messages'
``name``; every answer is checked against the in-process :class:`~bca_deploy.serving.MultiAdapterSession`
(greedy or seeded sampling) on the prompt transformers' ``apply_chat_template`` makes of the messages as vLLM
reads them, never against the server itself.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call, continuation, llama_serve, openai_client, write_word_tokenizer

from bca_deploy.serving import MultiAdapterSession

#: The helpers' template, plus the message's ``name`` when it has one (as ChatML-style templates write it).
NAME_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {% if m['name'] is defined %}{{ m['name'] }} {% endif %}"
                 ": {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant :{% endif %}")
PROMPTS = ["the water is hot and", "you can see the", "how many people know"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The tiny Llama bank export with NAME_TEMPLATE as its chat template (and its adapter store)."""
    llama = bank("llama", tmp_path_factory)
    copy = tmp_path_factory.mktemp("conformance") / "onnx"
    shutil.copytree(llama["onnx"], copy)
    for old in copy.glob("chat_template.*"):
        old.unlink()
    write_word_tokenizer(copy, chat_template=NAME_TEMPLATE)
    return {"onnx": copy, "store": llama["store"]}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "conformance-serve.log"
    with llama_serve(export["onnx"], export["store"], log) as process:
        yield process


@pytest.fixture(scope="module")
def session(export):
    return MultiAdapterSession(export["onnx"], intra_op_threads=1)


@pytest.fixture(scope="module")
def llm(server):
    return openai_client(server.url)


def greedy(session, ids: list[int], adapter: str | None, n: int) -> tuple[str, int]:
    """(text, completion tokens) of greedy decoding in-process."""
    tokens = session.generate([ids], [adapter], max_new_tokens=n)[0]
    return continuation(session, ids, tokens), len(tokens)


def template_ids(session, messages: list[dict]) -> list[int]:
    """The prompt of ``messages`` (plain dicts: role, content string, name) through the chat template."""
    text = session.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return session.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_conversation_sent_back_with_model_dump_continues(llm, session):
    """``messages.append(answer.choices[0].message.model_dump())`` sends the answer's empty fields back (refusal,
    tool_calls, function_call, audio, annotations: null); that used to be a 422 ("Extra inputs are not
    permitted"), breaking the usual chat loop. The reply equals the session's on the conversation's text."""
    first = [{"role": "user", "content": "what is the day"}]
    answer = llm.chat.completions.create(model="a0", messages=first, max_tokens=4, temperature=0)
    said = answer.choices[0].message
    dumped = said.model_dump()
    assert {"refusal", "tool_calls", "function_call"} <= set(dumped)  # what the client really sends back
    follow = {"role": "user", "content": "and the water"}
    expected, n = greedy(session, template_ids(session, [*first, {"role": "assistant", "content": said.content},
                                                         follow]), "a0", 5)
    for sent in (dumped, said, {**dumped, "tool_calls": [], "annotations": []}):
        reply = llm.chat.completions.create(model="a0", messages=[*first, sent, follow], max_tokens=5, temperature=0)
        assert reply.choices[0].message.content == expected and reply.usage.completion_tokens == n
    # with a value, those fields are refused by name (tool_calls are taken: test_openai_tools.py)
    for field, value in (("refusal", "no"), ("function_call", {"name": "f"})):
        with pytest.raises(openai.BadRequestError) as caught:
            llm.chat.completions.create(model="a0", messages=[*first, {**dumped, field: value}, follow], max_tokens=2)
        assert caught.value.body["param"] == "messages" and field in caught.value.body["message"]


def test_text_parts_join_with_a_line_break_and_names_reach_the_template(llm, session):
    """Content given as text parts is one text joined with "\\n" (vLLM, SGLang, TensorRT-LLM); it used to be joined
    with nothing, so ["what is", "the day"] became "what isthe day". A message's ``name`` reaches the chat
    template, as in vLLM; it used to be dropped."""
    parts = [{"type": "text", "text": "what is"}, {"type": "text", "text": "the day"}]
    sent = [{"role": "system", "content": "you are a word", "name": "she"},
            {"role": "user", "content": parts, "name": "he"}]
    as_read = [{"role": "system", "content": "you are a word", "name": "she"},
               {"role": "user", "content": "what is\nthe day", "name": "he"}]
    ids = template_ids(session, as_read)
    assert ids != template_ids(session, [{"role": m["role"], "content": m["content"]} for m in as_read])
    for model, adapter in (("a1", "a1"), ("tiny-llama", None)):
        expected, n = greedy(session, ids, adapter, 6)
        answer = llm.chat.completions.create(model=model, messages=sent, max_tokens=6, temperature=0)
        assert answer.usage.prompt_tokens == len(ids)
        assert answer.choices[0].message.content == expected and answer.usage.completion_tokens == n


def test_every_prompt_of_a_batch_samples_with_the_requests_seed(llm, session):
    """Prompts batched into one completions request (as LangChain sends them) sample as each would alone with that
    seed, as in vLLM; prompt i used to sample with seed + i, so its text depended on its place in the batch."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    answer = llm.completions.create(model="a1", prompt=prompts, max_tokens=8, temperature=1.3, seed=11)
    for choice, prompt in zip(answer.choices, prompts, strict=True):
        ids = session.tokenize([prompt], truncate=False)[0]
        tokens = session.generate([ids], ["a1"], max_new_tokens=8, do_sample=True, temperature=1.3, seed=11)[0]
        assert choice.text == continuation(session, ids, tokens), (choice.index, prompt)
    assert answer.choices[1].text == answer.choices[2].text
    # any seed of the engine's range [0, 2**63) is taken (the route used to stop at 2**62, room for seed + i)
    top = 2**63 - 1
    ids = session.tokenize([PROMPTS[2]], truncate=False)[0]
    tokens = session.generate([ids], [None], max_new_tokens=6, do_sample=True, temperature=1.0, seed=top)[0]
    answer = llm.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, seed=top)
    assert answer.choices[0].text == continuation(session, ids, tokens)
    for seed in (2**63, -(2**63) - 1):  # outside vLLM's int64: refused by name (negative seeds: test_openai_vllm_fields)
        with pytest.raises(openai.BadRequestError) as caught:
            llm.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=2, seed=seed)
        assert caught.value.body["param"] == "seed"


def test_completion_logprobs_zero_is_answered_not_ignored(llm):
    """``logprobs: 0`` on completions asks for the chosen tokens' log-probabilities (OpenAI, vLLM); it used to be
    taken as "none" and answered with ``logprobs: null``, which a client reading them trips over (then refused;
    now answered: test_openai_logprobs checks the numbers). ``false`` is chat's shape: refused, not read as 0."""
    answer = llm.completions.create(model="a0", prompt="the day", max_tokens=2, logprobs=0)
    assert len(answer.choices[0].logprobs.token_logprobs) == answer.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        llm.completions.create(model="a0", prompt="the day", max_tokens=2, extra_body={"logprobs": False})
    assert caught.value.body["param"] == "logprobs"
    # null is neutral there; false is on chat, where logprobs is a boolean
    assert llm.completions.create(model="a0", prompt="the day", max_tokens=2, logprobs=None).choices[0].logprobs is None
    assert llm.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logprobs=False, top_logprobs=0).choices


def test_vllm_lora_routes_name_their_fields(server):
    """vLLM's load/unload routes: a second load says to send ``load_inplace`` (it used to say "replace", the native
    route's field, which this route refuses); the refusals name ``lora_name`` / ``lora_path``."""
    url = server.url
    status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "extra"})
    assert status == 200, body
    try:
        status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "extra"})
        assert status == 409 and body["error"]["param"] == "lora_name", body
        assert "load_inplace" in body["error"]["message"] and "replace\"" not in body["error"]["message"]
        status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "extra", "load_inplace": True})
        assert status == 200, body
    finally:
        status, body = call(url + "/v1/unload_lora_adapter", "POST", {"lora_name": "extra"})
        assert status == 200, body
    status, body = call(url + "/v1/unload_lora_adapter", "POST", {"lora_name": "extra"})
    assert status == 404 and body["error"]["param"] == "lora_name", body
    status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "x", "lora_path": "ghost"})
    assert status == 404 and body["error"]["param"] == "lora_path", body


def test_a_stop_string_across_tokens_is_cut_alike_streamed_or_not(llm, session):
    """A stop string that starts inside one token and ends inside the next: the text stops right before it, the
    stream never sends any of it (its start is held back until it is known not to be a stop), finish "stop"."""
    ids = session.tokenize([PROMPTS[0]], truncate=False)[0]
    full, _ = greedy(session, ids, "a2", 12)
    lead = len(full) - len(full.lstrip(" "))  # the space the first word carries after the prompt
    words = full[lead:].split(" ")
    assert len(words) >= 4 and all(len(w) >= 2 for w in words[1:3]), full
    at = lead + len(words[0]) + 1 + len(words[1]) - 1  # the last character of the second word
    stop = full[at:at + 3]  # its last character, the space, the next word's first character
    expected = full[:full.find(stop)]
    answer = llm.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    chunks = list(llm.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop,
                                         stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_vllm_sampling_extensions(llm, session):
    """``stop_token_ids`` ends a row at that token, kept in the text and usage as vLLM keeps it (its docs: "the
    returned output will contain the stop tokens unless the stop tokens are special tokens"); vLLM's other sampling
    extensions are accepted at their default and refused, naming the field, anywhere else (``repetition_penalty``,
    ``ignore_eos``, ``min_tokens`` and ``min_p`` are served: refused only outside vLLM's range; see test_penalties.py,
    test_openai_vllm_fields.py and test_logit_bias_min_p.py)."""
    ids = session.tokenize([PROMPTS[0]])[0]
    tokens = session.generate([ids], ["a0"], max_new_tokens=8, eos_token_id=[])[0]
    stop = next(t for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])
    cut = tokens[:tokens.index(stop) + 1]
    answer = llm.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                    extra_body={"stop_token_ids": [stop]})
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == len(cut)
    assert answer.choices[0].text == continuation(session, ids, cut)
    neutral = {"ignore_eos": False, "min_tokens": 0, "min_p": 0, "repetition_penalty": 1.0,
               "skip_special_tokens": True, "spaces_between_special_tokens": True, "include_stop_str_in_output": False}
    plain = llm.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    same = llm.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=4, temperature=0, extra_body=neutral)
    assert same.choices[0].text == plain.choices[0].text
    for field, value in (("ignore_eos", "yes"), ("min_tokens", -1), ("min_p", 1.1), ("repetition_penalty", 0),
                         ("include_stop_str_in_output", True)):
        with pytest.raises(openai.BadRequestError) as caught:
            llm.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=4, extra_body={field: value})
        assert field in caught.value.body["message"], caught.value.body
