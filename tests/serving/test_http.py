"""``bca-deploy serve``: the HTTP server on a real socket, checked against PyTorch.

Two tiny adapter-bank exports are served with :class:`~bca_deploy.serving.http.ServerThread` on
127.0.0.1 and called with ``urllib``: a Llama decoder (``/v1/generate``) and a BERT encoder
(``/v1/embeddings``), each exported with three adapters of different targets and block sizes, plus an
adapter store holding adapters that fit the bank, ones that do not, a PEFT-format one and a symbolic
link out of the store. Every answer is compared with an independent PyTorch reference:
``model.generate(do_sample=False)`` / mean-pooled ``last_hidden_state`` of the model with all adapters
loaded, one row at a time under :func:`bca_deploy.inject.mixed_adapters`.

Builds, exports and servers are made once per module (module-level cache + module-scoped fixtures).
No ``conftest.py`` here: ``tests/conftest.py`` is imported elsewhere as ``conftest``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
from exporters_helpers import GRAPH_DAMAGE, build_model, damage_graph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import WORDS, free_port, write_wordpiece_tokenizer

from bca_deploy import inject, load_adapter, save_adapter
from bca_deploy.inject import mixed_adapters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIMEOUT = 60.0  # seconds, every network wait
VOCAB = 128  # build_model's vocabulary
MAX_POSITIONS = 64

# name -> (targets, block size, seed); all exported together into one bank graph.
LLAMA_EXPORTED = {
    "a0": (["q_proj", "v_proj"], 8, 0),
    "a1": (["q_proj", "v_proj", "gate_proj"], 8, 1),
    "a2": (["q_proj", "v_proj", "down_proj"], 16, 2),
}
BERT_EXPORTED = {
    "a0": (["query", "value"], 8, 0),
    "a1": (["query", "intermediate.dense"], 8, 1),
    "a2": (["query", "value"], 16, 2),
}
# Store adapters (not exported): name -> (targets, block size, seed, format).
LLAMA_STORE = {
    "extra": (["q_proj", "gate_proj"], 8, 10, "bca"),  # fits: q_proj p8 (a0/a1), gate_proj p8 (a1)
    "peftish": (["v_proj"], 8, 11, "peft"),  # PEFT C3A format, fits
    "misfit-module": (["k_proj"], 8, 12, "bca"),  # the bank holds no k_proj kernels
    "misfit-block": (["q_proj"], 4, 13, "bca"),  # the bank holds q_proj at p=8 and p=16, not 4
}
BERT_STORE = {"bext": (["value", "intermediate.dense"], 8, 20, "bca")}  # value p8 (a0), intermediate.dense p8 (a1)
OUTSIDE = "escape"  # a symbolic link in the llama store to a (fitting) adapter outside the store

CHOICES = ["a0", "a1", "a2", None]


# ---- artefacts -----------------------------------------------------------------------------------------


def _save_adapter(name: str, directory: Path, targets, block_size: int, seed: int, fmt: str = "bca") -> Path:
    model = build_model(name)
    inject(model, targets, block_size=block_size, init="normal", init_std=0.05, seed=seed)
    save_adapter(model, directory, format=fmt)
    return directory


def _make(name: str, task: str, exported: dict, store: dict, root: Path) -> dict:
    from bca_deploy.exporters import export

    model_dir = root / "model"
    build_model(name).save_pretrained(model_dir)
    if name == "bert":  # the llama export stays without a tokenizer (texts must be refused there)
        write_wordpiece_tokenizer(model_dir)
    adapter_dirs = [_save_adapter(name, root / "adapters" / n, t, p, s) for n, (t, p, s) in exported.items()]
    store_dir = root / "store"
    store_dir.mkdir()
    for n, (t, p, s, fmt) in store.items():
        _save_adapter(name, store_dir / n, t, p, s, fmt)
    out = export(model_dir, root / "onnx", adapter_dirs, merge=False, bank=True, task=task, verbose=False)
    return {"model": model_dir, "adapters": adapter_dirs, "store": store_dir, "onnx": out, "root": root}


_ARTEFACTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    if not _ARTEFACTS:
        llama = _make("llama", "text-generation-with-past", LLAMA_EXPORTED, LLAMA_STORE,
                      tmp_path_factory.mktemp("http-llama"))
        outside = _save_adapter("llama", llama["root"] / "outside" / "extra-copy", ["q_proj", "gate_proj"], 8, 30)
        (llama["store"] / OUTSIDE).symlink_to(outside, target_is_directory=True)
        (llama["store"] / "alias").symlink_to(llama["store"] / "extra", target_is_directory=True)  # stays inside
        llama["outside"] = outside
        _ARTEFACTS["llama"] = llama
        _ARTEFACTS["bert"] = _make("bert", "feature-extraction", BERT_EXPORTED, BERT_STORE,
                                   tmp_path_factory.mktemp("http-bert"))
    return _ARTEFACTS


# ---- PyTorch references --------------------------------------------------------------------------------


@functools.cache
def _torch_model(name: str):
    """The base model with every exported and fitting store adapter loaded (unmerged), in PyTorch."""
    from bca_deploy.exporters.loading import load_model

    art = _ARTEFACTS[name]
    task = "text-generation" if name == "llama" else "feature-extraction"
    model = load_model(art["model"], task, art["adapters"])
    store = LLAMA_STORE if name == "llama" else BERT_STORE
    for n in store:
        if not n.startswith("misfit"):
            load_adapter(model, art["store"] / n, adapter_name=n)
    return model.eval()


@contextlib.contextmanager
def _one_torch_thread():
    # tiny models: one thread is fastest and leaves the other core to the server
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def ref_generate(prompt: tuple[int, ...], adapter: str | None, max_new_tokens: int) -> list[int]:
    """Greedy new tokens of ``prompt`` alone (no padding) through ``adapter`` in PyTorch."""
    model = _torch_model("llama")
    ids = torch.tensor([list(prompt)])
    with _one_torch_thread(), mixed_adapters(model, [adapter]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    return [int(t) for t in out[0, len(prompt):]]


@functools.cache
def ref_hidden(ids: tuple[int, ...], adapter: str | None) -> np.ndarray:
    """last_hidden_state (T, H) of ``ids`` alone (no padding) through ``adapter`` in PyTorch."""
    model = _torch_model("bert")
    x = torch.tensor([list(ids)])
    with _one_torch_thread(), mixed_adapters(model, [adapter]):
        hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
    return hidden[0].numpy()


def ref_embed(ids, adapter: str | None, pooling: str = "mean", normalize: bool = False) -> np.ndarray:
    hidden = ref_hidden(tuple(ids), adapter)
    vector = {"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling]
    return vector / np.linalg.norm(vector) if normalize else vector


def prompts(n: int, seed: int, low: int = 2, high: int = 9) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(low, high)))] for _ in range(n)]


# ---- HTTP ------------------------------------------------------------------------------------------


def call(url: str, method: str = "GET", body=None, request_id: str | None = None, raw: bytes | None = None):
    """(status, JSON body) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"content-type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
            status, body = response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            status, body = exc.code, _json(exc.read())
    if status >= 500:
        # uvicorn prints the traceback of a 500 in the server thread after answering; let it finish before
        # pytest formats the failure (CPython 3.11's traceback carets and pytest both use ast.parse, whose
        # recursion-depth state is shared between threads: racing them raises SystemError in pytest).
        time.sleep(1.0)
    return status, body


def _json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:  # e.g. a plain-text 500: keep it for the assertion message
        return {"not_json": data.decode("utf-8", "replace")}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.entries: list[dict] = []
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        entry = json.loads(record.getMessage())
        with self._lock_:
            self.entries.append(entry)

    def by_id(self, request_ids, timeout: float = 10.0) -> dict[str, dict]:
        wanted = set(request_ids)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock_:
                found = {e["request_id"]: e for e in self.entries if e.get("request_id") in wanted}
            if len(found) == len(wanted) or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@pytest.fixture(scope="module")
def log_capture():
    from bca_deploy.serving.http import LOGGER_NAME

    logger = logging.getLogger(LOGGER_NAME)
    handler, level = _Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def llama_server(artefacts, log_capture):
    from bca_deploy.serving.http import ServerThread, build

    art = artefacts["llama"]
    app = build(art["onnx"], adapter_store=art["store"], max_wait_ms=25, threads=1)
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        yield server, app


@pytest.fixture(scope="module")
def llama_url(llama_server):
    return llama_server[0].url


@pytest.fixture(scope="module")
def bert_url(artefacts, log_capture):
    from bca_deploy.serving.http import ServerThread, build

    art = artefacts["bert"]
    app = build(art["onnx"], adapter_store=art["store"], max_wait_ms=25, threads=1)
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        yield server.url


def generate(url: str, inputs, adapter, max_new_tokens: int = 6, request_id: str | None = None, **extra):
    return call(url + "/v1/generate", "POST", {"input": inputs, "adapter": adapter, "max_new_tokens": max_new_tokens,
                                               **extra}, request_id=request_id)


def token_ids(body: dict) -> list[list[int]]:
    return [item["token_ids"] for item in sorted(body["data"], key=lambda d: d["index"])]


def loaded(url: str) -> list[str]:
    status, body = call(url + "/v1/adapters")
    assert status == 200, body
    return [a["name"] for a in body["adapters"]]


def unload_quietly(url: str, name: str) -> None:
    status, body = call(f"{url}/v1/adapters/{name}", "DELETE")
    assert status in (200, 404), body


def _burst(fn, jobs, workers: int = 8):
    """``fn(*job)`` for every job from ``workers`` threads at once; the results in job order."""
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result(timeout=2 * TIMEOUT) for f in futures]


def assert_error(status: int, body: dict, expected_status: int, kind: str | None = None, words=()) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert body["error"]["code"] == expected_status, body
    assert "/tmp" not in body["error"]["message"] and "pytest" not in body["error"]["message"], body  # no paths
    if kind is not None:
        assert body["error"]["type"] == kind, body
    for word in words:
        assert word in body["error"]["message"], body


# ---- health and the adapter list ------------------------------------------------------------------------


def test_health(llama_url, bert_url):
    status, body = call(llama_url + "/health")
    assert status == 200
    assert body["status"] == "ok" and body["task"] == "text-generation-with-past" and body["model_type"] == "llama"
    assert body["adapters"] == 3
    status, body = call(bert_url + "/health")
    assert status == 200
    assert body["task"] == "feature-extraction" and body["model_type"] == "bert" and body["adapters"] == 3
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(bert_url + "/health", method="HEAD"), timeout=30) as response:
        assert response.status == 200 and response.read() == b""  # load balancers probe with HEAD


def test_every_read_route_answers_head_as_its_get_without_the_body(llama_url):
    """HEAD is GET without the body (RFC 9110): same status and content type, no bytes; an unknown model is the
    same 404 either way."""
    import urllib.request

    for path in ("/health", "/v1/adapters", "/metrics", "/v1/models", "/v1/models/a0", "/v1/models/nope"):
        answers = {}
        for method in ("GET", "HEAD"):
            try:
                with urllib.request.urlopen(urllib.request.Request(llama_url + path, method=method),
                                            timeout=TIMEOUT) as response:
                    answers[method] = (response.status, response.headers["content-type"], response.read())
            except urllib.error.HTTPError as refused:
                with refused:
                    answers[method] = (refused.code, refused.headers["content-type"], refused.read())
        (get_status, get_type, get_body), (head_status, head_type, head_body) = answers["GET"], answers["HEAD"]
        assert (head_status, head_type) == (get_status, get_type), (path, answers)
        assert get_body and head_body == b"", (path, answers)
        assert get_status == (404 if path.endswith("nope") else 200), (path, answers)


def test_list_adapters_shows_exported_and_store(llama_url, bert_url):
    status, body = call(llama_url + "/v1/adapters")
    assert status == 200
    infos = {a["name"]: a for a in body["adapters"]}
    assert sorted(infos) == ["a0", "a1", "a2"]
    assert infos["a0"]["block_sizes"] == [8] and infos["a2"]["block_sizes"] == [16]
    assert [infos[n]["modules"] for n in ("a0", "a1", "a2")] == [4, 6, 6]  # 2 layers x targets
    # a0: q_proj 32x32 and v_proj 32x16 at p=8, in 2 layers: (32*32 + 32*16) / 8 * 2
    assert infos["a0"]["num_parameters"] == (32 * 32 + 32 * 16) // 8 * 2
    # the store's loadable directories: not the exported adapters, not the symbolic link out of the store
    assert body["available"] == sorted(["alias", "extra", "misfit-block", "misfit-module", "peftish"])
    status, body = call(bert_url + "/v1/adapters")
    assert status == 200
    assert sorted(a["name"] for a in body["adapters"]) == ["a0", "a1", "a2"] and body["available"] == ["bext"]


# ---- loading and unloading ------------------------------------------------------------------------------


def test_load_replace_unload_lifecycle(llama_url):
    unload_quietly(llama_url, "extra")
    before = call(llama_url + "/health")[1]["bank_version"]
    status, body = call(llama_url + "/v1/adapters", "POST", {"name": "extra"})
    assert status == 201, body
    assert body["name"] == "extra" and body["block_sizes"] == [8] and body["modules"] == 4
    assert body["num_parameters"] == (32 * 32 + 32 * 64) // 8 * 2  # q_proj 32x32 + gate_proj 32x64, 2 layers
    assert body["source"] == "store"  # where it came from, never its path
    assert loaded(llama_url) == ["a0", "a1", "a2", "extra"]
    health = call(llama_url + "/health")[1]
    assert health["adapters"] == 4 and health["bank_version"] > before

    status, body = call(llama_url + "/v1/adapters", "POST", {"name": "extra"})
    assert_error(status, body, 409, "adapter_exists", ["extra"])
    status, body = call(llama_url + "/v1/adapters", "POST", {"name": "extra", "replace": True})
    assert status == 201, body
    assert body["name"] == "extra"
    assert loaded(llama_url) == ["a0", "a1", "a2", "extra"]

    status, body = call(llama_url + "/v1/adapters/extra", "DELETE")
    assert status == 200, body
    assert body["name"] == "extra"
    assert loaded(llama_url) == ["a0", "a1", "a2"]
    status, body = call(llama_url + "/v1/adapters/extra", "DELETE")
    assert_error(status, body, 404, "unknown_adapter", ["extra"])
    # after unloading, a request for it is a 404
    status, body = generate(llama_url, [[5, 6, 7]], "extra")
    assert_error(status, body, 404, "unknown_adapter", ["extra"])


def test_concurrent_loads_of_one_name_load_it_once(llama_url):
    unload_quietly(llama_url, "extra")
    try:
        answers = _burst(lambda _: call(llama_url + "/v1/adapters", "POST", {"name": "extra"}),
                         [(i,) for i in range(4)], workers=4)
        statuses = sorted(status for status, _ in answers)
        assert statuses == [201, 409, 409, 409], answers
        for status, body in answers:
            if status == 409:
                assert_error(status, body, 409, "adapter_exists", ["extra"])
        assert loaded(llama_url) == ["a0", "a1", "a2", "extra"]
    finally:
        unload_quietly(llama_url, "extra")
    assert loaded(llama_url) == ["a0", "a1", "a2"]


def test_load_name_not_in_store_is_404(llama_url):
    status, body = call(llama_url + "/v1/adapters", "POST", {"name": "nothing-here"})
    assert_error(status, body, 404, "unknown_adapter", ["nothing-here"])
    assert loaded(llama_url) == ["a0", "a1", "a2"]


@pytest.mark.parametrize("name", ["misfit-module", "misfit-block"])
def test_load_misfit_adapter_is_422_and_changes_nothing(llama_url, name):
    before = call(llama_url + "/health")[1]["bank_version"]
    status, body = call(llama_url + "/v1/adapters", "POST", {"name": name})
    assert_error(status, body, 422, "adapter_does_not_fit")
    assert loaded(llama_url) == ["a0", "a1", "a2"]
    assert call(llama_url + "/health")[1]["bank_version"] == before
    status, body = generate(llama_url, [[5, 6, 7]], name)
    assert status == 404, body


@pytest.mark.parametrize("name", ["../a0", "a/b", "..", "__base__", ".hidden", "", "a" * 200, OUTSIDE])
def test_load_invalid_or_escaping_name_is_422(llama_url, artefacts, name):
    # the symbolic link points to an adapter that would fit: only the store check can refuse it
    assert (artefacts["llama"]["store"] / OUTSIDE / "adapter_config.json").is_file()
    try:
        status, body = call(llama_url + "/v1/adapters", "POST", {"name": name})
        assert_error(status, body, 422, "invalid_adapter_name")
        assert loaded(llama_url) == ["a0", "a1", "a2"]
    finally:
        if name == OUTSIDE:  # loaded by mistake: do not let it leak into later tests
            unload_quietly(llama_url, OUTSIDE)


def test_symlink_inside_the_store_loads(llama_url):
    try:
        status, body = call(llama_url + "/v1/adapters", "POST", {"name": "alias"})
        assert status == 201, body
        rows = prompts(2, seed=14)
        status, body = generate(llama_url, rows, "alias", 6)
        assert status == 200, body
        assert token_ids(body) == [ref_generate(tuple(p), "extra", 6) for p in rows]  # alias -> extra
    finally:
        unload_quietly(llama_url, "alias")


def test_delete_base_or_unknown_is_404(llama_url):
    for name in ("__base__", "nope"):
        status, body = call(f"{llama_url}/v1/adapters/{name}", "DELETE")
        assert_error(status, body, 404, "unknown_adapter")
    assert loaded(llama_url) == ["a0", "a1", "a2"]


def test_load_without_store_is_400(artefacts):
    from bca_deploy.serving.http import ServerThread, build

    app = build(artefacts["bert"]["onnx"], threads=1)
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        status, body = call(server.url + "/v1/adapters", "POST", {"name": "bext"})
        assert_error(status, body, 400, "bad_request", ["adapter store"])
        status, body = call(server.url + "/v1/adapters")
        assert status == 200 and body["available"] is None
        # an exported adapter needs no store: unloaded, it loads again from the export (its numbers unchanged)
        texts = ["the water is hot", "zebra"]
        before = call(server.url + "/v1/embeddings", "POST", {"input": texts, "adapter": "a1"})
        assert call(server.url + "/v1/adapters/a1", "DELETE")[0] == 200
        status, body = call(server.url + "/v1/embeddings", "POST", {"input": texts, "adapter": "a1"})
        assert_error(status, body, 404, "unknown_adapter")
        status, body = call(server.url + "/v1/adapters", "POST", {"name": "a1"})
        assert status == 201 and body["name"] == "a1", body
        assert call(server.url + "/v1/embeddings", "POST", {"input": texts, "adapter": "a1"}) == before


def test_an_unloaded_exported_adapter_loads_again_from_the_export(llama_url):
    """vLLM's unload then load: an adapter the graph was exported with is not in the store, and came back as 404
    "no adapter in the store"; now it loads from the export itself (by either route), the same adapter as before."""
    rows = prompts(2, seed=21)
    expected = [ref_generate(tuple(p), "a1", 5) for p in rows]
    try:
        for route, body in (("/v1/adapters", {"name": "a1"}), ("/v1/load_lora_adapter", {"lora_name": "a1"})):
            assert call(llama_url + "/v1/adapters/a1", "DELETE")[0] == 200
            assert "a1" not in loaded(llama_url)
            status, answer = generate(llama_url, rows, "a1", 5)
            assert_error(status, answer, 404, "unknown_adapter")
            status, answer = call(llama_url + route, "POST", body)
            assert status in (200, 201), answer
            status, answer = generate(llama_url, rows, "a1", 5)
            assert status == 200 and token_ids(answer) == expected, answer
        # loaded under another name from the export (vLLM's lora_path names the source), then gone again
        status, answer = call(llama_url + "/v1/load_lora_adapter", "POST", {"lora_name": "a1-copy", "lora_path": "a1"})
        assert status == 200, answer
        status, answer = generate(llama_url, rows, "a1-copy", 5)
        assert status == 200 and token_ids(answer) == expected, answer
    finally:
        unload_quietly(llama_url, "a1-copy")
        if "a1" not in loaded(llama_url):
            call(llama_url + "/v1/adapters", "POST", {"name": "a1"})
    assert loaded(llama_url) == ["a0", "a1", "a2"]


def test_load_at_start_refuses_a_name_twice_or_missing_before_the_model_loads(artefacts, monkeypatch):
    """``serve --load``: a name given twice (the second would silently replace the first) or not in the store is
    refused naming it, before the export is loaded."""
    from bca_deploy.serving import http
    from bca_deploy.errors import ServingError

    art = artefacts["bert"]
    name = next(iter(BERT_STORE))
    monkeypatch.setattr(http, "MultiAdapterSession", lambda *a, **k: pytest.fail("the export was loaded first"))
    with pytest.raises(ServingError, match=f"--load names '{name}' more than once"):
        http.build(art["onnx"], adapter_store=art["store"], load=(name, "x", name), threads=1)
    with pytest.raises(Exception, match="nope") as missing:
        http.build(art["onnx"], adapter_store=art["store"], load=(name, "nope"), threads=1)
    assert "store" in str(missing.value)


# ---- correctness against PyTorch -------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [*CHOICES, "__base__"])
def test_generate_matches_pytorch(llama_url, adapter):
    rows = prompts(3, seed=1)  # different lengths: the server left-pads them into one batch
    status, body = generate(llama_url, rows, adapter, max_new_tokens=8)
    assert status == 200, body
    assert body["adapter"] == (None if adapter in (None, "__base__") else adapter)
    assert "text" not in body["data"][0]  # token-id input: no text
    reference = [ref_generate(tuple(p), None if adapter == "__base__" else adapter, 8) for p in rows]
    assert token_ids(body) == reference


def test_adapters_change_generations(llama_url):
    # The parity tests only discriminate if the adapters change the greedy tokens.
    rows = prompts(3, seed=1)
    answers = {str(a): [ref_generate(tuple(p), a, 8) for p in rows] for a in CHOICES}
    assert len({json.dumps(v) for v in answers.values()}) == len(CHOICES), answers


@pytest.mark.parametrize("adapter", CHOICES)
def test_embeddings_match_pytorch(bert_url, adapter):
    rows = prompts(3, seed=2, low=3, high=12)  # different lengths: right-padded into one batch
    status, body = call(bert_url + "/v1/embeddings", "POST", {"input": rows, "adapter": adapter})
    assert status == 200, body
    got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    reference = np.stack([ref_embed(tuple(r), adapter) for r in rows])
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    if adapter is not None:  # the adapter matters: far from the base model's vectors
        base = np.stack([ref_embed(tuple(r), None) for r in rows])
        assert np.abs(reference - base).max() > 1e-2


def test_embeddings_normalize_and_pooling(bert_url):
    rows = prompts(2, seed=3, low=3, high=10)
    status, body = call(bert_url + "/v1/embeddings", "POST", {"input": rows, "adapter": "a1", "normalize": True})
    assert status == 200, body
    got = np.array([d["embedding"] for d in body["data"]])
    reference = np.stack([ref_embed(r, "a1", normalize=True) for r in rows])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    for pooling in ("cls", "last"):
        status, body = call(bert_url + "/v1/embeddings", "POST", {"input": rows, "adapter": "a2", "pooling": pooling})
        assert status == 200, body
        got = np.array([d["embedding"] for d in body["data"]])
        np.testing.assert_allclose(got, np.stack([ref_embed(r, "a2", pooling) for r in rows]), atol=1e-4, rtol=0)


def test_text_embeddings_match_pytorch(bert_url, artefacts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artefacts["bert"]["onnx"])  # the export carries the tokenizer
    texts = ["the water is hot", "zebra", " ".join(WORDS)]  # the last: more than 64 tokens, truncated
    assert len(tokenizer(texts[2])["input_ids"]) > MAX_POSITIONS
    for adapter in ("a1", None):
        status, body = call(bert_url + "/v1/embeddings", "POST", {"input": texts, "adapter": adapter})
        assert status == 200, body
        got = np.array([d["embedding"] for d in body["data"]])
        ids = [tokenizer(t, truncation=True, max_length=MAX_POSITIONS)["input_ids"] for t in texts]
        np.testing.assert_allclose(got, np.stack([ref_embed(i, adapter) for i in ids]), atol=1e-4, rtol=0)
    status, body = call(bert_url + "/v1/embeddings", "POST", {"input": "the water is hot", "adapter": "a2"})
    assert status == 200 and len(body["data"]) == 1, body
    reference = ref_embed(tokenizer("the water is hot")["input_ids"], "a2")
    np.testing.assert_allclose(body["data"][0]["embedding"], reference, atol=1e-4, rtol=0)


def test_concurrent_text_requests_share_the_tokenizer_safely(bert_url, artefacts):
    # Fast tokenizers raise "Already borrowed" when two threads use one at once; the server tokenizes
    # under a lock while requests are checked, so a burst of text requests all succeed.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artefacts["bert"]["onnx"])
    jobs = [([" ".join(WORDS[i % 7: i % 7 + 3 + i % 5])] * (1 + i % 2), CHOICES[i % len(CHOICES)]) for i in range(32)]

    def embed(texts, adapter):
        return call(bert_url + "/v1/embeddings", "POST", {"input": texts, "adapter": adapter})

    answers = _burst(embed, jobs, workers=16)
    # The race itself, without HTTP in between: many threads tokenizing long texts (with truncation,
    # which reconfigures the tokenizer) through one session at once.
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(artefacts["bert"]["onnx"], load_exported=False)
    long_texts = [" ".join(WORDS * 30)] * 4 + ["zebra"] * 4
    expected = {True: [tokenizer(t, truncation=True, max_length=MAX_POSITIONS)["input_ids"] for t in long_texts],
                False: [tokenizer(t)["input_ids"] for t in long_texts]}
    # alternating truncation on and off makes the tokenizer reconfigure itself between calls
    results = _burst(lambda k: session.tokenize(long_texts, truncate=k % 2 == 0), [(k,) for k in range(64)],
                     workers=16)
    assert all(r == expected[k % 2 == 0] for k, r in enumerate(results))
    for (texts, adapter), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        ids = [tokenizer(t, truncation=True, max_length=MAX_POSITIONS)["input_ids"] for t in texts]
        got = np.array([d["embedding"] for d in body["data"]])
        np.testing.assert_allclose(got, np.stack([ref_embed(i, adapter) for i in ids]), atol=1e-4, rtol=0)


def test_runtime_loaded_adapters_match_pytorch(llama_url, bert_url):
    rows = prompts(3, seed=4)
    try:
        for name in ("extra", "peftish"):
            status, body = call(llama_url + "/v1/adapters", "POST", {"name": name, "replace": True})
            assert status == 201, body
        for name in ("extra", "peftish"):
            status, body = generate(llama_url, rows, name, max_new_tokens=8)
            assert status == 200, body
            reference = [ref_generate(tuple(p), name, 8) for p in rows]
            assert token_ids(body) == reference
            assert reference != [ref_generate(tuple(p), None, 8) for p in rows]  # the adapter matters
    finally:
        unload_quietly(llama_url, "extra")
        unload_quietly(llama_url, "peftish")

    rows = prompts(3, seed=5, low=3, high=10)
    try:
        status, body = call(bert_url + "/v1/adapters", "POST", {"name": "bext"})
        assert status == 201, body
        status, body = call(bert_url + "/v1/embeddings", "POST", {"input": rows, "adapter": "bext"})
        assert status == 200, body
        got = np.array([d["embedding"] for d in body["data"]])
        reference = np.stack([ref_embed(tuple(r), "bext") for r in rows])
        np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
        assert np.abs(reference - np.stack([ref_embed(tuple(r), None) for r in rows])).max() > 1e-2
    finally:
        unload_quietly(bert_url, "bext")


# ---- micro-batching and concurrency ----------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_correct(llama_url, log_capture):
    rows = prompts(24, seed=6)
    jobs = [([p], CHOICES[i % 4], 3 + i % 4) for i, p in enumerate(rows)]
    solo = [generate(llama_url, inputs, adapter, n) for inputs, adapter, n in jobs]
    assert all(status == 200 for status, _ in solo), solo
    solo = [token_ids(body) for _, body in solo]
    assert solo == [[ref_generate(tuple(inputs[0]), adapter, n)] for inputs, adapter, n in jobs]

    ids = [f"burst-{uuid.uuid4().hex[:12]}" for _ in jobs]
    answers = _burst(lambda job, rid: generate(llama_url, *job, request_id=rid), list(zip(jobs, ids, strict=True)))
    assert [status for status, _ in answers] == [200] * len(jobs), answers
    assert [token_ids(body) for _, body in answers] == solo

    entries = log_capture.by_id(ids)
    assert sorted(entries) == sorted(ids)
    for rid, (inputs, adapter, _) in zip(ids, jobs, strict=True):
        entry = entries[rid]
        assert entry["status"] == 200 and entry["path"] == "/v1/generate" and entry["method"] == "POST"
        assert isinstance(entry["latency_ms"], (int, float)) and entry["latency_ms"] > 0
        assert entry["adapter"] == adapter and entry["rows"] == len(inputs) and entry["kind"] == "generate"
        assert 1 <= entry["batch_requests"] <= entry["batch_rows"]
    assert max(e["batch_requests"] for e in entries.values()) > 1, [e["batch_requests"] for e in entries.values()]


def test_multi_row_requests_batch_with_others(llama_url):
    # requests of several rows and different adapters/lengths in one burst: every row as when alone
    jobs = [(prompts(1 + i % 3, seed=100 + i), CHOICES[i % 4], 4 + i % 3) for i in range(8)]
    answers = _burst(lambda *job: generate(llama_url, *job), jobs)
    assert [s for s, _ in answers] == [200] * len(jobs), answers
    for (inputs, adapter, n), (_, body) in zip(jobs, answers, strict=True):
        assert token_ids(body) == [ref_generate(tuple(p), adapter, n) for p in inputs]


def test_unknown_adapter_fails_alone_in_a_burst(llama_url, log_capture):
    rows = prompts(12, seed=7)
    jobs = [([p], CHOICES[i % 4]) for i, p in enumerate(rows)] + [([[9, 8, 7]], "no-such-adapter")] * 4
    ids = [f"unk-{uuid.uuid4().hex[:12]}" for _ in jobs]
    answers = _burst(lambda job, rid: generate(llama_url, *job, request_id=rid), list(zip(jobs, ids, strict=True)))
    for (inputs, adapter), (status, body) in zip(jobs, answers, strict=True):
        if adapter == "no-such-adapter":
            assert_error(status, body, 404, "unknown_adapter", ["no-such-adapter"])
            assert "a0" not in body["error"]["message"]  # other adapters' names are not shown
        else:
            assert status == 200, body
            assert token_ids(body) == [ref_generate(tuple(inputs[0]), adapter, 6)]
    entries = log_capture.by_id(ids)
    for rid, (_, adapter) in zip(ids, jobs, strict=True):
        assert entries[rid]["status"] == (404 if adapter == "no-such-adapter" else 200)
        assert entries[rid]["adapter"] == adapter


def test_load_unload_during_traffic_never_mixes_adapters(llama_url):
    # A prompt whose greedy answer through "extra" differs from every other choice's. Long generations (n steps,
    # one bank snapshot each) and short loaded phases: unloads land in the middle of batches that use "extra".
    n = 12
    probe = next((p for p in prompts(20, seed=8)
                  if all(ref_generate(tuple(p), "extra", n) != ref_generate(tuple(p), a, n) for a in CHOICES)), None)
    assert probe is not None, "no prompt tells 'extra' apart from the other adapters"
    expected_extra = ref_generate(tuple(probe), "extra", n)
    others = [([p], CHOICES[(t + i) % 4]) for t in range(3) for i, p in enumerate(prompts(10, seed=9 + t))]
    solo = {json.dumps(job): token_ids(generate(llama_url, *job, n)[1]) for job in others}

    stop = threading.Event()
    toggles = []

    def toggle():  # until the request streams end (at most 60 cycles)
        for _ in range(60):
            toggles.append(call(llama_url + "/v1/adapters", "POST", {"name": "extra"})[0])
            time.sleep(0.02)
            toggles.append(call(llama_url + "/v1/adapters/extra", "DELETE")[0])
            if stop.wait(0.02):
                break

    def stream(jobs):
        return [generate(llama_url, *job, n) for job in jobs]

    def probe_stream():
        return [generate(llama_url, [probe], "extra", n) for _ in range(16)]

    unload_quietly(llama_url, "extra")
    try:
        with cf.ThreadPoolExecutor(max_workers=5) as pool:
            toggler = pool.submit(toggle)
            streams = [pool.submit(stream, others[t * 10:(t + 1) * 10]) for t in range(3)]
            probes = pool.submit(probe_stream)
            results = [s.result(timeout=4 * TIMEOUT) for s in streams]
            probed = probes.result(timeout=4 * TIMEOUT)
            stop.set()
            toggler.result(timeout=4 * TIMEOUT)
    finally:
        stop.set()
        unload_quietly(llama_url, "extra")

    assert toggles and set(toggles) == {201, 200}, toggles
    for t in range(3):
        for job, (status, body) in zip(others[t * 10:(t + 1) * 10], results[t], strict=True):
            assert status == 200, body
            assert token_ids(body) == solo[json.dumps(job)]
    for status, body in probed:
        if status == 200:
            assert token_ids(body) == [expected_extra]
        else:
            assert_error(status, body, 404, "unknown_adapter", ["extra"])
    assert loaded(llama_url) == ["a0", "a1", "a2"]


def test_unload_in_the_middle_of_a_generation_does_not_change_it(llama_server):
    # Deterministic version of the test above: the inference thread is paused after the first decoding step of a
    # batch that uses "extra" (a pass-through wrapper on the served session instance); "extra" is unloaded and
    # another adapter loaded meanwhile; the batch then finishes on the bank it started with.
    server, app = llama_server
    session = app.state.session
    url = server.url
    started, resume = threading.Event(), threading.Event()
    run = session.run_ortvalues

    def paused_run(feeds, adapters, output_names=None, snapshot=None, **kwargs):
        out = run(feeds, adapters, output_names, snapshot, **kwargs)
        if "extra" in adapters and not started.is_set():
            started.set()
            resume.wait(TIMEOUT)
        return out

    rows = prompts(3, seed=13)
    jobs = [([rows[0]], "extra"), ([rows[1]], "a0"), ([rows[2]], None)]
    assert call(url + "/v1/adapters", "POST", {"name": "extra", "replace": True})[0] == 201
    session.run_ortvalues = paused_run
    try:
        with cf.ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(generate, url, inputs, adapter, 10) for inputs, adapter in jobs]
            assert started.wait(TIMEOUT), "no batch with 'extra' started"
            status, body = call(url + "/v1/adapters/extra", "DELETE")
            assert status == 200, body
            status, body = call(url + "/v1/adapters", "POST", {"name": "peftish"})
            assert status == 201, body
            assert "extra" not in session.snapshot().slots
            resume.set()
            answers = [f.result(timeout=2 * TIMEOUT) for f in futures]
    finally:
        resume.set()
        del session.run_ortvalues  # back to the class's method
        unload_quietly(url, "extra")
        unload_quietly(url, "peftish")
    for (inputs, adapter), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        assert token_ids(body) == [ref_generate(tuple(inputs[0]), adapter, 10)]
    status, body = generate(url, [rows[0]], "extra", 10)
    assert_error(status, body, 404, "unknown_adapter", ["extra"])
    assert loaded(url) == ["a0", "a1", "a2"]


def test_sampling_is_seeded_per_row_and_top_k_1_is_greedy(llama_url):
    rows = prompts(2, seed=11)
    sampled = {"do_sample": True, "temperature": 1.5, "seed": 7}
    status, first = generate(llama_url, rows, "a1", 8, **sampled)
    assert status == 200, first
    assert len(token_ids(first)) == 2 and all(1 <= len(r) <= 8 for r in token_ids(first))
    assert token_ids(generate(llama_url, rows, "a1", 8, **sampled)[1]) == token_ids(first)  # reproducible
    # the same request in a burst with greedy requests of other adapters: the same tokens
    jobs = [(rows, "a1", 8, sampled)] + [([p], CHOICES[i % 4], 8, {}) for i, p in enumerate(prompts(7, seed=12))]
    answers = _burst(lambda inputs, adapter, n, extra: generate(llama_url, inputs, adapter, n, **extra), jobs)
    assert all(status == 200 for status, _ in answers), answers
    assert token_ids(answers[0][1]) == token_ids(first)
    for (inputs, adapter, n, _), (_, body) in zip(jobs[1:], answers[1:], strict=True):
        assert token_ids(body) == [ref_generate(tuple(inputs[0]), adapter, n)]
    # another seed, and the same prompt twice in one request (seed + row index): other tokens
    assert token_ids(generate(llama_url, rows, "a1", 8, **{**sampled, "seed": 8})[1]) != token_ids(first)
    twice = token_ids(generate(llama_url, [rows[0], rows[0]], "a1", 8, **sampled)[1])
    assert twice[0] == token_ids(first)[0] and twice[1] != twice[0]
    # sampling from the top-1 token only is greedy decoding
    status, body = generate(llama_url, rows, "a2", 8, do_sample=True, top_k=1, seed=3)
    assert status == 200, body
    assert token_ids(body) == [ref_generate(tuple(p), "a2", 8) for p in rows]


def test_small_batches_and_mixed_embedding_settings(artefacts, log_capture):
    # max_batch_rows=2: requests of other pooling/normalize settings, or too many rows, wait for a later batch
    from bca_deploy.serving.http import ServerThread, build

    app = build(artefacts["bert"]["onnx"], max_batch_rows=2, max_wait_ms=30, threads=1)
    settings = [("mean", False), ("cls", False), ("mean", True), ("last", False)]
    jobs = [(prompts(3 if i in (5, 10) else 1, seed=200 + i, low=3, high=10), CHOICES[i // 4], *settings[i % 4])
            for i in range(16)]  # consecutive requests alternate settings: each batch holds back the others
    ids = [f"small-{uuid.uuid4().hex[:12]}" for _ in jobs]

    def embed(url, job, rid):
        rows, adapter, pooling, normalize = job
        return call(url + "/v1/embeddings", "POST", {"input": rows, "adapter": adapter, "pooling": pooling,
                                                      "normalize": normalize}, request_id=rid)

    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        answers = _burst(lambda job, rid: embed(server.url, job, rid), list(zip(jobs, ids, strict=True)))
    for (rows, adapter, pooling, normalize), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
        reference = np.stack([ref_embed(r, adapter, pooling, normalize) for r in rows])
        np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    entries = log_capture.by_id(ids)
    assert sorted(entries) == sorted(ids)
    for rid, (rows, *_rest) in zip(ids, jobs, strict=True):
        entry = entries[rid]
        assert entry["status"] == 200 and entry["rows"] == len(rows)
        assert 1 <= entry["batch_rows"] <= 2, entry  # a 3-row request runs in two batches
    assert max(e["batch_requests"] for e in entries.values()) > 1


# ---- request validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"input": [[5, 6]], "max_new_tokens": 0}, 422, id="max_new_tokens-0"),
        pytest.param({"input": [[5, 6]], "max_new_tokens": -3}, 422, id="max_new_tokens-negative"),
        pytest.param({"input": [[5, 6]], "unknown_field": 1}, 422, id="unknown-field"),
        pytest.param({"input": [[5, 6]], "temperature": 0, "do_sample": True}, 422, id="temperature-0"),
        pytest.param({"input": [[5, 6]], "top_p": 1.5}, 422, id="top_p-above-1"),
        pytest.param({"adapter": "a0"}, 422, id="no-input"),
        pytest.param({"input": 17}, 422, id="input-not-a-list"),
        pytest.param({"input": [[5, "x"]]}, 422, id="token-not-an-int"),
        pytest.param({"input": [[5, 6]], "adapter": 3}, 422, id="adapter-not-a-string"),
        pytest.param({"input": []}, 400, id="empty-input"),
        pytest.param({"input": [[]]}, 400, id="empty-row"),
        pytest.param({"input": [[5, VOCAB]]}, 400, id="token-id-vocab-size"),
        pytest.param({"input": [[5, -1]]}, 400, id="token-id-negative"),
        pytest.param({"input": [[5] * 60], "max_new_tokens": 10}, 400, id="beyond-64-positions"),
        pytest.param({"input": "hello"}, 400, id="text-without-tokenizer"),  # the llama export has no tokenizer
    ],
)
def test_invalid_generate_requests(llama_url, body, status):
    got_status, got = call(llama_url + "/v1/generate", "POST", body)
    assert_error(got_status, got, status)


def test_too_long_for_the_model_is_the_same_400_on_every_route(llama_url):
    # one rule (session.check_positions): native and OpenAI routes answer the same status, type and field
    answers = {
        "generate": call(llama_url + "/v1/generate", "POST", {"input": [[5] * 60], "max_new_tokens": 10}),
        "completions": call(llama_url + "/v1/completions", "POST", {"model": "a0", "prompt": [5] * 60,
                                                                    "max_tokens": 10}),
    }
    for route, (status, body) in answers.items():
        assert_error(status, body, 400, "context_length_exceeded", ["60 prompt tokens + 10 new tokens",
                                                                     "64 positions", "at most 4 new tokens"])
    assert answers["generate"][1]["error"]["param"] == "max_new_tokens"
    assert answers["completions"][1]["error"]["param"] == "max_tokens"
    for path, body, param in (("/v1/generate", {"input": [[5] * 65]}, "input"),
                              ("/v1/completions", {"model": "a0", "prompt": [5] * 65}, "prompt")):
        status, got = call(llama_url + path, "POST", body)  # the prompt alone is too long: its own field is named
        assert_error(status, got, 400, "context_length_exceeded", ["65 tokens", "64 positions"])
        assert got["error"]["param"] == param


def test_malformed_json_is_400(llama_url):
    status, body = call(llama_url + "/v1/generate", "POST", raw=b"{not json")
    assert_error(status, body, 400, "invalid_json")


def test_invalid_embedding_requests(bert_url):
    # (native requests: no "model"; the OpenAI one answers 400 where these answer 422, as OpenAI answers)
    for body, expected in (({"input": [[5, 6]], "pooling": "max"}, 422), ({"input": [[5, 6]], "adapter": "nope"}, 404),
                           ({"input": [[1] * 65]}, 400), ({"input": [[5, 600]]}, 400),
                           ({"input": ["some text", [5, 6]]}, 422), ({"model": "a0", "input": [[5, 6]], "x": 1}, 400)):
        status, got = call(bert_url + "/v1/embeddings", "POST", body)
        assert_error(status, got, expected)


def test_text_length_and_row_count_are_enforced_exactly_and_separately(artefacts):
    # --max-text-chars below --max-request-rows: each limit holds exactly, on its own; a 413 names its option
    from bca_deploy.serving.http import ServerThread, build

    app = build(artefacts["bert"]["onnx"], threads=1, max_text_chars=10, max_request_rows=300, max_queued_rows=300)
    with ServerThread(app) as server:
        url = server.url + "/v1/embeddings"
        for body in ({"input": "x" * 10}, {"model": "a0", "input": ["x" * 10] * 300}, {"input": [[5] * 40]}):
            status, got = call(url, "POST", body)  # 10 characters, 300 rows, and a token row longer than 10: fine
            assert status == 200, got
        for body in ({"input": "x" * 11}, {"input": ["ok", "x" * 11]}, {"model": "a0", "input": "x" * 11}):
            status, got = call(url, "POST", body)
            assert_error(status, got, 413, "request_too_large", ["11 characters", "limit is 10", "--max-text-chars"])
        for body in ({"input": [[5, 6]] * 301}, {"model": "a0", "input": ["ok"] * 301}):
            status, got = call(url, "POST", body)
            assert_error(status, got, 413, "request_too_large", ["301 rows", "limit is 300", "--max-request-rows"])


def test_wrong_endpoint_for_the_task_is_400(llama_url, bert_url):
    # each says what the route needs (it said "embed is not available", a word of the code's)
    for url, path, needs in ((llama_url, "/v1/embeddings", "embeddings need a feature-extraction export"),
                             (llama_url, "/v1/classify", "classification needs a text-classification export"),
                             (bert_url, "/v1/generate", "generation needs a text-generation-with-past export"),
                             (bert_url, "/v1/classify", "classification needs a text-classification export")):
        status, body = call(url + path, "POST", {"input": [[5, 6, 7]]})
        assert_error(status, body, 400, "wrong_task", [needs])
    status, body = call(llama_url + "/health")
    assert status == 200 and body["adapters"] == 3


def test_request_id_header_round_trip(llama_url, log_capture):
    rid = f"rid-{uuid.uuid4().hex[:8]}"
    req = urllib.request.Request(llama_url + "/health", headers={"x-request-id": rid})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
        assert response.headers["x-request-id"] == rid
    entry = log_capture.by_id([rid])[rid]
    assert entry["path"] == "/health" and entry["status"] == 200 and entry["method"] == "GET"


# ---- the CLI --------------------------------------------------------------------------------------------


def test_cli_serve_help_mentions_endpoints():
    from click.testing import CliRunner

    from bca_deploy.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for word in ("/health", "/v1/adapters", "/v1/embeddings", "/v1/classify", "/v1/generate", "--adapter-store",
                 "--max-wait-ms", "--max-batch-rows", "--load"):
        assert word in result.output, word


def test_cli_serve_on_a_port_in_use_fails_at_once_with_one_line(artefacts, monkeypatch):
    """A taken port is an OS error named with the address, before the export is loaded (it was uvicorn's own
    log line and exit 3 after several seconds of loading); the "serving ..." line only comes once it can serve."""
    import socket

    from click.testing import CliRunner

    import bca_deploy.serving.http as http
    from bca_deploy.cli import EXIT_OS_ERROR, main

    loaded = []
    monkeypatch.setattr(http, "build", lambda *a, **k: loaded.append(a) or pytest.fail("loaded before binding"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(artefacts["bert"]["onnx"]), "--port", str(port)])
    assert result.exit_code == EXIT_OS_ERROR, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "--port" in result.output
    assert "Traceback" not in result.output and "serving" not in result.output and not loaded


def test_cli_serve_refuses_an_export_that_is_not_a_bank_before_announcing_it(artefacts, tmp_path):
    from click.testing import CliRunner

    from bca_deploy.cli import EXIT_USER_ERROR, main

    not_bank = tmp_path / "onnx"
    shutil.copytree(artefacts["bert"]["onnx"], not_bank)
    meta = json.loads((not_bank / "bca_export.json").read_text())
    (not_bank / "bca_export.json").write_text(json.dumps({**meta, "bank": None}))
    result = CliRunner().invoke(main, ["serve", str(not_bank), "--port", str(free_port())])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert "adapter-bank" in result.output and "serving" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("how", GRAPH_DAMAGE)
def test_an_export_whose_graph_onnxruntime_refuses_is_named_not_reported_as_a_bug(artefacts, tmp_path, how):
    """A damaged or tampered model.onnx was exit 70 ("a bug in bca-deploy") with onnxruntime's raw message."""
    from click.testing import CliRunner

    from bca_deploy.cli import EXIT_USER_ERROR, main
    from bca_deploy.exporters import ExportGraphError
    from bca_deploy.serving import MultiAdapterSession

    damaged = tmp_path / "export" / "onnx"
    shutil.copytree(artefacts["bert"]["onnx"], damaged)
    damage_graph(damaged / "model.onnx", how)
    with pytest.raises(ExportGraphError, match=r"model\.onnx: onnxruntime cannot load this graph \(\w+: .+\); the "
                                               "file is not what bca-deploy export wrote"):
        MultiAdapterSession(damaged)
    result = CliRunner().invoke(main, ["serve", str(damaged), "--port", str(free_port())])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert f"Error: {damaged / 'model.onnx'}: onnxruntime cannot load this graph" in result.output
    assert "escapes model directory" in result.output or how != "external data outside its directory"
    assert "serving" not in result.output and "Traceback" not in result.output and "bug" not in result.output


def test_a_failing_batch_is_a_json_500_and_the_server_keeps_serving(artefacts, log_capture):
    from bca_deploy.serving.http import ServerThread, build

    app = build(artefacts["bert"]["onnx"], max_wait_ms=5, threads=1)
    session = app.state.session
    real_embed = session.embed
    failures = {"left": 1}

    def embed_failing_once(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("simulated onnxruntime failure")
        return real_embed(*args, **kwargs)

    session.embed = embed_failing_once
    rows = prompts(1, seed=900, low=3, high=6)
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        status, body = call(server.url + "/v1/embeddings", "POST", {"input": rows, "adapter": "a0"}, request_id="fail-1")
        assert_error(status, body, 500, "internal_error", words=("fail-1",))  # the request id, for the log
        assert "simulated" not in body["error"]["message"]  # internal text stays in the log
        status, body = call(server.url + "/v1/embeddings", "POST", {"input": rows, "adapter": "a0"}, request_id="fail-2")
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["data"][0]["embedding"]), ref_embed(rows[0], "a0"), atol=1e-4, rtol=0)
    logged = log_capture.by_id(["fail-1", "fail-2"])
    assert logged["fail-1"]["status"] == 500 and "simulated" in logged["fail-1"]["error"]
    assert logged["fail-2"]["status"] == 200
    assert any(e.get("event") == "request_failed" and "simulated" in e["traceback"] for e in log_capture.entries)


def test_batches_stay_within_the_token_budget(artefacts):
    # max_batch_tokens=16: rows of 9 tokens run alone, rows of 4 share a batch; a long request runs in pieces
    from bca_deploy.serving.http import ServerThread, build

    app = build(artefacts["bert"]["onnx"], max_batch_tokens=16, max_wait_ms=20, threads=1)
    session = app.state.session
    real_embed, shapes = session.embed, []

    def recording_embed(rows, adapters, **kwargs):
        shapes.append((len(rows), max(len(r) for r in rows)))
        return real_embed(rows, adapters, **kwargs)

    session.embed = recording_embed
    rows = prompts(6, seed=901, low=9, high=10) + prompts(6, seed=902, low=4, high=5)
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        status, body = call(server.url + "/v1/embeddings", "POST", {"input": rows, "adapter": "a1"})
    assert status == 200, body
    got = np.array([d["embedding"] for d in body["data"]])
    np.testing.assert_allclose(got, np.stack([ref_embed(r, "a1") for r in rows]), atol=1e-4, rtol=0)
    assert all(n == 1 or n * longest <= 16 for n, longest in shapes), shapes
    assert sum(n for n, _ in shapes) == 12 and max(n for n, _ in shapes) == 4, shapes


def test_a_server_that_can_only_answer_with_the_base_model_says_so_at_start(artefacts):
    """--no-exported-adapters with no --adapter-store: nothing is loaded and nothing can be; the operator is told
    at start-up (the server still runs: the base model is a valid thing to serve)."""
    from bca_deploy.serving.http import build, startup_notes

    art = artefacts["bert"]
    base_only = startup_notes(build(art["onnx"], load_exported=False, threads=1).state.server)
    assert any("no adapter is loaded and none can be (no --adapter-store)" in n and "404" in n for n in base_only)
    for app in (build(art["onnx"], threads=1),  # the exported adapters
                build(art["onnx"], load_exported=False, adapter_store=art["store"], threads=1)):  # loadable
        assert not any("no adapter is loaded" in n for n in startup_notes(app.state.server))


def test_a_body_that_is_not_sent_as_json_is_refused_before_anything_changes(llama_url, bert_url):
    """A page on any site can make a browser POST text/plain, form or multipart bodies to 127.0.0.1 without a CORS
    preflight (and read nothing back, but the request runs). Such bodies are refused (415) even when their bytes
    are JSON, so no site can load, unload or run adapters on a local server; JSON and no content type are read."""
    import http.client
    import urllib.parse

    from http_helpers import call as call_with  # sends the headers given

    unload_quietly(llama_url, "extra")
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "text/plain; charset=utf-8", "application/jsonx"):
        for route, body in (("/v1/load_lora_adapter", {"lora_name": "extra"}), ("/v1/adapters", {"name": "extra"}),
                            ("/v1/completions", {"model": "a0", "prompt": "hi", "max_tokens": 2}),
                            ("/v1/generate", {"adapter": "a0", "input": ["hi"], "max_new_tokens": 2}),
                            (bert_url + "/v1/embeddings", {"model": "a0", "input": "hi"}),
                            (bert_url + "/v1/embeddings", {"adapter": "a0", "input": ["hi"]})):
            url = route if route.startswith("http") else llama_url + route
            status, answer = call_with(url, "POST", body, headers={"content-type": media})
            assert_error(status, answer, 415, "unsupported_media_type", ["application/json"])
            assert repr(media) in answer["error"]["message"]
    assert loaded(llama_url) == ["a0", "a1", "a2"]  # nothing was loaded
    status, answer = call_with(llama_url + "/v1/load_lora_adapter", "POST", {"lora_name": "extra"},
                               headers={"content-type": "application/json; charset=UTF-8"})
    assert status == 200, answer
    status, answer = call_with(llama_url + "/v1/unload_lora_adapter", "POST", {"lora_name": "extra"},
                               headers={"content-type": "text/plain"})
    assert status == 415 and loaded(llama_url) == ["a0", "a1", "a2", "extra"]  # not unloaded either
    # no content type at all: read as JSON (as FastAPI does; a browser always sends one with a body)
    parts = urllib.parse.urlsplit(llama_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("POST", "/v1/unload_lora_adapter", body=b'{"lora_name": "extra"}')
    response = connection.getresponse()
    assert response.status == 200, response.read()
    connection.close()
    assert loaded(llama_url) == ["a0", "a1", "a2"]


def test_a_method_a_route_does_not_take_gets_405_with_the_allow_header(llama_url):
    """HTTP asks a 405 to say which methods the route takes (the Allow header); the answer is the usual JSON error,
    and an invented method is not echoed whole."""
    import urllib.request

    before = loaded(llama_url)
    for path, method, allowed in (("/v1/models", "POST", {"GET", "HEAD"}), ("/v1/completions", "GET", {"POST"}),
                                  ("/v1/adapters/a0", "PUT", {"DELETE"}), ("/v1/models", "X" * 5000, {"GET"})):
        request = urllib.request.Request(llama_url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=TIMEOUT)
        with refused.value as response:
            body = json.loads(response.read())
            assert response.code == 405 and set(response.headers["allow"].replace(" ", "").split(",")) >= allowed
        assert body["error"]["type"] == "method_not_allowed" and len(body["error"]["message"]) < 300, body
        assert f"it takes {response.headers['allow']}" in body["error"]["message"]
    assert loaded(llama_url) == before  # the PUT changed nothing


def test_no_manage_adapters_refuses_every_load_and_unload_route(artefacts):
    # --no-manage-adapters: on a shared server one tenant must not unload another's adapter (or load its own);
    # every load and unload route is 403, the adapters loaded at start are served as before, nothing changes
    from bca_deploy.serving.http import ServerThread, build

    bert = artefacts["bert"]
    app = build(bert["onnx"], adapter_store=bert["store"], load=["bext"], threads=1, max_wait_ms=1,
                manage_adapters=False)
    with ServerThread(app, startup_timeout=60) as server:
        url = server.url
        before = loaded(url)
        for method, path, body in (("POST", "/v1/adapters", {"name": "bext", "replace": True}),
                                   ("DELETE", "/v1/adapters/a0", None), ("DELETE", "/v1/adapters/bext", None),
                                   ("POST", "/v1/load_lora_adapter", {"lora_name": "other", "lora_path": "bext"}),
                                   ("POST", "/v1/unload_lora_adapter", {"lora_name": "a1"})):
            status, answer = call(url + path, method, body)
            assert_error(status, answer, 403, "forbidden", ["--no-manage-adapters"])
        assert loaded(url) == before and {"a0", "a1", "a2", "bext"} <= set(before)
        status, answer = call(url + "/v1/embeddings", "POST", {"input": [[5, 6, 7]], "adapter": "bext"})
        assert status == 200, answer



def test_serve_load_reads_store_entries_through_their_snapshot_and_names_the_entry(artefacts, monkeypatch):
    # --load at start-up read store entries in place (memory-mapped, opened blocking), unlike every other store load:
    # an entry rewritten or swapped while the server starts could crash, hang or mix it. Now the same private copy
    # (AdapterStore.snapshot); a refusal still names the entry in the store, never the copy's temporary path.
    from bca_deploy.errors import AdapterMismatchError
    from bca_deploy.serving.http import build
    from bca_deploy.serving.store import AdapterStore

    llama = artefacts["llama"]
    read = []
    real = AdapterStore.snapshot

    def spying(self, name, directory, **kwargs):
        read.append(name)
        return real(self, name, directory, **kwargs)

    monkeypatch.setattr(AdapterStore, "snapshot", spying)
    app = build(llama["onnx"], adapter_store=llama["store"], load=["extra"], threads=1)
    assert read == ["extra"]
    assert app.state.server.session.snapshot().slots.keys() >= {"extra"}
    with pytest.raises(AdapterMismatchError) as refused:
        build(llama["onnx"], adapter_store=llama["store"], load=["misfit-module"], threads=1)
    message = str(refused.value)
    assert message.startswith(f"{Path(llama['store']).resolve() / 'misfit-module'} does not fit the bank graph"), message
    assert "bca-store-" not in message


def test_one_adapters_requests_cannot_fill_the_queue_every_tenant_shares():
    # --max-queued-rows is one pool: a tenant sending many requests for its adapter filled it, and every other
    # tenant got 503 (found by helper-51: 17 of 20 refused beside 8 concurrent 256-row requests of one adapter)
    from bca_deploy.errors import ServingError
    from bca_deploy.serving.http import _Admission
    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.wire import ServerBusyError

    admission = _Admission(8, 4)
    first = admission.take(4, "a0")
    with pytest.raises(ServerBusyError, match=r"adapter 'a0'.s requests hold 4 of the 4 .*--max-queued-rows-per"):
        admission.take(1, "a0")
    other = admission.take(4, "a1")  # another tenant is still admitted
    with pytest.raises(ServerBusyError, match=r"queue is full \(8 of 8 rows waiting, --max-queued-rows\)"):
        admission.take(1, None)
    first()
    first()  # released once only
    assert admission.rows == 4 and dict(admission.by_adapter) == {"a1": 4}
    other()
    base = admission.take(4, None)
    with pytest.raises(ServerBusyError, match="the base model's requests hold 4"):
        admission.take(1, None)
    base()
    assert admission.rows == 0 and not admission.by_adapter  # no adapter's entry outlives its rows
    # the default: half the queue, at least a whole request; an explicit value is checked against both
    assert ServeOptions().queued_rows_per_adapter == 1024
    assert ServeOptions(max_queued_rows=300, max_request_rows=256).queued_rows_per_adapter == 256
    with pytest.raises(ServingError, match=r"max_queued_rows_per_adapter: 100 is out of range; expected in \[256, "):
        ServeOptions(max_queued_rows_per_adapter=100)


def test_a_tenant_at_its_share_of_the_queue_gets_503_and_others_are_served(artefacts):
    from bca_deploy.serving.http import ServerThread, build

    bert = artefacts["bert"]
    # batches wait 1.5 s for company: the first request's 4 rows stay admitted while the others arrive
    app = build(bert["onnx"], threads=1, max_wait_ms=1500, max_queued_rows=8, max_request_rows=4,
                max_queued_rows_per_adapter=4)
    with ServerThread(app, startup_timeout=60) as server, cf.ThreadPoolExecutor(2) as pool:
        url = server.url + "/v1/embeddings"
        held = pool.submit(call, url, "POST", {"input": [[5, 6]] * 4, "adapter": "a0"})
        deadline = time.monotonic() + 30
        while queued_rows(server.url) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, answer = call(url, "POST", {"input": [[5, 6]], "adapter": "a0"})
        assert_error(status, answer, 503, "server_busy", ["adapter 'a0'", "--max-queued-rows-per-adapter"])
        status, answer = call(url, "POST", {"input": [[5, 6]], "adapter": "a1"})
        assert status == 200, answer
        assert held.result(timeout=60)[0] == 200


def queued_rows(url: str) -> float:
    """``bca_queued_rows`` as the server's /metrics has it now."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "bca_queued_rows")



def test_an_adapter_named_as_the_base_model_is_reached_not_shadowed(artefacts, tmp_path):
    """An export directory named after its adapter (``export --bank --adapter runs/a0 --out a0``) made the base
    model's default name ``a0`` too, and requests for the adapter ``a0`` got the base model, 200, without a word
    (helper-77). The default base name now steps aside (``a0-base``); a --served-model-name an adapter has is
    refused."""
    from bca_deploy.errors import ServingError
    from bca_deploy.serving.http import ServerThread, build

    export = tmp_path / "a0"
    shutil.copytree(artefacts["bert"]["onnx"], export)
    with ServerThread(build(export, threads=1, max_wait_ms=1.0)) as server:
        status, models = call(server.url + "/v1/models")
        assert status == 200
        listed = {m["id"]: m.get("parent") for m in models["data"]}
        assert listed["a0-base"] is None and listed["a0"] == "a0-base", listed
        texts = ["the water is hot", "zebra"]
        base = call(server.url + "/v1/embeddings", "POST", {"input": texts})
        adapted = call(server.url + "/v1/embeddings", "POST", {"input": texts, "adapter": "a0"})
        assert base[0] == adapted[0] == 200 and adapted != base, (base, adapted)
        answers = {}
        for model in ("a0", "a0-base"):  # the OpenAI route, by ``model``: the adapter, and the base model
            status, answer = call(server.url + "/v1/embeddings", "POST", {"model": model, "input": texts})
            assert status == 200 and answer["model"] == model, answer
            answers[model] = [item["embedding"] for item in answer["data"]]
        assert answers["a0"] != answers["a0-base"]
    with pytest.raises(ServingError, match="--served-model-name 'a1' is also the name of an adapter in the export"):
        build(export, threads=1, served_model_name="a1")


def test_store_folders_no_request_can_name_are_said_at_start(artefacts, tmp_path):
    """Runs trained into a store as ``exp 2024-01`` or ``-leading`` were missing from its listing without a word
    (helper-77): the server says at start which folders it cannot serve and why; hidden folders are not listed."""
    from bca_deploy.serving.http import build, startup_notes

    art = artefacts["bert"]
    store = tmp_path / "store"
    shutil.copytree(art["store"], store, symlinks=True)
    for name in ("exp 2024-01", "-leading", "ünï", ".git"):
        (store / name).mkdir()
    notes = startup_notes(build(art["onnx"], adapter_store=store, threads=1).state.server)
    said = [n for n in notes if "cannot be served" in n]
    assert len(said) == 1 and said[0].startswith("3 folder(s) of the adapter store cannot be served"), notes
    assert all(repr(name) in said[0] for name in ("exp 2024-01", "-leading", "ünï")) and ".git" not in said[0]
    assert not any("cannot be served" in n for n in startup_notes(build(art["onnx"], adapter_store=art["store"],
                                                                        threads=1).state.server))
