"""Continuous batching (``GenerationEngine``, ``DecodeBatch``) on tiny adapter-bank decoders, checked against PyTorch.

Banks: the tiny Llama of ``serving_helpers.py`` (three exported adapters + fitting extras), a tiny GPT-2
exported here (absolute position embeddings, so wrong position ids would show), and a copy of the Llama
export with a small byte-fallback tokenizer (for text, incremental detokenization and stop strings).

References are independent of the serving code: PyTorch ``model.generate(do_sample=False)`` of each
prompt **alone** (no padding) under :func:`bca_deploy.inject.mixed_adapters`, and the PyTorch logits of
each row's whole sequence alone (``set_adapter``; the layers' non-routing path).

Timing never decides an assertion: rows join mid-decoding because the test pauses the engine's thread
at chosen steps (a blocking observer, ``StepGate``) and submits while it waits.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
from exporters_helpers import build_model
from serving_helpers import (  # noqa: F401
    VOCAB,
    StepGate,
    banks,
    row_alone,
    run_in_waves,
    run_shapes,
    save_tiny_adapter,
    token_rows,
    torch_model,
)

from bca_deploy import load_adapter
from bca_deploy.errors import ContextLengthError, ServingError, UnknownAdapterError
from bca_deploy.inject import mixed_adapters
from bca_deploy.serving import MultiAdapterSession
from bca_deploy.serving.decoding import DecodeBatch, DecodeRow, Sampler, choose_tokens
from bca_deploy.serving.engine import (
    EngineOverloadedError,
    GenerationEngine,
    SamplingParams,
    SamplingParamsError,
    TokenEvent,
    PROMPT_CONTEXT_TOKENS,
    _Detokenizer,
)

TIMEOUT = 60.0
ATOL = 1e-4
GPT2_EXPORTED = {"g0": (["c_attn"], 8, 30), "g1": (["c_attn", "c_fc"], 8, 31), "g2": (["c_proj"], 16, 32)}


# ---- banks and references ------------------------------------------------------------------------------------


_ARTS: dict[str, dict] = {}  # bank name -> artefacts, for the references


@pytest.fixture(scope="module")
def llama(banks):
    _ARTS["llama"] = banks("llama")
    return _ARTS["llama"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from bca_deploy.exporters import export

    root = tmp_path_factory.mktemp("engine-gpt2")
    build_model("gpt2").save_pretrained(root / "model")
    adapters = {n: save_tiny_adapter("gpt2", root / "adapters" / n, t, p, s) for n, (t, p, s) in GPT2_EXPORTED.items()}
    onnx = export(root / "model", root / "onnx", list(adapters.values()), merge=False, bank=True,
                  task="text-generation-with-past", verbose=False)
    _ARTS["gpt2"] = {"name": "gpt2", "model": root / "model", "adapters": adapters, "onnx": onnx}
    return _ARTS["gpt2"]


@functools.cache
def reference_model(name: str):
    """The PyTorch model of bank ``name`` with its adapters loaded (Llama: the exported ones and the fitting extras)."""
    if name == "llama":
        return torch_model("llama")
    model = build_model(name)
    for adapter, directory in _ARTS[name]["adapters"].items():
        load_adapter(model, directory, adapter_name=adapter)
    return model.eval()


def ref_generate(art: dict, prompt: list[int], adapter: str | None, new: int) -> list[int]:
    """Greedy new tokens of ``prompt`` alone (no padding) through ``adapter`` in PyTorch."""
    return _ref_generate(art["name"], tuple(prompt), adapter, new)


@functools.cache
def _ref_generate(name: str, prompt: tuple[int, ...], adapter: str | None, new: int) -> list[int]:
    model = reference_model(name)
    ids = torch.tensor([list(prompt)])
    with torch.no_grad(), mixed_adapters(model, [adapter]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


CHOICES = {"llama": ["a0", "a1", "a2", None], "gpt2": [*GPT2_EXPORTED, None]}


@pytest.fixture(params=["llama", "gpt2"], scope="module")
def decoder(request, llama, gpt2):
    return llama if request.param == "llama" else gpt2


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


# ---- the padding: every row's logits are those of the row alone ---------------------------------------------


@pytest.mark.parametrize("compact_at", [0.0, 1.0], ids=["compact-always", "reuse-slots"])
def test_rows_joining_and_leaving_keep_the_logits_of_rows_alone(decoder, compact_at):
    """DecodeBatch directly: rows of different lengths join at steps 0, 2, 4 and 6 and leave at 3 and 5; at every
    step each row's logits equal PyTorch's for its whole sequence alone (fp32, 1e-4). ``compact_at=0``: the past
    is rebuilt whenever a slot or column is wasted; ``1``: leavers' slots are reused in place by newcomers.
    Prefills ask the graph for the last position's logits only (``logits_to_keep``)."""
    session = MultiAdapterSession(decoder["onnx"])
    assert session.keeps_last_logits
    prefill_logits: list[tuple[int, ...]] = []  # (prompt width, *logits shape) of each prefill run
    fed_back: list[bool] = []  # per decode run: every past input is the previous decode run's present OrtValue
    real_run = session.run_ortvalues
    last: dict[str, object] = {}

    def recording_run(feeds, adapters, output_names=None, snapshot=None, **kwargs):
        out = real_run(feeds, adapters, output_names, snapshot, **kwargs)
        if feeds["input_ids"].shape[1] > 1:
            prefill_logits.append((feeds["input_ids"].shape[1], *out["logits"].shape()))
        else:
            pasts = [(k, k.replace("past_key_values", "present", 1)) for k in feeds if k.startswith("past_key_values")]
            fed_back.append(bool(last) and all(feeds[k] is last[present] for k, present in pasts))
            last.clear()
            last.update(out)
        return out

    session.run_ortvalues = recording_run
    model = reference_model(decoder["name"])
    snapshot = session.snapshot()
    choices = CHOICES[decoder["name"]]
    prompts = token_rows(7, seed=40, low=2, high=13)
    joins = {0: [0, 1, 2], 2: [3, 4], 4: [5], 6: [6]}
    leaves = {3: [1, 2], 5: [3]}
    batch = DecodeBatch(session, compact_at=compact_at)
    sequences: dict[int, list[int]] = {}
    rows: dict[int, DecodeRow] = {}
    checked = 0

    def check(row: DecodeRow, logits: np.ndarray) -> None:
        nonlocal checked
        want = row_alone(model, sequences[row.owner], row.adapter)[-1].numpy()
        np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0, err_msg=f"row {row.owner} at {len(sequences[row.owner])}")
        checked += 1
        token = int(logits.argmax())
        sequences[row.owner].append(token)
        row.next_token = token

    for step in range(8):
        if step in joins:
            new = [DecodeRow(prompts[i], choices[i % len(choices)], snapshot, owner=i) for i in joins[step]]
            for row in new:
                sequences[row.owner] = list(row.prompt)
                rows[row.owner] = row
            logits, failures = batch.prefill(new)
            assert not failures
            for row, row_logits in zip(new, logits, strict=True):
                check(row, row_logits)
        if step in leaves:
            batch.remove(rows[i] for i in leaves[step])
        ran, logits, failures = batch.step()
        assert not failures
        assert {r.owner for r in ran} == {i for s, ids in joins.items() if s <= step for i in ids} - {
            i for s, ids in leaves.items() if s <= step for i in ids}
        if compact_at == 0.0:  # nothing wasted: every slot a row, the width its longest row's
            assert len(batch.slots) == len(ran) and batch.width == max(r.length for r in ran)
        for row, row_logits in zip(ran, logits, strict=True):
            check(row, row_logits)
    assert checked == 7 + 3 + 3 + 5 + 3 + 4 + 3 + 4 + 4  # prefills + rows of each step
    # reuse-slots: the past was copied whole only to start and to grow (steps 0 and 2); rows 5, 6 took freed slots
    assert batch.rebuilds == (2 if compact_at == 1.0 else 6)
    assert len({len(p) for p in prompts}) > 3  # really different lengths, so rows really are padded
    assert len(prefill_logits) == len(joins)
    assert all(width > 1 and positions == 1 for width, _, positions, _ in prefill_logits), prefill_logits
    # a step where no row joins or leaves feeds the past as onnxruntime returned it: no host copy, which on a GPU
    # keeps the past on the device (steps 1 and 7; also 3 and 5 where leavers only free their slots)
    assert fed_back == ([False, True, False, False, False, False, False, True] if compact_at == 0.0
                        else [False, True, False, True, False, True, False, True]), fed_back


def test_a_graph_without_logits_to_keep_prefills_every_position_with_the_same_result(llama):
    """Graphs exported before ``logits_to_keep`` (simulated: the session told it has none) are fed no such input and
    give the same last-position logits from their every-position output."""
    session = MultiAdapterSession(llama["onnx"])
    prompts = token_rows(4, seed=61, low=2, high=11)
    got = {}
    for keeps in (True, False):
        session.keeps_last_logits = keeps
        rows = [DecodeRow(p, a, session.snapshot()) for p, a in zip(prompts, CHOICES["llama"], strict=True)]
        logits, failures = DecodeBatch(session).prefill(rows)
        assert not failures and logits.shape == (4, VOCAB)
        got[keeps] = logits
    np.testing.assert_allclose(got[True], got[False], atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [1, 6, 10**6], ids=["one-column", "chunks", "one-run"])
def test_a_prefill_run_in_chunks_gives_every_row_the_logits_of_the_row_alone(decoder, chunk_tokens):
    """DecodeBatch.start_prefill/prefill_chunk: left-padded prompts of different lengths prefilled a few columns per
    run (the past of the columns before fed back in) give, at the end of the prefill and at each of three steps
    after it, every row's PyTorch logits for its whole sequence alone. Each run feeds at most ``chunk_tokens``
    padded tokens (at least one column), and a row cancelled mid-prefill leaves before the next chunk."""
    session = MultiAdapterSession(decoder["onnx"])
    shapes = run_shapes(session)  # input_ids shape of each run
    model = reference_model(decoder["name"])
    choices = CHOICES[decoder["name"]]
    prompts = token_rows(5, seed=71, low=3, high=14)
    longest = max(len(p) for p in prompts)
    rows = [DecodeRow(p, choices[i % len(choices)], session.snapshot(), owner=i) for i, p in enumerate(prompts)]
    batch = DecodeBatch(session)
    job = batch.start_prefill(rows, chunk_tokens=chunk_tokens)
    assert not job.failures and job.columns == max(1, chunk_tokens // 5)
    runs = 0
    while not batch.prefill_chunk(job):
        runs += 1
        if runs == 2:  # row 4 is cancelled mid-prefill: the next chunks run the other four
            batch.remove([rows[4]])
    runs += 1
    columns = min(job.columns, longest)
    assert runs == -(-longest // columns) == len(shapes)
    assert [w for _, w in shapes] == [columns] * (runs - 1) + [longest - columns * (runs - 1)]
    assert all(b * w <= max(chunk_tokens, b) for b, w in shapes), shapes
    if runs > 2:
        assert job.live == [0, 1, 2, 3] and np.isnan(job.logits[4]).all()
    sequences = {i: list(p) for i, p in enumerate(prompts)}
    live = [rows[i] for i in job.live]
    for row in live:
        want = row_alone(model, sequences[row.owner], row.adapter)[-1].numpy()
        np.testing.assert_allclose(job.logits[row.owner], want, atol=ATOL, rtol=0, err_msg=f"prefill of {row.owner}")
        row.next_token = int(want.argmax())
        sequences[row.owner].append(row.next_token)
    for _ in range(3):
        ran, logits, failures = batch.step()
        assert not failures and {r.owner for r in ran} == {r.owner for r in live}
        for row, row_logits in zip(ran, logits, strict=True):
            want = row_alone(model, sequences[row.owner], row.adapter)[-1].numpy()
            np.testing.assert_allclose(row_logits, want, atol=ATOL, rtol=0, err_msg=f"row {row.owner}")
            row.next_token = int(row_logits.argmax())
            sequences[row.owner].append(row.next_token)


# ---- the engine against PyTorch ----------------------------------------------------------------------------------


def test_staggered_requests_match_pytorch_alone(decoder):
    """Requests with different prompt lengths, output lengths and adapters, submitted while others decode: each
    row's greedy tokens equal PyTorch's generate for that prompt alone."""
    session = MultiAdapterSession(decoder["onnx"])
    choices = CHOICES[decoder["name"]]
    prompts = token_rows(12, seed=41, low=2, high=13)
    jobs = [(p, choices[i % len(choices)], 4 + (7 * i) % 15) for i, p in enumerate(prompts)]
    waves = {0: jobs[:3], 2: jobs[3:6], 5: jobs[6:9], 9: jobs[9:]}  # joined after decode step k
    streams, results = run_in_waves(session, waves, lambda engine, job: engine.submit(
        job[0], job[1], SamplingParams(max_new_tokens=job[2])), timeout=TIMEOUT * 2)
    for (prompt, adapter, n), stream, result in zip(jobs, streams, results, strict=True):
        assert result.token_ids == ref_generate(decoder, prompt, adapter, n), (prompt, adapter)
        assert result.prompt_tokens == len(prompt) and result.completion_tokens == len(result.token_ids)
        assert result.finish_reason == ("stop" if result.token_ids[-1] in session.eos_token_ids else "length")
        assert result.finish_reason == "stop" or len(result.token_ids) == n
    # later waves really shared steps with rows that started before them
    for wave_start in (3, 6, 9):
        joined = streams[wave_start]
        assert any(s.started_at < joined.started_at < s.finished_at for s in streams[:wave_start])
        assert joined.batch_rows > 3
    assert max(s.batch_rows for s in streams) <= 8
    assert len({tuple(r.token_ids) for r in results}) > 6  # the rows differ, so a mix-up would show


@pytest.mark.parametrize("overlap", [True, False])
def test_tokens_reach_the_streams_during_the_next_run_or_right_after_the_step(llama, monkeypatch, overlap):
    """Steps of at least OVERLAP_MIN_STEP_S hand their tokens to the event loop right before the next run (the loop
    works while onnxruntime computes); shorter ones right after the step. Both give every stream all its tokens."""
    import bca_deploy.serving.engine as engine_module

    monkeypatch.setattr(engine_module, "OVERLAP_MIN_STEP_S", 0.0 if overlap else float("inf"))
    callers: list[str] = []
    real_deliver = GenerationEngine._deliver_later

    def deliver(self):
        if self._outbox:  # a hand-over with tokens in it
            callers.append(sys._getframe(1).f_code.co_name)
        real_deliver(self)

    monkeypatch.setattr(GenerationEngine, "_deliver_later", deliver)
    session = MultiAdapterSession(llama["onnx"])
    jobs = list(zip(token_rows(3, seed=52, low=2, high=9), ["a0", None, "a1"], [5, 9, 3]))

    async def main():
        engine = GenerationEngine(session, max_batch_rows=4)
        await engine.start()
        try:
            streams = [engine.submit(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in jobs]
            return [[event.token_id async for event in stream] for stream in streams]
        finally:
            await engine.stop()

    streamed = run(main())
    assert streamed == [ref_generate(llama, p, a, n) for p, a, n in jobs]
    during_runs = callers.count("_deliver_if_overlapping")
    assert (during_runs > 0) == overlap, callers


def test_sampled_rows_are_reproducible_and_independent_of_the_batch(llama):
    session = MultiAdapterSession(llama["onnx"])
    prompt = token_rows(1, seed=42, low=5, high=6)[0]
    sampled = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.4, top_k=40, top_p=0.95, seed=7)
    others = token_rows(6, seed=43)

    async def main(company: bool, params: SamplingParams):
        gate = StepGate(steps=[3] if company else [])
        engine = GenerationEngine(session, max_batch_rows=8, observer=gate)
        await engine.start()
        try:
            streams = [engine.submit(p, a, SamplingParams(max_new_tokens=14)) for p, a in
                       zip(others[:3], ["a0", None, "a2"])] if company else []
            if company:  # the sampled row joins a running batch mid-way, next to greedy and other sampled rows
                await gate.paused()
                streams.append(engine.submit(others[3], "a1", SamplingParams(max_new_tokens=9, do_sample=True, seed=1)))
            mine = engine.submit(prompt, "a1", params)
            gate.go()
            result = await mine.collect()
            for s in streams:
                await s.collect()
            return result.token_ids, mine.batch_rows
        finally:
            gate.go()
            await engine.stop()

    alone, rows_alone = run(main(False, sampled))
    together, rows_together = run(main(True, sampled))
    assert rows_alone == 1 and rows_together > 1
    assert together == alone
    assert run(main(False, sampled))[0] == alone  # reproducible
    assert session.generate([prompt], ["a1"], max_new_tokens=12, do_sample=True, temperature=1.4, top_k=40, top_p=0.95,
                            seed=7)[0] == alone
    other_seed = dataclasses_replace(sampled, seed=8)
    assert run(main(False, other_seed))[0] != alone  # sampling really samples
    assert alone != ref_generate(llama, prompt, "a1", 12)


def dataclasses_replace(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_load_and_unload_during_decoding(llama):
    """Rows that started keep their adapter to the end; rows that start afterwards see the new bank."""
    session = MultiAdapterSession(llama["onnx"])
    session.register("extra", llama["extra"]["extra"])
    prompts = token_rows(5, seed=44, low=3, high=10)
    gate = StepGate(steps=[2, 5])
    old_version = session.snapshot().version
    runs: list[list] = []
    real_run = session.run_ortvalues

    def recording_run(feeds, adapters, output_names=None, snapshot=None, **kwargs):
        runs.append([snapshot.version, list(adapters)])
        return real_run(feeds, adapters, output_names, snapshot, **kwargs)

    session.run_ortvalues = recording_run

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8, observer=gate)
        await engine.start()
        try:
            first = [engine.submit(prompts[0], "extra", SamplingParams(max_new_tokens=16)),
                     engine.submit(prompts[1], "a1", SamplingParams(max_new_tokens=16))]
            await gate.paused()  # both decoding: replace "extra" by other weights, unload a1, load "peftish"
            await asyncio.to_thread(session.register, "extra", llama["extra"]["peftish"], replace=True)
            await asyncio.to_thread(session.unregister, "a1")
            await asyncio.to_thread(session.register, "peftish", llama["extra"]["peftish"])
            with pytest.raises(UnknownAdapterError, match="a1"):
                engine.submit(prompts[2], "a1", SamplingParams(max_new_tokens=4))
            second = [engine.submit(prompts[2], "extra", SamplingParams(max_new_tokens=8)),
                      engine.submit(prompts[3], "peftish", SamplingParams(max_new_tokens=8)),
                      engine.submit(prompts[4], "a0", SamplingParams(max_new_tokens=8))]
            gate.go()
            await gate.paused()  # the new rows decode next to the old ones; unload "peftish" under them too
            await asyncio.to_thread(session.unregister, "peftish")
            gate.go()
            return [await s.collect() for s in first], [await s.collect() for s in second], first, second
        finally:
            gate.go()
            await engine.stop()

    old, new, first, second = run(main())
    assert [r.token_ids for r in old] == [ref_generate(llama, prompts[0], "extra", 16),
                                          ref_generate(llama, prompts[1], "a1", 16)]
    assert [r.token_ids for r in new] == [ref_generate(llama, prompts[2], "peftish", 8),  # "extra" now holds peftish
                                          ref_generate(llama, prompts[3], "peftish", 8),
                                          ref_generate(llama, prompts[4], "a0", 8)]
    assert ref_generate(llama, prompts[0], "extra", 16) != ref_generate(llama, prompts[0], "peftish", 16)
    # old and new rows shared runs: through a composite bank holding the slots of both snapshots
    assert all(s.finished_at > second[0].started_at for s in first)
    mixed = [adapters for version, adapters in runs if version == -1]
    assert mixed and all(len(a) > 1 for a in mixed)
    assert {v for v, _ in runs} >= {old_version, -1}


def test_a_queued_row_whose_adapter_is_unloaded_fails_alone(llama):
    """A row waiting for a batch row when its adapter is unloaded fails at the next step, not when a row frees for
    it (which could be long: its own request's other rows may hold them); the rows around it go on."""
    session = MultiAdapterSession(llama["onnx"])
    session.register("extra", llama["extra"]["extra"])
    prompts = token_rows(3, seed=45)
    gate = StepGate(steps=[1])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=1, observer=gate)
        await engine.start()
        try:
            running = engine.submit(prompts[0], "a0", SamplingParams(max_new_tokens=6))
            await gate.paused()
            queued = engine.submit(prompts[1], "extra", SamplingParams(max_new_tokens=6))  # waits: batch full
            after = engine.submit(prompts[2], None, SamplingParams(max_new_tokens=6))
            session.unregister("extra")
            gate.go()
            with pytest.raises(UnknownAdapterError) as refused:
                await queued.collect()
            # tenant isolation: the refusal names the adapter the row asked for, never the other loaded ones
            assert str(refused.value) == "adapter 'extra' is not loaded on this server"
            return await running.collect(), await after.collect(), queued, running
        finally:
            gate.go()
            await engine.stop()

    first, last, queued, running = run(main())
    assert queued.finished_at < running.finished_at  # refused while the running row still decoded
    assert first.token_ids == ref_generate(llama, prompts[0], "a0", 6)
    assert last.token_ids == ref_generate(llama, prompts[2], None, 6)


# ---- cancellation, backpressure, failures ------------------------------------------------------------------------


def test_cancellation_frees_the_row_at_the_next_step(llama):
    session = MultiAdapterSession(llama["onnx"])
    eos = session.eos_token_ids
    # the row to cancel must not end by itself first: a prompt whose 40 greedy tokens hold no end-of-sequence id
    doomed_prompt = next(p for p in token_rows(20, seed=46) if not eos & set(ref_generate(llama, p, "a2", 40)))
    prompts = [doomed_prompt, *token_rows(2, seed=146)]
    gate = StepGate(steps=[3])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=2, observer=gate)
        await engine.start()
        try:
            doomed = engine.submit(prompts[0], "a2", SamplingParams(max_new_tokens=40))
            keep = engine.submit(prompts[1], "a0", SamplingParams(max_new_tokens=12))
            queued = engine.submit(prompts[2], "a1", SamplingParams(max_new_tokens=5))  # waits: 2 rows run
            await gate.paused()
            seen = []
            async for event in doomed:
                seen.append(event)
                if len(seen) == 2:
                    break
            doomed.cancel()
            queued.cancel()  # never starts
            assert doomed.done and doomed.finish_reason == "cancelled" and queued.finish_reason == "cancelled"
            assert engine.stats()["queued_rows"] == 0
            steps_at_cancel = gate.count
            gate.go()
            result = await keep.collect()
            leftover = [e async for e in doomed]
            return seen, leftover, result, steps_at_cancel, engine.stats(), queued
        finally:
            gate.go()
            await engine.stop()

    seen, leftover, kept, steps_at_cancel, stats, queued = run(main())
    assert all(isinstance(e, TokenEvent) for e in seen) and leftover == []
    assert kept.token_ids == ref_generate(llama, prompts[1], "a0", 12)
    assert queued.started_at is None and queued.token_ids == []
    finished = {v["finish_reason"] for v in gate.of("finished")}
    assert finished == {"cancelled", "length"} or finished == {"cancelled", "length", "stop"}
    # the cancelled row left at the first step after the cancel: every later step ran 1 row
    later = gate.of("step")[steps_at_cancel:]
    assert later and all(v["rows"] == 1 for v in later)
    assert stats["running_rows"] == 0 and stats["queued_rows"] == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_the_steps_of_the_running_rows(llama):
    """``max_prefill_tokens`` bounds every prefill run, a single long prompt's too: it is prefilled in chunks, and the
    rows already decoding step between its chunks instead of waiting for its whole prompt. A short request that
    arrives meanwhile gets its own prefill before the long one's next chunk. A long prompt cancelled mid-prefill
    runs no further chunk. Every row's greedy tokens stay PyTorch's for the prompt alone."""
    session = MultiAdapterSession(llama["onnx"])
    eos = session.eos_token_ids
    running_prompt = next(p for p in token_rows(30, seed=72) if not eos & set(ref_generate(llama, p, "a0", 30)))
    long_prompt, doomed_prompt = token_rows(2, seed=73, low=30, high=31)
    short_prompt = token_rows(1, seed=74, low=3, high=4)[0]
    gate = StepGate(steps=[2, 9])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8, max_prefill_tokens=8, observer=gate)
        await engine.start()
        try:
            running = engine.submit(running_prompt, "a0", SamplingParams(max_new_tokens=30))
            await gate.paused()  # after step 2
            mark = len(gate.events)
            long = engine.submit(long_prompt, "a1", SamplingParams(max_new_tokens=6))
            doomed = engine.submit(doomed_prompt, "a2", SamplingParams(max_new_tokens=6))
            short = engine.submit(short_prompt, None, SamplingParams(max_new_tokens=4))
            gate.go()
            await gate.paused()  # after step 9: the long prompts are a few chunks in
            assert not doomed.done and doomed.first_token_at is None
            doomed.cancel()
            chunks_at_cancel = engine.prefills
            gate.go()
            results = await asyncio.gather(running.collect(), long.collect(), short.collect())
            return results, gate.events[mark:], chunks_at_cancel, engine.prefills, (long, short, doomed)
        finally:
            gate.go()
            await engine.stop()

    (ran, long, short), events, at_cancel, prefills, streams = run(main())
    assert ran.token_ids == ref_generate(llama, running_prompt, "a0", 30)
    assert long.token_ids == ref_generate(llama, long_prompt, "a1", 6)
    assert short.token_ids == ref_generate(llama, short_prompt, None, 4)
    # between two steps of the running rows, prefill runs of at most 8 tokens in all: the running rows never wait
    # for more than that (the two long prompts alone are 60 tokens)
    between, stretches = 0, []
    for event, values in events:
        if event == "prefill":
            between += values["tokens"]
        elif event == "step":
            stretches.append(between)
            between = 0
    assert 0 < max(stretches) <= 8 and sum(stretches) >= 30, stretches
    # the short request started after the long ones but got its first token long before the long one did
    long_stream, short_stream, doomed_stream = streams
    assert short_stream.first_token_at < long_stream.first_token_at
    # the long prompt: 30 tokens, 8 tokens per run; the cancelled one ran no chunk after the cancel
    assert prefills - at_cancel <= -(-30 // 8), (at_cancel, prefills)
    assert doomed_stream.finish_reason == "cancelled" and doomed_stream.token_ids == []


def test_prefills_in_progress_share_the_budget_fewest_tokens_left_first(llama):
    """Two 60-token prompts prefilled 8 tokens per step: the one further along takes each step's budget and ends
    first (the other gets what it leaves), rather than both ending at the end, as turns would have them."""
    session = MultiAdapterSession(llama["onnx"])
    first_prompt, second_prompt = token_rows(2, seed=78, low=60, high=61)
    events: list[tuple[str, dict]] = []

    async def main():
        engine = GenerationEngine(session, max_batch_rows=4, max_prefill_tokens=8,
                                  observer=lambda e, v: events.append((e, dict(v))))
        await engine.start()
        try:
            streams = [engine.submit(p, a, SamplingParams(max_new_tokens=3))
                       for p, a in ((first_prompt, "a0"), (second_prompt, "a1"))]
            return await asyncio.gather(*(s.collect() for s in streams))
        finally:
            await engine.stop()

    first, second = run(main())
    assert first.token_ids == ref_generate(llama, first_prompt, "a0", 3)
    assert second.token_ids == ref_generate(llama, second_prompt, "a1", 3)
    kinds = [e for e, _ in events if e in ("prefill", "first_token")]
    before_first = kinds[:kinds.index("first_token")]
    # the first prompt's 8 chunks (7 x 8 + 4), and at most one run of the second with the 4 tokens left over
    # (in turns: about 15)
    assert before_first.count("prefill") <= 9, kinds
    assert all(v["tokens"] <= 8 for e, v in events if e == "prefill")


def test_an_engine_stopped_mid_prefill_restarts_without_it(llama):
    """``stop()`` while a long prompt is between chunks ends its stream with an error; after ``start()`` again,
    nothing of it runs (no chunk, no row), and a new request gets PyTorch's tokens."""
    session = MultiAdapterSession(llama["onnx"])
    eos = session.eos_token_ids
    running_prompt = next(p for p in token_rows(30, seed=75) if not eos & set(ref_generate(llama, p, "a0", 30)))
    long_prompt = token_rows(1, seed=76, low=60, high=61)[0]
    short_prompt = token_rows(1, seed=77, low=3, high=4)[0]
    gate = StepGate(steps=[3])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=4, max_prefill_tokens=2, observer=gate)
        await engine.start()
        running = engine.submit(running_prompt, "a0", SamplingParams(max_new_tokens=30))
        long = engine.submit(long_prompt, "a1", SamplingParams(max_new_tokens=2))
        await gate.paused()  # 3 steps in: the long prompt has had 3 of its 30 chunks
        stopping = asyncio.create_task(engine.stop())
        while not engine._stopping:
            await asyncio.sleep(0.001)
        gate.go()  # the engine's thread ends its step and sees the stop
        await stopping
        errors = []
        for stream in (running, long):
            with pytest.raises(ServingError, match="stopped"):
                await stream.collect()
            errors.append(stream.finish_reason)
        mark = len(gate.events)
        await engine.start()
        try:
            result = await engine.submit(short_prompt, None, SamplingParams(max_new_tokens=5)).collect()
        finally:
            await engine.stop()
        return result, gate.events[mark:]

    result, events = run(main())
    assert result.token_ids == ref_generate(llama, short_prompt, None, 5)
    assert [v["rows"] for e, v in events if e == "step"] == [1] * 4  # the short row alone, 4 steps after its prefill
    assert sum(v["tokens"] for e, v in events if e == "prefill") == len(short_prompt)


def test_a_later_request_takes_the_next_free_row_before_a_big_requests_rest(llama):
    """Rows are admitted request by request, the fewest running first: a one-row request submitted behind a
    10-row request gets the first row that frees, not the row after all ten (FIFO). Its tokens, and every
    row of the big one, stay those of the row alone."""
    session = MultiAdapterSession(llama["onnx"])
    eos = session.eos_token_ids
    prompts = [p for p in token_rows(40, seed=47) if not eos & set(ref_generate(llama, p, "a1", 12))][:11]
    big, small = prompts[:10], prompts[10]
    gate = StepGate(steps=[1])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=4, observer=gate)
        await engine.start()
        try:
            mine = object()
            # different lengths, so the big request's rows free their places one by one
            streams = [engine.submit(p, "a1", SamplingParams(max_new_tokens=3 + i), group=mine)
                       for i, p in enumerate(big)]
            await gate.paused()  # 4 of its rows run; 6 wait
            late = engine.submit(small, "a0", SamplingParams(max_new_tokens=4))
            gate.go()
            results = await asyncio.gather(*(s.collect() for s in [*streams, late]))
            return streams, late, results
        finally:
            gate.go()
            await engine.stop()

    streams, late, results = run(main())
    waiting_big = [s for s in streams if s.started_at > streams[3].started_at]
    assert len(waiting_big) == 6
    # the first row to free (the 3-token row) went to the late request: it started before the rest of the big one
    assert all(late.started_at <= s.started_at for s in waiting_big)
    assert late.started_at < max(s.started_at for s in waiting_big)
    for prompt, stream, result in zip([*big, small], [*streams, late], results, strict=True):
        adapter = "a0" if stream is late else "a1"
        assert result.token_ids == ref_generate(llama, prompt, adapter, stream.params.max_new_tokens)


def test_backpressure_refuses_beyond_the_queue_bound(llama):
    session = MultiAdapterSession(llama["onnx"])
    prompts = token_rows(4, seed=47)
    gate = StepGate(steps=[1])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=1, max_queued_rows=2, observer=gate)
        await engine.start()
        try:
            streams = [engine.submit(prompts[0], "a0", SamplingParams(max_new_tokens=4))]
            await gate.paused()  # row 0 runs; rows 1 and 2 wait; row 3 is one too many
            streams += [engine.submit(p, "a1", SamplingParams(max_new_tokens=4)) for p in prompts[1:3]]
            with pytest.raises(EngineOverloadedError, match="max_queued_rows=2"):
                engine.submit(prompts[3], "a2", SamplingParams(max_new_tokens=4))
            gate.go()
            results = [await s.collect() for s in streams]
            late = await engine.submit(prompts[3], "a2", SamplingParams(max_new_tokens=4)).collect()  # room again
            return results, late
        finally:
            gate.go()
            await engine.stop()

    results, late = run(main())
    assert [r.token_ids for r in results] == [ref_generate(llama, p, a, 4) for p, a in
                                              zip(prompts[:3], ["a0", "a1", "a1"])]
    assert late.token_ids == ref_generate(llama, prompts[3], "a2", 4)
    assert [v["reason"] for v in gate.of("rejected")] == ["queue full"]


def test_check_refuses_bad_prompts_without_padding_them(llama, monkeypatch):
    """``GenerationEngine.check`` runs on the event loop for every request (``submit``): it refuses an empty prompt
    and ids that are not integers inside the vocabulary with the session's own messages
    (``MultiAdapterSession.check_ids``, the rule ``pad_ids`` applies), and pads nothing: it padded each prompt into
    arrays (ids, mask, positions) only to check it, 4x the cost of the check, on the loop that serves every stream."""
    session = MultiAdapterSession(llama["onnx"])
    engine = GenerationEngine(session)
    params = SamplingParams(max_new_tokens=4)

    def padded(*args, **kwargs):
        raise AssertionError("check padded the prompt")

    monkeypatch.setattr(session, "pad_ids", padded)
    vocab = session.vocabulary
    assert engine.check((5, np.int64(7), 9), "a0", params) == [5, 7, 9]
    with pytest.raises(ServingError, match="every row needs at least one token"):
        engine.check([], "a0", params)
    with pytest.raises(ServingError, match=rf"token ids must be integers in \[0, {vocab}\); got \[{vocab}, -1\]"):
        engine.check([3, vocab, -1], "a0", params)
    with pytest.raises(ServingError, match=r"token ids must be integers .*got \[1.5\]"):
        engine.check([3, 1.5], "a0", params)


def picky_session(llama) -> MultiAdapterSession:
    """A session whose graph refuses (simulated) any prompt run holding token 99, and adapter a2 at a decoding step."""
    session = MultiAdapterSession(llama["onnx"])
    real_run = session.run_ortvalues

    def picky_run(feeds, adapters, output_names=None, snapshot=None, **kwargs):
        ids = feeds["input_ids"]
        if ids.shape[1] > 1 and (ids == 99).any():
            raise RuntimeError("simulated: the graph refuses token 99")
        if ids.shape[1] == 1 and "a2" in adapters:
            raise RuntimeError("simulated: a2 fails while decoding")
        return real_run(feeds, adapters, output_names, snapshot, **kwargs)

    session.run_ortvalues = picky_run
    return session


def test_a_failing_row_fails_alone(llama):
    """A row the graph refuses (simulated: any run holding token 99 in a prompt, or adapter a2 at a decoding step)
    fails with its error; the rows it shared runs with get their tokens."""
    session = picky_session(llama)
    prompts = [[98 if t == 99 else t for t in p] for p in token_rows(4, seed=48, low=3, high=8)]
    bad_prompt = [5, 99, 7]

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8)
        await engine.start()
        try:
            with pytest.raises(ServingError, match="token ids"):  # refused before it reaches the batch
                engine.submit([5, VOCAB + 3], "a0", SamplingParams())
            streams = [engine.submit(p, a, SamplingParams(max_new_tokens=6))
                       for p, a in zip([*prompts, bad_prompt], ["a0", "a2", None, "a1", "a0"])]
            outcomes = []
            for s in streams:
                try:
                    outcomes.append(await s.collect())
                except RuntimeError as exc:
                    outcomes.append(exc)
            # the engine keeps serving
            again = await engine.submit(prompts[0], "a1", SamplingParams(max_new_tokens=3)).collect()
            return outcomes, again, streams
        finally:
            await engine.stop()

    outcomes, again, streams = run(main())
    assert outcomes[0].token_ids == ref_generate(llama, prompts[0], "a0", 6)
    assert isinstance(outcomes[1], RuntimeError) and "a2 fails" in str(outcomes[1])
    assert len(streams[1].token_ids) == 1  # its first token (from the prefill) came before the failure
    assert outcomes[2].token_ids == ref_generate(llama, prompts[2], None, 6)
    assert outcomes[3].token_ids == ref_generate(llama, prompts[3], "a1", 6)
    assert isinstance(outcomes[4], RuntimeError) and "token 99" in str(outcomes[4]) and streams[4].token_ids == []
    assert again.token_ids == ref_generate(llama, prompts[0], "a1", 3)


def test_bad_prompts_prefilled_alone_fail_alone_and_an_emptied_batch_restarts(llama):
    """Bad prompts that arrive while rows decode are prefilled on their own: that run fails for each of them, and
    the rows already decoding carry on. A step where every row fails empties the batch; the next row starts anew."""
    session = picky_session(llama)
    prompts = [[98 if t == 99 else t for t in p] for p in token_rows(2, seed=49, low=3, high=8)]
    gate = StepGate(steps=[2])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8, observer=gate)
        await engine.start()
        try:
            good = [engine.submit(p, a, SamplingParams(max_new_tokens=6)) for p, a in zip(prompts, ["a0", None])]
            await gate.paused()  # the good rows decode; the bad prompts join in a prefill of their own
            bad = [engine.submit(p, "a1", SamplingParams(max_new_tokens=6)) for p in ([5, 99, 7], [99, 4])]
            gate.go()
            outcomes = []
            for s in [*good, *bad]:
                try:
                    outcomes.append(await s.collect())
                except RuntimeError as exc:
                    outcomes.append(exc)
            # a step whose only row fails (a2 at its first decoding step) leaves an empty batch behind
            with pytest.raises(RuntimeError, match="a2 fails"):
                await engine.submit(prompts[0], "a2", SamplingParams(max_new_tokens=4)).collect()
            again = await engine.submit(prompts[1], "a1", SamplingParams(max_new_tokens=4)).collect()
            return outcomes, again, bad
        finally:
            gate.go()
            await engine.stop()

    outcomes, again, bad = run(main())
    assert outcomes[0].token_ids == ref_generate(llama, prompts[0], "a0", 6)
    assert outcomes[1].token_ids == ref_generate(llama, prompts[1], None, 6)
    for outcome, stream in zip(outcomes[2:], bad):
        assert isinstance(outcome, RuntimeError) and "token 99" in str(outcome) and stream.token_ids == []
    assert again.token_ids == ref_generate(llama, prompts[1], "a1", 4)


def test_a_vanishing_temperature_samples_the_argmax_and_breaks_no_neighbour(llama):
    """temperature 5e-324 (the smallest float above 0) is a valid setting: its row samples the argmax, token-equal
    to greedy decoding. Dividing the raw logits by it overflowed to inf - inf = NaN, and the draw's error failed
    every row of the step (the hostile-input probe found it through /v1/completions)."""
    session = MultiAdapterSession(llama["onnx"])
    prompts = token_rows(3, seed=52, low=3, high=7)

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8)
        await engine.start()
        try:
            streams = [engine.submit(prompts[0], "a0", SamplingParams(max_new_tokens=6)),
                       engine.submit(prompts[1], "a1", SamplingParams(max_new_tokens=6, do_sample=True,
                                                                      temperature=5e-324, seed=3)),
                       engine.submit(prompts[2], None, SamplingParams(max_new_tokens=6))]
            return [(await s.collect()).token_ids for s in streams]
        finally:
            await engine.stop()

    got = run(main())
    assert got == [ref_generate(llama, p, a, 6) for p, a in zip(prompts, ["a0", "a1", None])]


def test_a_row_whose_logits_are_not_finite_fails_alone(llama):
    """A sampled row whose logits come out NaN (simulated: adapter a2's rows) cannot be drawn from: it fails with
    a FloatingPointError that says so, and the rows beside it, greedy and sampled, get their tokens."""
    session = MultiAdapterSession(llama["onnx"])
    real_run = session.run_ortvalues
    keep_alive = []  # an OrtValue made from a numpy array does not own its memory

    def nan_for_a2(feeds, adapters, output_names=None, snapshot=None, **kwargs):
        import onnxruntime as ort

        out = dict(real_run(feeds, adapters, output_names, snapshot, **kwargs))
        logits = np.array(out["logits"].numpy())
        for b, name in enumerate(adapters):
            if name == "a2":
                logits[b] = np.nan
        keep_alive.append(logits)
        out["logits"] = ort.OrtValue.ortvalue_from_numpy(logits)
        return out

    session.run_ortvalues = nan_for_a2
    prompts = token_rows(3, seed=53, low=3, high=7)
    sampled = SamplingParams(max_new_tokens=5, do_sample=True, temperature=0.7, seed=11)

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8)
        await engine.start()
        try:
            streams = [engine.submit(prompts[0], "a0", SamplingParams(max_new_tokens=5)),
                       engine.submit(prompts[1], "a2", sampled),
                       engine.submit(prompts[2], "a1", sampled)]
            outcomes = []
            for s in streams:
                try:
                    outcomes.append((await s.collect()).token_ids)
                except Exception as exc:  # noqa: BLE001 - the failing row's error is the point
                    outcomes.append(exc)
            return outcomes
        finally:
            await engine.stop()

    outcomes = run(main())
    assert outcomes[0] == ref_generate(llama, prompts[0], "a0", 5)
    assert isinstance(outcomes[1], FloatingPointError) and "not finite" in str(outcomes[1])
    alone = MultiAdapterSession(llama["onnx"]).generate([prompts[2]], ["a1"], max_new_tokens=5, do_sample=True,
                                                         temperature=0.7, seed=11)[0]
    assert outcomes[2] == alone


def test_sampler_draws_at_any_temperature_and_refuses_non_finite_logits():
    logits = np.array([0.5, 3.0, -1.0, 2.999], dtype=np.float32)
    for temperature in (5e-324, 1e-300, 1e-30):
        sampler = Sampler(SamplingParams(do_sample=True, temperature=temperature, seed=0))
        assert [sampler.draw(logits) for _ in range(20)] == [1] * 20
    hot = Sampler(SamplingParams(do_sample=True, temperature=100.0, seed=0))
    assert len({hot.draw(logits) for _ in range(200)}) == 4  # near-uniform: every token comes up
    for bad in (np.nan, np.inf):
        broken = logits.copy()
        broken[2] = bad
        with pytest.raises(FloatingPointError, match="not finite"):
            Sampler(SamplingParams(do_sample=True, seed=0)).draw(broken)
    masked = np.array([-np.inf, 1.0, -np.inf], dtype=np.float32)  # -inf logits are masked tokens, not an error
    assert Sampler(SamplingParams(do_sample=True, seed=0)).draw(masked) == 1
    # choose_tokens: the broken row fails alone; the greedy row takes the argmax even of broken logits
    rows = np.stack([logits, np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32)])
    samplers = [Sampler(SamplingParams(do_sample=True, seed=0)), Sampler(SamplingParams(do_sample=True, seed=0)),
                Sampler(SamplingParams())]
    tokens, failures = choose_tokens(rows, samplers)
    assert list(failures) == [1] and isinstance(failures[1], FloatingPointError)
    assert tokens[1] == -1 and tokens[0] in range(4) and tokens[2] == 0


# ---- text, stop strings, stop tokens -----------------------------------------------------------------------------


SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: LlamaConfig's default bos/eos ids
BYTES = [f"<0x{b:02X}>" for b in (0xC3, 0xA9, 0xE2, 0x82, 0xAC)]  # é = C3 A9, € = E2 82 AC


def write_tokenizer(directory: Path) -> None:
    """A 128-token byte-fallback BPE tokenizer (printable ASCII, a few UTF-8 bytes, some pairs), built locally."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIALS, *BYTES, *(chr(c) for c in range(0x20, 0x7F))]
    pairs = [a + b for a in "etaoin" for b in "snhrd"][:VOCAB - len(tokens)]
    tokens += pairs
    assert len(tokens) == VOCAB
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [(p[0], p[1]) for p in pairs], unk_token="<unk>",
                     byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


@pytest.fixture(scope="module")
def llama_text(llama, tmp_path_factory):
    """The Llama bank export plus a tokenizer."""
    root = tmp_path_factory.mktemp("engine-text") / "onnx"
    shutil.copytree(llama["onnx"], root)
    write_tokenizer(root)
    return root


def test_detokenizer_sends_whole_characters(llama_text):
    session = MultiAdapterSession(llama_text)
    tok = session.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ["a", "<0xC3>", "<0xA9>", "b", "<0xE2>", "<0x82>", "<0xAC>", "th"]]
    detok = _Detokenizer(session.decode, ())
    texts = [detok.push(t)[0] for t in ids]
    assert texts == ["a", "", "é", "b", "", "", "€", "th"]
    assert "".join(texts) + detok.flush() == session.decode(ids) == "aéb€th"
    cut = _Detokenizer(session.decode, ())  # ends mid-character: the replacement character, as decode gives
    assert "".join(cut.push(t)[0] for t in ids[:2]) + cut.flush() == session.decode(ids[:2]) == "a\ufffd"
    stop = _Detokenizer(session.decode, ["b€"])
    sent = [stop.push(t) for t in ids]
    assert [t for t, _ in sent[:7]] == ["a", "", "é", "", "", "", ""] and sent[6][1]  # "b" held back, then cut


def test_detokenizer_continues_the_prompt_as_decoding_both_would():
    """A SentencePiece decoder (Metaspace: Llama-2, Mistral, Gemma) drops the space of a sequence's first word: the
    text of "the movie is" + [▁a, ▁good] came back as "a good" (helper-58's walk). Decoded after the prompt's last
    tokens, the text is what decoding prompt and answer together adds to the prompt's text, leading space included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "\u2581the", "\u2581movie", "\u2581is", "\u2581a", "\u2581good", "\u2581one"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    prompt, answer = tokenizer("the movie is")["input_ids"], tokenizer("a good one")["input_ids"]
    assert tokenizer.decode(answer) == "a good one"  # alone, the first word's space is dropped
    expected = tokenizer.decode(prompt + answer)[len(tokenizer.decode(prompt)):]
    assert expected == " a good one"
    detok = _Detokenizer(tokenizer.decode, (), context=prompt[-PROMPT_CONTEXT_TOKENS:])
    assert "".join(detok.push(t)[0] for t in answer) + detok.flush() == expected
    stop = _Detokenizer(tokenizer.decode, [" good"], context=prompt)  # a stop string with the leading space
    sent = [stop.push(t) for t in answer]
    assert sent[:2] == [(" a", False), ("", True)]


def _windows(decode):
    """``decode`` and the list of the id counts it was called with (the detokenizer's window at each call)."""
    sizes: list[int] = []

    def counted(ids):
        sizes.append(len(ids))
        return decode(ids)

    return counted, sizes


def test_detokenizer_window_stays_short_through_tokens_without_text():
    """A row made (``logit_bias``) to generate special tokens, which decoding skips, made its detokenizer's window grow
    by one id per token: 4,096 of them decoded 4,096 ids twice per token, 2.9 s of the engine thread every row waits
    for (helper-135's probe). Dropped from the window, they leave the text as decoding the whole sequence gives it
    (the space of the word after them included), and each decode reads a few ids. A lone "\u2581" first (no text at
    a window's start, a space before the next word) keeps its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "\u2581the", "\u2581movie", "\u2581is", "\u2581a", "\u2581good", "\u2581one", "\u2581"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>")
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)  # as the engine decodes
    prompt = tokenizer("the movie is")["input_ids"]
    special = tokenizer.bos_token_id
    answer = [words.index("\u2581a"), *[special] * 2000, words.index("\u2581good"), *[special] * 50,
              words.index("\u2581one"), special]
    expected = decode(prompt + answer)[len(decode(prompt)):]
    assert expected == " a good one"
    counted, sizes = _windows(decode)
    detok = _Detokenizer(counted, (), context=prompt[-PROMPT_CONTEXT_TOKENS:])
    assert "".join(detok.push(t)[0] for t in answer) + detok.flush() == expected
    spaced = [words.index("\u2581"), words.index("\u2581a"), words.index("\u2581good")]
    fresh = _Detokenizer(decode, ())  # no context: how completions' echo decodes a prompt
    assert "".join(fresh.push(t)[0] for t in spaced) + fresh.flush() == decode(spaced) == " a good"
    assert max(sizes) <= len(prompt) + 10, f"the window grew to {max(sizes)} ids"  # + MAX_PENDING_TOKENS (8) + 2


def test_detokenizer_window_stays_short_through_bytes_that_make_no_character(tmp_path):
    """Byte tokens that never complete a character (lone UTF-8 continuation bytes) were held back for ever, the window
    growing by one id per token; past MAX_PENDING_TOKENS their replacement characters go out, as decoding the whole
    sequence gives them, and a character that follows is whole."""
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["a", "b", "<0xA9>", "<0xC3>"]}
    answer = [ids["a"], *[ids["<0xA9>"]] * 2000, ids["b"], ids["<0xC3>"], ids["<0xA9>"]]
    expected = decode(answer)
    assert expected == "a" + "\ufffd" * 2000 + "b\u00e9"
    counted, sizes = _windows(decode)
    detok = _Detokenizer(counted, ())
    texts = [detok.push(t)[0] for t in answer]
    assert "".join(texts) + detok.flush() == expected
    assert texts[-2:] == ["", "\u00e9"]  # a character still arriving is held back as before
    assert max(sizes) <= 17, f"the window grew to {max(sizes)} ids"  # 2 x MAX_PENDING_TOKENS (8) + 1


def test_text_stop_strings_and_stop_tokens(llama_text):
    session = MultiAdapterSession(llama_text)
    prompts = token_rows(6, seed=49, low=3, high=8)
    adapters = ["a0", "a1", "a2", None, "a0", "a1"]

    async def main(params_of):
        engine = GenerationEngine(session, max_batch_rows=4)
        await engine.start()
        try:
            streams = [engine.submit(p, a, params_of(i)) for i, (p, a) in enumerate(zip(prompts, adapters))]
            events = []
            for s in streams:
                events.append([e async for e in s])
            return streams, events
        finally:
            await engine.stop()

    full, full_events = run(main(lambda i: SamplingParams(max_new_tokens=24)))
    for s, events in zip(full, full_events, strict=True):
        assert [e.token_id for e in events] == s.token_ids
        assert "".join(e.text for e in events) == s.text == session.decode(s.token_ids)
    # a stop string from the middle of each row's text (2 printable characters: spans two tokens or more)
    stops = []
    for s in full:
        text = s.text
        k = next(k for k in range(len(text) // 3, len(text) - 1) if text[k:k + 2].isascii() and text[k:k + 2].isprintable())
        stops.append(text[k:k + 2])
    stopped, stopped_events = run(main(lambda i: SamplingParams(max_new_tokens=24, stop=[stops[i], "\x00never"])))
    for s, ref, stop, events in zip(stopped, full, stops, stopped_events, strict=True):
        cut = ref.text.index(stop)
        assert s.finish_reason == "stop" and s.text == ref.text[:cut], (stop, ref.text)
        assert all(stop not in e.text for e in events)
        # tokens up to the one that completed the stop string
        n = next(n for n in range(1, len(ref.token_ids) + 1) if stop in session.decode(ref.token_ids[:n]))
        assert s.token_ids == ref.token_ids[:n]
    # a stop token: the row ends with it, kept in the ids and the text (as vLLM keeps a stop token that is not special)
    stop_token = full[0].token_ids[5]
    (ended, *_), _ = run(main(lambda i: SamplingParams(max_new_tokens=24, stop_token_ids=[stop_token])))
    first = full[0].token_ids.index(stop_token)
    assert ended.token_ids == full[0].token_ids[:first + 1] and ended.finish_reason == "stop"
    assert ended.text == session.decode(full[0].token_ids[:first + 1])
    assert ended.text != session.decode(full[0].token_ids[:first])


# ---- parameters and the engine's settings -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,fields", [
    ({"max_new_tokens": 0}, ["max_new_tokens"]),
    ({"max_new_tokens": 5000}, ["max_new_tokens"]),
    ({"max_new_tokens": True}, ["max_new_tokens"]),
    ({"temperature": 0.0}, ["temperature"]),
    ({"temperature": -1.0}, ["temperature"]),
    ({"temperature": float("nan")}, ["temperature"]),
    ({"top_p": 0.0}, ["top_p"]),
    ({"top_p": 1.5}, ["top_p"]),
    ({"top_k": -1}, ["top_k"]),
    ({"seed": -1}, ["seed"]),
    ({"seed": 1.5}, ["seed"]),
    ({"stop": [""]}, ["stop"]),
    ({"stop": [3]}, ["stop"]),
    ({"stop_token_ids": [-2]}, ["stop_token_ids"]),
    ({"do_sample": "yes"}, ["do_sample"]),
    ({"temperature": 0, "top_p": 2, "seed": -5, "max_new_tokens": -1}, ["max_new_tokens", "temperature", "top_p", "seed"]),
])
def test_sampling_params_name_every_bad_field(kwargs, fields):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert err.value.fields == fields and err.value.field == fields[0]
    assert all(f"{f}:" in str(err.value) for f in fields)
    assert isinstance(err.value, ServingError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("kwargs, says", [
    ({"stop": ["x" * 1000] * 1000}, "got 1000 strings"),
    ({"stop": ["ok", "", "y" * 10**6]}, "got entry 1 is empty"),
    ({"stop": ["ok", "y" * 10**6]}, "got entry 1 has 1,000,000 characters"),
    ({"stop": "z" * 10**6}, "got entry 0 has 1,000,000 characters"),
    ({"stop_token_ids": [-1] * 10**5}, "got 100000 ids"),
    ({"stop_token_ids": (3, -5)}, "got entry 1 is -5"),  # the routes pass a tuple: it said "got tuple" (helper-94)
    ({"temperature": "t" * 10**6}, "got 'ttt"),
])
def test_a_refused_value_is_described_not_echoed(kwargs, says):
    """A refusal says what is wrong in a bounded message: a request of a megabyte of stop strings used to get all
    of it back in its 400 (helper-74)."""
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert says in str(err.value) and len(str(err.value)) < 400, str(err.value)[:500]


def test_sampling_params_normalize():
    params = SamplingParams(stop="\n", stop_token_ids=[np.int64(4)], max_new_tokens=np.int64(3))
    assert params.stop == ("\n",) and params.stop_token_ids == (4,) and type(params.max_new_tokens) is int


def test_submit_checks_against_the_graph(llama):
    session = MultiAdapterSession(llama["onnx"])

    async def main():
        engine = GenerationEngine(session)
        with pytest.raises(ServingError, match="not running"):
            engine.submit([5, 6], None, SamplingParams())
        await engine.start()
        try:
            with pytest.raises(ContextLengthError, match="64 positions") as err:
                engine.submit([5] * 60, None, SamplingParams(max_new_tokens=10))
            assert err.value.param == "max_new_tokens"
            with pytest.raises(SamplingParamsError, match="tokenizer") as err:
                engine.submit([5], None, SamplingParams(stop=["x"]))  # this export has no tokenizer
            assert err.value.field == "stop"
            with pytest.raises(UnknownAdapterError) as refused:
                engine.submit([5], "nope", SamplingParams())
            assert str(refused.value) == "adapter 'nope' is not loaded on this server"  # no other adapter named
            with pytest.raises(ServingError):
                engine.submit([], None, SamplingParams())
            with pytest.raises(ServingError):
                engine.submit("some text", None, SamplingParams())
            with pytest.raises(SamplingParamsError, match="params"):
                engine.submit([5], None, {"max_new_tokens": 3})
            assert engine.stats()["queued_rows"] == 0
            ok = await engine.submit([5, 6, 7], "__base__", SamplingParams(max_new_tokens=5)).collect()
            assert ok.token_ids == ref_generate(llama, [5, 6, 7], None, 5)
        finally:
            await engine.stop()

    run(main())
    with pytest.raises(ServingError, match="max_batch_rows"):
        GenerationEngine(session, max_batch_rows=0)


def test_engine_refuses_an_encoder_graph(banks):
    session = MultiAdapterSession(banks("bert")["onnx"])
    with pytest.raises(ServingError, match="text-generation-with-past"):
        GenerationEngine(session)


def test_observer_reports_the_metrics_and_its_failures_do_not_matter(llama):
    session = MultiAdapterSession(llama["onnx"])
    seen: list[tuple[str, dict]] = []

    def observer(event, values):
        seen.append((event, dict(values)))
        raise RuntimeError("a broken metrics backend")

    prompts = token_rows(5, seed=50)

    async def main():
        engine = GenerationEngine(session, max_batch_rows=3, observer=observer)
        await engine.start()
        try:
            streams = [engine.submit(p, "a0", SamplingParams(max_new_tokens=3 + i)) for i, p in enumerate(prompts)]
            return [await s.collect() for s in streams]
        finally:
            await engine.stop()

    results = run(main())
    assert [r.token_ids for r in results] == [ref_generate(llama, p, "a0", 3 + i) for i, p in enumerate(prompts)]
    kinds = [e for e, _ in seen]
    assert kinds.count("queued") == kinds.count("started") == kinds.count("first_token") == kinds.count("finished") == 5
    finished = [v for e, v in seen if e == "finished"]
    assert sorted(v["completion_tokens"] for v in finished) == sorted(len(r.token_ids) for r in results)
    steps = [v for e, v in seen if e == "step"]
    assert max(v["rows"] for v in steps) == 3
    generated = sum(len(r.token_ids) for r in results)
    assert sum(v["tokens"] for v in steps) + 5 == generated  # each row's first token comes from its prefill
    assert sum(len(v["inter_token_s"]) for v in steps) == generated - 5
    assert all(v["ttft_s"] >= v["queue_s"] >= 0 for v in finished)


def test_stop_ends_running_and_waiting_rows_with_an_error(llama):
    session = MultiAdapterSession(llama["onnx"])
    gate = StepGate(steps=[2])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=1, observer=gate)
        await engine.start()
        running = engine.submit([5, 6, 7], "a0", SamplingParams(max_new_tokens=30))
        await gate.paused()
        waiting = engine.submit([8, 9], "a1", SamplingParams(max_new_tokens=3))
        gate.go()
        await engine.stop()
        outcomes = []
        for stream in (running, waiting):
            with pytest.raises(ServingError, match="stopped"):
                await stream.collect()
            outcomes.append(stream.done)
        # started again, it serves again
        await engine.start()
        try:
            again = await engine.submit([5, 6, 7], "a0", SamplingParams(max_new_tokens=4)).collect()
        finally:
            await engine.stop()
        return outcomes, again

    done, again = run(main())
    assert done == [True, True]
    assert again.token_ids == ref_generate(llama, [5, 6, 7], "a0", 4)


def test_http_generate_joins_the_running_batch(llama):
    """/v1/generate on the engine: a short request sent while a long one decodes answers first; both are right."""
    import concurrent.futures as cf
    import json
    import urllib.request

    from bca_deploy.serving.http import ServerThread, build

    app = build(llama["onnx"], threads=1, max_prefill_tokens=512)
    assert app.state.engine.max_prefill_tokens == 512  # --max-prefill-tokens reaches the engine
    gate = StepGate(steps=[2])
    app.state.engine.observer = gate
    eos = app.state.session.eos_token_ids
    long_prompt = next(p for p in token_rows(20, seed=51, low=4, high=9) if not eos & set(ref_generate(llama, p, "a2", 30)))
    short_prompt = token_rows(1, seed=52)[0]
    finished: list[str] = []

    def generate(url, prompt, adapter, n, label):
        body = json.dumps({"input": [prompt], "adapter": adapter, "max_new_tokens": n}).encode()
        request = urllib.request.Request(url + "/v1/generate", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            answer = json.loads(response.read())
        finished.append(label)
        return answer["data"][0]["token_ids"]

    with ServerThread(app, startup_timeout=TIMEOUT) as server, cf.ThreadPoolExecutor(2) as pool:
        long = pool.submit(generate, server.url, long_prompt, "a2", 30, "long")
        assert gate._paused.wait(TIMEOUT)  # the long request is decoding (paused after its 2nd step)
        gate._paused.clear()
        short = pool.submit(generate, server.url, short_prompt, "a1", 3, "short")
        while app.state.engine.stats()["queued_rows"] == 0:  # the short request reached the engine
            threading.Event().wait(0.01)
        gate.go()
        assert short.result(TIMEOUT) == ref_generate(llama, short_prompt, "a1", 3)
        assert long.result(TIMEOUT) == ref_generate(llama, long_prompt, "a2", 30)
    assert finished == ["short", "long"]
    assert max(v["rows"] for v in gate.of("step")) == 2  # they shared steps


def test_http_rows_whose_adapter_is_unloaded_while_queued_name_only_their_adapter(llama):
    """Tenant isolation on the wire: /v1/generate and a streamed /v1/completions whose adapter is unloaded after their
    rows were queued and before they started get a JSON 404 that never names the other adapters. The stream's status
    goes out with its first event (helper-94): it was a 200 and an error event, which the openai client raises as an
    untyped APIError where the same request unstreamed is a NotFoundError."""
    import concurrent.futures as cf
    import json
    import urllib.error
    import urllib.request

    from bca_deploy.serving.http import ServerThread, build

    app = build(llama["onnx"], threads=1, max_batch_rows=1)  # one row runs: the others wait in the queue
    session = app.state.session
    session.register("extra", llama["extra"]["extra"])
    gate = StepGate(steps=[2])
    app.state.engine.observer = gate

    def post(url, path, body):
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    with ServerThread(app, startup_timeout=TIMEOUT) as server, cf.ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, server.url, "/v1/generate", {"input": [[5, 6, 7]], "adapter": "a0",
                                                                 "max_new_tokens": 8})
        assert gate._paused.wait(TIMEOUT)  # decoding, paused after its 2nd step
        gate._paused.clear()
        native = pool.submit(post, server.url, "/v1/generate", {"input": [[8, 9]], "adapter": "extra"})
        streamed = pool.submit(post, server.url, "/v1/completions", {"model": "extra", "prompt": [8, 9],
                                                                     "max_tokens": 4, "stream": True})
        while app.state.engine.stats()["queued_rows"] < 2:  # both rows are queued behind the running one
            threading.Event().wait(0.01)
        session.unregister("extra")
        gate.steps.clear()
        gate.go()
        assert running.result(TIMEOUT)[0] == 200
        status, text = native.result(TIMEOUT)
        stream_status, stream_text = streamed.result(TIMEOUT)
    # the error names the request field that named the adapter (as an unknown adapter's 404 at once does)
    assert status == 404 and json.loads(text)["error"] == {
        "message": "adapter 'extra' is not loaded on this server", "type": "unknown_adapter", "param": "adapter",
        "code": 404}
    assert stream_status == 404 and json.loads(stream_text) == {"error": {  # no other adapter named
        "message": "adapter 'extra' is not loaded on this server", "type": "unknown_adapter", "param": "model",
        "code": 404}}, stream_text


def test_a_finished_rows_queue_place_is_freed_while_a_slow_client_reads_its_answer(tmp_path_factory):
    """helper-65: a client that reads a streamed answer slowly (4 KB/s) kept its rows' places in --max-queued-rows
    until the last byte was written, long after the engine was done with them (2048 finished rows held for 15 s;
    every other tenant got 503). A row's place is freed when the engine ends it. Here the client reads nothing
    (a small receive buffer), so the server's writes stall; the places are free once the engine is idle."""
    import json
    import socket
    import time

    from bca_deploy.serving.http import ServerThread, build
    from http_helpers import bank  # the tiny Llama export with its word-level tokenizer: streams carry text

    # body_timeout_s: a client that reads nothing for that long is cut off (which frees its rows too): not here
    app = build(bank("llama", tmp_path_factory)["onnx"], threads=1, max_batch_rows=64, body_timeout_s=300)
    body = json.dumps({"model": "a0", "prompt": ["the cat is on"] * 64, "max_tokens": 60, "temperature": 0,
                       "stream": True}).encode()
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        # small buffers both ends (an accepted socket inherits the listener's): the answer, ~1 MB of events, cannot fit
        server._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((server.host, server.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        admission, engine = app.state.server.admission, app.state.engine
        deadline = time.monotonic() + TIMEOUT
        while admission.rows == 0 and time.monotonic() < deadline:  # admitted
            time.sleep(0.01)
        assert admission.rows == 64
        while (engine.stats()["running_rows"] or engine.stats()["queued_rows"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.stats()["running_rows"] and not engine.stats()["queued_rows"]
        while admission.rows and time.monotonic() < deadline:  # the last ends reach the event loop
            time.sleep(0.01)
        assert admission.rows == 0 and not admission.by_adapter
        client.settimeout(5)
        assert client.recv(4096).startswith(b"HTTP/1.1 200")  # the answer is still there to read
        client.close()
