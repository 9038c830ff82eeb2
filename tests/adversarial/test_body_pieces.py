"""A body sent in tiny pieces cannot hold the event loop (helper-79's probe, stop 37).

h11 spends ~9 us on each piece of a body: a 1 MB JSON body in 1-byte chunks (6 MB on the wire, within every limit)
held the event loop for 8.8 s, and /health and every other tenant's request waited. After BODY_PIECES_FREE pieces
the pieces must now average MIN_BODY_PIECE_BYTES, else 400 and the connection closes; bodies in ordinary chunks,
and a few thousand tiny ones, are read as before. Tiny BERT bank, loopback only.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from http_helpers import bank, call


def _chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def _send(url: str, wire_body: bytes) -> tuple[bytes, float]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        start = time.monotonic()
        try:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n" + wire_body)
        except (BrokenPipeError, ConnectionResetError):  # refused and closed while the rest was on its way
            pass
        answer = bytearray()
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
                head, sep, payload = bytes(answer).partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head, re.I)
                if sep and length and len(payload) >= int(length.group(1)):
                    break
        except ConnectionResetError:
            pass
        return bytes(answer), time.monotonic() - start


def test_a_body_in_tiny_chunks_is_refused_and_ordinary_chunks_are_read(tmp_path_factory):
    from bca_deploy.serving.http import BODY_PIECES_FREE, MIN_BODY_PIECE_BYTES, ServerThread, build

    art = bank("bert", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    body = json.dumps({"model": "a0", "input": ["the water is hot"] * 30_000}).encode()  # ~600 KB
    with ServerThread(app) as server:
        answer, seconds = _send(server.url, _chunked(body, 1))
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), answer[:300]
        error = json.loads(payload)["error"]
        assert f"{BODY_PIECES_FREE:,} pieces" in error["message"] and str(MIN_BODY_PIECE_BYTES) in error["message"]
        assert seconds < 5, seconds  # refused after ~4,096 chunks, not after 600,000
        metrics = call(server.url + "/metrics")[1]["not_json"]  # Prometheus text
        assert re.search(r'^bca_connection_refusals_total\{reason="body_pieces_too_small"\} 1\.0', metrics, re.M)

        small = json.dumps({"model": "a0", "input": ["the water is hot"] * 20}).encode()
        for size in (1, 8192):  # a few hundred 1-byte chunks, and ordinary 8 KiB chunks, are a body like any other
            data = small if size == 1 else json.dumps({"model": "a0", "input": ["hot water " * 300] * 200}).encode()
            answer, _ = _send(server.url, _chunked(data, size))
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), answer[:300]
            assert len(json.loads(payload)["data"]) == len(json.loads(data)["input"])
        status, _ = call(server.url + "/health")
        assert status == 200
