"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) from the continuous-batching engine: a scoring
prefill run in chunks (``max_score_logits`` small enough that each run keeps one or two positions' logits) next to a
row decoding, against PyTorch's teacher-forced log_softmax of each row alone (the tiny Llama, its adapters loaded).
"""

from __future__ import annotations

import asyncio
import sys
import threading
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


def check_scores(result, prompt: list[int], adapter: str | None, top: int) -> None:
    lp = teacher_forced(prompt, adapter)
    assert [s.token_id for s in result.prompt_logprobs] == prompt[1:]
    for t, item in enumerate(result.prompt_logprobs, start=1):
        assert item.logprob == pytest.approx(lp[t - 1, prompt[t]].item(), abs=ATOL), (adapter, t)
        assert [i for i, _ in item.top] == torch.topk(lp[t - 1], top).indices.tolist()


class PrefillGate:
    """An engine observer that pauses the engine's thread after the first prefill run (a chunk) once ``rows`` rows
    have started, until ``release``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.rows = 1
        self.paused, self.release = threading.Event(), threading.Event()

    def __call__(self, event: str, values) -> None:
        self.events.append((event, dict(values)))
        started = sum(e == "started" for e, _ in self.events)
        if event == "prefill" and started == self.rows and not self.paused.is_set():
            self.paused.set()
            self.release.wait(TIMEOUT)
            self.release.clear()


def test_a_row_preempted_while_its_prompt_is_scored_is_scored_again_whole(llama):  # noqa: F811
    """Two scoring rows of one tenant fill the batch; while their prefill runs a chunk at a time, another tenant's row
    arrives and pre-empts one of them (fair share). The pre-empted row's partial scores are dropped: readmitted, its
    prompt is scored again from the start, and every row's prompt log-probabilities and tokens are PyTorch's."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    long_a, long_b, short = token_rows(3, seed=5, low=30, high=40)
    short = short[:5]
    gate = PrefillGate()

    async def main():
        engine = GenerationEngine(session, max_batch_rows=2, max_prefill_tokens=64, max_score_logits=VOCAB,
                                  preempt_wait_steps=0, observer=gate)
        await engine.start()
        try:
            params = SamplingParams(max_new_tokens=4, prompt_logprobs=1)
            first = [engine.submit(long_a, "a0", params)]
            assert await asyncio.to_thread(gate.paused.wait, TIMEOUT)  # long_a mid-prefill
            gate.paused.clear()
            gate.rows = 2
            first.append(engine.submit(long_b, "a0", params))
            gate.release.set()
            assert await asyncio.to_thread(gate.paused.wait, TIMEOUT)  # both mid-prefill: the batch is full
            gate.rows = 0  # no more pauses
            other = engine.submit(short, "a1", SamplingParams(max_new_tokens=2, prompt_logprobs=0))
            gate.release.set()
            return [await s.collect() for s in (*first, other)], [s.preemptions for s in (*first, other)]
        finally:
            gate.release.set()
            await engine.stop()

    results, preemptions = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert sum(preemptions[:2]) == 1 and preemptions[2] == 0  # one a0 row gave its place up mid-prefill
    assert any(e == "preempted" and v["generated_tokens"] == 0 for e, v in gate.events)
    for result, prompt, adapter, top, n in zip(results, (long_a, long_b, short), ("a0", "a0", "a1"), (1, 1, 0),
                                               (4, 4, 2), strict=True):
        check_scores(result, prompt, adapter, top)
        assert result.token_ids == greedy(prompt, adapter, n)


def test_a_row_removed_mid_prefill_never_drops_a_newcomer(llama):
    """A row removed while its prefill runs and no row decodes (what a pre-emption mid-prefill does) is remembered
    until the next step; a newcomer made meanwhile may be allocated where it was (the same ``id``): it joins and steps
    all the same (it was dropped silently, its stream never ending: the pre-emption test above hung 1 time in 4)."""
    import gc

    from bca_deploy.serving.decoding import DecodeBatch, DecodeRow

    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    snapshot = session.snapshot()
    for _ in range(10):
        batch = DecodeBatch(session)
        gone = DecodeRow([5, 6, 7, 8], "a0", snapshot)
        job = batch.start_prefill([gone], chunk_tokens=1)
        batch.prefill_chunk(job)
        batch.remove([gone])
        del gone, job  # the job held it too
        gc.collect()
        # CPython hands freed memory out again: one of these was where the removed row was (were it freed)
        newcomers = [DecodeRow([9, 10], "a1", snapshot) for _ in range(32)]
        logits, failures = batch.prefill(newcomers)
        assert not failures
        for row, values in zip(newcomers, logits, strict=True):
            row.next_token = int(values.argmax())
        rows, _, _ = batch.step()
        assert rows == newcomers


def test_prompt_logprobs_and_zero_new_tokens_are_checked_by_name():
    """``max_new_tokens`` 0 is a prompt scored alone: taken with ``prompt_logprobs``, refused without (nothing to
    run); ``prompt_logprobs`` is null or 0..20, as ``logprobs``."""
    assert SamplingParams(max_new_tokens=0, prompt_logprobs=0).max_new_tokens == 0
    for kwargs, field in (({"max_new_tokens": 0}, "max_new_tokens"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
                          ({"prompt_logprobs": True}, "prompt_logprobs")):
        with pytest.raises(SamplingParamsError) as caught:
            SamplingParams(**kwargs)
        assert caught.value.field == field, kwargs


def _count_scored_positions(monkeypatch) -> list[int]:
    """A list that gets the number of positions of every ``token_logprobs`` call the engine makes from now on."""
    import bca_deploy.serving.decoding as decoding

    scored_positions: list[int] = []
    real = decoding.token_logprobs

    def counting(logits, rows, tokens, tops):
        scored_positions.append(len(rows))
        return real(logits, rows, tokens, tops)

    monkeypatch.setattr(decoding, "token_logprobs", counting)
    return scored_positions


def test_a_prompts_choices_are_scored_once_and_share_pytorchs_numbers(llama, monkeypatch):  # noqa: F811
    """A request's four choices of one prompt (four rows of one group, sampling with their own seeds) join one scoring
    prefill, in chunks: the prompt's positions are scored once for them all (``token_logprobs`` gets each position
    once), not once per choice, and every choice gets PyTorch's numbers. The same prompt under another adapter, or
    asking another number of alternatives, is another distribution (or list): scored on its own."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = token_rows(1, seed=17, low=20, high=24)[0]
    scored_positions = _count_scored_positions(monkeypatch)
    group = object()
    jobs = [("a0", SamplingParams(max_new_tokens=3, do_sample=True, temperature=2.0, seed=j, prompt_logprobs=3), group)
            for j in range(4)]
    jobs += [("a1", SamplingParams(max_new_tokens=1, prompt_logprobs=3), None),
             ("a0", SamplingParams(max_new_tokens=0, prompt_logprobs=1), None)]

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8, max_score_logits=6 * 3 * VOCAB)
        await engine.start()
        try:
            streams = [engine.submit(prompt, adapter, params, group=g) for adapter, params, g in jobs]
            return [await s.collect() for s in streams], engine.prefills
        finally:
            await engine.stop()

    results, prefills = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert prefills > 3  # the scoring prefill ran in chunks
    # three distributions or lists (a0 top 3, a1 top 3, a0 top 1), each position of each once
    assert sum(scored_positions) == 3 * (len(prompt) - 1)
    for (adapter, params, _), result in zip(jobs, results, strict=True):
        check_scores(result, prompt, adapter, params.prompt_logprobs)
    assert len({tuple(r.token_ids) for r in results[:4]}) > 1  # the choices sampled apart all the same


@pytest.mark.parametrize("new_tokens", [0, 2])
def test_choices_admitted_in_later_steps_take_the_scores_of_the_first(llama, monkeypatch, new_tokens):  # noqa: F811
    """A request's four choices of one prompt on a batch of two rows: two are admitted (and scored once, together),
    the other two only when those end. They take the scores already made (the prompt is not scored again; with
    ``max_new_tokens`` 0 they end at admission, nothing run), each PyTorch's numbers; another request of the same
    prompt is scored on its own."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = token_rows(1, seed=29, low=12, high=16)[0]
    scored_positions = _count_scored_positions(monkeypatch)
    params = [SamplingParams(max_new_tokens=new_tokens, do_sample=True, seed=j, prompt_logprobs=2) for j in range(4)]

    async def main():
        engine = GenerationEngine(session, max_batch_rows=2)
        await engine.start()
        try:
            group = object()
            streams = [engine.submit(prompt, "a1", p, group=group) for p in params]
            results = [await s.collect() for s in streams]
            other = await engine.submit(prompt, "a1", params[0], group=object()).collect()
            return results, other, engine.prefills
        finally:
            await engine.stop()

    results, other, prefills = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    # the first two choices' prefill, choices 3 and 4's (to generate; not scoring), the other request's
    assert prefills == (3 if new_tokens else 2)  # with max_new_tokens 0, choices 3 and 4 run nothing
    assert sum(scored_positions) == 2 * (len(prompt) - 1)  # once for the request, once for the other request
    for result in (*results, other):
        check_scores(result, prompt, "a1", 2)
        assert result.completion_tokens == new_tokens and result.finish_reason == "length"


def test_each_choice_owns_the_prompt_scores_it_was_given(llama):  # noqa: F811
    """A request's four choices on a batch of two rows, the prompt alone asked (``max_new_tokens`` 0): the first two
    are scored, the other two take those scores. A stream's ``prompt_logprobs`` is its caller's list: the first
    choice's caller clearing its list (or putting vLLM's leading None in) emptied the lists of the two choices that
    took the scores, one list shared by three streams; now each is its own, every one PyTorch's."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = token_rows(1, seed=37, low=10, high=14)[0]

    async def main():
        engine = GenerationEngine(session, max_batch_rows=2)
        await engine.start()
        try:
            group = object()
            streams = [engine.submit(prompt, "a2", SamplingParams(max_new_tokens=0, prompt_logprobs=1), group=group)
                       for _ in range(4)]
            for stream in streams:
                await stream.collect()
            return streams
        finally:
            await engine.stop()

    streams = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    streams[0].prompt_logprobs.clear()
    streams[2].prompt_logprobs.insert(0, None)
    check_scores(streams[1], prompt, "a2", 1)
    check_scores(streams[3], prompt, "a2", 1)


def test_rows_ending_at_their_first_token_are_not_kept_until_a_step(llama):  # noqa: F811
    """A row that ends at its first token (``max_new_tokens`` 1, a prompt scored alone: every loglikelihood request of
    an evaluation harness) is prefilled and removed without a step. The batch kept it, and its past, until the next
    step: with no row decoding, every such request's row and past piled up. Now a prefilled row removed before it
    joins is let go at once; one removed beside a row of its prefill that stays goes at the next step, which runs the
    staying row alone, with PyTorch's greedy tokens."""
    import gc
    import weakref

    from bca_deploy.serving.decoding import DecodeBatch, DecodeRow

    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    snapshot = session.snapshot()
    batch = DecodeBatch(session)
    refs = []
    for k in range(6):
        row = DecodeRow([5, 6, 7 + k], "a0", snapshot)
        _, failures = batch.prefill([row])
        assert not failures
        batch.remove([row])
        refs.append(weakref.ref(row))
        del row
    gc.collect()
    assert all(r() is None for r in refs)  # neither the rows nor their past wait for a step that may not come
    prompt = [9, 10, 11]
    gone, staying = DecodeRow([5, 6, 8], "a0", snapshot), DecodeRow(prompt, "a1", snapshot)
    logits, failures = batch.prefill([gone, staying])
    assert not failures
    batch.remove([gone])
    tokens = [int(logits[1].argmax())]
    for _ in range(3):
        staying.next_token = tokens[-1]
        rows, logits, failures = batch.step()
        assert rows == [staying] and not failures
        tokens.append(int(logits[0].argmax()))
    assert tokens == greedy(prompt, "a1", 4)
