"""Causal-lm training on function-calling conversations: ``tool`` messages, assistant messages with ``tool_calls``
and a ``tools`` column, rendered as ``serve`` renders a chat request (the reference: transformers'
``apply_chat_template(messages, tools=tools)`` with the arguments as dicts, as transformers documents it), the loss
on the assistant turns only; bad rows refused by row and field with the server's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import char_chat_tokenizer, chat_reference, config, refused_conversations, write_jsonl

from bca_deploy.training import DataError
from bca_deploy.training.data import IGNORE_INDEX, load_dataset

#: A Hermes-like template (the tools in a system turn, calls in <tool_call> blocks, results in <tool_response>),
#: each turn ``<s>ROLE\nTEXT</s>``.
TEMPLATE = (
    "{%- if tools %}<s>system\nYou may call these tools:{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "</s>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<s>user\n<tool_response>{{ m.tool_call_id }} {{ m.content }}</tool_response></s>"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<s>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{%- endfor %}</s>"
    "{%- else %}<s>{{ m.role }}\n{{ m.content }}</s>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<s>assistant\n{% endif %}")

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a city's weather.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "noop"}}]
#: A function-calling conversation in OpenAI's message form (arguments a JSON string, no content beside calls) ...
CONVERSATION = [{"role": "system", "content": "be short"},
                {"role": "user", "content": "weather in rome?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "call_1", "type": "function",
                                 "function": {"name": "lookup", "arguments": '{"city": "rome"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "assistant", "content": "sunny in rome"}]
#: ... and as transformers documents it for apply_chat_template (arguments a dict; no content: "")
AS_TEMPLATE_READS = [CONVERSATION[0], CONVERSATION[1],
                     {"role": "assistant", "content": "",
                      "tool_calls": [{"id": "call_1", "type": "function",
                                      "function": {"name": "lookup", "arguments": {"city": "rome"}}}]},
                     CONVERSATION[3], CONVERSATION[4]]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    """A directory holding a character-level tokenizer (``<s>``, ``</s>`` and the tags single tokens) carrying
    :data:`TEMPLATE` (what the data path reads: the tokenizer and its template)."""
    return char_chat_tokenizer(tmp_path_factory.mktemp("tools") / "model", TEMPLATE)


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _tiny_llama(directory: Path) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` over :func:`char_chat_tokenizer`'s 103 tokens into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=103, max_position_embeddings=1024, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(directory)
    return directory


def _reference(tokenizer, messages, tools) -> tuple[list[int], list[int]]:
    """By hand: transformers' render with ``tools``, tokenized; the labels are the tokens of each assistant turn's
    text past ``<s>assistant\\n`` through its ``</s>`` (found in the text, mapped by the tokens' offsets)."""
    return chat_reference(tokenizer, messages, tools, IGNORE_INDEX)


def test_tool_conversations_train_as_transformers_renders_them_with_tools(tool_model, tmp_path):
    tokenizer = _tokenizer(tool_model)
    ids, labels = _reference(tokenizer, AS_TEMPLATE_READS, TOOLS)
    plain_ids, plain_labels = _reference(tokenizer, AS_TEMPLATE_READS, None)
    assert ids != plain_ids  # the tools are in the prompt
    rows = [{"messages": CONVERSATION, "tools": TOOLS},
            {"messages": CONVERSATION, "tools": json.dumps(TOOLS)},  # a JSON string, as HF data sets store it
            {"messages": CONVERSATION},  # no tools for this row
            {"messages": CONVERSATION, "tools": []}]
    path = write_jsonl(tmp_path / "calls.jsonl", rows)
    examples, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=tool_model)
    assert examples.format == "messages" and examples.columns == "messages+tools"
    assert data.input_ids == [ids, ids, plain_ids, plain_ids]
    assert data.labels == [labels, labels, plain_labels, plain_labels]
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == ('<tool_call>{"name": "lookup", "arguments": {"city": "rome"}}</tool_call></s>'
                       'sunny in rome</s>')


#: The same conversation in the shape transformers' tool-use guide writes (as many tool-calling data sets do):
#: the arguments an object, no call ids, the tool message naming the function instead of a call id.
TRANSFORMERS_SHAPE = [CONVERSATION[0], CONVERSATION[1],
                      {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                          "name": "lookup", "arguments": {"city": "rome"}}}]},
                      {"role": "tool", "name": "lookup", "content": "sunny"},
                      CONVERSATION[4]]


def test_tool_conversations_in_transformers_shape_train_as_transformers_renders_them(tool_model, tmp_path):
    """Data sets written for transformers' chat templates hold calls without ids and their arguments as
    objects: they were refused ('id: must be a string', 'arguments: must be a string of JSON'), so such a data set
    could not be trained on. Rendered as transformers renders those messages (the reference: apply_chat_template of
    the row as it stands); a tool message still has to follow the calls it answers."""
    tokenizer = _tokenizer(tool_model)
    ids, labels = _reference(tokenizer, TRANSFORMERS_SHAPE, TOOLS)
    assert tokenizer.decode(ids).count("<tool_response>") == 1 and '"arguments": {"city": "rome"}' in tokenizer.decode(ids)
    path = write_jsonl(tmp_path / "trl.jsonl", [{"messages": TRANSFORMERS_SHAPE, "tools": TOOLS}])
    examples, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=tool_model)
    assert data.input_ids == [ids] and data.labels == [labels]
    assert examples.tool_call_turns == 1 and examples.tool_call_parsers == ("hermes",)
    bad = [{"messages": TRANSFORMERS_SHAPE, "tools": TOOLS},
           {"messages": [CONVERSATION[1], TRANSFORMERS_SHAPE[3], CONVERSATION[4]]},
           {"messages": [CONVERSATION[1], {**TRANSFORMERS_SHAPE[2], "tool_calls": [
               {"type": "function", "function": {"name": "lookup", "arguments": {"city": float("nan")}}}]}]}]
    refused_conversations(write_jsonl(tmp_path / "bad.jsonl", bad), tokenizer, tool_model, (
        "line 2: messages[1].role: this tool message answers no tool call",
        "line 3: messages[1].tool_calls[0].function.arguments: must be a JSON object: "))


def test_tool_conversations_read_from_parquet(tool_model, tmp_path):
    """Parquet: messages a list of structs (a message's absent fields null), tools a JSON string column."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tokenizer = _tokenizer(tool_model)
    path = tmp_path / "calls.parquet"
    pq.write_table(pa.table({"messages": [CONVERSATION, CONVERSATION], "tools": [json.dumps(TOOLS), None]}), path)
    _, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=tool_model)
    assert (data.input_ids[0], data.labels[0]) == _reference(tokenizer, AS_TEMPLATE_READS, TOOLS)
    assert (data.input_ids[1], data.labels[1]) == _reference(tokenizer, AS_TEMPLATE_READS, None)


def test_tool_calls_in_transformers_shape_read_from_parquet(tool_model, tmp_path):
    """Parquet in transformers' shape: a call's arguments a struct (read as the object it is, rendered as
    apply_chat_template renders the row), in one file with the OpenAI-shaped rows of a JSON file beside it. A struct
    field JSON has no form for (a date) was refused as 'must be a JSON object, got an object {...}': it names the
    field and what it holds; a tool call id named beside calls without one is said to be that."""
    import datetime

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tokenizer = _tokenizer(tool_model)
    path = tmp_path / "calls.parquet"
    pq.write_table(pa.table({"messages": [TRANSFORMERS_SHAPE], "tools": [json.dumps(TOOLS)]}), path)
    _, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=tool_model)
    assert (data.input_ids[0], data.labels[0]) == _reference(tokenizer, TRANSFORMERS_SHAPE, TOOLS)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": TRANSFORMERS_SHAPE, "tools": TOOLS},
                                                   {"messages": CONVERSATION, "tools": TOOLS}])
    _, data = load_dataset(mixed, "causal-lm", tokenizer, 1024, model=tool_model)
    assert data.input_ids == [_reference(tokenizer, TRANSFORMERS_SHAPE, TOOLS)[0],
                              _reference(tokenizer, AS_TEMPLATE_READS, TOOLS)[0]]
    dated = [CONVERSATION[1], {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "lookup", "arguments": {"city": "rome", "on": datetime.date(2024, 1, 2)}}}]}, CONVERSATION[4]]
    pq.write_table(pa.table({"messages": [dated]}), tmp_path / "dated.parquet")
    refused_conversations(tmp_path / "dated.parquet", tokenizer, tool_model, (
        "row 1: messages[1].tool_calls[0].function.arguments: must be a JSON object, but arguments.on (a date "
        "value) has no JSON form",))
    # a tool message naming a call id beside calls that have none was refused as '... (its calls: null)'
    named = [*TRANSFORMERS_SHAPE[:3], {**TRANSFORMERS_SHAPE[3], "tool_call_id": "call_1"}, TRANSFORMERS_SHAPE[4]]
    refused_conversations(write_jsonl(tmp_path / "named.jsonl", [{"messages": TRANSFORMERS_SHAPE},
                                                                 {"messages": named}]), tokenizer, tool_model, (
        "line 2: messages[3].tool_call_id: 'call_1' names no call: the calls of the assistant message it answers "
        "have no id (give each call the id its tool message names, or leave tool_call_id out)",))


def test_bad_tool_rows_are_refused_by_row_and_field(tool_model, tmp_path):
    user = {"role": "user", "content": "weather in rome?"}
    answer = {"role": "assistant", "content": "sunny"}

    def call(arguments) -> dict:
        function = {"name": "lookup", "arguments": arguments}
        return {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": function}]}

    rows = [{"messages": CONVERSATION, "tools": TOOLS},
            {"messages": [user, {"role": "tool", "content": "sunny"}, answer]},
            {"messages": [{**user, "tool_calls": CONVERSATION[2]["tool_calls"]}, answer]},
            {"messages": [user, call("{not json"), answer]},
            {"messages": [user, call(["rome"]), answer]},
            {"messages": [user, answer], "tools": {"name": "lookup"}},
            {"messages": [user, answer], "tools": "[{not json"},
            {"messages": [user, answer], "tools": [{"type": "function", "function": {"name": "no spaces"}}]},
            {"messages": [user, answer], "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                                   for i in range(129)]},
            {"messages": [user, {"role": "assistant"}]},
            {"messages": [user, answer], "tools": '[{"type": "function", "type": "function"}]'}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    refused_conversations(path, _tokenizer(tool_model), tool_model, (
            "line 2: messages[1].role: this tool message answers no tool call: a tool message follows the assistant "
            "message whose tool_calls it answers",
            "line 3: messages[0].tool_calls: only an assistant message carries tool calls, not a user message",
            "line 4: messages[1].tool_calls[0].function.arguments: must be a JSON object written as a string",
            "line 5: messages[1].tool_calls[0].function.arguments: must be a JSON object, or a string of one "
            "(OpenAI's shape), got a list ['rome']",
            "line 6: tools: must be a list of tools",
            "line 7: tools: not valid JSON (Expecting property name enclosed in double quotes",
            "line 8: tools[0].function.name: 'no spaces' is not a function name",
            "line 9: tools: 129 tools; at most 128 are taken",
            "line 10: messages[1].content must be a string or a list of text parts, got none (an assistant message "
            "may have tool_calls instead)",
            "line 11: tools: key 'type' appears twice in one object (which one is meant?); expected a list of tools"))


def test_a_tool_message_answering_no_call_is_refused_as_serve_refuses_it(tool_model, tmp_path):
    """A tool message naming an id no call of the assistant message before it has, or following a user message, was
    trained on as the answer to a call (this template writes the id into the prompt); serve refuses such a
    conversation (tools.unanswered_tool_message, OpenAI's rule), so training does, by row and message."""
    user, answer = {"role": "user", "content": "weather in rome?"}, {"role": "assistant", "content": "sunny"}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    rows = [{"messages": CONVERSATION, "tools": TOOLS},
            {"messages": [user, CONVERSATION[2], {**tool, "tool_call_id": "call_2"}, answer]},
            {"messages": [user, tool, answer]},
            {"messages": [user, CONVERSATION[2], user, tool, answer]}]
    refused_conversations(write_jsonl(tmp_path / "unanswered.jsonl", rows), _tokenizer(tool_model), tool_model, (
        "line 2: messages[2].tool_call_id: 'call_2' is not the id of a call of the assistant message it answers "
        "(its calls: 'call_1')",
        "line 3: messages[1].tool_call_id: 'call_1' answers no tool call",
        "line 4: messages[3].tool_call_id: 'call_1' answers no tool call"))


def test_tool_conversations_train_without_the_serving_packages(tool_model, tmp_path):
    """A call's arguments are read by the server's JSON rules (``serving.wire.read_json``), whose module also held a
    pydantic type: in an install without the serve extra (no pydantic) reading such a row was a ModuleNotFoundError.
    Here pydantic cannot be imported; the rows read as with it."""
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "calls.jsonl", [{"messages": CONVERSATION, "tools": TOOLS}])
    code = ("import sys; sys.modules['pydantic'] = None\n"
            "from transformers import AutoTokenizer\n"
            "from bca_deploy.training.data import load_dataset\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(tool_model)!r})\n"
            f"_, data = load_dataset({str(path)!r}, 'causal-lm', tokenizer, 1024, model={str(tool_model)!r})\n"
            "print(data.input_ids[0])\n"
            "assert 'pydantic' not in sys.modules or sys.modules['pydantic'] is None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, _ = _reference(_tokenizer(tool_model), AS_TEMPLATE_READS, TOOLS)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ids


def test_lone_surrogates_in_tools_and_call_ids_are_refused_by_row_and_field(tool_model, tmp_path):
    """A request body cannot hold a lone surrogate escape (``"\\ud800"``: wire.read_json refuses it), a training file's
    JSON line can: in ``tools`` (a list or a JSON string) it was a UnicodeEncodeError out of the tools' size check,
    in a call's ``id`` or a tool message's ``tool_call_id`` the tokenizer's TypeError on the rendered prompt. Each is
    now a row's problem naming its field, as a lone surrogate in a message's content already was."""
    user = '{"role": "user", "content": "hi"}'
    answer = '{"role": "assistant", "content": "ok"}'

    def calls(call_id: str) -> str:
        return ('{"role": "assistant", "content": null, "tool_calls": [{"id": "' + call_id + '", "type": "function", '
                '"function": {"name": "f", "arguments": "{}"}}]}')

    lines = [
        '{"messages": [' + user + ', ' + answer + '], "tools": [{"type": "function", "function": {"name": "f", '
        '"description": "a \\ud800 b"}}]}',
        '{"messages": [' + user + ', ' + answer + '], "tools": "[{\\"type\\": \\"function\\", \\"function\\": '
        '{\\"name\\": \\"f\\", \\"parameters\\": {\\"\\\\udc00\\": {}}}}]"}',
        '{"messages": [' + user + ', ' + calls("\\ud800") + ', ' + answer + ']}',
        '{"messages": [' + user + ', ' + calls("c1") + ', {"role": "tool", "tool_call_id": "\\udfff", "content": "x"}, '
        + answer + ']}',
        '{"messages": [' + user + ', ' + answer + ']}']
    path = tmp_path / "surrogates.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert json.loads(lines[1])["tools"].count("\\udc00") == 1  # the escape is inside the tools' JSON string
    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", _tokenizer(tool_model), 1024, model=tool_model)
    message = str(caught.value)
    for expected in ("line 1: tools: holds a lone surrogate '\\ud800'",
                     "line 2: tools: holds a lone surrogate '\\udc00'",
                     "line 3: messages[1].tool_calls[0].id: holds a lone surrogate '\\ud800'",
                     "line 4: column 'messages[2].tool_call_id' holds a lone surrogate '\\udfff'"):
        assert expected in message, message
    assert "line 5" not in message, message


def test_one_tools_string_on_every_row_is_read_once(tool_model, tmp_path, monkeypatch):
    """A data set gives every row the same tools as one JSON string: 20,000 rows of a 15 kB string were parsed and
    checked 20,000 times (14 s) and each row held its own parsed copy (+1 GB). Each distinct string is read once;
    the rows render as transformers renders them with those tools."""
    from bca_deploy.training import data

    reads = []
    real = data._tools_value
    monkeypatch.setattr(data, "_tools_value", lambda value, *column: reads.append(value) or real(value, *column))
    other = TOOLS[:1]
    rows = [{"messages": CONVERSATION, "tools": json.dumps(TOOLS)} for _ in range(300)]
    rows += [{"messages": CONVERSATION, "tools": json.dumps(other)}, {"messages": CONVERSATION, "tools": TOOLS}]
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    tokenizer = _tokenizer(tool_model)
    examples = data.load_causal_lm(path)
    assert len(reads) == 3, len(reads)  # two distinct strings and the list
    assert examples.tools[:300] == [TOOLS] * 300 and examples.tools[300:] == [other, TOOLS]
    _, encoded = load_dataset(path, "causal-lm", tokenizer, 1024, model=tool_model)
    assert encoded.input_ids[0] == encoded.input_ids[299] == _reference(tokenizer, AS_TEMPLATE_READS, TOOLS)[0]
    assert encoded.input_ids[300] == _reference(tokenizer, AS_TEMPLATE_READS, other)[0]


def test_parquet_tools_of_structs_render_as_written(tool_model, tmp_path):
    """A Parquet ``tools`` column of structs (not a JSON string): Arrow gives every tool every field any tool in the
    column has, null where it had none, so ``noop`` was rendered with ``"description": null, "parameters": null``
    and ``lookup``'s schema with ``when``'s ``date`` property as null: a prompt ``serve`` never renders for those
    tools. A null struct field is read as absent; each row renders as transformers renders its tools as written."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    when = {"type": "function", "function": {"name": "when", "parameters": {
        "type": "object", "properties": {"date": {"type": "string"}}}}}
    tokenizer = _tokenizer(tool_model)
    path = tmp_path / "struct-tools.parquet"
    pq.write_table(pa.table({"messages": [CONVERSATION] * 3, "tools": [TOOLS, [when], None]}), path)
    assert pq.read_table(path).to_pylist()[0]["tools"][1]["function"]["description"] is None  # what Arrow gives
    _, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=tool_model)
    for row, tools in enumerate((TOOLS, [when], None)):
        assert (data.input_ids[row], data.labels[row]) == _reference(tokenizer, AS_TEMPLATE_READS, tools), row


def test_a_message_name_is_rendered_as_serve_renders_it(tool_model, tmp_path):
    """``serve`` hands a message's ``name`` to the template (as vLLM does); training dropped it without a word, so a
    template that writes names (``<s>user bob``) trained on a prompt it was never served. Kept now; a name that is
    not a string is refused by line and field."""
    import shutil

    directory = tmp_path / "named"
    shutil.copytree(tool_model, directory)
    template = TEMPLATE.replace("<s>{{ m.role }}\n", "<s>{{ m.role }}{{ (' ' + m.name) if m.name else '' }}\n")
    (directory / "chat_template.jinja").write_text(template)
    tokenizer = _tokenizer(directory)
    assert tokenizer.chat_template == template
    named = [{**CONVERSATION[0], "name": "ops"}, {**CONVERSATION[1], "name": "bob"}, *CONVERSATION[2:]]
    path = write_jsonl(tmp_path / "named.jsonl", [{"messages": named, "tools": TOOLS}])
    _, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=directory)
    expected = [{**AS_TEMPLATE_READS[0], "name": "ops"}, {**AS_TEMPLATE_READS[1], "name": "bob"}, *AS_TEMPLATE_READS[2:]]
    assert (data.input_ids[0], data.labels[0]) == _reference(tokenizer, expected, TOOLS)
    assert "<s>user bob\n" in tokenizer.decode(data.input_ids[0])
    bad = write_jsonl(tmp_path / "bad-name.jsonl", [{"messages": named}, {"messages": [{**named[1], "name": 7},
                                                                                         CONVERSATION[4]]}])
    with pytest.raises(DataError, match=r"line 2: messages\[0\]\.name must be a string, got a number"):
        load_dataset(bad, "causal-lm", tokenizer, 1024, model=directory)


def test_a_tools_column_of_another_name_is_read_with_tools_column(tool_model, tmp_path):
    """A data set naming its functions column otherwise (``functions``, beside ``chat``) had its tools dropped without
    a word (only a column named ``tools`` was read): ``--tools-column`` (``tools_column=``) names it, as
    ``--messages-column`` names the conversations; train records it and evaluate reads it (its option too)."""
    from bca_deploy.training.cli import evaluate_command, train_command

    tokenizer = _tokenizer(tool_model)
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"chat": CONVERSATION, "functions": json.dumps(TOOLS)}])
    examples, data = load_dataset(path, "causal-lm", tokenizer, 1024, messages_column="chat",
                                  tools_column="functions", model=tool_model)
    assert examples.columns == "chat+functions"
    assert (data.input_ids[0], data.labels[0]) == _reference(tokenizer, AS_TEMPLATE_READS, TOOLS)
    _, plain = load_dataset(path, "causal-lm", tokenizer, 1024, messages_column="chat", model=tool_model)
    assert plain.input_ids[0] == _reference(tokenizer, AS_TEMPLATE_READS, None)[0]  # not named: not read
    nan = '[{"type": "function", "function": {"name": "f", "parameters": {"default": NaN}}}]'
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chat": CONVERSATION, "functions": "[{not json"},
                                               {"chat": CONVERSATION, "functions": nan}])
    with pytest.raises(DataError) as caught:
        load_dataset(bad, "causal-lm", tokenizer, 1024, messages_column="chat", tools_column="functions",
                     model=tool_model)
    for expected in ("line 1: functions: not valid JSON",  # a file's JSON rule: no NaN, as in a request body
                     "line 2: functions: NaN is not valid JSON (write a finite number); expected a list of tools"):
        assert expected in str(caught.value), str(caught.value)
    for command in (train_command, evaluate_command):
        assert "--tools-column" in [o for p in command.params for o in p.opts], command.name


def test_a_tools_column_the_file_does_not_have_is_refused(tool_model, tmp_path):
    """``--tools-column`` naming a column the file does not have (a misspelling: ``functionz`` beside ``functions``)
    was accepted without a word: the conversations trained on their calls with no functions in the prompts (serve
    renders a request's tools) and train printed the serve command for those calls. Refused now, naming the file's
    columns, before a run writes anything (evaluate's too, saying the name is the one the run recorded); the default
    name, absent, still reads conversations without tools."""
    import shutil

    from bca_deploy.training import EvaluateConfig, evaluate, train

    tokenizer = _tokenizer(tool_model)
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"chat": CONVERSATION, "functions": json.dumps(TOOLS)}])
    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", tokenizer, 1024, messages_column="chat", tools_column="functionz",
                     model=tool_model)
    assert str(caught.value) == (
        f"{path}: --tools-column 'functionz' is not a column of the file, so its conversations would be read without "
        f"their functions; name the column holding each row's functions (columns found in {path}: 'chat', "
        "'functions')")
    _, plain = load_dataset(path, "causal-lm", tokenizer, 1024, messages_column="chat", model=tool_model)
    assert plain.input_ids[0] == _reference(tokenizer, AS_TEMPLATE_READS, None)[0]  # "tools", absent: no tools
    model, out = _tiny_llama(shutil.copytree(tool_model, tmp_path / "model")), tmp_path / "run"
    options = dict(task="causal-lm", max_steps=1, max_length=1024, block_size=4, messages_column="chat")
    with pytest.raises(DataError, match="--tools-column 'functionz' is not a column of the file"):
        train(config(model, path, out, tools_column="functionz", **options))
    assert not out.exists() or not any(out.iterdir())
    # evaluate reads the column the run was trained with: a file without it is refused, saying whose name it is
    trained = train(config(model, path, out, tools_column="functions", **options)).last_dir
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"chat": CONVERSATION}])
    with pytest.raises(DataError) as caught:
        evaluate(EvaluateConfig(model=model, adapter=trained, data=plain))
    assert str(caught.value).endswith(
        f"(columns found in {plain}: 'chat'); the columns are those {trained} was trained on (--tools-column "
        "functions, recorded in its bca_training.json); pass --tools-column to name this file's (--tools-column "
        "tools: conversations without functions)"), str(caught.value)
    metrics = evaluate(EvaluateConfig(model=model, adapter=trained, data=plain, tools_column="tools"))
    _, labels = _reference(tokenizer, AS_TEMPLATE_READS, None)  # the default name, absent: evaluated, every target
    assert metrics["tokens"] == sum(t != IGNORE_INDEX for t in labels), metrics


#: The same turns, with the calls written as Llama 3.1's template writes them: the call's JSON object alone, its
#: arguments under "parameters".
LLAMA3_TEMPLATE = TEMPLATE.replace(
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>',
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}')
#: ... and in a form neither parser reads (a Python-like call).
PYTHONIC_TEMPLATE = TEMPLATE.replace(
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>',
    '[{{ c.function.name }}(city={{ c.function.arguments.city }})]')


@pytest.mark.parametrize("template, parsers", [(TEMPLATE, ("hermes",)), (LLAMA3_TEMPLATE, ("llama3_json",)),
                                               (PYTHONIC_TEMPLATE, ())], ids=["hermes", "llama3", "pythonic"])
def test_the_parser_that_reads_the_trained_calls_back_is_found(template, parsers, tmp_path):
    """Which ``--tool-call-parser`` reads the calls the model is trained to write: each assistant turn with calls is
    decoded as the server decodes an answer and read by each parser (the reference: the server's own parse of that
    text, and the calls the conversation holds)."""
    from bca_deploy.serving.tools import parse_tool_calls

    model = char_chat_tokenizer(tmp_path / "model", template)
    tokenizer = _tokenizer(model)
    assert len({TEMPLATE, LLAMA3_TEMPLATE, PYTHONIC_TEMPLATE}) == 3
    two_calls = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "rome"}'}},
        {"id": "b", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "oslo"}'}}]}
    rows = [{"messages": CONVERSATION, "tools": TOOLS}, {"messages": [CONVERSATION[1], two_calls]}]
    if template is LLAMA3_TEMPLATE:  # Llama's form holds one call a turn (its parser reads ";"-separated ones)
        rows = rows[:1]
    examples, data = load_dataset(write_jsonl(tmp_path / "calls.jsonl", rows), "causal-lm", tokenizer, 1024,
                                  model=model)
    assert examples.tool_call_turns == len(rows) and examples.tool_call_parsers == parsers
    # the text trained on, read by the server's parser, gives the conversation's call
    trained = tokenizer.decode([t for t in data.labels[0] if t != IGNORE_INDEX], skip_special_tokens=True)
    call_turn = trained[:trained.index("sunny")]
    for name in ("hermes", "llama3_json"):
        calls = parse_tool_calls(name, call_turn)[1]
        read = [(c.name, json.loads(c.arguments)) for c in calls] == [("lookup", {"city": "rome"})]
        assert read == (name in parsers), (name, call_turn)
    plain, _ = load_dataset(write_jsonl(tmp_path / "plain.jsonl", [{"messages": CONVERSATION[:2] + [
        {"role": "assistant", "content": "no idea"}]}]), "causal-lm", tokenizer, 1024, model=model)
    assert (plain.tool_call_turns, plain.tool_call_parsers) == (0, ())


def test_a_run_trained_on_tool_calls_prints_the_serve_command_that_reads_them(tool_model, tmp_path):
    """train's "next:" commands end with ``serve`` started with ``--enable-auto-tool-choice`` and the parser that
    reads the trained calls back (without them the chat route answers the calls as text); a run without calls, or
    with calls no parser reads, says so instead of naming a parser."""
    import shutil

    from bca_deploy.training import train
    from bca_deploy.training.report import final_summary

    def run(template: str, rows: list, name: str) -> str:
        model = _tiny_llama(char_chat_tokenizer(tmp_path / name / "model", template))
        data = write_jsonl(tmp_path / name / "data.jsonl", rows)
        result = train(config(model, data, tmp_path / name / "run", task="causal-lm", max_steps=1, max_length=1024,
                              block_size=4))
        shutil.rmtree(model / "unused", ignore_errors=True)
        return final_summary(result, model)

    serve = [line for line in run(TEMPLATE, [{"messages": CONVERSATION, "tools": TOOLS}] * 4, "hermes").splitlines()
             if "bca-deploy serve" in line]
    assert len(serve) == 1 and serve[0].endswith("-bank --enable-auto-tool-choice --tool-call-parser hermes"), serve
    llama = run(LLAMA3_TEMPLATE, [{"messages": CONVERSATION, "tools": TOOLS}] * 4, "llama3")
    assert "-bank --enable-auto-tool-choice --tool-call-parser llama3_json\n" in llama + "\n", llama
    plain = run(TEMPLATE, [{"messages": CONVERSATION[:2] + [{"role": "assistant", "content": "sunny"}]}] * 4, "plain")
    assert "-bank\n" in plain + "\n" and "tool-call-parser" not in plain and "auto-tool-choice" not in plain, plain
    pythonic = run(PYTHONIC_TEMPLATE, [{"messages": CONVERSATION, "tools": TOOLS}] * 4, "pythonic")
    assert "-bank\n" in pythonic and "no --tool-call-parser (hermes, llama3_json) reads back" in pythonic, pythonic


def test_tool_calls_without_any_functions_read_are_said(tool_model, tmp_path):
    """Conversations with tool calls whose functions sit in a column of another name (``functions``, read only when
    ``--tools-column`` names it) trained on the calls with no function listed in any prompt, without a word: a note
    says so and names the file's columns. No note when the functions are read, or when no conversation calls one."""
    tokenizer = _tokenizer(tool_model)
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"messages": CONVERSATION, "functions": json.dumps(TOOLS)}] * 3)
    notes: list[str] = []
    load_dataset(path, "causal-lm", tokenizer, 1024, model=tool_model, warn=notes.append)
    assert len(notes) == 1, notes
    assert notes[0].startswith(f"{path}: 3 conversations have tool calls and no row lists its functions (no 'tools' "
                               "column, or it is empty)"), notes
    assert "name the column holding them with --tools-column" in notes[0] and "'functions'" in notes[0], notes
    for quiet, options in ((path, {"tools_column": "functions"}),
                           (write_jsonl(tmp_path / "plain.jsonl", [{"messages": CONVERSATION[:2] + [
                               {"role": "assistant", "content": "sunny"}]}]), {})):
        notes.clear()
        load_dataset(quiet, "causal-lm", tokenizer, 1024, model=tool_model, warn=notes.append, **options)
        assert notes == [], notes


def test_tool_call_tags_saved_as_special_tokens_are_named(tool_model, tmp_path):
    """A tokenizer saving '<tool_call>' as a special token: the calls are trained on as the template writes them,
    but the server decodes an answer without special tokens, so no parser reads them back. train said only that
    no --tool-call-parser reads them (in its closing lines, after the run); the start-up now names the tags and the
    fix, while the run can still be changed. Reference: transformers' own decode drops the tags."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tool_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    special = tmp_path / "special"
    tokenizer.save_pretrained(special)
    tokenizer = AutoTokenizer.from_pretrained(special)
    assert len(tokenizer) == len(_tokenizer(tool_model))  # the same ids: only marked special
    ids = tokenizer('<tool_call>{"a": 1}</tool_call>', add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == '{"a": 1}'
    # two calls a turn: with the tags dropped, '{...}{...}' is no form a parser reads (one call alone reads as
    # llama3_json's JSON object with "arguments", and train's serve line then names that parser)
    two_calls = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "rome"}'}},
        {"id": "b", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "oslo"}'}}]}
    path = write_jsonl(tmp_path / "calls.jsonl", [{"messages": [CONVERSATION[1], two_calls], "tools": TOOLS}])
    notes: list[str] = []
    examples, _ = load_dataset(path, "causal-lm", tokenizer, 1024, model=special, warn=notes.append)
    assert examples.tool_call_turns == 1 and examples.tool_call_parsers == ()
    assert [n for n in notes if "special tokens '<tool_call>', '</tool_call>' kept" in n] == notes and len(notes) == 1
    assert notes[0].startswith(f"{path}: ") and "no --tool-call-parser finds them" in notes[0], notes
    notes.clear()
    load_dataset(path, "causal-lm", _tokenizer(tool_model), 1024, model=tool_model, warn=notes.append)
    assert notes == []
