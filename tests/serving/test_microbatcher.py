"""How :class:`~bca_deploy.serving.http.MicroBatcher` fills batches (embeddings, classification, request-level
generation), on a recording stand-in for the session so each batch's rows and adapters are known exactly.

- rows go to tenants (the adapter a request names) in turn: a tenant's one request is in the next batch even
  when another tenant has many requests (or one big one) queued before it;
- within a tenant, requests keep their turns (fewest batches so far, then the oldest), and a request's rows stay
  in order, so results come back per request exactly as asked;
- ``max_batch_rows`` and ``max_batch_tokens`` still bound every batch.
"""

from __future__ import annotations

import asyncio

import pytest

from bca_deploy.serving.http import MicroBatcher


class _Snapshot:
    def refusal(self, adapter, kind):
        return None


class RecordingSession:
    """Answers each row with (adapter, row) and records every batch's adapters and rows."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []

    def snapshot(self):
        return _Snapshot()

    def embed(self, rows, adapters, pooling, normalize, snapshot):
        self.batches.append(list(zip(adapters, map(tuple, rows), strict=True)))
        return [(adapter, tuple(row)) for adapter, row in zip(adapters, rows, strict=True)]


def run_jobs(jobs, max_batch_rows=8, max_batch_tokens=None):
    """Submits ``jobs`` ([(adapter, rows)]) in order before the batcher's first batch; returns (results, batches)."""
    session = RecordingSession()
    params = {"pooling": "mean", "normalize": True}

    async def main():
        batcher = MicroBatcher(session, max_batch_rows=max_batch_rows, max_wait_ms=0,
                               max_batch_tokens=max_batch_tokens)
        await batcher.start()  # its loop runs once this coroutine yields: after every job below is queued
        tasks = [asyncio.ensure_future(batcher.submit("embed", rows, adapter, params)) for adapter, rows in jobs]
        try:
            return [(await asyncio.wait_for(task, 30))[0] for task in tasks]
        finally:
            await batcher.stop()

    return asyncio.run(main()), session.batches


def row(i, length=1):
    return [i] * length


def test_a_tenants_one_request_is_in_the_first_batch_behind_another_tenants_many():
    # tenant a: 40 one-row requests, then tenant b's one request; first-come-first-served put b in batch 6 of 8 rows
    jobs = [("a", [row(i)]) for i in range(40)] + [("b", [row(99)])]
    results, batches = run_jobs(jobs)
    assert ("b", (99,)) in batches[0]
    assert results == [[(adapter, tuple(r)) for r in rows] for adapter, rows in jobs]  # each answer its own rows
    assert all(len(b) <= 8 for b in batches) and sum(map(len, batches)) == 41


def test_tenants_share_each_batch_while_both_have_rows_waiting():
    # a: one request of 32 rows; b: 16 one-row requests after it. Each batch of 8 takes 4 rows of each while both
    # wait; first-come-first-served gave a the first 4 batches whole.
    jobs = [("a", [row(i) for i in range(32)])] + [("b", [row(100 + i)]) for i in range(16)]
    results, batches = run_jobs(jobs)
    for batch in batches[:4]:
        assert [adapter for adapter, _ in batch].count("b") == 4, batch
    assert results[0] == [("a", (i,)) for i in range(32)]  # the big request's rows in order, across its pieces
    assert results[1:] == [[("b", (100 + i,))] for i in range(16)]


def test_within_a_tenant_requests_keep_their_turns():
    # one tenant: the earliest request first, and a request in a batch already goes after one that has not been in any
    jobs = [("a", [row(i) for i in range(6)]), ("a", [row(10)]), ("a", [row(11), row(12)])]
    _, batches = run_jobs(jobs, max_batch_rows=4)
    assert batches[0] == [("a", (i,)) for i in range(4)]
    assert batches[1] == [("a", (10,)), ("a", (11,)), ("a", (12,)), ("a", (4,))]
    assert batches[2] == [("a", (5,))]


def test_the_base_model_is_a_tenant_of_its_own():
    jobs = [(None, [row(i)]) for i in range(20)] + [("a", [row(50)])]
    _, batches = run_jobs(jobs)
    assert ("a", (50,)) in batches[0]


@pytest.mark.parametrize("budget", [16, 24])
def test_batches_stay_within_the_token_budget_and_every_row_is_answered(budget):
    # rows of 4 and 9 tokens from two tenants: padded tokens (rows x longest) never exceed the budget, except a
    # batch of one row
    jobs = [("a", [row(i, 9)]) for i in range(5)] + [("b", [row(20 + i, 4) for i in range(6)])]
    results, batches = run_jobs(jobs, max_batch_tokens=budget)
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(len(r) for _, r in batch) <= budget, batch
    assert results == [[(adapter, tuple(r)) for r in rows] for adapter, rows in jobs]


def test_a_short_row_is_not_padded_to_another_tenants_long_rows():
    """helper-65: a tenant's one-row classify (a few tokens) shared a batch with another tenant's 512-token rows and
    was padded to them: its batch as slow as theirs (8 s queued on 2 loaded cores). Rows of other requests join a
    batch only within BATCH_LENGTH_FACTOR of its rows' lengths (rows under BATCH_LENGTH_FLOOR tokens count as that);
    one request's own rows still share its batches whatever their lengths."""
    from bca_deploy.serving.http import BATCH_LENGTH_FACTOR, BATCH_LENGTH_FLOOR

    long = BATCH_LENGTH_FACTOR * BATCH_LENGTH_FLOOR + 1
    jobs = [("short", [row(1, 5)]), ("attacker", [row(10 + i, long) for i in range(6)]), ("short2", [row(2, 30)]),
            ("mixed", [row(50, 3), row(51, long), row(52, 7)])]
    results, batches = run_jobs(jobs)
    assert results == [[(adapter, tuple(r)) for r in rows] for adapter, rows in jobs]
    for batch in batches:
        lengths = [len(r) for _, r in batch]
        owners = {adapter for adapter, _ in batch}
        assert len(owners) == 1 or max(lengths) <= BATCH_LENGTH_FACTOR * max(min(lengths), BATCH_LENGTH_FLOOR), batch
    first = batches[0]
    assert ("short", (1,) * 5) in first and all(len(r) < long for _, r in first)  # not padded to the long rows
    alone = [("mixed", [row(50, 3), row(51, long), row(52, 7)])]  # one request: its rows stay in one batch
    results, batches = run_jobs(alone)
    assert results == [[("mixed", tuple(r)) for r in alone[0][1]]] and len(batches) == 1
