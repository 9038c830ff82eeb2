"""A WebSocket upgrade gets a JSON 400 naming WebSocket, logged and counted like any other refusal.

The server has no WebSocket route. With a WebSocket library installed (``websockets``, ``uvicorn[standard]``),
uvicorn upgraded the connection and the app closed the handshake with an empty 403 that no log line or metric saw;
without one, uvicorn logged two warnings per request and answered it as HTTP. Now uvicorn runs without WebSocket
support and the guard refuses an upgrade to ``websocket`` (400 ``bad_request``, the connection closed after it);
another upgrade (``h2c``) is served as HTTP/1.1, as RFC 9110 section 7.8 allows.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from http_helpers import bank, call  # noqa: E402

WS_HEADERS = b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    with ServerThread(build(art["onnx"], threads=1, max_wait_ms=2)) as server:
        yield server.url


def _exchange(url: str, raw: bytes, limit_s: float = 5.0) -> bytes:
    """What the server sends until it closes the connection (or ``limit_s`` passes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=limit_s) as sock:
        sock.sendall(raw)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except socket.timeout:
            out += b"<timeout>"
    return out


def _refusals(url: str) -> float:
    status, _ = call(url + "/health")
    assert status == 200
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.search(r'bca_request_errors_total\{adapter="",endpoint="unmatched",status="400",type="bad_request"\} '
                      r"(\S+)", text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("path", ["/health", "/v1/chat/completions", "/v1/socket"])
@pytest.mark.parametrize("connection", [b"Upgrade", b"keep-alive, Upgrade"])
def test_a_websocket_upgrade_gets_a_json_400_and_is_counted(url, path, connection):
    before = _refusals(url)
    out = _exchange(url, b"GET %s HTTP/1.1\r\nHost: test\r\nConnection: %s\r\n%s\r\n" % (path.encode(), connection,
                                                                                          WS_HEADERS))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), out[:300]
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower(), head
    assert not body.endswith(b"<timeout>"), "the connection was not closed after the refusal"
    error = json.loads(body)["error"]
    assert error["code"] == 400 and error["type"] == "bad_request" and "WebSocket" in error["message"]
    assert _refusals(url) == before + 1


def test_a_websocket_client_sees_the_status_and_the_reason(url):
    client = pytest.importorskip("websockets.asyncio.client")
    from websockets.exceptions import InvalidStatus

    async def connect():
        async with client.connect(url.replace("http://", "ws://") + "/v1/completions", open_timeout=10):
            pass

    with pytest.raises(InvalidStatus) as caught:
        asyncio.run(connect())
    assert caught.value.response.status_code == 400 and b"WebSocket" in caught.value.response.body


def test_other_upgrades_and_a_bare_upgrade_header_are_served_as_http(url):
    h2c = b"Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    bare = b"Connection: close\r\n" + WS_HEADERS  # without the "upgrade" connection option it asks for nothing
    for extra in (h2c, bare):
        out = _exchange(url, b"GET /health HTTP/1.1\r\nHost: test\r\n%s\r\n" % extra)
        assert out.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in out, out[:300]
