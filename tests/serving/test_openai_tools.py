"""Tool calling on ``/v1/chat/completions``, as vLLM users send it: ``tools``, ``tool_choice``, assistant messages with
``tool_calls`` (content null) and ``tool`` messages in the history, and ``--enable-auto-tool-choice
--tool-call-parser hermes`` reading the model's ``<tool_call>`` blocks into ``message.tool_calls``. All of it was a
400 before ("tool calling is not implemented", role "tool" not taken): every server test here fails on that code.

References, independent of the serving code:

- the prompt: transformers' own ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)`` on the
  conversation written as transformers documents it (a call's ``arguments`` a dict), with a Hermes/Qwen2.5-style
  template (tools in the system turn, ``<tool_call>`` in assistant turns, tool results in ``<tool_response>``) and a
  character-level tokenizer (so equal ids are equal text), and the in-process session's greedy tokens for those ids;
- the output: the model's own text, forced with ``logit_bias`` to ``Let me check.<tool_call>{"name": "lookup",
  "arguments": {"city": "paris"}}</tool_call>`` (four tokens of the test tokenizer, one bias each, repeats penalised)
  and read back raw with ``tool_choice: "none"``; the expected calls are written by hand (a second server of the same
  export reads Llama 3.1's JSON calls, ``--tool-call-parser llama3_json``); streamed, the ``openai`` client's own
  accumulator (``chat.completions.stream``) reads the deltas back into the call;
- the parsers: hand-written strings (vLLM's formats: ``hermes``, ``llama3_json``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import ServeProcess, assert_error, call, continuation, openai_client, tiny_llama  # noqa: E402

from bca_deploy.serving.tools import make_parser, parse_tool_calls  # noqa: E402

TEMPLATE = (
    "{%- if tools %}<s>system\nYou may call these tools:\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call></s>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<s>user\n<tool_response>{{ m.tool_call_id }} {{ m.content }}</tool_response></s>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<s>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{%- endfor %}</s>\n"
    "{%- else %}<s>{{ m.role }}\n{{ m.content }}</s>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<s>assistant\n{% endif %}")

#: Multi-character tokens of the test tokenizer (the rest are single characters): what the model is forced to write.
TEXT, START, BODY, END = "Let me check.", "<tool_call>", '{"name": "lookup", "arguments": {"city": "paris"}}', \
    "</tool_call>"
BAD = '{"name": "lookup", "arguments": '  # JSON never closed
LLAMA_BODY = '{"name": "lookup", "parameters": {"city": "paris"}}'  # Llama 3.1's JSON call
PIECES = (TEXT, START, BODY, END, BAD, LLAMA_BODY, "</tool_response>", "<tool_response>")

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a city's weather.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "noop"}}]
#: A conversation with a past call and its result, as an OpenAI client sends it (arguments a JSON string) ...
HISTORY = [{"role": "system", "content": "be short"},
           {"role": "user", "content": "weather in rome?"},
           {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "lookup", "arguments": '{"city": "rome"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
           {"role": "user", "content": "and paris?"}]
#: ... and as transformers documents it for apply_chat_template (arguments a dict; no content: "")
AS_TEMPLATE_READS = [HISTORY[0], HISTORY[1],
                     {"role": "assistant", "content": "",
                      "tool_calls": [{"id": "call_1", "type": "function",
                                      "function": {"name": "lookup", "arguments": {"city": "rome"}}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, HISTORY[4]]


def _vocabulary() -> list[str]:
    words = ["<unk>", "<s>", "</s>", "\n", *(chr(c) for c in range(32, 127)), *PIECES]
    return words + [f"<f{i}>" for i in range(128 - len(words))]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random Llama of 1,024 positions (a conversation with tools is hundreds of characters) exported as an
    adapter bank (adapters a0 and a1), with a character-level tokenizer (the tags and :data:`PIECES` single tokens,
    decoded by concatenation) carrying :data:`TEMPLATE`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bca_deploy import inject, save_adapter
    from bca_deploy.exporters import export as export_bank

    root = tmp_path_factory.mktemp("tools")
    words = _vocabulary()
    assert len(words) == 128
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"</?tool_call>|</?tool_response>|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = TEMPLATE
    tiny_llama(positions=1024).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapters = []
    for seed, name in enumerate(("a0", "a1")):
        model = tiny_llama(positions=1024)
        inject(model, ["q_proj", "v_proj"], block_size=8, init="normal", init_std=0.05, seed=seed)
        save_adapter(model, root / "adapters" / name)
        adapters.append(root / "adapters" / name)
    onnx = export_bank(root / "model", root / "onnx", adapters, merge=False, bank=True,
                       task="text-generation-with-past", verbose=False)
    return {"dir": Path(onnx), "ids": {w: i for i, w in enumerate(words)}}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tools-serve.log"
    with ServeProcess(export["dir"], "--served-model-name", "tiny-llama", "--max-wait-ms", "2",
                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes", log=log) as process:
        yield process


@pytest.fixture(scope="module")
def llm(server):
    return openai_client(server.url)


@pytest.fixture(scope="module")
def llama_json(export, tmp_path_factory):
    """The ``openai`` client on a server of the same export reading Llama 3.1's JSON calls."""
    log = tmp_path_factory.mktemp("logs") / "tools-llama3-json-serve.log"
    with ServeProcess(export["dir"], "--max-wait-ms", "2", "--enable-auto-tool-choice", "--tool-call-parser",
                      "llama3_json", log=log) as process:
        yield openai_client(process.url)


@pytest.fixture(scope="module")
def session(export):
    from bca_deploy.serving import MultiAdapterSession

    return MultiAdapterSession(export["dir"], intra_op_threads=1)


def forcing(export, *pieces: str) -> dict:
    """Sampling fields that make the model write ``pieces`` in order (greedy; each piece's bias half a point below
    the one before, a piece written once penalised by 4: the next unwritten piece is the likeliest token)."""
    ids = export["ids"]
    return {"temperature": 0, "max_tokens": len(pieces), "presence_penalty": 2, "frequency_penalty": 2,
            "logit_bias": {str(ids[p]): 100 - 0.5 * k for k, p in enumerate(pieces)}}


# ---- the prompt -----------------------------------------------------------------------------------------------------


def test_tools_and_tool_messages_reach_the_template_as_transformers_renders_them(server, llm, session):
    tokenizer = session.tokenizer
    expected = list(tokenizer.apply_chat_template(AS_TEMPLATE_READS, tools=TOOLS, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    text = tokenizer.decode(expected)
    assert '"arguments": {"city": "rome"}' in text and '"name": "lookup"' in text and "sunny" in text  # what we test
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(expected)  # equal ids are equal text
    status, body = call(server.url + "/tokenize", "POST", {"model": "tiny-llama", "messages": HISTORY, "tools": TOOLS})
    assert status == 200, body
    assert body["tokens"] == expected
    # the chat route renders the same prompt: its greedy answer is the session's on those ids (tool_choice "none":
    # the tools are rendered, the answer is not read for calls)
    tokens = session.generate([expected], ["a1"], max_new_tokens=6)[0]
    for extra in ({"tool_choice": "none"}, {"tool_choice": "none", "parallel_tool_calls": True}):
        answer = llm.chat.completions.create(model="a1", messages=HISTORY, tools=TOOLS, max_tokens=6, temperature=0,
                                             **extra)
        assert answer.usage.prompt_tokens == len(expected)
        assert answer.choices[0].message.content == continuation(session, expected, tokens)
        assert answer.choices[0].message.tool_calls is None
    # without tools, the same history renders without the tools' system turn (a template that ignores tools: the
    # conversation only)
    plain = list(tokenizer.apply_chat_template(AS_TEMPLATE_READS, add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
    answer = llm.chat.completions.create(model="a1", messages=HISTORY, max_tokens=1, temperature=0)
    assert answer.usage.prompt_tokens == len(plain) < len(expected)


# ---- the output -----------------------------------------------------------------------------------------------------


def test_tokenize_takes_a_chat_bodys_tool_choice_and_counts_the_same_prompt(server, session):
    """A chat body sent to ``/tokenize`` as it is (to count its prompt) carries ``tool_choice``: vLLM's ``/tokenize``
    ignores it, this one answered 400 ("not a field"). Now taken, checked as the chat route checks its form (a named
    function: one of the tools), and the ids are transformers' render with the tools whatever the choice."""
    expected = list(session.tokenizer.apply_chat_template(AS_TEMPLATE_READS, tools=TOOLS, add_generation_prompt=True,
                                                          tokenize=True, return_dict=False))
    body = {"model": "a0", "messages": HISTORY, "tools": TOOLS}
    for choice in ("auto", "none", "required", {"type": "function", "function": {"name": "lookup"}}):
        status, answer = call(server.url + "/tokenize", "POST", {**body, "tool_choice": choice})
        assert status == 200 and answer["tokens"] == expected, (choice, answer)
    for sent, words in (({**body, "tool_choice": "sometimes"}, ("tool_choice", '"none", "auto", "required"')),
                        ({**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         ("tool_choice", "'nope'", "not one of the request's tools")),
                        ({"model": "a0", "messages": HISTORY, "tool_choice": "required"}, ("tool_choice", "no tools"))):
        status, answer = call(server.url + "/tokenize", "POST", sent)
        assert_error(status, answer, 400, words=words)
        assert answer["error"]["param"] == "tool_choice", answer


def test_a_hermes_tool_call_is_returned_in_message_tool_calls(llm, export):
    sampling = forcing(export, TEXT, START, BODY, END)
    raw = llm.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, tool_choice="none", **sampling)
    assert raw.choices[0].message.content == TEXT + START + BODY + END  # the model's own text, forced
    for extra in ({}, {"tool_choice": "auto"}):
        answer = llm.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, **extra, **sampling)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == TEXT
        [made] = choice.message.tool_calls
        assert made.type == "function" and made.function.name == "lookup"
        assert json.loads(made.function.arguments) == {"city": "paris"}
        assert made.id.startswith("chatcmpl-tool-") and len(made.id) > len("chatcmpl-tool-") + 16
        assert answer.usage.completion_tokens == 4
    # only the call: content null
    answer = llm.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, **forcing(export, START, BODY, END))
    assert answer.choices[0].message.content is None and len(answer.choices[0].message.tool_calls) == 1
    # the answer goes back into the conversation as the client got it, with the tool's result
    follow = [*HISTORY, answer.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": answer.choices[0].message.tool_calls[0].id, "content": "rain"}]
    again = llm.chat.completions.create(model="a0", messages=follow, tools=TOOLS, max_tokens=2, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_malformed_or_unfinished_calls_are_returned_as_text(llm, export):
    for pieces in ((START, BAD, END), (START, BODY), (TEXT, START)):
        answer = llm.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, **forcing(export, *pieces))
        choice = answer.choices[0]
        assert choice.message.content == "".join(pieces) and choice.message.tool_calls is None, pieces
        assert choice.finish_reason == "length"


def test_a_streamed_tool_call_arrives_whole_after_the_text(llm, export):
    sampling = forcing(export, TEXT, START, BODY, END)
    chunks = list(llm.chat.completions.create(model="a1", messages=HISTORY, tools=TOOLS, stream=True, n=2,
                                              **sampling))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == TEXT
        calls = [t for c in mine for t in c.delta.tool_calls or []]
        [made] = calls
        assert made.index == 0 and made.type == "function" and made.id.startswith("chatcmpl-tool-")
        assert made.function.name == "lookup" and json.loads(made.function.arguments) == {"city": "paris"}
        # the text came before the call, and nothing of the tags or JSON was sent as text
        order = [("text" if c.delta.content else "call") for c in mine if c.delta.content or c.delta.tool_calls]
        assert order == ["text", "call"]
        assert mine[-1].finish_reason == "tool_calls"
    ids = {t.id for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []}
    assert len(ids) == 2  # one call per choice, each its own id
    # malformed: streamed as text, as the unstreamed answer gives it
    chunks = list(llm.chat.completions.create(model="a1", messages=HISTORY, tools=TOOLS, stream=True,
                                              **forcing(export, START, BAD, END)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == START + BAD + END
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_openai_clients_stream_accumulator_reads_the_streamed_call(llm, export):
    # client.chat.completions.stream() adds the deltas up as it does for OpenAI's and vLLM's answers
    with llm.chat.completions.stream(model="a0", messages=HISTORY, tools=TOOLS,
                                     **forcing(export, TEXT, START, BODY, END)) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == TEXT
    [made] = choice.message.tool_calls
    assert made.function.name == "lookup" and json.loads(made.function.arguments) == {"city": "paris"}


def test_a_llama3_json_call_is_read_whole_streamed_or_not(llama_json, export):
    sampling = forcing(export, LLAMA_BODY)
    raw = llama_json.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, tool_choice="none", **sampling)
    assert raw.choices[0].message.content == LLAMA_BODY
    answer = llama_json.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, **sampling)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [made] = choice.message.tool_calls
    assert made.function.name == "lookup" and json.loads(made.function.arguments) == {"city": "paris"}
    chunks = list(llama_json.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, stream=True,
                                                     **sampling))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [made] = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert made.index == 0 and made.function.name == "lookup"
    assert json.loads(made.function.arguments) == {"city": "paris"} and chunks[-1].choices[0].finish_reason == \
        "tool_calls"
    # text first: an answer, not a call (the hermes tags are text to this parser)
    sampling = forcing(export, TEXT, LLAMA_BODY)
    answer = llama_json.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, **sampling)
    assert answer.choices[0].message.content == TEXT + LLAMA_BODY and answer.choices[0].message.tool_calls is None


def test_parallel_tool_calls_false_keeps_the_first_call(llm, export):
    # (the forcing writes one call: several calls in one answer are the parsers' unit tests below)
    answer = llm.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, parallel_tool_calls=False,
                                         **forcing(export, START, BODY, END))
    assert len(answer.choices[0].message.tool_calls) == 1


# ---- refusals -------------------------------------------------------------------------------------------------------


def _refused(server, body: dict, param: str, *words: str, status: int = 400) -> None:
    started = time.monotonic()
    got, answer = call(server.url + "/v1/chat/completions", "POST",
                       {"model": "a0", "messages": HISTORY, "max_tokens": 2, **body})
    assert_error(got, answer, status, words=words)
    assert answer["error"]["param"] == param, answer
    assert time.monotonic() - started < 30


def test_bad_tools_and_tool_messages_are_400s_naming_the_field_path(server):
    call_ = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    user, assistant = HISTORY[1], HISTORY[2]
    cases = [
        ({"tools": {"type": "function"}}, "tools", ("tools",)),
        ({"tools": [TOOLS[0]] * 2}, "tools", ("tools[1].function.name", "earlier tool")),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(3000)]}, "tools",
         ("3,000 tools", "128")),
        ({"tools": [{"type": "function", "function": {"name": 5}}]}, "tools", ("tools[0].function.name",)),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", ("tools[0].function.name",)),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", ("tools[0].type",)),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools",
         ("tools[0].function.parameters",)),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            f"p{i}": "x" * 30000 for i in range(40)}}}]}, "tools", ("bytes as JSON",)),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice", ("required", "not supported")),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "lookup"}}}, "tool_choice",
         ("'lookup'", "not supported")),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ("tool_choice",)),
        ({"tool_choice": "required"}, "tool_choice", ("no tools",)),
        ({"messages": [user, {"role": "tool", "content": "sunny"}]}, "messages", ("messages.1", "tool_call_id")),
        ({"messages": [user, {**user, "tool_call_id": "c1"}]}, "messages", ("tool_call_id",)),
        ({"messages": [{**user, "tool_calls": [call_]}]}, "messages", ("tool_calls", "assistant")),
        ({"messages": [user, {**assistant, "tool_calls": "x"}]}, "messages", ("messages.1.tool_calls",)),
        ({"messages": [user, {**assistant, "tool_calls": [
            {**call_, "function": {"name": "lookup", "arguments": {"city": "rome"}}}]}]}, "messages",
         ("tool_calls[0].function.arguments", "string")),
        ({"messages": [user, {**assistant, "tool_calls": [
            {**call_, "function": {"name": "lookup", "arguments": "[1, 2]"}}]}]}, "messages",
         ("tool_calls[0].function.arguments", "JSON object")),
        ({"messages": [user, {**assistant, "tool_calls": [{"id": 5, "type": "web", "function": []}]}]}, "messages",
         ("tool_calls[0].id", "tool_calls[0].type", "tool_calls[0].function")),
        ({"messages": [user, {**assistant, "tool_calls": [call_] * 200}]}, "messages", ("200 tool calls",)),
        ({"messages": [user, {**assistant, "tool_calls": [
            {**call_, "function": {"name": "lookup", "arguments": "[" * 5000 + "]" * 5000}}]}]}, "messages",
         ("JSON object",)),
    ]
    for body, param, words in cases:
        _refused(server, body, param, *words)
    # a schema nested past the body's bound is refused as any body is (413), before any work
    deep: dict = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    _refused(server, {"tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]}, "tools",
             "nested deeper", status=413)


def test_a_tool_message_must_answer_a_call_of_the_assistant_message_it_follows(server):
    # each message was checked alone: a tool message naming an id no call has, or following a user message, was
    # rendered as the answer to a call (this template writes its id into the prompt) and answered 200; OpenAI refuses
    # both. Refused naming the message and the calls it could answer, on the chat route and /tokenize alike
    user, assistant = HISTORY[1], HISTORY[2]
    calls = {**assistant, "tool_calls": [{**assistant["tool_calls"][0], "id": i} for i in ("c1", "c2")]}
    tool = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    for messages, words in (([user, calls, {**tool, "tool_call_id": "c3"}], ("message 2", "'c3'", "'c1', 'c2'")),
                            ([user, tool], ("message 1", "'c1'", "answers no tool call")),
                            ([user, calls, tool, user, {**tool, "tool_call_id": "c2"}], ("message 4", "'c2'"))):
        _refused(server, {"messages": messages}, "messages", *words)
        got, answer = call(server.url + "/tokenize", "POST", {"model": "a0", "messages": messages})
        assert_error(got, answer, 400, words=words)
    # the calls answered in any order, each tool message after the calls or after another answer: served
    answered = [user, calls, {**tool, "tool_call_id": "c2"}, tool, HISTORY[4]]
    status, answer = call(server.url + "/v1/chat/completions", "POST",
                          {"model": "a0", "messages": answered, "max_tokens": 1})
    assert status == 200, answer


def test_arguments_are_read_by_the_bodys_json_rules(server):
    # an assistant call's arguments are JSON inside the body's JSON: what the body may not hold (a lone surrogate
    # escape: a 500 from the tokenizer before; NaN, Infinity, a key twice: taken before) is a 400 naming the call
    user, assistant = HISTORY[1], HISTORY[2]
    for arguments, words in (('{"city": "\\ud800"}', ("surrogate",)), ('{"city": NaN}', ("NaN",)),
                             ('{"city": 1e999}', ("out of range",)),
                             ('{"city": "a", "city": "b"}', ("'city'", "more than once"))):
        call_ = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
        messages = [user, {**assistant, "tool_calls": [call_]}, {"role": "tool", "tool_call_id": "c1", "content": "x"},
                    user]
        _refused(server, {"messages": messages}, "messages", "messages.1.tool_calls",
                 "tool_calls[0].function.arguments", *words)
    status, answer = call(server.url + "/v1/chat/completions", "POST",
                          {"model": "a0", "messages": HISTORY, "max_tokens": 1})
    assert status == 200, answer


def test_a_conversation_too_long_for_its_tools_names_them(server):
    # 128 tools of 7,000 characters (within the tools' bound) and a 20-word chat: the template writes 900,000
    # characters, nearly all tools; the refusal said only "messages: the conversation ... is 909,408 characters"
    big = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 7000}} for i in range(128)]
    for route, extra in (("/v1/chat/completions", {"tool_choice": "none", "max_tokens": 1}), ("/tokenize", {})):
        status, answer = call(server.url + route, "POST", {"model": "a0", "messages": HISTORY, "tools": big, **extra})
        assert_error(status, answer, 400, "context_length_exceeded",
                     words=("the conversation, as the chat template writes it, rendered with the template variables "
                            "'tools'", "characters"))
    status, answer = call(server.url + "/tokenize", "POST", {"model": "a0", "messages": HISTORY * 400})
    assert_error(status, answer, 400, "context_length_exceeded", words=("as the chat template writes it, is",))


def test_auto_without_a_parser_names_the_options():
    from bca_deploy.serving.openai import ChatCompletionRequest
    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.wire import InvalidRequestError

    plain = ServeOptions()
    for extra, param in (({}, "tools"), ({"tool_choice": "auto"}, "tool_choice")):
        req = ChatCompletionRequest(model="m", messages=HISTORY, tools=TOOLS, **extra)
        with pytest.raises(InvalidRequestError) as caught:
            req.tool_parser(plain)
        assert caught.value.param == param
        assert "--enable-auto-tool-choice" in str(caught.value) and "--tool-call-parser" in str(caught.value)
    assert ChatCompletionRequest(model="m", messages=HISTORY, tools=TOOLS, tool_choice="none").tool_parser(plain) \
        is None
    on = ServeOptions(enable_auto_tool_choice=True, tool_call_parser="llama3_json")
    assert ChatCompletionRequest(model="m", messages=HISTORY, tools=TOOLS).tool_parser(on) == "llama3_json"
    from bca_deploy.errors import ServingError

    with pytest.raises(ServingError, match="enable_auto_tool_choice: needs tool_call_parser"):
        ServeOptions(enable_auto_tool_choice=True)
    with pytest.raises(ServingError, match="tool_call_parser: 'mistral' is not one of hermes, llama3_json"):
        ServeOptions(tool_call_parser="mistral")


def test_the_server_still_answers_after_hostile_requests(server, llm, export):
    # what a request sent cannot change another's answer: a hostile batch, then a normal call
    _refused(server, {"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools", "tools[0]")
    answer = llm.chat.completions.create(model="a0", messages=HISTORY, tools=TOOLS, **forcing(export, START, BODY, END))
    assert answer.choices[0].message.tool_calls[0].function.name == "lookup"


# ---- the parsers, on hand-written model output ----------------------------------------------------------------------


def _events_in_pieces(name: str, text: str, size: int) -> tuple[str | None, list]:
    parser = make_parser(name)
    events = []
    for at in range(0, len(text), size):
        events += parser.feed(text[at:at + size])
    events += parser.finish()
    content = "".join(v for k, v in events if k == "content")
    calls = [(v.name, json.loads(v.arguments)) for k, v in events if k == "call"]
    return (content if content or not calls else None), calls


HERMES_CASES = [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Sure.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": '
     '{"x": [1, {"y": "</tool_call"}]}}</tool_call>\n', "Sure.", [("f", {}), ("g", {"x": [1, {"y": "</tool_call"}]})]),
    ("no calls at all", "no calls at all", []),
    ("", "", []),
    ('<tool_call>{"name": "f", "arguments": {}</tool_call>', '<tool_call>{"name": "f", "arguments": {}</tool_call>',
     []),  # bad JSON
    ('<tool_call>{"name": "f", "arguments": "{}"}</tool_call>', '<tool_call>{"name": "f", "arguments": "{}"}'
                                                                 '</tool_call>', []),  # arguments not an object
    ('<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f"}</tool_call>', []),  # no arguments
    ('<tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>',
     '<tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>', []),  # nested tag
    ('a <tool_call>{"name": "f", "arguments": {}}', 'a <tool_call>{"name": "f", "arguments": {}}', []),  # unclosed
    ('x <tool_call>{"name": "f", "arguments": {}}</tool_call> then <tool_call>{"name": "g", "arguments": {}}',
     'x then <tool_call>{"name": "g", "arguments": {}}', [("f", {})]),  # the good call kept, the cut one is text
    ('a \ufffd <tool_c', 'a \ufffd <tool_c', []),  # a replacement character; a tag's beginning at the end
]


@pytest.mark.parametrize("text, content, calls", HERMES_CASES)
def test_hermes_parser(text, content, calls):
    for size in (1, 3, 7, len(text) or 1):  # streamed in pieces of any size: the same answer
        assert _events_in_pieces("hermes", text, size) == (content, calls), size
    whole_content, whole_calls = parse_tool_calls("hermes", text)
    assert (whole_content, [(c.name, json.loads(c.arguments)) for c in whole_calls]) == (content, calls)


LLAMA_CASES = [
    ('{"name": "f", "parameters": {"a": {"b": {"c": [1]}}}}', None, [("f", {"a": {"b": {"c": [1]}}})]),
    ('  <|python_tag|>{"name": "f", "arguments": {}} ; {"name": "g", "parameters": {"x": 1}}', None,
     [("f", {}), ("g", {"x": 1})]),
    ('The answer is {"name": "f", "parameters": {}}', 'The answer is {"name": "f", "parameters": {}}', []),
    ('{"name": "f", "parameters": {}} and more', '{"name": "f", "parameters": {}} and more', []),
    ('{"name": "f", "parameters": {}, "arguments": {}}', '{"name": "f", "parameters": {}, "arguments": {}}', []),
    ('{"name": "f", "parameters": {', '{"name": "f", "parameters": {', []),
    ('{"a": 1}', '{"a": 1}', []),
    ("plain text", "plain text", []),
]


@pytest.mark.parametrize("text, content, calls", LLAMA_CASES)
def test_llama3_json_parser(text, content, calls):
    for size in (1, 5, len(text)):
        assert _events_in_pieces("llama3_json", text, size) == (content, calls), size


def test_parsers_take_hostile_output_in_bounded_work():
    # 10 MB of text inside an unclosed tag, nested tags, JSON nested past the decoder's recursion: text, no error,
    # each character searched once however the pieces come
    huge = START + "x" * 10_000_000
    assert _events_in_pieces("hermes", huge, 4096) == (huge, [])
    assert _events_in_pieces("llama3_json", "{" + huge, 4096) == ("{" + huge, [])
    assert _events_in_pieces("llama3_json", " " * 1_000_000 + "x", 4096) == (" " * 1_000_000 + "x", [])
    nested = START * 200_000 + END * 200_000
    assert parse_tool_calls("hermes", nested) == (nested, [])
    deep = START + '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}" + END
    assert parse_tool_calls("hermes", deep)[1] == []
    deep_llama = '{"name": "f", "parameters": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_001
    assert parse_tool_calls("llama3_json", deep_llama) == (deep_llama, [])
    # JSON a request's arguments may not hold (a lone surrogate escape, NaN, Infinity): text, never a call the
    # client could not send back (see test_arguments_are_read_by_the_bodys_json_rules)
    for value in ('"\\ud800"', "NaN", "-Infinity", "1e999"):
        for name, text in (("hermes", START + '{"name": "f", "arguments": {"a": %s}}' % value + END),
                           ("llama3_json", '{"name": "f", "parameters": {"a": %s}}' % value)):
            assert parse_tool_calls(name, text) == (text, []), (name, value)
