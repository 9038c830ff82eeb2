"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) from the continuous-batching engine: a scoring
prefill run in chunks (``max_score_logits`` small enough that each run keeps one or two positions' logits) next to a
row decoding, against PyTorch's teacher-forced log_softmax of each row alone (the tiny Llama, its adapters loaded).
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
from bca_deploy.serving.decoding import SamplingParamsError
from bca_deploy.serving.engine import GenerationEngine, SamplingParams

ATOL = 1e-4
TIMEOUT = 60.0
VOCAB = 128


def teacher_forced(ids: list[int], adapter: str | None) -> torch.Tensor:
    return torch.log_softmax(row_alone(torch_model("llama"), ids, adapter)[:-1].double(), dim=-1)


def greedy(prompt: list[int], adapter: str | None, n: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(row_alone(torch_model("llama"), [*prompt, *tokens], adapter)[-1].argmax()))
    return tokens


def test_chunked_scoring_prefills_next_to_a_decoding_row_equal_pytorchs(llama):
    """Three scoring rows of different lengths and adapters (one with ``max_new_tokens`` 0: the prompt alone) join
    while a row decodes; their prefill keeps at most two positions' logits per run (``max_score_logits``), so the
    scores cross many chunk boundaries and left padding. Each prompt token after the first has PyTorch's
    teacher-forced log-probability and top-k for its adapter; the generated tokens are PyTorch's greedy ones, and the
    row decoding beside them gets PyTorch's greedy tokens too (no scoring for it)."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    first, *prompts = token_rows(4, seed=91, low=4, high=12)
    jobs = [(prompts[0], "a0", SamplingParams(max_new_tokens=0, prompt_logprobs=3)),
            (prompts[1], "a2", SamplingParams(max_new_tokens=3, prompt_logprobs=0, logprobs=1)),
            (prompts[2], None, SamplingParams(max_new_tokens=2, prompt_logprobs=20))]
    gate = StepGate(steps=[1])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8, max_prefill_tokens=6, max_score_logits=2 * VOCAB,
                                  observer=gate)
        await engine.start()
        try:
            running = engine.submit(first, "a1", SamplingParams(max_new_tokens=10))
            await gate.paused()
            streams = [engine.submit(p, a, params) for p, a, params in jobs]
            gate.go()
            results = [await s.collect() for s in streams]
            return results, await running.collect(), engine.prefills
        finally:
            gate.go()
            await engine.stop()

    results, running, prefills = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert prefills > sum(len(p) for p in prompts) // 2  # the scoring prefill really ran in small chunks
    assert running.token_ids == greedy(first, "a1", 10) and running.prompt_logprobs is None
    for (prompt, adapter, params), result in zip(jobs, results, strict=True):
        assert result.token_ids == greedy(prompt, adapter, params.max_new_tokens)
        assert result.finish_reason == "length" and result.completion_tokens == params.max_new_tokens
        ids = [*prompt, *result.token_ids]
        lp = teacher_forced(ids, adapter)
        scores = result.prompt_logprobs
        assert scores is not None and [s.token_id for s in scores] == prompt[1:]
        for t, item in enumerate(scores, start=1):
            assert item.logprob == pytest.approx(lp[t - 1, prompt[t]].item(), abs=ATOL), (adapter, t)
            k = params.prompt_logprobs
            assert len(item.top) == k
            if k:
                values, best = torch.topk(lp[t - 1], k)
                assert [i for i, _ in item.top] == best.tolist()
                np.testing.assert_allclose([v for _, v in item.top], values.numpy(), atol=ATOL)
        if params.logprobs is not None:  # the generated tokens' as without prompt scoring
            assert [r.logprob for r in result.logprobs] == pytest.approx(
                [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(result.token_ids)], abs=ATOL)


def test_prompt_logprobs_and_zero_new_tokens_are_checked_by_name():
    """``max_new_tokens`` 0 is a prompt scored alone: taken with ``prompt_logprobs``, refused without (nothing to
    run); ``prompt_logprobs`` is null or 0..20, as ``logprobs``."""
    assert SamplingParams(max_new_tokens=0, prompt_logprobs=0).max_new_tokens == 0
    for kwargs, field in (({"max_new_tokens": 0}, "max_new_tokens"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
                          ({"prompt_logprobs": True}, "prompt_logprobs")):
        with pytest.raises(SamplingParamsError) as caught:
            SamplingParams(**kwargs)
        assert caught.value.field == field, kwargs
