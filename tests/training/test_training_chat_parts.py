"""Causal-lm training reads every chat message the chat route reads: a content given as OpenAI text parts
(``[{"type": "text", "text": ...}]``, joined with a line break as vLLM joins them) and the ``developer`` role.

Before, the server took both and training refused them (``content must be a string``, ``role must be one of
'system', 'user', 'assistant', 'tool'``): chat logs exported as served could not be trained on, or were rewritten
into a prompt that is not the one served. References: transformers' ``apply_chat_template`` on the messages as
vLLM passes them (parts joined with "\\n", the role as given), the labels found in the rendered text by offsets; and
the server's own ``/tokenize`` on the same messages (a real app over a tiny Llama export carrying the same
tokenizer), which gives the prompt tokens training puts before each assistant turn."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from training_helpers import char_chat_tokenizer, chat_reference, refused_conversations, write_jsonl

from bca_deploy.training import DataError
from bca_deploy.training.data import IGNORE_INDEX, load_dataset

#: Each turn ``<s>ROLE\nTEXT</s>`` (a developer turn is written with its role, as the template is handed it).
TEMPLATE = ("{%- for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>{%- endfor %}"
            "{%- if add_generation_prompt %}<s>assistant\n{% endif %}")


def parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": t} for t in texts]


#: An exported OpenAI chat log: text parts in system, user and assistant messages, a developer message.
CONVERSATION = [{"role": "system", "content": parts("be short", "be kind")},
                {"role": "developer", "content": "answer in english"},
                {"role": "user", "content": parts("weather", "", "in rome?")},
                {"role": "assistant", "content": parts("sunny", "and warm")},
                {"role": "user", "content": "and paris?"},
                {"role": "assistant", "content": "rain"}]
#: ... as vLLM hands it to the template
AS_TEMPLATE_READS = [{"role": "system", "content": "be short\nbe kind"},
                     {"role": "developer", "content": "answer in english"},
                     {"role": "user", "content": "weather\n\nin rome?"},
                     {"role": "assistant", "content": "sunny\nand warm"},
                     {"role": "user", "content": "and paris?"},
                     {"role": "assistant", "content": "rain"}]
#: Every content as text parts (a Parquet column holds one type: all strings, or all lists of parts).
ALL_PARTS = [{**m, "content": m["content"] if isinstance(m["content"], list) else parts(m["content"])}
             for m in CONVERSATION]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return char_chat_tokenizer(tmp_path_factory.mktemp("parts") / "model", TEMPLATE)


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def test_text_parts_and_developer_messages_train_as_vllm_passes_them(chat_model, tmp_path):
    tokenizer = _tokenizer(chat_model)
    ids, labels = chat_reference(tokenizer, AS_TEMPLATE_READS, None, IGNORE_INDEX)
    assert "<s>developer\nanswer in english</s>" in tokenizer.decode(ids)
    path = write_jsonl(tmp_path / "parts.jsonl", [{"messages": CONVERSATION}, {"messages": AS_TEMPLATE_READS},
                                                  {"messages": ALL_PARTS}])
    examples, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=chat_model)
    assert examples.format == "messages"
    # parts train exactly as the joined string would: the loss on the assistant turns only
    assert data.input_ids == [ids] * 3 and data.labels == [labels] * 3
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "sunny\nand warm</s>rain</s>"


def test_text_parts_read_from_parquet(chat_model, tmp_path):
    """Parquet: messages a list of structs whose content is a list of part structs. A column where some part is an
    image gives every text part ``"image_url": null`` (Arrow's struct of every field): read as absent, so only the
    image part is refused, not every text part of the file."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tokenizer = _tokenizer(chat_model)
    path = tmp_path / "parts.parquet"
    pq.write_table(pa.table({"messages": [ALL_PARTS, ALL_PARTS]}), path)
    _, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=chat_model)
    assert [data.input_ids[0], data.labels[0]] == list(chat_reference(tokenizer, AS_TEMPLATE_READS, None,
                                                                      IGNORE_INDEX))
    assert data.input_ids[1] == data.input_ids[0] and data.labels[1] == data.labels[0]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with_image = [ALL_PARTS[0], {"role": "user", "content": [*parts("what is this"), image]}, ALL_PARTS[3]]
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"messages": [ALL_PARTS, with_image]}), mixed)
    assert pq.read_table(mixed).to_pylist()[0]["messages"][0]["content"][0]["image_url"] is None  # what Arrow gives
    with pytest.raises(DataError) as caught:
        load_dataset(mixed, "causal-lm", tokenizer, 1024, model=chat_model)
    message = str(caught.value)
    assert "row 2: messages[1].content: part 1 has type 'image_url'" in message, message
    assert "row 1" not in message, message


def test_bad_chat_rows_are_refused_by_line_and_field(chat_model, tmp_path):
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "ok"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    rows = [{"messages": CONVERSATION},
            {"messages": [user, {"role": "assistant", "content": [*parts("a"), image]}]},
            {"messages": [{"role": "user", "content": [{"type": "text"}]}, answer]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]},
                          answer]},
            {"messages": [user, {"role": "assistant", "content": 3}]},
            {"messages": [user, {"role": "function", "content": "hot"}, answer]},
            {"messages": [{"role": "user", "content": ["a string, not a part"]}, answer]},
            {"messages": [{"role": "user", "content": {"type": "text", "text": "a"}}, answer]}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    message = refused_conversations(path, _tokenizer(chat_model), chat_model, (
            "line 2: messages[1].content: part 1 has type 'image_url'; the model reads text only",
            "line 3: messages[0].content: part 0 has no text",
            "line 4: messages[0].content: part 0 has fields a text part does not take ('cache_control')",
            "line 5: messages[1].content: must be a string or a list of text parts, got 3",
            "line 6: messages[1].role must be one of 'system', 'developer', 'user', 'assistant', 'tool', got "
            "'function'",
            "line 7: messages[0].content: part 0 is 'a string, not a part'",
            "line 8: messages[0].content: must be a string or a list of text parts, got an object"))
    assert 'expected a string or {"type": "text", "text": ...} parts' in message, message


def test_text_parts_train_without_the_serving_packages(chat_model, tmp_path):
    """The content rule lives beside the server's other message rules (``serving.tools``); a training install has no
    pydantic nor fastapi: the rows read as with them."""
    import subprocess

    path = write_jsonl(tmp_path / "parts.jsonl", [{"messages": CONVERSATION}])
    code = ("import sys; sys.modules['pydantic'] = sys.modules['fastapi'] = None\n"
            "from transformers import AutoTokenizer\n"
            "from bca_deploy.training.data import load_dataset\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(chat_model)!r})\n"
            f"_, data = load_dataset({str(path)!r}, 'causal-lm', tokenizer, 1024, model={str(chat_model)!r})\n"
            "print(data.input_ids[0])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, _ = chat_reference(_tokenizer(chat_model), AS_TEMPLATE_READS, None, IGNORE_INDEX)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ids


def test_serve_renders_the_prompts_training_trains_after(chat_model, tmp_path_factory):
    """The same conversation sent to a running app's ``/tokenize`` (the chat route's rendering: its messages read by
    the route's request model, rendered by its chat template workers): the prompt before each assistant turn, with
    the generation prompt, is the tokens training puts before that turn's labels; the whole conversation is training's
    ids. Serve and training read the messages by one rule."""
    pytest.importorskip("fastapi")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
    from http_helpers import bank, call

    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.http import ServerThread, create_app
    from bca_deploy.serving.options import ServeOptions

    # the tiny Llama export (vocabulary 128) with this test's 103-token tokenizer and template
    export = tmp_path_factory.mktemp("served") / "export"
    shutil.copytree(bank("llama", tmp_path_factory)["onnx"], export)
    for old in [*export.glob("chat_template.*"), *export.glob("tokenizer*"), *export.glob("special_tokens_map.json")]:
        old.unlink()
    for name in chat_model.iterdir():
        shutil.copy(name, export / name.name)
    tokenizer = _tokenizer(export)
    path = write_jsonl(tmp_path_factory.mktemp("data") / "parts.jsonl", [{"messages": CONVERSATION}])
    _, data = load_dataset(path, "causal-lm", tokenizer, 1024, model=export)
    ids, labels = data.input_ids[0], data.labels[0]
    starts = [i for i, t in enumerate(labels) if t != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    assert len(starts) == 2  # the two assistant turns
    app = create_app(MultiAdapterSession(export, intra_op_threads=1), options=ServeOptions(threads=1, max_wait_ms=2))
    with ServerThread(app) as server:
        for turn, start in zip((3, 5), starts):
            status, answer = call(server.url + "/tokenize", "POST", {"model": "export",
                                                                     "messages": CONVERSATION[:turn]})
            assert status == 200, answer
            assert answer["tokens"] == ids[:start], turn
        status, answer = call(server.url + "/tokenize", "POST", {"model": "export", "messages": CONVERSATION,
                                                                 "add_generation_prompt": False})
        assert status == 200 and answer["tokens"] == ids, answer
        # the chat route itself reads the prompt the same way (its usage counts it)
        status, answer = call(server.url + "/v1/chat/completions", "POST",
                              {"model": "export", "messages": CONVERSATION[:3], "max_tokens": 1})
        assert status == 200 and answer["usage"]["prompt_tokens"] == starts[0], answer
