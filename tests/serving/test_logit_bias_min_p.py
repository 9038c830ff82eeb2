"""OpenAI's ``logit_bias`` and vLLM's ``min_p`` in generation serving.

Both used to be refused with a 400 on ``/v1/completions`` and ``/v1/chat/completions`` (``logit_bias: ... is not
supported (logit bias is not implemented)``, ``min_p: 0.1 is not supported``), ``SamplingParams`` had neither field,
``MultiAdapterSession.generate`` and ``/v1/generate`` took neither, and a ``generation_config.json`` ``min_p`` was named
at start as not applied: every test here fails on that code.

References are independent of the serving code, on the tiny Llama of ``http_helpers.py`` (word tokenizer, three
exported adapters):

- ``logit_bias``: transformers ``model.generate(do_sample=False, logits_processor=[...])`` of each prompt alone under
  :func:`bca_deploy.inject.mixed_adapters`, with a ``LogitsProcessor`` that adds the bias (then, for a row with a
  repetition penalty too, transformers' ``RepetitionPenaltyLogitsProcessor``: vLLM's order, bias first);
- ``min_p``: transformers' ``TemperatureLogitsWarper`` then ``MinPLogitsWarper`` (and ``TopKLogitsWarper`` /
  ``TopPLogitsWarper`` in vLLM's order) on random logits, ties included; sampling with ``min_p`` 1 is transformers'
  greedy ``generate``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import call, continuation, openai_client, reference_llama  # noqa: E402
from http_helpers import llama, llm, server, session  # noqa: E402,F401 - module fixtures
from serving_helpers import run_in_waves  # noqa: E402

from bca_deploy.inject import mixed_adapters  # noqa: E402
from bca_deploy.serving import MultiAdapterSession  # noqa: E402
from bca_deploy.serving.decoding import Sampler, choose_tokens, token_logprobs  # noqa: E402
from bca_deploy.serving.engine import SamplingParams, SamplingParamsError  # noqa: E402
from bca_deploy.serving.session import GenerationDefaults  # noqa: E402

TIMEOUT = 60.0
TEXT = "the water is hot and the water is"


def _bias_processor(bias: dict[int, float], repetition: float):
    from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

    class Bias(LogitsProcessor):
        """OpenAI's logit_bias: the bias added to each named token's logit (then the repetition penalty, vLLM's
        order)."""

        def __call__(self, input_ids, scores):
            scores = scores.clone()
            for token, value in bias.items():
                scores[:, token] += value
            if repetition != 1.0:
                scores = RepetitionPenaltyLogitsProcessor(repetition)(input_ids, scores)
            return scores

    return Bias()


@functools.cache
def _hf_generate(root: str, prompt: tuple[int, ...], adapter: str | None, new: int,
                 bias: tuple[tuple[int, float], ...], repetition: float) -> list[int]:
    from transformers import LogitsProcessorList

    model = reference_llama(root)
    ids = torch.tensor([list(prompt)])
    with torch.no_grad(), mixed_adapters(model, [adapter]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, repetition_penalty=None,
                             logits_processor=LogitsProcessorList([_bias_processor(dict(bias), repetition)]))
    return out[0, len(prompt):].tolist()


def hf_generate(llama, prompt, adapter, new, bias=None, repetition_penalty=1.0) -> list[int]:
    """transformers' greedy ``generate`` of ``prompt`` alone through ``adapter``, ``bias`` added to the logits."""
    return _hf_generate(str(llama["root"]), tuple(prompt), adapter, new, tuple(sorted((bias or {}).items())),
                        float(repetition_penalty))


def chat_ids(llama, messages) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama["onnx"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


# ---- min_p: the filter is transformers' MinPLogitsWarper ------------------------------------------------------------


def _warped(logits: np.ndarray, temperature: float, min_p: float, top_k: int = 0, top_p: float = 1.0,
            vllm_order: bool = True) -> np.ndarray:
    """softmax of transformers' warpers over ``logits`` (V,): temperature, then min-p, top-k, top-p (vLLM's order)
    or temperature, top-k, top-p, min-p (transformers' own)."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.from_numpy(logits.astype(np.float64)).unsqueeze(0)
    cut = [TopKLogitsWarper(top_k)] if top_k else []
    cut += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    mp = [MinPLogitsWarper(min_p)] if min_p else []
    for warper in [TemperatureLogitsWarper(temperature), *(mp + cut if vllm_order else cut + mp)]:
        scores = warper(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


def test_min_p_filters_as_transformers_min_p_warper_after_the_temperature():
    """The distribution a sampled row draws from (``Sampler.distribution``) is softmax(MinPLogitsWarper(logits / T)):
    the same tokens kept (ties kept or dropped together) and the same probabilities, for random logits with ties and
    temperatures either side of 1; greedy rows beside it take the raw argmax."""
    rng = np.random.default_rng(0)
    checked = dropped_ties = 0
    for trial in range(60):
        vocab = int(rng.integers(5, 300))
        logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 6)).astype(np.float32)
        logits[rng.integers(0, vocab, size=vocab // 3)] = logits[rng.integers(0, vocab)]  # ties, often at the cut
        if trial % 4 == 0:
            logits[:3] = logits.max()  # a tie for the top
        temperature = float(rng.choice([0.3, 0.7, 1.0, 1.6]))
        min_p = float(rng.choice([0.01, 0.05, 0.2, 0.5, 0.9, 1.0]))
        ours = Sampler(SamplingParams(do_sample=True, seed=1, temperature=temperature, min_p=min_p)).distribution(
            logits)
        expected = _warped(logits, temperature, min_p)
        assert np.array_equal(ours > 0, expected > 0), (trial, temperature, min_p)
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-12)
        checked += 1
        kept = logits[ours > 0]
        dropped_ties += bool(np.isin(logits[ours == 0], kept).any())  # never: a tie is kept or dropped together
    assert checked == 60 and dropped_ties == 0


def test_min_p_comes_before_top_k_and_top_p_as_in_vllm():
    """With top-k and top-p, min-p is applied first (vLLM's sampler: temperature, min-p, then top-k/top-p over what
    min-p kept), which differs from transformers' order (top-k, top-p, then min-p) where top-p is on."""
    rng = np.random.default_rng(1)
    differs = 0
    for trial in range(40):
        logits = (rng.standard_normal(64) * 2).astype(np.float32)
        top_k, top_p = int(rng.choice([0, 5, 20])), float(rng.choice([1.0, 0.5, 0.8]))
        params = SamplingParams(do_sample=True, seed=1, temperature=0.8, min_p=0.1, top_k=top_k, top_p=top_p)
        ours = Sampler(params).distribution(logits)
        expected = _warped(logits, 0.8, 0.1, top_k, top_p)
        assert np.array_equal(ours > 0, expected > 0), trial
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-12)
        differs += not np.array_equal(ours > 0, _warped(logits, 0.8, 0.1, top_k, top_p, vllm_order=False) > 0)
    assert differs  # the order matters where top-p is on


def test_sampling_with_min_p_one_is_greedy(llama):
    """min_p 1 keeps the most likely token alone: seeded sampling at any temperature is transformers' greedy
    ``generate``, for rows of different adapters in one batch; a sampled row without min_p is not."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = session.tokenize([TEXT])[0]
    adapters = ["a0", "a1", None, "a2"]
    out = session.generate([prompt] * 4, adapters, max_new_tokens=12, do_sample=True, temperature=[0.7, 1.5, 1.0, 2.0],
                           seed=[1, 2, 3, 4], min_p=1.0)
    assert out == [hf_generate(llama, prompt, a, 12) for a in adapters]
    plain = session.generate([prompt] * 4, adapters, max_new_tokens=12, do_sample=True, temperature=2.0,
                             seed=[1, 2, 3, 4])
    assert plain != out


# ---- logit_bias: the engine, rows of different adapters and settings in one batch ---------------------------------


def test_biased_rows_joining_a_running_batch_match_transformers(llama):
    """Rows with different adapters, biases and penalties join a running batch at steps 0 and 3: a +100 bias gives
    that token at every step; a -100 bias bans the token greedy decoding picks; small biases and a bias with a
    repetition penalty (bias first, as vLLM) are transformers' ``generate`` with a bias processor, token for token;
    unbiased rows beside them stay plain ``generate``'s."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompt = session.tokenize([TEXT])[0]
    other = session.tokenize(["you can see the day"])[0]
    water = session.tokenize(["water"])[0][-1]
    plain_a1 = hf_generate(llama, prompt, "a1", 10)
    banned = plain_a1[0]
    small = {int(t): b for t, b in zip(hf_generate(llama, other, "a2", 4)[1:3], (-2.5, -1.0))}
    small[int(water)] = 1.5
    waves = {
        0: [(prompt, "a0", 10, {"logit_bias": {str(water): 100}}, {}),
            (prompt, "a1", 10, {"logit_bias": {banned: -100}}, {}),
            (prompt, "a1", 10, {}, {}),  # the same row unbiased, beside it
            (other, "a2", 10, {"logit_bias": small}, {})],
        3: [(other, None, 8, {"logit_bias": {int(water): 4.0}, "repetition_penalty": 1.4}, {}),
            (other, "a0", 8, {}, {}),
            (prompt, "a2", 8, {"logit_bias": {2: -100, banned: 3}, "do_sample": True, "seed": 3, "min_p": 1.0}, {})],
    }
    streams, results = run_in_waves(session, waves, lambda engine, job: engine.submit(
        job[0], job[1], SamplingParams(max_new_tokens=job[2], **job[3])), timeout=TIMEOUT * 2)
    jobs = [job for k in sorted(waves) for job in waves[k]]
    assert results[0].token_ids == [water] * 10
    assert banned not in results[1].token_ids and results[2].token_ids == plain_a1
    changed = 0
    for (p, adapter, n, kw, _), result in zip(jobs, results, strict=True):
        bias = {int(t): float(b) for t, b in (kw.get("logit_bias") or {}).items()}
        expected = hf_generate(llama, p, adapter, n, bias, kw.get("repetition_penalty", 1.0))
        assert result.token_ids == expected, (adapter, kw)
        changed += bool(bias) and expected != hf_generate(llama, p, adapter, n)
    assert changed == 5, changed  # every bias changed its row's answer
    assert any(s.started_at < streams[4].started_at < s.finished_at for s in streams[:4])  # they shared steps


def test_choose_tokens_puts_the_logits_back_and_costs_unbiased_rows_nothing():
    """``choose_tokens`` biases the biased rows' ids in place and puts them back (the caller's logits, from which the
    raw log-probabilities are read, are unchanged), together with penalties and ``min_tokens`` masks on the same ids;
    a biased sampled row draws what the same seed draws from logits biased by hand."""
    rng = np.random.default_rng(2)
    vocab = 40
    biased = Sampler(SamplingParams(do_sample=True, seed=9, temperature=0.9, min_p=0.05,
                                    logit_bias={"3": 5.0, "7": -100, "11": 2.5}, repetition_penalty=1.3,
                                    min_tokens=2, stop_token_ids=[7]), prompt=[3, 11])
    same_seed = Sampler(SamplingParams(do_sample=True, seed=9, temperature=0.9, min_p=0.05))
    greedy = Sampler(SamplingParams())
    seen = [3, 11]
    for step in range(6):
        logits = rng.standard_normal((2, vocab)).astype(np.float32) * 2
        before = logits.copy()
        tokens, failures = choose_tokens(logits, [greedy, biased])
        assert not failures and np.array_equal(logits, before)
        assert tokens[0] == int(before[0].argmax())
        row = torch.from_numpy(before[1].copy())
        row[torch.tensor([3, 7, 11])] += torch.tensor([5.0, -100.0, 2.5])
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[torch.tensor(seen)] = True
        row = torch.where(mask, torch.where(row < 0, row * 1.3, row / 1.3), row)
        if step < 2:
            row[7] = -float("inf")
        assert tokens[1] == same_seed.draw(row.numpy()), step
        seen.append(tokens[1])
        # the raw distribution: log-probabilities of the logits as they came
        (item,) = token_logprobs(logits, [1], [tokens[1]], [0])
        assert item.logprob == pytest.approx(float(torch.log_softmax(torch.from_numpy(before[1]).double(), -1)[
            tokens[1]]), abs=1e-5)


# ---- ranges -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "words"), [
    ({"x": 1}, "'x'"), ({"-1": 1}, "'-1'"), ({"05": 1}, "'05'"), ({"5": 100.5}, "'5'"), ({"5": True}, "'5'"),
    ({"5": "1"}, "'5'"), ({"5": float("nan")}, "'5'"), ({str(i): 1 for i in range(301)}, "at most 300"),
    ([5, 1], "object"), ("5", "object")])
def test_sampling_params_refuse_logit_bias_outside_openais_rules(value, words):
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(logit_bias=value)
    assert caught.value.fields == ["logit_bias"] and words in str(caught.value)


@pytest.mark.parametrize("value", [-0.1, 1.01, True, "0.1", float("nan"), None])
def test_sampling_params_refuse_min_p_outside_0_1(value):
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(min_p=value)
    assert caught.value.fields == ["min_p"]


@pytest.mark.parametrize("key", [str(2**63), "9" * 5000, 2**70])
def test_a_decimal_key_past_int64_is_named_as_too_large_not_as_not_decimal(key):
    """A key that is a plain decimal integer, only too large for any token id, was told it is "not a token id (an
    integer >= 0 written in decimal)", which it is; now the message says what is wrong with it (and a 5000-digit key
    is not converted: CPython's int() refuses strings past 4300 digits)."""
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(logit_bias={key: 1})
    message = str(caught.value)
    assert caught.value.fields == ["logit_bias"] and f"past the largest token id, {2**63 - 1}" in message
    assert "not a token id" not in message and len(message) < 300
    # a key that is not plain decimal says how one is written
    with pytest.raises(SamplingParamsError, match="no sign, spaces or leading zeros"):
        SamplingParams(logit_bias={"+5": 1})


def test_sampling_params_take_logit_bias_at_openais_bounds():
    bias = {str(i): (-100 if i % 2 else 100) for i in range(300)}
    params = SamplingParams(logit_bias=bias, min_p=1)
    assert len(params.logit_bias) == 300 and params.logit_bias[0] == (0, 100.0) and params.min_p == 1.0
    assert SamplingParams(logit_bias={}).logit_bias is None and SamplingParams(min_p=0).min_p == 0.0
    assert SamplingParams(logit_bias={7: 1, "3": -2.5}).logit_bias == ((3, -2.5), (7, 1.0))


# ---- the routes ---------------------------------------------------------------------------------------------------


def stream_text(chunks) -> str:
    return "".join((c.choices[0].text if hasattr(c.choices[0], "text") else c.choices[0].delta.content or "")
                   for c in chunks if c.choices)


def test_openai_routes_serve_logit_bias_and_min_p(llm, llama, session):
    """/v1/completions and /v1/chat/completions through the ``openai`` client, streamed and not, requests of several
    adapters at once: greedy answers with ``logit_bias`` are transformers' ``generate`` with the bias; sampled
    answers with ``min_p`` 1 are greedy ones; log-probabilities stay the raw distribution's (vLLM's default)."""
    prompt = session.tokenize([TEXT])[0]
    water = session.tokenize(["water"])[0][-1]
    messages = [{"role": "user", "content": "the water is hot and the water is hot"}]
    chat_prompt = chat_ids(llama, messages)

    def banned(p, adapter):
        return {str(hf_generate(llama, p, adapter, 1)[0]): -100, str(water): 2.0}

    jobs = [("completions", "a0", {str(water): 100}), ("completions", "a1", banned(prompt, "a1")),
            ("chat", "a2", banned(chat_prompt, "a2")), ("chat", "a0", {str(water): 100})]

    def ask(job, stream):
        route, adapter, bias = job
        kw = {"model": adapter, "max_tokens": 8, "temperature": 0, "logit_bias": bias, "stream": stream}
        if route == "completions":
            answer = llm.completions.create(prompt=TEXT, **kw)
            return stream_text(answer) if stream else answer.choices[0].text
        answer = llm.chat.completions.create(messages=messages, **kw)
        return stream_text(answer) if stream else answer.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda js: ask(*js), [(job, s) for job in jobs for s in (False, True)]))
    for i, (route, adapter, bias) in enumerate(jobs):
        ids = prompt if route == "completions" else chat_prompt
        tokens = hf_generate(llama, ids, adapter, 8, {int(t): float(b) for t, b in bias.items()})
        assert tokens != hf_generate(llama, ids, adapter, 8)
        assert texts[2 * i] == texts[2 * i + 1] == continuation(session, ids, tokens), (route, adapter)
    assert hf_generate(llama, prompt, "a0", 8, {water: 100}) == [water] * 8

    # min_p 1: sampled (seeded, hot) answers are the greedy ones, both routes, streamed or not
    for route in ("completions", "chat"):
        ids = prompt if route == "completions" else chat_prompt
        greedy = continuation(session, ids, hf_generate(llama, ids, "a1", 8))
        for stream in (False, True):
            kw = {"model": "a1", "max_tokens": 8, "temperature": 1.8, "seed": 4, "stream": stream,
                  "extra_body": {"min_p": 1.0}}
            if route == "completions":
                answer = llm.completions.create(prompt=TEXT, **kw)
                text = stream_text(answer) if stream else answer.choices[0].text
            else:
                answer = llm.chat.completions.create(messages=messages, **kw)
                text = stream_text(answer) if stream else answer.choices[0].message.content
            assert text == greedy, (route, stream)

    # log-probabilities: the raw distribution's (the bias is not in them, as in vLLM's default raw_logprobs)
    plain = llm.completions.create(model="a0", prompt=TEXT, max_tokens=1, temperature=0, logprobs=3)
    forced = llm.completions.create(model="a0", prompt=TEXT, max_tokens=1, temperature=0, logprobs=3,
                                    logit_bias={str(water): 100})
    assert forced.choices[0].text == continuation(session, prompt, [water]) != plain.choices[0].text
    # the same 3 most likely tokens with the same numbers (forced's also lists its chosen token, not among them)
    assert plain.choices[0].logprobs.top_logprobs[0].items() <= forced.choices[0].logprobs.top_logprobs[0].items()
    assert forced.choices[0].logprobs.token_logprobs[0] < plain.choices[0].logprobs.token_logprobs[0]


def test_openai_routes_refuse_bad_logit_bias_and_min_p_naming_the_field(llm, server):
    messages = [{"role": "user", "content": "hi"}]
    cases = [({"logit_bias": {"hot": 1}}, "logit_bias", "'hot'"), ({"logit_bias": {"128": 1}}, "logit_bias", "'128'"),
             ({"logit_bias": {"5": 101}}, "logit_bias", "'5'"), ({"logit_bias": {"5": True}}, "logit_bias", "'5'"),
             ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "300"),
             ({"logit_bias": [5]}, "logit_bias", ""),
             ({"min_p": 1.5}, "min_p", ""), ({"min_p": -0.1}, "min_p", ""), ({"min_p": True}, "min_p", "")]
    for extra, field, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            llm.completions.create(model="a0", prompt="the day", max_tokens=2, extra_body=extra)
        assert caught.value.body["param"] == field and words in caught.value.body["message"], (extra, caught.value.body)
        with pytest.raises(openai.BadRequestError) as caught:
            llm.chat.completions.create(model="a0", messages=messages, max_tokens=2, extra_body=extra)
        assert caught.value.body["param"] == field and words in caught.value.body["message"], (extra, caught.value.body)
        status, answer = call(server.url + "/v1/generate", "POST", {"input": "the day", "max_new_tokens": 2, **extra})
        assert status in (400, 422) and answer["error"]["param"] == field, (extra, answer)
    # neutral values and null: the plain answer
    plain = llm.completions.create(model="a0", prompt="the day", max_tokens=4, temperature=0)
    same = llm.completions.create(model="a0", prompt="the day", max_tokens=4, temperature=0,
                                  extra_body={"logit_bias": {}, "min_p": 0})
    nulls = llm.completions.create(model="a0", prompt="the day", max_tokens=4, temperature=0,
                                   extra_body={"logit_bias": None, "min_p": None})
    assert same.choices[0].text == nulls.choices[0].text == plain.choices[0].text


def test_native_generate_and_session_take_min_p_and_logit_bias(llama, server, session):
    """``/v1/generate`` and ``MultiAdapterSession.generate`` take the same fields: per row in the session."""
    prompt = session.tokenize([TEXT])[0]
    water = session.tokenize(["water"])[0][-1]
    status, answer = call(server.url + "/v1/generate", "POST",
                          {"input": [prompt], "adapter": "a2", "max_new_tokens": 6, "logit_bias": {str(water): 100}})
    assert status == 200 and answer["data"][0]["token_ids"] == [water] * 6, answer
    status, answer = call(server.url + "/v1/generate", "POST",
                          {"input": [prompt], "adapter": "a2", "max_new_tokens": 6, "do_sample": True,
                           "temperature": 1.9, "seed": 3, "min_p": 1})
    assert status == 200 and answer["data"][0]["token_ids"] == hf_generate(llama, prompt, "a2", 6), answer
    out = session.generate([prompt, prompt], ["a0", "a1"], max_new_tokens=5,
                           logit_bias=[{water: 100}, None])
    assert out == [[water] * 5, hf_generate(llama, prompt, "a1", 5)]
    with pytest.raises(SamplingParamsError) as caught:
        session.generate([prompt], ["a0"], max_new_tokens=2, logit_bias={128: 1})
    assert caught.value.fields == ["logit_bias"]


# ---- generation_config.json's min_p is the OpenAI routes' default, as vLLM reads it --------------------------------


def test_generation_config_min_p_is_the_openai_default(llama, tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build, startup_notes

    directory = tmp_path_factory.mktemp("min-p-config") / "onnx"
    shutil.copytree(llama["onnx"], directory)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                                  "min_p": 1.0}))
    defaults = GenerationDefaults.read(directory / "generation_config.json")
    assert defaults.min_p == 1.0 and defaults.problems == () and defaults.applied == {"min_p": 1.0}
    app = build(directory, threads=1, served_model_name="tiny-llama")
    notes = startup_notes(app.state.server)
    assert not any("not apply" in n for n in notes) and any("min_p 1" in n for n in notes), notes
    session = app.state.session
    prompt = session.tokenize([TEXT])[0]
    greedy = continuation(session, prompt, hf_generate(llama, prompt, None, 8))
    with ServerThread(app, startup_timeout=TIMEOUT) as running:
        client = openai_client(running.url, timeout=TIMEOUT)
        for extra in ({}, {"min_p": None}):  # left out or null: the file's min_p 1, so sampling is greedy
            answer = client.completions.create(model="tiny-llama", prompt=TEXT, max_tokens=8, temperature=1.9,
                                               seed=2, extra_body=extra)
            assert answer.choices[0].text == greedy
        own = client.completions.create(model="tiny-llama", prompt=TEXT, max_tokens=8, temperature=1.9, seed=2,
                                        extra_body={"min_p": 0})
        assert own.choices[0].text != greedy


# ---- an output layer narrower than the embedding: ids past the logits' width --------------------------------------


def _narrow_logits_export(llama, root: Path, width: int, symbolic: bool = False) -> Path:
    """A copy of the tiny Llama export whose graph's ``logits`` keep their first ``width`` columns (a Slice after the
    output layer): the embedding still takes every id of the vocabulary (128), a step scores ``width`` of them.
    ``symbolic``: the Slice's end is computed from the input's shape (``width`` + 0 x batch) and the output's last
    dimension is named, not given, so that neither the graph nor onnxruntime's shape inference states the width."""
    import onnx
    from onnx import TensorProto, helper

    export = root / ("narrow-symbolic" if symbolic else "narrow")
    shutil.copytree(llama["onnx"], export)
    model = onnx.load(str(export / "model.onnx"))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logits_all" if name == "logits" else name for name in node.output]
    for name, value in (("narrow_starts", 0), ("narrow_ends", width), ("narrow_axes", -1), ("narrow_zero", 0)):
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    ends = "narrow_ends"
    if symbolic:
        graph.node.extend([helper.make_node("Shape", ["input_ids"], ["narrow_shape"], start=0, end=1),
                           helper.make_node("Mul", ["narrow_shape", "narrow_zero"], ["narrow_none"]),
                           helper.make_node("Add", ["narrow_none", "narrow_ends"], ["narrow_computed"])])
        ends = "narrow_computed"
    graph.node.append(helper.make_node("Slice", ["logits_all", "narrow_starts", ends, "narrow_axes"], ["logits"]))
    logits = next(o for o in graph.output if o.name == "logits")
    if symbolic:
        logits.type.tensor_type.shape.dim[-1].dim_param = "narrow_vocab"
    else:
        logits.type.tensor_type.shape.dim[-1].dim_value = width
    onnx.save(model, str(export / "model.onnx"))
    return export


def test_a_logit_bias_id_past_the_logits_width_is_refused_by_name(llama, tmp_path):  # noqa: F811
    """An export whose output layer scores 120 ids while its embedding takes 128: a ``logit_bias`` (or
    ``stop_token_ids``) id in 120..127 biases (or ends) nothing, as no step can choose it. It used to be skipped
    silently (the penalties' rule, right for them: they count prompt ids, which may lie there); now it is refused
    naming the id and the bound, as vLLM refuses an id past the model's vocabulary size, on the engine and
    ``MultiAdapterSession.generate`` alike. A prompt id there is still taken, and an id below 120 still biases."""
    from bca_deploy.serving.engine import GenerationEngine

    session = MultiAdapterSession(_narrow_logits_export(llama, tmp_path, 120), intra_op_threads=1)
    assert session.vocabulary == 128
    prompt = [1, 40, 125, 41]  # 125: an id the embedding takes
    with pytest.raises(SamplingParamsError) as caught:
        session.generate([prompt], ["a0"], max_new_tokens=2, logit_bias={125: 5, 7: 1})
    assert caught.value.fields == ["logit_bias"] and "'125'" in str(caught.value) and "120" in str(caught.value)
    assert "'7'" not in str(caught.value)
    engine = GenerationEngine(session)
    for params, field in ((SamplingParams(logit_bias={"121": -100}), "logit_bias"),
                          (SamplingParams(stop_token_ids=[119, 127]), "stop_token_ids")):
        with pytest.raises(SamplingParamsError) as caught:
            engine.check(prompt, "a0", params)
        assert caught.value.fields == [field] and "120" in str(caught.value), str(caught.value)
    assert session.generate([prompt], ["a0"], max_new_tokens=3, logit_bias={119: 100}) == [[119] * 3]
    assert session.logits_width == session.generated_vocabulary == 120


def test_a_logit_bias_id_past_a_symbolic_logits_width_is_refused_by_name(llama, tmp_path):  # noqa: F811
    """The same narrower output layer where the graph does not state the logits' width (its last dimension named, the
    Slice's end computed): the width was taken as unknown, so a ``logit_bias`` id in 120..127 went through to bias
    nothing, as before the rule. Now the width is read from one step of the graph (at the engine's start) and the id
    is refused naming the bound; an id below it still biases."""
    from bca_deploy.serving.engine import GenerationEngine

    export = _narrow_logits_export(llama, tmp_path, 120, symbolic=True)
    session = MultiAdapterSession(export, intra_op_threads=1)
    assert all(o.shape[-1] != 120 for o in session.session.get_outputs() if o.name == "logits")  # not stated
    engine = GenerationEngine(session)
    prompt = [1, 40, 125, 41]
    with pytest.raises(SamplingParamsError) as caught:
        engine.check(prompt, "a0", SamplingParams(logit_bias={"125": 100}))
    assert caught.value.fields == ["logit_bias"] and "'125'" in str(caught.value) and "120" in str(caught.value)
    assert session.generate([prompt], ["a0"], max_new_tokens=3, logit_bias={119: 100}) == [[119] * 3]
    assert session.logits_width == session.generated_vocabulary == 120


def test_logits_wider_than_the_vocabulary_never_give_an_id_past_it(llama, tmp_path):  # noqa: F811
    """An export whose output layer is padded past the vocabulary (136 columns for 128 ids, the 8 extra ones scoring
    +50, as a padded head's columns can): a step chose id 128, and the next step failed in the graph's embedding
    (onnxruntime's Gather error, a 500). Now the columns past the vocabulary are cut (vLLM cuts the logits to the
    model's vocabulary): the tokens are transformers' greedy ones for the unpadded model, and the tokens' and the
    prompt's log-probabilities are PyTorch's log_softmax over the 128 ids, on the engine and
    ``MultiAdapterSession.generate`` alike."""
    import onnx
    from onnx import TensorProto, helper

    from bca_deploy.serving.engine import GenerationEngine

    export = tmp_path / "wide"
    shutil.copytree(llama["onnx"], export)
    model = onnx.load(str(export / "model.onnx"))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logits_all" if name == "logits" else name for name in node.output]
    graph.initializer.extend([helper.make_tensor("wide_pads", TensorProto.INT64, [6], [0, 0, 0, 0, 0, 8]),
                              helper.make_tensor("wide_value", TensorProto.FLOAT, [], [50.0])])
    graph.node.append(helper.make_node("Pad", ["logits_all", "wide_pads", "wide_value"], ["logits"]))
    next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value = 136
    onnx.save(model, str(export / "model.onnx"))
    session = MultiAdapterSession(export, intra_op_threads=1)
    assert session.vocabulary == 128 and session.logits_width == 136
    prompt = [1, 40, 41, 42]
    want = hf_generate(llama, prompt, "a0", 4)
    assert session.generate([prompt], ["a0"], max_new_tokens=4) == [want]

    async def main():
        engine = GenerationEngine(session)
        await engine.start()
        try:
            return await engine.submit(prompt, "a0", SamplingParams(max_new_tokens=4, logprobs=2,
                                                                    prompt_logprobs=1)).collect()
        finally:
            await engine.stop()

    result = asyncio.run(asyncio.wait_for(main(), 60))
    assert result.token_ids == want
    reference = reference_llama(str(llama["root"]))
    ids = torch.tensor([[*prompt, *want]])
    with torch.no_grad(), mixed_adapters(reference, ["a0"]):
        lp = torch.log_softmax(reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double(), -1)
    full = [*prompt, *want]
    for t, item in enumerate([*result.prompt_logprobs, *result.logprobs], start=1):
        assert item.token_id == full[t]
        assert item.logprob == pytest.approx(lp[t - 1, full[t]].item(), abs=1e-4), t
        assert [i for i, _ in item.top] == torch.topk(lp[t - 1], len(item.top)).indices.tolist(), t
