"""``Expect: 100-continue`` on a request its headers already refuse: the final status at once, never ``100 Continue``.

RFC 9110 section 10.1.1: a server that will refuse a request by its headers answers with the final status and does
not invite the body. uvicorn sends ``100 Continue`` when the app first reads the body, so every refusal by headers must
come before the body is read; the content-type/-encoding check (415) came after it: the client was told to send its
(megabytes of) body, only to get the 415 for it. A request that is accepted still gets ``100 Continue`` first.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from http_helpers import bank  # noqa: E402

BODY = b'{"input": ["the water is hot"]}'


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    open_app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2, max_body_bytes=65_536)
    closed_app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2, manage_adapters=False)
    with ServerThread(open_app) as server, ServerThread(closed_app) as closed:
        yield server, closed


def _head(path: str, headers: dict[str, str], method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Expect: 100-continue",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket, limit_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body) read from ``sock``; a 100 is returned as it is (no body)."""
    data, deadline = b"", time.monotonic() + limit_s
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    status = int(status_line.split()[1])
    length = int(headers.get("content-length", 0)) if status != 100 else 0
    while len(rest) < length:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-answer"
        rest += chunk
    return status, headers, rest[:length]


def _first_answer(url: str, head: bytes) -> tuple[int, dict[str, str], bytes, socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    try:
        status, headers, body = _response(sock)
    except socket.timeout:
        sock.close()
        pytest.fail("no answer to the head within 5 s")
    return status, headers, body, sock


REFUSED = [
    pytest.param("/v1/embeddings", {"Content-Type": "text/plain", "Content-Length": "50000"}, "POST", 415,
                 "unsupported_media_type", id="content-type"),
    pytest.param("/v1/load_lora_adapter", {"Content-Type": "text/plain", "Content-Length": "500"}, "POST", 415,
                 "unsupported_media_type", id="content-type-openai-route"),
    pytest.param("/v1/adapters", {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "100"},
                 "POST", 415, "unsupported_media_type", id="form-load"),
    pytest.param("/v1/embeddings", {"Content-Type": "application/json", "Content-Encoding": "gzip",
                                    "Content-Length": "2000"}, "POST", 415, "unsupported_media_type", id="gzip"),
    pytest.param("/v1/embeddings", {"Content-Type": "text/plain", "Transfer-Encoding": "chunked"}, "POST", 415,
                 "unsupported_media_type", id="content-type-chunked"),
    pytest.param("/v1/embeddings", {"Content-Type": "application/json", "Content-Length": "99999999"}, "POST", 413,
                 None, id="too-large"),
    pytest.param("/v1/nothing", {"Content-Type": "application/json", "Content-Length": "1000"}, "POST", 404,
                 "not_found", id="unknown-route"),
    pytest.param("/v1/embeddings", {"Content-Type": "application/json", "Content-Length": "1000"}, "PUT", 405, None,
                 id="wrong-method"),
]


@pytest.mark.parametrize(("path", "headers", "method", "status", "kind"), REFUSED)
def test_a_request_refused_by_its_headers_gets_no_100_continue(servers, path, headers, method, status, kind):
    got, answer_headers, body, sock = _first_answer(servers[0].url, _head(path, headers, method))
    sock.close()
    assert got == status, (got, body)  # not 100: the client was not asked for the body
    assert answer_headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == status and (kind is None or error["type"] == kind)


def test_adapter_management_refused_gets_no_100_continue(servers):
    _, closed = servers
    got, _, body, sock = _first_answer(closed.url, _head("/v1/adapters", {"Content-Type": "application/json",
                                                                         "Content-Length": "100"}))
    sock.close()
    assert got == 403, (got, body)


def test_an_accepted_request_gets_100_continue_then_its_answer(servers):
    server, _ = servers
    got, _, _, sock = _first_answer(server.url, _head("/v1/embeddings", {"Content-Type": "application/json",
                                                                        "Content-Length": str(len(BODY))}))
    with sock:
        assert got == 100
        sock.sendall(BODY)
        status, _, body = _response(sock)
        assert status == 200 and len(json.loads(body)["data"]) == 1


def test_a_refused_request_whose_body_is_sent_anyway_leaves_the_connection_usable(servers):
    # the client may send the body regardless (it need not wait for the 100): it is read and dropped, and the
    # connection carries the next request
    server, _ = servers
    refused = b"x" * 3000
    got, _, _, sock = _first_answer(server.url, _head("/v1/embeddings", {"Content-Type": "text/plain",
                                                                        "Content-Length": str(len(refused))}))
    with sock:
        assert got == 415
        sock.sendall(refused)
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
        status, _, body = _response(sock)
        assert status == 200 and len(json.loads(body)["data"]) == 1
