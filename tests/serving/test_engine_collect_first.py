"""``GenerationStream.collect()`` gathers a row's log-probabilities from its events (the stream keeps none of them):
called after some events were taken (the stream iterated first, or collected twice), it gave a result listing fewer
log-probabilities than tokens, silently. It now refuses with a ``RuntimeError`` saying to collect once instead of
iterating; a stream that asked none still collects whole after being iterated (its tokens and text are the stream's).
The reference for the whole result is the same row collected from its first event (greedy, so the same tokens)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import banks, llama  # noqa: F401 - module fixtures

from bca_deploy.serving import MultiAdapterSession
from bca_deploy.serving.engine import GenerationEngine, SamplingParams

PROMPT = [1, 40, 41, 42]


def test_collect_after_events_were_taken_refuses_instead_of_a_short_answer(llama):  # noqa: F811
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    scored = SamplingParams(max_new_tokens=5, logprobs=2, ignore_eos=True)
    plain = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def main():
        engine = GenerationEngine(session, max_batch_rows=4)
        await engine.start()
        try:
            whole = await engine.submit(PROMPT, "a0", scored).collect()
            iterated = engine.submit(PROMPT, "a0", scored)
            await iterated.__anext__()
            with pytest.raises(RuntimeError, match=r"collect\(\) reads the stream from its first event"):
                await iterated.collect()
            iterated.cancel()
            twice = engine.submit(PROMPT, "a0", scored)
            await twice.collect()
            with pytest.raises(RuntimeError, match="call collect\\(\\) once"):
                await twice.collect()
            no_logprobs = engine.submit(PROMPT, "a0", plain)
            await no_logprobs.__anext__()
            return whole, await no_logprobs.collect()
        finally:
            await engine.stop()

    whole, rest = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(whole.logprobs) == len(whole.token_ids) == 5 and len(whole.text_offsets) == 5
    assert rest.token_ids == whole.token_ids and rest.text == whole.text and rest.logprobs is None
