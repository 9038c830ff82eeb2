"""serve-ray stops the graceful way on SIGINT and SIGTERM, also when its shell started it ignoring SIGINT, and logs no
traceback for clients that hang up mid-answer.

Before, SIGTERM hit Ray's native handler (a stack dump, no Serve shutdown, now and then orphaned Ray agents), and a
SIGINT inherited as ignored (``serve-ray ... &`` in a script) did nothing. Its own module: the process under test
starts its own local Ray instance (test_ray.py keeps one up in the pytest process for its module).
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, serve_ray


def _stopped_cleanly(process: subprocess.Popen, signum: int, log: Path) -> None:
    process.send_signal(signum)
    code = process.wait(timeout=90)
    text = log.read_text(errors="replace")
    assert code == 130 and "Interrupted." in text, (code, text[-3000:])
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_ray_stops_gracefully_on_a_signal(tmp_path_factory, tmp_path, signum):
    log = tmp_path / "serve-ray.log"
    with serve_ray(bank("bert", tmp_path_factory)["onnx"], log) as (process, url):
        # a client that reads the status and hangs up: its answer may still be in flight in the router when the
        # signal comes (Ray cancels it: before, a traceback in the log, now and then)
        with urllib.request.urlopen(url + "/health", timeout=60) as response:
            assert response.status == 200
        _stopped_cleanly(process, signum, log)


def test_serve_ray_logs_no_traceback_for_clients_that_hang_up_mid_answer(tmp_path_factory, tmp_path):
    """Ray's proxy cancels the router's call when a client leaves mid-stream; the router took Ray's cancelled
    ``receive`` for an error (a "Future exception was never retrieved" traceback in the log) instead of a disconnect.
    The rows are cancelled on the replica (499 in its access log), and the next client is answered in full. A client
    gone before its body is whole is a 499 in the router's access log (or Ray's own CANCELLED line), not a 500."""
    log = tmp_path / "serve-ray.log"
    with serve_ray(bank("llama", tmp_path_factory)["onnx"], log) as (process, url):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": "a0", "prompt": "a b c", "max_tokens": 120, "min_tokens": 120, "stream": True})
        for _ in range(6):
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            connection.request("POST", "/v1/completions", body, {"content-type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and response.read1(64).startswith(b"data: ")
            connection.close()  # mid-answer
            time.sleep(1)
        for _ in range(4):  # gone mid-body: Ray's ClientDisconnect escaped as a "Request failed" traceback and a 500
            with socket.create_connection((host, int(port)), timeout=60) as raw:
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{\"model\": ")
                time.sleep(0.5)
            time.sleep(1)
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(
            {"model": "a0", "prompt": "a b c", "max_tokens": 5, "min_tokens": 5}).encode(),
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.load(response)["usage"]["completion_tokens"] == 5
        time.sleep(2)  # Ray's log monitor forwards the workers' lines each second
        assert '"status":499' in log.read_text(errors="replace")
        _stopped_cleanly(process, signal.SIGTERM, log)
