"""Continuous batching for generation: rows join and leave a running batch at every step.

:class:`GenerationEngine` schedules at the iteration level, as vLLM, TGI and LoRAX do, on an
adapter-bank ``text-generation-with-past`` graph served by :class:`~bca_deploy.serving.MultiAdapterSession`:

- a request submitted while others decode joins the running batch at the next step: the prompts of
  the newcomers are prefilled together in one run (left-padded), their first tokens are sent at once,
  and their past key values are padded into the running batch's past (see
  :class:`~bca_deploy.serving.decoding.DecodeBatch`; every row's logits stay those of the row alone);
- every step then feeds each running row its last token, in one run over the batch;
- a row that is done (an end-of-sequence or stop token, a stop string, ``max_new_tokens``) leaves at once
  and its stream ends; a cancelled stream's row leaves at the next step;
- every row keeps its own adapter, sampling settings, generator and penalty counts (its tokens never depend on
  its batch; penalties are applied to the penalized rows of a step together, rows without any cost nothing more),
  and the bank snapshot it started with, to its last token: a load or unload while it decodes changes
  nothing for it, while rows that start afterwards use the new bank (rows of several snapshots share a
  run through a composite bank of exactly the slots they use);
- a row whose settings ask ``logprobs`` gets each token's log-probability and its most likely alternatives'
  (:class:`TokenEvent` ``logprob``; the raw distribution, see :class:`SamplingParams`), computed on that row's
  logits alone after its token is chosen: rows that do not ask cost nothing more;
- a row whose settings ask ``prompt_logprobs`` (vLLM's) gets its prompt scored, teacher-forced, before its first
  token (:attr:`GenerationStream.prompt_logprobs`): the rows admitted in a step that ask are prefilled in a prefill of
  their own that keeps every position's logits (the others' prefill keeps the last position's only, as before), in
  chunks of at most ``max_score_logits`` logits, under the same admission, token budget and turns as every prefill,
  on the bank snapshot the row started with; with ``max_new_tokens`` 0 the row ends there (``"length"``, no token);
- at most ``max_batch_rows`` rows run at once; at most ``max_queued_rows`` wait (then
  :class:`EngineOverloadedError`);
- chunked prefill: newcomers admitted in one step are bounded by ``max_prefill_tokens`` (padded prompt
  tokens), and so are a step's prefill runs together: a prompt longer than that is prefilled a chunk per
  step, with a step of the running rows between chunks, so neither a burst nor one long prompt stalls them
  for more than one budget's worth. Prefills in progress share each step's budget, the one with the fewest
  tokens left first, so a short prompt arriving during a long one's chunks is not queued behind them;
- free rows go to the waiting requests in turn: the tenant (the adapter a request names) with the fewest rows
  running first, then, within it, the request with the fewest rows running (then the earliest): a request
  of many rows, or a tenant of many requests, fills the batch only while nobody else waits, and a later
  request of another tenant takes the next row that frees instead of queueing behind all of theirs (FIFO
  would);
- pre-emption by recompute (as vLLM's), for fairness between tenants: when a tenant with rows waiting holds
  fewer than its fair share of the batch (``max_batch_rows`` // tenants running or waiting, at least 1), no row
  is free, and the running rows of tenants above their share will not free enough rows within
  ``preempt_wait_steps`` steps (by their ``max_new_tokens`` left), the engine pre-empts just enough rows: each
  from the tenant holding the most rows above its share, the one cheapest to recompute (fewest prompt +
  generated tokens; ties: the latest admitted). A tenant at or below its share is never pre-empted, and never
  for a row of its own, so shares settle and rows do not bounce between tenants. A pre-empted row drops its
  past and waits at the front of the queue, ahead of its tenant's other waiting rows; readmitted, its prompt
  and the tokens it generated are prefilled again (chunked like any prompt) and its next token comes from that
  prefill's last logits. Its stream only pauses: the same tokens (its sampler and generator, detokenizer, stop
  strings and ``max_new_tokens`` carry on), its bank snapshot kept (a load or unload meanwhile changes nothing
  for it, an unload does not fail it), no second first token.

One thread steps the batch (onnxruntime uses its own intra-op threads) and never waits for consumers:
each step's tokens are handed to the asyncio loop that started the engine through a small waker thread,
right before the next run (which releases the GIL) when steps are long, so the loop serves the streams
while the next step computes; right after the step when steps are short (:data:`OVERLAP_MIN_STEP_S`),
where the loop's work would stall the run's intra-op threads.

Example::

    engine = GenerationEngine(session, max_batch_rows=32)
    await engine.start()
    stream = engine.submit([1, 306, 4966], "support", SamplingParams(max_new_tokens=64, stop=["\\n\\n"]))
    async for event in stream:          # TokenEvent(token_id, text)
        print(event.text, end="")
    print(stream.finish_reason, stream.prompt_tokens, stream.completion_tokens)
    await engine.stop()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ServingError
from .decoding import (
    MAX_NEW_TOKENS,
    DecodeBatch,
    DecodeRow,
    PrefillJob,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    TokenLogprob,
    choose_tokens,
    token_logprobs,
)
from .limits import MAX_SCORE_LOGITS, PREEMPT_WAIT_STEPS
from .session import BASE, MultiAdapterSession, not_loaded

__all__ = ["GenerationEngine", "GenerationStream", "GenerationResult", "TokenEvent", "TokenLogprob", "SamplingParams",
           "SamplingParamsError", "EngineOverloadedError", "MAX_NEW_TOKENS", "Observer"]

_log = logging.getLogger("bca_deploy.serve")

#: ``observer(event, values)``; see :class:`GenerationEngine` for the events and their values.
Observer = Callable[[str, Mapping[str, Any]], None]


class EngineOverloadedError(ServingError):
    """The engine's queue is full (``max_queued_rows`` rows waiting): try again later (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it adds (stop strings removed; may be empty, e.g. mid-character); with
    ``logprob`` when the row's :class:`SamplingParams` asked ``logprobs`` (else ``None``)."""

    token_id: int
    text: str
    logprob: TokenLogprob | None = None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A whole generation: every token id, the text, why it ended, and the token counts; ``logprobs``: one
    :class:`TokenLogprob` per token id when the row asked them (``SamplingParams.logprobs``), else ``None``, and
    ``text_offsets``: where each token's text starts in ``text`` (a token whose text is empty, held back or cut: where
    the next text starts); ``prompt_logprobs``: when the row asked them (``SamplingParams.prompt_logprobs``), one per
    prompt token after the first, each under the logits of the position before it."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    text_offsets: list[int] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass(frozen=True)
class _PromptScores:
    """A delivery: the row's prompt log-probabilities (:attr:`GenerationStream.prompt_logprobs`)."""

    items: list[TokenLogprob]


@dataclasses.dataclass(eq=False)
class _SharedScores:
    """The prompt log-probabilities of a request's rows that read one prompt on one adapter and bank snapshot, asking
    as many alternatives (its ``n`` choices): ``items`` once the first of them is scored, for the others to take. A
    tuple, and each taker gets a list of its own: a stream's ``prompt_logprobs`` is its caller's to change, and one
    choice's caller changing it changed the choices admitted after it."""

    items: tuple[TokenLogprob, ...] | None = None


_END = object()


#: Decode steps at least this long hand their tokens to the event loop during the next onnxruntime run (the loop's
#: work overlaps the run); shorter ones hand them over right after the step. Measured (bench/serve_handover.py, 2-core
#: EPYC, 32 clients reading streams, onnxruntime with 2 intra-op threads): a tiny decoder's ~2 ms steps ran slower
#: with the loop working during them (0.106 vs 0.091 ms per row-step; 1.04x tokens/s handing over after the step);
#: a MiniLM-sized decoder's ~37 ms steps gained 1.07x tokens/s from the overlap.
OVERLAP_MIN_STEP_S = 0.01


class GenerationStream:
    """The tokens of one submitted row, as they are generated: ``async for event in stream``.

    After the last event, :attr:`finish_reason` is ``"stop"`` (an end-of-sequence or stop token, or a
    stop string) or ``"length"`` (``max_new_tokens``), or ``"cancelled"`` after :meth:`cancel`;
    :attr:`prompt_tokens` and :attr:`completion_tokens` count the tokens (the end token included). If
    the row fails (its adapter was unloaded before it started, the graph refused it), iterating raises
    the error. Timestamps (``time.perf_counter()``): ``queued_at``, ``started_at`` (admitted into the
    batch), ``first_token_at``, ``finished_at``; ``batch_rows`` / ``batch_requests``: the most rows /
    distinct ``request_id`` s of one step this row took part in; ``preemptions``: the times its row was
    pre-empted (its stream paused, then went on with the same tokens).
    """

    def __init__(self, engine: GenerationEngine, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
                 request_id: str | None, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self.prompt_ids = tuple(prompt_ids)
        self.adapter = adapter
        self.params = params
        self.request_id = request_id
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.text = ""
        # a token's log-probabilities travel in its TokenEvent only: a consumer reading the events (a streamed
        # answer) holds them no longer than it keeps each event; collect() gathers them for a whole answer
        # set before the first token is delivered (and before the end of a row of max_new_tokens 0) when asked
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.queued_at = time.perf_counter()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.batch_rows = 0
        self.batch_requests = 0
        self.preemptions = 0
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._ended = False  # the end (or an error) was delivered
        self._read = False  # an event was taken (collect() must be the first reader: the events are its only source)
        self._end_callbacks: list[Callable[[], None]] = []
        self.cancelled = False

    @property
    def done(self) -> bool:
        """True once the row has finished, failed or been cancelled."""
        return self._ended

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TokenEvent:
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item is _END:
            self._items.appendleft(_END)  # iterating again ends again
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._items.appendleft(item)
            raise item
        self._read = True
        return item

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away): the stream ends now, the row leaves at the next step."""
        if self._ended:
            return
        self.cancelled = True
        self.finish_reason = "cancelled"
        self._items.clear()  # tokens delivered but not read yet are dropped: the consumer asked to stop
        self._finish(None)
        self._engine._cancel(self)

    async def aclose(self) -> None:
        """Same as :meth:`cancel` (for ``contextlib.aclosing``)."""
        self.cancel()

    async def collect(self) -> GenerationResult:
        """Wait for the whole generation (raises the row's error if it failed), read from its first event: call it
        instead of iterating, not after. The log-probabilities asked (``SamplingParams.logprobs``) are gathered here,
        with where each token's text starts, not by the stream: a stream read event by event holds none of them.
        Called on a stream whose events were taken already (iterated, or collected once), when log-probabilities were
        asked, it raises ``RuntimeError``: they left with those events, and the result would list fewer than its
        tokens."""
        asked = self.params.logprobs is not None
        if asked and self._read:
            raise RuntimeError("GenerationStream.collect() reads the stream from its first event, and some of its "
                               "events (with their log-probabilities) were taken already: call collect() once, "
                               "instead of iterating the stream")
        logprobs: list[TokenLogprob] | None = [] if asked else None
        offsets: list[int] | None = [] if asked else None
        chars = 0
        async for event in self:
            if logprobs is not None and event.logprob is not None:
                logprobs.append(event.logprob)
                offsets.append(chars)
            chars += len(event.text)
        assert self.finish_reason is not None
        return GenerationResult(list(self.token_ids), self.text, self.finish_reason, self.prompt_tokens,
                                self.completion_tokens, logprobs, offsets,
                                None if self.prompt_logprobs is None else list(self.prompt_logprobs))

    # ---- called on the loop by the engine's deliveries ----------------------------------------------------

    def _push(self, event: TokenEvent) -> None:
        if self._ended:
            return
        self.token_ids.append(event.token_id)
        self.text += event.text
        self.completion_tokens += 1
        self._items.append(event)
        self._wake()

    def add_end_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the event loop) when the row ends: finished, failed or cancelled; at once if it
        has. It runs when the engine is done with the row, which may be well before a consumer has read its
        events (a slow client): what is freed here is what the engine held for it."""
        if self._ended:
            callback()
        else:
            self._end_callbacks.append(callback)

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if error is not None:
            self.error = error
            self._items.append(error)
        else:
            if reason is not None:
                self.finish_reason = reason
            self._items.append(_END)
        self._wake()
        callbacks, self._end_callbacks = self._end_callbacks, []
        for callback in callbacks:
            callback()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


#: Prompt tokens a row's text is decoded after (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
PROMPT_CONTEXT_TOKENS = 5


#: The most tokens in a row a detokenizer holds back without new text (a UTF-8 character is at most 4 bytes, a
#: byte-level token at least one; a lone "\u2581" adds no text at the start of a SentencePiece window): past it they
#: are bytes that never make a character, whose replacement characters then go out as decoding gives them, or tokens
#: that add no text at all (skipped special tokens), which leave the window. A row can be made to generate either;
#: either way the window decoded at each token stays a few ids long.
MAX_PENDING_TOKENS = 8


class _Detokenizer:
    """A row's text, token by token: only whole characters are sent, stop strings are held back and cut.

    Decodes a short window of ids (TGI/vLLM's prefix/read offsets), not the whole sequence each time. The window
    starts on the prompt's last tokens (``context``), so the text continues the prompt as decoding the two together
    would: a SentencePiece tokenizer (Llama-2, Mistral, Gemma) drops the space a sequence's first word carries, and
    "the movie is" came back followed by "a" instead of " a".

    The text of the row's first ``min_tokens`` tokens ends the row at no stop string: a stop string counts only where
    it ends in the text of a later token (as vLLM's detokenizer checks them past ``min_tokens``).
    """

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: Sequence[str],
                 context: Sequence[int] = (), min_tokens: int = 0) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in stop), default=0)
        self._ids: list[int] = list(context)
        self._prefix = 0
        self._read = len(self._ids)
        self._held = ""
        self._min_tokens = min_tokens
        self._pushed = 0
        self._floor = 0  # characters at the start of _held from the first min_tokens tokens: no stop string ends there

    def push(self, token: int) -> tuple[str, bool]:
        """Text to send after one more token, and whether a stop string ended the row (text cut before it)."""
        if self._decode is None:
            return "", False
        self._ids.append(token)
        self._pushed += 1
        delta = self._delta(final=False)
        return self._cut(delta)

    def flush(self) -> str:
        """The text not sent yet (held back for a stop string, or an unfinished character) at the row's end."""
        if self._decode is None:
            return ""
        text, _ = self._cut(self._delta(final=True), final=True)
        return text

    def _delta(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            if len(self._ids) - self._read < MAX_PENDING_TOKENS:
                return ""  # nothing new yet, or a character whose bytes have not all arrived
            if after == before:
                # that many tokens in a row adding no text at all: special tokens, which decoding skips. They leave
                # the window: kept, they made it grow by one id per token, and a row made (logit_bias) to generate
                # 4,096 of them decoded 4,096 ids twice per token, 2.9 s of the engine thread every row waits for
                del self._ids[self._read:]
                return ""
            # bytes that never make a character: their replacement characters go out, as decoding gives them
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _cut(self, delta: str, final: bool = False) -> tuple[str, bool]:
        text = self._held + delta
        floor, self._held, self._floor = self._floor, "", 0
        if not self._stop:
            return text, False
        protected = self._pushed <= self._min_tokens  # the whole text is the first min_tokens tokens'
        if not protected:
            # the first match that ends past the protected characters (one inside them does not count)
            hits = [i for s in self._stop for i in _ends_past(text, s, floor)]
            if hits:
                return text[:min(hits)], True
        if final:
            return text, False
        # hold back the longest tail that could begin a stop string
        for k in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                self._held = tail
                self._floor = k if protected else max(0, floor - (len(text) - k))
                return text[:-k], False
        return text, False


def _ends_past(text: str, stop: str, floor: int) -> list[int]:
    """The first index of ``stop`` in ``text`` whose match ends past ``floor`` characters (none: ``[]``)."""
    i = text.find(stop, max(0, floor - len(stop) + 1))
    return [i] if i >= 0 else []


@dataclasses.dataclass(eq=False)
class _Request:
    stream: GenerationStream
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    sampler: Sampler
    detokenizer: _Detokenizer
    eos_ids: frozenset[int]  # end the row (none with ignore_eos); their text is left out (special tokens, as vLLM)
    group: Hashable = None  # rows of one request share it: they take turns with other requests as one
    generated: int = 0
    last_token_at: float = 0.0
    row: DecodeRow | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far (a pre-empted row's recompute)
    snapshot: Any = None  # the bank snapshot it was first admitted with (kept across pre-emptions)
    admitted: int = 0  # admission order (the latest admitted is pre-empted first among equals)
    scored: bool = False  # its prompt log-probabilities were delivered (a row pre-empted before: scored again)
    shared: _SharedScores | None = None  # its request's scores of its prompt (kept alive by the rows that share it)

    @property
    def scores(self) -> bool:
        """Its next prefill scores its prompt: it asks ``prompt_logprobs`` and has not had them."""
        return self.params.prompt_logprobs is not None and not self.scored

    @property
    def resuming(self) -> bool:
        """Admitted before (then pre-empted): it resumes with its own snapshot, tokens and counts."""
        return self.snapshot is not None

    @property
    def context(self) -> int:
        """Tokens a (re)admission prefills: the prompt and the tokens generated so far."""
        return len(self.prompt) + len(self.tokens)


class GenerationEngine:
    """Continuous batching over a :class:`MultiAdapterSession` with a decoder graph (see the module docstring).

    Args:
        session: the runtime (a ``text-generation-with-past`` adapter-bank export).
        max_batch_rows: the most rows decoding at once.
        max_queued_rows: the most rows waiting to join; beyond it :meth:`submit` raises
            :class:`EngineOverloadedError` (rows waiting after a pre-emption do not count).
        max_prefill_tokens: the most padded prompt tokens (rows x longest prompt) admitted in one step, and
            run by one step's prefill runs together (at least one column of one prefill always runs); one row
            is always admitted, however long, and prefilled in chunks of at most this many tokens.
        observer: called from the engine's thread as ``observer(event, values)`` (exceptions are logged,
            never raised). Events and values (times in seconds):

            - ``"queued"``: adapter, prompt_tokens, queued_rows
            - ``"rejected"``: adapter, reason (the queue was full)
            - ``"started"``: adapter, queue_s (submitted → admitted into the batch)
            - ``"first_token"``: adapter, ttft_s (submitted → first token)
            - ``"prefill"``: rows, tokens (padded prompt tokens), seconds (one per prefill run: a chunk),
              inter_token_s (one per row resuming after a pre-emption whose prefill this run ends: the gap
              since its previous token)
            - ``"step"``: rows, requests, seconds, tokens (new tokens), inter_token_s (one per token that
              is not a row's first)
            - ``"finished"``: adapter, finish_reason (stop, length, cancelled), prompt_tokens,
              completion_tokens, queue_s, ttft_s, seconds (submitted → end)
            - ``"failed"``: adapter, error
            - ``"preempted"``: adapter, generated_tokens (the row's tokens so far), recompute_tokens (prompt +
              generated tokens, prefilled again when it is readmitted)

            A row resumed after a pre-emption has no second ``"started"`` or ``"first_token"``.
        preempt: pre-empt rows for fairness between tenants (see the module docstring); ``False``: a running row
            is never pre-empted, a newcomer that finds every row busy waits until one ends.
        preempt_wait_steps: do not pre-empt for a waiting tenant when rows of the tenants above their share
            will end within this many decode steps anyway (by their ``max_new_tokens`` left): a wait that short
            costs less than recomputing a row.
    """

    def __init__(self, session: MultiAdapterSession, *, max_batch_rows: int = 32, max_queued_rows: int = 256,
                 max_prefill_tokens: int = 4096, observer: Observer | None = None, preempt: bool = True,
                 preempt_wait_steps: int = PREEMPT_WAIT_STEPS, max_score_logits: int = MAX_SCORE_LOGITS) -> None:
        problems = {name: f"must be an integer >= 1, got {value!r}" for name, value in
                    (("max_batch_rows", max_batch_rows), ("max_queued_rows", max_queued_rows),
                     ("max_prefill_tokens", max_prefill_tokens), ("max_score_logits", max_score_logits))
                    if not isinstance(value, int) or value < 1}
        if not isinstance(preempt, bool):
            problems["preempt"] = f"must be true or false, got {preempt!r}"
        if not isinstance(preempt_wait_steps, int) or isinstance(preempt_wait_steps, bool) or preempt_wait_steps < 0:
            problems["preempt_wait_steps"] = f"must be an integer >= 0, got {preempt_wait_steps!r}"
        if problems:
            raise ServingError("invalid engine settings: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
        session.require("generate")
        # the ids a row's settings may name (check), read now: a graph whose logits' width is symbolic is run once for
        # it (MultiAdapterSession.logits_width), at start, not on the event loop as the first request is checked
        session.generated_vocabulary  # noqa: B018 - a cached property, computed here
        self.session = session
        self.max_batch_rows = max_batch_rows
        self.max_queued_rows = max_queued_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.preempt = preempt
        self.preempt_wait_steps = preempt_wait_steps
        self.max_score_logits = max_score_logits
        self.observer = observer
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []  # admitted, not finished (engine thread; read by stop())
        self._orphans_checked: int | None = None  # the bank version waiting rows were last checked against
        self._changed = True  # a row was queued, left the queue or the batch since the last _admit
        self._cancelled: set[int] = set()  # id() of cancelled streams whose rows still run
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._outbox: list[tuple[GenerationStream, Any]] = []  # this step's deliveries (engine thread only)
        # (group id, prompt, adapter, snapshot id, alternatives) -> the scores its rows share; an entry lives while a
        # row holds it (engine thread only)
        self._shared_scores: weakref.WeakValueDictionary[tuple, _SharedScores] = weakref.WeakValueDictionary()
        self._handed: list[tuple[GenerationStream, Any]] = []  # handed to the loop, not yet delivered
        self._hand_lock = threading.Lock()
        self._wakeup_pending = False
        self._wake = threading.Lock()
        self._waker_thread: threading.Thread | None = None
        self._observer_failed: set[str] = set()
        self.steps = 0  # decode steps run
        self.prefills = 0  # prefill runs (chunks)
        self.preemptions = 0  # rows pre-empted
        self._admissions = 0  # rows admitted (the order of _Request.admitted)
        self._overlapping = False  # hand tokens over during the next run (the last step took OVERLAP_MIN_STEP_S or more)
        self._decode: Callable[[list[int]], str] | None = None  # the detokenizers' (engine thread only): _decoder
        self._decoder_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        """Start the engine's thread; streams are delivered on the calling event loop."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._wake = threading.Lock()
        self._wake.acquire()
        self._wakeup_pending = False
        self._waker_thread = threading.Thread(target=self._waker, name="bca-generation-waker", daemon=True)
        self._waker_thread.start()
        self._thread = threading.Thread(target=self._main, name="bca-generation", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; rows still waiting or running end with a :class:`ServingError`. ``timeout``: the most
        seconds to wait for the step running (None: until it ends); past it the thread (a daemon) is left to end on
        its own and the rows are left as they are: a step stuck in onnxruntime does not hold the server's shutdown."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            _log.error("the generation thread did not stop within %s s; leaving it", timeout)
            return
        self._thread = None
        with contextlib.suppress(RuntimeError):  # held by the waker: let it see _stopping and end
            self._wake.release()
        if self._waker_thread is not None:
            await asyncio.to_thread(self._waker_thread.join)
            self._waker_thread = None
        self._drain()
        self._deliver(self._take_outbox())
        error = ServingError("the generation engine stopped before this row finished")
        with self._cond:
            left = [*self._waiting, *self._running]
            self._waiting.clear()
            self._running = []
        for request in left:
            request.stream._finish(None, error)

    # ---- requests ---------------------------------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], adapter: str | None = None,
              params: SamplingParams | None = None) -> list[int]:
        """Everything :meth:`submit` checks, without submitting; returns the prompt as a list of ints.

        Raises:
            ServingError: an empty prompt or token ids outside the vocabulary.
            UnknownAdapterError: ``adapter`` is not loaded now.
            ContextLengthError: prompt + ``max_new_tokens`` exceed the graph's positions
                (:meth:`MultiAdapterSession.check_positions`).
            SamplingParamsError: ``params`` is not a SamplingParams; stop strings without a tokenizer (``stop``);
                ``stop_token_ids`` or ``logit_bias`` ids outside the vocabulary.
        """
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
            raise ServingError(f"the prompt must be a list of token ids, got {type(prompt_ids).__name__}")
        prompt = list(prompt_ids)
        self.session.check_ids([prompt])  # every row needs a token; ids must be integers inside the vocabulary
        prompt = [int(t) for t in prompt]
        if adapter is not None and adapter != BASE and adapter not in self.session.snapshot().slots:
            raise not_loaded(adapter)
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError({"params": f"must be a SamplingParams, got {type(params).__name__}"})
        self.session.check_positions(len(prompt), params.max_new_tokens, input_param="prompt")
        if params.stop and self._decoder() is None:
            raise SamplingParamsError({"stop": "stop strings need a tokenizer, and this export has none; use "
                                               "stop_token_ids"})
        params.check_vocabulary(self.session.generated_vocabulary)
        return prompt

    def submit(self, prompt_ids: Sequence[int], adapter: str | None = None, params: SamplingParams | None = None,
               *, request_id: str | None = None, group: Hashable = None) -> GenerationStream:
        """Queue one row; it joins the running batch at the next step. Call on the engine's event loop.

        Args:
            prompt_ids: the prompt's token ids.
            adapter: a loaded adapter's name, or ``None`` / ``"__base__"`` for the base model.
            params: sampling settings (default: greedy, 32 new tokens).
            request_id: rows with the same id count as one request in ``batch_requests``.
            group: rows submitted with the same group take their turns for free batch rows as one request
                (default: the row is a request of its own). Use a server-side object, not a client's id.

        Raises:
            EngineOverloadedError: ``max_queued_rows`` rows are waiting already.
            ServingError: the engine is not running; and what :meth:`check` raises.
        """
        if not self.running or self._loop is None:
            raise ServingError("the generation engine is not running (await engine.start() first)")
        params = params if params is not None else SamplingParams()
        prompt = self.check(prompt_ids, adapter, params)
        adapter = None if adapter == BASE else adapter
        stream = GenerationStream(self, prompt, adapter, params, request_id, self._loop)
        eos = frozenset() if params.ignore_eos else frozenset(self.session.eos_token_ids)
        request = _Request(stream, prompt, adapter, params, Sampler(params, prompt, end_ids=eos),
                           _Detokenizer(self._decoder(), params.stop, prompt[-PROMPT_CONTEXT_TOKENS:],
                                        min_tokens=params.min_tokens),
                           eos)
        request.group = group if group is not None else request
        with self._cond:
            queued = sum(not r.resuming for r in self._waiting)  # pre-empted rows were admitted: they do not count
            if queued >= self.max_queued_rows:
                self._observe("rejected", adapter=adapter, reason="queue full")
                raise EngineOverloadedError(f"the generation queue is full ({queued} rows waiting, "
                                            f"max_queued_rows={self.max_queued_rows}); try again later")
            self._waiting.append(request)
            self._changed = True
            queued += 1
            self._cond.notify_all()
        self._observe("queued", adapter=adapter, prompt_tokens=len(prompt), queued_rows=queued)
        return stream

    def stats(self) -> dict[str, int]:
        """Rows waiting and running now, and the runs so far."""
        with self._cond:
            return {"queued_rows": len(self._waiting), "running_rows": len(self._running), "steps": self.steps,
                    "prefills": self.prefills, "preemptions": self.preemptions}

    def _cancel(self, stream: GenerationStream) -> None:
        with self._cond:
            for request in self._waiting:
                if request.stream is stream:
                    self._waiting.remove(request)
                    self._changed = True
                    self._observe_finished(request, "cancelled")
                    return
            self._cancelled.add(id(stream))
            self._cond.notify_all()

    def _decoder(self) -> Callable[[list[int]], str] | None:
        """What the streams' detokenizers decode with (None: no tokenizer). A copy of the tokenizer of the engine's
        own: its thread decodes every stream's tokens, so waiting for one of the session's shared copies behind
        another request's long text (a 4 MB conversation holds one for seconds) would pause every stream."""
        try:
            self.session.tokenizer  # noqa: B018
        except ServingError:
            return None
        with self._decoder_lock:
            if self._decode is None:
                self._decode = self.session.private_decoder()
        return self._decode

    # ---- the engine's thread ---------------------------------------------------------------------------------

    def _main(self) -> None:
        # Where tokens go to the event loop (see OVERLAP_MIN_STEP_S): right before the next onnxruntime run, which
        # releases the GIL, so the loop thread handles them while the run computes, when steps are long; right after
        # each step when they are short, so the loop's work does not stall the run's intra-op threads.
        batch = self._new_batch()
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running and not batch.has_prefills:
                    self._cond.wait()
                if self._stopping:
                    return
                cancelled = [r for r in self._running if id(r.stream) in self._cancelled] if self._cancelled else []
                self._cancelled.clear()
                orphans = self._take_orphans()
                admitted, preempted = self._admit(cancelled)
            try:
                for request in orphans:
                    self._fail(request, not_loaded(request.adapter))
                self._leave(batch, cancelled, "cancelled")
                self._suspend(batch, preempted)
                if admitted:
                    self._start_prefill(batch, admitted)
                if batch.has_prefills:
                    self._prefill_chunks(batch)
                    if not self._overlapping:  # first tokens now, not after the step
                        self._deliver_later()
                if batch.has_joined:
                    self._step(batch)
            except Exception as exc:  # noqa: BLE001 - a failure of every row: they fail, the engine goes on
                _log.error("generation step failed: %s", "".join(traceback.format_exception(exc)))
                for request in list(self._running):
                    self._fail(request, exc)
                batch = self._new_batch()
            if not self._overlapping or not batch.has_joined:  # no run follows soon, or runs are short: deliver now
                self._deliver_later()

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.session, before_run=self._deliver_if_overlapping,
                           max_score_logits=self.max_score_logits)

    def _deliver_if_overlapping(self) -> None:
        if self._overlapping:
            self._deliver_later()

    def _take_orphans(self) -> list[_Request]:
        """Waiting rows whose adapter was unloaded while they waited (under the lock): they fail now, not when a
        batch row frees for them (their request's other rows may hold those rows for a long time). Checked once
        per bank version: :meth:`check` refuses rows for adapters not loaded when they are submitted. A pre-empted
        row is no orphan: it resumes on the bank snapshot it started with."""
        snapshot = self.session.snapshot()
        if not self._waiting or snapshot.version == self._orphans_checked:
            return []
        self._orphans_checked = snapshot.version
        orphans = [r for r in self._waiting
                   if not r.resuming and r.adapter is not None and r.adapter not in snapshot.slots]
        if orphans:
            gone = {id(r) for r in orphans}
            self._waiting = collections.deque(r for r in self._waiting if id(r) not in gone)
            self._changed = True
        return orphans

    def _admit(self, leaving: Sequence[_Request]) -> tuple[list[_Request], list[_Request]]:
        """Waiting rows that join now, and running rows pre-empted for them (under the lock; the caller takes the
        pre-empted rows out of the batch, :meth:`_suspend`, before it prefills the admitted ones).

        Admitted: up to the rows free once ``leaving`` and the pre-empted rows have left and the prefill token
        budget, one row at a time: from the tenant (adapter) holding the fewest rows, and within it first a row
        that resumes after a pre-emption, then from the request holding the fewest rows (ties: the one waiting
        longest); a request's own rows keep their order.

        Tenants first, so a tenant cannot queue another behind it by sending many small requests instead of one
        big one (each would hold no row while it waits, and first-come-first-served among them would put all of
        them before a later tenant's request). A request is a tenant by the adapter of its first waiting row.
        The tenants below their fair share come first (they hold fewer rows than anyone above it), so the rows
        :meth:`_preemptions` frees go to them."""
        if not self._waiting or not (self._changed or leaving):
            # nothing came or left since the last call: no row frees, and no pre-emption is due (a row's steps left
            # only shrink, so one found unneeded stays unneeded)
            return [], []
        self._changed = False
        gone = {id(r) for r in leaving}
        staying = [r for r in self._running if id(r) not in gone]
        free = self.max_batch_rows - len(staying)
        preempted = self._preemptions(staying, free) if self.preempt else []
        if preempted:
            out = {id(r) for r in preempted}
            staying = [r for r in staying if id(r) not in out]
            self._running = [r for r in self._running if id(r) not in out]
            free += len(preempted)
        if free <= 0:  # nothing pre-empted either
            return [], []
        admitted = self._choose(staying, free)
        chosen = {id(r) for r in admitted}
        waiting = [r for r in self._waiting if id(r) not in chosen]
        # pre-empted rows wait at the front, after those pre-empted before them (the longest paused first)
        resuming = [r for r in waiting if r.resuming]
        self._waiting = collections.deque([*resuming, *preempted, *(r for r in waiting if not r.resuming)])
        for request in admitted:
            self._admissions += 1
            request.admitted = self._admissions
        self._running.extend(admitted)
        self._changed = True  # look again next step (e.g. rows left free by the prefill budget)
        return admitted, preempted

    def _choose(self, staying: list[_Request], free: int) -> list[_Request]:
        """The waiting rows :meth:`_admit` admits into ``free`` rows (they are not taken off the queue here)."""
        held = collections.Counter(r.group for r in staying)
        held_by_tenant = collections.Counter(r.adapter for r in staying)
        queues: dict[Hashable, collections.deque[_Request]] = {}
        for request in self._waiting:
            queues.setdefault(request.group, collections.deque()).append(request)
        # per tenant, its requests' turns: (0 if its next row resumes else 1, rows held, order, group); order: no tie
        # reaches group
        tenants: dict[str | None, list[tuple[int, int, int, Hashable]]] = {}
        for order, group in enumerate(queues):
            head = queues[group][0]
            tenants.setdefault(head.adapter, []).append((not head.resuming, held[group], order, group))
        # the tenants' turns: (rows held, order of its next request, tenant); orders are unique, so no tie reaches
        # the tenant (None for the base model is not comparable with a name)
        turns = []
        for tenant, groups in tenants.items():
            heapq.heapify(groups)
            turns.append((held_by_tenant[tenant], groups[0][2], tenant))
        heapq.heapify(turns)
        admitted: list[_Request] = []
        # the prefill this admits runs each distinct context once (DecodeBatch.start_prefill: a request's n choices
        # of one prompt are one row), so the budget counts distinct contexts: n = 200 choices of a 512-token prompt
        # were admitted 8 a step under a budget of 4096, each step's prefill running one of them
        contexts: set[tuple] = set()
        longest = 0
        while turns and len(admitted) < free:
            count, _, tenant = turns[0]
            groups = tenants[tenant]
            _, group_count, order, group = groups[0]
            head = queues[group][0]
            context = (tuple(head.prompt), tuple(head.tokens), head.adapter,
                       head.params.prompt_logprobs if head.scores else None)
            fresh = context not in contexts
            longest_if = max(longest, head.context)
            if admitted and fresh and longest_if * (len(contexts) + 1) > self.max_prefill_tokens:
                break
            heapq.heappop(turns)
            heapq.heappop(groups)
            admitted.append(queues[group].popleft())
            contexts.add(context)
            longest = longest_if
            if queues[group]:
                heapq.heappush(groups, (not queues[group][0].resuming, group_count + 1, order, group))
            if groups:
                heapq.heappush(turns, (count + 1, groups[0][2], tenant))
        return admitted

    def _preemptions(self, staying: list[_Request], free: int) -> list[_Request]:
        """Running rows to pre-empt now so that tenants below their fair share get rows (under the lock; none if a
        row is free for each).

        Fair share: ``max_batch_rows`` // the tenants with rows running or waiting (at least 1). A tenant below it
        with rows waiting *needs* rows up to it (at most its waiting rows). What the free rows do not cover is
        taken from the tenants above their share, down to their share and no further: first the rows of theirs
        that end within ``preempt_wait_steps`` steps anyway (their ``max_new_tokens`` left; those are waited for),
        then pre-emptions, one at a time from the tenant holding the most rows, its row cheapest to recompute
        (fewest prompt + generated tokens; ties: the latest admitted), never one of those ending soon.

        Why it settles: only a tenant above its share loses a row, and only to tenants below it, so a pre-empted
        tenant keeps at least its share and never pre-empts back for that row; rows that free go to the tenant
        holding the fewest, so shares kept do not need pre-emptions again. Pre-emptions happen only when a tenant
        comes (or comes back) below its share while the batch is full."""
        waiting = collections.Counter(r.adapter for r in self._waiting)
        held = collections.Counter(r.adapter for r in staying)
        share = max(1, self.max_batch_rows // len(set(waiting) | set(held)))
        need = sum(min(share - held[t], n) for t, n in waiting.items() if held[t] < share)
        if need <= free:
            return []
        ending = collections.Counter(r.adapter for r in staying
                                     if r.params.max_new_tokens - r.generated <= self.preempt_wait_steps)
        spare: dict[str | None, int] = {}  # tenant above its share -> rows it can still lose by pre-emption
        for tenant, count in held.items():
            above = count - share
            if above > 0:
                waited_for = min(ending[tenant], above)
                need -= waited_for
                spare[tenant] = above - waited_for
        deficit = need - free
        if deficit <= 0:
            return []
        candidates = {t: sorted((r for r in staying if r.adapter == t
                                 and r.params.max_new_tokens - r.generated > self.preempt_wait_steps),
                                key=lambda r: (r.context, -r.admitted))
                      for t, n in spare.items() if n > 0}
        holding = {t: held[t] for t in candidates}
        victims: list[_Request] = []
        while len(victims) < deficit:
            able = [t for t in candidates if spare[t] > 0 and candidates[t]]
            if not able:
                break
            tenant = max(able, key=lambda t: holding[t])  # the first of equals: the tenant admitted earliest
            victims.append(candidates[tenant].pop(0))
            spare[tenant] -= 1
            holding[tenant] -= 1
        return victims

    def _suspend(self, batch: DecodeBatch, preempted: list[_Request]) -> None:
        """Pre-empted rows leave the batch (their past is dropped); they wait, to be prefilled again."""
        if not preempted:
            return
        batch.remove(r.row for r in preempted if r.row is not None)
        for request in preempted:
            request.row = None
            request.stream.preemptions += 1
            self.preemptions += 1
            self._observe("preempted", adapter=request.adapter, generated_tokens=request.generated,
                          recompute_tokens=request.context)

    def _start_prefill(self, batch: DecodeBatch, admitted: list[_Request]) -> None:
        """The admitted rows' prefill, queued to run chunk by chunk (:meth:`_prefill_chunks`)."""
        snapshot = self.session.snapshot()  # every row admitted now starts on the bank of this moment
        rows = []
        now = time.perf_counter()
        for request in admitted:
            if not request.resuming:  # a pre-empted row resumes on its own snapshot, with its own prompt + tokens
                request.stream.started_at = now
                self._observe("started", adapter=request.adapter, queue_s=now - request.stream.queued_at)
                if request.adapter is not None and request.adapter not in snapshot.slots:  # unloaded while queued
                    self._fail(request, not_loaded(request.adapter))
                    continue
                request.snapshot = snapshot
            if request.scores and self._take_shared_scores(request) and request.params.max_new_tokens == 0:
                self._end(request, "length")  # the prompt alone was asked for, and another row scored it
                continue
            request.row = DecodeRow([*request.prompt, *request.tokens], request.adapter, request.snapshot,
                                    owner=request, score=request.params.prompt_logprobs if request.scores else None)
            rows.append(request.row)
        # rows scoring their prompt run every position's logits: a prefill of their own, so the others' keeps the
        # last position's only (they never pay for the output layer on prompts they do not score)
        for group in ([r for r in rows if r.score is None], [r for r in rows if r.score is not None]):
            if group:
                self._fail_prefilling(batch.start_prefill(group, chunk_tokens=self.max_prefill_tokens))

    def _take_shared_scores(self, request: _Request) -> bool:
        """Whether another row of ``request``'s request scored the same prompt on the same adapter and bank snapshot,
        asking as many alternatives (its ``n`` choices, admitted in an earlier step: a full batch): then its scores are
        ``request``'s, delivered now (before its first token), and its prefill need not score. Else the scores it
        gets are kept for those rows (rows admitted in one step are scored once in their prefill, see
        :meth:`DecodeBatch._score <bca_deploy.serving.decoding.DecodeBatch>`)."""
        # ids, not the objects: a key holding the group (the request itself, for a row of its own) would keep its
        # value alive through it, a leak; an id is not reused while the entry lives (its rows hold group and snapshot)
        key = (id(request.group), tuple(request.prompt), request.adapter, id(request.snapshot),
               request.params.prompt_logprobs)
        shared = self._shared_scores.get(key)
        if shared is None:
            shared = self._shared_scores[key] = _SharedScores()
        request.shared = shared
        if shared.items is None:
            return False
        request.scored = True
        self._outbox.append((request.stream, _PromptScores(list(shared.items))))
        return True

    def _prefill_chunks(self, batch: DecodeBatch) -> None:
        """This step's prefill runs: ``max_prefill_tokens`` shared by the prefills in progress, the one with the
        fewest tokens left first (then the earliest), each taking a chunk of what is left of the budget (the first
        always runs, a column at least). Fewest-left-first ends the most prefills soonest: a short prompt that
        arrives during a long one's chunks starts first, and equal prompts end one after another, freeing their
        batch rows early, instead of all at the end (as turns would). The long one gets whatever the short ones
        leave of each step's budget. Rows whose prefill is done get their first token."""
        left = self.max_prefill_tokens
        for job in sorted(batch.prefilling, key=lambda j: j.tokens_left):  # stable: the earliest among equals
            columns = min(job.columns, left // len(job.running))  # rows that run: followers cost nothing
            if columns == 0 and left < self.max_prefill_tokens:
                continue  # the budget is spent: next step
            start = time.perf_counter()
            batch.prefill_chunk(job, columns)
            rows, tokens = job.last_run
            self.prefills += 1
            left -= tokens
            now = time.perf_counter()
            done = [job.rows[i] for i in job.live] if job.finished else []
            self._count_batch([job.rows[i] for i in job.live], rows)
            # rows resuming after a pre-emption: the gap since their previous token (their next comes from this run)
            gaps = [now - r.owner.last_token_at for r in done if r.owner.generated]
            self._observe("prefill", rows=rows, tokens=tokens, seconds=now - start, inter_token_s=gaps)
            self._fail_prefilling(job)
            if done:
                logits = job.logits[np.array(job.live)]
                if job.scoring:  # the prompt's log-probabilities go before the first token (or the end)
                    for i in job.live:
                        request = job.rows[i].owner
                        request.scored = True
                        self._outbox.append((request.stream, _PromptScores(job.scores.get(i, []))))
                        if request.shared is not None and request.shared.items is None:
                            request.shared.items = tuple(job.scores.get(i, ()))
                    keep = [k for k, row in enumerate(done) if row.owner.params.max_new_tokens > 0]
                    if len(keep) < len(done):  # max_new_tokens 0: the prompt alone was asked for
                        scored_only = [row for row in done if row.owner.params.max_new_tokens == 0]
                        batch.remove(scored_only)
                        for row in scored_only:
                            self._end(row.owner, "length")
                        done, logits = [done[k] for k in keep], logits[keep]
                if done:
                    self._emit(batch, done, logits, {}, first=True)

    def _fail_prefilling(self, job: PrefillJob) -> None:
        """Rows that failed in ``job`` since the last call fail now (their neighbours go on)."""
        for index in sorted(set(job.failures) - job.reported):
            job.reported.add(index)
            self._fail(job.rows[index].owner, job.failures[index])

    def _step(self, batch: DecodeBatch) -> None:
        start = time.perf_counter()
        rows, logits, failures = batch.step()
        self.steps += 1
        seconds = time.perf_counter() - start
        self._overlapping = seconds >= OVERLAP_MIN_STEP_S
        requests = self._count_batch(rows, len(rows))
        gaps = self._emit(batch, rows, logits, failures, first=False)
        self._observe("step", rows=len(rows), requests=requests, seconds=seconds, tokens=len(rows) - len(failures),
                      inter_token_s=gaps)

    @staticmethod
    def _count_batch(rows: list[DecodeRow], batch_rows: int) -> int:
        """Record on each row's stream the largest batch it was part of; returns the distinct requests."""
        streams = [r.owner.stream for r in rows]
        requests = len({s.request_id or id(s) for s in streams})  # a row without an id is a request of its own
        for stream in streams:
            if stream.batch_rows < batch_rows:
                stream.batch_rows = batch_rows
            if stream.batch_requests < requests:
                stream.batch_requests = requests
        return requests

    def _emit(self, batch: DecodeBatch, rows: list[DecodeRow], logits: np.ndarray, failures: Mapping[int, Exception],
              first: bool) -> list[float]:
        """Choose, send and account each row's next token; rows that are done leave. Returns inter-token gaps."""
        for index, exc in failures.items():
            self._fail(rows[index].owner, exc)
        if failures:
            ok = [b for b in range(len(rows)) if b not in failures]
            if not ok:
                return []
            logits = logits[ok]
            rows = [rows[b] for b in ok]
        # the logits as they came (no copy of a (rows, vocabulary) array per step when no row failed)
        tokens, unsampled = choose_tokens(logits, [row.owner.sampler for row in rows])
        if unsampled:
            for i, exc in unsampled.items():  # e.g. non-finite logits: that row fails and leaves, no other
                self._fail(rows[i].owner, exc)
            batch.remove(rows[i] for i in unsampled)
        # log-probabilities of the raw logits (choose_tokens put its penalties and masks back), for the rows that ask
        asked = [i for i, row in enumerate(rows) if row.owner.params.logprobs is not None
                 and not (unsampled and i in unsampled)]
        logprobs = dict(zip(asked, token_logprobs(logits, asked, [tokens[i] for i in asked],
                                                  [rows[i].owner.params.logprobs for i in asked]))) if asked else {}
        now = time.perf_counter()
        gaps, done = [], []
        outbox = self._outbox
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if unsampled and i in unsampled:
                continue
            request: _Request = row.owner
            stream = request.stream
            if first and not request.generated:  # a resumed row's token after a prefill is no first token
                stream.first_token_at = now
                self._observe("first_token", adapter=request.adapter, ttft_s=now - stream.queued_at)
            else:
                gaps.append(now - request.last_token_at)
            request.last_token_at = now
            request.generated += 1
            request.tokens.append(token)
            reason = None
            if token in request.eos_ids:
                text, reason = request.detokenizer.flush(), "stop"
            else:
                text, hit = request.detokenizer.push(token)
                if hit:  # a stop string: the text is cut before it
                    reason = "stop"
                elif token in request.params.stop_token_ids:  # the token's own text is kept, as vLLM keeps it
                    text, reason = text + request.detokenizer.flush(), "stop"
                elif request.generated >= request.params.max_new_tokens:
                    text, reason = text + request.detokenizer.flush(), "length"
            outbox.append((stream, TokenEvent(token, text, logprobs.get(i))))
            if reason is None:
                row.next_token = token
            else:
                done.append(row)
                self._end(request, reason)
        if done:
            batch.remove(done)
        return gaps

    def _leave(self, batch: DecodeBatch, requests: list[_Request], reason: str) -> None:
        rows = [r.row for r in requests if r.row is not None]
        batch.remove(rows)
        for request in requests:
            self._end(request, reason)

    def _retire(self, request: _Request) -> None:
        """The row is over (ended or failed): its time is taken and it no longer counts as running."""
        request.stream.finished_at = time.perf_counter()
        with self._cond:
            if request in self._running:
                self._running.remove(request)
                self._changed = True

    def _end(self, request: _Request, reason: str) -> None:
        self._retire(request)
        if reason != "cancelled":
            self._outbox.append((request.stream, reason))
        self._observe_finished(request, reason)

    def _fail(self, request: _Request, error: BaseException) -> None:
        self._retire(request)
        self._outbox.append((request.stream, error))
        self._observe("failed", adapter=request.adapter, error=f"{type(error).__name__}: {error}")

    # ---- delivery and metrics ------------------------------------------------------------------------------

    def _take_outbox(self) -> list[tuple[GenerationStream, Any]]:
        items, self._outbox = self._outbox, []
        return items

    def _deliver_later(self) -> None:
        """Hand this step's deliveries to the event loop. One wake-up at a time: while the loop has not run the
        last one, new items join it (fewer thread hand-overs when the loop is busy, no added delay when not)."""
        items = self._take_outbox()
        if not items or self._loop is None:
            return
        with self._hand_lock:
            self._handed.extend(items)
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self._wake.release()  # a C lock: no GIL hand-over here (see _waker)

    def _waker(self) -> None:
        """Wakes the event loop for the engine thread.

        Writing the loop's wake-up byte releases the GIL around the system call, and the woken loop thread takes
        it; done in the engine thread, that thread would then queue for the GIL (on a busy machine, for an OS
        time slice) before its next run. Done here, the engine thread is already inside onnxruntime (GIL free)
        while the loop handles the tokens. ``_wake`` is a binary semaphore: released once per pending wake-up.
        """
        while True:
            self._wake.acquire()
            if self._stopping:
                return
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _drain(self) -> None:
        with self._hand_lock:
            items, self._handed = self._handed, []
            self._wakeup_pending = False
        self._deliver(items)

    @staticmethod
    def _deliver(items: list[tuple[GenerationStream, Any]]) -> None:
        for stream, item in items:
            if isinstance(item, TokenEvent):
                stream._push(item)
            elif isinstance(item, _PromptScores):
                if not stream.done:
                    stream.prompt_logprobs = item.items
            elif isinstance(item, BaseException):
                stream._finish(None, item)
            else:
                stream._finish(item)

    def _observe_finished(self, request: _Request, reason: str) -> None:
        stream = request.stream
        end = stream.finished_at or time.perf_counter()
        self._observe("finished", adapter=request.adapter, finish_reason=reason, prompt_tokens=stream.prompt_tokens,
                      completion_tokens=request.generated,
                      queue_s=(stream.started_at - stream.queued_at) if stream.started_at else end - stream.queued_at,
                      ttft_s=(stream.first_token_at - stream.queued_at) if stream.first_token_at else None,
                      seconds=end - stream.queued_at)

    def _observe(self, event: str, **values: Any) -> None:
        if self.observer is None:
            return
        try:
            self.observer(event, values)
        except Exception:  # noqa: BLE001 - metrics must never break generation; log once per event kind
            if event not in self._observer_failed:
                self._observer_failed.add(event)
                _log.warning("generation observer failed on %r: %s", event, traceback.format_exc())
