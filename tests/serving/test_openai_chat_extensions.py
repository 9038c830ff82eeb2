"""vLLM's chat extensions on ``/v1/chat/completions``, sent with the official ``openai`` client's ``extra_body`` to a real
``bca-deploy serve``: ``chat_template_kwargs`` (Qwen3 users' ``{"enable_thinking": false}``), ``documents``,
``add_generation_prompt``, ``continue_final_message`` (a prefilled answer), ``echo`` and ``add_special_tokens``. Each
used to be refused with a 400 even at its default (``chat_template_kwargs: not a field of this request``): every
test here fails on that code.

The reference is independent of the serving code: transformers' own ``tokenizer.apply_chat_template(messages,
add_generation_prompt=..., continue_final_message=..., tokenize=True, **kwargs)`` on the export's tokenizer (a
word-level tokenizer whose template reads ``enable_thinking``, ``documents`` and a list-valued ``extra_words``, and
whose post-processor adds ``<s>`` so ``add_special_tokens`` shows), and the in-process
:class:`~bca_deploy.serving.MultiAdapterSession`'s greedy tokens for those ids (which ``test_session.py`` checks
against PyTorch). vLLM's rules (``vllm/entrypoints/openai/chat_completion/protocol.py``, ``serving.py``,
``vllm/renderers``): both ``add_generation_prompt`` and ``continue_final_message`` true is a 400; without the generation
prompt the answer's role is the last message's; ``echo`` puts the last message's text before the answer when that
message has the answer's role; ``chat_template`` and ``chat_template_kwargs``' ``tokenize`` / ``chat_template`` are
refused. ``truncate_prompt_tokens`` (vLLM's ``_normalize_prompt_text_to_input``: the rendered text tokenized with
``truncation=True, max_length=k`` by a tokenizer whose ``truncation_side`` is "left"; -1: ``max_model_len``) keeps the
rendered conversation's last k tokens; the reference is the tokenizer's own left truncation of the rendered text. It
was refused on chat (a 400) before: its tests fail on that code.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call, continuation, llama_serve  # noqa: E402
from http_helpers import llm  # noqa: E402,F401 - a module fixture (over this module's server)

from bca_deploy.serving import MultiAdapterSession  # noqa: E402

#: Reads what vLLM users pass: a flag (enable_thinking, Qwen3's), RAG documents, a JSON list.
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% for d in documents or [] %}<s> system : {{ d['title'] }} {{ d['text'] }} </s> {% endfor %}"
            "{% if extra_words %}{{ extra_words | join(' ') }} {% endif %}"
            "{% if add_generation_prompt %}<s> assistant :"
            "{% if enable_thinking is defined and not enable_thinking %} no{% endif %}{% endif %}")
CHAT = [{"role": "system", "content": "you are a word"}, {"role": "user", "content": "what is the day"}]
PREFILL = [*CHAT, {"role": "assistant", "content": "the water is"}]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The tiny Llama bank's export with :data:`TEMPLATE` and a ``<s>``-adding post-processor on its tokenizer."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    llama = bank("llama", tmp_path_factory)
    root = tmp_path_factory.mktemp("chat-extensions") / "export"
    shutil.copytree(llama["onnx"], root)
    for leftover in root.glob("chat_template.*"):
        leftover.unlink()
    tokenizer = AutoTokenizer.from_pretrained(root)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", 1)])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(root)
    return {"dir": root, "store": llama["store"]}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "chat-extensions-serve.log"
    with llama_serve(export["dir"], export["store"], log) as process:
        yield process


@pytest.fixture(scope="module")
def session(export):
    return MultiAdapterSession(export["dir"], intra_op_threads=1)


def reference_ids(session, messages, add_generation_prompt=True, continue_final_message=False,
                  add_special_tokens=False, **kwargs) -> list[int]:
    """transformers' tokens of the conversation (``apply_chat_template(tokenize=True)``: no special tokens added), or
    the rendered text tokenized with them (vLLM's ``add_special_tokens``)."""
    tokenizer = session.tokenizer
    if add_special_tokens:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False, **kwargs)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message, tokenize=True,
                                              return_dict=False, **kwargs))


def greedy(session, ids: list[int], adapter: str | None, n: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of greedy decoding in-process."""
    tokens = session.generate([ids], [adapter], max_new_tokens=n)[0]
    eos = bool(tokens) and tokens[-1] in session.eos_token_ids
    return continuation(session, ids, tokens), "stop" if eos else "length", len(tokens)


def ask(llm, messages, model="a1", stream=False, **extra):
    return llm.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=stream,
                                       extra_body=extra or None)


def streamed(chunks) -> tuple[str | None, str, str | None]:
    """(first delta's role, the deltas' text, the finish reason) of a streamed answer."""
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks[0].choices[0].delta.role, text, chunks[-1].choices[0].finish_reason


def test_chat_template_kwargs_and_documents_reach_the_template(llm, session):
    plain = reference_ids(session, CHAT)
    cases = [({"chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False}),
             ({"chat_template_kwargs": {"enable_thinking": True}}, {"enable_thinking": True}),
             ({"chat_template_kwargs": {"extra_words": ["hot", "water"], "unused_by_the_template": {"a": [1, None]}}},
              {"extra_words": ["hot", "water"], "unused_by_the_template": {"a": [1, None]}}),
             ({"documents": [{"title": "day", "text": "the water is hot"}]},
              {"documents": [{"title": "day", "text": "the water is hot"}]}),
             ({"documents": [{"title": "day", "text": "it is hot"}], "chat_template_kwargs": {"enable_thinking": False}},
              {"documents": [{"title": "day", "text": "it is hot"}], "enable_thinking": False})]
    prompts = set()
    for extra, kwargs in cases:
        ids = reference_ids(session, CHAT, **kwargs)
        prompts.add(tuple(ids))
        text, finish, n = greedy(session, ids, "a1", 8)
        answer = ask(llm, CHAT, **extra)
        assert answer.choices[0].message.content == text, extra
        assert answer.choices[0].finish_reason == finish and answer.choices[0].message.role == "assistant"
        assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == n, extra
    assert len(prompts) == len(cases) and tuple(plain) in prompts  # each changes the prompt; enable_thinking true: none
    # streamed too, and through another adapter and the base model
    kwargs = {"enable_thinking": False}
    ids = reference_ids(session, CHAT, **kwargs)
    for model, adapter in (("a2", "a2"), ("tiny-llama", None)):
        text, finish, _ = greedy(session, ids, adapter, 8)
        assert streamed(ask(llm, CHAT, model, stream=True, chat_template_kwargs=kwargs)) == ("assistant", text, finish)


def test_continue_final_message_prefills_the_answer_and_echo_returns_it(llm, session):
    ids = reference_ids(session, PREFILL, add_generation_prompt=False, continue_final_message=True)
    assert ids != reference_ids(session, PREFILL)  # the last message left open, no new turn
    text, finish, n = greedy(session, ids, "a0", 8)
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    answer = ask(llm, PREFILL, "a0", **extra)
    assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == n
    # echo: the prefilled text, then the continuation (vLLM's), whole and streamed
    answer = ask(llm, PREFILL, "a0", echo=True, **extra)
    assert answer.choices[0].message.content == "the water is" + text
    assert answer.usage.completion_tokens == n
    assert streamed(ask(llm, PREFILL, "a0", stream=True, echo=True, **extra)) == ("assistant", "the water is" + text,
                                                                                 finish)
    # echo with the generation prompt: the last message is the user's, not the answer's role: nothing is prepended
    plain = greedy(session, reference_ids(session, CHAT), "a0", 8)[0]
    assert ask(llm, CHAT, "a0", echo=True).choices[0].message.content == plain
    # no generation prompt, no continuation: the template's closed conversation; the answer has the last message's
    # role, as vLLM gives it
    ids = reference_ids(session, CHAT, add_generation_prompt=False)
    answer = ask(llm, CHAT, "a0", add_generation_prompt=False)
    assert answer.choices[0].message.content == greedy(session, ids, "a0", 8)[0]
    assert answer.choices[0].message.role == "user" and answer.usage.prompt_tokens == len(ids)


def test_add_special_tokens_adds_the_tokenizers_own_on_top(llm, session):
    ids = reference_ids(session, CHAT, add_special_tokens=True, enable_thinking=False)
    assert ids[:2] == [1, 1] and ids[1:] == reference_ids(session, CHAT, enable_thinking=False)  # <s> added
    text, _, _ = greedy(session, ids, "a2", 8)
    answer = ask(llm, CHAT, "a2", add_special_tokens=True, chat_template_kwargs={"enable_thinking": False})
    assert answer.choices[0].message.content == text and answer.usage.prompt_tokens == len(ids)


def test_defaults_are_accepted_and_answer_as_without_them(llm, server, session):
    ids = reference_ids(session, CHAT)
    text, _, _ = greedy(session, ids, "a1", 8)
    defaults = {"add_generation_prompt": True, "continue_final_message": False, "echo": False,
                "add_special_tokens": False, "documents": None, "chat_template": None, "chat_template_kwargs": {},
                "skip_special_tokens": True, "spaces_between_special_tokens": True,
                "include_stop_str_in_output": False, "truncate_prompt_tokens": None}
    assert ask(llm, CHAT, **defaults).choices[0].message.content == text
    nulls = {k: None for k in ("add_generation_prompt", "continue_final_message", "echo", "add_special_tokens",
                               "chat_template_kwargs")}
    assert ask(llm, CHAT, **nulls).choices[0].message.content == text
    # completions take vLLM's truncate_prompt_tokens at its default too (one rule for both routes)
    status, body = call(server.url + "/v1/completions", "POST", {"model": "a1", "prompt": "the day", "max_tokens": 2,
                                                                 "truncate_prompt_tokens": None})
    assert status == 200, body


def test_what_cannot_be_served_is_refused_naming_the_field(llm, server):
    def refused(extra, model="a1"):
        with pytest.raises(openai.BadRequestError) as caught:
            ask(llm, PREFILL, model, **extra)
        return caught.value.body

    # both true, given or by add_generation_prompt's default: vLLM's 400, saying what to send
    for extra in ({"continue_final_message": True}, {"continue_final_message": True, "add_generation_prompt": True}):
        body = refused(extra)
        assert body["param"] == "continue_final_message" and '"add_generation_prompt": false' in body["message"]
    # a template sent with the request is code: refused, as vLLM refuses it by default
    body = refused({"chat_template": "{{ messages }}"})
    assert body["param"] == "chat_template" and "--trust-request-chat-template" in body["message"]
    # keys that are the render's own arguments, named
    # (self and conversations are arguments of the call and of the render_jinja_template it calls: they were a
    # TypeError answered as "messages: the chat template refused them")
    for key in ("messages", "tokenize", "add_generation_prompt", "continue_final_message", "tools", "documents",
                "chat_template", "conversation", "return_dict", "tokenizer_kwargs", "self", "conversations"):
        body = refused({"chat_template_kwargs": {"enable_thinking": False, key: None}})
        assert body["param"] == "chat_template_kwargs" and f"'{key}'" in body["message"], (key, body)
        assert "enable_thinking" not in body["message"]
    body = refused({"chat_template_kwargs": {f"text{i}": "x" * 30_000 for i in range(3)}})  # each under 32,768
    assert body["param"] == "chat_template_kwargs" and "65,536" in body["message"]
    for extra, field in (({"skip_special_tokens": False}, "skip_special_tokens"),
                         ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
                         ({"documents": [{"title": "a", "text": 3}]}, "documents"),
                         ({"echo": "yes"}, "echo")):
        assert refused(extra)["param"] == field, extra
    # a template variable the template cannot use ({% join %} of a number): the refusal names the variables it was
    # given, not only the messages (it said "messages: the chat template refused them (TypeError)")
    body = refused({"chat_template_kwargs": {"extra_words": 5}})
    assert body["param"] == "messages" and "'extra_words'" in body["message"], body
    # nothing of this is left in the server: a plain request after them is answered
    assert ask(llm, CHAT).choices[0].finish_reason in ("stop", "length")


def left_truncated(session, messages, keep: int, add_special_tokens=False, **kwargs) -> list[int]:
    """transformers' ids of the rendered conversation cut to ``keep`` by the tokenizer itself with
    ``truncation_side`` "left" (vLLM's tokenizer for a generating model: ``truncation=True, max_length=k``)."""
    tokenizer = session.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    tokenizer.truncation_side = "left"
    try:
        return list(tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                              max_length=keep)["input_ids"])
    finally:
        tokenizer.truncation_side = "right"


def test_truncate_prompt_tokens_keeps_the_rendered_conversations_last_tokens(llm, server, session):
    """vLLM's ``truncate_prompt_tokens`` on chat: the conversation rendered by the template, tokenized, then cut to
    its last k tokens (vLLM's left truncation); the answer is the completions route's for those ids (and the
    in-process session's), ``usage.prompt_tokens`` is k, streamed or not. It was a 400 before."""
    ids = reference_ids(session, CHAT)
    kept = left_truncated(session, CHAT, 6, add_generation_prompt=True)
    assert len(ids) > 6 and kept == ids[-6:]
    text, finish, n = greedy(session, kept, "a1", 8)
    answer = ask(llm, CHAT, "a1", truncate_prompt_tokens=6)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == finish
    assert answer.usage.prompt_tokens == 6 and answer.usage.completion_tokens == n
    completion = llm.completions.create(model="a1", prompt=kept, max_tokens=8, temperature=0)
    assert completion.choices[0].text == text  # the completions route fed the last 6 ids
    assert streamed(ask(llm, CHAT, "a1", stream=True, truncate_prompt_tokens=6)) == ("assistant", text, finish)
    # with the tokenizer's special tokens added (vLLM's add_special_tokens): its left truncation keeps <s>, as a
    # completion's text prompt is cut
    kept = left_truncated(session, CHAT, 6, add_special_tokens=True, add_generation_prompt=True)
    assert kept[0] == 1 and kept[1:] == ids[-5:]
    answer = ask(llm, CHAT, "a2", add_special_tokens=True, truncate_prompt_tokens=6)
    assert answer.choices[0].message.content == greedy(session, kept, "a2", 8)[0]
    assert answer.usage.prompt_tokens == 6
    # -1: the model's max_model_len (128): this conversation is shorter, so the answer is the untruncated one
    whole = greedy(session, ids, "a1", 8)[0]
    assert ask(llm, CHAT, "a1", truncate_prompt_tokens=-1).choices[0].message.content == whole


def test_truncate_prompt_tokens_answers_a_conversation_past_the_context(llm, session):
    """A conversation longer than the model's 128 positions is refused (context_length_exceeded) as it was; cut to its
    last 20 tokens it is answered, as vLLM answers it."""
    messages = [{"role": "user", "content": " ".join(["the water is hot and you can see the day"] * 30)}]
    with pytest.raises(openai.BadRequestError) as refused:
        ask(llm, messages, "a0")
    assert refused.value.body["type"] == "context_length_exceeded" and refused.value.body["param"] == "messages"
    kept = left_truncated(session, messages, 20, add_generation_prompt=True)
    assert len(kept) == 20 and kept == reference_ids(session, messages)[-20:]
    text, finish, _ = greedy(session, kept, "a0", 8)
    answer = ask(llm, messages, "a0", truncate_prompt_tokens=20)
    assert answer.choices[0].message.content == text and answer.usage.prompt_tokens == 20
    assert streamed(ask(llm, messages, "a0", stream=True, truncate_prompt_tokens=20)) == ("assistant", text, finish)


def test_truncate_prompt_tokens_with_a_continued_message_and_echo(llm, session):
    """``continue_final_message`` renders the last message open; the cut keeps its last tokens, so the model continues
    it; ``echo`` still puts the message's text before the answer (vLLM's: the message as sent)."""
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    kept = left_truncated(session, PREFILL, 5, **extra)
    assert kept == reference_ids(session, PREFILL, **extra)[-5:]
    text, finish, _ = greedy(session, kept, "a0", 8)
    answer = ask(llm, PREFILL, "a0", truncate_prompt_tokens=5, **extra)
    assert answer.choices[0].message.content == text and answer.usage.prompt_tokens == 5
    answer = ask(llm, PREFILL, "a0", truncate_prompt_tokens=5, echo=True, **extra)
    assert answer.choices[0].message.content == "the water is" + text
    assert streamed(ask(llm, PREFILL, "a0", stream=True, truncate_prompt_tokens=5, echo=True, **extra)) == (
        "assistant", "the water is" + text, finish)


def test_truncate_prompt_tokens_bounds_are_completions_own(llm, session):
    """1 and max_model_len (128) are taken; above max_model_len, 0 or below -1 is a 400 naming the field, in the words
    completions refuse it with."""
    ids = reference_ids(session, CHAT)
    for value, kept in ((1, ids[-1:]), (128, ids)):
        answer = ask(llm, CHAT, "a1", truncate_prompt_tokens=value)
        assert answer.choices[0].message.content == greedy(session, kept, "a1", 8)[0]
        assert answer.usage.prompt_tokens == len(kept)
    for value, says in ((129, "greater than the model's max_model_len of 128"), (10**6, "max_model_len"),
                        (0, "send -1"), (-2, "send -1")):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(llm, CHAT, "a1", truncate_prompt_tokens=value)
        assert refused.value.body["param"] == "truncate_prompt_tokens", refused.value.body
        assert says in refused.value.body["message"] and str(value) in refused.value.body["message"]


def test_a_continuation_the_template_cannot_write_is_refused_in_transformers_words(export):
    """``continue_final_message`` through a template that does not write the final message's text: transformers
    refuses it (``ValueError``), and the renderer says its words (the type's name alone before)."""
    from transformers import AutoTokenizer

    from bca_deploy.serving.chat_template import ChatTemplateRenderer, ChatTemplateRenderError

    tokenizer = AutoTokenizer.from_pretrained(export["dir"])
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['role'] }} </s> {% endfor %}"
    with pytest.raises(ValueError) as reference:
        tokenizer.apply_chat_template(PREFILL, continue_final_message=True, tokenize=False)
    renderer = ChatTemplateRenderer(lambda: tokenizer, source="chat_template.jinja", timeout_s=30, memory_mb=512,
                                    workers=1)
    try:
        with pytest.raises(ChatTemplateRenderError) as caught:
            renderer.render_sync(PREFILL, 10_000, add_generation_prompt=False, continue_final_message=True)
        assert caught.value.why == str(reference.value)[:300]
        # and the same renderer writes what transformers writes where the template can
        tokenizer.chat_template = TEMPLATE  # not the worker's copy (pickled when it started): a fresh renderer
        fresh = ChatTemplateRenderer(lambda: tokenizer, source="chat_template.jinja", timeout_s=30, memory_mb=512,
                                     workers=1)
        try:
            kwargs = {"enable_thinking": False, "documents": [{"title": "a", "text": "b"}]}
            for prompt, final in ((True, False), (False, True), (False, False)):
                assert fresh.render_sync(PREFILL, 10_000, add_generation_prompt=prompt, continue_final_message=final,
                                         template_kwargs=kwargs) == tokenizer.apply_chat_template(
                    PREFILL, add_generation_prompt=prompt, continue_final_message=final, tokenize=False, **kwargs)
        finally:
            fresh.close()
    finally:
        renderer.close()
