"""``bca-deploy serve``: an HTTP front for :class:`~bca_deploy.serving.MultiAdapterSession` (FastAPI on uvicorn).

Native endpoints (JSON in and out):

    GET    /health                     status, task, number of loaded adapters (HEAD: the status alone)
    GET    /v1/adapters                loaded adapters (+ names available in the store)     403 if listing is off
    POST   /v1/adapters                {"name", "replace"?}: load <store>/<name>            201 / 404 / 409 / 422
    DELETE /v1/adapters/{name}         unload                                               200 / 404
    POST   /v1/embeddings              {"input", "adapter"?, "pooling"?, "normalize"?}      encoders
                                       (or OpenAI's {"model", "input", ...}: see below)
    POST   /v1/classify                {"input", "adapter"?}  (input: texts, pairs, ids)    text-classification
    POST   /v1/generate                {"input", "adapter"?, "max_new_tokens"?, "do_sample"?,
                                        "temperature"?, "top_k"?, "top_p"?, "seed"?,
                                        "repetition_penalty"?, "frequency_penalty"?,
                                        "presence_penalty"?, "min_p"?, "logit_bias"?,
                                        "logprobs"?, "prompt_logprobs"?}                    decoders with past
    GET    /metrics                    Prometheus metrics (:mod:`bca_deploy.serving.metrics`)

and the OpenAI-compatible ones of :mod:`bca_deploy.serving.openai` (``/v1/models``,
``/v1/embeddings`` with ``model``, ``/v1/completions``, ``/v1/chat/completions``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, and vLLM's ``/tokenize``, ``/detokenize`` and ``/version``).

``input`` is a text, a list of texts, a token-id list, or a list of token-id lists; ``adapter`` is a loaded adapter's
name, or null for the base model. Errors follow :mod:`bca_deploy.serving.wire` (one status per error
type, OpenAI's JSON shape, no paths or internal text).

Every request is checked in full before it joins a batch (body size and timeout while it arrives,
JSON, fields, rows, text lengths, token ids and positions, the adapter, room in the queue), so a bad
request fails alone. Concurrent embedding/classification requests are **micro-batched**: requests of
one kind that arrive within ``max_wait_ms`` of each other run as one mixed batch of at most
``max_batch_rows`` rows, each row through its own adapter; a larger request runs in several batches,
and requests take turns (the least-served first), so a big request neither holds a batch's memory
beyond ``max_batch_rows`` nor makes a small one wait for all of it. A batch runs on one snapshot of
the adapter bank, so loading or unloading during traffic never mixes adapters. If a batch of several
requests fails, each request is run alone once, so only the one that fails alone gets the error.
Every request writes one JSON log line (logger ``bca_deploy.serve``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import json
import errno
import functools
import heapq
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union
from urllib.parse import unquote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BCAError, ContextLengthError, ServingError, UnknownAdapterError, first_line, printable
from .chat_template import (CHAT_TOKENIZE_OPTIONS, ChatTemplateRenderer, ChatTemplateRenderError, RenderedTooLongError,
                            chat_template_source)
from .limits import MAX_LOGPROBS
from .openai import check_logprob_entries
from .options import ServeOptions
from .session import BASE, KIND_NEEDS, AdapterInfo, MultiAdapterSession, check_adapter_name, not_loaded
from .store import AdapterStore, redact_roots
from .wire import (
    READ_METHODS,
    AdapterExistsError,
    AdapterLimitError,
    ClientClosedRequestError,
    InvalidHTTPError,
    ForbiddenError,
    InternalServerError,
    NonFiniteOutputError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    RequestTimeoutError,
    ServerBusyError,
    WrongTaskError,
    JSONNumber,
    body_too_large,
    body_too_slow,
    check_body_headers,
    field_errors,
    check_rows,
    error_body,
    error_status,
    is_openai_request,
    json_answer,
    parse_body,
    validate_body,
)

__all__ = ["create_app", "build", "run_server", "configure_logging", "ServerThread", "MicroBatcher", "Server",
           "LOGGER_NAME"]

if TYPE_CHECKING:
    from .metrics import ServerMetrics

LOGGER_NAME = "bca_deploy.serve"
_log = logging.getLogger(LOGGER_NAME)

Inputs = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
#: A classifier's example of two texts (``[first, second]``), as it was trained on two text columns.
TextPair = tuple[StrictStr, StrictStr]


def _rows(inputs: Inputs) -> list:
    """One row per text, text pair or token-id list; a text, or one flat token-id list (as OpenAI's ``prompt`` takes
    it), is one."""
    if isinstance(inputs, str) or (inputs and not isinstance(inputs[0], (str, list, tuple))):
        return [inputs]
    return list(inputs)


def _unwrapped(exc: Exception) -> Exception:
    """Our own error behind Starlette's "Caught handled exception, but response already started" (raised
    when a streamed answer fails after its status line went out, e.g. a client that stopped reading)."""
    if type(exc) is RuntimeError and isinstance(exc.__cause__, BCAError):
        return exc.__cause__
    return exc


#: Seconds a 503 (a full queue or connection table) asks the client to wait, in its ``retry-after`` header.
RETRY_AFTER_S = 1

#: The ``method`` label values of ``bca_requests_total``; any other method a client sends is ``"other"``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def _answered(request: Request, work: Any) -> Any:
    """Await ``work`` (a coroutine or future), unless the client closes the connection first (a timed-out
    client, a killed process): then ``work`` is cancelled, so its rows leave the batch, and
    :class:`ClientClosedRequestError` is raised (499). Without this, a gone request's rows would run to the
    end in places other requests wait for."""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            work.add_done_callback(_retrieved)  # a cancelled gather keeps its CancelledError: read it, no log noise
    if work not in done:
        raise ClientClosedRequestError("the client closed the connection before its answer was ready; its work "
                                       "was stopped")
    return work.result()


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    """Return when the client has closed the connection (its body was read: what arrives next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _log_json(entry: dict[str, Any], level: int = logging.INFO) -> None:
    _log.log(level, json.dumps(entry, separators=(",", ":"), default=str))


# ---- micro-batching -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    kind: str
    rows: list
    adapter: str | None
    params: dict[str, Any]
    future: asyncio.Future
    seq: int
    enqueued: float = field(default_factory=time.perf_counter)
    taken: int = 0  # rows handed to batches so far
    finished: int = 0  # rows answered so far
    turns: int = 0  # batches this job has been part of (the least-served job goes first)
    parts: dict[int, list] = field(default_factory=dict)  # first row -> results of that piece
    batch_rows: int = 0  # of its first batch (the request log)
    batch_requests: int = 0
    started: float = 0.0

    def group(self) -> tuple:
        # Jobs of one group can share a batch: generation takes per-row parameters, embeddings share pooling.
        if self.kind == "embed":
            return (self.kind, self.params["pooling"], self.params["normalize"])
        return (self.kind,)


@dataclass(eq=False)
class _Piece:
    job: _Job
    start: int
    end: int


@dataclass(eq=False)
class _Filling:
    """A batch being built by :meth:`MicroBatcher._fill`."""

    pieces: dict[int, _Piece] = field(default_factory=dict)  # id(job) -> its rows in this batch
    by_tenant: collections.Counter = field(default_factory=collections.Counter)  # adapter -> rows in this batch
    held_back: set[int] = field(default_factory=set)  # id(job) of jobs whose next row would not fit
    rows: int = 0
    longest: int = 0
    shortest: int = 0


#: Rows of one embedding/classification batch are padded to its longest: a row joins a batch only if the batch's
#: longest row stays within this factor of max(its shortest row, BATCH_LENGTH_FLOOR tokens). A tenant's short row
#: was padded to another tenant's 512-token rows (its batch as slow as theirs: 8 s queued on 2 loaded cores); now it
#: runs in a batch of rows like it. Below the floor, padding costs too little to split a batch for.
BATCH_LENGTH_FACTOR = 4
BATCH_LENGTH_FLOOR = 32


def _lengths_fit(shortest: int, longest: int) -> bool:
    """Whether rows from ``shortest`` to ``longest`` tokens go in one batch (:data:`BATCH_LENGTH_FACTOR`)."""
    return longest <= BATCH_LENGTH_FACTOR * max(shortest, BATCH_LENGTH_FLOOR)


class MicroBatcher:
    """Collects concurrent jobs into mixed-adapter batches and runs them one at a time off the event loop.

    A batch is closed when it holds ``max_batch_rows`` rows (or ``max_batch_tokens`` padded tokens) or
    ``max_wait_ms`` after its first job arrived. A job of more rows runs in pieces over several batches. When jobs
    compete, a batch's rows go to tenants (the adapter a job names) in turn, the one holding the fewest rows of the
    batch first, and within a tenant to the job that has been in the fewest batches (then the oldest): see
    :meth:`_fill`. A job whose adapter is unknown when
    its batch starts fails alone (404). ``on_batch(kind, rows, queue_seconds)`` is called after each
    batch that ran (``queue_seconds``: for the jobs that started in it).
    """

    def __init__(self, session: MultiAdapterSession, max_batch_rows: int = 64, max_wait_ms: float = 5.0,
                 on_batch=None, max_batch_tokens: int | None = None) -> None:
        if max_batch_rows < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
            raise ServingError("max_batch_rows and max_batch_tokens must be >= 1")
        self.session = session
        self.max_batch_rows = int(max_batch_rows)
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max(float(max_wait_ms), 0.0) / 1000.0
        self.on_batch = on_batch
        self._pending: list[_Job] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._seq = itertools.count()
        # One inference thread: batches run one after another (onnxruntime uses its own intra-op threads).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bca-infer")
        self._running = 0  # batches in the inference thread now
        self.batches = 0

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="bca-microbatcher")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking batches and wait for the one running, at most ``timeout`` seconds (None: until it ends);
        past that it is left to end on its own: a batch stuck in onnxruntime does not hold the server's shutdown."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)

    async def submit(self, kind: str, rows: list, adapter: str | None, params: dict[str, Any]) -> tuple[Any, _Job]:
        """Queue ``rows`` and wait for their results (a list, one item per row)."""
        if self._arrived is None:
            raise ServingError("the batcher is not running")
        job = _Job(kind, rows, adapter, params, asyncio.get_running_loop().create_future(), next(self._seq))
        self._pending.append(job)
        self._arrived.set()
        return await job.future, job

    async def _next_batch(self) -> list[_Piece]:
        assert self._arrived is not None
        while True:
            self._pending = [j for j in self._pending if not j.future.done()]  # cancelled by their clients
            if self._pending:
                break
            self._arrived.clear()
            await self._arrived.wait()
        first = min(self._pending, key=lambda j: (j.turns, j.seq))
        group, deadline = first.group(), first.enqueued + self.max_wait
        filling = _Filling()
        while True:
            self._fill(filling, group)
            timeout = deadline - time.perf_counter()
            if filling.rows >= self.max_batch_rows or timeout <= 0:
                return list(filling.pieces.values())
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return list(filling.pieces.values())

    def _fill(self, filling: _Filling, group: tuple) -> None:
        """Adds the pending rows of ``group`` that fit to the batch being built, one row at a time: to the tenant
        (the adapter a job names; the base model is one) holding the fewest rows of the batch (ties: the tenant
        whose first job is first in turn), from its jobs in turn (the fewest batches so far, then the oldest), each
        job's rows in order. A row that would take the batch over ``max_batch_tokens``, or whose length is too far
        from the batch's rows' (:data:`BATCH_LENGTH_FACTOR`), holds its job back to a later batch (a first row always
        fits).

        Tenants first, so one tenant's many small requests (or one big one) share each batch with another
        tenant's instead of queueing it behind all of theirs, as first-come-first-served would."""
        queues: dict[str | None, collections.deque[_Job]] = {}
        for job in sorted(self._pending, key=lambda j: (j.turns, j.seq)):
            if job.group() == group and not job.future.done() and id(job) not in filling.held_back:
                queues.setdefault(job.adapter, collections.deque()).append(job)
        # (rows in the batch, turn of its first job, tenant): turns are unique, so no tie reaches the tenant (None
        # for the base model does not compare with a name)
        turns = [(filling.by_tenant[tenant], order, tenant) for order, tenant in enumerate(queues)]
        heapq.heapify(turns)
        while turns and filling.rows < self.max_batch_rows:
            count, order, tenant = heapq.heappop(turns)
            queue = queues[tenant]
            job = queue[0]
            length = len(job.rows[job.taken])
            longest = max(filling.longest, length)
            shortest = min(filling.shortest, length) if filling.rows else length
            piece = filling.pieces.get(id(job))
            # a request's own rows may differ in length (its padding delays only itself); another's must fit
            alone = filling.rows == (piece.end - piece.start if piece is not None else 0)
            over_budget = self.max_batch_tokens is not None and (filling.rows + 1) * longest > self.max_batch_tokens
            if filling.rows and (over_budget or not (alone or _lengths_fit(shortest, longest))):
                filling.held_back.add(id(job))  # the batch only grows: it stays held back from this one
                queue.popleft()
            else:
                if piece is None:
                    piece = filling.pieces[id(job)] = _Piece(job, job.taken, job.taken)
                    job.turns += 1
                job.taken += 1
                piece.end = job.taken
                filling.rows, filling.longest, filling.shortest = filling.rows + 1, longest, shortest
                filling.by_tenant[tenant] += 1
                count += 1
                if job.taken == len(job.rows):
                    self._pending.remove(job)
                    queue.popleft()
            if queue:
                heapq.heappush(turns, (count, order, tenant))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pieces = await self._next_batch()
            snapshot = self.session.snapshot()
            runnable = []
            for piece in pieces:
                job = piece.job
                if job.future.done():
                    continue
                # an unknown adapter (unloaded meanwhile: the session's not_loaded), or classify on an adapter
                # without a head: refused alone, never its batch
                refusal = snapshot.refusal(job.adapter, job.kind)
                if refusal is not None:
                    job.future.set_exception(refusal)
                else:
                    runnable.append(piece)
            if not runnable:
                continue
            rows = sum(p.end - p.start for p in runnable)
            started = time.perf_counter()
            waits = []
            for piece in runnable:
                job = piece.job
                if not job.started:
                    job.batch_rows, job.batch_requests, job.started = rows, len(runnable), started
                    waits.append(started - job.enqueued)
            try:
                results = await loop.run_in_executor(self._executor, self._run, runnable, snapshot)
            except Exception as exc:
                if len({id(p.job) for p in runnable}) == 1:
                    self._fail(runnable[0].job, exc)
                    continue
                # Several requests failed together: run each alone once, so only the culprit gets the error.
                results = []
                for piece in runnable:
                    try:
                        results.append((await loop.run_in_executor(self._executor, self._run, [piece], snapshot))[0])
                    except Exception as alone:
                        self._fail(piece.job, alone)
                        results.append(None)
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(runnable[0].job.kind, rows, waits)
            for piece, result in zip(runnable, results, strict=True):
                job = piece.job
                if result is None or job.future.done():
                    continue
                job.parts[piece.start] = result
                job.finished += piece.end - piece.start
                if job.finished == len(job.rows):
                    job.future.set_result([r for start in sorted(job.parts) for r in job.parts[start]])

    @staticmethod
    def _fail(job: _Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)

    def _run(self, pieces: list[_Piece], snapshot) -> list[list]:
        """One mixed batch (in the inference thread): concatenate rows, run, split per piece."""
        self._running += 1
        try:
            return self._run_batch(pieces, snapshot)
        finally:
            self._running -= 1

    def _run_batch(self, pieces: list[_Piece], snapshot) -> list[list]:
        rows = [r for p in pieces for r in p.job.rows[p.start:p.end]]
        adapters = [p.job.adapter for p in pieces for _ in range(p.start, p.end)]
        kind = pieces[0].job.kind
        if kind == "embed":
            params = pieces[0].job.params
            out: Any = self.session.embed(rows, adapters, pooling=params["pooling"], normalize=params["normalize"],
                                          snapshot=snapshot)
        elif kind == "classify":
            out = self.session.classify(rows, adapters, snapshot=snapshot)
        elif kind == "generate":
            per_row = {key: [p.job.params[key] for p in pieces for _ in range(p.start, p.end)]
                       for key in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                   "repetition_penalty", "frequency_penalty", "presence_penalty", "min_p",
                                   "logit_bias")
                       if all(key in p.job.params for p in pieces)}
            # Each row of a request gets its own generator: seed + row index, so rows differ but stay reproducible.
            per_row["seed"] = [None if p.job.params["seed"] is None else p.job.params["seed"] + i
                               for p in pieces for i in range(p.start, p.end)]
            out = self.session.generate(rows, adapters, snapshot=snapshot, **per_row)
        else:  # pragma: no cover - kinds are fixed by the endpoints
            raise ServingError(f"unknown job kind {kind!r}")
        results, start = [], 0
        for p in pieces:
            results.append(list(out[start:start + p.end - p.start]))
            start += p.end - p.start
        return results


# ---- admission ---------------------------------------------------------------------------------------


class _Admission:
    """Rows admitted and not yet done (a generated row: until its last token), over all requests and per adapter; a
    request that would exceed either limit is refused (503), so one tenant's requests cannot fill the queue that
    every tenant shares."""

    def __init__(self, limit: int, per_adapter: int) -> None:
        self.limit = limit
        self.per_adapter = per_adapter
        self.rows = 0
        self.by_adapter: collections.Counter[str | None] = collections.Counter()

    def take(self, rows: int, adapter: str | None) -> Callable[..., None]:
        """Admit ``rows`` for ``adapter`` (None: the base model; or raise :class:`ServerBusyError`); returns the
        function that releases them: ``release(n)`` frees ``n`` of them (a generation row that has finished, its
        answer perhaps still being written to a slow client), ``release()`` what is left; never more than taken."""
        if self.rows + rows > self.limit:
            raise ServerBusyError(f"the server's queue is full ({self.rows} of {self.limit} rows waiting, "
                                  "--max-queued-rows); retry in a moment")
        held = self.by_adapter[adapter]
        if held + rows > self.per_adapter:
            whose = "the base model's requests" if adapter is None else f"adapter {adapter!r}'s requests"
            raise ServerBusyError(f"{whose} hold {held} of the {self.per_adapter} queued rows one adapter may hold "
                                  "(--max-queued-rows-per-adapter); retry in a moment")
        self.rows += rows
        self.by_adapter[adapter] += rows
        held_rows = rows

        def release(count: int | None = None) -> None:
            nonlocal held_rows
            freed = held_rows if count is None else min(count, held_rows)
            if freed > 0:
                held_rows -= freed
                self.rows -= freed
                self.by_adapter[adapter] -= freed
                if not self.by_adapter[adapter]:
                    del self.by_adapter[adapter]  # a bounded table: only adapters with rows waiting

        return release

    @contextlib.contextmanager
    def hold(self, rows: int, adapter: str | None):
        release = self.take(rows, adapter)
        try:
            yield
        finally:
            release()


# ---- native request bodies ----------------------------------------------------------------------------


class _Request(BaseModel):
    """Fields every native inference request has."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    input: Inputs = Field(description="a text, a list of texts, a token-id list, or a list of token-id lists")
    adapter: StrictStr | None = Field(default=None, description="a loaded adapter's name; null: the base model")


class EmbedRequest(_Request):
    """``POST /v1/embeddings``: one vector per input row."""

    pooling: Literal["mean", "cls", "last"] = "mean"
    normalize: StrictBool = False


class ClassifyRequest(_Request):
    """``POST /v1/classify``: label, score and per-label scores per input row (a text, a text pair or token ids)."""

    input: Union[Inputs, list[TextPair]] = Field(
        description="a text, a list of texts, a list of text pairs [first, second] (a classifier trained on two text "
                    "columns), a token-id list, or a list of token-id lists")


#: ``POST /v1/generate``'s default ``max_new_tokens`` (at most ``--max-new-tokens``, clipped to what fits in the
#: context: :meth:`Server.new_tokens`).
NATIVE_MAX_NEW_TOKENS = 32

#: The largest seed a request may give (seeds of a request's rows are seed, seed+1, ...: all stay in int64).
MAX_SEED = 2**62


class GenerateRequest(_Request):
    """``POST /v1/generate``: new tokens per prompt (greedy by default; sampled with ``do_sample``)."""

    max_new_tokens: StrictInt | None = Field(default=None, ge=1, description="default: 32, at most the server's "
                                                       "limit and what fits in the model's context after the prompt")
    do_sample: StrictBool = False
    temperature: JSONNumber = Field(default=1.0, gt=0, le=100)
    top_k: StrictInt = Field(default=0, ge=0, le=1_000_000)
    top_p: JSONNumber = Field(default=1.0, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    # vLLM's ranges; applied before the argmax or the temperature, as vLLM and transformers' generate apply them
    repetition_penalty: JSONNumber | None = Field(default=None, gt=0, description="> 0; default: the export's "
                                                  "generation_config.json value, else 1 (off)")
    frequency_penalty: JSONNumber = Field(default=0.0, ge=-2, le=2)
    presence_penalty: JSONNumber = Field(default=0.0, ge=-2, le=2)
    # vLLM's min_p (after the temperature, before top-k/top-p; 0: off) and OpenAI's logit_bias ({"token id": bias in
    # [-100, 100]}, checked in full by SamplingParams): the OpenAI routes' rules (see SamplingParams)
    min_p: JSONNumber = Field(default=0.0, ge=0, le=1)
    logit_bias: dict[str, Any] | None = None
    # log-probabilities (TGI's details / decoder_input_details / top_n_tokens, vLLM's names): the engine's numbers, as
    # the OpenAI routes list them (the raw distribution), bounded as theirs (MAX_LOGPROBS alternatives)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="each new token's "
                                       "log-probability and this many most likely alternatives'; null: off")
    prompt_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="each prompt "
                                              "token's log-probability (the first: null) and this many alternatives'; "
                                              "null: off")


class LoadRequest(BaseModel):
    """``POST /v1/adapters``: load ``<adapter store>/<name>``."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    replace: StrictBool = False


# ---- the server's state, shared by the native and OpenAI routes -------------------------------------


@dataclass(frozen=True)
class OpenAIEmbeddings:
    """How the OpenAI ``/v1/embeddings`` route makes a vector: the server's options where given, else what the
    export's sentence-transformers files say (:class:`~bca_deploy.sentence_embedding.EmbeddingRecipe`: pooling,
    normalisation, ``max_seq_length``), else mean pooling, normalised, texts cut at the model's limit. So a
    sentence-transformers model answers as ``SentenceTransformer(...).encode(..)`` does, as vLLM answers.

    ``notes``: what the files ask for that is not done (said at start)."""

    pooling: str
    normalize: bool
    max_text_tokens: int | None
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, session: MultiAdapterSession, options: ServeOptions) -> OpenAIEmbeddings:
        """Raises :class:`ServingError` when the files ask for a pooling not computed here and no
        ``--embedding-pooling`` chooses one (every vector would silently differ from the model's own)."""
        from bca_deploy.sentence_embedding import EmbeddingRecipe

        recipe = EmbeddingRecipe.read(session.export_dir)
        if recipe.pooling_problem and options.embedding_pooling is None:
            raise ServingError(f"{recipe.pooling_problem}: pass --embedding-pooling (mean, cls or last) to serve "
                               "/v1/embeddings with another pooling knowingly")
        normalize = options.embedding_normalize
        if normalize is None:
            normalize = recipe.normalize if recipe.normalize is not None else True
        return cls(options.embedding_pooling or recipe.pooling or "mean", normalize, recipe.max_seq_length,
                   recipe.problems)


def _rendered_with(template_kwargs: Mapping[str, Any] | None) -> str:
    """``", rendered with the template variables 'tools' (chat_template_kwargs, documents, tools)"`` for a render's
    variables (its messages' errors name them: the template wrote and read them too); "" without any."""
    given = sorted(template_kwargs or ())
    if not given:
        return ""
    shown = ", ".join(repr(k[:40]) for k in given[:5]) + (", ..." if len(given) > 5 else "")
    return f", rendered with the template variables {shown} (chat_template_kwargs, documents, tools)"


def export_roots(export_dir: Path) -> list[str]:
    """The ways messages name the export's folder (as given, absolute, resolved), for :func:`redact_roots`."""
    return sorted({str(p) for p in (export_dir, export_dir.absolute(), export_dir.resolve())}, key=len, reverse=True)


class Server:
    """One served session: its store, options, batcher, queue and metrics, and the checks every route uses."""

    def __init__(self, session: MultiAdapterSession, store: AdapterStore | None, options: ServeOptions) -> None:
        from .metrics import ServerMetrics

        self.session, self.store, self.options = session, store, options
        self.admission = _Admission(options.max_queued_rows, options.queued_rows_per_adapter)
        self.metrics = ServerMetrics(lambda: session.snapshot().slots, lambda: self.admission.rows,
                                     show_adapters=options.list_adapters)
        self.batcher = MicroBatcher(session, max_batch_rows=options.max_batch_rows, max_wait_ms=options.max_wait_ms,
                                    on_batch=self._on_batch, max_batch_tokens=options.max_batch_tokens)
        self.model_name = served_model_name(options.served_model_name, session.export_dir, session.exported_adapters)
        self.embeddings = OpenAIEmbeddings.of(session, options) if session.serves("embed") else None
        self.engine = None
        if session.with_past:  # generation: continuous batching (rows join and leave the running batch every step)
            from .engine import GenerationEngine

            self.engine = GenerationEngine(session, max_batch_rows=options.max_batch_rows,
                                           max_queued_rows=options.max_queued_rows,
                                           max_prefill_tokens=options.max_prefill_tokens,
                                           preempt=options.preempt, preempt_wait_steps=options.preempt_wait_steps,
                                           observer=self._on_generation)
        # the chat route's template: rendered in worker processes, each render bounded (started on first use)
        self.chat_templates = ChatTemplateRenderer(lambda: session.tokenizer,
                                                   source=chat_template_source(session.export_dir),
                                                   timeout_s=options.chat_template_timeout_s,
                                                   memory_mb=options.chat_template_memory_mb,
                                                   workers=options.chat_template_workers)
        self._chat_ready = False
        self.checked = False  # startup_checks passed
        self.startup_error: BaseException | None = None  # why they did not, on the start of an app (ServerThread)
        self.stopping = False  # set by begin_shutdown
        self._load_lock: asyncio.Lock | None = None
        self._roots = export_roots(session.export_dir)

    # -- lifecycle --
    async def start(self) -> None:
        self._load_lock = asyncio.Lock()
        self.stopping = False
        self.chat_templates.reopen()  # closed by an earlier stop of this server
        await self.batcher.start()
        if self.engine is not None:
            await self.engine.start()

    def begin_shutdown(self) -> None:
        """The server is stopping (a signal): chat template renders in flight end now (503), so no request waits on
        a template that would not finish; the rest of the work in flight gets ``--shutdown-timeout-s`` to finish."""
        self.stopping = True
        self.chat_templates.close()

    async def stop(self) -> None:
        self.chat_templates.close()
        if self.engine is not None:
            await self.engine.stop(timeout=STOP_WAIT_S)
        await self.batcher.stop(timeout=STOP_WAIT_S)

    def _on_generation(self, event: str, values) -> None:
        """The engine's observer (its thread): generation metrics, measured where the tokens are made."""
        metrics = self.metrics
        if event == "step":
            metrics.batch_rows.labels("generate").observe(values["rows"])
            for gap in values.get("inter_token_s") or ():
                metrics.itl.observe(gap)
        elif event == "prefill":
            metrics.prefill_time.observe(values["seconds"])
            metrics.prefill_tokens.inc(values["tokens"])
            for gap in values.get("inter_token_s") or ():  # rows resuming after a pre-emption: their pause
                metrics.itl.observe(gap)
        elif event == "preempted":
            metrics.preemptions.labels(metrics.adapter_label(values["adapter"] or BASE)).inc()
            metrics.recompute_tokens.inc(values["recompute_tokens"])
        elif event == "started":
            metrics.queue_time.labels("generate").observe(values["queue_s"])
        elif event == "first_token":
            metrics.ttft.observe(values["ttft_s"])
        elif event == "finished":
            adapter = metrics.adapter_label(values["adapter"] or BASE)
            metrics.generated_tokens.labels(adapter).inc(values["completion_tokens"])
            metrics.prompt_tokens.labels(adapter).inc(values["prompt_tokens"])

    def _on_batch(self, kind: str, rows: int, waits: list[float]) -> None:
        self.metrics.batch_rows.labels(kind).observe(rows)
        for wait in waits:
            self.metrics.queue_time.labels(kind).observe(wait)

    # -- messages --
    def redact(self, message: str) -> str:
        """``message`` without the export's or the store's location."""
        message = redact_roots(message, self._roots, "<export>")
        return self.store.redact(message) if self.store is not None else message

    def public_info(self, info: AdapterInfo) -> dict[str, Any]:
        """An adapter's description for clients: where it came from as a word, never a path."""
        out = info.to_dict()
        source = Path(info.source)
        if self.store is not None and (source == self.store.root or self.store.root in source.parents):
            out["source"] = "store"
        elif source.is_relative_to(self.session.export_dir) or source.is_relative_to(self.session.export_dir.resolve()):
            out["source"] = "export"
        else:
            out["source"] = "python"
        out["block_sizes"] = list(info.block_sizes)
        return out

    # -- checks --
    def require(self, kind: str) -> None:
        """Refuse an endpoint the graph's task cannot serve (:class:`WrongTaskError`)."""
        if not self.session.serves(kind):
            raise WrongTaskError(f"this server's graph was exported for {self.session.task!r}; {KIND_NEEDS[kind]}")

    def adapter(self, name: str | None, param: str = "adapter") -> str | None:
        """The adapter a request names (``None``: the base model), which must be loaded now."""
        if name is None or name == BASE or name == self.model_name:
            return None
        if name not in self.session.snapshot().slots:
            raise not_loaded(name, param)
        return name

    def select(self, request: Request, name: str | None, param: str = "adapter") -> str | None:
        """:meth:`adapter`, with the request's log entry and metrics label set first (a 404 is logged too)."""
        request.state.log["adapter"] = name
        request.state.adapter_param = param
        base = name is None or name in (BASE, self.model_name)
        request.state.adapter_label = self.metrics.adapter_label(BASE if base else name)
        return self.adapter(name, param)

    @staticmethod
    def error_param(exc: BaseException, state: Mapping[str, Any]) -> str | None:
        """The request field an error answer names (its ``param``): the error's own; for an adapter unloaded after
        the request named it (refused later, by the engine or the batcher), the field that named it (recorded by
        :meth:`select` in the request's state: the ASGI scope's ``"state"``, behind ``request.state``)."""
        param = getattr(exc, "param", None)
        if param is None and isinstance(exc, UnknownAdapterError):
            param = state.get("adapter_param")
        return param

    def check_rows(self, rows: int, param: str = "input") -> None:
        check_rows(rows, self.options.max_request_rows, param)

    def check_new_tokens(self, n: int, param: str = "max_new_tokens") -> None:
        if n > self.options.max_new_tokens:
            raise InvalidRequestError(f"{param}: {n} is above this server's limit of {self.options.max_new_tokens}",
                                      param=param)

    def repetition_penalty(self, asked: float | None) -> float:
        """A request's repetition penalty: its own, else generation_config.json's (as ``generate()`` and vLLM apply
        it, greedy or sampled), else 1 (off). The one rule of every generation route."""
        if asked is not None:
            return float(asked)
        return float(self.session.generation_defaults.repetition_penalty or 1.0)

    def new_tokens(self, asked: int | None, prompt_tokens: int, default: int | None,
                   param: str = "max_new_tokens") -> int:
        """The new tokens a row of ``prompt_tokens`` gets: the one rule of every generation route (native and OpenAI).

        ``asked`` (the request's own value) is kept as it is, refused (422) above ``--max-new-tokens``; one that does
        not fit in the model's context is refused later (400 ``context_length_exceeded``,
        :meth:`MultiAdapterSession.check_positions`), since the client asked for it. A default (``asked`` None) is
        ``default`` (None: as many as the server allows), at most ``--max-new-tokens``, clipped to what fits after the
        prompt (at least 1: a prompt that fills the context is then refused by its own field), as OpenAI and vLLM
        clip theirs: a prompt near the end of the context is answered, not refused for a value it never sent."""
        if asked is not None:
            self.check_new_tokens(asked, param)
            return asked
        limit = self.session.max_positions
        room = (limit - prompt_tokens) if limit else self.options.max_new_tokens
        return max(1, min(default or self.options.max_new_tokens, self.options.max_new_tokens, room))

    @staticmethod
    async def body(request: Request) -> bytes:
        """The request's body, once its headers are found fit to carry one (:func:`check_body_headers`: a 415 before
        the body is read, so an ``Expect: 100-continue`` client is not asked to send a body that will be refused)."""
        check_body_headers(request.headers)
        return await request.body()

    async def read(self, request: Request, model: type[BaseModel]) -> Any:
        """The request's JSON body checked against ``model`` (its content type and limits first, then every field)."""
        body = await self.body(request)
        data = await parse_body(body, self.options, request.headers)
        return await validate_body(model, data, len(body), self.options.max_request_rows)

    async def prepare(self, rows: list, max_new_tokens: int = 0, param: str = "input",
                      max_text_tokens: int | None = None, keep_tokens: int | None = None) -> list[list[int]]:
        """Token-id rows of a request (texts tokenized here, once), checked against the vocabulary and positions
        (``param``: the field that holds the rows, named by a :class:`ContextLengthError`); ``keep_tokens``: each row
        cut as vLLM's ``truncate_prompt_tokens`` cuts it (:meth:`MultiAdapterSession.prepare`)."""
        with field_errors(param):  # empty rows, token ids outside the vocabulary: the field is named
            return await run_in_threadpool(self.session.prepare, rows, max_new_tokens, param, max_text_tokens,
                                           keep_tokens)

    @property
    def max_model_len(self) -> int | None:
        """vLLM's ``max_model_len`` of this server (``/v1/models``, ``/tokenize``): the most tokens a row may hold
        (prompt and generated tokens) where it generates; for an encoder, the tokens a text is cut at (the model's
        positions, the tokenizer's ``model_max_length`` and a sentence-transformers ``max_seq_length`` where lower,
        512 where none is known), as vLLM gives a sentence-transformers model's."""
        session = self.session
        if session.with_past:
            return session.max_positions
        tokenizer = None
        with contextlib.suppress(ServingError):  # an export without a tokenizer: its positions alone
            tokenizer = session.tokenizer
        limit = session.text_limit(tokenizer) or 512
        seq = self.embeddings.max_text_tokens if self.embeddings is not None else None
        return min(limit, seq) if seq else limit

    async def infer(self, request: Request, kind: str, rows: list, adapter: str | None, params: dict[str, Any],
                    max_new_tokens: int = 0, max_text_tokens: int | None = None,
                    keep_tokens: int | None = None) -> tuple[list, list[list[int]]]:
        """Admit, tokenize and run ``rows`` through the batcher; (results, token rows). ``max_text_tokens``: texts are
        cut there where that is below the model's limit (a sentence-transformers ``max_seq_length``); ``keep_tokens``:
        vLLM's ``truncate_prompt_tokens`` (:meth:`prepare`)."""
        log = request.state.log
        log.update({"rows": len(rows), "kind": kind})
        self.check_rows(len(rows))
        with self.admission.hold(len(rows), adapter):
            if kind == "classify":  # texts for a head trained on text pairs (or the other way): refused, named
                with field_errors("input"):
                    self.session.check_text_pairs(rows, adapter)
            token_rows = await self.prepare(rows, max_new_tokens, max_text_tokens=max_text_tokens,
                                            keep_tokens=keep_tokens)
            result, job = await _answered(request, self.batcher.submit(kind, token_rows, adapter, params))
        log.update({"batch_rows": job.batch_rows, "batch_requests": job.batch_requests,
                    "queue_ms": round((job.started - job.enqueued) * 1000, 3)})
        if (row := _non_finite_row(kind, result)) is not None:  # JSON has no NaN: say what happened, not "a bug"
            name = f"adapter {adapter!r}" if adapter is not None else f"the base model {self.model_name!r}"
            raise NonFiniteOutputError(
                f"{name} gave NaN or infinite {'logits' if kind == 'classify' else 'values'} for input {row}: its "
                "weights overflow float32 on it. The server's operator should check that adapter (bca-deploy "
                "inspect); other adapters are unaffected")
        self.metrics.prompt_tokens.labels(self.metrics.adapter_label(adapter or BASE)).inc(
            sum(len(r) for r in token_rows))
        return result, token_rows

    async def chat_prompt(self, messages: list[dict[str, str]], adapter: str | None = None, *,
                          add_generation_prompt: bool = True, continue_final_message: bool = False,
                          template_kwargs: dict[str, Any] | None = None, add_special_tokens: bool = False,
                          count_only: bool = False, keep_tokens: int | None = None) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, rendered by :attr:`chat_templates` in a
        worker process within ``--chat-template-timeout-s`` and ``--chat-template-memory-mb``
        (:class:`~bca_deploy.serving.chat_template.ChatTemplateLimitError` past them); ``adapter`` (None: the base
        model) is the tenant whose renders share the workers with the others' (one tenant holds all but one).

        The text is ``apply_chat_template(messages, add_generation_prompt=..., continue_final_message=...,
        **template_kwargs)``'s (vLLM's request fields; ``template_kwargs`` checked by
        :func:`~bca_deploy.serving.chat_template.template_kwargs_problems`), tokenized without special tokens unless
        ``add_special_tokens`` (vLLM's: a BOS added on top of the template's own). ``count_only`` (vLLM's
        ``/tokenize``): the ids of a conversation past the model's context too, unchecked against the vocabulary (the
        rendered text is still bounded in characters). ``keep_tokens`` (vLLM's ``truncate_prompt_tokens``, a count):
        the rendered text's ids cut to their last ``keep_tokens`` as a completion's prompt is cut
        (:meth:`MultiAdapterSession.prepare`: the tokenizer's left truncation, its special tokens kept)."""
        if not self._chat_ready:  # the tokenizer may load now (seconds): off the event loop
            await run_in_threadpool(self._require_chat_template)
        limit = max(self.options.max_text_chars, CHAT_CHARS_PER_POSITION * (self.session.max_positions or 0))
        ids = functools.partial(self._chat_ids, add_special_tokens=add_special_tokens, count_only=count_only,
                                keep_tokens=keep_tokens)
        try:  # tokenized in the render's thread: one thread hop for both
            return await self.chat_templates.render(messages, limit, then=ids, tenant=adapter,
                                                    add_generation_prompt=add_generation_prompt,
                                                    continue_final_message=continue_final_message,
                                                    template_kwargs=template_kwargs)
        except RenderedTooLongError as exc:  # bounded before tokenizing: 4 MB of messages took 5 s of it
            # the template writes its variables too (a request's 128 tools: 900,000 characters of a 20-word chat):
            # named, or the client shortens the wrong thing
            raise ContextLengthError(
                f"messages: the conversation, as the chat template writes it{_rendered_with(template_kwargs)}, is "
                f"{exc.chars:,} characters; this server tokenizes at most {limit:,} (the larger of --max-text-chars "
                f"and {CHAT_CHARS_PER_POSITION} characters per position of the model's maximum context length of "
                f"{self.session.max_positions or 0} positions)", param="messages") from None
        except ChatTemplateRenderError as exc:  # the template's own refusal (e.g. roles that must alternate)
            # with template variables (chat_template_kwargs, documents, tools) the template read them too: say which,
            # a value of the wrong type ({"x": 5} where it loops over x) fails there, not in the messages
            raise InvalidRequestError(f"messages: {exc}{_rendered_with(template_kwargs)}", param="messages") from None

    def _require_chat_template(self) -> None:
        tokenizer = self.session.tokenizer  # ServingError if the export has none
        if not getattr(tokenizer, "chat_template", None):
            raise ServingError("this model's tokenizer has no chat template, so chat messages cannot be turned into "
                               "a prompt; use /v1/completions with a prompt instead")
        self._chat_ready = True

    def _chat_ids(self, text: str, add_special_tokens: bool = False, count_only: bool = False,
                  keep_tokens: int | None = None) -> list[int]:
        # The template writes special tokens (bos, role markers) as text: tokenize without adding them again,
        # as transformers' apply_chat_template(tokenize=True) does (unless the request asks, vLLM's
        # add_special_tokens); with one of the session's tokenizer copies, no more of a conversation past the context
        # than shows it is (refused naming "messages"), or, with keep_tokens, than its last tokens need (a suffix:
        # the completions' rule, one definition in MultiAdapterSession.prepare)
        options = {**CHAT_TOKENIZE_OPTIONS, "add_special_tokens": True} if add_special_tokens else CHAT_TOKENIZE_OPTIONS
        if count_only:  # /tokenize: every token counted, as vLLM counts them (the render bounded the characters)
            return self.session.tokenize([text], truncate=False, **options)[0]
        return self.session.prepare([text], input_param="messages", keep_tokens=keep_tokens, text_options=options)[0]

    def check_chat_template(self) -> None:
        """Start-up: render a one-message conversation through the chat template under the request bounds, so a
        template that loops, blows up or fails is refused before any traffic (:class:`ServingError` naming its
        file), not on every chat request. Nothing to check without a generation graph or a chat template."""
        if self.engine is None or self.session.tokenizer_problem is not None:
            return
        try:
            self._require_chat_template()
        except ServingError:
            return  # no template: chat requests are refused with a 400 that says so
        self.chat_templates.check()

    def startup_checks(self) -> None:
        """What a server checks before it takes requests, once: the session warmed up
        (:meth:`~bca_deploy.serving.MultiAdapterSession.warm_up`: config, tokenizer - one whose files do not load is
        refused -, onnxruntime's first run) and :meth:`check_chat_template`. :func:`build` and each ``serve-ray``
        replica run them before serving; an app made by :func:`create_app` alone runs them as it starts (its
        lifespan: a failure is uvicorn's "Application startup failed", the error on one line, no traceback).
        Raises :class:`ServingError` saying what is wrong; the chat template workers are stopped then."""
        if self.checked:
            return
        try:
            self.session.warm_up()
            self.check_chat_template()  # a chat template that loops, blows up or fails: refused now, not per request
        except BaseException:
            self.chat_templates.close()
            raise
        self.checked = True

    def sampling(self, **fields: Any):
        """:class:`~bca_deploy.serving.engine.SamplingParams`, its problems as :class:`InvalidRequestError`."""
        from .engine import SamplingParams, SamplingParamsError

        try:
            return SamplingParams(**fields)
        except SamplingParamsError as exc:
            raise InvalidRequestError(str(exc), param=exc.field) from None

    def submit(self, request: Request, prompts: list[list[int]], adapter: str | None, params: list) -> tuple[list, Any]:
        """Check every row (all before any is queued), then queue them on the engine; (streams, release).

        ``release`` frees the rows' place in the server's queue; call it once the streams are done (also on error).
        """
        from .engine import EngineOverloadedError, SamplingParamsError

        if self.engine is None:
            raise WrongTaskError(f"this server's graph was exported for {self.session.task!r}; generation is not "
                                 "available")
        for prompt, p in zip(prompts, params, strict=True):
            try:
                self.engine.check(prompt, adapter, p)
            except SamplingParamsError as exc:
                raise InvalidRequestError(str(exc), param=exc.field) from None
        release = self.admission.take(len(prompts), adapter)
        streams = []
        group = object()  # this request's rows take their turns for batch rows together (not by a client's id)
        try:
            for prompt, p in zip(prompts, params, strict=True):
                stream = self.engine.submit(prompt, adapter, p, request_id=request.state.request_id, group=group)
                # its queue place is freed when the row is done, not when a slow client has read the answer: a
                # client reading 4 KB/s held 2048 finished rows for 15 s and every other tenant got 503
                stream.add_end_callback(functools.partial(release, 1))
                streams.append(stream)
        except BaseException as exc:
            for stream in streams:
                stream.cancel()
            release()
            if isinstance(exc, EngineOverloadedError):
                raise ServerBusyError(str(exc)) from None
            raise
        request.state.log.update({"rows": len(prompts), "kind": "generate"})
        return streams, release

    @staticmethod
    async def collect(request: Request, streams: list) -> list:
        """Every stream's result, in order; the caller cancels the streams afterwards, whatever happened.

        Raises:
            ClientClosedRequestError: the client went away first (see :func:`_answered`).
        """
        return await _answered(request, asyncio.gather(*(s.collect() for s in streams)))

    @staticmethod
    async def unless_gone(request: Request, work: Any) -> Any:
        """``await work``, unless the client goes away first (see :func:`_answered`): a streamed answer's wait for
        its first event."""
        return await _answered(request, work)

    @staticmethod
    def log_streams(request: Request, streams: list) -> None:
        """The request log's batching and timing fields of finished streams."""
        started = [s for s in streams if s.started_at is not None]
        first = [s for s in streams if s.first_token_at is not None]
        request.state.log.update({
            "batch_rows": max((s.batch_rows for s in streams), default=0),
            "batch_requests": max((s.batch_requests for s in streams), default=0),
            "queue_ms": round(max((s.started_at - s.queued_at for s in started), default=0.0) * 1000, 3),
            "ttft_ms": round(max((s.first_token_at - s.queued_at for s in first), default=0.0) * 1000, 3),
            "prompt_tokens": sum(s.prompt_tokens for s in streams),
            "completion_tokens": sum(s.completion_tokens for s in streams)})

    # -- adapters --
    def check_management(self) -> None:
        """Refuse a client's load or unload of an adapter when the operator turned that off
        (:attr:`ServeOptions.manage_adapters`): one tenant must not unload another's adapter on a shared server."""
        if not self.options.manage_adapters:
            raise adapter_management_refused()

    async def load(self, name: str, entry: str | None = None, replace: bool = False, name_param: str = "name",
                   entry_param: str = "name") -> dict[str, Any]:
        """Load store entry ``entry`` (default: ``name``) as adapter ``name``; its public description.

        An entry the store does not have (or every entry, without a store) that names one of the adapters the
        graph was exported with comes from the export itself: an exported adapter that was unloaded loads again.
        ``name_param``/``entry_param``: the request fields that gave them (named by the errors).
        """
        source = entry or name
        exported = source in self.session.exported_adapters
        if self.store is None and not exported:
            raise ServingError("this server has no adapter store (start it with --adapter-store DIR)")
        with field_errors(name_param):
            check_adapter_name(name)
        if entry is not None:
            with field_errors(entry_param):
                check_adapter_name(entry)
        if name == self.model_name:
            raise InvalidRequestError(f"{name!r} is the base model's name on this server; pick another adapter name",
                                      param=name_param)
        assert self._load_lock is not None
        async with self._load_lock:  # one load at a time: "already loaded" is decided here, not raced
            loaded = self.session.snapshot().slots
            if name in loaded and not replace:
                raise AdapterExistsError(f"adapter {name!r} is already loaded; pass \"replace\": true to reload it")
            if name not in loaded and len(loaded) >= self.options.max_loaded_adapters:
                raise AdapterLimitError(f"this server holds its limit of {self.options.max_loaded_adapters} loaded "
                                        "adapters (--max-loaded-adapters); unload one first")
            path = None
            if self.store is not None:
                try:  # off the event loop, as the read: the store's file system may be slow
                    path = await run_in_threadpool(self.store.path, source)
                except UnknownAdapterError:
                    if not exported:
                        raise
            try:
                if path is None:
                    info = await run_in_threadpool(self.session.register_exported, source, name=name, replace=replace,
                                                   warn=functools.partial(log_foreign_base, name))
                else:
                    info = await run_in_threadpool(self._register_from_store, name, source, path, replace)
            except BCAError:
                raise
            except Exception as exc:  # a store entry the readers do not turn into a BCAError: say which, log why
                _log_json({"ts": round(time.time(), 3), "event": "adapter_load_failed", "adapter": name,
                           "error": f"{type(exc).__name__}: {exc}",
                           "traceback": "".join(traceback.format_exception(exc))}, logging.ERROR)
                from ..errors import AdapterFormatError

                raise AdapterFormatError(f"adapter {source!r} in the store cannot be read "
                                         f"({type(exc).__name__})") from None
        self.metrics.adapter_changes.labels("load").inc()
        return self.public_info(info)

    def _register_from_store(self, name: str, entry: str, path: Path, replace: bool) -> AdapterInfo:
        assert self.store is not None
        return register_from_store(self.session, self.store, name, entry, path, replace=replace)

    async def unload(self, name: str) -> dict[str, Any]:
        if name in (BASE, self.model_name) or name not in self.session.snapshot().slots:
            raise not_loaded(name)
        info = await run_in_threadpool(self.session.unregister, name)  # not_loaded if unloaded concurrently
        self.metrics.adapter_changes.labels("unload").inc()
        self.metrics.forget_adapter(name)
        return self.public_info(info)


def register_from_store(session: MultiAdapterSession, store: AdapterStore, name: str, entry: str, path: Path, *,
                        replace: bool) -> AdapterInfo:
    """Register store entry ``entry`` (at ``path``, from :meth:`AdapterStore.path`) as adapter ``name``, read from a
    private copy: one state of the entry, read without a memory map or a blocking open (:meth:`AdapterStore.snapshot`),
    so an entry rewritten, renamed or swapped for a pipe while it loads cannot crash, hang or mix the load. Every
    load from a store goes through here: a client's, Ray's on-demand ones and ``serve --load`` at start-up.

    An entry that fits but records another base checkpoint than the export's is loaded, as load, merge and export
    apply it, and the warning they give is logged for the operator (event ``adapter_foreign_base``, naming the entry's
    own path); the client's answer stays the adapter's description, which never holds a server path."""
    with store.snapshot(entry, path, max_bytes=session.max_adapter_bytes) as copy:
        return session.register(name, copy, replace=replace, source=path,
                                warn=lambda note: log_foreign_base(name, store.unsnapshotted(note)))


def log_foreign_base(adapter: str, note: str) -> None:
    """Log an adapter's foreign-base warning for the operator (event ``adapter_foreign_base``): what every load of
    the server (a store entry, an exported adapter) says of an adapter recording another base checkpoint."""
    _log_json({"ts": round(time.time(), 3), "event": "adapter_foreign_base", "adapter": adapter, "warning": note},
              logging.WARNING)


def default_model_name(export_dir: Path) -> str:
    """The base model's name in the OpenAI API when none is given: the export directory's name, made a valid name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(export_dir).resolve().name).lstrip("._-")[:128] or "base"
    return name.replace("..", "-") if name != BASE else "base"


def served_model_name(given: str | None, export_dir: Path, adapters: Collection[str]) -> str:
    """The base model's name in the OpenAI API (``model``): ``given`` (``--served-model-name``), refused when one of
    the export's ``adapters`` has it; else :func:`default_model_name`, with ``-base`` added while an exported adapter
    has it. A request naming it gets the base model, so an adapter of the same name could never be reached (an
    export directory named after its adapter, ``export --bank --adapter runs/a_b --out a_b``, answered ``a_b`` with
    the base)."""
    if given is not None:
        if given in adapters:
            raise ServingError(f"--served-model-name {given!r} is also the name of an adapter in the export, whose "
                               "requests would get the base model; pick another name for the base model")
        return given
    name = default_model_name(export_dir)
    while name in adapters:
        name = f"{name[:123]}-base"
    return name


# ---- middleware: request id, limits, timeouts, errors, log, metrics -------------------------------------


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


#: A chat conversation is tokenized only up to the larger of --max-text-chars and this many characters per position
#: of the model's context: far above what fits (about 4 characters per token in English text; 32 leaves room for
#: runs of whitespace and long tokens), so only a conversation that could never fit is refused unread.
CHAT_CHARS_PER_POSITION = 32

#: A request body may arrive in this many pieces (chunks, or reads) of any size; beyond, they must average at least
#: MIN_BODY_PIECE_BYTES (a 4 MiB body then costs h11 at most ~20,000 pieces, ~0.2 s of the event loop).
BODY_PIECES_FREE = 4096
MIN_BODY_PIECE_BYTES = 256

WRITE_WATCH = "bca.write_watch"  # the scope extension holding the connection's WriteWatch
#: What a connection holds of an answer before its send waits: asyncio's default high-water mark of a transport's write
#: buffer, past which uvicorn's send waits for it to drain. A Ray replica's in-process connection (``ray._Outbox``)
#: holds as much for Ray to take.
ANSWER_BUFFER_BYTES = 64 * 1024
_READ_POLL_S = 0.25


class WriteWatch:
    """How much of its answers a connection's client has not read yet, and a way to drop the connection.

    ``unread``: bytes in uvicorn's transport buffer plus the kernel's send queue (``SIOCOUTQ``: sent but not
    acknowledged, or not sent yet; where the platform lacks it, the transport buffer alone). It only falls
    while the client reads, so it is the guard's progress clock: a client reading slowly but steadily gets
    its answer however long that takes, one that reads nothing for ``--body-timeout-s`` is cut off. The
    kernel frees send-buffer space in large steps (a socket is writable again once a third of a buffer of
    up to megabytes has drained), so a timer around each write alone cut slow readers off mid-answer.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def buffered(self) -> int:
        """Bytes of answers still in the transport's buffer (not handed to the kernel)."""
        return self.transport.get_write_buffer_size()

    def unread(self) -> int:
        """Bytes written that the client has not acknowledged (transport buffer + kernel send queue)."""
        queued = 0
        if self._fd >= 0:
            try:
                queued = _socket_send_queue(self._fd)
            except OSError:  # not Linux, or the socket is gone: the transport buffer alone
                self._fd = -1
        return self.transport.get_write_buffer_size() + queued

    def abort(self) -> None:
        """Drop the connection now with a reset, its buffered answer too: ``close`` would wait for the client to read
        it, and the kernel would keep what it holds for minutes (nginx's ``reset_timedout_connection``)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def _socket_send_queue(fd: int) -> int:
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]  # == SIOCOUTQ on Linux


async def _send_while_read(sending, seconds: float, watch: WriteWatch | None) -> None:
    """Await ``sending`` (an ASGI send) while the client reads; ``asyncio.TimeoutError`` once it has read nothing
    for ``seconds`` (the connection is then dropped). Without a watch (another server): ``seconds`` for the send."""
    if watch is None:
        await asyncio.wait_for(sending, seconds)
        return
    task = asyncio.ensure_future(sending)
    try:
        await _wait_while_read(task, seconds, watch)
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _wait_while_read(task: asyncio.Future | None, seconds: float, watch: WriteWatch) -> None:
    """Until ``task`` is done (``None``: until the transport has handed every buffered byte to the kernel), as long
    as the client reads something at least every ``seconds``; else drop the connection, ``asyncio.TimeoutError``."""
    loop = asyncio.get_running_loop()
    last, quiet_from = watch.unread(), loop.time()
    while not (task.done() if task is not None else watch.buffered() == 0):
        left = quiet_from + seconds - loop.time()
        if left <= 0:
            watch.abort()
            raise asyncio.TimeoutError
        if task is not None:
            await asyncio.wait({task}, timeout=min(left, _READ_POLL_S))
        else:
            await asyncio.sleep(min(left, _READ_POLL_S))
        unread = watch.unread()
        if unread < last:  # the client read something (nothing else writes to this connection meanwhile)
            quiet_from = loop.time()
        last = unread


_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(/.*)?", re.DOTALL)
_AUTHORITY = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(:[0-9]*)?")


def _origin_form(scope: dict) -> dict:
    """``scope`` with an absolute-form request target (``GET http://host:port/v1/models HTTP/1.1``, RFC 9112 section
    3.2.2: what a request sent through a forward proxy, or by a client configured as one, carries) made its path: a
    server MUST accept it. The target's authority is the request's host (the ``host`` header is replaced by it, as the
    RFC asks: it is not checked, this server having no virtual hosts). uvicorn took the whole URI for the path, so every
    such request was a 404. An origin-form target (``/...``) and ``OPTIONS *`` are returned as they are.

    Raises:
        InvalidHTTPError: a target that is neither (``health``, ``host:443``), a scheme other than http(s), an empty or
            malformed authority, user information in it (RFC 9110 section 4.2.4), a fragment (400 ``invalid_http``).
    """
    raw = scope.get("raw_path") or scope["path"].encode()
    if raw.startswith(b"/") or (raw == b"*" and scope.get("method") == "OPTIONS"):
        return scope
    shown = raw[:128].decode("latin-1")
    if (found := _ABSOLUTE_FORM.fullmatch(raw)) is None:
        raise InvalidHTTPError(f"the request is not valid HTTP/1.1 (its target {shown!r} is neither a path (/...) nor "
                               "an absolute http URI)")
    scheme, authority, path = found.group(1).lower(), found.group(2), found.group(3) or b"/"
    problem = None
    if scheme not in (b"http", b"https"):
        problem = f"its scheme is {scheme[:16].decode('latin-1')!r}, not http or https"
    elif b"@" in authority:
        problem = "it carries user information (user@host), which HTTP forbids"
        # neither echoed nor logged: it may be a password
        shown = (raw[:found.start(2)] + b"...@" + authority.rpartition(b"@")[2] + path)[:128].decode("latin-1")
    elif _AUTHORITY.fullmatch(authority) is None:
        problem = "its host or port is malformed" if authority else "its host is empty"
    elif b"#" in path:
        problem = "it has a fragment (#...)"
    if problem is not None:
        error = InvalidHTTPError(f"the request is not valid HTTP/1.1 (the absolute request target {shown!r}: "
                                 f"{problem})")
        error.target = shown  # type: ignore[attr-defined]  # what the request log shows of it
        raise error
    root = scope.get("root_path", "")
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"host"]
    return {**scope, "raw_path": root.encode("ascii") + path, "path": root + unquote(path.decode("latin-1")),
            "headers": [(b"host", authority), *headers]}


def _websocket_upgrade(headers: Mapping[str, str]) -> bool:
    """Whether a request asks to upgrade its connection to a WebSocket (``upgrade: websocket`` with the ``upgrade``
    connection option, as uvicorn reads it). uvicorn runs without WebSocket support here (:func:`uvicorn_config`), so
    such a request reaches the app as HTTP and :class:`_Guard` refuses it with a JSON 400, logged and counted; with a
    WebSocket library installed, uvicorn upgraded it and the app, which has no WebSocket route, closed the handshake
    with an empty 403 that no log or metric saw."""
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    upgrade = {token.strip().lower() for token in headers.get("upgrade", "").split(",")}
    return "upgrade" in connection and "websocket" in upgrade


class _Guard:
    """Pure ASGI middleware around the whole app.

    Gives each request an id (``x-request-id``, echoed), refuses a request whose body is framed by both
    ``content-length`` and ``transfer-encoding`` (400, then the connection is closed), a WebSocket upgrade (400:
    :func:`_websocket_upgrade`), bodies over
    ``max_body_bytes`` (by ``content-length`` at once, else while they arrive) and bodies not complete within
    ``body_timeout_s``, turns any exception the app did not answer into the JSON 500 (the traceback
    goes to the log, never to the client), and writes the request's log line and metrics.
    """

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" and not self.server.checked:
            return await self._lifespan(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        target_error = None
        try:
            scope = _origin_form(scope)  # an absolute-form target is served as its path
        except InvalidHTTPError as exc:
            target_error = exc  # answered below, logged and counted as any other refusal
            scope = {**scope, "path": getattr(exc, "target", scope["path"])}
        server, options = self.server, self.server.options
        start = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = request_id_of(headers.get("x-request-id"))
        state = scope.setdefault("state", {})
        state.update({"log": {}, "request_id": request_id})
        sent = {"status": None, "whole": False}
        watch: WriteWatch | None = scope.get("extensions", {}).get(WRITE_WATCH)  # None: not our uvicorn protocol
        # A body framed both ways is how requests are smuggled past a proxy that reads the other framing:
        # refused, and the connection closed after the answer (RFC 9112 section 6.1: the server MUST close it)
        framed_twice = "content-length" in headers and "transfer-encoding" in headers
        # a WebSocket client's connection is not meant for HTTP after its handshake: closed after the refusal too
        websocket = _websocket_upgrade(headers)
        closing = [(b"connection", b"close")] if framed_twice or websocket else []

        async def guarded_send(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode()), *closing]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["whole"] = True
            try:
                await _send_while_read(send(message), options.body_timeout_s, watch)
                if watch is not None and sent["whole"]:
                    # the answer is in the connection's buffer; a client that reads none of it must not hold that
                    # memory and its connection for ever (uvicorn's close waits for the buffer to empty)
                    await _wait_while_read(None, options.body_timeout_s, watch)
            except asyncio.TimeoutError:  # a client that stopped reading: give its task back
                sent["whole"], sent["cut_off"] = False, True
                raise RequestTimeoutError(f"the client read none of the response for {options.body_timeout_s:g} s "
                                          "(--body-timeout-s)") from None

        async def answer(exc: BaseException, status: int, kind: str) -> None:
            message = server.redact(str(exc)) if isinstance(exc, BCAError) else ""
            if isinstance(exc, InternalServerError) or not isinstance(exc, BCAError):
                message = f"internal error (request id {request_id}); the server log has the details"
            body = json.dumps(error_body(status, kind, message, server.error_param(exc, state))).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if status == 503:  # a full queue or connection table: clients (the openai one too) back off
                headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            await guarded_send({"type": "http.response.start", "status": status, "headers": headers})
            await guarded_send({"type": "http.response.body", "body": body})

        failed = 500  # the status to record when no answer could be sent
        try:
            if target_error is not None:
                raise target_error
            if framed_twice:
                raise InvalidHTTPError("the request is not valid HTTP/1.1 (it has both content-length and "
                                       "transfer-encoding; send one of them)")
            if websocket:
                raise ServingError("this server does not serve WebSocket connections (the request asks to upgrade "
                                   "to websocket); its routes are plain HTTP: send the request without 'upgrade' "
                                   "(answers stream as server-sent events with \"stream\": true)")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > options.max_body_bytes):
                raise body_too_large(options.max_body_bytes, length)
            receive = self._guard_receive(receive, start, state)
            await self.app(scope, receive, guarded_send)
        except asyncio.CancelledError:
            if not server.stopping:  # the request's task was cancelled: on Ray Serve, because its client left
                failed, state["error_type"] = error_status(ClientClosedRequestError(""))
                raise
            # cancelled by the server's shutdown, past --shutdown-timeout-s: answered 503 if nothing was sent yet,
            # and ended here (raised, uvicorn would log a traceback for each such request)
            stopped = ServerBusyError(f"the server is shutting down and this request did not finish within "
                                      f"{options.shutdown_timeout_s:g} s (--shutdown-timeout-s)")
            failed, state["error_type"] = error_status(stopped)
            if sent["status"] is None:
                with contextlib.suppress(Exception):
                    await answer(stopped, failed, state["error_type"])
        except Exception as raised:
            exc = _unwrapped(raised)
            if not isinstance(exc, BCAError):
                state["log"]["error"] = f"{type(exc).__name__}: {exc}"
                _log_json({"ts": round(time.time(), 3), "event": "request_failed", "request_id": request_id,
                           "error": f"{type(exc).__name__}: {exc}",
                           "traceback": "".join(traceback.format_exception(exc))}, logging.ERROR)
            failed, state["error_type"] = error_status(exc)
            if sent["status"] is None:
                with contextlib.suppress(Exception):
                    await answer(exc, failed, state["error_type"])
        finally:
            status = sent["status"] or failed
            if sent["status"] is not None and not sent["whole"]:
                # an answer cut short after its status line said 200: a stream whose client left (499), or one the
                # server gave up on (a client that did not read in time: 408; an error mid-answer): recorded as
                # such in the log and the metrics, never as a success
                if sent.get("cut_off"):  # the disconnect the app may have seen was the server's doing
                    status, state["error_type"] = error_status(RequestTimeoutError(""))
                elif state.get("disconnected"):
                    status, state["error_type"] = error_status(ClientClosedRequestError(""))
                elif "error_type" in state:
                    status = failed
            self._record(scope, state, request_id, status, start)

    async def _lifespan(self, scope, receive, send) -> None:
        """The app's start: :meth:`Server.startup_checks` first (off the event loop: seconds), unless :func:`build`
        ran them. A failure is answered ``lifespan.startup.failed`` with its message alone (uvicorn logs it on one
        line, then "Application startup failed. Exiting."; Starlette's own lifespan would send a traceback), kept
        in ``startup_error`` and raised (so ``TestClient`` raises it)."""
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await run_in_threadpool(self.server.startup_checks)
            except Exception as exc:
                self.server.startup_error = exc
                await send({"type": "lifespan.startup.failed",
                            "message": f"Error: {exc}" if isinstance(exc, BCAError) else repr(exc)})
                raise
        pending = [message]

        async def replayed():
            return pending.pop() if pending else await receive()

        await self.app(scope, replayed, send)

    def _guard_receive(self, receive, start: float, state: dict):
        options = self.server.options
        deadline = start + options.body_timeout_s
        progress = {"bytes": 0, "done": False}

        async def guarded_receive():
            if progress["done"]:  # the body is in: later receives wait for a disconnect, without a deadline
                message = await receive()
                if message["type"] == "http.disconnect":
                    state["disconnected"] = True
                return message
            timeout = deadline - time.perf_counter()
            try:
                if timeout <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise body_too_slow(options.body_timeout_s) from None
            if message["type"] == "http.request":
                progress["bytes"] += len(message.get("body", b""))
                if progress["bytes"] > options.max_body_bytes:
                    raise body_too_large(options.max_body_bytes)
                progress["done"] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":  # gone before its body was whole: the client's doing
                raise ClientClosedRequestError(f"the client closed the connection after {progress['bytes']} bytes "
                                               "of its body")
            else:
                progress["done"] = True
            return message

        return guarded_receive

    def _record(self, scope, state, request_id: str, status: int, start: float) -> None:
        route = scope.get("route")
        record_request(self.server.metrics, endpoint=getattr(route, "path", None) or "unmatched",
                       method=scope["method"], path=scope["path"], status=status,
                       error_type=state.get("error_type"), adapter_label=state.get("adapter_label", ""),
                       elapsed=time.perf_counter() - start, request_id=request_id, log=state.get("log", {}))


def record_request(metrics: ServerMetrics, *, endpoint: str, method: str, path: str, status: int,
                   error_type: str | None, adapter_label: str, elapsed: float, request_id: str,
                   log: Mapping[str, Any] | None = None) -> None:
    """Count one answered request (``bca_requests_total``, ``bca_request_errors_total`` for status >= 400,
    ``bca_request_duration_seconds``) and write its access line: every answer of ``serve``, and on Ray Serve every
    answer the router gives itself. ``endpoint`` is a route template or ``"unmatched"``; ``adapter_label`` the one
    :meth:`ServerMetrics.adapter_label` gave when the request named its adapter (``""``: none)."""
    adapter = metrics.recorded_label(adapter_label)
    label_method = method if method in HTTP_METHODS else "other"  # a bounded label set
    metrics.requests.labels(endpoint, label_method, str(status), adapter).inc()
    if status >= 400:
        metrics.errors.labels(endpoint, str(status), error_type or "unknown", adapter).inc()
    metrics.latency.labels(endpoint).observe(elapsed)
    entry = {"ts": round(time.time(), 3), "request_id": request_id, "method": method[:32], "path": path[:256],
             "status": status, "latency_ms": round(elapsed * 1000, 3), **(log or {})}
    if error_type is not None:
        entry["error_type"] = error_type
    _log_json(entry)


def request_id_of(given: str | None) -> str:
    """The id a request is logged under: the client's ``x-request-id`` when it is a sane one, else a new one."""
    return given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


# ---- the app --------------------------------------------------------------------------------------


def create_app(
    session: MultiAdapterSession,
    store: AdapterStore | None = None,
    options: ServeOptions | None = None,
    **overrides: Any,
):
    """The FastAPI application serving ``session`` (see the module docstring for the endpoints).

    Args:
        session: the runtime (its registered adapters are served as they are).
        store: where adapters are loaded from, by name; without a store, adapters can only be
            registered from Python and the load endpoints answer 400.
        options: limits, batching and what the server shows (:class:`ServeOptions`; default: its defaults).
        **overrides: single :class:`ServeOptions` fields to change (``max_batch_rows=8``).

    The app runs ``serve``'s start-up checks (:meth:`Server.startup_checks`: the session's warm-up, the chat
    template rendered once within its bounds) as it starts, unless they were run already (:func:`build` runs them
    before it returns); a failure stops its start, as ``serve`` refuses to start.
    """
    options = (options or ServeOptions()).replace(**overrides) if overrides else (options or ServeOptions())
    server = Server(session, store, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.start()
        yield
        await server.stop()

    # redirect_slashes off: "/v1/completions/" was an empty 307 whose location echoed the client's Host header (a
    # poisoned redirect behind a caching proxy); now it is the JSON 404 of any unknown route
    app = FastAPI(title="bca-deploy serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False,
                  description="Many block-circulant adapters on one base model, chosen per request.")
    app.state.server, app.state.session, app.state.store = server, session, store
    app.state.batcher, app.state.engine, app.state.options = server.batcher, server.engine, options

    def error_response(request: Request, exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
        # /v1/embeddings is an OpenAI request only with "model": its handler says so once it has read the body
        openai = getattr(request.state, "openai", None)
        status, kind = error_status(exc, is_openai_request(request.url.path, None) if openai is None else openai)
        request.state.error_type = kind
        message = server.redact(str(exc)) if isinstance(exc, BCAError) else "internal error"
        if status == 503:
            headers = {**(headers or {}), "retry-after": str(RETRY_AFTER_S)}
        return JSONResponse(status_code=status, content=error_body(status, kind, message,
                                                                   server.error_param(exc, request.scope["state"])),
                            headers=headers)

    @app.exception_handler(BCAError)
    async def _bca_error(request: Request, exc: BCAError):
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(request, NotFoundError(f"no endpoint {request.method} {request.url.path[:128]}"))
        if exc.status_code == 405:  # with the Allow header HTTP asks of a 405 (the route's methods)
            allowed = (exc.headers or {}).get("Allow", "")
            method = request.method if len(request.method) <= 32 else request.method[:32] + "..."
            return error_response(request, MethodNotAllowedError(
                f"{request.url.path[:128]} does not take {method} requests" + (f"; it takes {allowed}" if allowed
                                                                               else "")),
                headers={"allow": allowed} if allowed else None)
        return error_response(request, ServingError(f"HTTP {exc.status_code}"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(request, InvalidRequestError(problems))

    app.add_middleware(_Guard, server=server)

    def label(request: Request, name: str | None) -> None:
        request.state.adapter_label = server.metrics.adapter_label(name if name is not None else BASE)

    @app.api_route("/health", methods=READ_METHODS)  # HEAD: load balancers' and uptime checkers' probe
    async def health():
        snapshot = session.snapshot()
        return {"status": "ok", "task": session.task, "model_type": session.model_type,
                "adapters": len(snapshot.slots), "bank_version": snapshot.version}

    @app.api_route("/v1/adapters", methods=READ_METHODS)
    async def list_adapters():
        if not options.list_adapters:
            raise ForbiddenError("this server does not list its adapters")
        adapters = [server.public_info(a) for a in session.adapters()]
        # off the event loop: checking every entry of a large store takes seconds (20,000 entries: 2.3 s)
        available = await run_in_threadpool(store.listing) if store is not None else None
        return {"adapters": adapters, "available": available}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: Request):
        server.check_management()
        body = await server.read(request, LoadRequest)
        request.state.log["adapter"] = body.name
        info = await server.load(body.name, replace=body.replace)
        label(request, body.name)
        return info

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str):
        server.check_management()
        request.state.log["adapter"] = name
        label(request, name)
        return await server.unload(name)

    @app.post("/v1/classify")
    async def classify(request: Request):
        server.require("classify")
        body = await server.read(request, ClassifyRequest)
        adapter = server.select(request, body.adapter)
        result, _ = await server.infer(request, "classify", _rows(body.input), adapter, {})
        return await json_answer(lambda: {"adapter": adapter,
                                          "data": [{"index": i, **r} for i, r in enumerate(result)]})

    @app.post("/v1/generate")
    async def generate(request: Request):
        server.require("generate")
        body = await server.read(request, GenerateRequest)
        asked = body.max_new_tokens
        if asked is not None:
            server.check_new_tokens(asked)
        adapter = server.select(request, body.adapter)
        rows = _rows(body.input)
        server.check_rows(len(rows))
        # an explicit max_new_tokens must fit (400); a default is clipped per row to what fits (Server.new_tokens),
        # so a row must leave room for one new token
        prompts = await server.prepare(rows, asked if asked is not None else 1)
        # each row of a request gets its own generator: seed + row index, so rows differ but stay reproducible
        repetition = server.repetition_penalty(body.repetition_penalty)
        params = [server.sampling(max_new_tokens=server.new_tokens(asked, len(prompt), NATIVE_MAX_NEW_TOKENS),
                                  do_sample=body.do_sample, temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, seed=None if body.seed is None else body.seed + i,
                                  repetition_penalty=repetition, frequency_penalty=body.frequency_penalty,
                                  presence_penalty=body.presence_penalty, min_p=body.min_p,
                                  logit_bias=body.logit_bias, logprobs=body.logprobs,
                                  prompt_logprobs=body.prompt_logprobs)
                  for i, prompt in enumerate(prompts)]
        if body.logprobs is not None or body.prompt_logprobs is not None:  # the OpenAI routes' bound on an answer
            fields = {name: value for name, value in (("logprobs", body.logprobs),
                                                      ("prompt_logprobs", body.prompt_logprobs)) if value is not None}
            fields["max_new_tokens"] = max(p.max_new_tokens for p in params)
            fields["input"] = f"{len(prompts)} row(s)"
            scored = [name for name in ("logprobs", "prompt_logprobs") if name in fields]
            check_logprob_entries(server.options.max_logprob_entries, prompts, params, fields, scored[0],
                                  f"send fewer rows, a lower max_new_tokens or a lower {' or '.join(scored)}")
        streams, release = server.submit(request, prompts, adapter, params)
        try:
            results = await server.collect(request, streams)
        finally:
            server.log_streams(request, streams)  # what was generated, however it ended (a client gone: 499)
            for stream in streams:  # a failed row or a gone client: the other rows stop too
                stream.cancel()
            release()
        texts = isinstance(body.input, str) or bool(rows and isinstance(rows[0], str))

        def rows_of() -> Iterator[dict[str, Any]]:  # one at a time, each result let go once used (render_answer)
            for i in range(len(results)):
                result, results[i] = results[i], None
                item: dict[str, Any] = {"index": i, "token_ids": result.token_ids}
                if texts:
                    item["text"] = session.decode(result.token_ids)
                if body.logprobs is not None:
                    item["logprobs"] = [_logprob_entry(t) for t in result.logprobs or []]
                if body.prompt_logprobs is not None:  # nothing comes before the first prompt token (vLLM's null)
                    item["prompt_logprobs"] = [None, *(_logprob_entry(t) for t in result.prompt_logprobs or [])]
                yield item

        def answer() -> dict[str, Any]:  # in a worker thread: it decodes, and may list many log-probabilities
            return {"adapter": adapter, "data": rows_of()}

        return await json_answer(answer)

    @app.api_route("/metrics", methods=READ_METHODS)
    async def metrics():
        if not options.metrics:
            raise NotFoundError("no endpoint GET /metrics (metrics are off on this server)")
        from .metrics import CONTENT_TYPE

        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    from .openai import add_routes

    add_routes(app, server, native_embeddings=_native_embeddings(server))
    return app


def _logprob_entry(item) -> dict[str, Any]:
    """A :class:`~bca_deploy.serving.engine.TokenLogprob` as ``/v1/generate`` lists it, by token id:
    ``{"token_id", "logprob", "top_logprobs": [{"token_id", "logprob"}, ...]}``, the alternatives most likely first."""
    return {"token_id": item.token_id, "logprob": item.logprob,
            "top_logprobs": [{"token_id": t, "logprob": lp}
                             for t, lp in zip(item.top_ids, item.top_logprobs, strict=True)]}


def _non_finite_row(kind: str, result: list) -> int | None:
    """The index of the first row of a classify (``{"logits": [...]}`` per row) or embed (a vector per row) result
    holding NaN or an infinity, else None."""
    for i, row in enumerate(result):
        values = row["logits"] if kind == "classify" else row
        if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
            return i
    return None


def _native_embeddings(server: Server):
    """The native ``/v1/embeddings`` handler (the OpenAI route dispatches to it for native bodies)."""

    async def embed(request: Request, data: dict[str, Any]):
        body = await validate_body(EmbedRequest, data, len(await request.body()), server.options.max_request_rows)
        adapter = server.select(request, body.adapter)
        result, _ = await server.infer(request, "embed", _rows(body.input), adapter,
                                       {"pooling": body.pooling, "normalize": body.normalize})
        return await json_answer(lambda: {"adapter": adapter, "data": [{"index": i, "embedding": np.asarray(v).tolist()}
                                                                       for i, v in enumerate(result)]})

    return embed


def _version() -> str:
    from .. import __version__

    return __version__


# ---- running it -----------------------------------------------------------------------------------


def configure_logging(level: int = logging.INFO) -> None:
    """One JSON object per line on stderr for the request log (``bca_deploy.serve``)."""
    if not any(getattr(h, "_bca_serve", False) for h in _log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._bca_serve = True  # type: ignore[attr-defined]
        _log.addHandler(handler)
    _log.setLevel(level)
    _log.propagate = False


def build(
    export_dir: str | Path,
    *,
    adapter_store: str | Path | None = None,
    load: Sequence[str] = (),
    load_exported: bool = True,
    options: ServeOptions | None = None,
    **overrides: Any,
):
    """Session + store + app, with ``load`` (names in the store) registered up front. Errors surface before serving,
    a tokenizer that does not load and a chat template that does not render a one-message conversation within its
    bounds included (:meth:`Server.startup_checks`, which :func:`create_app` alone runs as the app starts).

    ``options`` (or single fields of it as keyword arguments: ``threads=1, max_wait_ms=25``) set the
    provider, threads, batching and limits.
    """
    options = (options or ServeOptions()).replace(**overrides) if overrides else (options or ServeOptions())
    store = AdapterStore(adapter_store) if adapter_store is not None else None
    if load and store is None:
        raise ServingError("loading adapters by name needs an adapter store (--adapter-store DIR)")
    load = list(load)
    twice = sorted(name for name, times in collections.Counter(load).items() if times > 1)
    if twice:  # the second would silently replace the first: a typo in a deployment script, not an intent
        raise ServingError(f"--load names {', '.join(map(repr, twice))} more than once; give each adapter once")
    paths = {name: store.path(name) for name in load}  # type: ignore[union-attr]  # a missing one: before any load
    session = MultiAdapterSession(export_dir, provider=options.provider, intra_op_threads=options.threads,
                                  spin=options.spin, load_exported=False, max_labels=options.max_labels)
    if load_exported:  # as the session would register them, with a foreign base logged as a store entry's is
        for name in session.exported_adapters:
            session.register_exported(name, warn=functools.partial(log_foreign_base, name))
    for name, path in paths.items():
        try:
            register_from_store(session, store, name, name, path, replace=True)  # type: ignore[arg-type]
        except BCAError as exc:  # the reader named its private copy: the operator is told the entry's own path
            exc.args = (store.unsnapshotted(str(exc)), *exc.args[1:])  # type: ignore[union-attr]
            raise
    app = create_app(session, store, options)
    app.state.server.startup_checks()  # now, not during the first request (nor as uvicorn starts)
    return app


def uvicorn_config(app, **kwargs):
    """A ``uvicorn.Config`` for ``app`` with its :class:`ServeOptions` timeouts and limits applied."""
    import uvicorn

    options: ServeOptions = app.state.options
    return uvicorn.Config(app, http=_guarded_h11(options.header_timeout_s, options.max_connections,
                                                 options.max_header_bytes, options.keep_alive_s,
                                                 _refusal_recorder(app.state.server.metrics)),
                          timeout_keep_alive=options.keep_alive_s, ws="none",  # WebSocket upgrades: _Guard's 400
                          h11_max_incomplete_event_size=options.max_header_bytes, access_log=False,
                          timeout_graceful_shutdown=options.shutdown_timeout_s, log_level="warning", lifespan="on",
                          **kwargs)


#: Seconds the generation engine's and the batcher's stop each wait for work they have in a thread, after the
#: requests in flight had ``--shutdown-timeout-s`` to finish (a step or batch stuck in onnxruntime is left then).
STOP_WAIT_S = 2.0

#: Seconds ``serve`` may still take after a signal's shutdown should be over (``--shutdown-timeout-s`` plus the
#: stops, or a second signal) before it exits without what is stuck (:func:`_exit_later`).
EXIT_GRACE_S = 2 * STOP_WAIT_S + 1.0


def bounded_server(config, server: Server, exit_when_stuck: bool = False):
    """A ``uvicorn.Server`` whose shutdown is bounded. uvicorn's waits for every request in flight for as long as
    it takes, then for the app's stop, and at exit Python waits for every worker thread: a request whose work never
    ends (a chat template that loops: before its renders were bounded, they burned a CPU for ever) kept a SIGTERMed
    server alive for good. Here:

    - :meth:`Server.begin_shutdown` first: chat template renders in flight end (their worker processes are killed);
    - requests in flight get ``--shutdown-timeout-s`` (the config's ``timeout_graceful_shutdown``), then are cancelled;
      the engine's and the batcher's stop wait at most :data:`STOP_WAIT_S` each for the work they have in a thread;
    - a second SIGTERM or SIGINT skips the waits (uvicorn's does so only for SIGINT);
    - ``exit_when_stuck`` (``bca-deploy serve``, where the process is the server): a signal also starts a timer, and
      should the process still be there :data:`EXIT_GRACE_S` after the shutdown should have ended (work stuck in a
      thread that Python would wait for at exit), it says so on stderr and exits at once, with 128 + the signal's
      number (130 for SIGINT, as an interrupted ``bca-deploy`` exits; 143 for SIGTERM).
    """
    import uvicorn

    class BoundedServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            again = self.should_exit
            super().handle_exit(sig, frame)
            if again:
                self.force_exit = True
            if exit_when_stuck:
                _exit_later(sig, EXIT_GRACE_S if again else server.options.shutdown_timeout_s + EXIT_GRACE_S)

        async def shutdown(self, sockets=None) -> None:
            server.begin_shutdown()
            await super().shutdown(sockets=sockets)

    return BoundedServer(config)


def _exit_later(sig: int, seconds: float) -> None:
    """Exit the process ``seconds`` from now with 128 + ``sig`` if it is still running then (a daemon timer: a
    process that ends first never sees it)."""
    def exit_now() -> None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        try:
            sys.stderr.write(f"serve: still stopping {seconds:g} s after {name} (a request's work is stuck in a "
                             "thread); exiting without it\n")
            sys.stderr.flush()
            for handler in _log.handlers:
                handler.flush()
        finally:
            os._exit(128 + sig)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.name = "bca-serve-exit"
    timer.start()


def adapter_management_refused() -> ForbiddenError:
    """The answer to a load or unload route on a server started with ``--no-manage-adapters`` (serve and serve-ray)."""
    return ForbiddenError("this server does not load or unload adapters at run time (started with "
                          "--no-manage-adapters); the adapters it loaded at start are served")


def _refusal_recorder(metrics: ServerMetrics) -> Callable[[str, int | None, str, Any], None]:
    """What the connection guard calls when it refuses a connection before any request of it reached the app
    (so the app's own log line and ``bca_requests_total`` never see it): ``bca_connection_refusals_total``
    by reason, and a JSON log line (``"event": "connection_refused"``, the reason, the status sent, if any,
    the peer's address and what was wrong), so an operator sees a flood of malformed or stalled connections."""

    def record(reason: str, status: int | None, message: str, client: Any) -> None:
        metrics.connection_refusals.labels(reason).inc()
        peer = f"{client[0]}:{client[1]}" if isinstance(client, tuple) and len(client) >= 2 else None
        _log_json({"ts": round(time.time(), 3), "event": "connection_refused", "reason": reason, "status": status,
                   "client": peer, "message": message[:256]})

    return record


_HEADER_LINE = re.compile(r"illegal header line: (?:bytearray\()?b['\"]([^:'\"]{0,64})")


def _h11_problem(exc: Exception) -> str:
    """What h11 found wrong with a request, for its 400 and the log: its first line, 200 characters; for a header
    line, only the header's name (h11 quotes the whole line, and an ``Authorization`` or ``Cookie`` value, a
    client's secret, would be written into the server's log and echoed in the answer)."""
    text = first_line(exc, limit=200)
    if text.startswith("illegal header line"):
        name = _HEADER_LINE.match(text)
        shown = f"header {name.group(1)!r}" if name and name.group(1) else "a header line"
        return f"illegal header line ({shown}; its value is not shown)"
    return text


class _DropInvalidHTTPLine(logging.Filter):
    """Drops uvicorn's 'Invalid HTTP request received.' (see :func:`_guarded_h11`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Invalid HTTP request received."


def _guarded_h11(header_timeout: float, max_connections: int, max_header_bytes: int, linger_s: float,
                 refused: Callable[[str, int | None, str, Any], None]):
    """uvicorn's h11 protocol with a deadline and a size limit for each request's head (uvicorn has neither
    for a head that arrives whole or byte by byte), a connection limit, and the documented JSON error for
    what never reaches the app (malformed HTTP, a head too large, too many connections). A request answered
    before its body was whole may send the rest for ``linger_s`` more; then its connection closes. Each such
    refusal is passed to ``refused(reason, status, message, client)`` (:func:`_refusal_recorder`)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # uvicorn logs 'WARNING:  Invalid HTTP request received.' (plain text, nothing of what was wrong) before each
    # 400 for malformed HTTP, beside the one JSON line (``connection_refused``) the log promises: this child of its
    # logger drops that line and passes everything else on to uvicorn's handlers
    quiet = logging.getLogger("uvicorn.error.bca_guard")
    if not any(isinstance(f, _DropInvalidHTTPLine) for f in quiet.filters):
        quiet.addFilter(_DropInvalidHTTPLine())

    def raw_error(exc: ServingError) -> bytes:
        status, kind = error_status(exc)
        body = json.dumps(error_body(status, kind, str(exc))).encode()
        reason = {400: b"Bad Request", 503: b"Service Unavailable"}[status]
        retry = b"\r\nretry-after: %d" % RETRY_AFTER_S if status == 503 else b""
        return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close"
                b"%s\r\n\r\n" % (status, reason, len(body), retry)) + body

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            self.logger = quiet  # uvicorn's plain-text line for malformed HTTP: the refusal's JSON line says it
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                error = ServerBusyError(f"the server holds its limit of {max_connections} connections; retry in "
                                        "a moment")
                transport.write(raw_error(error))
                transport.close()
                refused("too_many_connections", 503, str(error), self.client)
                return
            self._arm()
            self._count_body_pieces()
            watch, app = WriteWatch(transport), self.app

            async def watched(scope, receive, send):  # the guard finds the connection's watch in the scope
                scope.setdefault("extensions", {})[WRITE_WATCH] = watch
                await app(scope, receive, send)

            self.app = watched

        _head_bytes = 0
        _tail = b""
        _pieces = _piece_bytes = 0
        _refusal: tuple[str, str] | None = None

        def _count_body_pieces(self) -> None:
            """Bound the pieces a body arrives in. h11 spends ~9 us per piece (a chunk, or what one read got): a 1 MB
            body in 1-byte chunks (6 MB on the wire) held the event loop, and every other request, for 8.8 s. After
            BODY_PIECES_FREE pieces they must average MIN_BODY_PIECE_BYTES, else 400 and the connection closes."""
            next_event = self.conn.next_event

            def counted():
                try:
                    event = next_event()
                except h11.RemoteProtocolError as exc:
                    # h11's own words name what is wrong (the request line, a header line, a Content-Length, a chunk
                    # header); uvicorn answered every such request 'Invalid HTTP request received' alone
                    if self._refusal is None:
                        self._refusal = ("invalid_http", _h11_problem(exc))
                    raise
                if type(event) is h11.Data:
                    self._pieces += 1
                    self._piece_bytes += len(event.data)
                    if self._pieces > BODY_PIECES_FREE and self._piece_bytes < self._pieces * MIN_BODY_PIECE_BYTES:
                        self._refusal = ("body_pieces_too_small", (
                            f"the body came in {self._pieces:,} pieces averaging {self._piece_bytes // self._pieces} "
                            f"bytes; after {BODY_PIECES_FREE:,} pieces they must average at least "
                            f"{MIN_BODY_PIECE_BYTES} bytes: send larger chunks"))
                        raise h11.RemoteProtocolError(self._refusal[1])
                elif type(event) is h11.Request:
                    self._pieces = self._piece_bytes = 0
                return event

            self.conn.next_event = counted

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                if self._head_timer is None:
                    self._arm()  # a new request head starts on a kept-alive connection
                # the head ends at the first blank line (searched across chunk boundaries)
                end = (self._tail + data).find(b"\r\n\r\n")
                size = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._tail))
                if size > max_header_bytes:
                    self._refuse_http("head_too_large", f"a request head over {max_header_bytes} bytes")
                    return
                self._head_bytes, self._tail = (0, b"") if end >= 0 else (size, (self._tail + data)[-3:])
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()
            if self._linger_timer is not None and self.conn.their_state is not h11.SEND_BODY:
                self._end_linger()  # that body ended in time: the connection carries on

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._end_linger()
            super().connection_lost(exc)

        _linger_timer: asyncio.TimerHandle | None = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                # answered before its body was whole (a 413 mid-body, a route that never read it): uvicorn reads
                # and drops the rest, and every byte re-arms its keep-alive timer, so a client that went on
                # sending held the connection for ever. The rest gets a bounded time, then the connection closes
                # (a lingering close, as nginx does: closing at once could reset the answer away at the client).
                self._linger_timer = self.loop.call_later(linger_s, self._linger_timeout)

        def _end_linger(self) -> None:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None

        def _linger_timeout(self) -> None:
            self._linger_timer = None
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.transport.close()
                refused("body_after_answer", None, f"the client went on sending a body answered before it was whole "
                        f"for {linger_s:g} s; the connection was closed", self.client)

        def _unsupported_upgrade_warning(self) -> None:
            """Quiet: uvicorn logged two warnings (one telling to install a WebSocket library) for every request
            with an ``upgrade`` header, a log flood for the asking; a WebSocket upgrade is refused, logged and counted
            by :class:`_Guard`, and any other upgrade (``h2c``) is served as HTTP/1.1, as RFC 9110 section 7.8
            allows."""

        def send_400_response(self, msg: str) -> None:  # malformed HTTP: uvicorn's plain-text 400, as JSON
            reason, msg = self._refusal or ("invalid_http", msg)
            self._refuse_http(reason, msg)

        def _refuse_http(self, reason: str, msg: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                error = InvalidHTTPError(f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})")
                self.transport.write(raw_error(error))
                self.transport.close()
                refused(reason, 400, str(error), self.client)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()
                refused("head_timeout", None, f"no complete request head within {header_timeout:g} s "
                        f"({self._head_bytes} bytes of it received); the connection was closed",
                        self.client)

    return GuardedH11Protocol


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port), for uvicorn to listen on.

    Raises:
        OSError: the address cannot be bound (in use, not an address of this machine), with a message saying
            which and what to do; so ``serve`` fails at once, not after loading the model.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets of that protocol, and uvicorn writes
    # headers and body separately, so with Nagle on every keep-alive response waits ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = " (another server has it: stop that one or pick another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def generation_defaults_notes(session: MultiAdapterSession) -> list[str]:
    """The sampling defaults taken from the export's ``generation_config.json``, one line for the operator (none if
    it sets none), as vLLM says it overrides its defaults with the model's."""
    applied = dict(session.generation_defaults.applied)
    if not applied:
        return []
    parts = []
    repetition = applied.pop("repetition_penalty", None)
    if repetition is not None:
        parts.append(f"repetition_penalty {repetition:g} for every generation request that gives none (greedy or "
                     "sampled, as transformers' generate() applies it)")
    if applied:
        parts.append(", ".join(f"{k} {v:g}" for k, v in applied.items()) + " for OpenAI requests that give none")
    return [f"{session.export_dir / 'generation_config.json'}: sampling defaults, as vLLM's --generation-config auto "
            f"applies them: {'; '.join(parts)}"]


def startup_notes(server: Server) -> list[str]:
    """What a server about to take requests should tell its operator: inputs it will refuse, and a server that
    can only ever answer with the base model (no adapter loaded, no store to load one from)."""
    session = server.session
    notes = []
    if session.tokenizer_problem:
        notes.append(f"text inputs will be refused: {session.tokenizer_problem}")
    if session.tokenizer_mismatch:
        notes.append(session.tokenizer_mismatch)
    if session.positions_note:  # config.json (or the tokenizer) claims more positions than the graph's table holds
        notes.append(session.positions_note)
    if session.truncation_note:  # the tokenizer cuts texts far below what the model holds
        notes.append(session.truncation_note)
    if session.vocabulary_note:  # config.json claims more token ids than the graph embeds
        notes.append(session.vocabulary_note)
    if session.with_past:  # a generation_config.json value that is not what transformers means by it is not used
        notes.extend(session.generation_notes)
        notes.extend(generation_defaults_notes(session))
    if server.embeddings is not None:  # sentence-transformers modules not run (a Dense projection...)
        notes.extend(server.embeddings.notes)
    unnamed = server.store.unnamed() if server.store is not None else []
    if unnamed:
        shown = ", ".join(repr(n[:60]) for n in unnamed[:5]) + (f" and {len(unnamed) - 5} more" if len(unnamed) > 5
                                                                 else "")
        notes.append(f"{len(unnamed)} folder(s) of the adapter store cannot be served, their names not being adapter "
                     f"names (1-128 letters, digits, '.', '_' or '-', a letter or digit first): {shown}; rename them "
                     "to load them")
    nested = server.store.nested() if server.store is not None else []
    if nested:  # loaded by the folder's name, each is refused naming what it holds (AdapterStore.path)
        shown = "; ".join(f"{entry[:60]!r} ({', '.join(printable(n[:60]) + '/' for n in inside[:3])}"
                          f"{', ...' if len(inside) > 3 else ''})" for entry, inside in nested[:5]) + (
            f"; and {len(nested) - 5} more" if len(nested) > 5 else "")
        notes.append(f"{len(nested)} folder(s) of the adapter store hold adapters only in folders inside them (as PEFT "
                     "saves adapters not named 'default', or a transformers Trainer its checkpoints), which no request "
                     f"can name: {shown}; give each adapter to serve an entry of its own (move or link it into the "
                     "store)")
    if not session.snapshot().slots and server.store is None:
        notes.append("no adapter is loaded and none can be (no --adapter-store): every request gets the base model "
                     f"({server.model_name!r}); one naming an adapter gets 404")
    return notes


def run_server(export_dir: str | Path, *, adapter_store: str | Path | None = None, load: Sequence[str] = (),
               load_exported: bool = True, options: ServeOptions | None = None,
               on_ready: Callable[[str], None] | None = None) -> None:
    """Build the app (see :func:`build`) and serve it with uvicorn on ``options.host:options.port`` until interrupted.

    The address is bound first (a port in use fails before the model loads); ``on_ready`` gets the server's
    URL line once the export is loaded and checked, just before requests are taken. Its shutdown on SIGTERM or
    SIGINT is bounded (:func:`bounded_server`): past ``--shutdown-timeout-s`` and a few seconds, the process exits
    even with work stuck in a thread.
    """
    import uvicorn  # noqa: F401 - not installed: said before the model loads

    options = options or ServeOptions()
    sock = listening_socket(options.host, options.port)
    try:
        app = build(export_dir, adapter_store=adapter_store, load=load, load_exported=load_exported, options=options)
        configure_logging()
        if on_ready is not None:
            on_ready("\n".join([f"serving {export_dir} on http://{options.host}:{sock.getsockname()[1]} (Ctrl-C to "
                                 "stop)", *(f"note: {line}" for line in startup_notes(app.state.server))]))
        bounded_server(uvicorn_config(app, host=options.host, port=options.port), app.state.server,
                       exit_when_stuck=True).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """Serve ``app`` with uvicorn in a background thread on ``host`` and a free port (tests, benchmarks).

    ``with ServerThread(app) as server: requests to server.url``; stopped and joined on exit.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> None:
        self._socket = listening_socket(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.app = app
        self.server = bounded_server(uvicorn_config(app), app.state.server)
        self._thread = threading.Thread(target=self._run, kwargs={"sockets": [self._socket]},
                                        name="bca-serve", daemon=True)
        self._startup_timeout = startup_timeout

    def _run(self, **kwargs: Any) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn's exit when the app's start fails: __enter__ raises why
            self.server.run(**kwargs)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if self.app.state.server.startup_error is not None:  # its start-up checks failed: why, as serve says it
                self._thread.join(timeout=30)
                self._socket.close()
                raise self.app.state.server.startup_error
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServingError(f"the server on {self.url} did not start within {self._startup_timeout:.0f} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
