"""What careless OpenAI clients send, answered with the right error (helper-94's probe).

- a body header sent twice with different values (``content-type: application/json`` then ``text/plain``) was served
  by the first one, while a proxy may go by the last: now a 400 naming the header (the same value twice is served);
- a body starting with a UTF-8 byte order mark (PowerShell's and Windows editors' UTF-8 files) was a 400 telling the
  client to "decode using utf-8-sig": now read as JSON, as FastAPI (vLLM) reads it;
- a chat message with an image (or audio) part, or a part that is not a text part, got pydantic's attempt at each
  branch of the union, naming the private ``_TextPart``: now one line naming the part and what is wrong with it;
- ``stop_token_ids`` with a negative id or too many ids said "got tuple": now which entry, or how many;
- ``stop_token_ids`` past int64 with ``min_tokens`` was a 500 (``OverflowError`` building the min-tokens mask), and
  ids past the vocabulary were taken (no step can choose them): now a 400 naming the field and the vocabulary, as
  vLLM refuses out-of-vocabulary stop ids (helper-114's probe).

Tiny Llama bank, in-process server on loopback.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from http_helpers import assert_error, bank, call  # noqa: E402

BODY = {"model": "a0", "prompt": "the water is", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    with ServerThread(app) as server:
        yield server.url


def _raw(url: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in [("host", "x"), ("connection", "close"),
                                                  ("content-length", str(len(body))), *headers])
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\n{head}\r\n".encode() + body)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("name, values", [
    ("content-type", ["application/json", "text/plain"]),
    ("content-type", ["text/plain", "application/json"]),
    ("content-encoding", ["identity", "gzip"]),
])
def test_a_body_header_sent_twice_with_different_values_is_refused(url, name, values):
    status, answer = _raw(url, [(name, v) for v in values], json.dumps(BODY).encode())
    assert_error(status, answer, 400, "invalid_http", words=[f"2 {name} headers", *(repr(v) for v in values)])


def test_a_body_header_sent_twice_with_one_value_and_a_bom_body_are_served(url):
    status, expected = call(url + "/v1/completions", "POST", BODY)
    assert status == 200, expected
    twice = _raw(url, [("content-type", "application/json")] * 2, json.dumps(BODY).encode())
    bom = call(url + "/v1/completions", "POST", raw=b"\xef\xbb\xbf" + json.dumps(BODY).encode())
    for status, answer in (twice, bom):
        assert status == 200, answer
        assert answer["choices"] == expected["choices"]


@pytest.mark.parametrize("part, words", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "part 1 has type 'image_url'"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "part 1 has type 'input_audio'"),
    ({"type": "text", "text": 5}, "part 1 has text 5, not a string"),
    ("a text", "part 1 is 'a text'"),
])
def test_a_chat_part_that_is_not_text_is_named(url, part, words):
    body = {"model": "a0", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"}, part]}]}
    status, answer = call(url + "/v1/chat/completions", "POST", body)
    assert_error(status, answer, 400, "invalid_request", words=[f"messages.0.content: {words}", "expected a string or"])
    assert answer["error"]["param"] == "messages" and "_TextPart" not in answer["error"]["message"]


@pytest.mark.parametrize("ids, words", [([3, -5], "got entry 1 is -5"), (list(range(17)), "got 17 ids")])
def test_bad_stop_token_ids_say_what_is_wrong(url, ids, words):
    status, answer = call(url + "/v1/completions", "POST", {**BODY, "stop_token_ids": ids})
    assert_error(status, answer, 400, "invalid_request", words=[words])
    assert answer["error"]["param"] == "stop_token_ids" and "tuple" not in answer["error"]["message"]


@pytest.mark.parametrize("ids, extra", [([2**63], {"min_tokens": 1}), ([5, 10**30], {"min_tokens": 2, "stream": True}),
                                        ([128], {}), ([3, 200], {"min_tokens": 1, "ignore_eos": True})])
def test_stop_token_ids_outside_the_vocabulary_are_refused_naming_them(url, ids, extra):
    status, answer = call(url + "/v1/completions", "POST", {**BODY, "stop_token_ids": ids, **extra})
    assert_error(status, answer, 400, "invalid_request", words=["stop_token_ids", "[0, 128)", str(ids[-1])[:20]])
    assert answer["error"]["param"] == "stop_token_ids"
    # the last id inside it is served, min_tokens holding it
    status, answer = call(url + "/v1/completions", "POST", {**BODY, "stop_token_ids": [127], **extra,
                                                            "stream": False})
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
