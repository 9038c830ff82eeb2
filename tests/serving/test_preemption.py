"""Pre-emption by recompute in continuous batching (``GenerationEngine``), on the tiny Llama bank.

When a tenant (the adapter a request names) holding fewer rows than its fair share has a row waiting and every
batch row is busy with rows that will not end soon, the engine pre-empts a row of the tenant holding the most:
its past is dropped, it waits at the front of the queue, and when readmitted its prompt + generated tokens are
prefilled again. What is checked here, by order and decode-step counts (never by time; the engine's thread is
paused at chosen steps by a blocking observer, ``StepGate``):

- a tenant's one short request no longer waits for another tenant's long rows to end: its first token comes
  right after the step at which it arrived;
- a pre-empted row's stream only pauses: greedy tokens stay PyTorch ``generate``'s for the row alone, seeded
  sampled tokens stay those of the same request never pre-empted, a stop string spanning the pre-emption point
  still stops, every token reaches the stream once, and its bank snapshot is kept across an unload/reload;
- no thrash: two tenants that each want every row settle at their fair shares after a bounded number of
  pre-emptions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import StepGate, banks, llama, row_alone, session, token_rows, torch_model  # noqa: F401
from test_engine import write_tokenizer

from bca_deploy.serving import MultiAdapterSession
from bca_deploy.serving.engine import GenerationEngine, SamplingParams

TIMEOUT = 60.0
LONG = 40  # the long rows' max_new_tokens (the tiny Llama's context is 64 positions; prompts are < 9 tokens)


def greedy(prompt, adapter: str | None, tokens) -> bool:
    """Whether ``tokens`` are the greedy continuation of ``prompt`` alone (no padding, no batch) through ``adapter``
    in PyTorch: each is the argmax of the logits of the row's sequence before it (one forward of the whole
    sequence; what ``generate(do_sample=False)`` gives, without its slow token-by-token loop)."""
    prompt, tokens = list(prompt), list(tokens)
    logits = row_alone(torch_model("llama"), prompt + tokens[:-1], adapter)
    return logits[len(prompt) - 1:].argmax(-1).tolist() == tokens


@pytest.fixture(scope="module")
def prompts(llama):
    """Prompts whose greedy continuations through a0, a1 and "extra" hold no end-of-sequence token in LONG tokens,
    so every row runs its ``max_new_tokens`` and the schedule is known."""
    session = MultiAdapterSession(llama["onnx"])
    session.register("extra", llama["extra"]["extra"])
    eos = session.eos_token_ids
    candidates = token_rows(40, seed=90, low=3, high=9)
    outs = [session.generate(candidates, [a] * len(candidates), max_new_tokens=LONG) for a in ("a0", "a1", "extra")]
    found = [p for i, p in enumerate(candidates) if not any(eos & set(out[i]) for out in outs)]
    if len(found) < 14:
        pytest.skip("not enough prompts without an end-of-sequence token")
    return found[:14]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


@contextlib.asynccontextmanager
async def engine_of(session, observer, **kwargs):
    engine = GenerationEngine(session, observer=observer, **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        if isinstance(observer, StepGate):
            observer.go()
        await engine.stop()


async def events_of(stream) -> list:
    return [event async for event in stream]


def pre_empted(gate: StepGate, streams) -> list:
    """The streams whose rows were pre-empted, checked against the observer's events."""
    events = gate.of("preempted")
    assert events, "no row was pre-empted"
    victims = [s for s in streams if getattr(s, "preemptions", 0)]
    assert sum(s.preemptions for s in victims) == len(events)
    return victims


# ---- the waiting tenant is served within steps, and the pre-empted rows' tokens do not change ----------------


def test_a_short_request_of_another_tenant_gets_a_row_at_once_and_the_preempted_row_keeps_its_tokens(session,
                                                                                                      prompts):
    """Tenant A (a1) holds all 4 rows with LONG-token generations; tenant B (a0) sends one 4-token request after
    step 1. B's fair share is 2 of 4 rows: A's row cheapest to recompute (the shortest prompt; ties: the latest
    admitted) is pre-empted, B is prefilled before step 2 (without pre-emption: after step LONG - 1). The
    pre-empted row resumes when B ends, and every row's tokens stay PyTorch's for the row alone."""
    gate = StepGate(steps=[1])

    async def main():
        async with engine_of(session, gate, max_batch_rows=4) as engine:
            heavy = [engine.submit(p, "a1", SamplingParams(max_new_tokens=LONG)) for p in prompts[:4]]
            await gate.paused()  # A's 4 rows run
            light = engine.submit(prompts[4], "a0", SamplingParams(max_new_tokens=4))
            gate.go()
            events = await asyncio.gather(*(events_of(s) for s in [*heavy, light]))
            return heavy, light, events, engine.stats()

    heavy, light, events, stats = run(main())
    assert gate.steps_before("first_token", "a0") == 1  # B's prefill ran right after the step it arrived at
    for stream, got in zip([*heavy, light], events, strict=True):
        new = stream.params.max_new_tokens
        assert [e.token_id for e in got] == stream.token_ids and greedy(stream.prompt_ids, stream.adapter,
                                                                         stream.token_ids)
        assert stream.finish_reason == "length" and stream.completion_tokens == new
    (victim,) = pre_empted(gate, heavy)
    (event,) = gate.of("preempted")
    assert victim is min(heavy, key=lambda s: (len(s.prompt_ids), -heavy.index(s)))
    assert event["adapter"] == "a1" and event["generated_tokens"] == 2  # its prefill's token and step 1's
    assert event["recompute_tokens"] == len(victim.prompt_ids) + 2
    assert stats["preemptions"] == 1 and not light.preemptions
    # no second first token (nor admission) for the resumed row; its completion counts every token once
    assert len(gate.of("first_token")) == len(gate.of("started")) == 5
    assert sorted(v["completion_tokens"] for v in gate.of("finished")) == [4, LONG, LONG, LONG, LONG]
    # the resumed row's recompute was prefilled (its prompt + generated tokens), and its gap was observed there
    assert any(v["tokens"] >= event["recompute_tokens"] and v["inter_token_s"] for v in gate.of("prefill"))
    assert victim.first_token_at < light.first_token_at < light.finished_at < victim.finished_at


def test_a_preempted_sampled_row_draws_the_same_tokens_as_never_preempted(session, prompts):
    """Seeded sampled rows of tenant A: one is pre-empted for tenant B's request and resumed; each row's tokens are
    those of the same requests run without B (no pre-emption), and of ``MultiAdapterSession.generate``."""
    params = [SamplingParams(max_new_tokens=30, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, seed=20 + i)
              for i in range(4)]

    async def main(with_b: bool):
        gate = StepGate(steps=[1])
        async with engine_of(session, gate, max_batch_rows=4) as engine:
            heavy = [engine.submit(p, "a1", q) for p, q in zip(prompts[:4], params)]
            await gate.paused()
            light = [engine.submit(prompts[4], "a0", SamplingParams(max_new_tokens=3))] if with_b else []
            gate.go()
            await asyncio.gather(*(s.collect() for s in [*heavy, *light]))
            return heavy, gate

    alone, alone_gate = run(main(False))
    together, gate = run(main(True))
    assert not alone_gate.of("preempted")
    (victim,) = pre_empted(gate, together)
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]
    i = together.index(victim)
    p = params[i]
    assert session.generate([prompts[i]], ["a1"], max_new_tokens=30, do_sample=True, temperature=p.temperature,
                            top_k=p.top_k, top_p=p.top_p, seed=p.seed)[0] == victim.token_ids
    assert not greedy(prompts[i], "a1", victim.token_ids)  # it really samples


# ---- stop strings, one delivery per token -------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_session(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt-text") / "onnx"
    shutil.copytree(llama["onnx"], root)
    write_tokenizer(root)
    return MultiAdapterSession(root)


def test_a_stop_string_spanning_the_preemption_point_stops_the_row(text_session, prompts):
    """The pre-empted row's stop string begins in text sent before the pre-emption and ends in text generated
    after it: the row ends there, its text cut before it as without pre-emption, each token streamed once."""
    session = text_session

    async def main(stop_of):
        gate = StepGate(steps=[2])
        async with engine_of(session, gate, max_batch_rows=4) as engine:
            heavy = [engine.submit(p, "a1", SamplingParams(max_new_tokens=LONG, stop=stop_of(i)))
                     for i, p in enumerate(prompts[:4])]
            await gate.paused()
            light = engine.submit(prompts[4], "a0", SamplingParams(max_new_tokens=6))
            gate.go()
            events = await asyncio.gather(*(events_of(s) for s in [*heavy, light]))
            return heavy, light, events, gate

    heavy, _, _, gate = run(main(lambda i: ()))
    (victim,) = pre_empted(gate, heavy)
    (event,) = gate.of("preempted")
    g = event["generated_tokens"]  # tokens sent before the pre-emption
    i = heavy.index(victim)
    full = victim.text
    assert full == session.decode(victim.token_ids) and greedy(prompts[i], "a1", victim.token_ids)
    before = len(session.decode(victim.token_ids[:g]))
    # a 3-character stop string across the boundary, first found there
    stop = next(full[k:k + 3] for k in (before - 1, before - 2) if 0 <= k and full.find(full[k:k + 3]) == k
                and full[k:k + 3].isprintable())
    cut = full.index(stop)
    assert cut < before < cut + len(stop)

    heavy, light, events, gate = run(main(lambda j: (stop,) if j == i else ()))
    stopped = heavy[i]
    assert [s.preemptions for s in heavy] == [int(j == i) for j in range(4)]
    assert gate.of("preempted")[0]["generated_tokens"] == g  # the same schedule as without the stop string
    n = next(n for n in range(1, LONG + 1) if stop in session.decode(victim.token_ids[:n]))
    assert n > g  # the stop string was completed by a token generated after the pre-emption
    assert stopped.finish_reason == "stop" and stopped.text == full[:cut]
    assert stopped.token_ids == victim.token_ids[:n] and stopped.completion_tokens == n
    for stream, got in zip([*heavy, light], events, strict=True):  # every token exactly once, in order
        assert [e.token_id for e in got] == stream.token_ids
        assert "".join(e.text for e in got) == stream.text
    assert all(stop not in e.text for e in events[i])


# ---- the bank snapshot of a pre-empted row ---------------------------------------------------------------------


def test_a_row_preempted_while_its_adapter_is_unloaded_and_reloaded_finishes_with_its_own_weights(llama, prompts):
    """Tenant A ("extra", loaded at run time) holds every row; B's request pre-empts one. While that row waits,
    "extra" is unloaded (the engine sees the bank without it at its next step: the waiting row is not failed as a
    row queued for an unloaded adapter would be), then loaded again with other weights. The row resumes on the
    bank snapshot it started with: PyTorch's tokens of the old "extra"; a new request for "extra" gets the new
    weights."""
    session = MultiAdapterSession(llama["onnx"])
    session.register("extra", llama["extra"]["extra"])
    gate = StepGate(steps=[1, 2, 3])

    async def main():
        async with engine_of(session, gate, max_batch_rows=4) as engine:
            heavy = [engine.submit(p, "extra", SamplingParams(max_new_tokens=30)) for p in prompts[:4]]
            await gate.paused()  # after step 1
            light = engine.submit(prompts[4], "a0", SamplingParams(max_new_tokens=6))
            gate.go()
            await gate.paused()  # after step 2: one of A's rows is pre-empted and waits
            waiting = engine.stats()["queued_rows"]
            preempted = [s for s in heavy if getattr(s, "preemptions", 0)]
            await asyncio.to_thread(session.unregister, "extra")
            gate.go()
            await gate.paused()  # after step 3: the engine has run a step on the bank without "extra"
            await asyncio.to_thread(session.register, "extra", llama["extra"]["peftish"])
            newer = engine.submit(prompts[5], "extra", SamplingParams(max_new_tokens=6))
            gate.go()
            results = await asyncio.gather(*(s.collect() for s in [*heavy, light, newer]))
            return heavy, light, newer, results, waiting, preempted

    heavy, light, newer, results, waiting, preempted = run(main())
    assert len(preempted) == 1 and waiting == 1 and len(gate.of("preempted")) == 1
    assert not gate.of("failed")
    for stream, result in zip(heavy, results[:4], strict=True):
        assert result.finish_reason == "length" and len(result.token_ids) == 30
        assert greedy(stream.prompt_ids, "extra", result.token_ids)
    assert greedy(prompts[4], "a0", light.token_ids)
    # "extra" now holds peftish's weights
    assert greedy(prompts[5], "peftish", newer.token_ids) and not greedy(prompts[5], "extra", newer.token_ids)
    assert preempted[0].finished_at > light.finished_at  # it resumed after the unload and the reload


def test_a_row_cancelled_while_preempted_ends_at_once(session, prompts):
    """A pre-empted row whose client goes away ends (cancelled) without running again; the rows around go on."""
    gate = StepGate(steps=[1, 2])

    async def main():
        async with engine_of(session, gate, max_batch_rows=4) as engine:
            heavy = [engine.submit(p, "a1", SamplingParams(max_new_tokens=LONG)) for p in prompts[:4]]
            await gate.paused()
            light = engine.submit(prompts[4], "a0", SamplingParams(max_new_tokens=4))
            gate.go()
            await gate.paused()  # after step 2: one of A's rows waits, pre-empted
            (victim,) = [s for s in heavy if getattr(s, "preemptions", 0)]
            # its 2 tokens (the prefill's, step 1's) are made; when steps are slow (OVERLAP_MIN_STEP_S) the engine
            # hands step 1's over during the next run, and the loop may not have delivered it yet
            for _ in range(1000):
                if len(victim.token_ids) >= 2:
                    break
                await asyncio.sleep(0.01)
            sent = list(victim.token_ids)
            victim.cancel()
            assert engine.stats()["queued_rows"] == 0
            gate.go()
            await asyncio.gather(*(s.collect() for s in heavy if s is not victim), light.collect())
            return heavy, victim, sent

    heavy, victim, sent = run(main())
    assert victim.finish_reason == "cancelled" and victim.token_ids == sent and len(sent) == 2
    cancelled = [v for v in gate.of("finished") if v["finish_reason"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["completion_tokens"] == 2
    for stream in heavy:
        if stream is not victim:
            assert len(stream.token_ids) == LONG and greedy(stream.prompt_ids, "a1", stream.token_ids)
    # it never ran again: every later step ran the 3 other rows of A and B's (then A's 3 alone)
    assert all(v["rows"] <= 4 for v in gate.of("step")) and len(gate.of("started")) == 5


# ---- no thrash ---------------------------------------------------------------------------------------------------


def test_two_tenants_wanting_every_row_settle_at_their_shares(session, prompts):
    """Tenants A (a1) and B (a0) each send 6 rows of 16-26 tokens to a 4-row batch; B's arrive after A's 4 run.
    The rule: only a tenant above its fair share (4 // 2 = 2 rows) loses rows, only to one below it, and rows that
    free go to the tenant holding fewer. So B's arrival pre-empts exactly 2 of A's rows (at most one fair share,
    whatever the rows' lengths), and from then on, while both tenants have rows waiting, each holds exactly 2 at
    every step. Every row's tokens stay PyTorch's."""
    rows = 4
    gate = StepGate(steps=[1])
    held: list[tuple[collections.Counter, collections.Counter]] = []  # per step: rows it ran, rows waiting after it
    ended = collections.Counter()  # rows that ended in this step (they ran in it, and are no longer running)
    engine_box = []

    def observer(event, values):  # the engine's thread, between its runs
        if event == "finished":
            ended[values["adapter"]] += 1
        elif event == "prefill":
            ended.clear()
        elif event == "step":
            engine = engine_box[0]
            held.append((collections.Counter(r.adapter for r in engine._running) + ended,
                         collections.Counter(r.adapter for r in engine._waiting)))
            ended.clear()
        gate(event, values)

    lengths = [16 + 2 * i for i in range(6)]

    async def main():
        engine = GenerationEngine(session, max_batch_rows=rows, observer=observer)
        engine_box.append(engine)
        await engine.start()
        try:
            a = [engine.submit(p, "a1", SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[:6], lengths)]
            await gate.paused()
            b = [engine.submit(p, "a0", SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[6:12], lengths)]
            gate.go()
            await asyncio.gather(*(s.collect() for s in [*a, *b]))
            return a, b
        finally:
            gate.go()
            await engine.stop()

    a, b = run(main())
    both_waiting = [running for running, waiting in held[1:] if waiting["a0"] and waiting["a1"]]
    assert len(both_waiting) >= 10
    assert all(running == {"a0": 2, "a1": 2} for running in both_waiting), both_waiting
    preempted = gate.of("preempted")
    assert 0 < len(preempted) <= rows // 2 and {v["adapter"] for v in preempted} == {"a1"}
    assert not any(s.preemptions for s in b) and sum(s.preemptions for s in a) == len(preempted)
    for stream in [*a, *b]:
        assert len(stream.token_ids) == stream.params.max_new_tokens
        assert greedy(stream.prompt_ids, stream.adapter, stream.token_ids)


# ---- the settings ------------------------------------------------------------------------------------------------


def test_preemption_can_be_turned_off_and_its_settings_are_checked(session, prompts):
    """``preempt=False``: a running row is never pre-empted (B waits for A's first row to end); a bad
    ``preempt_wait_steps`` or ``preempt`` is refused naming the setting."""
    from bca_deploy.errors import ServingError

    with pytest.raises(ServingError, match="preempt_wait_steps: must be an integer >= 0, got -1"):
        GenerationEngine(session, preempt_wait_steps=-1)
    with pytest.raises(ServingError, match="preempt: must be true or false, got 'yes'"):
        GenerationEngine(session, preempt="yes")
    gate = StepGate(steps=[1])

    async def main():
        async with engine_of(session, gate, max_batch_rows=2, preempt=False) as engine:
            heavy = [engine.submit(p, "a1", SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[:2], (12, 20))]
            await gate.paused()
            light = engine.submit(prompts[4], "a0", SamplingParams(max_new_tokens=2))
            gate.go()
            await asyncio.gather(*(s.collect() for s in [*heavy, light]))

    run(main())
    assert not gate.of("preempted") and gate.steps_before("first_token", "a0") == 11


@pytest.mark.parametrize("preempt", [True, False])
def test_the_server_preempts_as_its_options_say_and_counts_it(llama, prompts, preempt):
    """``serve --preempt/--no-preempt --preempt-wait-steps``: the options reach the engine, and a pre-emption shows in
    ``/metrics`` (``bca_preemptions_total`` by the tenant that lost the row, the recomputed tokens) while every
    answer stays its row's greedy tokens. The engine is paused after its first decode step (its observer chained
    with a StepGate) until the second tenant's request is queued, so the schedule does not depend on timing."""
    import threading
    import urllib.request

    from http_helpers import call
    from prometheus_client.parser import text_string_to_metric_families

    from bca_deploy.serving.http import ServerThread, build

    app = build(llama["onnx"], threads=1, max_batch_rows=2, preempt=preempt, preempt_wait_steps=0)
    engine = app.state.server.engine
    assert (engine.preempt, engine.preempt_wait_steps) == (preempt, 0)
    gate, served = StepGate(steps=(1,)), engine.observer
    engine.observer = lambda event, values: (served(event, values), gate(event, values))
    url = None
    answers: dict[str, tuple[int, dict]] = {}

    def ask(name, body):
        answers[name] = call(url + "/v1/generate", "POST", body)

    with ServerThread(app, startup_timeout=60) as server:
        url = server.url
        long = threading.Thread(target=ask, args=("a0", {"input": prompts[:2], "adapter": "a0", "max_new_tokens": LONG}))
        long.start()
        asyncio.run(gate.paused())  # a0's two rows hold both batch rows, 39 tokens each still to come
        short = threading.Thread(target=ask, args=("a1", {"input": [prompts[2]], "adapter": "a1", "max_new_tokens": 2}))
        short.start()
        for _ in range(600):  # until a1's row waits in the engine's queue
            if engine.stats()["queued_rows"]:
                break
            threading.Event().wait(0.01)
        gate.go()
        long.join(TIMEOUT)
        short.join(TIMEOUT)
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    for name, prompt_rows in (("a0", prompts[:2]), ("a1", [prompts[2]])):
        status, answer = answers[name]
        assert status == 200, answer
        for prompt, item in zip(prompt_rows, answer["data"], strict=True):
            assert greedy(prompt, name, item["token_ids"]), (name, prompt)
    lost = {s.labels["adapter"]: s.value for s in families["bca_preemptions"].samples
            if s.name == "bca_preemptions_total"}
    recomputed = [s.value for s in families["bca_preemption_recompute_tokens"].samples
                  if s.name == "bca_preemption_recompute_tokens_total"]
    if preempt:
        # the row cheapest to recompute: the shorter prompt and the tokens it had when the engine paused
        assert lost == {"a0": 1.0} and recomputed[0] > min(map(len, prompts[:2])), (lost, recomputed)
    else:
        assert not lost.get("a0") and recomputed == [0.0], (lost, recomputed)
