"""A big answer is built and rendered off the event loop: other requests are answered meanwhile (helper-135's probe).

A completion of 256 rows x 120 tokens with ``logprobs: 20`` is ~650,000 values; its texts, log-probability lists and
JSON were built on the event loop (FastAPI's ``jsonable_encoder`` over the returned dict), and every other client (a
health check, another tenant's 8-token completion) waited 3.6 s for it on a 2-core machine. Here that wait is made
deterministic instead of timed: the server's session is patched so that building one answer (its tokens' texts, or
``/v1/generate``'s decoded text) blocks until the test has got two other answers; on the event loop it could not get
them. The blocked answer and the other tenant's are then token-equal to their solo runs (the tiny Llama bank,
loopback only), and :func:`~bca_deploy.serving.wire.render_answer` writes the bytes Starlette's ``JSONResponse`` does.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call

WAIT_S = 30.0  # bounds every wait, so that the old code fails instead of hanging
OTHER_S = 10.0  # how long the other requests may take while the big answer is held

BIG = {
    "completions": ("/v1/completions", {"model": "a0", "prompt": [[5, 6, 7]] * 4, "max_tokens": 6,
                                        "temperature": 0, "logprobs": 3}, "token_texts"),
    "chat": ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "the water is"}],
                                      "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3},
             "token_texts"),
    "generate": ("/v1/generate", {"adapter": "a2", "input": ["the water is", "you can see"], "max_new_tokens": 6},
                 "decode"),
}
OTHER = ("/v1/completions", {"model": "a1", "prompt": [9, 10, 11], "max_tokens": 4, "temperature": 0})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    with ServerThread(app) as server:
        yield server.url, app.state.server.session


def _tokens(route: str, answer: dict) -> list:
    """What a greedy answer chose: its texts and log-probabilities (or token ids), ids and timings aside."""
    if route == "/v1/generate":
        return [(row["token_ids"], row.get("text")) for row in answer["data"]]
    return [(c.get("text"), c.get("message"), c["logprobs"], c["finish_reason"]) for c in answer["choices"]]


@pytest.mark.parametrize("kind", sorted(BIG))
def test_other_requests_are_answered_while_a_big_answer_is_built(served, monkeypatch, kind):
    url, session = served
    route, body, method = BIG[kind]
    solo_status, solo = call(url + route, "POST", body)
    other_status, other_solo = call(url + OTHER[0], "POST", OTHER[1])
    assert (solo_status, other_status) == (200, 200), (solo, other_solo)

    entered, release = threading.Event(), threading.Event()
    original = getattr(session, method)

    def held(*args, **kwargs):  # the first call after arming waits for the test (bounded)
        if not entered.is_set():
            entered.set()
            release.wait(WAIT_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(session, method, held)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(call, url + route, "POST", body, timeout=2 * WAIT_S + OTHER_S)
        try:
            assert entered.wait(WAIT_S), f"the {kind} answer never reached session.{method}"
            answered = []
            for path, method_, payload in (("/health", "GET", None), (OTHER[0], "POST", OTHER[1])):
                try:
                    answered.append(call(url + path, method_, payload, timeout=OTHER_S))
                except OSError as exc:  # a timeout: the event loop is held by the big answer
                    answered.append((None, f"{type(exc).__name__}: {exc}"))
        finally:
            release.set()
        status, answer = big.result(timeout=2 * WAIT_S + OTHER_S)
    assert answered[0][0] == 200, f"/health while the {kind} answer was built: {answered[0][1]}"
    assert answered[1][0] == 200, f"another tenant's completion while the {kind} answer was built: {answered[1][1]}"
    assert _tokens(OTHER[0], answered[1][1]) == _tokens(OTHER[0], other_solo)
    assert status == 200, answer
    assert _tokens(route, answer) == _tokens(route, solo)


def test_answers_are_rendered_as_starlette_renders_them():
    from fastapi.responses import JSONResponse

    from bca_deploy.serving.wire import render_answer

    answers = [
        {},
        {"choices": []},
        {"id": "x", "choices": [{"index": 0, "text": "caf\u00e9 \u2028\"\\", "logprobs": {"top_logprobs": [
            {"bytes:\\xe2": -1.5}], "token_logprobs": [None, -0.25]}}, {"index": 1, "text": ""}],
         "usage": {"prompt_tokens": 3}, "nested": {"a": [1, 2]}, "flag": True, "none": None, "number": 1e-310},
        {"adapter": None, "data": [[0.1, -2.0, 3.5e38], {"embedding": [1, 2]}]},
        {"count": 3, "tokens": [1, 2, 3], "token_strs": ["a", "\u00e9"], "mixed": [{"a": 1}, 2, "x", None]},
    ]
    for answer in answers:
        assert render_answer(answer) == JSONResponse(answer).body
        assert json.loads(render_answer(answer)) == answer
    with pytest.raises(ValueError):  # NaN is not JSON, as Starlette refuses it
        render_answer({"data": [math.nan]})
