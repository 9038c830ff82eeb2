"""Fairness between requests and tenants in continuous batching (``GenerationEngine``), on the tiny Llama bank.

A tenant is the adapter a request names. What the scheduler guarantees, asserted by order and by decode-step
counts (never by time; the engine's thread is paused at chosen steps by a blocking observer, as in
``test_engine.py``):

- a short request that arrives while one big request holds every batch row takes the first row that frees,
  not a row after all of the big request's waiting rows;
- a short request of one tenant that arrives while another tenant holds every batch row *and* has many
  single-row requests waiting (many concurrent streams) also takes the first row that frees: free rows go to
  the tenant holding the fewest rows first, then to the request holding the fewest, then the earliest;
- requests of one tenant still take their turns request by request (the earliest first among equals).

Pre-emption (a tenant below its fair share taking rows from one above it) is ``test_preemption.py``'s: here the
running rows end within ``preempt_wait_steps``, which the engine waits for rather than pre-empt. What neither
guarantees: each step is one run over every row, so a heavy neighbour makes each of its steps longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import StepGate, banks, llama, session, token_rows  # noqa: F401

from bca_deploy.serving.engine import GenerationEngine, SamplingParams

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def prompts(session):
    """Prompts whose greedy continuations (a0, a1, a2) hold no end-of-sequence token in their first 12 tokens, so
    every row runs exactly its ``max_new_tokens`` and the step at which each row frees is known."""
    eos = session.eos_token_ids
    candidates = token_rows(80, seed=5)
    found = []
    for prompt in candidates:
        outs = session.generate([prompt] * 3, ["a0", "a1", "a2"], max_new_tokens=12)
        if not any(eos & set(map(int, out)) for out in outs):
            found.append(prompt)
        if len(found) == 16:
            return found
    pytest.skip("not enough prompts without an end-of-sequence token")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


@contextlib.asynccontextmanager
async def gated_engine(session, gate: StepGate, max_batch_rows: int):
    """A running engine observed (and paused) by ``gate``; on the way out the gate is opened and the engine stopped."""
    engine = GenerationEngine(session, max_batch_rows=max_batch_rows, observer=gate)
    await engine.start()
    try:
        yield engine
    finally:
        gate.go()
        await engine.stop()


def test_a_short_request_takes_the_first_free_row_while_one_big_request_holds_the_batch(session, prompts):
    """Tenant A: one request of 12 rows (a1, 8 new tokens each) on a 4-row batch; tenant B (a0, 4 tokens) arrives
    after the first step. B's first token comes as soon as A's first wave of rows ends (their first token came
    from the prefill, the 7 others from decode steps 1-7; B's first from its prefill right after step 7), not
    after A's three waves (21 steps); B's 3 other tokens take the next 3 steps."""
    gate = StepGate(steps=[1])

    async def main():
        async with gated_engine(session, gate, max_batch_rows=4) as engine:
            big = object()
            heavy = [engine.submit(p, "a1", SamplingParams(max_new_tokens=8), group=big) for p in prompts[:12]]
            await gate.paused()  # 4 of A's rows run, 8 wait
            light = engine.submit(prompts[12], "a0", SamplingParams(max_new_tokens=4))
            gate.go()
            await asyncio.gather(*(s.collect() for s in [*heavy, light]))
            return heavy, light

    heavy, light = run(main())
    assert light.completion_tokens == 4 and all(s.completion_tokens == 8 for s in heavy)
    assert gate.steps_before("first_token", "a0") == 7
    assert gate.steps_before("finished", "a0") == 7 + 3 - 1  # its last token's step is not counted yet
    waiting = sorted(heavy, key=lambda s: s.started_at)[4:]
    assert all(light.started_at <= s.started_at for s in waiting)


def test_a_tenant_of_many_streams_does_not_queue_another_tenant_behind_them(session, prompts):
    """Tenant A: many single-row requests (many concurrent streams; a1, 8 new tokens): 4 run, 8 wait; then tenant
    B (a0) sends one short request. A's waiting requests each hold no row, as B's does, and arrived first;
    the first row that frees still goes to B (its tenant holds no row, A's holds 4): B's first token comes
    right after step 7, when A's first rows end, not after A's two further waves (21 steps) as
    first-come-first-served among requests would give."""
    gate = StepGate(steps=[1])

    async def main():
        async with gated_engine(session, gate, max_batch_rows=4) as engine:
            heavy = [engine.submit(p, "a1", SamplingParams(max_new_tokens=8)) for p in prompts[:4]]
            await gate.paused()  # A's 4 rows run
            heavy += [engine.submit(p, "a1", SamplingParams(max_new_tokens=8)) for p in prompts[4:12]]
            light = engine.submit(prompts[12], "a0", SamplingParams(max_new_tokens=4))
            gate.go()
            await asyncio.gather(*(s.collect() for s in [*heavy, light]))
            return heavy, light

    heavy, light = run(main())
    assert light.completion_tokens == 4 and all(s.completion_tokens == 8 for s in heavy)
    assert gate.steps_before("first_token", "a0") == 7
    assert all(light.started_at <= s.started_at for s in heavy[4:])


def test_free_rows_alternate_between_tenants_and_requests_of_one_tenant_go_in_arrival_order(session, prompts):
    """Two tenants each with 4 single-row requests waiting behind a full 2-row batch (held by a third tenant):
    rows go to the tenants in turn (the one holding fewer rows first) and, within a tenant, request by request in
    arrival order."""
    gate = StepGate(steps=[1])

    async def main():
        async with gated_engine(session, gate, max_batch_rows=2) as engine:
            first = [engine.submit(p, "a2", SamplingParams(max_new_tokens=3)) for p in prompts[:2]]
            await gate.paused()
            a = [engine.submit(p, "a1", SamplingParams(max_new_tokens=3)) for p in prompts[2:6]]
            b = [engine.submit(p, "a0", SamplingParams(max_new_tokens=3)) for p in prompts[6:10]]
            gate.go()
            await asyncio.gather(*(s.collect() for s in [*first, *a, *b]))
            return a, b

    a, b = run(main())
    order = sorted([*a, *b], key=lambda s: (s.started_at, (a + b).index(s)))
    # admitted two at a time: one of each tenant per pair, each tenant's requests in their arrival order
    for i in range(0, 8, 2):
        assert {order[i].adapter, order[i + 1].adapter} == {"a0", "a1"}
    assert [s for s in order if s.adapter == "a1"] == a
    assert [s for s in order if s.adapter == "a0"] == b
