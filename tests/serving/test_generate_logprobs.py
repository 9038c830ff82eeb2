"""The native ``POST /v1/generate`` with ``logprobs`` and ``prompt_logprobs`` (TGI's ``details`` /
``decoder_input_details`` / ``top_n_tokens``, under the engine's names), against a real ``bca-deploy serve`` of the tiny
Llama export (``http_helpers``). The reference is PyTorch: the same Llama with the same adapters, each row run alone,
teacher-forced: log_softmax of the logits at position t - 1 evaluated at token t, and ``torch.topk`` of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import call
from http_helpers import llama, server, torch_llama  # noqa: F401 - module fixtures
from serving_helpers import row_alone

ATOL = 1e-4


def check_entries(entries: list, lp: torch.Tensor, ids: list[int], first: int, top: int) -> None:
    """``entries[j]`` lists ``ids[first + j]`` under row ``first + j - 1`` of ``lp`` with its ``top`` alternatives."""
    for j, entry in enumerate(entries):
        t = first + j
        assert entry["token_id"] == ids[t]
        assert entry["logprob"] == pytest.approx(lp[t - 1, ids[t]].item(), abs=ATOL), t
        values, best = torch.topk(lp[t - 1], top)
        assert [e["token_id"] for e in entry["top_logprobs"]] == best.tolist(), t
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=ATOL), t


def test_generate_lists_new_and_prompt_token_logprobs_as_pytorch(server, torch_llama):  # noqa: F811
    """Two token-id rows through adapter a1 and a text row through the base model, greedy: each row's ``logprobs``
    are its new tokens' (three alternatives each) and its ``prompt_logprobs`` its prompt's (null first, then two
    alternatives each), PyTorch's teacher-forced numbers for that adapter; a request that asks neither has neither."""
    rows = [[1, 40, 41, 42, 43], [1, 50, 7]]
    status, body = call(server.url + "/v1/generate", "POST", {"input": rows, "adapter": "a1", "max_new_tokens": 4,
                                                              "logprobs": 3, "prompt_logprobs": 2})
    assert status == 200, body
    status, text = call(server.url + "/v1/generate", "POST", {"input": "the water is", "max_new_tokens": 3,
                                                              "logprobs": 0, "prompt_logprobs": 0})
    assert status == 200, text
    cases = [(item, row, "a1", 3, 2) for item, row in zip(body["data"], rows, strict=True)]
    status, ids = call(server.url + "/tokenize", "POST", {"model": "tiny-llama", "prompt": "the water is"})
    assert status == 200, ids
    cases.append((text["data"][0], ids["tokens"], None, 0, 0))
    for item, prompt, adapter, top, prompt_top in cases:
        tokens = item["token_ids"]
        full = [*prompt, *tokens]
        lp = torch.log_softmax(row_alone(torch_llama, full, adapter)[:-1].double(), dim=-1)
        assert tokens == [int(lp[len(prompt) - 1 + j].argmax()) for j in range(len(tokens))]  # greedy, PyTorch's
        assert len(item["logprobs"]) == len(tokens)
        check_entries(item["logprobs"], lp, full, len(prompt), top)
        assert len(item["prompt_logprobs"]) == len(prompt) and item["prompt_logprobs"][0] is None
        check_entries(item["prompt_logprobs"][1:], lp, full, 1, prompt_top)
    status, plain = call(server.url + "/v1/generate", "POST", {"input": rows, "adapter": "a1", "max_new_tokens": 4})
    assert status == 200 and [d["token_ids"] for d in plain["data"]] == [d["token_ids"] for d in body["data"]]
    assert all("logprobs" not in d and "prompt_logprobs" not in d for d in plain["data"])


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_generate_logprobs_take_the_openai_bound_and_refuse_the_rest_by_name(server, field):  # noqa: F811
    """0..20 alternatives, as the OpenAI routes take (``MAX_LOGPROBS``): 20 lists twenty; anything else is the native
    route's 422 naming the field, before any work."""
    status, body = call(server.url + "/v1/generate", "POST", {"input": [[1, 5, 6]], "max_new_tokens": 2, field: 20})
    assert status == 200, body
    assert all(len(e["top_logprobs"]) == 20 for e in body["data"][0][field] if e is not None)
    for value in (21, -1, True, 1.5, "3"):
        status, body = call(server.url + "/v1/generate", "POST", {"input": [[1, 5]], field: value})
        assert status == 422, (value, body)
        assert field in body["error"]["message"], (value, body)
