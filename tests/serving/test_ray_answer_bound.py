"""A streamed answer on a Ray replica: bounded in the replica, its rows stopped only while its consumer is behind.

The replica runs serve's app in-process (``ray._call_asgi``) and hands each chunk to Ray's streaming call. Its send
never waited: the chunks of a consumer that took none queued without bound, and with no connection to watch,
``openai._Pumps`` stopped the rows (the 408 "waiting for the client to read them") whenever its queue passed
``--max-logprob-entries``, also for a consumer taking every chunk at once while the replica itself rendered chunks
slower than the engine made them. Now the in-process connection (``ray._Outbox``) holds what a serve connection holds
before its send waits (``http.ANSWER_BUFFER_BYTES``) and is the app's write watch, so ``_Pumps`` applies serve's rule.
Driven here without Ray (the replica's generator, consumed as Ray's streaming call consumes it): the tiny Llama bank,
256 rows x 60 tokens x ``logprobs`` 20 (5,376 entries an engine step) on a 6,000-entry bound.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank

BOUND = 6000
WAIT_S = 120.0  # bounds every answer, so that a stuck one fails instead of hanging
BODY = {"model": "a0", "prompt": ["the water is hot and", "you can", "what", "the day is"] * 4, "n": 16,
        "max_tokens": 60, "logprobs": 20, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from bca_deploy.serving.http import build

    art = bank("llama", tmp_path_factory)
    return build(art["onnx"], threads=1, max_wait_ms=2.0, max_logprob_entries=BOUND, body_timeout_s=60.0)


def _answer(app, stall_s: float) -> tuple[list[dict], int]:
    """``BODY`` through ``_call_asgi`` as a replica answers it: the consumer takes the status and first chunk, waits
    ``stall_s``, then takes the rest at once. Returns the events and the most bytes the app had sent that the
    consumer had not taken (measured around the app's send, whatever connection ``_call_asgi`` gives it)."""
    from bca_deploy.serving.ray import _call_asgi

    async def run() -> tuple[list[dict], int]:
        await app.state.server.start()
        counts = {"sent": 0, "taken": 0, "ahead": 0}

        async def counted(scope, receive, send):
            async def counting(message):
                counts["sent"] += len(message.get("body", b""))
                counts["ahead"] = max(counts["ahead"], counts["sent"] - counts["taken"])
                await send(message)

            await app(scope, receive, counting)

        chunks = []
        stream = _call_asgi(counted, "POST", "/v1/completions", b"", [(b"content-type", b"application/json")],
                            json.dumps(BODY).encode())
        try:
            start = await stream.__anext__()
            assert start["status"] == 200, start
            async for chunk in stream:
                counts["taken"] += len(chunk)
                chunks.append(chunk)
                if len(chunks) == 1 and stall_s:
                    await asyncio.sleep(stall_s)
        finally:
            await stream.aclose()
            await app.state.server.stop()
        text = b"".join(chunks).decode()
        return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")], counts["ahead"]

    return asyncio.run(asyncio.wait_for(run(), WAIT_S))


def test_a_consumer_that_takes_nothing_holds_a_bounded_answer_and_gets_the_408(app):
    """Stalled after the first chunk: the app sends no more than a connection holds (plus the chunk its send waits
    with), its rows are stopped, and the answer ends, after what was queued, with serve's 408 event."""
    from bca_deploy.serving.http import ANSWER_BUFFER_BYTES

    events, ahead = _answer(app, stall_s=3.0)
    assert ahead <= ANSWER_BUFFER_BYTES + 64 * 1024, ahead  # before: 1.3 MB and more, the whole answer at last
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == 408 and "--max-logprob-entries (6,000)" in errors[0]["message"]
    assert "error" in events[-1]  # after what was queued
    listed = sum(len(c["logprobs"]["tokens"]) for e in events if "choices" in e for c in e["choices"] if c["logprobs"])
    assert listed < 256 * 60


def test_a_consumer_that_takes_every_chunk_is_never_cut(app):
    """Taken at once, five times: every choice ends with its tokens scored and no error event, though the replica
    renders 256 rows' chunks slower than the engine makes them (before: the 408 in most tries)."""
    for _ in range(5):
        events, _ = _answer(app, stall_s=0.0)
        errors = [e["error"]["message"] for e in events if "error" in e]
        assert not errors, errors[0]
        ends = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
        assert sorted(c["index"] for c in ends) == list(range(256))
        assert sum(len(c["logprobs"]["tokens"]) for e in events for c in e["choices"] if c["logprobs"]) == 256 * 60


@pytest.mark.parametrize("chunks", [1, 3])
def test_an_app_awaiting_receive_after_its_response_ends_the_answer(chunks):
    """An app that awaits ``receive()`` once its response is whole (legal ASGI: uvicorn answers ``http.disconnect``
    then) gets the disconnect, and the replica's answer ends with the app's task (before: the answer, which runs to the
    end of the app's task, waited for that disconnect, which came only once the answer had ended: it never ended)."""
    from bca_deploy.serving.ray import _call_asgi

    seen = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(chunks):
            await send({"type": "http.response.body", "body": b"x" * 10, "more_body": i < chunks - 1})
        seen.append(await receive())

    async def run() -> list:
        return [item async for item in _call_asgi(app, "GET", "/x", b"", [], b"")]

    items = asyncio.run(asyncio.wait_for(run(), 10.0))
    assert items == [{"status": 200, "headers": []}, *[b"x" * 10] * chunks]
    assert seen == [{"type": "http.disconnect"}]


def test_through_ray_a_reader_that_keeps_up_is_never_cut_nor_logged_as_gone(tmp_path_factory, tmp_path):
    """``bca-deploy serve-ray --max-logprob-entries 6000`` (its own local Ray instance, one replica): the same answer
    read at once through Ray's proxy, twice, is whole; each is logged by the replica as answered (before: the 408 event,
    and every answer through Ray, whole or not, logged and counted with error_type client_closed_request, the replica
    having cancelled the app's task as soon as its last chunk was taken)."""
    from http_helpers import read_at_once, serve_ray

    log = tmp_path / "serve-ray.log"
    with serve_ray(bank("llama", tmp_path_factory)["onnx"], log, "--max-logprob-entries", str(BOUND)) as (_, url):
        port = int(url.rpartition(":")[2])
        for _ in range(2):
            status, events = read_at_once(port, "/v1/completions", BODY)
            assert status == b"HTTP/1.1 200 OK"
            errors = [e["error"]["message"] for e in events if "error" in e]
            assert not errors, errors[0]
            assert sum(len(c["logprobs"]["tokens"]) for e in events for c in e["choices"] if c["logprobs"]) == 256 * 60
        deadline = time.monotonic() + 10
        while True:  # Ray's log monitor forwards the replica's lines each second
            lines = [json.loads(line[line.index("{"):]) for line in log.read_text(errors="replace").splitlines()
                     if '"path":"/v1/completions"' in line]
            if len(lines) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert [(e["status"], e.get("error_type"), e["completion_tokens"]) for e in lines] == [(200, None, 256 * 60)] * 2
