"""A streaming client that stops reading gives its rows back (helper-59's probe).

Starlette leaves the events generator suspended at its ``yield`` when a send fails (the server cuts off a client
that has not read for ``--body-timeout-s``), and the generator's cleanup (cancel the rows, free their place in the
queue) waited for the garbage collector: one such client of 256 rows held 256 queued rows for minutes after its
request ended, and 8 of them answered every tenant 503. Here one client opens a 256-row stream on a socket with a
tiny receive buffer and never reads; once the server has cut it off, ``bca_queued_rows`` must be back to 0 and
another tenant's request answered, on the tiny Llama bank (loopback only).
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
from http_helpers import bank, call

ROWS = 256


def _queued(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=15) as response:
        text = response.read().decode()
    return float(re.search(r"^bca_queued_rows (\S+)", text, re.M).group(1))


def test_a_stream_nobody_reads_gives_its_rows_back(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0, body_timeout_s=2.0,
                max_request_rows=ROWS, max_queued_rows=2 * ROWS, max_queued_rows_per_adapter=2 * ROWS)
    with ServerThread(app) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"model": "a0", "prompt": [[5, 6, 7]] * ROWS, "max_tokens": 100, "temperature": 0,
                           "stream": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body)
        try:
            deadline = time.monotonic() + 5
            while _queued(server.url) == 0 and time.monotonic() < deadline:  # admitted
                time.sleep(0.05)
            assert _queued(server.url) == ROWS
            deadline = time.monotonic() + 60  # generation stalls on the full socket; cut off 2 s after
            while (queued := _queued(server.url)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert queued == 0, f"{queued:g} rows still queued after the stalled stream was cut off"
            # recorded as what it was: the server gave up on the answer (408), not a success (its status line was 200);
            # the request is recorded when its handler has unwound, which may be just after its rows were freed
            deadline = time.monotonic() + 30
            while True:
                metrics = urllib.request.urlopen(server.url + "/metrics", timeout=15).read().decode()
                completions = {m.group(1): float(m.group(2)) for m in re.finditer(
                    r'^bca_requests_total\{[^}]*endpoint="/v1/completions"[^}]*status="(\d+)"[^}]*\} (\S+)', metrics,
                    re.M)}
                if completions or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert completions == {"408": 1.0}, completions
            assert re.search(r'^bca_request_errors_total\{[^}]*status="408",type="request_timeout"[^}]*\} 1\.0',
                             metrics, re.M), metrics
            status, answer = call(server.url + "/v1/completions", "POST",
                                  {"model": "a1", "prompt": [5, 6], "max_tokens": 2, "temperature": 0})
            assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
        finally:
            sock.close()
