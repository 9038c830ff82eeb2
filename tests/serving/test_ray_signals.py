"""serve-ray stops the graceful way on SIGINT and SIGTERM, also when its shell started it ignoring SIGINT.

Before, SIGTERM hit Ray's native handler (a stack dump, no Serve shutdown, now and then orphaned Ray agents), and a
SIGINT inherited as ignored (``serve-ray ... &`` in a script) did nothing. Its own module: the process under test
starts its own local Ray instance (test_ray.py keeps one up in the pytest process for its module).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, free_port


def _ignore_sigint() -> None:  # what a shell does for a job it starts with &
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_ray_stops_gracefully_on_a_signal(tmp_path_factory, tmp_path, signum):
    art = bank("bert", tmp_path_factory)
    port = free_port()
    log = tmp_path / "serve-ray.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    command = [sys.executable, "-m", "bca_deploy.cli", "serve-ray", str(art["onnx"]), "--replicas", "1",
               "--replica-cpus", "0", "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_ignore_sigint)
        try:
            deadline = time.monotonic() + 240
            while True:  # up: the health route answers (the signal may come before the "serving" line)
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    # a probe given up on would still be in flight in the router when the signal shuts Serve down,
                    # and Ray logs the cancelled request's traceback: on a busy machine, wait for each answer
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "serve-ray did not come up"
                time.sleep(0.5)
            process.send_signal(signum)
            code = process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert code == 130 and "Interrupted." in text, (code, text[-3000:])
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
