"""The deployment's ``GET /metrics`` on Ray Serve: every replica's metrics summed (no Ray started here).

:func:`~bca_deploy.serving.metrics.merge_expositions` is checked against the values prometheus_client itself holds
in hand-built registries (counters, labelled counters, histograms, gauges), parsed back with the Prometheus text
parser; :class:`~bca_deploy.serving.ray.MetricsHub` keeps the totals of replicas that are gone; the router answers
from the hub, and falls back to one replica's text, saying so, when the hub cannot answer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bca_deploy.serving.metrics import merge_expositions

BUCKETS = (0.1, 1.0, 10.0)


def _replica(seed: int) -> tuple[CollectorRegistry, dict]:
    """A registry like a replica's (its own numbers from ``seed``) and its metric objects."""
    r = CollectorRegistry()
    m = {"plain": Counter("jobs", "Jobs done.", registry=r),
         "labelled": Counter("answers", "Answers.", ["endpoint", "status"], registry=r),
         "hist": Histogram("latency_seconds", "Latency.", ["endpoint"], buckets=BUCKETS, registry=r),
         "gauge": Gauge("queued_rows", "Rows queued now.", registry=r)}
    m["plain"].inc(seed)
    m["labelled"].labels("/a", "200").inc(2 * seed)
    m["labelled"].labels(f"/only{seed}", "500").inc(1)  # a series one replica alone has
    for value in (0.05 * seed, 0.5 * seed, 5.0 * seed):
        m["hist"].labels("/a").observe(value)
    m["gauge"].set(10 * seed)
    return r, m


def _samples(registry_or_text) -> dict:
    """``{(sample name, labels): value}`` of a registry (prometheus_client's own values) or of exposition text."""
    if isinstance(registry_or_text, CollectorRegistry):
        families = registry_or_text.collect()
    else:
        families = text_string_to_metric_families(registry_or_text.decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_merged_text_sums_counters_and_histograms_of_every_replica_and_gauges_of_live_ones():
    replicas = [_replica(seed) for seed in (1, 2, 3)]
    values = [_samples(r) for r, _ in replicas]
    live, gone = [generate_latest(r) for r, _ in replicas[:2]], [generate_latest(replicas[2][0])]
    merged = merge_expositions(live, gone)
    got = _samples(merged)

    expected: dict = {}
    for index, samples in enumerate(values):
        for key, value in samples.items():
            name = key[0]
            if name.endswith("_created"):
                expected[key] = min(expected.get(key, value), value)  # counting since the first replica's start
            elif name == "queued_rows":
                if index < 2:  # a gone replica's gauge is not a quantity of now
                    expected[key] = expected.get(key, 0.0) + value
            else:
                expected[key] = expected.get(key, 0.0) + value
    assert got == pytest.approx(expected)
    # spot checks by hand: 1+2+3 jobs, /a answers 2+4+6, buckets by bound, live gauges 10+20
    assert got[("jobs_total", ())] == 6
    assert got[("answers_total", (("endpoint", "/a"), ("status", "200")))] == 12
    assert got[("answers_total", (("endpoint", "/only3"), ("status", "500")))] == 1  # the gone replica's own series
    # observed: 0.05 / 0.5 / 5 times 1, 2, 3: 0.05 0.1 0.15 0.5 1.0 1.5 5 10 15
    assert got[("latency_seconds_bucket", (("endpoint", "/a"), ("le", "0.1")))] == 2
    assert got[("latency_seconds_bucket", (("endpoint", "/a"), ("le", "1.0")))] == 5
    assert got[("latency_seconds_bucket", (("endpoint", "/a"), ("le", "10.0")))] == 8
    assert got[("latency_seconds_count", (("endpoint", "/a"),))] == 9
    assert got[("latency_seconds_sum", (("endpoint", "/a"),))] == pytest.approx(5.55 * 6)
    assert got[("queued_rows", ())] == 30
    # valid exposition: one HELP/TYPE per family, a histogram's series together with its buckets in order
    text = merged.decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    buckets = [line for line in text.splitlines() if line.startswith("latency_seconds_bucket")]
    assert [b.split('le="')[1].split('"')[0] for b in buckets] == ["0.1", "1.0", "10.0", "+Inf"]


def test_a_replica_that_goes_keeps_its_counts_and_totals_never_go_down():
    replicas = [_replica(seed) for seed in (1, 2)]
    texts = [generate_latest(r) for r, _ in replicas]
    both = _samples(merge_expositions(texts))
    replicas[0][1]["plain"].inc(5)  # replica 0 counts more, then is gone (its last text kept)
    last = generate_latest(replicas[0][0])
    after = _samples(merge_expositions([texts[1]], [last]))
    assert after[("jobs_total", ())] == both[("jobs_total", ())] + 5
    assert all(after[k] >= v for k, v in both.items() if not k[0].endswith("_created") and k[0] != "queued_rows")
    assert after[("queued_rows", ())] == 20  # the live replica's alone


def test_the_hub_keeps_gone_replicas_and_folds_old_ones_without_changing_totals(monkeypatch):
    pytest.importorskip("ray")
    from bca_deploy.serving.ray import MetricsHub

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    hub = MetricsHub(max_bytes=10**6, max_gone=1, stale_s=5.0)
    replicas = {f"r{seed}": _replica(seed) for seed in (1, 2, 3, 4)}
    for name, (registry, _) in replicas.items():
        assert hub.push(name, generate_latest(registry)) is None
    got = hub.snapshots()
    assert got["replicas"] == {"live": 4, "gone": 0}
    total = _samples(merge_expositions(got["live"], got["gone"]))[("jobs_total", ())]
    assert total == 10
    hub.push("r1", generate_latest(replicas["r1"][0]), final=True)  # shut down: gone at once
    clock[0] += 6  # r2, r3, r4 silent past the staleness bound: gone too; r4 pushes again, live
    hub.push("r4", generate_latest(replicas["r4"][0]))
    got = hub.snapshots()
    assert got["replicas"] == {"live": 1, "gone": 1}  # two of the three gone folded into the retired sum
    assert len(hub.texts) == 2 and hub.retired is not None
    merged = _samples(merge_expositions(got["live"], got["gone"]))
    assert merged[("jobs_total", ())] == total
    assert merged[("answers_total", (("endpoint", "/a"), ("status", "200")))] == 20
    assert merged[("queued_rows", ())] == 40  # r4's gauge alone
    assert "over the hub's" in hub.push("r9", b"x" * (10**6 + 1))  # too large: refused, nothing kept
    assert "r9" not in hub.texts
    folded = next(name for name in ("r2", "r3") if name not in hub.texts)
    assert "folded" in hub.push(folded, generate_latest(replicas[folded][0]))  # back after folding: not counted twice
    assert folded not in hub.texts


def _router(tmp_path_factory):
    """A router outside Ray (as test_ray_refusals builds one), forwarding GET /metrics to a fake replica."""
    pytest.importorskip("ray.serve")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from http_helpers import bank

    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.ray import Router, _ray_fields

    art = bank("bert", tmp_path_factory)
    router = Router.func_or_class(None, str(art["onnx"]), None, _ray_fields(ServeOptions()))
    one, _ = _replica(1)

    async def forwarded(*args):
        yield {"status": 200, "headers": [(b"content-type", b"text/plain; version=0.0.4")]}
        yield generate_latest(one)

    router._forward = lambda request, adapter, body: forwarded()
    return router


def _scrape(router):
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    request = Request({"type": "http", "method": "GET", "path": "/metrics", "query_string": b"", "headers": []},
                      receive)
    return asyncio.run(asyncio.wait_for(router(request), 30))


def test_the_router_answers_the_deployments_sum_and_falls_back_to_one_replica_saying_why(tmp_path_factory):
    router = _router(tmp_path_factory)
    texts = [generate_latest(_replica(seed)[0]) for seed in (1, 2, 3)]

    class Hub:
        class snapshots:  # noqa: N801 - Ray's handle.method.remote()
            @staticmethod
            async def remote():
                return {"live": texts[:2], "gone": texts[2:], "replicas": {"live": 2, "gone": 1}}

    router._hub_name, router._hub = "hub", Hub()
    answer = _scrape(router)
    assert answer.status_code == 200
    assert answer.headers["x-bca-metrics"] == "deployment (2 replicas reporting, 1 gone)"
    got = _samples(answer.body)
    assert got[("jobs_total", ())] == 6 and got[("queued_rows", ())] == 30
    assert got[("bca_metrics_replicas", (("state", "gone"),))] == 1
    # the router's own answers are in it (its earlier scrape, counted as serve counts GET /metrics)
    answer = _scrape(router)
    assert _samples(answer.body)[("bca_requests_total", (("adapter", ""), ("endpoint", "/metrics"),
                                                          ("method", "GET"), ("status", "200")))] == 1

    class DeadHub:
        class snapshots:  # noqa: N801
            @staticmethod
            async def remote():
                raise RuntimeError("the actor died")

    router._hub = DeadHub()
    answer = _scrape(router)  # one replica's text, never a failed scrape; the header says why
    assert answer.status_code == 200
    assert answer.headers["x-bca-metrics"] == "one replica (the metrics hub did not answer (RuntimeError: the actor died))"
    assert _samples(answer.body)[("jobs_total", ())] == 1

    class SlowHub:
        class snapshots:  # noqa: N801
            @staticmethod
            async def remote():
                await asyncio.sleep(3600)

    router._hub = SlowHub()
    start = time.monotonic()
    answer = _scrape(router)
    assert answer.status_code == 200 and answer.headers["x-bca-metrics"].startswith("one replica (the metrics hub did")
    assert time.monotonic() - start < 20  # the hub's timeout, not the hub's hour


def test_a_replica_pushes_every_interval_and_a_final_text_when_it_shuts_down(monkeypatch):
    # the replica's side: its thread pushes its text to the hub found by name, keeps pushing when the hub is not
    # there yet (no error reaches serving), and pushes once more, marked final, when Ray shuts the replica down
    ray = pytest.importorskip("ray")
    from bca_deploy.serving.ray import METRICS_HUB_NAMESPACE, MetricsHub, _MetricsPusher

    hub, lookups = MetricsHub(), []

    class Handle:
        class push:  # noqa: N801 - Ray's handle.method.remote()
            @staticmethod
            def remote(*args):
                return hub.push(*args)

    def get_actor(name, namespace=None):
        assert namespace == METRICS_HUB_NAMESPACE  # the fixed one the router starts it in (and serve-ray ends it in)
        lookups.append(name)
        if len(lookups) < 3:
            raise ValueError(f"Failed to look up actor with name '{name}'")  # the router has not started it yet
        return Handle()

    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    registry, metrics = _replica(1)
    pusher = _MetricsPusher("hub:app", "r1", lambda: generate_latest(registry), interval=0.05)
    deadline = time.monotonic() + 20
    while "r1" not in hub.texts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(lookups) == {"hub:app"} and len(lookups) >= 3 and not hub.texts["r1"][2]
    metrics["plain"].inc(4)  # counted since: in the final text
    pusher.close()
    assert not pusher._thread.is_alive()
    text, _, final = hub.texts["r1"]
    assert final and _samples(text)[("jobs_total", ())] == 5
    got = hub.snapshots()
    assert got["replicas"] == {"live": 0, "gone": 1}  # gone at once: its gauges out, its counters kept
    assert _samples(merge_expositions(got["live"], got["gone"]))[("jobs_total", ())] == 5


def test_an_idle_hub_ends_itself_and_a_used_one_does_not(monkeypatch):
    # the hub is detached (a redeploy's new router joins it); with no push and no scrape for idle_s (the
    # application deleted, Serve shut down) it ends itself rather than outlive its application
    ray = pytest.importorskip("ray")
    from bca_deploy.serving.ray import MetricsHub

    killed = []

    class Context:
        current_actor = "this hub"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=False: killed.append((actor, no_restart)))
    hub = MetricsHub(idle_s=1.0)
    text = generate_latest(_replica(1)[0])
    for step in range(20):  # used: a push or a scrape every 0.1 s, 2 s in all
        if step % 2:
            hub.snapshots()
        else:
            hub.push("r1", text)
        time.sleep(0.1)
    assert killed == []
    deadline = time.monotonic() + 20
    while not killed and time.monotonic() < deadline:
        time.sleep(0.1)
    assert killed == [("this hub", True)]
