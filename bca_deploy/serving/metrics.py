"""Prometheus metrics of ``bca-deploy serve`` (``GET /metrics``, the ``prometheus-client`` library).

Every server owns its own :class:`~prometheus_client.CollectorRegistry` (several apps in one process,
as in tests, do not share counters). Label values are bounded: ``endpoint`` is a route template of
the app (``"unmatched"`` for any other path), ``status`` an HTTP status, ``type`` an error type of
:data:`bca_deploy.serving.wire.ERRORS`, and ``adapter`` the name of an adapter that was loaded when
the request named it, ``"__base__"`` for the base model, ``""`` for requests that name none, and
``"__unknown__"`` for every other name (so a client cannot grow the label set by inventing names). An
adapter's series go when it is unloaded (requests that end later count as ``"__unknown__"``), so loading
and unloading new names does not grow them either;
``method`` is one of :data:`bca_deploy.serving.http.HTTP_METHODS` or ``"other"``; ``reason`` (of
``bca_connection_refusals_total``) one of :data:`CONNECTION_REFUSAL_REASONS`.

A server that does not list its adapters (``--no-list-adapters``) does not show their names here
either: every loaded adapter's requests are labelled ``"__adapter__"`` (the label set, and so every
dashboard query, stays the same; only the adapter names are gone).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

__all__ = ["ServerMetrics", "with_requests_of", "merge_expositions", "REQUEST_FAMILIES", "CONTENT_TYPE", "UNKNOWN_ADAPTER",
           "BASE_ADAPTER", "HIDDEN_ADAPTER", "CONNECTION_REFUSAL_REASONS"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_ADAPTER = "__unknown__"
BASE_ADAPTER = "__base__"
#: The ``adapter`` label of every loaded adapter on a server that does not show adapter names.
HIDDEN_ADAPTER = "__adapter__"
#: Why a connection was refused or closed before any request of it reached the app: not HTTP/1.1 (400), a
#: request head over ``--max-header-bytes`` (400), no complete head within ``--header-timeout-s`` (closed), a
#: connection beyond ``--max-connections`` (503).
CONNECTION_REFUSAL_REASONS = ("invalid_http", "head_too_large", "head_timeout", "too_many_connections",
                              "body_after_answer")

#: The families that count answered requests (one sample per answer), the ones a Ray Serve router adds its own
#: answers to (:func:`with_requests_of`).
REQUEST_FAMILIES = ("bca_requests", "bca_request_errors", "bca_request_duration_seconds")

# ``adapter`` labels that name no adapter: never removed, never relabelled.
_RESERVED_LABELS = frozenset({"", BASE_ADAPTER, UNKNOWN_ADAPTER, HIDDEN_ADAPTER})

# Seconds: from sub-millisecond steps of tiny models to minutes-long generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The server's metrics, in one registry.

    Args:
        loaded_adapters: returns the names of the adapters loaded now (read when a label is made and
            when ``bca_adapters_loaded`` is scraped).
        queued_rows: returns the rows admitted and not yet done (scraped as ``bca_queued_rows``).
        show_adapters: label requests with their adapter's name; False: :data:`HIDDEN_ADAPTER` for all
            (``ServeOptions.list_adapters``).
    """

    def __init__(self, loaded_adapters: Callable[[], Collection[str]], queued_rows: Callable[[], int],
                 show_adapters: bool = True) -> None:
        self._loaded = loaded_adapters
        self.show_adapters = show_adapters
        self.registry = CollectorRegistry()
        r = self.registry
        request_labels = ("endpoint", "method", "status", "adapter")
        error_labels = ("endpoint", "status", "type", "adapter")
        self.requests = Counter("bca_requests", "HTTP requests answered, by endpoint, method, status and adapter.",
                                request_labels, registry=r)
        self.errors = Counter("bca_request_errors", "Requests answered with an error (status >= 400), by type.",
                              error_labels, registry=r)
        self.latency = Histogram("bca_request_duration_seconds", "Time from request start to the last byte sent.",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("bca_time_to_first_token_seconds", "Generation: a row's submission to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("bca_inter_token_latency_seconds", "Generation: time between consecutive tokens of a row.",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_rows = Histogram("bca_batch_rows", "Rows per batch run (embeddings/classification: one "
                                    "micro-batch; generation: one decoding step).", ["kind"],
                                    buckets=_ROW_BUCKETS, registry=r)
        self.queue_time = Histogram("bca_queue_time_seconds", "Time a request waited before its rows ran "
                                    "(generation: until its rows were admitted, before their prefill).",
                                    ["kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("bca_prefill_run_seconds", "Generation: one prefill run (newcomers' prompts, "
                                      "or a chunk of a long one: at most --max-prefill-tokens padded tokens).",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_tokens = Counter("bca_prefill_tokens", "Generation: padded prompt tokens run by prefill runs.",
                                      registry=r)
        self.generated_tokens = Counter("bca_generated_tokens", "Tokens generated, by adapter.", ["adapter"],
                                        registry=r)
        self.prompt_tokens = Counter("bca_prompt_tokens", "Input tokens of inference requests that ran (generation: "
                                     "rows that ended, cancelled ones included), by adapter.", ["adapter"], registry=r)
        self.preemptions = Counter("bca_preemptions", "Generation: rows pre-empted (their past dropped, recomputed when "
                                   "readmitted) so that a tenant below its fair share of the batch gets rows, by "
                                   "adapter.", ["adapter"], registry=r)
        self.recompute_tokens = Counter("bca_preemption_recompute_tokens", "Generation: prompt + generated tokens of "
                                        "pre-empted rows, prefilled again when they were readmitted.", registry=r)
        self.adapter_changes = Counter("bca_adapter_changes", "Adapter loads and unloads that succeeded.", ["action"],
                                       registry=r)
        self.connection_refusals = Counter(
            "bca_connection_refusals", "Connections the server refused or closed before a request reached it, by "
            "reason (see CONNECTION_REFUSAL_REASONS): malformed HTTP, a request head too large or not sent in "
            "time, the connection limit (these never reach bca_requests_total); and a body still arriving "
            "--keep-alive-s after its request was answered (counted there with its answer).", ["reason"], registry=r)
        for reason in CONNECTION_REFUSAL_REASONS:  # every series from the start: a rate over 0 reads as 0, not absent
            self.connection_refusals.labels(reason)
        # the metrics with an ``adapter`` label, and their label names in order (forget_adapter removes by them)
        self._by_adapter = [(self.requests, request_labels), (self.errors, error_labels),
                            (self.generated_tokens, ("adapter",)), (self.prompt_tokens, ("adapter",)),
                            (self.preemptions, ("adapter",))]
        loaded = Gauge("bca_adapters_loaded", "Adapters loaded now (the base model not counted).", registry=r)
        loaded.set_function(lambda: len(self._loaded()))
        queued = Gauge("bca_queued_rows", "Rows admitted and not yet done (a generated row: until its last token).",
                       registry=r)
        queued.set_function(queued_rows)

    def adapter_label(self, name: str | None, loaded: Collection[str] | None = None) -> str:
        """The ``adapter`` label of a request that named ``name`` (see the module docstring)."""
        if name is None:
            return ""
        if name == BASE_ADAPTER:
            return BASE_ADAPTER
        if name not in (self._loaded() if loaded is None else loaded):
            return UNKNOWN_ADAPTER
        return name if self.show_adapters else HIDDEN_ADAPTER

    def recorded_label(self, label: str) -> str:
        """The ``adapter`` label a request is counted under when it ends: the one it started with, unless that
        adapter has been unloaded meanwhile (its series are gone): then :data:`UNKNOWN_ADAPTER`."""
        if label in _RESERVED_LABELS or label in self._loaded():
            return label
        return UNKNOWN_ADAPTER

    def forget_adapter(self, name: str) -> None:
        """Drop every series labelled with adapter ``name`` (it was unloaded): the label set stays the loaded
        adapters', however many names come and go. A name loaded again starts from zero, which Prometheus
        reads as a counter reset."""
        if not self.show_adapters or name in _RESERVED_LABELS:
            return
        for metric, names in self._by_adapter:
            series = {tuple(sample.labels[n] for n in names) for family in metric.collect()
                      for sample in family.samples if sample.labels.get("adapter") == name}
            for values in series:
                metric.remove(*values)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


def with_requests_of(text: bytes, metrics: ServerMetrics) -> bytes:
    """A replica's ``/metrics`` ``text`` with the requests ``metrics`` counted added into its
    :data:`REQUEST_FAMILIES` (the same series summed), in the text exposition format:
    on Ray Serve, the router adds the answers it gave itself (never forwarded to a replica) to the replica's."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text.decode("utf-8"))}
    for family in metrics.registry.collect():
        if family.name not in REQUEST_FAMILIES:
            continue
        # the text's ``_created`` samples are families of their own (as parsed): the replica's stand, the
        # router's are left out (one family each, as Prometheus requires; they are optional)
        samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
        into = families.setdefault(family.name, family)
        if into is family:
            family.samples = samples
            continue
        index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(into.samples)}
        for sample in samples:
            i = index.get((sample.name, tuple(sorted(sample.labels.items()))))
            if i is None:
                into.samples.append(sample)
            else:
                into.samples[i] = into.samples[i]._replace(value=into.samples[i].value + sample.value)
    return _exposition(families.values())


#: Family types whose samples only grow while a process lives (a counter, a histogram's buckets, ``_count`` and
#: ``_sum``, a summary's): summed over every process that reported, its last report kept once it is gone.
_CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})
#: How :func:`merge_expositions` combines one series' values from two texts.
_COMBINE: dict[str, Callable[[float, float], float]] = {"sum": operator.add, "min": min, "max": max}


def merge_expositions(live: Iterable[bytes | str], gone: Iterable[bytes | str] = (),
                      extra: Iterable[Any] = ()) -> bytes:
    """One text exposition summing several processes' ``/metrics`` texts (Ray Serve: one per replica).

    - counters, histograms (every bucket, ``_count``, ``_sum``) and summaries: summed per series over ``live`` and
      ``gone`` texts, ``gone`` being the last report of a process that has stopped (so totals never go down when a
      replica dies or is scaled down);
    - a ``<family>_created`` gauge of such a family: the earliest (the sum has counted since the first of them);
    - gauges (and untyped samples): summed over ``live`` texts only, a stopped process's value being gone with it;
      other types (info, stateset): the largest value over ``live`` texts.

    Families keep their help and type (the first text's where they differ; a family that another text gives
    another type is skipped there), and the series of one family stay grouped (a histogram's buckets together, in
    their order). ``extra``: metric families (prometheus_client ``Metric``) added as they are. Returns valid
    text exposition (``generate_latest`` of the merged families).
    """
    from prometheus_client.parser import text_string_to_metric_families

    parsed = []
    for texts, is_live in ((live, True), (gone, False)):
        for text in texts:
            text = text.decode("utf-8") if isinstance(text, bytes) else text
            parsed.append((list(text_string_to_metric_families(text)), is_live))
    cumulative = {f.name for families, _ in parsed for f in families if f.type in _CUMULATIVE_TYPES}
    merged: dict[str, Any] = {}  # name -> (family, {series key: [sample name, labels, value]}) in first-seen order
    for families, is_live in parsed:
        for family in families:
            if family.type == "gauge" and family.name.endswith("_created") and \
                    family.name[:-len("_created")] in cumulative:
                how = "min"
            elif family.type in _CUMULATIVE_TYPES:
                how = "sum"
            elif not is_live:
                continue  # a stopped process's gauge: not a quantity of now
            else:
                how = "sum" if family.type in ("gauge", "unknown", "untyped") else "max"
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = (family, {})
            elif into[0].type != family.type:
                continue
            series, combine = into[1], _COMBINE[how]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = series.get(key)
                if old is None:
                    series[key] = sample
                    continue
                series[key] = old._replace(value=combine(old.value, sample.value))
    out = []
    for family, series in merged.values():
        # the series of one label set together (a histogram's buckets, then its _count and _sum), in first-seen order
        groups: dict[tuple, list] = {}
        for (_, labels), sample in series.items():
            groups.setdefault(tuple(kv for kv in labels if kv[0] not in ("le", "quantile")), []).append(sample)
        family = Metric(family.name, family.documentation, family.type, family.unit)
        family.samples = [sample for group in groups.values() for sample in group]
        out.append(family)
    out.extend(extra)
    return _exposition(out)


def _exposition(families: Iterable[Any]) -> bytes:
    """The text exposition of ``families`` (prometheus_client ``Metric`` objects, parsed or made), as
    ``generate_latest`` renders a registry's."""
    families = list(families)

    class _Families:
        def collect(self):
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)
