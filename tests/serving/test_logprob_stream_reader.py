"""A streamed answer's log-probability bound stops a reader that is behind, never one that reads as it comes.

``--max-logprob-entries`` holds what a streamed answer queues for its client (``openai._Pumps``). Counted alone, the
queue also grew when the server itself rendered chunks slower than the engine made tokens (the event loop renders
every row's chunk; the engine thread hands it several steps at once while the loop is busy): a client reading its
socket as fast as it could (1 MiB ``recv`` calls, nothing else) of 16 prompts x ``n`` 16 x 120 tokens x ``logprobs`` 20
was cut with the 408 "waiting for the client to read them" in 4 of 5 tries on a 20,000-entry server. Now the rows are
stopped only while the connection is full (the server's write buffer holds bytes the kernel would not take: the
client is not reading); a reader that does not read is still stopped (``test_logprob_answer_bound``). Against a real
``bca-deploy serve`` of the tiny Llama (``http_helpers``) with ``--max-logprob-entries 6000``: a little more than one
engine step of 256 rows x 21 entries (5,376).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import llama_serve, metric_total, read_at_once
from http_helpers import llama  # noqa: F401 - module fixture

BOUND = 6000
PROMPTS = ["the water is hot and", "you can", "what", "the day is"] * 4  # x n 16: 256 rows


@pytest.fixture(scope="module")
def tight(llama, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("logs") / "tight-serve.log"
    with llama_serve(llama["onnx"], llama["store"], log, "--max-logprob-entries", str(BOUND)) as process:
        yield process


def test_a_prompt_reader_of_many_rows_is_never_cut(tight):
    """Completions (logprobs 20, twice) and chat (top_logprobs 20), 256 rows x 60 tokens streamed, read at once:
    every choice ends with its tokens scored, no error event (past the bound, at 5,376 entries
    a step, within two steps of the engine), and the queue is empty after."""
    completions = {"model": "a0", "prompt": PROMPTS, "n": 16, "max_tokens": 60, "logprobs": 20, "ignore_eos": True,
                   "stream": True}
    chat = {"model": "a0", "messages": [{"role": "user", "content": "what is the water"}], "n": 256,
            "max_tokens": 60, "logprobs": True, "top_logprobs": 20, "ignore_eos": True, "stream": True}
    for path, body in [("/v1/completions", completions), ("/v1/chat/completions", chat), ("/v1/completions",
                                                                                                completions)]:
        status, events = read_at_once(tight.port, path, body)
        assert status == b"HTTP/1.1 200 OK"
        errors = [e["error"] for e in events if "error" in e]
        assert not errors, (path, errors[0])
        ends = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
        assert sorted(c["index"] for c in ends) == list(range(256)) and {c["finish_reason"] for c in ends} == {
            "length"}
        listed = [c["logprobs"]["tokens" if path == "/v1/completions" else "content"] for e in events
                  for c in e["choices"] if c["logprobs"]]
        assert sum(map(len, listed)) == 256 * body["max_tokens"]
    deadline = time.monotonic() + 10
    while metric_total(tight.url, "bca_queued_rows") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_total(tight.url, "bca_queued_rows") == 0
