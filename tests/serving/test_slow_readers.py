"""Clients that read their answers slowly, or not at all (helper-74's probe, stop 37).

The kernel frees a socket's send buffer in large steps (it is writable again once a third of a buffer of up to
megabytes has drained), so a timer around each write cut off a client reading a stream steadily (40 KB/s, never a
pause over 0.12 s: cut after 88 s at a 2 s timeout); and an answer sent in one write was never timed at all: a client
that never read an 8 MB embeddings answer kept its connection, and the megabytes buffered for it, for ever
(recorded as a 200). The clock is now the client's reading: steady readers get everything, one that reads
nothing for ``body_timeout_s`` is cut off with a reset and counted as 408. Loopback only, tiny models.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank

TIMEOUT_S = 1.0


def _metrics(url: str, endpoint: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=15).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^bca_requests_total\{[^}]*endpoint="%s"[^}]*status="(\d+)"[^}]*\} (\S+)' % re.escape(endpoint), text, re.M)}


def _wait_metrics(url: str, endpoint: str, expected: dict[str, float], seconds: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + seconds  # a request is recorded once its handler has unwound
    while (seen := _metrics(url, endpoint)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def _post(server, path: str, body: dict) -> socket.socket:
    """The request sent on a socket with a tiny receive buffer (the answer backs up in the server's buffers)."""
    host, port = server.url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                 % (path.encode(), len(raw)) + raw)
    return sock


def _whole(data: bytes) -> bool:
    """A content-length answer is all in ``data``."""
    head, sep, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head, re.I)
    return bool(sep and length and len(body) >= int(length.group(1)))


def _read_at(sock: socket.socket, bytes_per_s: float, until) -> tuple[bytes, float]:
    """Everything the server sends, read at about ``bytes_per_s`` (never pausing more than 0.1 s between reads) until
    ``until(data)`` or the server ends the connection; and the longest wait between two reads once the
    answer has started (before it: the time the server took to compute it)."""
    data, start, last, longest = bytearray(), None, 0.0, 0.0
    sock.settimeout(60)
    while not until(data):
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        now = time.monotonic()
        if start is None:
            start = last = now
        longest, last = max(longest, now - last), now
        data += chunk
        time.sleep(min(0.1, max(0.0, len(data) / bytes_per_s - (now - start))))
    return bytes(data), longest


def test_a_stream_read_slowly_but_steadily_is_answered_whole(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art, rows = bank("llama", tmp_path_factory), 256
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0, body_timeout_s=TIMEOUT_S,
                max_request_rows=rows, max_queued_rows=2 * rows, max_queued_rows_per_adapter=2 * rows)
    with ServerThread(app) as server:
        sock = _post(server, "/v1/completions", {"model": "a0", "prompt": [[5, 6, 7]] * rows, "max_tokens": 100,
                                                 "temperature": 0, "stream": True})
        try:
            data, longest = _read_at(sock, 400e3, lambda data: b"data: [DONE]" in data[-64:])
        finally:
            sock.close()
        assert longest < TIMEOUT_S / 2  # the client never paused near the timeout: it was reading all along
        assert len(data) > 2_000_000, len(data)
        assert b"data: [DONE]" in data[-64:]
        assert data.count(b'"finish_reason":"length"') == rows
        assert _wait_metrics(server.url, "/v1/completions", {"200": 1.0}) == {"200": 1.0}


def test_a_big_answer_read_slowly_is_whole_and_one_never_read_is_cut_off(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art, rows = bank("bert", tmp_path_factory), 12_000
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0, body_timeout_s=TIMEOUT_S,
                keep_alive_s=TIMEOUT_S, max_request_rows=rows, max_queued_rows=2 * rows,
                max_queued_rows_per_adapter=2 * rows, max_body_bytes=10**8)
    body = {"model": "a0", "input": ["the water is hot and you can see it"] * rows}
    with ServerThread(app) as server:
        slow = _post(server, "/v1/embeddings", body)  # one write of ~8 MB, more than the kernel holds for it
        try:
            data, longest = _read_at(slow, 2e6, _whole)
        finally:
            slow.close()
        assert longest < TIMEOUT_S / 2
        head, _, answer = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(answer) > 6_000_000
        assert len(json.loads(answer)["data"]) == rows
        assert _wait_metrics(server.url, "/v1/embeddings", {"200": 1.0}) == {"200": 1.0}

        idle = _post(server, "/v1/embeddings", body)
        try:
            seen = _wait_metrics(server.url, "/v1/embeddings", {"200": 1.0, "408": 1.0}, seconds=60)
            assert seen == {"200": 1.0, "408": 1.0}, seen  # not a success: the client read none of it
            time.sleep(0.2)
            got = bytearray()  # the connection was reset, its buffered answer dropped: far less than the answer
            idle.settimeout(10)
            try:
                while chunk := idle.recv(1 << 16):
                    got += chunk
            except ConnectionResetError:
                pass
            assert len(got) < 6_000_000, len(got)
        finally:
            idle.close()
        with urllib.request.urlopen(urllib.request.Request(  # another client is answered as usual
                server.url + "/v1/embeddings", json.dumps({"model": "a1", "input": ["hot water"]}).encode(),
                {"content-type": "application/json"}), timeout=30) as response:
            assert response.status == 200 and len(json.load(response)["data"]) == 1
