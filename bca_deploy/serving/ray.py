"""Scale-out on Ray Serve: one adapter-bank export served by many replicas, adapters multiplexed over them.

Two deployments (``pip install 'bca-deploy[onnx,ray]'``):

- :class:`AdapterReplicas` (``replicas`` copies): each holds the export in a
  :class:`~bca_deploy.serving.MultiAdapterSession` and runs the same app as ``bca-deploy serve``
  (:func:`bca_deploy.serving.http.create_app`: native and OpenAI routes, limits, errors, batching,
  metrics) in-process. Store adapters are Ray Serve **multiplexed models**: ``get_adapter`` (decorated
  with ``serve.multiplexed``) registers ``<store>/<name>`` in the replica's bank on first use and
  unregisters the least recently used one beyond ``max_adapters_per_replica`` (after the requests using
  it have finished). The adapters the graph was exported with are in every replica's bank.
- :class:`Router` (the HTTP ingress): reads each request once (with the body-size limit), finds the
  adapter it names (``model``, ``adapter`` or ``lora_name`` in the JSON body), and forwards it with
  ``multiplexed_model_id=<adapter>``, so Ray sends it to a replica that holds the adapter (and loads it
  on one otherwise); base-model requests go to any replica. Answers, streamed ones included, come back
  unchanged. ``GET /v1/models`` lists the base model, the exported adapters and the store's entries
  (all can be served, each loaded on demand), with the ``max_model_len`` a replica gives (asked once; null until
  one answers). vLLM's ``/tokenize`` and ``/detokenize`` are routed by their ``model`` as the other routes are,
  ``/version`` goes to any
  replica: each answers them as ``bca-deploy serve`` does. The answers it gives itself (its refusals, the model listing,
  ``GET /metrics``) are counted in serve's request metrics (:func:`~bca_deploy.serving.http.record_request`: same
  families and labels, same access line).
- :class:`MetricsHub` (a detached Ray actor, ``num_cpus=0``, named after the application, started or joined by the
  router, in the :data:`METRICS_HUB_NAMESPACE` namespace; ended by ``serve-ray``'s shutdown
  (:func:`end_metrics_hub`), and ending itself after :data:`METRICS_HUB_IDLE_S` without pushes or scrapes): each
  replica pushes its whole metrics text there every :data:`METRICS_PUSH_S` seconds and when it shuts down (a
  thread of its own: serving never waits on it). The router's ``GET /metrics`` is the deployment's:
  :func:`~bca_deploy.serving.metrics.merge_expositions` of the latest texts, with the router's own answers and
  ``bca_metrics_replicas{state="live"|"gone"}`` added. Counters and histograms are summed over every replica that
  has reported, a gone one (scaled down, shut down, or silent for :data:`METRICS_STALE_S`) with its last text, so
  totals never go down (but when a replica drops an unloaded adapter's series, as a single server does); the
  ``_created`` samples are the earliest; the gauges are summed over the live replicas: ``bca_queued_rows`` is the
  rows queued in the whole deployment, ``bca_adapters_loaded`` the adapters loaded summed over replicas (an adapter
  held by two replicas counts twice; the exported ones once per replica). The answer is at most one push interval
  old (:data:`METRICS_HEADER` says how many replicas it sums). A hub that is gone or does not answer in
  :data:`METRICS_HUB_TIMEOUT_S` makes it one replica's text with the router's answers added
  (:func:`~bca_deploy.serving.metrics.with_requests_of`), the header saying why; the router starts a new hub
  at a later scrape, and the live replicas refill it within one push (the gone ones' counts are lost then). A
  redeploy (new router, new replicas) joins the same hub: the totals go on, the old replicas among the gone.

The load routes answer as a single server does (201/200, or 409 ``adapter_exists`` when the replica the
request reaches holds the adapter already, as every replica holds the exported ones); replacing an
adapter in place (``replace`` / ``load_inplace``) and unloading by hand are refused (each replica
loads from the store on its own, so a replacement would reach one replica only). A request naming an
adapter that is neither exported nor in the store gets the single server's 404 (naming that adapter
alone). ``bca-deploy serve``'s own HTTP-protocol settings (:data:`~bca_deploy.serving.options.NOT_ON_RAY`:
head timeout, connection limit, head size) are not offered: Ray Serve's proxy has its own.

Started with one command on a local Ray instance (``bca-deploy serve-ray EXPORT --adapter-store DIR
--replicas 2``), or on a running cluster with Ray's own CLI, the same code::

    RAY_ADDRESS=auto serve run bca_deploy.serving.ray:build_app \\
        export_dir=/shared/onnx-bank adapter_store=/shared/adapters replicas=4

(``export_dir`` and ``adapter_store`` must be readable at the same paths on every node.) With
``provider=cuda`` each replica asks Ray for one GPU (``replica_gpus``), so Ray places replicas on GPU
nodes and gives each its own device.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import BCAError, ServingError, UnknownAdapterError, first_line, format_problems
from .openai import ClosingStreamingResponse, model_card
from .metrics import CONTENT_TYPE, ServerMetrics, merge_expositions, with_requests_of
from .options import NOT_ON_RAY, ServeOptions
from .session import BASE, ADAPTER_NAME_PATTERN, bank_metadata, not_loaded
from .wire import (
    BODY_ROUTES,
    READ_METHODS,
    AdapterExistsError,
    ClientClosedRequestError,
    InvalidRequestError,
    body_too_large,
    body_too_slow,
    check_body_headers,
    error_body,
    field_errors,
    error_status,
    is_openai_request,
    parse_body,
    validate,
)

__all__ = ["AdapterReplicas", "Router", "MetricsHub", "build_app", "run", "end_metrics_hub", "REPLICA_HEADER",
           "METRICS_HEADER"]

#: Response header naming the replica that answered (for routing checks and debugging).
REPLICA_HEADER = "x-bca-replica"
#: Routes that load an adapter (route -> success status): on Ray, the multiplexed load on the chosen replica.
_LOAD_ROUTES = {"/v1/adapters": 201, "/v1/load_lora_adapter": 200}
#: How long an evicted adapter waits for the requests still using it before it is unloaded anyway.
_EVICT_WAIT_S = 60.0
#: How long the driver waits for a replica's start-up notes (seconds): the replicas are up, so it answers at once.
_NOTES_TIMEOUT_S = 30.0
ADDRESS_TIMEOUT_S = 5.0  # how long --address host:port may take to accept a connection
#: How long the router's model listing waits for a replica's ``max_model_len`` (asked once; null on the cards until
#: a replica answers).
MODEL_LEN_WAIT_S = 5.0
#: Response header of the router's ``GET /metrics``: ``deployment (N replicas reporting, M gone)`` when the answer is
#: the deployment's sum, ``one replica (<why>)`` when the metrics hub could not answer and one replica's text is given.
METRICS_HEADER = "x-bca-metrics"
#: Seconds between two pushes of a replica's metrics to the hub: the staleness bound of the router's ``GET /metrics``.
METRICS_PUSH_S = 1.0
#: How long a push, or the router's question to the hub, may take before it is given up (serving never waits on it).
METRICS_HUB_TIMEOUT_S = 2.0
#: The Serve application name ``bca-deploy serve-ray`` deploys under.
APP_NAME = "bca-deploy"
#: A replica that has not pushed for this long is counted as gone: its gauges leave the sums, its counters stay.
METRICS_STALE_S = 10.0
#: The largest metrics text a replica may push (a larger one is refused, its previous one kept): bounds the hub.
METRICS_MAX_BYTES = 8 * 2**20
#: Gone replicas whose last texts the hub keeps apart; beyond this, the oldest are folded into one retired sum.
METRICS_MAX_GONE = 16

#: A hub nobody pushed to or asked for this long (the application was deleted or Serve shut down) ends itself.
METRICS_HUB_IDLE_S = 600.0
#: The Ray namespace of the metrics hubs: a fixed one, so that the driver that deployed the application finds its hub
#: to end it at shutdown (in the job's anonymous namespace Ray warns that a detached actor there cannot be found).
METRICS_HUB_NAMESPACE = "bca-deploy"
#: Names of folded replicas the hub remembers (to refuse one that comes back rather than count it twice).
_MAX_FOLDED = 4096

_log = logging.getLogger(__name__)


class _StoreAdapter:
    """A store adapter registered in one replica's bank; Ray calls ``__del__`` when it evicts it (LRU)."""

    def __init__(self, replica: AdapterReplicas, name: str) -> None:
        self.replica, self.name = replica, name

    async def __del__(self) -> None:
        await self.replica._evict(self.name)


class _Resident:
    """An adapter exported into the graph: in every replica's bank for good; eviction changes nothing."""

    def __init__(self, name: str) -> None:
        self.name = name


@serve.deployment
class AdapterReplicas:
    """One replica: the export in onnxruntime and the ``bca-deploy serve`` app, run in-process."""

    def __init__(self, export_dir: str, adapter_store: str | None, options: Mapping[str, Any],
                 max_adapters_per_replica: int = 16) -> None:
        from .http import configure_logging, create_app
        from .session import MultiAdapterSession
        from .store import AdapterStore

        configure_logging()  # the app's access lines, as serve writes them (stderr: the replica's log in Ray)
        self.options = ServeOptions(**options)
        self.session = MultiAdapterSession(export_dir, provider=self.options.provider,
                                           intra_op_threads=self.options.threads, spin=self.options.spin,
                                           max_labels=self.options.max_labels)
        self.exported = frozenset(self.session.snapshot().slots)
        self.store = AdapterStore(adapter_store) if adapter_store else None
        self.app = create_app(self.session, self.store, self.options)
        self.server = self.app.state.server
        # serve's own (a chat template that loops or fails...): this replica does not start, as serve does not
        self.server.startup_checks()
        self._started: asyncio.Task | None = None
        self._in_use: Counter[str] = Counter()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context is not None else "local"
        # this replica's metrics, pushed to the deployment's hub for the router's GET /metrics (on Ray only)
        self._pusher = _MetricsPusher(_hub_name(context.replica_id.deployment_id.app_name), self.replica_id,
                                      self.server.metrics.render) \
            if context is not None and self.options.metrics else None

        async def get_adapter(name: str):
            return await self._load(name)

        # Ray Serve's multiplexed loader, made here so that its LRU size is this deployment's setting.
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)(get_adapter)

    def __del__(self) -> None:
        """Ray Serve's shutdown of this replica (scale-down, redeploy, ``serve.shutdown``): its last metrics pushed."""
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.close()

    def max_model_len(self) -> int | None:
        """The served model's ``max_model_len`` (:attr:`~bca_deploy.serving.http.Server.max_model_len`), for the
        router's model cards (every replica loads the same export)."""
        return self.server.max_model_len

    def startup_notes(self) -> list[str]:
        """What this replica's server would tell its operator at start-up (:func:`~bca_deploy.serving.http.startup_notes`):
        the driver prints them once, as ``bca-deploy serve`` does (every replica loads the same export)."""
        from .http import startup_notes

        return startup_notes(self.server)

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self.server.start())
        await self._started

    async def _load(self, name: str):
        """The adapter ``name`` in this replica's bank (from the store on first use); Ray caches the result."""
        await self._start()
        if name in self.exported:
            return _Resident(name)
        if name not in self.session.snapshot().slots:
            if self.store is None:  # nothing to load it from: the single server's refusal of an unknown adapter
                raise not_loaded(name)
            await self.server.load(name)
        return _StoreAdapter(self, name)

    async def _evict(self, name: str) -> None:
        waited = 0.0
        while self._in_use[name] and waited < _EVICT_WAIT_S:  # let running requests finish with it
            await asyncio.sleep(0.01)
            waited += 0.01
        with contextlib.suppress(BCAError):
            await self.server.unload(name)

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> AsyncIterator[Any]:
        """Run one HTTP request through the app; yields ``{"status", "headers"}`` first, then body chunks."""
        await self._start()
        name = serve.get_multiplexed_model_id()
        load_route = method == "POST" and path in _LOAD_ROUTES
        loading = bool(name) and load_route and self.store is not None  # without a store: the app's own refusal
        counted = False
        try:
            if name and (loading or not load_route):
                held = name in self.session.snapshot().slots  # before this request: exported, or loaded here
                try:
                    with _load_errors(path, loading, body, name):
                        if loading:
                            _check_load(path, name, body, held)
                        await self.get_adapter(name)
                except BCAError as exc:  # the same answer as a single server's
                    if isinstance(exc, UnknownAdapterError) and not loading:  # not in the store: name it alone
                        exc = not_loaded(name, param=_adapter_field_of(body))  # "model", "adapter": the field
                    status, kind = error_status(exc, is_openai_request(path, _json_or_none(body)))
                    yield {"status": status, "headers": [(b"content-type", b"application/json"),
                                                         (REPLICA_HEADER.encode(), self.replica_id.encode())]}
                    yield json.dumps(error_body(status, kind, self.server.redact(str(exc)),
                                                getattr(exc, "param", None))).encode()
                    return
                # in use from here to the end of the answer: its eviction waits for this request. Counted only once
                # the adapter is held (no await since the load returned), never while the load waits: Ray's loads
                # wait on the eviction (one cache lock), so a request for an adapter being evicted, counted while
                # it waited, held that eviction and every load behind it for _EVICT_WAIT_S (61 s answers)
                self._in_use[name] += 1
                counted = True
            if loading:  # the multiplexed load above was the load
                info = self.server.public_info(self.session.snapshot().infos[name])
                answer = info if path == "/v1/adapters" else {"status": "ok", "message": f"adapter {name!r} loaded",
                                                              "adapter": info}
                yield {"status": _LOAD_ROUTES[path], "headers": [(b"content-type", b"application/json"),
                                                                  (REPLICA_HEADER.encode(), self.replica_id.encode())]}
                yield json.dumps(answer).encode()
                return
            async for item in _call_asgi(self.app, method, path, query, headers, body):
                if isinstance(item, dict):
                    item["headers"] = [*item["headers"], (REPLICA_HEADER.encode(), self.replica_id.encode())]
                yield item
        finally:
            if counted:
                self._in_use[name] -= 1


def _load_errors(path: str, loading: bool, body: bytes, name: str) -> contextlib.AbstractContextManager:
    """What a refusal of the replica's (multiplexed) load of ``name`` names as its ``param``, by serve's rules: on vLLM's
    load route, serve's own (:func:`~bca_deploy.serving.openai.lora_load_errors`); on a serving route, the field that
    named the adapter (``model``, ``adapter``: an entry outside the store or one that does not fit the graph, as
    serve's load routes name the field that named the entry); the native load route names none, as serve's."""
    from .openai import lora_load_errors

    if loading and path == "/v1/load_lora_adapter":
        return lora_load_errors(name, exists_advice=" on the replica this request reached")
    if loading:
        return contextlib.nullcontext()
    field = _adapter_field_of(body)
    return field_errors(field) if field is not None else contextlib.nullcontext()


def _check_load(path: str, name: str, body: bytes, held: bool) -> None:
    """Check a load route's body as a single server does (its fields; 409 when the adapter is held already), and
    refuse what Ray cannot do (replacing in place)."""
    from .http import LoadRequest
    from .openai import LoadLoraRequest

    model, field = (LoadRequest, "replace") if path == "/v1/adapters" else (LoadLoraRequest, "load_inplace")
    request = validate(model, json.loads(body))  # the router parsed it already (read_body's limits)
    if getattr(request, field):
        raise InvalidRequestError(f"{field}: on Ray Serve, an adapter cannot be replaced in place (each replica "
                                  "loads it from the store on its own, so a replacement would reach one replica "
                                  "only); store the new weights under a new name", param=field)
    if held:
        raise AdapterExistsError(f"adapter {name!r} is already loaded on the replica this request reached")


#: The body fields that name a request's adapter, in the order they are looked for (OpenAI, native, vLLM's load
#: routes, the native load route).
_ADAPTER_FIELDS = ("model", "adapter", "lora_name", "name")


def _adapter_field(data: Any) -> str | None:
    """Which field of a request body names its adapter (None: none does, the base model)."""
    if not isinstance(data, dict):
        return None
    return next((k for k in _ADAPTER_FIELDS if k in data), None)


#: The routes of serve's app that the router answers or refuses itself, by (methods, template): its answers are
#: counted under these templates, as serve's app counts them (any other path: "unmatched", as serve counts it).
_ROUTER_ROUTES = ((READ_METHODS, "/metrics"), (READ_METHODS, "/v1/models"), (READ_METHODS, "/v1/models/{model}"),
                  (frozenset({"DELETE"}), "/v1/adapters/{name}"),
                  *((frozenset({"POST"}), path) for path in sorted(BODY_ROUTES)))


def _endpoint(method: str, path: str, headers: Mapping[str, str], max_body_bytes: int) -> str:
    """The ``endpoint`` label serve's app gives a request the router answers itself: the route template it
    matches, or "unmatched" (also a body refused by its ``content-length``, which serve refuses before routing)."""
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
        return "unmatched"
    for methods, template in _ROUTER_ROUTES:
        head, brace, _ = template.partition("{")
        matches = (path.startswith(head) and "/" not in path[len(head):] and len(path) > len(head)) if brace \
            else path == template
        if matches and method in methods:
            return template
    return "unmatched"


def _json_or_none(body: bytes | None) -> Any:
    """Raw body bytes the router has already read and checked, parsed (None if there are none or they are not JSON)."""
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _adapter_field_of(body: bytes) -> str | None:
    """:func:`_adapter_field` of raw body bytes the router has already read and checked (None if they are not JSON)."""
    return _adapter_field(_json_or_none(body))


class _Outbox:
    """The in-process connection of one request the app answers on a replica (:func:`_call_asgi`): what the app sends,
    held until Ray's streaming call takes it, and the connection's :class:`~bca_deploy.serving.http.WriteWatch` for the
    app (the ``WRITE_WATCH`` scope extension).

    It holds what a connection of ``bca-deploy serve`` holds before its send waits: up to
    :data:`~bca_deploy.serving.http.ANSWER_BUFFER_BYTES` (the part the kernel takes at once there); past it the send
    waits until Ray has taken some, and :meth:`buffered` is the part waiting (a transport's buffer the kernel would not
    take). So the app applies serve's rules to whoever takes the answer: a streamed answer's rows stopped with the 408
    event at ``--max-logprob-entries`` only while the consumer is behind (:meth:`~bca_deploy.serving.openai._Pumps.
    _reader_behind`), the answer cut when the consumer takes nothing for ``--body-timeout-s``. Before, the send never
    waited: nothing bounded what an answer queued here, and ``_Pumps``, with no watch, stopped the rows of a reader
    that kept up whenever this replica itself rendered chunks slower than the engine made them.

    The consumer is Ray, not the client: Serve's streaming calls have no flow control (``handle_request_streaming`` is
    called without ``_generator_backpressure_num_objects``; the router's sends go into Serve's queue without waiting),
    so on Serve's default HTTP path Ray takes each chunk at once and a slow client's unread answer waits in Ray's proxy,
    which does not bound it per request. The client's pace reaches this connection only where Ray passes it on (direct
    ingress, gRPC between deployments: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``).
    """

    def __init__(self, limit: int) -> None:
        self._messages: collections.deque = collections.deque()
        self.held = 0  # body bytes sent by the app and not taken yet
        self.peak = 0  # the most held at once (reported in the debug log)
        self._limit = limit
        self._ready = asyncio.Event()  # a message to take, or the end
        self._room = asyncio.Event()  # some were taken, or nobody will take more
        self._closed = False  # the app is done: nothing more comes
        self._gone = False  # nobody takes more (the consumer left, or the answer was cut): sends are dropped
        # the response was sent whole, or nobody takes more: the app's receive() answers http.disconnect from then on
        self.over = asyncio.Event()

    async def send(self, message: dict) -> None:
        """The app's ASGI ``send``: waits while more than the limit is held (dropped once nobody takes more, as a
        closed connection's sends are)."""
        if self._gone:
            return
        self._messages.append(message)
        if message["type"] == "http.response.body":
            self.held += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.over.set()
        self.peak = max(self.peak, self.held)
        self._ready.set()
        while self.held > self._limit and not self._gone:
            self._room.clear()
            await self._room.wait()

    async def take(self) -> dict | None:
        """The next message the app sent (waits for one); None at the end (the app is done, or the answer was cut)."""
        while not self._messages:
            if self._closed or self._gone:
                return None
            self._ready.clear()
            await self._ready.wait()
        message = self._messages.popleft()
        if message["type"] == "http.response.body":
            self.held -= len(message.get("body", b""))
        self._room.set()
        return message

    def close(self) -> None:
        """The app is done: what it sent is still taken, then :meth:`take` ends."""
        self._closed = True
        self._ready.set()

    def leave(self) -> None:
        """The consumer is gone: a send waiting for room returns, later ones are dropped."""
        self._gone = True
        self._room.set()
        self.over.set()

    def buffered(self) -> int:
        """Bytes the app sent past what the connection takes at once: its send waits for them (a transport's buffer)."""
        return max(0, self.held - self._limit)

    def unread(self) -> int:
        """Bytes the app sent that were not taken yet: falls only while they are taken."""
        return self.held

    def abort(self) -> None:
        """Cut the answer here (the consumer took nothing for ``--body-timeout-s``): what is held is dropped, and the
        answer ends after what was taken, as a reset connection's does."""
        self._messages.clear()
        self.held = 0
        self.leave()
        self._ready.set()


async def _call_asgi(app, method: str, path: str, query: bytes, headers, body: bytes) -> AsyncIterator[Any]:
    """One request through an ASGI app in this process: the response start, then its body chunks, each as Ray takes it
    (:class:`_Outbox`: the app's send waits while Ray is behind)."""
    from .http import ANSWER_BUFFER_BYTES, WRITE_WATCH

    outbox = _Outbox(ANSWER_BUFFER_BYTES)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": [(bytes(k), bytes(v)) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
             "extensions": {WRITE_WATCH: outbox}}
    delivered = asyncio.Event()

    async def receive():
        if not delivered.is_set():
            delivered.set()
            return {"type": "http.request", "body": body, "more_body": False}
        # once the response is whole (or nobody takes more), as uvicorn answers: this generator now runs to the end of
        # the app's task, so an app awaiting receive() after its response (legal ASGI) would otherwise hold it for ever
        await outbox.over.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(scope, receive, outbox.send))
    task.add_done_callback(lambda _: outbox.close())
    try:
        # to the end of the app's task, not to its last message: cancelled after its last message (as before), the
        # app logged and counted every answer on Ray as its client's hang-up (error_type client_closed_request)
        while (message := await outbox.take()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
    finally:
        outbox.leave()
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
        _log.debug("answer of %s %s: at most %d bytes held for Ray", method, path, outbox.peak)


def _replica_context():
    """Ray Serve's context of this replica, or None outside a deployment (a router built in a test)."""
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context()
    except RayServeException:
        return None


def _hub_name(app_name: str) -> str:
    """The Ray actor name of an application's metrics hub (replicas find it by name; one per Serve application)."""
    return f"bca-deploy-metrics-hub:{app_name}"


def end_metrics_hub(app_name: str = APP_NAME) -> bool:
    """End the metrics hub of the Serve application ``app_name`` (after ``serve.shutdown`` or ``serve.delete``: the
    replicas' last pushes are in, and nobody will ask it again); True if there was one. Without this a hub on a
    cluster that outlives the driver lingers for :data:`METRICS_HUB_IDLE_S` (it ends itself then)."""
    import ray

    try:
        ray.kill(ray.get_actor(_hub_name(app_name), namespace=METRICS_HUB_NAMESPACE), no_restart=True)
    except ValueError:  # none of that name: metrics off, or never started
        return False
    except Exception as exc:  # Ray's own types (a cluster gone meanwhile): the hub still ends itself when idle
        _log.warning("could not end the metrics hub of %s (%s: %s)", app_name, type(exc).__name__, first_line(exc, 200))
        return False
    return True


class MetricsHub:
    """The latest metrics text of every replica of one application, for the router's ``GET /metrics``.

    A detached Ray actor (``num_cpus=0``) named after the application, started by the router (or joined: a router
    restarted by a redeploy finds the same hub, so the totals go on); it ends itself once nobody has pushed to it or
    asked it for ``idle_s`` (the application was deleted, or Serve shut down). Each replica pushes its whole
    registry's text every :data:`METRICS_PUSH_S` and once more when it shuts down. A text is cumulative, so the
    latest one of each replica is all that is kept: its memory is bounded by the replicas (:data:`METRICS_MAX_BYTES`
    each), :data:`METRICS_MAX_GONE` gone ones kept apart, and older gone ones folded into one retired sum of their
    counters and histograms (a hub that died has lost only the gone ones: the live replicas refill a new one within
    one push).
    """

    def __init__(self, max_bytes: int = METRICS_MAX_BYTES, max_gone: int = METRICS_MAX_GONE,
                 stale_s: float = METRICS_STALE_S, idle_s: float | None = None) -> None:
        self.max_bytes, self.max_gone, self.stale_s = max_bytes, max_gone, stale_s
        self._touched = time.monotonic()
        if idle_s is not None:  # in a Ray actor: end when idle (a detached actor would outlive its application)
            threading.Thread(target=self._expire, args=(idle_s,), name="bca-metrics-hub-idle", daemon=True).start()
        self.texts: dict[str, tuple[bytes, float, bool]] = {}  # replica -> (text, monotonic time, final)
        self.retired: bytes | None = None  # the counters and histograms of the gone replicas folded together
        self.folded: dict[str, None] = {}  # the replicas folded into it, the latest _MAX_FOLDED (refused if back)

    def _expire(self, idle_s: float) -> None:
        import ray

        while True:
            time.sleep(min(idle_s, 30.0))
            if time.monotonic() - self._touched > idle_s:
                _log.info("metrics hub: nothing pushed or asked for %g s; ending", idle_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    def push(self, replica: str, text: bytes, final: bool = False) -> str | None:
        """Keep ``text`` as ``replica``'s latest (``final``: its last, it is shutting down); returns why it was
        refused (too large), else None."""
        self._touched = time.monotonic()
        if len(text) > self.max_bytes:
            return f"{len(text)} bytes of metrics, over the hub's {self.max_bytes}: the previous text is kept"
        if replica in self.folded:  # silent so long that it was counted as gone and folded: never counted twice
            return "this replica was counted as gone (silent too long) and its counts folded; later ones are not kept"
        self.texts[replica] = (bytes(text), time.monotonic(), final)
        self._fold()
        return None

    def _gone(self, when: float, final: bool, now: float) -> bool:
        return final or now - when > self.stale_s

    def _fold(self) -> None:
        """Fold the oldest gone replicas beyond :attr:`max_gone` into :attr:`retired` (their gauges dropped)."""
        now = time.monotonic()
        gone = sorted((when, name) for name, (_, when, final) in self.texts.items() if self._gone(when, final, now))
        for _, name in gone[:max(0, len(gone) - self.max_gone)]:
            text = self.texts.pop(name)[0]
            self.folded[name] = None
            while len(self.folded) > _MAX_FOLDED:
                del self.folded[next(iter(self.folded))]
            folded = merge_expositions((), [t for t in (self.retired, text) if t is not None])
            if len(folded) <= self.max_bytes:
                self.retired = folded
            else:  # the bound holds; that replica's contribution is lost (logged)
                _log.warning("metrics hub: the retired replicas' sum would exceed %d bytes; %s's metrics are "
                             "dropped from the deployment's totals", self.max_bytes, name)

    def snapshots(self) -> dict[str, Any]:
        """``{"live": [text...], "gone": [text...], "replicas": {"live": n, "gone": m}}``: the latest texts of the
        replicas reporting now and of those gone (the retired sum among them)."""
        self._touched = time.monotonic()
        self._fold()
        now = time.monotonic()
        live, gone = [], []
        for text, when, final in self.texts.values():
            (gone if self._gone(when, final, now) else live).append(text)
        counts = {"live": len(live), "gone": len(gone)}
        if self.retired is not None:
            gone.append(self.retired)
        return {"live": live, "gone": gone, "replicas": counts}


class _MetricsPusher:
    """A replica's thread pushing its metrics text to the hub every :data:`METRICS_PUSH_S` (a thread: neither the
    rendering nor a slow or missing hub ever holds the replica's event loop). A push that fails is given up; the
    hub is looked up by name again at the next one (the router may not have started it yet, or started a new one)."""

    def __init__(self, hub_name: str, replica_id: str, render: Callable[[], bytes],
                 interval: float = METRICS_PUSH_S) -> None:
        self.hub_name, self.replica_id, self.render, self.interval = hub_name, replica_id, render, interval
        self._hub = None
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="bca-metrics-push", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._push(final=False)
        while not self._stop.wait(self.interval):
            self._push(final=False)
        self._push(final=True)

    def _push(self, final: bool) -> None:
        import ray

        try:
            if self._hub is None:
                self._hub = ray.get_actor(self.hub_name, namespace=METRICS_HUB_NAMESPACE)
            refused = ray.get(self._hub.push.remote(self.replica_id, self.render(), final),
                              timeout=METRICS_HUB_TIMEOUT_S)
            if refused and not self._warned:
                self._warned = True
                _log.warning("metrics hub refused this replica's metrics: %s", refused)
        except Exception as exc:  # Ray's own types: no hub (yet), a hub that died, a timeout
            self._hub = None
            # ValueError: no hub of that name yet; a final push may find the router (and its hub) gone already
            if not self._warned and not final and not isinstance(exc, ValueError):
                self._warned = True
                _log.warning("could not push this replica's metrics to %s (%s: %s); retrying every %g s",
                             self.hub_name, type(exc).__name__, first_line(exc, 200), self.interval)

    def close(self, timeout: float = METRICS_HUB_TIMEOUT_S + 1) -> None:
        """Push the last text (``final``) and stop, waiting at most ``timeout`` seconds."""
        self._stop.set()
        self._thread.join(timeout)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Router:
    """The HTTP ingress: reads the request once, picks the adapter, forwards it multiplexed (see the module docstring)."""

    def __init__(self, replicas, export_dir: str, adapter_store: str | None, options: Mapping[str, Any]) -> None:
        from .http import configure_logging, served_model_name

        configure_logging()  # the access lines of the router's own answers (stderr: the router's log in Ray)
        self.replicas = replicas
        self.options = ServeOptions(**options)
        self.exported = sorted(bank_metadata(export_dir).bank.adapters)
        self.store_dir = adapter_store
        self.model_name = served_model_name(self.options.served_model_name, Path(export_dir), self.exported)
        self.created = int(time.time())  # the models' "created", as a single server gives it
        # the answers this router gives itself (never forwarded), in serve's families and labels; added to the
        # replicas' sum in GET /metrics
        self.metrics = ServerMetrics(lambda: (), lambda: 0, show_adapters=self.options.list_adapters)
        self._max_model_len: int | None = None  # a replica's, asked once (AdapterReplicas.max_model_len)
        context = _replica_context()
        self._hub_name = _hub_name(context.replica_id.deployment_id.app_name) if context is not None else None
        self._hub = None
        self._hub_problem = "no metrics hub"
        self._hub_retry_at = 0.0
        self._start_hub()

    def _start_hub(self) -> None:
        """Start (or join) this application's :class:`MetricsHub` (on Ray, with metrics on); never raises."""
        if self._hub_name is None or not self.options.metrics:
            return
        import ray

        try:
            # detached: a redeploy restarts this router, and the hub (with the gone replicas' counts) lives on
            self._hub = ray.remote(MetricsHub).options(
                name=self._hub_name, namespace=METRICS_HUB_NAMESPACE, get_if_exists=True, num_cpus=0,
                lifetime="detached").remote(idle_s=METRICS_HUB_IDLE_S)
        except Exception as exc:  # Ray's own types: GET /metrics falls back to one replica's, saying why
            self._hub = None
            self._hub_problem = f"the metrics hub could not start: {type(exc).__name__}: {first_line(exc, 200)}"

    async def _deployment_metrics(self) -> tuple[bytes | None, str]:
        """The deployment's metrics (every replica's summed, with the router's own answers), and the
        :data:`METRICS_HEADER` value; ``(None, why)`` when the hub cannot answer (the caller falls back)."""
        if self._hub is None:
            if self._hub_name is None:
                return None, "not on Ray"
            if time.monotonic() < self._hub_retry_at:
                return None, self._hub_problem
            self._hub_retry_at = time.monotonic() + METRICS_STALE_S
            self._start_hub()
            if self._hub is None:
                return None, self._hub_problem
        try:
            got = await asyncio.wait_for(self._hub.snapshots.remote(), METRICS_HUB_TIMEOUT_S)
        except Exception as exc:  # a hub that died (started again at a later scrape) or did not answer in time
            if not isinstance(exc, asyncio.TimeoutError):
                self._hub, self._hub_retry_at = None, time.monotonic() + METRICS_STALE_S
            self._hub_problem = (f"the metrics hub did not answer ({type(exc).__name__}: "
                                 f"{first_line(exc, 200) or f'{METRICS_HUB_TIMEOUT_S:g} s'})")
            return None, self._hub_problem
        counts = got["replicas"]
        if not counts["live"] and not counts["gone"]:
            return None, "no replica has reported its metrics yet"
        from prometheus_client.core import GaugeMetricFamily

        replicas = GaugeMetricFamily("bca_metrics_replicas", "Replicas whose metrics this answer sums: live ones "
                                     "(pushed within the staleness bound) and gone ones (their last counters kept).",
                                     labels=["state"])
        for state in ("live", "gone"):
            replicas.add_metric([state], counts[state])
        text = await run_in_threadpool(merge_expositions, [*got["live"], self.metrics.render()], got["gone"],
                                       [replicas])
        return text, f"deployment ({counts['live']} replicas reporting, {counts['gone']} gone)"

    async def __call__(self, request: Request):
        start = time.perf_counter()
        try:
            response = await self._own_answer(request)
        except BCAError as exc:  # refused here: counted and logged below, as serve's routes' refusals are
            status, kind = error_status(exc, is_openai_request(request.url.path, _json_or_none(request.state.body)))
            response = JSONResponse(error_body(status, kind, str(exc), getattr(exc, "param", None)),
                                    status_code=status)
            self._record(request, status, kind, start)
            return response
        if response is not None:
            self._record(request, response.status_code, None, start)
            return response
        # answered by a replica, which counts and logs it (bca-deploy serve's app)
        stream = self._forward(request, request.state.adapter, request.state.body)
        start_message = await stream.__anext__()
        # Ray's proxy sets x-request-id on every answer (the client's, or the one it generated and forwarded, which
        # the replica's log used): the replica's copy would make it twice
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start_message["headers"]
                   if k.lower() not in (b"content-length", b"transfer-encoding", b"x-request-id")}
        if request.method == "GET" and request.url.path == "/metrics" and self.options.metrics \
                and start_message["status"] == 200:
            # the replica's metrics, with the answers this router gave itself added (they never reach a replica)
            text = b"".join([chunk async for chunk in _rest(stream)])
            headers[METRICS_HEADER] = f"one replica ({getattr(request.state, 'metrics_scope', 'no metrics hub')})"
            return Response(with_requests_of(text, self.metrics), status_code=200, headers=headers)
        return _ForwardedAnswer(_rest(stream), status_code=start_message["status"], headers=headers)

    async def _own_answer(self, request: Request) -> Response | None:
        """The router's own answer to ``request`` (a refusal is raised), or None: a replica answers it (then
        ``request.state`` holds its ``body`` and ``adapter``)."""
        request.state.body = None  # (a body that does not arrive, or arrives too large, is refused before it is read)
        self._refuse_route(request)  # 403 (--no-manage-adapters) and the unload routes: from the target alone
        if request.method == "POST" and request.url.path in BODY_ROUTES:
            # a body its headers refuse (415) is refused before it is read, as serve's routes refuse it
            check_body_headers(request.headers)
        request.state.body = body = await self._body(request)
        if request.method in READ_METHODS and request.url.path == "/metrics" and self.options.metrics:
            text, scope = await self._deployment_metrics()
            if text is not None:
                return Response(text, media_type=CONTENT_TYPE, headers={METRICS_HEADER: scope})
            request.state.metrics_scope = scope  # forwarded to one replica below, saying why
        # the store's listing takes seconds for a large store: off the event loop, which every request shares
        if request.method in READ_METHODS and request.url.path == "/v1/models":
            await self._model_len()
            return JSONResponse(await run_in_threadpool(self._models))
        if request.method in READ_METHODS and request.url.path.startswith("/v1/models/"):
            # answered here from the listing: a replica knows only the adapters it holds now
            await self._model_len()
            return JSONResponse(await run_in_threadpool(self._model, request.url.path.removeprefix("/v1/models/")))
        request.state.adapter = await self._adapter(request, body)
        return None

    def _forward(self, request: Request, adapter: str, body: bytes):
        """The replica's answer to ``request`` (multiplexed on ``adapter``): its start, then its body chunks."""
        handle = self.replicas.options(multiplexed_model_id=adapter, stream=True)
        return handle.handle.remote(request.method, request.url.path, request.url.query.encode(),
                                    list(request.headers.raw), body)

    def _record(self, request: Request, status: int, error_type: str | None, start: float) -> None:
        """Count and log an answer the router gave itself, as serve's app records each of its answers (the same
        metric families and labels, the same access line; the request names no adapter by then: label "")."""
        from .http import record_request, request_id_of

        record_request(self.metrics, endpoint=_endpoint(request.method, request.url.path, request.headers,
                                                            self.options.max_body_bytes),
                       method=request.method, path=request.url.path, status=status, error_type=error_type,
                       adapter_label="", elapsed=time.perf_counter() - start,
                       request_id=request_id_of(request.headers.get("x-request-id")))

    async def startup_notes(self) -> list[str]:
        """One replica's start-up notes (:meth:`AdapterReplicas.startup_notes`), for the driver to print."""
        return await self.replicas.startup_notes.remote()

    async def _body(self, request: Request) -> bytes:
        """The whole body, within ``max_body_bytes`` and ``body_timeout_s`` (as a single server reads it)."""
        limit, seconds = self.options.max_body_bytes, self.options.body_timeout_s
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise body_too_large(limit, length)
        from ray.exceptions import TaskCancelledError
        from starlette.requests import ClientDisconnect

        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise body_too_slow(seconds) from None
            except (ClientDisconnect, TaskCancelledError):  # gone mid-body: 499 in the access log, as serve logs it
                # (Ray logged a "Request failed" traceback and a 500 for the client's own doing)
                raise ClientClosedRequestError(f"the client closed the connection after {size} bytes of its "
                                               "body") from None
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _refuse_route(self, request: Request) -> None:
        """Refuse what the router refuses by method and path: the load and unload routes with ``--no-manage-adapters``
        (403, as serve's routes answer before they read a body) and the unload routes (nothing to unload by hand)."""
        path = request.url.path
        unloading = ((request.method == "DELETE" and path.startswith("/v1/adapters/"))
                     or path == "/v1/unload_lora_adapter")
        if not self.options.manage_adapters and (unloading or (request.method == "POST" and path in _LOAD_ROUTES)):
            from .http import adapter_management_refused

            raise adapter_management_refused()  # before any replica loads what the body names
        if unloading:
            raise ServingError("on Ray Serve, adapters load on demand on the replicas that serve them and the least "
                               "recently used ones are unloaded; there is nothing to unload by hand")

    async def _adapter(self, request: Request, body: bytes) -> str:
        """The adapter a request names ("" for the base model or none): the multiplexed model id."""
        self._refuse_route(request)
        path = request.url.path
        name: Any = None
        if request.method == "POST" and path in BODY_ROUTES and body:
            # refused here when not sent as JSON, before any replica loads the adapter it names (a POST to another
            # path is the replica's 404 or 405, as serve answers it)
            data = await parse_body(body, self.options, request.headers)
            if isinstance(data, dict):
                field = _adapter_field(data)
                name = data[field] if field is not None else None
                lora_path = data.get("lora_path")
                if path == "/v1/load_lora_adapter" and lora_path is not None and lora_path != name:
                    raise InvalidRequestError("lora_path: on Ray Serve, adapters are served under their names in the "
                                              "store; send lora_name alone", param="lora_path")
        if not isinstance(name, str) or name in (BASE, self.model_name) or not ADAPTER_NAME_PATTERN.fullmatch(name):
            return ""  # the replica answers (base model, or the documented error for a bad name)
        return name

    async def _model_len(self) -> None:
        """Ask a replica for the model's ``max_model_len`` once (the cards carry it, as a single server's do). A
        replica that does not answer within :data:`MODEL_LEN_WAIT_S` (starting, or gone) never holds the listing up:
        the cards carry null until one does, and the next listing asks again."""
        if self._max_model_len is not None:
            return
        try:
            self._max_model_len = await asyncio.wait_for(self.replicas.max_model_len.remote(), MODEL_LEN_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the listing is answered without it
            _log.warning("no replica gave max_model_len for the model listing (%s: %s); listed as null",
                         type(exc).__name__, exc)

    def _card(self, name: str, parent: str | None) -> dict[str, Any]:
        return model_card(name, parent, self.created, self._max_model_len)

    def _servable(self) -> list[str]:
        """The adapters a request may name: the exported ones and the store's entries (each loads on demand)."""
        from .store import AdapterStore

        return sorted(set(self.exported) | set(AdapterStore(self.store_dir).listing() if self.store_dir else ()))

    def _models(self) -> dict[str, Any]:
        cards = [self._card(self.model_name, None)]
        if self.options.list_adapters:
            cards += [self._card(n, self.model_name) for n in self._servable()]
        return {"object": "list", "data": cards}

    def _model(self, name: str) -> dict[str, Any]:
        """``GET /v1/models/{name}``: the card of the base model or of an adapter a request may name, as listed."""
        if name in (self.model_name, BASE):
            return self._card(self.model_name, None)
        if name not in self._servable():
            raise not_loaded(name, param="model")
        return self._card(name, self.model_name)


class _ForwardedAnswer(ClosingStreamingResponse):
    """A replica's streamed answer, as the router passes it on.

    Ray's proxy cancels the router's call when the client hangs up mid-answer (or Serve shuts down), and Ray's
    ``receive`` then raises ``TaskCancelledError`` in Starlette's disconnect listener instead of answering
    ``http.disconnect``: it escaped as a "Future exception was never retrieved" traceback in Ray's log for clients
    that simply stopped reading (and for a probe still in flight at Ctrl-C). A cancelled call is a disconnect.
    """

    async def __call__(self, scope, receive, send) -> None:
        from ray.exceptions import TaskCancelledError

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await super().__call__(scope, receive_or_disconnect, send)


async def _rest(stream) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    finally:  # the client stopped reading or left: the replica's call is cancelled, so its rows are freed there too
        if not finished:
            stream.cancel()


def build_app(args: Mapping[str, Any]):
    """Ray Serve application builder (``serve run bca_deploy.serving.ray:build_app export_dir=... ...``).

    Args (strings from the command line, or values from Python):
        export_dir: the adapter-bank export (required). adapter_store: the store directory.
        replicas: number of replicas (default 2). max_adapters_per_replica: store adapters one replica
        holds at once (default 16). replica_cpus: CPUs Ray reserves per replica (default 1).
        replica_gpus: GPUs Ray reserves per replica (default 1 with ``provider=cuda``, else 0).
        Any :class:`ServeOptions` field (``served_model_name``, ``max_batch_rows``, limits...) but those of
        :data:`~bca_deploy.serving.options.NOT_ON_RAY`, which are refused.
    """
    args = dict(args)
    if not args.get("export_dir"):
        raise ServingError("export_dir: required (the adapter-bank export to serve)")
    export_dir = str(Path(args.pop("export_dir")).resolve())
    bank_metadata(export_dir)  # refused here, not in every replica Ray would start and restart
    store = args.pop("adapter_store", None)
    store = str(Path(store).resolve()) if store else None
    if store is not None and not Path(store).is_dir():
        raise ServingError(f"adapter_store: {store} is not a directory")
    replicas, per_replica, cpus, gpus = _app_numbers(args)
    fields = _ray_fields(_options_from(args))
    resources = {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}
    deployment = AdapterReplicas.options(num_replicas=replicas, ray_actor_options=resources)
    return Router.bind(deployment.bind(export_dir, store, fields, per_replica), export_dir, store, fields)


def _app_numbers(args: dict[str, Any]) -> tuple[int, int, float, float]:
    """``(replicas, max_adapters_per_replica, replica_cpus, replica_gpus)`` popped from builder ``args`` and
    checked; ``replica_gpus`` defaults to 1 when the replicas run on CUDA (``provider``), else 0."""
    cuda = args.get("provider", "cpu") == "cuda"
    return (_builder_number(args, "replicas", int, 2, 1), _builder_number(args, "max_adapters_per_replica", int, 16, 1),
            _builder_number(args, "replica_cpus", float, 1.0, 0),
            _builder_number(args, "replica_gpus", float, 1.0 if cuda else 0.0, 0))


def _builder_number(args: dict[str, Any], name: str, kind: type, default: float, least: float) -> Any:
    """``args.pop(name)`` as ``kind`` (a string from ``serve run`` or a number), at least ``least``."""
    raw = args.pop(name, None)
    raw = default if raw is None else raw
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = kind(raw)
        if not (value >= least and math.isfinite(value)) or (kind is int and isinstance(raw, float) and raw != value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ServingError(f"{name}: expected {'an integer' if kind is int else 'a number'} >= {least}, "
                           f"got {str(raw)[:40]!r}") from None
    return value


def _check_address(address: str) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) where nothing answers, within seconds: Ray itself
    retries an unreachable cluster for minutes. Other forms (``auto``, ``local``) are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except (OSError, ValueError, OverflowError) as exc:
        raise ServingError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                           "with `ray start --head`, or leave --address out to start a local instance") from None


def _check_local_resources(resources: Mapping[str, float], replicas: int, cpus: float, gpus: float) -> None:
    """Refuse replicas that a local Ray instance can never place (Ray would queue them forever); shuts Ray down."""
    import ray

    problems = [f"{replicas} replicas x {per:g} {kind} = {replicas * per:g} {kind}, but this machine's Ray "
                f"instance has {resources.get(key, 0):g}" for per, key, kind in ((cpus, "CPU", "CPUs"), (gpus, "GPU", "GPUs"))
                if per and replicas * per > resources.get(key, 0) + 1e-9]
    if problems:
        ray.shutdown()
        raise ServingError(format_problems(
            "the replicas do not fit this machine (lower --replicas, or --replica-cpus / --replica-gpus: 0 lets "
            "replicas share; or join a larger cluster with --address):", problems))


def _options_from(args: Mapping[str, Any]) -> ServeOptions:
    """``ServeOptions`` from builder arguments (strings from ``serve run`` are converted by the field's type)."""
    from .options import _kind

    unapplied = sorted(NOT_ON_RAY & set(args))
    if unapplied:
        raise ServingError(f"{', '.join(unapplied)}: not applied on Ray Serve (they set bca-deploy serve's own HTTP "
                           "protocol; Ray Serve's HTTP proxy has its own settings); leave them out")
    values = {}
    for f in ServeOptions.__dataclass_fields__.values():
        if f.name not in args:
            continue
        value, kind = args[f.name], _kind(f)
        if isinstance(value, str) and kind is not str:
            try:
                value = {"true": True, "false": False}.get(value.lower(), value) if kind is bool else kind(value)
            except ValueError:
                raise ServingError(f"{f.name}: expected {'an integer' if kind is int else 'a number'}, "
                                   f"got {value[:40]!r}") from None
        values[f.name] = value
    unknown = set(args) - set(ServeOptions.__dataclass_fields__)
    if unknown:
        raise ServingError(f"unknown serve-ray arguments: {', '.join(sorted(unknown))}")
    return ServeOptions(**values)


def _ray_fields(options: ServeOptions) -> dict[str, Any]:
    """The fields of ``options`` that Ray Serve applies; a changed :data:`NOT_ON_RAY` field is refused."""
    import dataclasses

    changed = sorted(f.name for f in dataclasses.fields(options)
                     if f.name in NOT_ON_RAY and getattr(options, f.name) != f.default)
    if changed:
        raise ServingError(f"{', '.join(changed)}: not applied on Ray Serve (they set bca-deploy serve's own HTTP "
                           "protocol; Ray Serve's HTTP proxy has its own settings); leave them at their defaults")
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in NOT_ON_RAY}


def run(export_dir: str | Path, *, adapter_store: str | Path | None = None, replicas: int = 2,
        max_adapters_per_replica: int = 16, replica_cpus: float = 1.0, replica_gpus: float | None = None,
        options: ServeOptions | None = None, address: str | None = None, blocking: bool = True,
        on_ready: Callable[[str], None] | None = None):
    """Start (or join, with ``address``) a Ray instance and serve the export on ``options.host:options.port``.

    Checked before Ray starts, so that a mistake fails at once with one message: the export, the options and
    numbers, the address (a ``host:port`` that does not answer), and on a local instance the port and the
    execution provider. A local instance without the CPUs or GPUs the replicas ask for is refused once it
    is up (Ray would wait for them forever). ``on_ready`` gets the URL line once the application is deployed.
    Returns the application's handle when ``blocking`` is False (tests); otherwise serves until interrupted,
    then shuts the application down.
    """
    import ray

    from ..exporters.validate import (
        ONNX_FILE,
        bank_graph_message,
        bank_graph_problems,
        check_graph_file,
        graph_interface,
        onnx_providers,
    )
    from .http import listening_socket

    options = options or ServeOptions()
    fields = _ray_fields(options)
    app_args = {"export_dir": export_dir, "adapter_store": adapter_store, "replicas": replicas,
                "max_adapters_per_replica": max_adapters_per_replica, "replica_cpus": replica_cpus,
                "replica_gpus": replica_gpus, **fields}
    replicas, _, cpus, gpus = _app_numbers(dict(app_args))
    metadata = bank_metadata(export_dir)
    bank = metadata.bank
    graph = check_graph_file(Path(export_dir) / ONNX_FILE)  # each replica would fail to load it, and Ray retry them
    problems = bank_graph_problems(metadata, *graph_interface(graph))  # the same for a graph changed since export
    if problems:
        raise ServingError(bank_graph_message(Path(export_dir) / ONNX_FILE, problems))
    for name in bank.adapters:  # the same for an adapter file this user may not read, or not the one exported
        bank.checked_adapter_file(export_dir, name, ServingError)
    local = address is None and not ray.is_initialized()
    if local:
        onnx_providers(options.provider)  # the replicas run here: this onnxruntime must have the provider
        listening_socket(options.host, options.port).close()  # Ray's proxy binds it; fail now if it cannot
    elif address is not None:
        _check_address(address)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    if local:
        _check_local_resources(ray.cluster_resources(), replicas, cpus, gpus)
    serve.start(http_options={"host": options.host, "port": options.port,
                              "keep_alive_timeout_s": max(1, int(options.keep_alive_s))})
    app = build_app(app_args)
    previous = _stop_on_signals() if blocking else {}  # from here on, a signal shuts Serve down
    try:
        try:
            handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except BCAError:
            raise
        except RuntimeError as exc:  # "Deploying application bca-deploy failed: ...": a replica could not start
            raise ServingError(f"Ray Serve could not start the replicas ({first_line(exc)}); each replica's error "
                               "is in Ray's log above") from None
        if on_ready is not None:
            on_ready("\n".join([f"serving {export_dir} on Ray Serve ({replicas} replicas) at "
                                f"http://{options.host}:{options.port} (Ctrl-C to stop)",
                                *(f"note: {line}" for line in _replica_notes(handle))]))
        if not blocking:
            return handle
        while True:
            time.sleep(3600)
    finally:
        if blocking:
            serve.shutdown()
            end_metrics_hub(APP_NAME)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _replica_notes(handle) -> list[str]:
    """The start-up notes of one replica (the same export on each), asked through the application's ``handle``.
    The replicas are up and serving by now: a note that cannot be fetched is said, never a reason to stop."""
    try:
        return list(handle.startup_notes.remote().result(timeout_s=_NOTES_TIMEOUT_S))
    except Exception as exc:  # Ray raises its own types (a timeout, an actor that died meanwhile)
        return [f"could not ask a replica for its start-up notes ({type(exc).__name__}: {first_line(exc, 200)})"]


def _stop_on_signals() -> dict[int, Any]:
    """SIGINT and SIGTERM both stop the application the graceful way (KeyboardInterrupt: ``serve.shutdown``, then
    Ray's own exit, which stops the local instance it started). Set once Ray is up: Ray's native handler
    dumps a stack trace on SIGTERM and dies without shutting Serve down (orphaning agents now and then), and a
    SIGINT a shell started us ignoring (``cmd &`` in a script) would do nothing. Returns the handlers replaced."""

    def stop(signum, frame) -> None:
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
