"""A request's ``n`` choices (rows of one prompt, adapter and bank snapshot) are prefilled once: ``DecodeBatch`` runs
one leader row per distinct prompt and copies its last logits, past and scores to the rows following it.

Checked against PyTorch (each row's whole sequence alone, ``row_alone``; teacher-forced prompt scores) and against
each choice generated alone by the session; a spy on the session's runs counts the rows each prefill run feeds.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import banks, llama, row_alone, run_shapes, token_rows, torch_model  # noqa: F401

from bca_deploy.serving import MultiAdapterSession
from bca_deploy.serving.decoding import DecodeBatch, DecodeRow
from bca_deploy.serving.engine import GenerationEngine, SamplingParams

TIMEOUT = 60.0
ATOL = 1e-4


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


def test_twins_are_prefilled_once_in_chunks_and_a_cancelled_leader_hands_over(llama):
    """DecodeBatch directly: three choices of prompt A on a0, two of prompt B on the base model, prompt A on a1 (another
    adapter: not a twin) and prompt C, prefilled in chunks: each run feeds one row per distinct (prompt, adapter), 4,
    not 7. The first choice of A (its leader) is cancelled mid-prefill and so is one choice of B (a follower): the
    runs still feed 4 rows (A's next choice leads). Every row left gets its PyTorch logits at the end of the prefill
    and, each choosing another token (they diverge), at two steps after it."""
    session = MultiAdapterSession(llama["onnx"])
    shapes = run_shapes(session)
    model = torch_model("llama")
    a, b, c = token_rows(3, seed=131, low=7, high=12)
    snapshot = session.snapshot()
    spec = [(a, "a0")] * 3 + [(b, None)] * 2 + [(a, "a1"), (c, "a2")]
    rows = [DecodeRow(list(p), adapter, snapshot, owner=i) for i, (p, adapter) in enumerate(spec)]
    batch = DecodeBatch(session)
    job = batch.start_prefill(rows, chunk_tokens=8)
    assert job.columns == 2 and job.tokens_left == 4 * job.width
    runs = 0
    while not batch.prefill_chunk(job):
        runs += 1
        assert job.last_run == (4, 8)
        if runs == 1:
            batch.remove([rows[0], rows[4]])  # A's leader and one of B's followers
    assert shapes and all(r == 4 for r, _ in shapes), shapes
    assert job.live == [1, 2, 3, 5, 6] and np.isnan(job.logits[[0, 4]]).all()
    sequences = {i: list(p) for i, (p, _) in enumerate(spec)}
    live = [rows[i] for i in job.live]
    for k, row in enumerate(live):
        want = row_alone(model, sequences[row.owner], row.adapter)[-1].numpy()
        np.testing.assert_allclose(job.logits[row.owner], want, atol=ATOL, rtol=0, err_msg=f"prefill of {row.owner}")
        row.next_token = int(np.argsort(want)[-1 - k % 3])  # twins choose different tokens: their pasts diverge
        sequences[row.owner].append(row.next_token)
    shapes.clear()
    for step in range(2):
        ran, logits, failures = batch.step()
        assert not failures and [r.owner for r in ran] == [r.owner for r in live]
        for k, (row, row_logits) in enumerate(zip(ran, logits, strict=True)):
            want = row_alone(model, sequences[row.owner], row.adapter)[-1].numpy()
            np.testing.assert_allclose(row_logits, want, atol=ATOL, rtol=0, err_msg=f"row {row.owner}, step {step}")
            row.next_token = int(np.argsort(row_logits)[-1 - (k + step) % 2])
            sequences[row.owner].append(row.next_token)
    assert [r for r, _ in shapes] == [5, 5]  # each row decodes in its own slot


def test_a_refused_leader_fails_with_its_followers_and_a_removed_one_ends_the_prefill(llama):
    """A prompt the graph refuses (token 99, simulated) fails for all three of its twins, with its error; a prompt
    whose ids the session refuses (out of the vocabulary) fails for both of its twins; the other prompt's row gets its
    PyTorch logits. A prefill whose leader and followers are all removed ends without another run."""
    session = MultiAdapterSession(llama["onnx"])
    shapes = run_shapes(session, refuse=99)
    good, bad = [5, 6, 7, 8], [5, 99, 7]
    snapshot = session.snapshot()
    rows = [DecodeRow(list(p), "a0", snapshot, owner=i)
            for i, p in enumerate([bad, good, bad, [5, 10_000], bad, [5, 10_000]])]
    batch = DecodeBatch(session)
    logits, failures = batch.prefill(rows)
    assert sorted(failures) == [0, 2, 3, 4, 5]
    assert all("token 99" in str(failures[i]) for i in (0, 2, 4))
    assert all("token ids" in str(failures[i]) for i in (3, 5))
    assert [r for r, _ in shapes] == [2, 1, 1]  # the run of both prompts, then each alone (isolating the failure)
    want = row_alone(torch_model("llama"), good, "a0")[-1].numpy()
    np.testing.assert_allclose(logits[1], want, atol=ATOL, rtol=0)
    assert np.isnan(logits[[0, 2, 3, 4, 5]]).all()

    shapes.clear()
    twins = [DecodeRow(list(good), None, snapshot, owner=i) for i in range(3)]
    job = batch.start_prefill(twins, chunk_tokens=1)
    batch.prefill_chunk(job)
    batch.remove(twins[:2])
    batch.remove(twins[2:])
    assert job.finished and job.live == [] and not batch.has_prefills and len(shapes) == 1


def test_n_choices_sampled_greedy_and_scored_equal_each_choice_alone_from_one_prefill_row(llama):
    """The engine: four choices of one prompt sampled with seeds 7..10 are the session's generation of the prompt
    alone with each seed; four greedy choices are its greedy generation; three choices scoring their prompt each get
    PyTorch's teacher-forced log-probabilities. Each request's prefill runs one row (the ``prefill`` events' rows and
    tokens count what ran)."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = token_rows(1, seed=132, low=9, high=10)[0]
    events: list[tuple[str, dict]] = []

    def sampled(seed: int | None) -> SamplingParams:
        return SamplingParams(max_new_tokens=8, do_sample=seed is not None, temperature=1.3, top_k=50, seed=seed)

    async def main():
        engine = GenerationEngine(session, max_batch_rows=8, observer=lambda e, v: events.append((e, dict(v))))
        await engine.start()
        try:
            out = {}
            for name, params in [("sampled", [sampled(7 + j) for j in range(4)]), ("greedy", [sampled(None)] * 4),
                                 ("scored", [SamplingParams(max_new_tokens=2, prompt_logprobs=2)] * 3)]:
                events.clear()
                group = object()
                streams = [engine.submit(prompt, "a1", p, group=group) for p in params]
                out[name] = ([await s.collect() for s in streams], [v for e, v in events if e == "prefill"])
            return out
        finally:
            await engine.stop()

    out = run(main())
    for name, (results, prefills) in out.items():
        assert [(p["rows"], p["tokens"]) for p in prefills] == [(1, len(prompt))], name
    for j, result in enumerate(out["sampled"][0]):
        alone = session.generate([prompt], ["a1"], max_new_tokens=8, do_sample=True, temperature=1.3, top_k=50,
                                 seed=7 + j)[0]
        assert result.token_ids == alone, j
    assert len({tuple(r.token_ids) for r in out["sampled"][0]}) > 1  # the seeds really differ
    greedy = session.generate([prompt], ["a1"], max_new_tokens=8)[0]
    assert all(r.token_ids == greedy for r in out["greedy"][0])
    want = torch.log_softmax(row_alone(torch_model("llama"), prompt, "a1")[:-1].double(), dim=-1)
    for result in out["scored"][0]:
        scores = result.prompt_logprobs
        assert len(scores) == len(prompt) - 1
        for k, item in enumerate(scores):
            assert item.token_id == prompt[k + 1]
            assert abs(item.logprob - float(want[k, prompt[k + 1]])) < 1e-4


def test_scoring_twins_run_once_under_the_logits_budget_and_keep_their_scores_when_the_leader_leaves(llama):
    """A scoring prefill (rows with ``score``) of three twins of prompt A on a2 and prompt B on the base model: the
    ``max_score_logits`` budget (two positions of two rows) counts the two rows that run, so each run feeds two rows and
    two columns. A's leader is cancelled after the first chunk; A's other twins end with every prompt token after the
    first scored (PyTorch's teacher-forced log-probability and top-2), the scores of the columns run before the
    cancellation included."""
    session = MultiAdapterSession(llama["onnx"])
    shapes = run_shapes(session)
    a, b = token_rows(2, seed=133, low=6, high=9)
    snapshot = session.snapshot()
    spec = [(a, "a2")] * 3 + [(b, None)]
    rows = [DecodeRow(list(p), adapter, snapshot, owner=i, score=2) for i, (p, adapter) in enumerate(spec)]
    vocab = 128
    batch = DecodeBatch(session, max_score_logits=4 * vocab)
    job = batch.start_prefill(rows)
    assert job.scoring and job.columns == 2
    batch.prefill_chunk(job)
    batch.remove([rows[0]])
    while not batch.prefill_chunk(job):
        pass
    assert shapes and all(shape == (2, 2) for shape in shapes[:-1]) and shapes[-1][0] == 2, shapes
    assert job.live == [1, 2, 3]
    for i in job.live:
        prompt, adapter = spec[i]
        want = torch.log_softmax(row_alone(torch_model("llama"), prompt, adapter)[:-1].double(), dim=-1)
        scores = job.scores[i]
        assert [s.token_id for s in scores] == prompt[1:], i
        for k, item in enumerate(scores):
            assert abs(item.logprob - float(want[k, prompt[k + 1]])) < 1e-4, (i, k)
            assert [t for t, _ in item.top] == want[k].topk(2).indices.tolist(), (i, k)
    assert job.scores[1] == job.scores[2] and job.scores[1] is not job.scores[2]


def test_an_heir_placed_after_another_prompts_leader_keeps_its_own_past(llama):
    """Prompt A's leader (row 0), prompt B (row 1), A's follower (row 2): the leader cancelled mid-prefill makes row 2
    the leader in row 0's place, so the rows run in the order 2, 1 while the batch lists them 1, 2. Each row's logits,
    at the end of the prefill and at the steps after it, are its own (PyTorch's): the past rows go with their rows."""
    session = MultiAdapterSession(llama["onnx"])
    model = torch_model("llama")
    a, b = token_rows(2, seed=137, low=7, high=12)
    snapshot = session.snapshot()
    spec = [(a, "a0"), (b, "a0"), (a, "a0")]
    rows = [DecodeRow(list(p), adapter, snapshot, owner=i) for i, (p, adapter) in enumerate(spec)]
    batch = DecodeBatch(session)
    job = batch.start_prefill(rows, chunk_tokens=4)
    assert batch.prefill_chunk(job) is False
    batch.remove([rows[0]])
    while not batch.prefill_chunk(job):
        pass
    assert job.live == [1, 2]
    sequences = {i: list(p) for i, (p, _) in enumerate(spec)}
    for row in (rows[1], rows[2]):
        want = row_alone(model, sequences[row.owner], row.adapter)[-1].numpy()
        np.testing.assert_allclose(job.logits[row.owner], want, atol=ATOL, rtol=0, err_msg=f"prefill of {row.owner}")
        row.next_token = int(np.argmax(want))
        sequences[row.owner].append(row.next_token)
    for step in range(2):
        ran, logits, failures = batch.step()
        assert not failures and sorted(r.owner for r in ran) == [1, 2]
        for row, row_logits in zip(ran, logits, strict=True):
            want = row_alone(model, sequences[row.owner], row.adapter)[-1].numpy()
            np.testing.assert_allclose(row_logits, want, atol=ATOL, rtol=0, err_msg=f"row {row.owner}, step {step}")
            row.next_token = int(np.argmax(row_logits))
            sequences[row.owner].append(row.next_token)


def test_a_prompts_n_choices_are_admitted_together_under_a_budget_one_of_them_fits(llama):
    """Admission charged each of a request's choices its whole prompt against ``max_prefill_tokens``: eight choices of
    a 16-token prompt under a budget of 32 were admitted two a step, and each step's prefill ran the prompt again
    (four prefill runs). The prefill runs one row per distinct prompt, so admission counts distinct prompts: one
    step admits all eight, one prefill run, and each choice is still the session's generation with its seed alone."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = token_rows(1, seed=141, low=16, high=17)[0]
    other = token_rows(1, seed=142, low=16, high=17)[0]
    events: list[tuple[str, dict]] = []
    params = [SamplingParams(max_new_tokens=4, do_sample=True, temperature=1.1, seed=40 + j) for j in range(8)]

    async def main():
        engine = GenerationEngine(session, max_batch_rows=16, max_prefill_tokens=32,
                                  observer=lambda e, v: events.append((e, dict(v))))
        await engine.start()
        try:
            group = object()
            streams = [engine.submit(prompt, "a0", p, group=group) for p in params]
            streams += [engine.submit(other, "a0", SamplingParams(max_new_tokens=4), group=object()) for _ in range(2)]
            return [await s.collect() for s in streams]
        finally:
            await engine.stop()

    results = run(main())
    prefills = [(v["rows"], v["tokens"]) for e, v in events if e == "prefill"]
    # the eight choices and one of the other prompt's requests in the first step (two distinct prompts: 32 tokens),
    # the second request of the other prompt joins them (no new prompt to pay for): one prefill of two rows
    assert prefills == [(2, 2 * len(prompt))], prefills
    for j, result in enumerate(results[:8]):
        alone = session.generate([prompt], ["a0"], max_new_tokens=4, do_sample=True, temperature=1.1, seed=40 + j)[0]
        assert result.token_ids == alone, j
    greedy = session.generate([other], ["a0"], max_new_tokens=4)[0]
    assert [r.token_ids for r in results[8:]] == [greedy, greedy]
