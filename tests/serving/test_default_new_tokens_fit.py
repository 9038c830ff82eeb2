"""A default ``max_new_tokens`` / ``max_tokens`` is clipped to what fits after the prompt, on every generation route.

One rule (:meth:`bca_deploy.serving.http.Server.new_tokens`): a value the client gave that does not fit in the model's
context is a 400 ``context_length_exceeded`` naming its field; a default (the native route's 32, the completions
route's 16, chat's "as many as the server allows") is clipped to the positions left, as OpenAI and vLLM clip theirs.
The native route refused a 120-token prompt on a 128-position model for the 32 tokens it never asked for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import assert_error, bank, call  # noqa: E402

POSITIONS = 128  # http_helpers.tiny_llama


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.http import ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], threads=1, max_wait_ms=2)
    session = MultiAdapterSession(art["onnx"], intra_op_threads=1)
    with ServerThread(app) as server:
        yield server.url, session


def _greedy(session, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t in session.generate([prompt], [None], max_new_tokens=n)[0]]


def test_native_default_is_clipped_per_row_to_what_fits(served):
    url, session = served
    long, short = [5] * (POSITIONS - 8), [5, 6, 7]
    status, body = call(url + "/v1/generate", "POST", {"input": [long, short]})
    assert status == 200, body
    got = [row["token_ids"] for row in body["data"]]
    assert got[0] == _greedy(session, long, 8) and len(got[0]) <= 8  # the 8 positions left
    assert got[1] == _greedy(session, short, 32)  # the other row keeps the route's default of 32
    status, body = call(url + "/v1/generate", "POST", {"input": [[5] * (POSITIONS - 1)]})
    assert status == 200 and len(body["data"][0]["token_ids"]) == 1, body


def test_native_and_openai_defaults_follow_one_rule(served):
    url, _ = served
    prompt = [5] * (POSITIONS - 6)
    status, native = call(url + "/v1/generate", "POST", {"input": [prompt]})
    assert status == 200, native
    status, completion = call(url + "/v1/completions", "POST", {"model": "__base__", "prompt": prompt,
                                                               "temperature": 0})
    assert status == 200, completion
    assert completion["usage"]["completion_tokens"] == len(native["data"][0]["token_ids"]) <= 6


def test_an_explicit_value_that_cannot_fit_is_still_a_400(served):
    url, _ = served
    status, body = call(url + "/v1/generate", "POST", {"input": [[5] * (POSITIONS - 8)], "max_new_tokens": 9})
    assert_error(status, body, 400, "context_length_exceeded", ["ask for at most 8 new tokens"])
    assert body["error"]["param"] == "max_new_tokens"
    status, body = call(url + "/v1/completions", "POST", {"model": "__base__", "prompt": [5] * (POSITIONS - 8),
                                                         "max_tokens": 9})
    assert_error(status, body, 400, "context_length_exceeded", ["ask for at most 8 new tokens"])
    assert body["error"]["param"] == "max_tokens"


def test_a_prompt_that_fills_the_context_is_refused_by_its_own_field(served):
    url, _ = served
    status, body = call(url + "/v1/generate", "POST", {"input": [[5] * POSITIONS]})
    assert_error(status, body, 400, "context_length_exceeded", [f"{POSITIONS} positions"])
    assert body["error"]["param"] == "input"
