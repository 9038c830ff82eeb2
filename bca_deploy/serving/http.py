"""``bca-deploy serve``: an HTTP front for :class:`~bca_deploy.serving.MultiAdapterSession` (FastAPI on uvicorn).

Endpoints (JSON in and out; errors are ``{"error": {"type", "message"}}`` with a 4xx/5xx status):

    GET    /health                     status, task, loaded adapters
    GET    /v1/adapters                loaded adapters (+ names available in the adapter store)
    POST   /v1/adapters                {"name", "replace"?}: load <store>/<name>            201 / 404 / 409 / 422
    DELETE /v1/adapters/{name}         unload                                               200 / 404
    POST   /v1/embeddings              {"input", "adapter"?, "pooling"?, "normalize"?}      encoders
    POST   /v1/classify                {"input", "adapter"?}                                text-classification
    POST   /v1/generate                {"input", "adapter"?, "max_new_tokens"?, "do_sample"?,
                                        "temperature"?, "top_k"?, "top_p"?, "seed"?}       decoders with past

``input`` is a text, a list of texts, or a list of token-id lists; ``adapter`` is a loaded adapter's
name, or null for the base model. Concurrent requests are **micro-batched**: requests of one kind
that arrive within ``max_wait_ms`` of each other (up to ``max_batch_rows`` rows) run as one mixed
batch, each row through its own adapter. A batch runs on one snapshot of the adapter bank, so
loading or unloading during traffic never mixes adapters; a request whose adapter is gone by then
gets a 404 and the others in its batch are unaffected. Every request writes one JSON log line
(logger ``bca_deploy.serve``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import AdapterFormatError, AdapterMismatchError, AdapterNameError, ServingError, UnknownAdapterError
from .session import BASE, MultiAdapterSession
from .store import AdapterStore

__all__ = ["create_app", "build", "run_server", "configure_logging", "ServerThread", "MicroBatcher", "LOGGER_NAME"]

LOGGER_NAME = "bca_deploy.serve"
_log = logging.getLogger(LOGGER_NAME)

Inputs = Union[str, list[str], list[list[int]]]


def _rows(inputs: Inputs) -> list:
    return [inputs] if isinstance(inputs, str) else list(inputs)


# ---- micro-batching -------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str
    rows: list
    adapter: str | None
    params: dict[str, Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    batch_rows: int = 0
    batch_requests: int = 0
    started: float = 0.0

    def group(self) -> tuple:
        # Jobs of one group can share a batch: generation takes per-row parameters, embeddings share pooling.
        if self.kind == "embed":
            return (self.kind, self.params["pooling"], self.params["normalize"])
        return (self.kind,)


class MicroBatcher:
    """Collects concurrent jobs into mixed-adapter batches and runs them one at a time off the event loop.

    A batch is closed when it holds ``max_batch_rows`` rows or ``max_wait_ms`` after its first job
    arrived. Jobs whose adapter is unknown when the batch starts fail alone (404).
    """

    def __init__(self, session: MultiAdapterSession, max_batch_rows: int = 64, max_wait_ms: float = 5.0) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        self.session = session
        self.max_batch_rows = int(max_batch_rows)
        self.max_wait = max(float(max_wait_ms), 0.0) / 1000.0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        # One inference thread: batches run one after another (onnxruntime uses its own intra-op threads).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bca-infer")
        self._held: list[_Job] = []
        self.batches = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="bca-microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, kind: str, rows: list, adapter: str | None, params: dict[str, Any]) -> tuple[Any, _Job]:
        if self._queue is None:
            raise ServingError("the batcher is not running")
        job = _Job(kind, rows, adapter, params, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future, job

    async def _next_batch(self) -> list[_Job]:
        assert self._queue is not None
        first = self._held.pop(0) if self._held else await self._queue.get()
        batch, rows = [first], len(first.rows)
        group = first.group()
        # Held jobs (a different group than the batch they met) go first, in arrival order.
        for job in list(self._held):
            if rows >= self.max_batch_rows:
                break
            if job.group() == group and rows + len(job.rows) <= self.max_batch_rows:
                self._held.remove(job)
                batch.append(job)
                rows += len(job.rows)
        deadline = first.enqueued + self.max_wait
        while rows < self.max_batch_rows:
            timeout = deadline - time.perf_counter()
            try:
                job = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if job.group() != group or rows + len(job.rows) > self.max_batch_rows:
                self._held.append(job)
                if job.group() == group:
                    break  # full: this one starts the next batch
                continue
            batch.append(job)
            rows += len(job.rows)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            snapshot = self.session.snapshot()
            runnable = []
            for job in batch:
                if job.adapter is not None and job.adapter not in snapshot.slots:
                    job.future.set_exception(UnknownAdapterError(
                        f"unknown adapter {job.adapter!r}; loaded: {', '.join(sorted(snapshot.slots)) or '(none)'}"))
                else:
                    runnable.append(job)
            if not runnable:
                continue
            rows = sum(len(j.rows) for j in runnable)
            started = time.perf_counter()
            for job in runnable:
                job.batch_rows, job.batch_requests, job.started = rows, len(runnable), started
            try:
                results = await loop.run_in_executor(self._executor, self._run, runnable, snapshot)
            except Exception as exc:  # the whole batch failed: every job gets the error
                for job in runnable:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batches += 1
            for job, result in zip(runnable, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)

    def _run(self, jobs: list[_Job], snapshot) -> list[Any]:
        """One mixed batch (in the inference thread): concatenate rows, run, split per job."""
        rows = [r for job in jobs for r in job.rows]
        adapters = [job.adapter for job in jobs for _ in job.rows]
        kind = jobs[0].kind
        if kind == "embed":
            params = jobs[0].params
            out: Any = self.session.embed(rows, adapters, pooling=params["pooling"], normalize=params["normalize"],
                                          snapshot=snapshot)
        elif kind == "classify":
            out = self.session.classify(rows, adapters, snapshot=snapshot)
        elif kind == "generate":
            per_row = {key: [job.params[key] for job in jobs for _ in job.rows]
                       for key in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p")}
            # Each row of a request gets its own generator: seed + row index, so rows differ but stay reproducible.
            per_row["seed"] = [None if job.params["seed"] is None else job.params["seed"] + i
                               for job in jobs for i in range(len(job.rows))]
            out = self.session.generate(rows, adapters, snapshot=snapshot, **per_row)
        else:  # pragma: no cover - kinds are fixed by the endpoints
            raise ServingError(f"unknown job kind {kind!r}")
        results, start = [], 0
        for job in jobs:
            results.append(out[start:start + len(job.rows)])
            start += len(job.rows)
        return results


# ---- the app --------------------------------------------------------------------------------------


class _Request(BaseModel):
    """Fields every inference request has."""

    model_config = ConfigDict(extra="forbid")
    input: Inputs = Field(description="a text, a list of texts, or a list of token-id lists")
    adapter: str | None = Field(default=None, description="a loaded adapter's name; null: the base model")


class EmbedRequest(_Request):
    """``POST /v1/embeddings``: one vector per input row."""

    pooling: Literal["mean", "cls", "last"] = "mean"
    normalize: bool = False


class ClassifyRequest(_Request):
    """``POST /v1/classify``: label, score and per-label scores per input row."""


class GenerateRequest(_Request):
    """``POST /v1/generate``: new tokens per prompt (greedy by default; sampled with ``do_sample``)."""

    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None


class LoadRequest(BaseModel):
    """``POST /v1/adapters``: load ``<adapter store>/<name>``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    replace: bool = False


def create_app(
    session: MultiAdapterSession,
    store: AdapterStore | None = None,
    *,
    max_batch_rows: int = 64,
    max_wait_ms: float = 5.0,
):
    """The FastAPI application serving ``session`` (see the module docstring for the endpoints).

    Args:
        session: the runtime (its registered adapters are served as they are).
        store: where ``POST /v1/adapters`` loads adapters from, by name; without a store, adapters
            can only be registered from Python and the endpoint answers 400.
        max_batch_rows: the most rows one mixed batch holds (a larger request runs alone).
        max_wait_ms: how long the first request of a batch waits for others to join.
    """
    batcher = MicroBatcher(session, max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="bca-deploy serve", version=_version(), lifespan=lifespan,
                  description="Many block-circulant adapters on one base model, chosen per request.")
    app.state.session, app.state.store, app.state.batcher = session, store, batcher

    def error(status: int, kind: str, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message}})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(422, "invalid_request", problems)

    @app.middleware("http")
    async def _log_request(request: Request, call_next):
        start = time.perf_counter()
        request.state.log = {}
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            entry = {"ts": round(time.time(), 3), "request_id": request_id, "method": request.method,
                     "path": request.url.path, "status": status,
                     "latency_ms": round((time.perf_counter() - start) * 1000, 3), **request.state.log}
            _log.info(json.dumps(entry, separators=(",", ":")))
        response.headers["x-request-id"] = request_id
        return response

    def adapter_of(body: _Request) -> str | None:
        return None if body.adapter in (None, BASE) else body.adapter

    async def infer(request: Request, kind: str, body: _Request, params: dict[str, Any], max_new_tokens: int = 0):
        rows = _rows(body.input)
        adapter = adapter_of(body)
        request.state.log.update({"adapter": adapter, "rows": len(rows), "kind": kind})
        try:
            if adapter is not None and adapter not in session.snapshot().slots:
                raise UnknownAdapterError(f"unknown adapter {adapter!r}; loaded: "
                                          f"{', '.join(sorted(session.snapshot().slots)) or '(none)'}")
            token_rows = await run_in_threadpool(session.prepare, rows, max_new_tokens)  # texts tokenized once, here
            result, job = await batcher.submit(kind, token_rows, adapter, params)
        except UnknownAdapterError as exc:
            return None, error(404, "unknown_adapter", str(exc))
        except ServingError as exc:
            return None, error(400, "bad_request", str(exc))
        except Exception as exc:  # a failed batch: answer in JSON, keep serving, log the traceback once
            _log.error(json.dumps({"ts": round(time.time(), 3), "event": "batch_failed",
                                   "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": "".join(traceback.format_exception(exc))}, separators=(",", ":")))
            request.state.log["error"] = f"{type(exc).__name__}: {exc}"
            return None, error(500, "internal_error", f"{type(exc).__name__}: {exc}")
        request.state.log.update({"batch_rows": job.batch_rows, "batch_requests": job.batch_requests,
                                  "queue_ms": round((job.started - job.enqueued) * 1000, 3)})
        return result, None

    @app.get("/health")
    async def health():
        snapshot = session.snapshot()
        return {"status": "ok", "task": session.task, "model_type": session.model_type,
                "adapters": len(snapshot.slots), "bank_version": snapshot.version}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": [a.to_dict() for a in session.adapters()],
                "available": store.names() if store is not None else None}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: Request, body: LoadRequest):
        request.state.log["adapter"] = body.name
        if store is None:
            return error(400, "no_store", "this server has no adapter store (start it with --adapter-store DIR)")
        try:
            path = store.path(body.name)
            if body.name in session.snapshot().slots and not body.replace:
                return error(409, "adapter_exists", f"adapter {body.name!r} is already loaded; pass \"replace\": true "
                                                    "to reload it")
            info = await run_in_threadpool(session.register, body.name, path, replace=body.replace)
        except AdapterNameError as exc:
            return error(422, "invalid_adapter_name", str(exc))
        except UnknownAdapterError as exc:
            return error(404, "unknown_adapter", str(exc))
        except (AdapterMismatchError, AdapterFormatError) as exc:
            return error(422, "adapter_does_not_fit", str(exc))
        except ValueError as exc:  # loaded concurrently by another request
            return error(409, "adapter_exists", str(exc))
        return info.to_dict()

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str):
        request.state.log["adapter"] = name
        try:
            info = await run_in_threadpool(session.unregister, name)
        except UnknownAdapterError as exc:
            return error(404, "unknown_adapter", str(exc))
        return info.to_dict()

    def require(kind: str):
        ok = {"embed": not session.with_past and "last_hidden_state" in session.output_names,
              "classify": not session.with_past and "logits" in session.output_names,
              "generate": session.with_past}[kind]
        if not ok:
            return error(400, "wrong_task", f"this server's graph was exported for {session.task!r}; "
                                            f"{kind} is not available")
        return None

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbedRequest):
        if (refused := require("embed")) is not None:
            return refused
        result, refused = await infer(request, "embed", body, {"pooling": body.pooling, "normalize": body.normalize})
        if refused is not None:
            return refused
        return {"adapter": adapter_of(body), "data": [{"index": i, "embedding": np.asarray(v).tolist()}
                                                      for i, v in enumerate(result)]}

    @app.post("/v1/classify")
    async def classify(request: Request, body: ClassifyRequest):
        if (refused := require("classify")) is not None:
            return refused
        result, refused = await infer(request, "classify", body, {})
        if refused is not None:
            return refused
        return {"adapter": adapter_of(body), "data": [{"index": i, **r} for i, r in enumerate(result)]}

    @app.post("/v1/generate")
    async def generate(request: Request, body: GenerateRequest):
        if (refused := require("generate")) is not None:
            return refused
        params = body.model_dump(include={"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed"})
        result, refused = await infer(request, "generate", body, params, max_new_tokens=body.max_new_tokens)
        if refused is not None:
            return refused
        data = []
        for i, tokens in enumerate(result):
            item: dict[str, Any] = {"index": i, "token_ids": tokens}
            if isinstance(body.input, str) or (isinstance(body.input, list) and body.input and isinstance(body.input[0], str)):
                item["text"] = session.decode(tokens)
            data.append(item)
        return {"adapter": adapter_of(body), "data": data}

    return app


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
    provider: str = "cpu",
    threads: int | None = None,
    max_batch_rows: int = 64,
    max_wait_ms: float = 5.0,
    load_exported: bool = True,
):
    """Session + store + app, with ``load`` (names in the store) registered up front. Errors surface before serving."""
    session = MultiAdapterSession(export_dir, provider=provider, intra_op_threads=threads, load_exported=load_exported)
    store = AdapterStore(adapter_store) if adapter_store is not None else None
    if load and store is None:
        raise ServingError("loading adapters by name needs an adapter store (--adapter-store DIR)")
    for name in load:
        session.register(name, store.path(name), replace=True)  # type: ignore[union-attr]
    session.warm_up()  # config, tokenizer and onnxruntime's first run now, not during the first request
    return create_app(session, store, max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms)


def run_server(export_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Build the app (see :func:`build`) and serve it with uvicorn until interrupted."""
    import uvicorn

    app = build(export_dir, **kwargs)
    configure_logging()
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")


class ServerThread:
    """Serve ``app`` with uvicorn in a background thread on ``host`` and a free port (tests, benchmarks).

    ``with ServerThread(app) as server: requests to server.url``; stopped and joined on exit.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> None:
        import uvicorn

        # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets of that protocol, and uvicorn writes
        # headers and body separately, so with Nagle on every keep-alive response waits ~40 ms for an ACK.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, access_log=False, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="bca-serve", daemon=True)
        self._startup_timeout = startup_timeout

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServingError(f"the server on {self.url} did not start within {self._startup_timeout:.0f} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
