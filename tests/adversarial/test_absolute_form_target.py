"""An absolute-form request target (``GET http://host:port/v1/models HTTP/1.1``) is served as its path.

RFC 9112 section 3.2.2: a server MUST accept the absolute-form, which requests sent through a forward proxy (``curl
-x``, ``urllib``'s ``ProxyHandler``, ``HTTP_PROXY`` set to the server itself) carry. uvicorn took the whole URI for the
path, so each was a 404 ``no endpoint GET http://...``. Malformed absolute forms (another scheme, an empty host, a bad
port, user information, a fragment) and targets that are neither a path nor a URI are a 400 ``invalid_http``, logged
and counted.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from http_helpers import bank, call, log_lines  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    with ServerThread(build(art["onnx"], threads=1, max_wait_ms=2)) as server:
        yield server.url


def _request(url: str, target: bytes, method: bytes = b"GET", body: bytes = b"",
             headers: bytes = b"") -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"%s %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method, target, host.encode(), port.encode(), headers, len(body), body))
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    head, _, content = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


def _count(url: str, endpoint: str, status: int) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.findall(rf'bca_requests_total\{{adapter="[^"]*",endpoint="{re.escape(endpoint)}",method="GET",'
                       rf'status="{status}"\}} (\S+)', text)
    return sum(float(v) for v in found)


@pytest.mark.parametrize("target", [b"http://{authority}/v1/models", b"HTTP://Proxy.Example:80/v1/models",
                                    b"https://models.internal/v1/models", b"http://[::1]:8080/v1/models?x=1",
                                    b"http://10.0.0.1:/v1/model%73"])
def test_an_absolute_form_target_is_served_as_its_path(url, target):
    target = target.replace(b"{authority}", url.removeprefix("http://").encode())
    expected_status, expected = call(url + "/v1/models")
    before = _count(url, "/v1/models", 200)
    status, got = _request(url, target)
    assert (status, got) == (expected_status, expected) and status == 200
    assert _count(url, "/v1/models", 200) == before + 1  # counted under its route


def test_a_body_sent_with_an_absolute_form_target(url):
    body = {"input": ["the water is hot"], "adapter": "a0"}
    _, expected = call(url + "/v1/embeddings", "POST", body)
    status, got = _request(url, b"http://gateway.example/v1/embeddings", b"POST", json.dumps(body).encode(),
                           b"Content-Type: application/json\r\n")
    assert status == 200 and got == expected


def test_a_client_talking_to_the_server_as_its_proxy(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": url}))
    with opener.open("http://model-server.internal:9000/health", timeout=30) as response:
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"


def test_an_empty_path_is_the_root(url):
    status, got = _request(url, b"http://model-server.internal")
    assert status == 404 and got["error"]["message"] == "no endpoint GET /"


@pytest.mark.parametrize(("target", "word"), [
    (b"ftp://host/health", "scheme"),
    (b"http:///health", "host is empty"),
    (b"http://host:port/health", "malformed"),
    (b"http://user:secret@host/health", "user information"),
    (b"http://host/health#part", "fragment"),
    (b"health", "neither a path"),
    (b"*", "neither a path"),
])
def test_a_malformed_target_is_a_400_logged_and_counted(url, target, word):
    with log_lines() as lines:
        before = _count(url, "unmatched", 400)
        status, got = _request(url, target)
        deadline = time.monotonic() + 5
        while not any('"status":400' in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.02)  # the log line is written once the answer is out
    assert status == 400 and got["error"]["type"] == "invalid_http" and word in got["error"]["message"], got
    assert _count(url, "unmatched", 400) == before + 1
    entry = json.loads(next(line for line in lines if '"status":400' in line))
    assert entry["error_type"] == "invalid_http"
    # user information (it may be a password) is neither echoed nor logged
    assert entry["path"] == target.decode().replace("user:secret@", "...@")
    assert "secret" not in got["error"]["message"]
