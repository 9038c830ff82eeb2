"""serve-ray's refusals before Ray starts: a wrong export, builder arguments, a port in use.

Its own module: test_ray.py keeps a Ray instance up for the whole module, and these must see none.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "exporters"))
from exporters_helpers import GRAPH_DAMAGE, damage_graph
from http_helpers import bank


def test_a_wrong_export_options_or_port_fail_before_ray_starts(tmp_path_factory, tmp_path):
    """serve-ray checks the export, the builder's arguments and the port first: one "Error:" line and exit 2/1,
    with no Ray instance started (before, a non-bank export failed inside every replica Ray kept restarting, and
    the "serving ..." line was printed first)."""
    import socket

    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.errors import ServingError
    from bca_deploy.serving.ray import build_app

    art = bank("bert", tmp_path_factory)
    (tmp_path / "bca_export.json").write_text('{"task": "feature-extraction", "merged": true, "bank": null}')
    (tmp_path / "model.onnx").write_bytes(b"")
    assert not ray.is_initialized()
    result = CliRunner().invoke(main, ["serve-ray", str(tmp_path)])
    assert result.exit_code == 2 and "is not an adapter-bank graph (exported merged without --bank)" in result.output
    assert "serving" not in result.output and "Traceback" not in result.output, result.output
    (tmp_path / "bca_export.json").write_text('{"task": "feature-extraction", "bank": {"slots": 3}}')
    result = CliRunner().invoke(main, ["serve-ray", str(tmp_path)])
    assert result.exit_code == 2 and "bank.slots must be a list" in result.output, result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve-ray", str(art["onnx"]), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
    assert not ray.is_initialized()
    for args, needle in (({"export_dir": str(art["onnx"]), "replicas": "two"}, "replicas: expected an integer >= 1"),
                         ({"export_dir": str(art["onnx"]), "replicas": "0"}, "replicas: expected an integer >= 1"),
                         ({"export_dir": str(art["onnx"]), "replica_cpus": "nan"}, "replica_cpus: expected a number"),
                         ({"export_dir": str(art["onnx"]), "max_batch_rows": "many"}, "max_batch_rows: expected an integer"),
                         ({"export_dir": str(art["onnx"]), "adapter_store": str(tmp_path / "none")}, "adapter_store:"),
                         ({}, "export_dir: required")):
        with pytest.raises(ServingError, match=needle):
            build_app(args)


def test_a_graph_onnxruntime_refuses_fails_before_ray_starts_and_a_failed_deployment_is_named(
        tmp_path_factory, tmp_path, monkeypatch):
    """A damaged or tampered model.onnx made every replica fail (6 tracebacks, Ray retrying them) and then exit
    70 after about 25 s; it is now refused before Ray starts, and so is an adapter file this user may not read. A
    graph onnxruntime refuses for another reason (an operator it lacks) can only fail in the replicas: that
    deployment failure is one error, not a bug report."""
    import shutil

    from click.testing import CliRunner

    import bca_deploy.serving.ray as serve_ray
    from bca_deploy.cli import main
    from bca_deploy.errors import ServingError

    art = bank("bert", tmp_path_factory)
    for index, how in enumerate(GRAPH_DAMAGE):
        damaged = tmp_path / str(index) / "onnx"
        shutil.copytree(art["onnx"], damaged)
        damage_graph(damaged / "model.onnx", how)
        result = CliRunner().invoke(main, ["serve-ray", str(damaged)])
        assert result.exit_code == 2, (how, result.output)
        assert f"Error: {damaged / 'model.onnx'}: onnxruntime cannot load this graph (" in result.output, result.output
        assert "Traceback" not in result.output and not ray.is_initialized()

    # an adapter file this user may not read (emulated: the tests may run as root) failed in every replica too
    files = sorted((art["onnx"] / "adapters").iterdir())

    def deny(path):
        if Path(path) == files[0]:
            raise PermissionError(13, "Permission denied", str(path))

    import bca_deploy.exporters.bank as bank_module  # where serve-ray's adapter-file check reads the file

    with monkeypatch.context() as patch:
        patch.setattr(bank_module, "require_readable", deny)
        result = CliRunner().invoke(main, ["serve-ray", str(art["onnx"])])
    assert result.exit_code == 1 and f"Error: {files[0]}: Permission denied" in result.output, result.output
    assert not ray.is_initialized()

    def deployment_fails(*args, **kwargs):
        raise RuntimeError("Deploying application bca-deploy failed: Failed to update the deployments "
                           "['AdapterReplicas'].")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as on a running instance: nothing is started here
    monkeypatch.setattr(serve_ray.serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve_ray.serve, "run", deployment_fails)
    with pytest.raises(ServingError, match=r"^Ray Serve could not start the replicas \(Deploying application "
                                           r"bca-deploy failed: .+\); each replica's error is in Ray's log above$"):
        serve_ray.run(art["onnx"], blocking=False)


def test_numbers_provider_address_and_resources_are_refused_before_ray_waits(tmp_path_factory):
    """--replica-cpus nan, --provider cuda on an onnxruntime without CUDA, and an --address where nothing answers
    fail at once without starting Ray (before: Ray started first, replicas crashed with tracebacks and exit 70, or
    Ray retried the address for minutes); replicas that a local instance cannot place are refused (Ray queued them
    forever); with CUDA each replica asks Ray for a GPU."""
    import socket
    import time

    import onnxruntime
    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.errors import ServingError
    from bca_deploy.serving.ray import _app_numbers, _check_local_resources

    art = bank("bert", tmp_path_factory)
    runner = CliRunner()
    for option in ("--replica-cpus", "--replica-gpus"):
        result = runner.invoke(main, ["serve-ray", str(art["onnx"]), option, "nan"])
        assert result.exit_code == 2 and "'nan' is not a finite number" in result.output, result.output
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        result = runner.invoke(main, ["serve-ray", str(art["onnx"]), "--provider", "cuda"])
        assert result.exit_code == 2 and "has no CUDAExecutionProvider" in result.output, result.output
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "nosuchhost.invalid:6379"):
        start = time.monotonic()
        result = runner.invoke(main, ["serve-ray", str(art["onnx"]), "--address", address])
        assert result.exit_code == 2 and f"--address {address}: no Ray cluster answers there" in result.output, \
            result.output
        assert time.monotonic() - start < 30 and "Traceback" not in result.output
    assert not ray.is_initialized()

    with pytest.raises(ServingError) as info:
        _check_local_resources({"CPU": 2.0}, 3, 1.0, 1.0)
    assert "3 replicas x 1 CPUs = 3 CPUs, but this machine's Ray instance has 2" in str(info.value)
    assert "3 replicas x 1 GPUs = 3 GPUs, but this machine's Ray instance has 0" in str(info.value)
    _check_local_resources({"CPU": 2.0}, 2, 1.0, 0.0)  # the default on 2 CPUs fits
    _check_local_resources({"CPU": 2.0}, 8, 0.0, 0.0)  # 0: replicas share
    assert _app_numbers({"provider": "cuda"}) == (2, 16, 1.0, 1.0)
    assert _app_numbers({"provider": "cuda", "replica_gpus": "0.5"})[3] == 0.5
    assert _app_numbers({"provider": "cpu", "replicas": "3"}) == (3, 16, 1.0, 0.0)


def test_the_router_refuses_load_and_unload_routes_when_management_is_off(tmp_path_factory):
    # --no-manage-adapters on serve-ray: the router answers the load and unload routes 403 before any replica is
    # asked to load what the body names (on a single server the app's own routes do; see test_http.py)
    from starlette.requests import Request

    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.ray import Router, _ray_fields
    from bca_deploy.serving.wire import ForbiddenError

    art = bank("bert", tmp_path_factory)
    routers = {on: Router.func_or_class(None, str(art["onnx"]), str(art["store"]),
                                        _ray_fields(ServeOptions(manage_adapters=on))) for on in (True, False)}

    def request(method: str, path: str) -> Request:
        return Request({"type": "http", "method": method, "path": path, "query_string": b"", "headers": [
            (b"content-type", b"application/json")]})

    def adapter_of(router, request, body):  # the router's (async: a large body is parsed off the event loop)
        return asyncio.run(router._adapter(request, body))

    calls = [("POST", "/v1/adapters", b'{"name": "bext"}'), ("POST", "/v1/load_lora_adapter", b'{"lora_name": "bext"}'),
             ("DELETE", "/v1/adapters/a0", b""), ("POST", "/v1/unload_lora_adapter", b'{"lora_name": "a0"}')]
    for method, path, body in calls:
        with pytest.raises(ForbiddenError, match="--no-manage-adapters"):
            adapter_of(routers[False], request(method, path), body)
    assert adapter_of(routers[True], request("POST", "/v1/adapters"), b'{"name": "bext"}') == "bext"
    # serving requests are untouched: the adapter a request names is still routed
    for on in (True, False):
        assert adapter_of(routers[on], request("POST", "/v1/embeddings"), b'{"model": "a1", "input": ["x"]}') == "a1"


def test_the_router_refuses_a_body_by_its_headers_before_reading_it(tmp_path_factory):
    # the router read the whole body (up to --max-body-bytes, or --body-timeout-s for one that does not come) and
    # only then refused it for its content type; a single server's routes refuse it from the headers (415) first
    from starlette.requests import Request

    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.http import create_app
    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.ray import Router, _ray_fields
    from bca_deploy.serving.wire import BODY_ROUTES

    art = bank("bert", tmp_path_factory)
    fields = _ray_fields(ServeOptions(manage_adapters=False))
    router = Router.func_or_class(None, str(art["onnx"]), str(art["store"]), fields)
    # the routes the router reads a body for are the app's POST routes, every one of them
    app = create_app(MultiAdapterSession(art["onnx"], intra_op_threads=1))
    assert {r.path for r in app.routes if "POST" in getattr(r, "methods", ())} == BODY_ROUTES

    async def answer(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, int]:
        reads = 0

        async def receive():  # a body that never comes: only an answer from the headers is at once
            nonlocal reads
            reads += 1
            await asyncio.sleep(3600)

        request = Request({"type": "http", "method": "POST", "path": path, "query_string": b"",
                           "headers": [(b"content-length", b"100"), *headers]}, receive)
        response = await asyncio.wait_for(router(request), 30)
        return response.status_code, json.loads(response.body), reads

    for path in sorted(BODY_ROUTES - {"/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}):
        for headers, words in (([(b"content-type", b"text/plain")], "'text/plain'"),
                               ([(b"content-type", b"application/json"), (b"content-encoding", b"gzip")], "gzip")):
            status, body, reads = asyncio.run(answer(path, headers))
            assert (status, body["error"]["type"], reads) == (415, "unsupported_media_type", 0), (path, body)
            assert words in body["error"]["message"], body
    # with --no-manage-adapters the load routes are 403 first, as serve's routes answer them
    status, body, reads = asyncio.run(answer("/v1/adapters", [(b"content-type", b"text/plain")]))
    assert (status, body["error"]["type"], reads) == (403, "forbidden", 0), body


def test_the_routers_own_answers_are_counted_and_logged_as_serves_are(tmp_path_factory):
    # on Ray Serve the router's own answers (415, 403, ...) reached no replica, so no access line and no count in
    # GET /metrics; they are now counted in serve's families and labels and logged as serve's access lines, and
    # added to the replica's GET /metrics that the router passes on
    import logging

    from prometheus_client.parser import text_string_to_metric_families
    from starlette.requests import Request

    from bca_deploy.serving.http import LOGGER_NAME
    from bca_deploy.serving.metrics import ServerMetrics
    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.ray import Router, _ray_fields

    class Replicas:  # the one call the router makes of a replica itself: max_model_len, for its model cards
        class max_model_len:  # noqa: N801 - Ray's handle.method.remote()
            @staticmethod
            async def remote():
                return 512

    art = bank("bert", tmp_path_factory)
    router = Router.func_or_class(Replicas(), str(art["onnx"]), str(art["store"]),
                                  _ray_fields(ServeOptions(manage_adapters=False)))

    def call(method: str, path: str, headers: list[tuple[bytes, bytes]], request_id: bytes):
        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        request = Request({"type": "http", "method": method, "path": path, "query_string": b"",
                           "headers": [(b"x-request-id", request_id), *headers]}, receive)
        return asyncio.run(asyncio.wait_for(router(request), 30))

    logger, records = logging.getLogger(LOGGER_NAME), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)  # the router writes serve's access lines (its logger: no propagation to the root)
    try:
        assert call("POST", "/v1/embeddings", [(b"content-type", b"text/plain")], b"r-415").status_code == 415
        assert call("POST", "/v1/adapters", [(b"content-type", b"application/json")], b"r-403").status_code == 403
        assert call("POST", "/v1/adapters", [(b"content-type", b"application/json")], b"r-403b").status_code == 403
        assert call("DELETE", "/v1/adapters/a0", [], b"r-del").status_code == 403
        assert call("GET", "/v1/models", [], b"r-models").status_code == 200
    finally:
        logger.removeHandler(handler)
    lines = {entry["request_id"]: entry for entry in (json.loads(r.getMessage()) for r in records)}
    assert {k: (v["method"], v["path"], v["status"], v.get("error_type")) for k, v in lines.items()} == {
        "r-415": ("POST", "/v1/embeddings", 415, "unsupported_media_type"),
        "r-403": ("POST", "/v1/adapters", 403, "forbidden"), "r-403b": ("POST", "/v1/adapters", 403, "forbidden"),
        "r-del": ("DELETE", "/v1/adapters/a0", 403, "forbidden"), "r-models": ("GET", "/v1/models", 200, None)}
    assert all(v["latency_ms"] >= 0 for v in lines.values())

    expected_requests = {("/v1/embeddings", "POST", "415", ""): 1.0, ("/v1/adapters", "POST", "403", ""): 2.0,
                         ("/v1/adapters/{name}", "DELETE", "403", ""): 1.0, ("/v1/models", "GET", "200", ""): 1.0}
    expected_errors = {("/v1/embeddings", "415", "unsupported_media_type", ""): 1.0,
                       ("/v1/adapters", "403", "forbidden", ""): 2.0,
                       ("/v1/adapters/{name}", "403", "forbidden", ""): 1.0}

    def counts(text: bytes, sample: str, names: tuple[str, ...]) -> dict:
        return {tuple(s.labels[n] for n in names): s.value for f in text_string_to_metric_families(text.decode())
                for s in f.samples if s.name == sample}

    # GET /metrics: the replica's text (here: one that counted a request of its own), the router's answers added
    replica = ServerMetrics(lambda: (), lambda: 0)
    replica.requests.labels("/v1/embeddings", "POST", "415", "").inc(3)
    replica.requests.labels("/health", "GET", "200", "").inc()

    async def forwarded(*args):
        yield {"status": 200, "headers": [(b"content-type", b"text/plain; version=0.0.4")]}
        yield replica.render()

    router._forward = lambda request, adapter, body: forwarded()
    answer = call("GET", "/metrics", [], b"r-metrics")
    assert answer.status_code == 200
    requests = counts(answer.body, "bca_requests_total", ("endpoint", "method", "status", "adapter"))
    assert requests == {**expected_requests, ("/v1/embeddings", "POST", "415", ""): 4.0,
                        ("/health", "GET", "200", ""): 1.0}
    assert counts(answer.body, "bca_request_errors_total", ("endpoint", "status", "type", "adapter")) == expected_errors
    assert counts(answer.body, "bca_request_duration_seconds_count", ("endpoint",)) == {
        ("/v1/embeddings",): 1.0, ("/v1/adapters",): 2.0, ("/v1/adapters/{name}",): 1.0, ("/v1/models",): 1.0}
    # one family each, as Prometheus requires; the replica's other families come through as they were
    types = [line.split()[2] for line in answer.body.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)) == replica.render().decode().count("# TYPE ")
    assert counts(answer.body, "bca_adapters_loaded", ()) == {(): 0.0}

