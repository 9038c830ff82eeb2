"""One request cannot make the server hold unbounded log-probabilities (``--max-logprob-entries``).

An answer that is not streamed holds every log-probability it lists until it is sent: before, only an echoed prompt's
were bounded, and one completions request of 256 prompts x 120 tokens x ``logprobs`` 20 raised a server's peak RSS by
~150 MB (1,024 tokens: over a GB). Now the request's worst case (rows x (echoed prompt + max_tokens) x (logprobs + 1))
is counted before any work, on the OpenAI routes and the native ``/v1/generate`` alike (one rule,
``openai.check_logprob_entries``), and a streamed answer, which holds a chunk at a time, is held to the same bound for
what a slow reader leaves unread. Against real ``bca-deploy serve`` processes of the tiny Llama (``http_helpers``): one
with ``--max-logprob-entries 20000`` and one with the default; the reference is PyTorch (log_softmax of the same Llama
with the same adapter) and the default server's answer.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import call, free_port, llama_serve, metric_total, openai_client
from http_helpers import llama, llm, server, session, torch_llama  # noqa: F401 - module fixtures
from serving_helpers import row_alone

BOUND = 20_000
ATOL = 1e-4
PROMPTS = ["the water is hot and", "you can see the", "what is", "the day"]
BIG = PROMPTS * 2  # x 120 tokens x (20 + 1) = 20,160 entries: past the bound, 8 rows streamed (168 entries a step)
LONG = [1] + [40] * 99  # a 100-token prompt: echoed with logprobs 20, 2,100 entries per choice
CHAT = [{"role": "user", "content": "what is the water"}]


@pytest.fixture(scope="module")
def bounded(llama, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("logs") / "bounded-serve.log"
    with llama_serve(llama["onnx"], llama["store"], log, "--max-logprob-entries", str(BOUND)) as process:
        yield process


def _engine_work(url: str) -> tuple[float, float]:
    """Prompt tokens prefilled and tokens generated so far: what any row the engine got would add to."""
    return metric_total(url, "bca_prefill_tokens_total"), metric_total(url, "bca_generated_tokens_total")


def _refused(status: int, body: dict, param: str, words: list[str], expected: int = 400) -> str:
    assert status == expected, body  # the native routes' refusals are 422s, the OpenAI routes' 400s
    error = body["error"]
    assert error["param"] == param and error["type"] == "invalid_request", body
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error["message"]


def test_answers_past_the_bound_are_refused_before_the_engine_gets_them(bounded):
    """Completions (8 prompts x 120 tokens x (20 + 1) = 20,160; an echo of 10 x 100 prompt tokens), chat (n 9 x 110 x
    21 = 20,790; n 200 x 110 x 1 with logprobs alone) and the native route (20,160; 10 prompts scored, 21,000) past
    20,000 entries: a 400 naming the fields that asked and what to do, and the engine never prefilled or generated a
    token for them (the native route: 422, as its refusals are)."""
    url = bounded.url
    before = _engine_work(url)
    status, body = call(url + "/v1/completions", "POST", {"model": "a0", "prompt": BIG, "max_tokens": 120,
                                                         "logprobs": 20})
    message = _refused(status, body, "logprobs", ["logprobs 20", "max_tokens 120", "prompt (8 prompt(s))", "n 1",
                                                  "20,160", "20,000", "--max-logprob-entries", '"stream": true'])
    assert "echoed" not in message
    status, body = call(url + "/v1/completions", "POST", {"model": "a0", "prompt": LONG, "max_tokens": 2,
                                                         "logprobs": 20, "echo": True, "n": 10})
    _refused(status, body, "logprobs", ["prompt (1 prompt(s), 100 tokens echoed)", "n 10", "21,420"])
    status, body = call(url + "/v1/chat/completions", "POST", {"model": "a1", "messages": CHAT, "max_tokens": 110,
                                                              "n": 9, "logprobs": True, "top_logprobs": 20})
    _refused(status, body, "top_logprobs", ["logprobs true, top_logprobs 20", "max_tokens 110", "n 9", "20,790"])
    status, body = call(url + "/v1/chat/completions", "POST", {"model": "a1", "messages": CHAT, "logprobs": True,
                                                              "max_completion_tokens": 110, "n": 200})
    _refused(status, body, "logprobs", ["logprobs true", "max_completion_tokens 110", "n 200", "22,000"])
    status, body = call(url + "/v1/generate", "POST", {"adapter": "a0", "input": BIG, "max_new_tokens": 120,
                                                      "logprobs": 20})
    _refused(status, body, "logprobs", ["logprobs 20", "max_new_tokens 120", "input (8 row(s))", "20,160"], 422)
    status, body = call(url + "/v1/generate", "POST", {"adapter": "a0", "input": [LONG] * 10, "max_new_tokens": 1,
                                                      "prompt_logprobs": 20})
    _refused(status, body, "prompt_logprobs", ["prompt_logprobs 20", "input (10 row(s))", "21,000"], 422)
    assert _engine_work(url) == before


def test_a_refused_answer_leaves_other_tenants_answered(bounded):
    """An over-bound request sent beside other tenants' requests: it is refused, theirs are answered."""
    client = openai_client(bounded.url)

    def big(_):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="a0", prompt=BIG, max_tokens=120, logprobs=20)
        return caught.value.body["param"]

    def small(model):
        return client.completions.create(model=model, prompt="the water is", max_tokens=5, temperature=0,
                                         logprobs=2).choices[0].logprobs.tokens

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        bigs = [pool.submit(big, i) for i in range(3)]
        smalls = [pool.submit(small, m) for m in ("a1", "a2", "tiny-llama")]
        assert [f.result() for f in bigs] == ["logprobs"] * 3
        assert all(len(f.result()) == 5 for f in smalls)


def test_an_answer_at_the_bound_is_answered_as_pytorch_and_the_unbounded_server_answer_it(bounded, server, session,
                                                                                            torch_llama):  # noqa: F811
    """8 prompts x 125 tokens x (19 + 1) = 20,000 entries exactly: answered, each token's log-probability and its 19
    alternatives PyTorch's, and the whole answer the one the default-bound server gives."""
    prompts = ["the water", "you can", "what is", "the day"] * 2  # 3 tokens each: 125 more fit in 128 positions
    request = {"model": "a2", "prompt": prompts, "max_tokens": 125, "logprobs": 19, "temperature": 0,
               "ignore_eos": True}
    status, body = call(bounded.url + "/v1/completions", "POST", request)
    assert status == 200, body
    status, reference = call(server.url + "/v1/completions", "POST", request)
    assert status == 200, reference
    assert body["choices"] == reference["choices"] and body["usage"] == reference["usage"]
    vocab = session.tokenizer.get_vocab()
    for choice, text in zip(body["choices"][:4], prompts, strict=False):  # the other 4 are the same rows again
        prompt = session.tokenize([text], truncate=False)[0]
        tokens = [vocab[t] for t in choice["logprobs"]["tokens"]]
        assert len(tokens) == 125
        lp = torch.log_softmax(row_alone(torch_llama, [*prompt, *tokens], "a2")[len(prompt) - 1:-1].double(), dim=-1)
        assert tokens == lp.argmax(-1).tolist()  # greedy
        for j, token in enumerate(tokens):
            assert choice["logprobs"]["token_logprobs"][j] == pytest.approx(lp[j, token].item(), abs=ATOL)
            top = choice["logprobs"]["top_logprobs"][j]
            values, ids = torch.topk(lp[j], 19)
            expected = {session.tokenizer.decode([i], skip_special_tokens=False): v
                        for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
            assert set(top) - set(expected) <= {choice["logprobs"]["tokens"][j]}
            assert [top[k] for k in expected] == pytest.approx(list(expected.values()), abs=ATOL)


def _streamed(client, **request) -> dict[int, dict]:
    choices: dict[int, dict] = {}
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            got = choices.setdefault(choice.index, {"text": "", "tokens": [], "token_logprobs": [],
                                                    "top_logprobs": [], "text_offset": []})
            got["text"] += choice.text
            if choice.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    got[key] += getattr(choice.logprobs, key)
    return choices


def test_a_streamed_answer_past_the_bound_is_answered_as_the_whole_one(bounded, llm, session):  # noqa: F811
    """Streamed, the refused request (20,160 entries) is answered: it holds a chunk at a time. Its tokens and
    log-probabilities are the whole answer's (from the default-bound server), choice by choice; a streamed echo's
    prompts, which each row holds to its end, still count: past the bound refused, just under it answered in full
    (its generated tokens' entries on top are not counted)."""
    request = dict(model="a0", prompt=BIG, max_tokens=120, logprobs=20, temperature=0, extra_body={"ignore_eos": True})
    streamed = _streamed(openai_client(bounded.url), **request)
    whole = llm.completions.create(**request)
    assert len(streamed) == len(whole.choices) == 8
    for choice in whole.choices:
        got = streamed[choice.index]
        assert got["text"] == choice.text and got["tokens"] == choice.logprobs.tokens
        assert got["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=ATOL)
        for mine, theirs in zip(got["top_logprobs"], choice.logprobs.top_logprobs, strict=True):
            assert mine == pytest.approx(theirs, abs=ATOL)
        assert got["text_offset"] == choice.logprobs.text_offset
    status, body = call(bounded.url + "/v1/completions", "POST", {"model": "a0", "prompt": LONG, "max_tokens": 2,
                                                                 "logprobs": 20, "echo": True, "n": 10,
                                                                 "stream": True})
    message = _refused(status, body, "logprobs", ["100 tokens echoed", "n 10", "21,000"])  # the prompts' alone
    assert "max_tokens" not in message and '"stream"' not in message
    echoed = _streamed(openai_client(bounded.url), model="a0", prompt=LONG, max_tokens=10, logprobs=20, echo=True,
                       n=9, temperature=0, extra_body={"ignore_eos": True})  # 18,900 prompt entries: taken
    assert len(echoed) == 9
    for got in echoed.values():
        assert got["text"].startswith(session.decode(LONG)) and len(got["tokens"]) == 100 + 10


def test_a_stream_left_unread_past_the_bound_stops_its_rows(bounded):
    """A client that asks 256 rows x 100 tokens x 21 log-probabilities streamed and reads nothing until its rows are
    done: once more than 20,000 entries wait for it (past what the sockets buffer, up to megabytes), its rows are
    stopped (far fewer tokens generated than asked); reading then, it gets what was queued and a 408 error event; the server answers
    others meanwhile and its queue is free again."""
    body = json.dumps({"model": "a0", "prompt": ["the water is"] * 256, "max_tokens": 100, "logprobs": 20,
                       "ignore_eos": True, "stream": True}).encode()
    generated = metric_total(bounded.url, "bca_generated_tokens_total")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", bounded.port))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        time.sleep(0.5)
        status, answer = call(bounded.url + "/v1/completions", "POST", {"model": "a1", "prompt": "the day",
                                                                       "max_tokens": 3})
        assert status == 200 and len(answer["choices"]) == 1
        # read nothing until the rows are done (stopped, or all generated), well within --body-timeout-s (30 s)
        deadline = time.monotonic() + 20
        while metric_total(bounded.url, "bca_queued_rows") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric_total(bounded.url, "bca_queued_rows") == 0
        assert metric_total(bounded.url, "bca_generated_tokens_total") - generated - 3 < 256 * 100 // 2
        sock.settimeout(60)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    finally:
        sock.close()
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == 408, errors
    assert "--max-logprob-entries (20,000)" in errors[0]["message"]
    tokens = sum(len(c["logprobs"]["tokens"]) for e in events if "choices" in e for c in e["choices"]
                 if c["logprobs"])
    assert 0 < tokens < 256 * 100 // 2


@pytest.mark.parametrize("value, words", [("0", ["--max-logprob-entries: 0 is out of range", ">= 1"]),
                                          ("lots", ["--max-logprob-entries", "'lots' is not a valid integer"])])
def test_a_bad_max_logprob_entries_is_refused_by_name_at_start(llama, value, words):  # noqa: F811
    from click.testing import CliRunner

    from bca_deploy.cli import EXIT_USER_ERROR, main
    from bca_deploy.serving.options import NOT_ON_RAY, ServeOptions

    result = CliRunner().invoke(main, ["serve", str(llama["onnx"]), "--port", str(free_port()),
                                       "--max-logprob-entries", value])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert all(w in result.output for w in words), result.output
    assert "Traceback" not in result.output and "serving" not in result.output
    assert "max_logprob_entries: -5 is out of range; expected >= 1" in _unchecked(max_logprob_entries=-5).problems()
    assert "max_logprob_entries" not in NOT_ON_RAY  # serve-ray offers it; its replicas run the same routes
    assert ServeOptions().max_logprob_entries == 2**20


def _unchecked(**changes):
    """ServeOptions' defaults with ``changes``, not validated (to read its problems)."""
    import dataclasses

    from bca_deploy.serving.options import ServeOptions

    options = object.__new__(ServeOptions)
    for f in dataclasses.fields(ServeOptions):
        object.__setattr__(options, f.name, changes.get(f.name, f.default))
    return options


def test_a_row_counts_its_echoed_prompt_and_its_worst_case_tokens():
    """SamplingParams.logprob_entries: prompt tokens x (prompt_logprobs + 1) + max_new_tokens x (logprobs + 1)."""
    from bca_deploy.serving.decoding import SamplingParams

    assert SamplingParams(max_new_tokens=30, logprobs=20).logprob_entries(7) == 630
    assert SamplingParams(max_new_tokens=3, logprobs=2, prompt_logprobs=4).logprob_entries(10) == 59
    assert SamplingParams(max_new_tokens=3, logprobs=2, prompt_logprobs=4).logprob_entries(10, generated=False) == 50
    assert SamplingParams(max_new_tokens=30).logprob_entries(7) == 0


def test_an_answer_of_many_choices_is_rendered_a_choice_at_a_time():
    """render_answer takes an iterator of choices (what the generation routes hand it): the bytes are Starlette's
    JSONResponse's of the same answer as lists, and each choice is let go once rendered (the answer is never whole as
    Python objects)."""
    import gc
    import weakref

    from starlette.responses import JSONResponse

    from bca_deploy.serving.wire import render_answer

    class Choice(dict):
        pass

    made: list = []

    def choices():
        for i in range(3):
            choice = Choice(index=i, text="caf\u00e9 " * i, logprobs={"top_logprobs": [{"a": -0.5, "\u00e9": -1.25}]})
            made.append(weakref.ref(choice))
            gc.collect()
            assert sum(ref() is not None for ref in made) == 1  # the ones before it are gone
            yield choice

    plain = {"id": "x", "choices": [dict(Choice(index=i, text="caf\u00e9 " * i,
                                                logprobs={"top_logprobs": [{"a": -0.5, "\u00e9": -1.25}]}))
                                    for i in range(3)], "usage": {"total_tokens": 3}}
    rendered = render_answer({"id": "x", "choices": choices(), "usage": {"total_tokens": 3}})
    assert rendered == JSONResponse(plain).body
