"""Hostile HTTP traffic mixed into normal traffic: every normal request still gets its correct answer.

Two servers on 127.0.0.1 (``ServerThread``): the tiny BERT bank (embeddings, native and OpenAI shapes)
and the tiny Llama bank (generation), with small limits so that refusals are cheap to provoke. While
normal clients send valid requests for random adapters in a loop (each answer compared with the
in-process :class:`~bca_deploy.serving.MultiAdapterSession`), the tests send bad parameters, oversized
and malformed bodies, unknown and path-like adapters, symbolic links out of the store, stalled and
half-sent connections, and property-based random JSON (``hypothesis``). Each hostile request must get
its documented 4xx JSON (or, for a stalled connection, be closed or answered 408 in time) and never a
5xx; at the end every normal request must have been answered correctly. Bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from adversarial_helpers import record  # noqa: E402
from http_helpers import assert_error, bank, call  # noqa: E402

from bca_deploy.serving import MultiAdapterSession

SECRET = "TOP-SECRET-7f3a"
LIMITS = {"max_request_rows": 8, "max_body_bytes": 16_384, "max_text_chars": 500, "max_new_tokens": 16,
          "max_queued_rows": 64, "max_json_depth": 8, "header_timeout_s": 1.0, "body_timeout_s": 2.0,
          "keep_alive_s": 2.0, "max_wait_ms": 5.0, "threads": 1}
TEXTS = ["the water is hot", "you can see the day", "zebra", "how many people know this word", "a b c"]
ADAPTERS = ["a0", "a1", "a2", None]
HOSTILE = Counter()  # kind -> requests sent (the README's "hostile/normal mix" figure)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    bert, llama = bank("bert", tmp_path_factory), bank("llama", tmp_path_factory)
    # store entries that reach outside the store: a config file and a weights file linked out, a folder linked out
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.json").write_text(json.dumps({"modules": SECRET, "block_size": SECRET}))
    for art in (bert, llama):
        store = art["store"]
        if not (store / "cfg-out").exists():
            (store / "cfg-out").mkdir()
            (store / "cfg-out" / "adapter_config.json").symlink_to(outside / "secret.json")
            good = next(p for p in store.iterdir() if p.name in ("bext", "extra"))
            (store / "cfg-out" / "adapter_model.safetensors").write_bytes(
                (good / "adapter_model.safetensors").read_bytes())
            (store / "weights-out").mkdir()
            (store / "weights-out" / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
            (outside / f"{art['name']}.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
            (store / "weights-out" / "adapter_model.safetensors").symlink_to(outside / f"{art['name']}.safetensors")
            (store / "dir-out").symlink_to(outside, target_is_directory=True)
    return {"bert": bert, "llama": llama}


@pytest.fixture(scope="module")
def servers(arts):
    from bca_deploy.serving.http import ServerThread, build

    apps = {name: build(art["onnx"], adapter_store=art["store"], **LIMITS) for name, art in arts.items()}
    with ServerThread(apps["bert"]) as bert, ServerThread(apps["llama"]) as llama:
        yield {"bert": bert.url, "llama": llama.url}


class NormalTraffic:
    """Clients sending valid requests in a loop until stopped; every answer checked against the session."""

    def __init__(self, arts, servers, clients_per_server: int = 2) -> None:
        self.sessions = {name: MultiAdapterSession(art["onnx"], intra_op_threads=1) for name, art in arts.items()}
        self.urls = servers
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[str, bool, str]] = []
        self.threads = [threading.Thread(target=self._loop, args=(name, seed), daemon=True)
                        for seed, name in enumerate(["bert", "llama"] * clients_per_server)]
        self._expected: dict = {}

    def expected(self, name: str, rows, adapter, openai: bool):
        key = (name, json.dumps(rows), adapter, openai)
        if key not in self._expected:
            session = self.sessions[name]
            with self.lock:
                if name == "bert":
                    self._expected[key] = session.embed(rows, [adapter] * len(rows), normalize=openai)
                else:
                    self._expected[key] = session.generate(rows, [adapter] * len(rows), max_new_tokens=4)
        return self._expected[key]

    def _loop(self, name: str, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            adapter = rng.choice(ADAPTERS)
            try:
                if name == "bert":
                    rows = rng.sample(TEXTS, rng.randint(1, 3))
                    openai = rng.random() < 0.5
                    body = ({"model": adapter or "__base__", "input": rows, "encoding_format": "float"} if openai
                            else {"input": rows, "adapter": adapter})
                    status, answer = call(self.urls[name] + "/v1/embeddings", "POST", body, timeout=60)
                    ok = status == 200 and np.allclose(
                        [d["embedding"] for d in answer["data"]], self.expected(name, rows, adapter, openai),
                        atol=1e-5, rtol=0)
                else:
                    rows = [[rng.randrange(3, 128) for _ in range(rng.randint(2, 6))] for _ in range(rng.randint(1, 2))]
                    status, answer = call(self.urls[name] + "/v1/generate", "POST",
                                          {"input": rows, "adapter": adapter, "max_new_tokens": 4}, timeout=60)
                    ok = status == 200 and [d["token_ids"] for d in answer["data"]] == \
                        self.expected(name, rows, adapter, False)
                detail = "" if ok else f"{status} {str(answer)[:300]}"
            except Exception as exc:  # noqa: BLE001 - a failed normal request is the test's finding
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.results.append((name, ok, detail))

    def __enter__(self) -> NormalTraffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


@pytest.fixture(scope="module")
def traffic(arts, servers):
    with NormalTraffic(arts, servers) as normal:
        yield normal
    failures = [r for r in normal.results if not r[1]]
    print(f"\nnormal requests: {len(normal.results)} ({len(failures)} wrong); hostile sent: {sum(HOSTILE.values())} "
          f"{dict(HOSTILE)}")
    record("hostile mix", {"normal": len(normal.results), "normal_wrong": len(failures), "hostile": dict(HOSTILE)})
    assert len(normal.results) >= 20, "too little normal traffic ran to show anything"
    assert not failures, failures[:5]


def hostile(url: str, method: str, path: str, body=None, raw: bytes | None = None, kind: str = "other"):
    HOSTILE[kind] += 1
    return call(url + path, method, body, raw=raw, timeout=60)


# ---- bad parameters, sizes and shapes ----------------------------------------------------------------------


GENERATE_REFUSALS = [
    ({"input": [[5, 6]], "seed": -1, "do_sample": True}, 422, "seed"),  # the probe's: used to fail 5-7 of 7 others
    ({"input": [[5, 6]], "seed": 2**70, "do_sample": True}, 422, "seed"),
    ({"input": [[5, 6]], "max_new_tokens": 10**9}, 422, "max_new_tokens"),
    ({"input": [[5, 6]], "max_new_tokens": 17}, 422, "max_new_tokens"),  # above the server's limit of 16
    ({"input": [[5, 6]], "top_p": 5}, 422, "top_p"),
    ({"input": [[5, 6]], "top_k": -2}, 422, "top_k"),
    ({"input": [[5, 6]], "temperature": 0, "do_sample": True}, 422, "temperature"),
    ({"input": [[5, 6]], "do_sample": "yes"}, 422, "do_sample"),
    ({"input": [[5, 6]], "max_new_tokens": "4"}, 422, "max_new_tokens"),
    ({"input": [[5, 6]], "temperature": True, "do_sample": True}, 422, "temperature"),  # lax float took it as 1.0
    ({"input": [[5, 6]], "temperature": "0.5", "do_sample": True}, 422, "temperature"),
    ({"input": [[5, 6]], "top_p": "0.5", "do_sample": True}, 422, "top_p"),
    ({"input": [[5, 6.5]]}, 422, "input"),
    ({"input": [[5, True]]}, 422, "input"),
    ({"input": {"a": 1}}, 422, "input"),
    ({"input": [[5, 1000]]}, 400, "token ids"),
    ({"input": [[5] * 120], "max_new_tokens": 16}, 400, "positions"),
    ({"input": [[5, 6]] * 9}, 413, "9 rows"),
    ({"input": [[5, 6]], "adapter": "../a0"}, 404, "../a0"),
    ({"input": [[5, 6]], "adapter": "ghost"}, 404, "ghost"),
    ({"input": "text", "adapter": ["a0"]}, 422, "adapter"),
]


@pytest.mark.parametrize(("body", "status", "word"), GENERATE_REFUSALS)
def test_bad_generate_parameters_fail_alone(traffic, servers, body, status, word):
    got, answer = hostile(servers["llama"], "POST", "/v1/generate", body, kind="bad parameter")
    assert_error(got, answer, status, words=[word])
    assert "a1" not in answer["error"]["message"]  # unknown adapters: other names are not shown


RAW_REFUSALS = [
    (b'{"input": ["\\ud800 broken"]}', 400, "invalid_json", "lone surrogate"),
    (b'{"input": ["\xff\xfe"]}', 400, "invalid_json", "UTF-8"),
    (b'{"input": ["ok"], "normalize": NaN}', 400, "invalid_json", "NaN"),
    (b'{"input": [' + b"1" * 5000 + b"]}", 400, "invalid_json", "too large"),
    (b"[" * 50 + b"]" * 50, 413, "request_too_large", "nested"),
    (b"[" * 5000 + b"]" * 5000, 413, "request_too_large", "nested"),
    (json.dumps({"input": ["x" * 501]}).encode(), 413, "request_too_large", "501 characters"),
    (json.dumps({"input": ["ok"] * 9}).encode(), 413, "request_too_large", "9 rows"),
    (json.dumps({"input": ["ok"] * 600}).encode(), 413, "request_too_large", "600 rows"),
    (json.dumps({"model": "a0", "input": ["ok"] * 9}).encode(), 413, "request_too_large", "9 rows"),
    (json.dumps({"input": ["ok"], "pooling": "max"}).encode(), 422, "invalid_request", "pooling"),
    # (an OpenAI request, with "model": OpenAI's 400 where the native request's status is 422)
    (json.dumps({"model": "a0", "input": "ok", "dimensions": 8}).encode(), 400, "invalid_request", "dimensions"),
    (json.dumps({"model": 3, "input": "ok"}).encode(), 400, "invalid_request", "model"),
    (json.dumps(["input"]).encode(), 422, "invalid_request", "JSON object"),
    (b'"just a string"', 422, "invalid_request", "JSON object"),
    (b"", 400, "invalid_json", "not valid JSON"),
    (b"{" + b" " * 20_000 + b"}", 413, "request_too_large", "16384"),
]


@pytest.mark.parametrize(("raw", "status", "kind", "word"), RAW_REFUSALS)
def test_malformed_bodies_get_documented_errors(traffic, servers, raw, status, kind, word):
    got, answer = hostile(servers["bert"], "POST", "/v1/embeddings", raw=raw, kind="malformed body")
    assert_error(got, answer, status, kind, [word])


def test_unknown_routes_and_methods_answer_json(traffic, servers):
    for method, path, status, kind in (("GET", "/nope", 404, "not_found"), ("GET", "/v1/embeddings", 405,
                                                                           "method_not_allowed"),
                                       ("POST", "/health", 405, "method_not_allowed"),
                                       ("DELETE", "/v1/adapters/..%2F..%2Fetc", 404, "not_found"),
                                       # a trailing slash was an empty 307 echoing the Host header in its location
                                       ("POST", "/v1/embeddings/", 404, "not_found"),
                                       ("GET", "/v1/models/", 404, "not_found")):
        got, answer = hostile(servers["bert"], method, path, kind="bad route")
        assert_error(got, answer, status, kind)
    data = _exchange(servers["bert"], b"POST /v1/embeddings/ HTTP/1.1\r\nHost: evil.example\r\n"
                                      b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    assert data.startswith(b"HTTP/1.1 404") and b"evil.example" not in data, data[:300]


# ---- the store: nothing reaches outside it -----------------------------------------------------------------


@pytest.mark.parametrize("server", ["bert", "llama"])
def test_store_entries_linking_out_are_refused_without_echo(traffic, servers, server):
    url = servers[server]
    for name in ("cfg-out", "weights-out", "dir-out"):
        for path, body in (("/v1/adapters", {"name": name}), ("/v1/load_lora_adapter", {"lora_name": name}),
                           ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": name})):
            got, answer = hostile(url, "POST", path, body, kind="store escape")
            status = 400 if path == "/v1/load_lora_adapter" else 422  # (vLLM's route: OpenAI's status)
            assert_error(got, answer, status, "invalid_adapter_name", ["outside the adapter store"])
            assert SECRET not in json.dumps(answer)
    got, answer = call(url + "/v1/adapters")
    assert got == 200 and "cfg-out" not in answer["available"] and SECRET not in json.dumps(answer)
    assert sorted(a["name"] for a in answer["adapters"]) == ["a0", "a1", "a2"]


# ---- stalled, slow and half-sent connections -------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    return sock


def _read_all(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``limit_s``), and when it closed."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, socket.timeout, ConnectionResetError):
        pass
    return data, time.monotonic() - start


def test_stalled_connections_are_closed_or_answered_in_time(traffic, servers):
    url = servers["bert"]
    HOSTILE["stalled connection"] += 4
    silent = _connect(url)  # sends nothing at all
    partial = _connect(url)  # half a request head, then nothing
    partial.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-")
    slow = _connect(url)  # a head byte by byte, slower than the head timeout allows
    body = _connect(url)  # a whole head, then a body that never completes
    body.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"input\": [")
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    start = time.monotonic()
    for byte in head[:8]:  # 8 bytes over 2.4 s: past the 1 s head timeout
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.3)
    results = {name: _read_all(sock, 10) for name, sock in
               (("silent", silent), ("partial", partial), ("slow", slow), ("body", body))}
    for sock in (silent, partial, slow, body):
        sock.close()
    for name in ("silent", "partial", "slow"):
        data, _ = results[name]
        assert data == b"", (name, data)  # closed without an answer
    assert time.monotonic() - start < 15
    data, _ = results["body"]
    assert data.startswith(b"HTTP/1.1 408"), data
    answer = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert answer["error"]["type"] == "request_timeout"
    got, health = call(url + "/health")
    assert got == 200 and health["status"] == "ok"


def test_oversized_chunked_body_and_client_that_leaves_midway(traffic, servers):
    url = servers["bert"]
    HOSTILE["oversized chunked body"] += 1
    sock = _connect(url)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"[" + b" " * 4000
    try:
        for _ in range(8):  # 32 KB without a Content-Length: refused once past 16 KB
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    except OSError:
        pass
    data, _ = _read_all(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    HOSTILE["client leaves midway"] += 1
    sock = _connect(url)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"input\": [\"the")
    sock.close()
    HOSTILE["malformed chunk"] += 1
    data = _exchange(url, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    # a body the client abandoned is the client's doing: counted as 499 (nginx's "client closed request"), never
    # as a server error (it was a 500 with a traceback in the log, so anyone could set off 5xx alerts)
    deadline = time.monotonic() + 20
    while (statuses := _statuses(url, "/v1/embeddings"))["499"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert statuses["499"] >= 2 and not any(code.startswith("5") for code in statuses), statuses
    HOSTILE["content-length lies"] += 1
    data = _exchange(url, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{}")
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert call(url + "/health")[0] == 200


def _exchange(url: str, raw: bytes) -> bytes:
    """Send ``raw`` on a new connection; what came back within 10 s."""
    sock = _connect(url)
    sock.sendall(raw)
    data, _ = _read_all(sock, 10)
    sock.close()
    return data


def _statuses(url: str, endpoint: str) -> Counter:
    """Requests to ``endpoint`` by status, from the server's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bca_requests_total" and sample.labels.get("endpoint") == endpoint:
                counts[sample.labels["status"]] += int(sample.value)
    return counts


# ---- property-based: random JSON on every POST route ----------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
_FIELDS = ["input", "adapter", "model", "prompt", "messages", "max_new_tokens", "max_tokens", "seed", "temperature",
           "top_p", "top_k", "do_sample", "pooling", "normalize", "stop", "stream", "n", "name", "replace",
           "lora_name", "lora_path", "encoding_format", "dimensions"]
_bodies = st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _json_values, max_size=6)
_ROUTES = [("bert", "/v1/embeddings"), ("bert", "/v1/adapters"), ("bert", "/v1/load_lora_adapter"),
           ("bert", "/v1/classify"), ("llama", "/v1/generate"), ("llama", "/v1/unload_lora_adapter")]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(route=st.sampled_from(_ROUTES), body=_bodies)
def test_random_json_never_breaks_the_server(traffic, servers, route, body):
    server, path = route
    if body.get("lora_name") in ("a0", "a1", "a2"):  # the normal traffic's adapters stay loaded
        body["lora_name"] = "not-" + body["lora_name"]
    if path in ("/v1/adapters", "/v1/load_lora_adapter") and isinstance(body.get("replace", body.get("name")), bool):
        body.pop("replace", None)  # no accidental reloads of the exported adapters under other traffic
    got, answer = hostile(servers[server], "POST", path, body, kind="random JSON")
    assert got < 500, (body, answer)
    if got >= 400:
        assert_error(got, answer, got)
    elif path in ("/v1/adapters", "/v1/load_lora_adapter"):  # loaded something by chance: unload it again
        name = body.get("name") or body.get("lora_name")
        call(servers[server] + f"/v1/adapters/{name}", "DELETE")


def test_malformed_http_and_oversized_heads_get_json_errors(traffic, servers):
    url = servers["bert"]
    for kind, raw in (("garbage request line", b"NOT HTTP AT ALL\r\n\r\n"),
                      ("oversized head", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"),
                      ("bad header line", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n")):
        HOSTILE[kind] += 1
        sock = _connect(url)
        try:
            sock.sendall(raw)
        except OSError:
            pass
        data, _ = _read_all(sock, 10)
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), (kind, data[:300])
        assert json.loads(body)["error"]["type"] == "invalid_http", (kind, body)
    assert call(url + "/health")[0] == 200


def test_malformed_http_is_answered_with_what_is_wrong_and_logged_as_json_only(arts, caplog):
    """A request h11 cannot parse was answered 'the request is not valid HTTP/1.1 (Invalid HTTP request received)',
    whatever was wrong, and uvicorn wrote 'WARNING:  Invalid HTTP request received.' (plain text) into the log of
    JSON lines beside the refusal's own line. The 400 names what h11 found wrong; the refusal's JSON line is the
    only line."""
    import logging

    from bca_deploy.serving.http import LOGGER_NAME, ServerThread, build

    uvicorn_lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            uvicorn_lines.append(record.getMessage())

    keep, uvicorn_logger = Keep(logging.WARNING), logging.getLogger("uvicorn.error")
    post = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = {  # raw request -> what the answer must name
        post + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}": "conflicting Content-Length headers",
        post + b"X-A: 1\x002\r\nContent-Length: 2\r\n\r\n{}": "illegal header line (header 'X-A'",
        # h11 quotes the whole line: a client's secret was echoed in the answer and written into the log
        post + b"Authorization : Bearer sk-secret\r\nContent-Length: 2\r\n\r\n{}": "header 'Authorization '",
        post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n": "illegal chunk header",
        b"GET /health HTTP/1.1\r\n\r\n": "Missing mandatory Host: header",
    }
    app = build(arts["bert"]["onnx"], **LIMITS)
    try:
        with caplog.at_level("INFO", logger=LOGGER_NAME), ServerThread(app) as server:
            uvicorn_logger.addHandler(keep)  # once uvicorn has configured its loggers (which drops their handlers)
            for raw, needle in cases.items():
                sock = _connect(server.url)
                sock.sendall(raw)
                data, took = _read_all(sock, 10)
                sock.close()
                head, _, body = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400") and took < 9, (raw, data[:300])
                error = json.loads(body)["error"]
                assert error["type"] == "invalid_http" and needle in error["message"], (raw, error)
            assert call(server.url + "/health")[0] == 200
    finally:
        uvicorn_logger.removeHandler(keep)
    refusals = [json.loads(r.getMessage()) for r in caplog.records
                if r.name == LOGGER_NAME and '"connection_refused"' in r.getMessage()]
    assert [(r["reason"], r["status"]) for r in refusals] == [("invalid_http", 400)] * len(cases), refusals
    assert all(needle in r["message"] for r, needle in zip(refusals, cases.values())), refusals
    assert uvicorn_lines == [], uvicorn_lines
    assert not any("sk-secret" in r.getMessage() for r in caplog.records)


def test_a_body_framed_both_ways_is_refused_and_its_connection_closed(traffic, servers):
    # Content-Length and Transfer-Encoding together: a proxy in front that frames by Content-Length would pass
    # the chunked remainder on as a request of its own (request smuggling). Refused, and the connection closed
    # (RFC 9112 section 6.1), so the request pipelined behind it is never read; it was answered 200 before.
    url = servers["bert"]
    HOSTILE["content-length and transfer-encoding"] += 1
    body = json.dumps({"input": ["the water is hot"]}).encode()
    smuggled = b"GET /v1/adapters HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = _connect(url)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" + smuggled)
    data, took = _read_all(sock, 10)
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data[:300]
    assert b"connection: close" in head.lower() and took < 9, (head, took)  # closed by the server, not timed out
    error = json.loads(rest[:int(re.search(rb"content-length: (\d+)", head.lower()).group(1))])["error"]
    assert error["type"] == "invalid_http" and "transfer-encoding" in error["message"], error
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", data)) == 1, data  # the pipelined request was not answered
    assert call(url + "/health")[0] == 200


def test_connections_beyond_the_limit_get_a_json_503(arts):
    from bca_deploy.serving.http import ServerThread, build

    app = build(arts["bert"]["onnx"], **{**LIMITS, "max_connections": 2, "header_timeout_s": 5.0})
    with ServerThread(app) as server:
        held = [_connect(server.url) for _ in range(2)]  # idle connections up to the limit
        time.sleep(0.2)
        extra = _connect(server.url)
        data, _ = _read_all(extra, 10)
        extra.close()
        for sock in held:
            sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), data[:300]
        assert b"\r\nretry-after: 1" in head.lower()  # the openai client and proxies back off by it
        assert json.loads(body)["error"]["type"] == "server_busy"
        time.sleep(0.2)
        assert call(server.url + "/health")[0] == 200  # the held ones are gone: served again


def test_connections_refused_before_the_app_are_counted_and_logged(arts, caplog):
    """Refusals the app never sees (the connection guard answers them) still reach /metrics and the JSON log."""
    from prometheus_client.parser import text_string_to_metric_families

    from bca_deploy.serving.http import LOGGER_NAME, ServerThread, build

    app = build(arts["bert"]["onnx"], **{**LIMITS, "max_connections": 2, "header_timeout_s": 0.5,
                                          "max_header_bytes": 4096})
    sent = {"invalid_http": 2, "head_too_large": 1, "head_timeout": 2, "too_many_connections": 1,
            "body_after_answer": 0}
    with caplog.at_level("INFO", logger=LOGGER_NAME), ServerThread(app) as server:
        for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8_000 + b"\r\n\r\n"):
            sock = _connect(server.url)
            with contextlib.suppress(OSError):
                sock.sendall(raw)
            assert _read_all(sock, 10)[0].startswith(b"HTTP/1.1 400")
            sock.close()
        silent, partial = _connect(server.url), _connect(server.url)  # the limit's two connections
        partial.sendall(b"GET /health HTTP/1.1\r\nHo")
        time.sleep(0.1)
        extra = _connect(server.url)
        assert _read_all(extra, 10)[0].startswith(b"HTTP/1.1 503")
        extra.close()
        assert _read_all(silent, 10)[0] == b"" and _read_all(partial, 10)[0] == b""  # closed by the head timeout
        silent.close()
        partial.close()
        time.sleep(0.1)
        with urllib.request.urlopen(server.url + "/metrics", timeout=15) as response:
            text = response.read().decode()
    counted = {s.labels["reason"]: s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "bca_connection_refusals_total"}
    assert counted == sent
    requests = sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == "bca_requests_total")
    assert requests == 0  # none of them was a request the app answered (this scrape is counted after it)
    logged = [json.loads(r.getMessage()) for r in caplog.records if '"connection_refused"' in r.getMessage()]
    assert Counter(entry["reason"] for entry in logged) == Counter(sent)
    assert all(entry["client"].startswith("127.0.0.1:") for entry in logged)
    by_reason = {entry["reason"]: entry for entry in logged}
    assert by_reason["too_many_connections"]["status"] == 503 and by_reason["head_timeout"]["status"] is None
    assert "4096 bytes" in by_reason["head_too_large"]["message"]


def test_a_body_still_sent_after_its_answer_is_cut_off(arts, caplog):
    """A client answered 413 mid-body that goes on sending: uvicorn read and dropped the rest, each byte re-arming
    its keep-alive timer, so the connection stayed open for as long as the client sent (48 MB over 45 s in a
    probe). It now closes --keep-alive-s after the answer, counted and logged; a body that ends within that time
    keeps its connection, and the server answers everyone else meanwhile."""
    from prometheus_client.parser import text_string_to_metric_families

    from bca_deploy.serving.http import LOGGER_NAME, ServerThread, build

    app = build(arts["bert"]["onnx"], **{**LIMITS, "keep_alive_s": 1.0, "body_timeout_s": 30.0})
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 4096 + b" " * 4096 + b"\r\n"
    with caplog.at_level("INFO", logger=LOGGER_NAME), ServerThread(app) as server:
        sock = _connect(server.url)
        sock.sendall(head)
        sock.settimeout(0.02)
        start, answer, closed_after = time.monotonic(), b"", None
        while time.monotonic() - start < 15:  # 4 KB every 20 ms, for as long as the server takes it
            try:
                sock.sendall(chunk)
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:  # reset: the server closed while bytes were still arriving
                closed_after = time.monotonic() - start
                break
            if not data:
                closed_after = time.monotonic() - start
                break
            answer += data
        sock.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert closed_after is not None and closed_after < 8, closed_after  # 413 at 16 KB, then 1 s of lingering
        assert call(server.url + "/health")[0] == 200
        # a body that ends within the time keeps its connection: the next request on it is answered
        sock = _connect(server.url)
        sock.sendall(head + chunk * 5)
        first = _read_until(sock, b"}}")
        sock.sendall(b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second = _read_until(sock, b"}", after=first)
        sock.close()
        assert first.startswith(b"HTTP/1.1 413") and b"HTTP/1.1 200" in second, (first[:100], second[-300:])
        with urllib.request.urlopen(server.url + "/metrics", timeout=15) as response:
            text = response.read().decode()
    counted = {s.labels["reason"]: s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "bca_connection_refusals_total"}
    assert counted["body_after_answer"] == 1
    logged = [json.loads(r.getMessage()) for r in caplog.records if '"body_after_answer"' in r.getMessage()]
    assert len(logged) == 1 and "1 s" in logged[0]["message"]


def _read_until(sock: socket.socket, marker: bytes, after: bytes = b"", limit_s: float = 10) -> bytes:
    """What ``sock`` sends until the bytes since ``after`` end with ``marker`` (or it closes, or ``limit_s``)."""
    data, deadline = after, time.monotonic() + limit_s
    sock.settimeout(limit_s)
    while not data[len(after):].rstrip().endswith(marker) and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
