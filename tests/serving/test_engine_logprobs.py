"""Log-probabilities of generated tokens (``SamplingParams.logprobs``) from the continuous-batching engine.

The reference is PyTorch: log_softmax of the tiny Llama's logits (its adapters loaded, each row alone, no padding)
at every position of the row's prompt + generated tokens, and ``torch.topk`` of it. Rows asking different numbers of
alternatives, rows asking none, and a sampled row with penalties share one running batch (a StepGate holds the
engine while they are submitted, so they are admitted together and decode next to a row already running).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import StepGate, banks, llama, row_alone, token_rows, torch_model  # noqa: F401

from bca_deploy.serving import MultiAdapterSession
from bca_deploy.serving.decoding import LOGPROB_FLOOR, SamplingParamsError, token_logprobs
from bca_deploy.serving.engine import GenerationEngine, SamplingParams

ATOL = 1e-4
TIMEOUT = 60.0


def reference(prompt: list[int], tokens: list[int], adapter: str | None) -> torch.Tensor:
    """log_softmax (float64) of PyTorch's logits for each generated token's position: (len(tokens), V)."""
    logits = row_alone(torch_model("llama"), [*prompt, *tokens], adapter)
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)].double(), dim=-1)


def check_against_torch(result, prompt: list[int], adapter: str | None, top: int) -> None:
    ref = reference(prompt, result.token_ids, adapter)
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) > 0
    for j, (token, item) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert item.token_id == token
        assert item.logprob == pytest.approx(ref[j, token].item(), abs=ATOL)
        assert len(item.top) == top
        if top:
            values, ids = torch.topk(ref[j], top)
            assert [t for t, _ in item.top] == ids.tolist(), (j, item.top, ids)
            np.testing.assert_allclose([lp for _, lp in item.top], values.numpy(), atol=ATOL)
            assert [lp for _, lp in item.top] == sorted((lp for _, lp in item.top), reverse=True)


def test_rows_of_one_batch_each_get_their_own_logprobs(llama):
    """Four rows admitted together next to a running row: greedy a0 with 20 alternatives, greedy base with none
    asked, a sampled a1 row with penalties, a temperature and min_tokens with 0 alternatives (its numbers are the raw
    distribution's, not the penalized one it samples from), greedy a2 with 3. Each row's log-probabilities are
    PyTorch's for that row alone; the row that asked none has none, and its tokens are PyTorch's greedy ones."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    first, *prompts = token_rows(5, seed=77, low=3, high=9)
    jobs = [(prompts[0], "a0", SamplingParams(max_new_tokens=6, logprobs=20)),
            (prompts[1], None, SamplingParams(max_new_tokens=6)),
            (prompts[2], "a1", SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.7, seed=3,
                                              repetition_penalty=1.3, presence_penalty=0.5, min_tokens=3,
                                              logprobs=0)),
            (prompts[3], "a2", SamplingParams(max_new_tokens=5, logprobs=3))]
    gate = StepGate(steps=[1])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8, observer=gate)
        await engine.start()
        try:
            running = engine.submit(first, "a1", SamplingParams(max_new_tokens=12, logprobs=1))
            await gate.paused()
            streams = [engine.submit(p, a, params) for p, a, params in jobs]
            gate.go()
            results = [await s.collect() for s in streams]
            return streams, results, await running.collect()
        finally:
            gate.go()
            await engine.stop()

    streams, results, running = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert all(s.batch_rows == 5 for s in streams)  # one batch: the running row and the four admitted together
    check_against_torch(results[0], prompts[0], "a0", 20)
    assert results[1].logprobs is None
    base = torch_model("llama")
    greedy = []
    for _ in range(len(results[1].token_ids)):  # PyTorch's greedy tokens of the row alone
        greedy.append(int(row_alone(base, [*prompts[1], *greedy], None)[-1].argmax()))
    assert results[1].token_ids == greedy
    check_against_torch(results[2], prompts[2], "a1", 0)
    check_against_torch(results[3], prompts[3], "a2", 3)
    check_against_torch(running, first, "a1", 1)


def test_token_logprobs_reads_only_the_rows_asked_and_floors_what_is_not_finite():
    logits = np.array([[0.0, 1.0, 2.0, 3.0], [5.0, -np.inf, np.nan, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    before = logits.copy()
    out = token_logprobs(logits, [2, 0], [1, 3], [2, 4])
    np.testing.assert_array_equal(np.isnan(logits), np.isnan(before))  # unchanged
    assert out[0].logprob == pytest.approx(np.log(0.25)) and out[0].top[0][0] == 0  # a tie: the lower id first
    ref = torch.log_softmax(torch.tensor(before[0], dtype=torch.float64), -1)
    assert [t for t, _ in out[1].top] == [3, 2, 1, 0]
    np.testing.assert_allclose([lp for _, lp in out[1].top], ref.flip(0).numpy(), atol=1e-12)
    # a row with a NaN: numbers that JSON can carry (the floor), never NaN
    nan_row = token_logprobs(logits, [1], [1], [2])[0]
    assert nan_row.logprob == LOGPROB_FLOOR and all(np.isfinite(lp) for _, lp in nan_row.top)


@pytest.mark.parametrize("value", [-1, 21, 2.0, True, "3"])
def test_logprobs_out_of_range_is_refused_by_name(value):
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(logprobs=value)
    assert caught.value.field == "logprobs" and "0 to 20" in str(caught.value)
