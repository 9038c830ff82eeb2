"""The adapter store's listing (``GET /v1/adapters``; the Ray router's ``GET /v1/models``) runs off the event loop.

Checking every entry of a store of 20,000 adapters took 2.3 s on the event loop: every other request, ``/health``
included, waited behind each listing. Here a listing is made slow on purpose (``AdapterStore.names`` sleeps) and
``/health`` (the Ray router: the event loop itself) must answer meanwhile. A listing of an unchanged store is
reused for a short while; an entry added shows at once, a change inside an entry once that while is over.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call

SLOW_S = 1.5


@pytest.fixture()
def slow_store(tmp_path, tmp_path_factory, monkeypatch):
    """The bert bank, a copy of its store, and ``AdapterStore.names`` taking :data:`SLOW_S` seconds (calls counted)."""
    from bca_deploy.serving import store as store_module

    art = bank("bert", tmp_path_factory)
    store = tmp_path / "store"
    shutil.copytree(art["store"], store)
    real = store_module.AdapterStore.names
    calls = []

    def slow(self):
        calls.append(time.monotonic())
        time.sleep(SLOW_S)
        return real(self)

    monkeypatch.setattr(store_module.AdapterStore, "names", slow)
    return {"onnx": art["onnx"], "store": store, "calls": calls,
            "names": lambda: real(store_module.AdapterStore(store))}


def test_the_store_listing_does_not_hold_up_other_requests(slow_store):
    from bca_deploy.serving.http import ServerThread, build

    store, calls = slow_store["store"], slow_store["calls"]
    with ServerThread(build(slow_store["onnx"], adapter_store=store, threads=1, max_wait_ms=2)) as server:
        answers = {}
        listing = threading.Thread(target=lambda: answers.setdefault("list", call(server.url + "/v1/adapters")))
        listing.start()
        time.sleep(0.4)  # the listing is under way
        started = time.monotonic()
        status, body = call(server.url + "/health")
        waited = time.monotonic() - started
        listing.join()
        assert status == 200 and body["status"] == "ok"
        assert waited < SLOW_S / 2, f"/health waited {waited:.2f} s behind the store's listing"
        status, body = answers["list"]
        assert status == 200 and body["available"] == slow_store["names"]() and "bext" in body["available"]
        assert sorted(a["name"] for a in body["adapters"]) == ["a0", "a1", "a2"]
        # an unchanged store: the listing is reused, the same answer
        count = len(calls)
        assert call(server.url + "/v1/adapters") == (200, body) and len(calls) == count
        # an entry added: listed at once
        shutil.copytree(store / "bext", store / "bext2")
        status, again = call(server.url + "/v1/adapters")
        assert status == 200 and again["available"] == sorted([*body["available"], "bext2"]) and len(calls) == count + 1


def test_a_change_inside_an_entry_shows_once_the_listing_expires(slow_store, monkeypatch):
    from bca_deploy.serving import store as store_module

    monkeypatch.setattr(store_module, "LISTING_TTL_S", 0.2)
    monkeypatch.setattr(store_module, "_LISTINGS", {})
    monkeypatch.setattr(store_module.AdapterStore, "names", lambda self: slow_store["names"]())
    store = slow_store["store"]
    listing = store_module.AdapterStore(store)
    (store / "late").mkdir()
    before = listing.listing()
    assert "late" not in before
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the store's directory itself is unchanged
        shutil.copy(store / "bext" / name, store / "late" / name)
    time.sleep(0.3)
    assert listing.listing() == sorted([*before, "late"]) == slow_store["names"]()


def test_the_ray_routers_model_listing_does_not_block_its_event_loop(slow_store):
    pytest.importorskip("ray.serve")
    from starlette.requests import Request

    from bca_deploy.serving.ray import Router

    router = Router.func_or_class(None, str(slow_store["onnx"]), str(slow_store["store"]), {})

    async def scenario():
        scope = {"type": "http", "method": "GET", "path": "/v1/models", "raw_path": b"/v1/models",
                 "query_string": b"", "headers": [], "root_path": "", "scheme": "http", "http_version": "1.1",
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1)}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        task = asyncio.create_task(router(Request(scope, receive)))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0.2)  # wakes late if the listing holds the loop
        slept = loop.time() - started
        return slept, await task

    slept, response = asyncio.run(scenario())
    assert slept < SLOW_S / 2, f"the router's event loop was held {slept:.2f} s by the store's listing"
    cards = json.loads(response.body)["data"]
    assert [c["id"] for c in cards[1:]] == sorted({"a0", "a1", "a2", *slow_store["names"]()})
