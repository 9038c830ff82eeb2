"""Request bodies, the error table, the server options and the adapter store's containment, without a server."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from bca_deploy.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNameError,
    BCAError,
    ContextLengthError,
    NonFiniteError,
    ServingError,
    UnknownAdapterError,
)
from bca_deploy.serving.options import ServeOptions
from bca_deploy.serving.store import AdapterStore
from bca_deploy.serving.wire import (
    ERRORS,
    ClientClosedRequestError,
    InvalidJSONError,
    InvalidRequestError,
    RequestTooLargeError,
    ServerBusyError,
    UnsupportedMediaTypeError,
    check_content_type,
    error_body,
    error_status,
    read_json,
    validate,
)


def parse(body: bytes, depth: int = 8, chars: int = 100):
    return read_json(body, max_depth=depth, max_chars=chars)


# ---- read_json -------------------------------------------------------------------------------------------


def test_read_json_accepts_ordinary_bodies():
    assert parse(b'{"input": ["h\\u00e9llo", [1, 2]], "x": 1.5, "y": null}') == \
        {"input": ["héllo", [1, 2]], "x": 1.5, "y": None}
    assert parse('{"t": "\U0001F600 ok"}'.encode()) == {"t": "\U0001F600 ok"}  # a real pair is fine


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"\xff\xfe{}", InvalidJSONError, ["UTF-8", "offset 0"]),
        (b'{"a": "\xc3\x28"}', InvalidJSONError, ["UTF-8"]),
        (b"{not json", InvalidJSONError, ["not valid JSON", "line 1"]),
        (b'{"a": "x\x01"}', InvalidJSONError, ["Invalid control character at line 1 column 9"]),  # one "at"
        (b"", InvalidJSONError, ["not valid JSON"]),
        (b'{"t": NaN}', InvalidJSONError, ["NaN"]),
        (b'{"t": -Infinity}', InvalidJSONError, ["-Infinity"]),
        (b'{"t": 1e400}', InvalidJSONError, ["out of range"]),
        (b'{"t": ' + b"9" * 5000 + b"}", InvalidJSONError, ["too large"]),
        (b'{"t": "\\ud800"}', InvalidJSONError, ["lone surrogate", "t"]),
        (b'{"a": {"\\udfff": 1}}', InvalidJSONError, ["lone surrogate"]),
        (b"[" * 9 + b"]" * 9, RequestTooLargeError, ["deeper than 8"]),
        (b"[" * 100_000 + b"]" * 100_000, RequestTooLargeError, ["deeper than 8"]),
        (json.dumps({"t": "x" * 101}).encode(), RequestTooLargeError, ["t:", "101 characters", "100",
                                                                        "--max-text-chars"]),
        (json.dumps({"input": [["x" * 101]]}).encode(), RequestTooLargeError, ["input[0][0]", "101 characters"]),
        (json.dumps({"k" * 101: 1}).encode(), RequestTooLargeError, ["key", "--max-text-chars"]),
        # a repeated key means what each parser decides (the first, the last): refused, nested and escaped too
        (b'{"model": "a0", "input": "x", "model": "a1"}', InvalidJSONError, ["'model' more than once"]),
        (b'{"messages": [{"role": "user", "role": "system"}]}', InvalidJSONError, ["'role' more than once"]),
        (b'{"model": "a0", "mod\\u0065l": "a1"}', InvalidJSONError, ["'model' more than once"]),
    ],
)
def test_read_json_refusals(body, error, words):
    with pytest.raises(error) as caught:
        parse(body)
    assert isinstance(caught.value, BCAError)
    for word in words:
        assert word in str(caught.value)


def test_the_walk_that_passes_a_body_and_the_one_that_names_its_refusal_agree():
    """Bodies pass a walk that keeps no paths (a path per value took 3.6 s on a 4 MiB array of ``{}``); a refused one
    is walked again to name where. Both must draw the same lines: empty containers at the depth limit, keys, strings
    at the limit, a lone surrogate anywhere, an escaped backslash before "ud800" (no surrogate)."""
    accepted = [
        b"[" * 8 + b"]" * 8, b"[" * 7 + b"{}" + b"]" * 7, b"[" * 7 + b'"x"' + b"]" * 7,
        b'{"a": [[], {}, "", 1, null, true, [{"b": []}]]}', json.dumps({"k" * 100: ["v" * 100]}).encode(),
        b'{"t": "\\\\ud800"}',  # a backslash, then the text "ud800"
        b'"' + b"x" * 100 + b'"', b"1", b"null",
    ]
    for body in accepted:
        assert parse(body) == json.loads(body), body
    refused = [
        (b"[" * 8 + b"[]" + b"]" * 8, "deeper than 8"), (b"[" * 8 + b"{}" + b"]" * 8, "deeper than 8"),
        (b'{"a": [[[[[[[{}]]]]]]]}', "deeper than 8 levels (at a[0][0][0][0][0][0][0])"),
        (b'"' + b"x" * 101 + b'"', "body: a string of 101"), (b'{"a": [1, {"' + b"k" * 101 + b'": 2}]}', "a[1] key"),
        (b'{"a": [{}, "ok", "\uDBFF"]}', "a[2]: a lone surrogate"), (b'["\udc00"]', "lone surrogate"),
    ]
    for body, words in refused:
        with pytest.raises((RequestTooLargeError, InvalidJSONError), match=re.escape(words)):
            parse(body)


def test_a_large_body_is_parsed_off_the_event_loop(monkeypatch):
    """A body over INLINE_BODY_BYTES is parsed in a worker thread: its parse (up to ~0.5 s at the default 4 MiB limit)
    stopped every other request and stream on the event loop for as long; a small one stays inline (no hop)."""
    import asyncio
    import threading

    from bca_deploy.serving import wire

    threads = []
    real = wire.read_body
    monkeypatch.setattr(wire, "read_body", lambda *a: (threads.append(threading.get_ident()), real(*a))[1])

    async def both():
        options = ServeOptions(max_text_chars=10)
        small = await wire.parse_body(b'{"input": "x"}', options, {})
        large = await wire.parse_body(json.dumps({"k": [{}] * (wire.INLINE_BODY_BYTES // 3)}).encode(), options, {})
        return threading.get_ident(), small, large

    loop_thread, small, large = asyncio.run(both())
    assert small == {"input": "x"} and len(large["k"]) == wire.INLINE_BODY_BYTES // 3
    assert threads[0] == loop_thread and threads[1] != loop_thread


def test_read_body_limits_strings_by_max_text_chars_alone():
    # the string limit is max_text_chars exactly, whatever max_request_rows is; arrays are not cut by it
    # (a request's rows are counted by check_rows, a token-id row by the model's positions)
    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.wire import check_rows, read_body

    options = ServeOptions(max_text_chars=10, max_request_rows=256)
    assert read_body(json.dumps({"input": ["x" * 10], "ids": list(range(1000))}).encode(), options,
                     {"content-type": "application/json"})
    with pytest.raises(RequestTooLargeError, match="11 characters; this server's limit is 10 \\(--max-text-chars\\)"):
        read_body(json.dumps({"input": "x" * 11}).encode(), options, {"content-encoding": "identity"})
    check_rows(256, options.max_request_rows)
    with pytest.raises(RequestTooLargeError, match="prompt: 257 rows; this server's limit is 256 per request "
                                                   "\\(--max-request-rows\\)"):
        check_rows(257, options.max_request_rows, "prompt")


def test_a_compressed_body_is_refused_naming_its_encoding():
    # a gzip body was a 400 "the body is not UTF-8" (helper-59's probe): the client was sent after the wrong problem
    import gzip

    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.wire import UnsupportedMediaTypeError, error_status, read_body

    body = gzip.compress(json.dumps({"input": "x"}).encode())
    with pytest.raises(UnsupportedMediaTypeError, match="content-encoding 'gzip': request bodies are read uncompressed") \
            as caught:
        read_body(body, ServeOptions(), {"content-type": "application/json", "content-encoding": "gzip"})
    assert error_status(caught.value) == (415, "unsupported_media_type")


def test_validate_reports_every_problem_and_the_first_field():
    from pydantic import BaseModel, ConfigDict, Field, StrictInt

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid")
        a: StrictInt = Field(ge=0)
        b: StrictInt

    with pytest.raises(InvalidRequestError) as caught:
        validate(Body, {"a": -1, "b": "2", "c": 3})
    message = str(caught.value)
    assert "a: " in message and "b: " in message and "c: " in message
    assert caught.value.param == "a"
    with pytest.raises(InvalidRequestError, match="JSON object, got an array"):
        validate(Body, [1])
    assert validate(Body, {"a": 1, "b": 2}).b == 2



def test_a_field_the_request_does_not_take_is_answered_with_the_fields_it_does():
    """A client that names its adapter with "model" on /v1/classify (as it just did on /v1/completions) was told only
    "model: Extra inputs are not permitted"; now the answer names the field that picks the adapter on that route, and
    the other way round on the OpenAI routes. Any other unknown field lists what the request takes."""
    from bca_deploy.serving.http import ClassifyRequest, GenerateRequest
    from bca_deploy.serving.openai import CompletionRequest

    with pytest.raises(InvalidRequestError) as caught:
        validate(ClassifyRequest, {"model": "sentiment", "input": "great!"})
    assert caught.value.param == "model"
    assert "name the adapter with 'adapter' here" in str(caught.value) and "takes: input, adapter" in str(caught.value)
    with pytest.raises(InvalidRequestError) as caught:
        validate(CompletionRequest, {"model": "m", "prompt": "hi", "adapter": "sentiment"})
    assert caught.value.param == "adapter" and "name the adapter with 'model' here" in str(caught.value)
    with pytest.raises(InvalidRequestError) as caught:
        validate(GenerateRequest, {"input": "hi", "max_tokens": 3})
    message = str(caught.value)
    assert caught.value.param == "max_tokens" and "not a field of this request" in message
    assert set(GenerateRequest.model_fields) <= set(message.split("takes: ")[1].rstrip(")").split(", "))
    assert "'model'" not in message and "'adapter'" not in message  # no mix-up hint for other fields

# ---- the error table ---------------------------------------------------------------------------------------


def test_every_error_type_has_one_status():
    expected = {
        UnknownAdapterError: (404, "unknown_adapter"),
        AdapterNameError: (422, "invalid_adapter_name"),
        AdapterMismatchError: (422, "adapter_does_not_fit"),
        AdapterFormatError: (422, "invalid_adapter"),
        NonFiniteError: (422, "invalid_adapter"),
        InvalidJSONError: (400, "invalid_json"),
        InvalidRequestError: (422, "invalid_request"),
        ContextLengthError: (400, "context_length_exceeded"),
        RequestTooLargeError: (413, "request_too_large"),
        UnsupportedMediaTypeError: (415, "unsupported_media_type"),
        ServerBusyError: (503, "server_busy"),
        ServingError: (400, "bad_request"),
        BCAError: (400, "bad_request"),
    }
    for cls, answer in expected.items():
        assert error_status(cls("x")) == answer, cls
    assert error_status(ValueError("x")) == (500, "internal_error")  # not a BCAError: a bug, answered as such
    assert error_status(UnicodeDecodeError("utf-8", b"", 0, 1, "x")) == (500, "internal_error")
    statuses = {status for status, _ in ERRORS.values()}
    assert statuses <= {400, 403, 404, 405, 408, 409, 413, 415, 422, 499, 500, 503}
    assert error_status(ClientClosedRequestError("x")) == (499, "client_closed_request")
    assert error_body(404, "unknown_adapter", "m", "model") == \
        {"error": {"message": "m", "type": "unknown_adapter", "param": "model", "code": 404}}


def test_an_openai_requests_invalid_fields_are_400s_as_openai_answers():
    """The openai client raises BadRequestError for a 400 and UnprocessableEntityError for a 422: code written against
    OpenAI (and vLLM, which answers 400) catches the first. Native requests keep 422; /v1/embeddings is an OpenAI
    request only with "model"."""
    from bca_deploy.serving.wire import is_openai_request

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert is_openai_request(path, None) and is_openai_request(path, {"prompt": "x"})
    assert is_openai_request("/v1/embeddings", {"model": "a0", "input": "x"})
    assert not is_openai_request("/v1/embeddings", {"input": "x"}) and not is_openai_request("/v1/embeddings", ["x"])
    for path in ("/v1/classify", "/v1/generate", "/v1/adapters"):
        assert not is_openai_request(path, {"model": "a0"})
    for cls in (InvalidRequestError, AdapterNameError, AdapterMismatchError, AdapterFormatError):
        status, kind = error_status(cls("x"))
        assert status == 422 and error_status(cls("x"), openai=True) == (400, kind)
    assert error_status(UnknownAdapterError("x"), openai=True) == (404, "unknown_adapter")
    assert error_status(RequestTooLargeError("x"), openai=True) == (413, "request_too_large")


# ---- options ---------------------------------------------------------------------------------------------


def test_options_report_every_problem_at_once():
    with pytest.raises(ServingError) as caught:
        ServeOptions(port=99999, max_batch_rows=0, threads=0, max_wait_ms=float("nan"), list_adapters="yes",
                     served_model_name="../x", max_request_rows=10, max_queued_rows=5, provider="tpu",
                     max_prefill_tokens=0)
    message = str(caught.value)
    for word in ("port: 99999", "max_batch_rows: 0", "max_prefill_tokens: 0", "threads: 0",
                 "max_wait_ms: expected a finite number",
                 "list_adapters: expected true or false", "served_model_name: '../x'", "max_request_rows (10)",
                 "provider: 'tpu'"):
        assert word in message, word
    assert ServeOptions().replace(port=1).port == 1
    with pytest.raises(ServingError, match="max_json_depth"):
        ServeOptions().replace(max_json_depth=1)


def test_cli_serve_refuses_bad_numbers_without_a_traceback(tmp_path):
    from click.testing import CliRunner

    from bca_deploy.cli import main

    # the command line's problems name the --flags the user typed
    for args, word in ((["--port", "99999"], "--port: 99999"), (["--max-batch-rows", "0"], "--max-batch-rows: 0"),
                       (["--max-wait-ms", "nan"], "--max-wait-ms"), (["--port", "0x10"], "0x10"),
                       (["--body-timeout-s", "-1"], "--body-timeout-s")):
        result = CliRunner().invoke(main, ["serve", str(tmp_path), *args])
        assert result.exit_code == 2, (args, result.output)
        assert word in result.output and "Traceback" not in result.output, (args, result.output)


# ---- the adapter store: everything in an entry stays inside the store ---------------------------------


def _entry(directory, config: str = '{"x": 1}'):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(config)
    (directory / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    return directory


def test_store_refuses_file_links_out_and_never_shows_its_location(tmp_path):
    store = tmp_path / "store"
    _entry(store / "good")
    secret = tmp_path / "secret.json"
    secret.write_text('{"modules": "TOP-SECRET"}')
    linked = store / "linked-config"
    linked.mkdir()
    (linked / "adapter_config.json").symlink_to(secret)
    (linked / "adapter_model.safetensors").write_bytes(b"\0")
    weights = _entry(tmp_path / "outside-weights")
    deep = _entry(store / "linked-weights")
    (deep / "adapter_model.safetensors").unlink()
    (deep / "adapter_model.safetensors").symlink_to(weights / "adapter_model.safetensors")
    nested = _entry(store / "nested")
    (nested / "sub").mkdir()
    (nested / "sub" / "x").symlink_to(secret)
    (store / "dir-out").symlink_to(weights, target_is_directory=True)
    (store / "inside").symlink_to(store / "good", target_is_directory=True)
    shared = _entry(store / "shared-file")  # a file link to another entry of the same store is inside
    (shared / "adapter_model.safetensors").unlink()
    (shared / "adapter_model.safetensors").symlink_to(store / "good" / "adapter_model.safetensors")

    s = AdapterStore(store)
    assert s.names() == ["good", "inside", "shared-file"]
    assert s.path("inside") == (store / "good").resolve()
    for name in ("linked-config", "linked-weights", "nested", "dir-out"):
        with pytest.raises(AdapterNameError) as caught:
            s.path(name)
        message = str(caught.value)
        assert name in message and "outside the adapter store" in message
        assert str(tmp_path) not in message and "TOP-SECRET" not in message
    with pytest.raises(UnknownAdapterError) as caught:
        s.path("missing")
    assert "good" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert s.redact(f"{store}/good/adapter_config.json: bad") == "good/adapter_config.json: bad"
    assert s.redact(f"at {store}") == "at <store>"


def test_redaction_removes_roots_only_where_they_are_paths():
    """A short relative export directory (``serve tok``, ``serve .``) used to be replaced inside words: "tokenizer"
    came back as "<export>enizer" and every full stop as "<export>"."""
    from bca_deploy.serving.store import redact_roots

    roots = ["tok", "/srv/exports/tok", "."]
    assert redact_roots("cannot load the tokenizer saved in /srv/exports/tok (x); send token ids.", roots,
                        "<export>") == "cannot load the tokenizer saved in <export> (x); send token ids."
    assert redact_roots("/srv/exports/tok/config.json: bad; tok/a.onnx too; tok-2 and stock stay", roots, "<export>") \
        == "config.json: bad; a.onnx too; tok-2 and stock stay"
    assert redact_roots("./model.onnx is missing. Re-export.", roots, "<export>") == "model.onnx is missing. Re-export."
    assert redact_roots("C:\\x in /srv/tok", ["/srv/tok"], "<e\\x>") == "C:\\x in <e\\x>"
    # a relative root with a separator is a path wherever it stands; a bare name alone is a word of the prose
    assert redact_roots("saved in exports/tok (x)", ["exports/tok"], "<export>") == "saved in <export> (x)"
    assert redact_roots("saved in tok (x)", roots, "<export>") == "saved in tok (x)"


def test_a_relative_export_named_like_a_word_leaves_the_messages_prose_alone(tmp_path, monkeypatch):
    """``bca-deploy serve export`` (a folder named for what it holds): an embeddings request to a generation bank
    answered "embeddings need a feature-extraction <export> (bca-deploy <export> --bank ...)", the folder's name
    replaced wherever it stood alone as a word. The server's redaction keeps prose and still removes the export's
    location (its absolute and resolved paths, and the relative one as a path)."""
    from bca_deploy.serving.http import export_roots
    from bca_deploy.serving.session import KIND_NEEDS
    from bca_deploy.serving.store import redact_roots

    (tmp_path / "export").mkdir()
    monkeypatch.chdir(tmp_path)
    roots = export_roots(Path("export"))
    assert redact_roots(KIND_NEEDS["embed"], roots, "<export>") == KIND_NEEDS["embed"]
    assert redact_roots(f"{tmp_path / 'export'}/model.onnx is missing; export/tokenizer.json too; see {tmp_path}"
                        f"/export", roots, "<export>") == "model.onnx is missing; tokenizer.json too; see <export>"


def test_a_relative_store_named_like_a_word_leaves_the_messages_prose_alone(tmp_path, monkeypatch):
    """README's ``serve onnx-bank --adapter-store adapters/``: a classify request to a generation bank answered
    "... export (of seq-cls <store>)", and a store named ``store`` turned "no adapter 'x' in the adapter store" into
    "... in the adapter <store>": the relative store was replaced wherever its name stood alone as a word."""
    from bca_deploy.errors import UnknownAdapterError
    from bca_deploy.serving.session import KIND_NEEDS

    for name in ("adapters", "store"):
        (tmp_path / name / "good").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    adapters, store = AdapterStore("adapters/"), AdapterStore("store")
    assert adapters.redact(KIND_NEEDS["classify"]) == KIND_NEEDS["classify"]
    with pytest.raises(UnknownAdapterError) as caught:
        store.path("missing")
    assert store.redact(str(caught.value)) == "no adapter 'missing' in the adapter store"
    # still removed where it is a path, relative or resolved
    for s, given in ((adapters, "adapters"), (store, "store")):
        assert s.redact(f"{given}/good/adapter_config.json: bad") == "good/adapter_config.json: bad"
        assert s.redact(f"{tmp_path / given}/good/x: bad; at {tmp_path / given}") == "good/x: bad; at <store>"


def test_store_skips_and_refuses_symbolic_link_loops(tmp_path):
    """A loop (Path.resolve raises RuntimeError on Python < 3.13) used to be a 500 for every listing."""
    store = tmp_path / "store"
    _entry(store / "good")
    (store / "loop").symlink_to(store / "loop")
    looping = _entry(store / "looping-inside")
    (looping / "self").symlink_to(looping / "self")
    s = AdapterStore(store)
    assert s.names() == ["good"]
    for name in ("loop", "looping-inside"):
        with pytest.raises(AdapterNameError, match="symbolic-link loop") as caught:
            s.path(name)
        assert str(tmp_path) not in str(caught.value)


def test_store_bounds_an_entrys_file_count(tmp_path):
    entry = _entry(tmp_path / "store" / "many")
    for i in range(70):
        (entry / f"f{i}").write_text("")
    with pytest.raises(AdapterNameError, match="more than 64 files"):
        AdapterStore(tmp_path / "store").path("many")
    assert os.path.isdir(entry)


def test_bodies_must_be_sent_as_json():
    for value in (None, "application/json", "Application/JSON; charset=utf-8", "application/problem+json",
                  " application/json ;q=1"):
        check_content_type(value)  # read
    for value in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=--x", "",
                  "application/jsonp", "text/json", "json", "x" * 1000):
        with pytest.raises(UnsupportedMediaTypeError, match="request bodies are JSON") as refused:
            check_content_type(value)
        assert error_status(refused.value) == (415, "unsupported_media_type")
        assert len(str(refused.value)) < 200  # a long header is cut, not echoed whole


def test_a_refused_field_is_named_by_its_top_level_name():
    """pydantic's path of a union field ends in the branch it tried (``stop.str``): ``param`` is the request field,
    the message has the whole path; a list item's problem names its list."""
    from bca_deploy.serving.openai import ChatCompletionRequest, CompletionRequest

    with pytest.raises(InvalidRequestError) as refused:
        validate(CompletionRequest, {"model": "a", "prompt": "x", "stop": 5})
    assert refused.value.param == "stop" and "stop.str" in str(refused.value)
    with pytest.raises(InvalidRequestError) as refused:
        validate(ChatCompletionRequest, {"model": "a", "messages": [{"role": "user", "content": "x"},
                                                                   {"role": "robot", "content": "y"}]})
    assert refused.value.param == "messages" and "messages.1.role" in str(refused.value)


def test_a_refused_string_names_its_top_level_field():
    """A lone surrogate or an over-long string deep in a request: ``param`` is the request field it is under."""
    for body, param in ((b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
                        (json.dumps({"input": [["x" * 101]]}).encode(), "input"),
                        (b'{"stop": ["a", "\\udfff"]}', "stop"), (b'["\\ud800"]', None)):
        with pytest.raises((InvalidJSONError, RequestTooLargeError)) as refused:
            parse(body)
        assert refused.value.param == param, (body, refused.value)
