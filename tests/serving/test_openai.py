"""The OpenAI-compatible API with the official ``openai`` client against a real ``bca-deploy serve`` process.

Each server is started with the CLI on 127.0.0.1 (see ``http_helpers.ServeProcess``) from a tiny adapter-bank
export; every answer is compared with the in-process :class:`~bca_deploy.serving.MultiAdapterSession`
result for its adapter (which ``tests/serving/test_session.py`` checks against PyTorch). ``/metrics`` is
parsed with prometheus_client's text parser and its counters are checked against the requests sent.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import ServeProcess, assert_error, bank, call, continuation, llama_serve, openai_client

from bca_deploy.serving import MultiAdapterSession

TEXTS = ["the water is hot", "you can see the day", "zebra", "how many people know this word"]
ADAPTERS = ["a0", "a1", "a2", None]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bank("bert", tmp_path_factory)


@pytest.fixture(scope="module")
def bert_server(bert, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "bert-serve.log"
    with ServeProcess(bert["onnx"], "--adapter-store", str(bert["store"]), "--served-model-name", "tiny-bert",
                      "--max-wait-ms", "20", log=log) as server:
        yield server


@pytest.fixture(scope="module")
def bert_session(bert):
    session = MultiAdapterSession(bert["onnx"], intra_op_threads=1)
    session.register("bext", bert["store"] / "bext")
    return session


@pytest.fixture(scope="module")
def client(bert_server):
    return openai_client(bert_server.url, timeout=60)


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the server's /metrics, read with prometheus_client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_count(samples, endpoint: str, status: str, adapter: str, method: str = "POST") -> float:
    key = ("bca_requests_total", tuple(sorted({"endpoint": endpoint, "method": method, "status": status,
                                               "adapter": adapter}.items())))
    return samples.get(key, 0.0)


# ---- models and embeddings -------------------------------------------------------------------------------


def test_models_lists_the_base_model_and_loaded_adapters(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["tiny-bert", "a0", "a1", "a2"]
    cards = {m.id: m for m in models.data}
    assert cards["a1"].owned_by == "bca-deploy" and cards["a1"].parent == "tiny-bert"
    assert client.models.retrieve("a2").id == "a2"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.body["type"] == "unknown_adapter" and "a0" not in caught.value.body["message"]


def test_embeddings_per_adapter_concurrently_equal_the_session(client, bert_session):
    # every adapter and the base model (by its served name and by "__base__"), text and token-id input, at once
    jobs = [(a if a is not None else name, TEXTS[i % 4:i % 4 + 2]) for i, a in enumerate(ADAPTERS * 3)
            for name in (("tiny-bert",) if i % 2 else ("__base__",))]
    jobs += [("a1", [[5, 9, 17, 33], [40, 41]])]

    def embed(model, rows):
        return client.embeddings.create(model=model, input=rows)  # the client asks for base64 and decodes it

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: embed(*job), jobs))
    for (model, rows), answer in zip(jobs, answers, strict=True):
        adapter = None if model in ("tiny-bert", "__base__") else model
        expected = bert_session.embed(rows, [adapter] * len(rows), pooling="mean", normalize=True)
        got = np.array([d.embedding for d in sorted(answer.data, key=lambda d: d.index)])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert answer.model == model
        tokens = sum(len(r) for r in bert_session.prepare(rows))
        assert answer.usage.prompt_tokens == tokens == answer.usage.total_tokens
    # the adapters matter
    base = bert_session.embed(TEXTS, [None] * 4, normalize=True)
    assert np.abs(bert_session.embed(TEXTS, ["a0"] * 4, normalize=True) - base).max() > 1e-2


def test_float_encoding_and_native_body_on_the_same_route(bert_server, bert_session):
    status, body = call(bert_server.url + "/v1/embeddings", "POST",
                        {"model": "a2", "input": "the water is hot", "encoding_format": "float"})
    assert status == 200, body
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    expected = bert_session.embed(["the water is hot"], ["a2"], normalize=True)[0]
    np.testing.assert_allclose(body["data"][0]["embedding"], expected, atol=1e-5, rtol=0)
    # the native shape (no "model") keeps its own fields and defaults: mean pooling, not normalized
    status, body = call(bert_server.url + "/v1/embeddings", "POST", {"input": ["the water is hot"], "adapter": "a2"})
    assert status == 200, body
    np.testing.assert_allclose(body["data"][0]["embedding"],
                               bert_session.embed(["the water is hot"], ["a2"])[0], atol=1e-5, rtol=0)


def test_errors_are_typed_openai_exceptions(client, bert_server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="not-loaded", input="hi")
    assert caught.value.status_code == 404 and caught.value.body["type"] == "unknown_adapter"
    assert caught.value.body["param"] == "model" and "a0" not in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="a0", input="hi", dimensions=7)
    assert caught.value.body["param"] == "dimensions" and "32" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="a0", input="hi", extra_body={"not_a_field": 1})
    assert "not_a_field" in caught.value.body["message"]
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model="a0", input=["x"] * 257)  # --max-request-rows 256 by default
    assert caught.value.status_code == 413 and caught.value.body["type"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="a0", prompt="hi")  # an encoder export: no generation
    assert caught.value.body["type"] == "wrong_task"
    status, body = call(bert_server.url + "/v1/no-such-route")
    assert_error(status, body, 404, "not_found")


@pytest.mark.parametrize("value, where", [("", "input"), ([], "input"), (["hi", ""], "input[1]"),
                                          ([[]], "input[0]"), ([[7, 8], []], "input[1]")])
def test_an_empty_embeddings_input_is_refused_as_openai_refuses_it(client, value, where):
    """OpenAI's embeddings refuse an empty input and an empty text or token list in it (param "input"; 400 as every
    invalid field here): the vector of no text is not a thing a client meant to ask for."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="a0", input=value)
    assert caught.value.body["type"] == "invalid_request" and caught.value.body["param"] == "input"
    assert caught.value.body["message"].startswith(where + ": "), caught.value.body


# ---- loading and unloading through vLLM's routes -----------------------------------------------------------


def test_load_and_unload_lora_adapter_aliases(client, bert_server, bert_session):
    url = bert_server.url
    status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "bext"})
    assert status == 200, body
    assert body["adapter"]["name"] == "bext" and body["adapter"]["source"] == "store"
    try:
        assert "bext" in [m.id for m in client.models.list().data]
        answer = client.embeddings.create(model="bext", input=TEXTS)
        np.testing.assert_allclose([d.embedding for d in answer.data],
                                   bert_session.embed(TEXTS, ["bext"] * 4, normalize=True), atol=1e-5, rtol=0)
        status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "bext"})
        assert_error(status, body, 409, "adapter_exists", ["bext"])
        # vLLM's lora_path: a store name (loaded under lora_name), never a path
        status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "bext2", "lora_path": "bext"})
        assert status == 200, body
        answer = client.embeddings.create(model="bext2", input=TEXTS[:1])
        np.testing.assert_allclose(answer.data[0].embedding, bert_session.embed(TEXTS[:1], ["bext"], normalize=True)[0],
                                   atol=1e-5, rtol=0)
    finally:
        for name in ("bext", "bext2"):
            call(url + "/v1/unload_lora_adapter", "POST", {"lora_name": name})
    assert [m.id for m in client.models.list().data] == ["tiny-bert", "a0", "a1", "a2"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="bext", input="hi")
    for path in (str(Path(bert_server.url).parent), "/etc", "../store/bext", "~/x", "bext/../bext"):
        status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "x", "lora_path": path})
        assert_error(status, body, 400)  # (the native route answers 422; OpenAI's routes 400, as vLLM)
    for body, field in (({"lora_name": "x", "lora_path": ".."}, "lora_path"), ({"lora_name": "x", "lora_path": ""}, "lora_path"),
                        ({"lora_name": ".."}, "lora_name"), ({"lora_name": "tiny-bert"}, "lora_name")):
        status, answer = call(url + "/v1/load_lora_adapter", "POST", body)
        assert_error(status, answer, 400)
        assert answer["error"]["param"] == field, (body, answer)  # vLLM's field names, not the native route's
    status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "misfit"})
    assert_error(status, body, 400, "adapter_does_not_fit")
    status, body = call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "nothing-here"})
    assert_error(status, body, 404, "unknown_adapter")
    assert "bext" not in body["error"]["message"]  # the store's other entries are not listed
    status, body = call(url + "/v1/unload_lora_adapter", "POST", {"lora_name": "bext"})
    assert_error(status, body, 404, "unknown_adapter")


# ---- metrics ---------------------------------------------------------------------------------------------


def test_metrics_count_the_requests_sent(client, bert_server):
    url = bert_server.url
    before = metric_samples(url)
    sent = {"a0": 3, "a1": 2, "__base__": 2}
    for model, n in sent.items():
        for _ in range(n):
            client.embeddings.create(model=model if model != "__base__" else "tiny-bert", input=TEXTS[:2])
    for _ in range(4):  # unknown names: counted under one label, not one series per name
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model=f"ghost-{_}", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="a0", input="hi", dimensions=3)
    after = metric_samples(url)

    def delta(endpoint, status, adapter, method="POST"):
        return requests_count(after, endpoint, status, adapter, method) - \
            requests_count(before, endpoint, status, adapter, method)

    for adapter, n in sent.items():
        assert delta("/v1/embeddings", "200", adapter) == n, adapter
    assert delta("/v1/embeddings", "404", "__unknown__") == 4
    assert not any(dict(labels).get("adapter", "").startswith("ghost") for _, labels in after)
    assert delta("/v1/embeddings", "400", "a0") == 1
    errors = ("bca_request_errors_total", tuple(sorted({"endpoint": "/v1/embeddings", "status": "404",
                                                         "type": "unknown_adapter", "adapter": "__unknown__"}.items())))
    assert after[errors] - before.get(errors, 0.0) == 4
    # latency histogram: one observation per request on the route; batch rows: every row counted once
    count = ("bca_request_duration_seconds_count", (("endpoint", "/v1/embeddings"),))
    assert after[count] - before.get(count, 0.0) == sum(sent.values()) + 5
    rows = ("bca_batch_rows_sum", (("kind", "embed"),))
    assert after[rows] - before.get(rows, 0.0) == 2 * sum(sent.values())
    assert after[("bca_adapters_loaded", ())] == 3
    assert after[("bca_queued_rows", ())] == 0


# ---- completions and chat (the tiny Llama with a word-level tokenizer and a chat template) ------------------

PROMPTS = ["the water is hot and", "you can see the", "how many people know", "what is this word"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return bank("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def llama_server(llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "llama-serve.log"
    with llama_serve(llama["onnx"], llama["store"], log) as server:
        yield server


@pytest.fixture(scope="module")
def llama_session(llama):
    return MultiAdapterSession(llama["onnx"], intra_op_threads=1)


@pytest.fixture(scope="module")
def llm(llama_server):
    return openai_client(llama_server.url)


def expected_completion(session, ids: list[int], adapter: str | None, n: int, stop: list[str] = ()):
    """(text, finish_reason, completion tokens) of greedy decoding in-process, cut at the first stop string."""
    tokens = session.generate([ids], [adapter], max_new_tokens=n)[0]
    text = continuation(session, ids, tokens)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        # the engine stops at the token that completes the stop string: count the tokens up to it
        for k in range(1, len(tokens) + 1):
            if any(s in continuation(session, ids, tokens[:k]) for s in stop):
                return text[:min(hits)], "stop", k
    eos = tokens and tokens[-1] in session.eos_token_ids
    return text, "stop" if eos else "length", len(tokens)


def chat_ids(session, messages) -> list[int]:
    tokenizer = session.tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_completions_per_adapter_concurrently_equal_the_session(llm, llama_session):
    jobs = [(model, PROMPTS[i % 4]) for i, model in enumerate(["a0", "a1", "a2", "tiny-llama", "__base__"] * 2)]

    def complete(model, prompt):
        return llm.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)

    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda job: complete(*job), jobs))
    texts = set()
    for (model, prompt), answer in zip(jobs, answers, strict=True):
        adapter = None if model in ("tiny-llama", "__base__") else model
        ids = llama_session.tokenize([prompt], truncate=False)[0]
        text, finish, n = expected_completion(llama_session, ids, adapter, 8)
        assert answer.choices[0].text == text and answer.choices[0].finish_reason == finish, (model, prompt)
        assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == n
        assert answer.object == "text_completion" and answer.model == model
        texts.add((prompt, text))
    assert len(texts) > len(PROMPTS)  # the adapters change the answers


def test_completions_stream_and_stop_strings(llm, llama_session):
    ids = llama_session.tokenize([PROMPTS[0]], truncate=False)[0]
    full, _, _ = expected_completion(llama_session, ids, "a1", 12)
    words = full.split()
    assert len(words) >= 4, full
    stop = [words[2]]
    text, finish, n = expected_completion(llama_session, ids, "a1", 12, stop)
    chunks = list(llm.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish] == ["stop"]
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(ids)
    answer = llm.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop)
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == "stop"
    # several prompts in one request: one choice each, in order
    answer = llm.completions.create(model="a2", prompt=PROMPTS[:3], max_tokens=5, temperature=0)
    for choice, prompt in zip(answer.choices, PROMPTS[:3], strict=True):
        ids = llama_session.tokenize([prompt], truncate=False)[0]
        assert choice.text == expected_completion(llama_session, ids, "a2", 5)[0]


def test_chat_completions_through_the_template(llm, llama_session):
    messages = [{"role": "system", "content": "you are a word"}, {"role": "user", "content": "what is the day"}]
    ids = chat_ids(llama_session, messages)
    for model in ("a0", "a2", "tiny-llama"):
        adapter = None if model == "tiny-llama" else model
        text, finish, n = expected_completion(llama_session, ids, adapter, 10)
        answer = llm.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
        assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
        assert answer.choices[0].finish_reason == finish
        assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == n
        chunks = list(llm.chat.completions.create(model=model, messages=messages, max_completion_tokens=10,
                                                  temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == finish


def test_sampling_is_seeded_and_differs_from_greedy(llm):
    kwargs = dict(model="a1", prompt=PROMPTS[1], max_tokens=10, temperature=1.3, seed=11)
    first = llm.completions.create(**kwargs).choices[0].text
    assert llm.completions.create(**kwargs).choices[0].text == first
    others = {llm.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(12, 16)}
    assert len(others | {first}) > 1


def test_a_vanishing_temperature_is_greedy_and_fails_no_other_request(llm):
    """temperature 1e-310 is in OpenAI's range [0, 2]: its row samples the argmax (the same text as temperature 0),
    and requests decoding beside it are answered (it used to fail every row of its steps with a 500)."""
    import concurrent.futures

    def ask(temperature, prompt, model):
        return llm.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=temperature,
                                      seed=5).choices[0].text

    jobs = [(1e-310, PROMPTS[0], "a1"), (0, PROMPTS[1], "a0"), (0, PROMPTS[2], None), (5e-324, PROMPTS[3], "a2")]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: ask(job[0], job[1], job[2] or "tiny-llama"), jobs))
    assert texts == [ask(0, prompt, model or "tiny-llama") for _, prompt, model in jobs]


def test_generation_refusals_are_typed(llm, llama, tmp_path_factory):
    for extra, field in (({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"),
                         ({"presence_penalty": 2.5}, "presence_penalty"),  # served: refused outside [-2, 2] only
                         ({"logit_bias": {"5": 101}}, "logit_bias"),  # served: refused outside [-100, 100] only
                         ({"max_tokens": 0}, "max_tokens"),
                         ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"), ({"max_tokens": 5000}, "max_tokens"),
                         ({"top_p": 0}, "top_p"),
                         # a JSON number is a number: not a boolean (lax float took true as 1.0), not a string
                         ({"extra_body": {"temperature": True}}, "temperature"),
                         ({"extra_body": {"temperature": "0.5"}}, "temperature"),
                         ({"extra_body": {"top_p": "0.5"}}, "top_p"),
                         ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options")):
        with pytest.raises(openai.BadRequestError) as caught:
            llm.completions.create(model="a0", prompt="the day", temperature=0, **extra)
        assert caught.value.body["param"] == field, (extra, caught.value.body)
        if extra.get("max_tokens") == 0:  # no token and no prompt: taken with echo only (vLLM's rule)
            assert '"echo": true' in caught.value.body["message"], caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        llm.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}],
                                    tools=[{"type": "function", "function": {"name": "f"}}])
    assert caught.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as caught:  # the message used to be the param
        llm.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                    max_completion_tokens=4)
    assert caught.value.body["param"] == "max_completion_tokens"
    # a context overflow is what OpenAI and vLLM answer: 400 (the client's BadRequestError) of type
    # context_length_exceeded whose message says "maximum context length", by which clients recognise it (and trim)
    for create, field in ((lambda: llm.completions.create(model="a0", prompt="the day", max_tokens=127), "max_tokens"),
                          (lambda: llm.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}],
                                                               max_completion_tokens=127), "max_completion_tokens"),
                          (lambda: llm.completions.create(model="a0", prompt=[5] * 130, max_tokens=1), "prompt")):
        with pytest.raises(openai.BadRequestError) as caught:
            create()
        assert caught.value.body["param"] == field and caught.value.body["type"] == "context_length_exceeded"
        assert caught.value.type == "context_length_exceeded" and "maximum context length" in str(caught.value)
    for prompt in ([5, 10**6], [[5], []]):  # token ids outside the vocabulary, an empty row: the field is named
        with pytest.raises(openai.BadRequestError) as caught:
            llm.completions.create(model="a0", prompt=prompt, max_tokens=2)
        assert caught.value.body["param"] == "prompt", caught.value.body
    # neutral values of unsupported fields and harmless OpenAI fields are accepted
    answer = llm.completions.create(model="a0", prompt="the day", max_tokens=3, temperature=0, n=1, presence_penalty=0,
                                    frequency_penalty=0, logprobs=None, user="someone", extra_body={"metadata": {}})
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        llm.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    # an export whose tokenizer has no chat template: a clear 400, completions still work
    log = tmp_path_factory.mktemp("logs") / "plain-serve.log"
    with ServeProcess(llama["no_template"], log=log) as plain:
        client = openai_client(plain.url)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}])
        assert "chat template" in caught.value.body["message"]
        assert client.completions.create(model="a0", prompt="hi", max_tokens=2).choices


def test_generation_metrics(llm, llama_server):
    before = metric_samples(llama_server.url)
    answers = [llm.completions.create(model="a2", prompt=p, max_tokens=6, temperature=0) for p in PROMPTS]
    after = metric_samples(llama_server.url)
    tokens = sum(a.usage.completion_tokens for a in answers)
    key = ("bca_generated_tokens_total", (("adapter", "a2"),))
    assert after[key] - before.get(key, 0.0) == tokens
    ttft = ("bca_time_to_first_token_seconds_count", ())
    assert after[ttft] - before.get(ttft, 0.0) == len(PROMPTS)
    itl = ("bca_inter_token_latency_seconds_count", ())
    assert after[itl] - before.get(itl, 0.0) == tokens - len(PROMPTS)
    assert requests_count(after, "/v1/completions", "200", "a2") - \
        requests_count(before, "/v1/completions", "200", "a2") == len(PROMPTS)
    # one request at a time, each prompt short: one prefill run each, of exactly its prompt's tokens
    runs = ("bca_prefill_run_seconds_count", ())
    assert after[runs] - before.get(runs, 0.0) == len(PROMPTS)
    prefilled = ("bca_prefill_tokens_total", ())
    assert after[prefilled] - before.get(prefilled, 0.0) == sum(a.usage.prompt_tokens for a in answers)


def test_n_seeded_choices_are_each_seed_alone_from_one_prefill_row(llm, llama_server):
    """``n``=4 sampled with seed 21, whole and streamed: choice j is the text of the prompt sampled alone with seed
    21 + j (the same bytes), and the request's prefill ran the prompt once (``bca_prefill_tokens_total``)."""
    kwargs = dict(model="a1", prompt=PROMPTS[0], max_tokens=8, temperature=1.3)
    alone = [llm.completions.create(**kwargs, seed=21 + j) for j in range(4)]
    before = metric_samples(llama_server.url)
    whole = llm.completions.create(**kwargs, seed=21, n=4)
    after = metric_samples(llama_server.url)
    prefilled = ("bca_prefill_tokens_total", ())
    assert after[prefilled] - before.get(prefilled, 0.0) == alone[0].usage.prompt_tokens
    streamed = ["", "", "", ""]
    for chunk in llm.completions.create(**kwargs, seed=21, n=4, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    texts = [a.choices[0].text for a in alone]
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == texts
    assert streamed == texts
    assert len(set(texts)) > 1  # the seeds really differ


@pytest.mark.parametrize(("path", "stream"), [("/v1/completions", False), ("/v1/generate", False),
                                              ("/v1/completions", True)], ids=["completions", "generate", "streamed"])
def test_a_client_that_leaves_before_its_whole_answer_stops_its_rows(llama_server, llama_session, path, stream):
    """A client that closes its connection (a client timeout, a killed process), streaming or not, gets its rows
    stopped at the next step; the log and the metrics say 499 (a stream's status line said 200 already, but
    the answer was never whole), and the log has the tokens generated until then."""
    import json
    import socket
    import time

    # as many rows as a request may have, four batches' worth: the whole answer takes several times longer than
    # seeing the close does (one batch of these runs its 120 steps in about 0.3 s on the 2-core CI machine)
    prompts = [f"{p} {i}" for i in range(256) for p in PROMPTS[:1]]
    max_tokens = 120  # the room left after the prompt in the 128 positions
    if path == "/v1/completions":
        body = {"model": "a1", "prompt": prompts, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    else:
        body = {"adapter": "a1", "input": prompts, "max_new_tokens": max_tokens}
    ids = [llama_session.tokenizer(p)["input_ids"] for p in prompts]
    whole = sum(len(t) for t in llama_session.generate(ids, ["a1"] * len(ids), max_new_tokens=max_tokens))
    key = ("bca_generated_tokens_total", (("adapter", "a1"),))
    samples = metric_samples(llama_server.url)
    before, closed_before = samples.get(key, 0.0), requests_count(samples, path, "499", "a1")
    prefilled = ("bca_prefill_tokens_total", ())
    prefilled_before = samples.get(prefilled, 0.0)
    logged_before = len(llama_server.log.read_text().splitlines())
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", llama_server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        if stream:  # the answer has started: its status line and some tokens are out
            received = b""
            while received.count(b"data: {") < 3:
                received += sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200")
        else:  # the first rows are decoding: their prompts were prefilled (tokens are counted when a row ends)
            deadline = time.monotonic() + 60
            while metric_samples(llama_server.url).get(prefilled, 0.0) == prefilled_before and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
    def logged() -> list[dict]:
        lines = llama_server.log.read_text().splitlines()[logged_before:]
        return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("path") == path]

    deadline = time.monotonic() + 60
    while True:  # the rows leave (nothing admitted stays queued or running) and the request is recorded
        samples, mine = metric_samples(llama_server.url), logged()
        # the token counter moves on the engine's thread when it drops the rows, a moment after the 499 is logged
        left = samples[("bca_queued_rows", ())] == 0 and requests_count(samples, path, "499", "a1") > closed_before \
            and mine and samples.get(key, 0.0) - before >= mine[0].get("completion_tokens", 0)
        if left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    generated = samples.get(key, 0.0) - before
    assert samples[("bca_queued_rows", ())] == 0
    assert generated < whole / 2, f"{generated} of {whole} tokens generated for a client that left"
    assert requests_count(samples, path, "499", "a1") == closed_before + 1
    assert [e["status"] for e in mine] == [499] and mine[0]["error_type"] == "client_closed_request"
    # the log has the tokens made until the client left (the counter also has those of the step it left during)
    assert mine[0]["completion_tokens"] <= generated
    if stream:
        assert mine[0]["completion_tokens"] > 0
    assert "never retrieved" not in llama_server.log.read_text()  # an ordinary client action logs no traceback


def test_a_full_queue_answers_503_with_retry_after(llama):
    """Rows past --max-queued-rows get a typed 503 at once, with ``retry-after`` (the openai client's backoff
    reads it), while the rows that hold the queue are answered."""
    import json
    import urllib.request

    from bca_deploy.serving.http import ServerThread, build

    app = build(llama["onnx"], threads=1, max_queued_rows=4, max_request_rows=4)
    with ServerThread(app, startup_timeout=60) as server:
        body = {"model": "a0", "prompt": PROMPTS, "max_tokens": 100, "temperature": 0, "stream": True}
        req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as holding:
            assert holding.readline().startswith(b"data: ")  # its 4 rows hold the queue now
            client = openai_client(server.url, timeout=60)
            with pytest.raises(openai.InternalServerError) as caught:
                client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=2)
            rest = holding.read()
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.body["type"] == "server_busy" and "--max-queued-rows" in caught.value.body["message"]
        assert rest.endswith(b"data: [DONE]\n\n")


def test_an_embedding_request_whose_client_leaves_stops_between_its_batches(bert):
    """256 rows run as 256 one-row batches here; the client leaves after the first few: the rest never run,
    the request counts as 499, and the server answers the next client."""
    import json
    import socket
    import time

    from bca_deploy.serving.http import ServerThread, build

    app = build(bert["onnx"], threads=1, max_batch_rows=1, max_wait_ms=0)
    rows = [[5 + i % 50] * 60 for i in range(256)]
    with ServerThread(app, startup_timeout=60) as server:
        payload = json.dumps({"model": "a0", "input": rows}).encode()
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        while requests_count(metric_samples(server.url), "/v1/embeddings", "499", "a0") < 1:
            assert time.monotonic() < deadline, "the request was never counted as 499"
            time.sleep(0.05)
        # a batch already in onnxruntime when the client left still finishes (its rows stop at the next step):
        # wait until the count holds still (a request still running would never let it), then nothing more runs
        ran, settled = app.state.batcher.batches, time.monotonic()
        while time.monotonic() - settled < 0.1:
            assert time.monotonic() < deadline, "batches kept running after the request was counted as 499"
            time.sleep(0.01)
            if app.state.batcher.batches != ran:
                ran, settled = app.state.batcher.batches, time.monotonic()
        time.sleep(0.3)
        assert app.state.batcher.batches == ran < 256  # nothing of it runs after it was counted
        status, body = call(server.url + "/v1/embeddings", "POST", {"model": "a0", "input": [[5, 6]]})
        assert status == 200 and len(body["data"]) == 1


def test_a_request_task_cancelled_by_its_host_counts_as_499(bert):
    """Ray Serve cancels a replica's request task when its client disconnects: the request is the client's
    doing (499), not a server error (500)."""
    import asyncio

    from bca_deploy.serving.http import build

    app = build(bert["onnx"], threads=1)
    server = app.state.server
    guard = next(m for m in app.user_middleware if m.cls.__name__ == "_Guard")
    started = asyncio.Event()

    async def slow_app(scope, receive, send):
        started.set()
        await asyncio.sleep(60)

    async def main():
        handler = guard.cls(slow_app, **guard.kwargs)
        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [], "state": {}}

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            pass

        task = asyncio.create_task(handler(scope, receive, send))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    samples = {(s.name, s.labels.get("status")): s.value for family in server.metrics.registry.collect()
               for s in family.samples if s.name == "bca_requests_total"}
    assert samples == {("bca_requests_total", "499"): 1.0}


def test_null_sampling_fields_mean_their_defaults(llama_server):
    """OpenAI's schema lets temperature, top_p, n and stream be null (clients generated from it send null for a
    value left unset): the answer is the one without them. Nullable-only-where-OpenAI's-is stays refused."""
    url = llama_server.url
    for route, base in (("/v1/completions", {"model": "a1", "prompt": PROMPTS[0], "max_tokens": 4}),
                        ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 4})):
        status, plain = call(url + route, "POST", {**base, "temperature": 0})
        assert status == 200, plain
        nulls = {"temperature": 0, "top_p": None, "n": None, "stream": None, "seed": None, "stop": None}
        status, answer = call(url + route, "POST", {**base, **nulls})
        assert status == 200, answer
        assert answer["choices"] == plain["choices"] and answer["usage"] == plain["usage"]
        # temperature null is the default, 1.0: sampled, so seeded runs agree with an explicit 1.0
        status, one = call(url + route, "POST", {**base, "temperature": 1.0, "seed": 7})
        status, null = call(url + route, "POST", {**base, "temperature": None, "seed": 7})
        assert status == 200 and null["choices"] == one["choices"], null
    status, body = call(url + "/v1/completions", "POST", {"model": "a1", "prompt": "hi", "prompt_extra": None})
    assert_error(status, body, 400, "invalid_request", ["prompt_extra"])
