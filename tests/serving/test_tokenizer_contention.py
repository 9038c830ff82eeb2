"""One tenant's long text never pauses another tenant's streams (helper-79's probe, stop 37).

Six conversations of 125 messages x 32,000 characters (each message within --max-text-chars, 4 MB rendered) held
the session's shared tokenizer copies for 4-5 s each, and the generation engine's detokenizer waited for one of the
same copies: every running stream stopped for ~20 s. The engine now decodes with a copy of its own, and a
conversation that could never fit the context is refused before it is tokenized. Tiny Llama bank, loopback only.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call


def test_streams_go_on_while_every_shared_tokenizer_copy_is_held(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build
    from bca_deploy.serving.session import TOKENIZER_COPIES

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0)
    session = app.state.session
    with ServerThread(app) as server:
        # another tenant's long texts, in the extreme: every shared copy held until the stream below has ended
        held, release = threading.Barrier(TOKENIZER_COPIES + 1), threading.Event()

        def hold() -> None:
            with session._tokenizers.use():
                held.wait(timeout=30)
                release.wait(timeout=120)

        holders = [threading.Thread(target=hold, daemon=True) for _ in range(TOKENIZER_COPIES)]
        for thread in holders:
            thread.start()
        try:
            held.wait(timeout=30)
            body = json.dumps({"model": "a0", "prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0,
                               "stream": True}).encode()
            start = time.monotonic()
            request = urllib.request.Request(server.url + "/v1/completions", body, {"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
            elapsed = time.monotonic() - start
        finally:
            release.set()
            for thread in holders:
                thread.join(timeout=30)
        assert events[-1] == "data: [DONE]"
        text = "".join(c["text"] for e in events[:-1] for c in json.loads(e[6:])["choices"])
        status, whole = call(server.url + "/v1/completions", "POST",
                             {"model": "a0", "prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0})
        assert status == 200 and whole["choices"][0]["text"] == text and text  # the same text, decoded all along
        assert elapsed < 20, elapsed


def test_a_conversation_that_cannot_fit_is_refused_before_it_is_tokenized(tmp_path_factory):
    from bca_deploy.serving.http import CHAT_CHARS_PER_POSITION, ServerThread, build

    art = bank("llama", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=2.0, max_text_chars=2_000)
    session = app.state.session
    limit = max(2_000, CHAT_CHARS_PER_POSITION * session.max_positions)
    calls = []
    text_ids = session.text_ids
    session.text_ids = lambda text, **kw: (calls.append(len(text)), text_ids(text, **kw))[1]
    with ServerThread(app) as server:
        message = {"role": "user", "content": "the water is hot " * 100}  # 1,700 characters, within the limit
        many = {"model": "a0", "max_tokens": 2, "messages": [message] * (limit // 1_700 + 1)}
        status, answer = call(server.url + "/v1/chat/completions", "POST", many)
        assert status == 400, answer
        error = answer["error"]
        assert error["type"] == "context_length_exceeded" and error["param"] == "messages", error
        assert "characters" in error["message"] and f"{limit:,}" in error["message"], error
        assert calls == []  # refused unread
        short = {"model": "a0", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": "hot"}]}
        status, answer = call(server.url + "/v1/chat/completions", "POST", short)
        assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
        assert len(calls) == 1
