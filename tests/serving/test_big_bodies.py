"""Bodies of many small items are refused or checked without holding the event loop (helper-79's probe, stop 37).

Pydantic validated every body on the event loop, and rows were counted only after it: 700,000 token-id rows took
7 s to be refused (413), 300,000 unknown fields 4 s, 120,000 chat messages 2 s, while /health and every other
tenant's request and stream waited; a refused ``logit_bias`` of 300,000 entries came back whole in a 3.8 MB
error. Tiny Llama bank, loopback only.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call


def test_many_rows_and_many_unknown_fields_are_refused_by_count(tmp_path_factory):
    from bca_deploy.serving import wire
    from bca_deploy.serving.http import ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    validated = []
    validate = wire.validate

    def recording(model, data):
        validated.append(model.__name__)
        return validate(model, data)

    wire.validate = recording
    try:
        with ServerThread(app) as server:
            for path, field in (("/v1/completions", "prompt"), ("/v1/generate", "input")):
                start = time.monotonic()
                status, answer = call(server.url + path, "POST", {"model": "a0", field: [[1]] * 700_000})
                assert status == 413 and f"{field}: 700000 rows" in answer["error"]["message"], (path, answer)
                assert time.monotonic() - start < 30
            assert validated == []  # refused by their count, never validated

            status, answer = call(server.url + "/v1/completions", "POST",
                                  {"model": "a0", "prompt": "hot", **{f"k{i}": 0 for i in range(300_000)}})
            assert status == 400 and answer["error"]["message"].startswith("300,000 fields this request does not take")
            assert answer["error"]["param"] == "k0"

            bias = {str(i): 1 for i in range(300_000)}
            status, answer = call(server.url + "/v1/completions", "POST",
                                  {"model": "a0", "prompt": "hot", "logit_bias": bias})
            assert status == 400 and "logit_bias" in answer["error"]["message"], answer
            assert len(json.dumps(answer)) < 2_000  # described, not echoed

            status, answer = call(server.url + "/v1/completions", "POST",  # a few unknown fields: each named
                                  {"model": "a0", "prompt": "hot", "colour": 1, "size": 2})
            assert status == 400 and "colour" in answer["error"]["message"] and "size" in answer["error"]["message"]
    finally:
        wire.validate = validate


def test_a_big_body_is_validated_off_the_event_loop(tmp_path_factory):
    from bca_deploy.serving import wire
    from bca_deploy.serving.http import ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    threads: dict[str, str] = {}
    validate = wire.validate

    def recording(model, data):
        threads[str(len(data.get("messages", [])))] = threading.current_thread().name
        return validate(model, data)

    wire.validate = recording
    try:
        with ServerThread(app) as server:
            message = {"role": "user", "content": "hot"}
            for count in (2, 60_000):  # 2: inline (a few ms); 60,000 messages (~2 MB): in a worker thread
                status, answer = call(server.url + "/v1/chat/completions", "POST",
                                      {"model": "a0", "max_tokens": 1, "messages": [message] * count})
                assert status in (200, 400), answer
            loop_thread = server._thread.name  # uvicorn's event loop runs in the server's thread
    finally:
        wire.validate = validate
    assert threads["2"] == loop_thread and threads["60000"] != loop_thread, (threads, loop_thread)


def test_one_flat_token_id_list_is_one_row_on_the_native_routes(tmp_path_factory):
    """helper-78: `/v1/generate {"input": [5, 6, 7]}` was a 422 listing four union branches, while OpenAI's `prompt`
    takes a flat list as one prompt; it is now one row, as `[[5, 6, 7]]` is."""
    from bca_deploy.serving.http import ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    with ServerThread(app) as server:
        body = {"adapter": "a0", "max_new_tokens": 4}
        flat = call(server.url + "/v1/generate", "POST", {**body, "input": [5, 6, 7]})
        nested = call(server.url + "/v1/generate", "POST", {**body, "input": [[5, 6, 7]]})
        assert flat[0] == nested[0] == 200, (flat, nested)
        assert flat[1] == nested[1] and len(flat[1]["data"]) == 1, flat
