"""Sampling penalties in generation serving, as vLLM applies them: ``repetition_penalty`` (vLLM's extension,
transformers' ``RepetitionPenaltyLogitsProcessor``), ``frequency_penalty`` and ``presence_penalty`` (OpenAI's).

References are independent of the serving code, on the tiny Llama of ``http_helpers.py`` (word tokenizer, three
exported adapters, ``extra`` in its store):

- transformers ``model.generate(do_sample=False, repetition_penalty=r)`` of each prompt alone (no padding) under
  :func:`bca_deploy.inject.mixed_adapters`;
- a hand loop over the PyTorch model's logits (the whole sequence run again at every step) that penalizes the last
  position's logits with dense torch tensors (a mask of the prompt and output, ``bincount`` of the output) and takes
  the argmax: frequency and presence penalties, and the repetition penalty together with them.

Rows join a running batch at chosen decode steps (a blocking observer, ``StepGate``), never by timing. Before these
penalties were served, every route refused a non-neutral value (400/422 "penalties are not implemented"), the
engine's ``SamplingParams`` had no such fields, and a ``generation_config.json`` ``repetition_penalty`` was named
at start as not applied: each test here fails on that code.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, continuation, openai_client, reference_llama  # noqa: E402
from serving_helpers import StepGate, run_in_waves  # noqa: E402

from bca_deploy.inject import mixed_adapters  # noqa: E402
from bca_deploy.serving import MultiAdapterSession  # noqa: E402
from bca_deploy.serving.decoding import Sampler, choose_tokens  # noqa: E402
from bca_deploy.serving.engine import GenerationEngine, SamplingParams, SamplingParamsError  # noqa: E402
from bca_deploy.serving.session import GenerationDefaults  # noqa: E402

TIMEOUT = 60.0
EOS = {2}  # the tiny Llama's (config.json and the tokenizer's </s>)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return bank("llama", tmp_path_factory)


@functools.cache
def _hf_generate(root: str, prompt: tuple[int, ...], adapter: str | None, new: int, penalty: float,
                 config_dir: str | None = None) -> list[int]:
    model = reference_llama(root, ("extra",))
    ids = torch.tensor([list(prompt)])
    kwargs = {"repetition_penalty": penalty}
    if config_dir is not None:  # the checkpoint's own generation config (its repetition_penalty), greedy
        from transformers import GenerationConfig

        kwargs = {"generation_config": GenerationConfig.from_pretrained(config_dir)}
    with torch.no_grad(), mixed_adapters(model, [adapter]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def hf_generate(llama, prompt, adapter, new, repetition_penalty=1.0, config_dir=None) -> list[int]:
    """transformers' greedy ``generate(repetition_penalty=...)`` of ``prompt`` alone through ``adapter``."""
    return _hf_generate(str(llama["root"]), tuple(prompt), adapter, new, float(repetition_penalty),
                        None if config_dir is None else str(config_dir))


@functools.cache
def _hand_loop(root: str, prompt: tuple[int, ...], adapter: str | None, new: int, r: float, f: float,
               p: float) -> list[int]:
    model = reference_llama(root, ("extra",))
    ids, out = list(prompt), []
    for _ in range(new):
        x = torch.tensor([ids])
        with torch.no_grad(), mixed_adapters(model, [adapter]):
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
        vocab = logits.shape[-1]
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[torch.tensor(ids)] = True  # prompt and output: the repetition penalty's tokens
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float()
        logits = logits - f * counts - p * (counts > 0).float()  # OpenAI's definitions, over the output only
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in EOS:
            break
    return out


def hand_loop(llama, prompt, adapter, new, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    """Greedy tokens of ``prompt`` alone with the penalties computed by hand on PyTorch's logits, step by step."""
    return _hand_loop(str(llama["root"]), tuple(prompt), adapter, new, float(repetition_penalty),
                      float(frequency_penalty), float(presence_penalty))


def reference(llama, prompt, adapter, new, penalties: dict) -> list[int]:
    """transformers' ``generate`` where only the repetition penalty is on, else the hand loop."""
    if set(penalties) <= {"repetition_penalty"}:
        return hf_generate(llama, prompt, adapter, new, penalties.get("repetition_penalty", 1.0))
    return hand_loop(llama, prompt, adapter, new, **penalties)


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts of 5..11 ids drawn from 12 (so they repeat ids, and the repetition penalty has the prompt to act on)."""
    rng = np.random.default_rng(seed)
    pool = rng.choice(np.arange(3, 128), size=12, replace=False)
    return [[int(t) for t in rng.choice(pool, size=int(rng.integers(5, 12)))] for _ in range(n)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT * 2))


# ---- the engine: every row of a mixed, staggered batch is its own reference -----------------------------------


def test_the_hand_loop_is_transformers_repetition_penalty(llama):
    """The independent reference agrees with transformers where both apply (the repetition penalty alone)."""
    for prompt, adapter, r in zip(repetitive_prompts(3, seed=7), ("a0", None, "a2"), (1.3, 0.8, 2.0)):
        assert hand_loop(llama, prompt, adapter, 10, repetition_penalty=r) == hf_generate(llama, prompt, adapter, 10, r)


def test_rows_with_their_own_penalties_joining_a_running_batch_match_their_references(llama):
    """Rows with different adapters (one loaded while the batch decodes) and different penalties join at steps 0, 2
    and 5: each row's greedy tokens equal transformers' ``generate(repetition_penalty=r)`` for the prompt alone, or
    the hand loop (frequency/presence). Rows sharing a prompt and adapter with penalized rows, without penalties,
    stay plain ``generate``'s: no row's counts touch another's."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompts = repetitive_prompts(6, seed=3)
    waves = {
        0: [(prompts[0], "a0", 14, {"repetition_penalty": 1.3}),
            (prompts[0], "a0", 14, {}),  # the same row unpenalized, beside it
            (prompts[1], "a1", 12, {"repetition_penalty": 0.8}),  # < 1: repeats are favoured
            (prompts[2], None, 12, {"presence_penalty": 1.5})],
        2: [(prompts[3], "a2", 10, {"repetition_penalty": 2.0}),
            (prompts[4], "a0", 14, {"frequency_penalty": 0.7, "presence_penalty": 0.3}),
            (prompts[5], "extra", 12, {"repetition_penalty": 1.3, "frequency_penalty": -0.5}),  # loaded at step 2
            (prompts[5], "extra", 12, {})],
        5: [(prompts[1], "a1", 12, {"repetition_penalty": 1.05}),
            (prompts[2], None, 12, {"frequency_penalty": 2.0, "repetition_penalty": 1.2}),
            (prompts[3], "a2", 8, {"presence_penalty": -1.0, "frequency_penalty": -2.0}),
            (prompts[4], "a0", 10, {})],
    }

    async def load_extra(k: int) -> None:  # a load while rows decode: the rows that join after use it
        if k == 2:
            await asyncio.to_thread(session.register, "extra", llama["store"] / "extra")

    streams, results = run_in_waves(session, waves, lambda engine, job: engine.submit(
        job[0], job[1], SamplingParams(max_new_tokens=job[2], **job[3])), max_batch_rows=12, before_wave=load_extra,
        timeout=TIMEOUT * 2)
    jobs = [job for k in sorted(waves) for job in waves[k]]
    changed = 0
    for (prompt, adapter, n, kw), result in zip(jobs, results, strict=True):
        assert result.token_ids == reference(llama, prompt, adapter, n, kw), (prompt, adapter, kw)
        changed += bool(kw) and result.token_ids != hf_generate(llama, prompt, adapter, n)
    assert changed >= 7, changed  # the penalties changed what most penalized rows generate
    for wave_start in (4, 8):  # later waves shared steps with rows that started before them
        assert any(s.started_at < streams[wave_start].started_at < s.finished_at for s in streams[:wave_start])


def test_a_preempted_row_keeps_its_counts(llama):
    """Tenant a1 holds both rows of the batch with frequency/presence penalties; a row of a0 arriving after step 3
    pre-empts one. Re-admitted, its prompt and tokens are prefilled again, and its penalties still count its output
    as output (not as prompt): its tokens stay the hand loop's for the row alone."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    penalties = {"frequency_penalty": 0.9, "presence_penalty": 0.4, "repetition_penalty": 1.1}
    # rows that run their 30 tokens (no end-of-sequence token), so that both still hold the batch at step 3
    long = [p for p in repetitive_prompts(12, seed=11) if len(hand_loop(llama, p, "a1", 30, **penalties)) == 30]
    if len(long) < 2:
        pytest.skip("not enough prompts without an end-of-sequence token")
    prompts = [*long[:2], repetitive_prompts(1, seed=12)[0]]
    gate = StepGate(steps=[3])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=2, observer=gate, preempt_wait_steps=2)
        await engine.start()
        try:
            with engine._cond:  # both rows wait before the engine admits any (it must not step one alone meanwhile)
                heavy = [engine.submit(p, "a1", SamplingParams(max_new_tokens=30, **penalties)) for p in prompts[:2]]
            await gate.paused()
            light = engine.submit(prompts[2], "a0", SamplingParams(max_new_tokens=4, presence_penalty=2.0))
            gate.go()
            return [await s.collect() for s in [*heavy, light]], [*heavy, light]
        finally:
            gate.go()
            await engine.stop()

    results, streams = run(main())
    assert [v["rows"] for v in gate.of("step")[:3]] == [2, 2, 2]  # both rows held the batch when the third came
    assert sum(s.preemptions for s in streams[:2]) >= 1, "no row was pre-empted"
    assert results[2].token_ids == hand_loop(llama, prompts[2], "a0", 4, presence_penalty=2.0)
    for prompt, result in zip(prompts[:2], results[:2], strict=True):
        assert result.token_ids == hand_loop(llama, prompt, "a1", 30, **penalties)


def test_sampled_rows_draw_from_the_penalized_logits_and_greedy_neighbours_are_untouched():
    """``choose_tokens`` on its own: a seeded sampled row with penalties draws what the same seed draws from logits
    penalized by hand (torch, dense), step after step as its counts grow; an unpenalized greedy row beside it takes
    the raw argmax, and the caller's logits are not changed."""
    rng = np.random.default_rng(0)
    vocab, prompt = 50, [3, 4, 4, 9]
    params = SamplingParams(do_sample=True, seed=5, temperature=0.7, top_k=20, repetition_penalty=1.4,
                            frequency_penalty=0.6, presence_penalty=-0.3)
    sampler = Sampler(params, prompt)
    plain = Sampler(SamplingParams(do_sample=True, seed=5, temperature=0.7, top_k=20))  # the same generator
    greedy = Sampler(SamplingParams())
    out: list[int] = []
    for _ in range(20):
        logits = rng.standard_normal((2, vocab)).astype(np.float32) * 3
        logits[:, :8] += 3  # the prompt's ids and some others are likely, so tokens repeat
        before = logits.copy()
        tokens, failures = choose_tokens(logits, [greedy, sampler])
        assert not failures and np.array_equal(logits, before)
        assert tokens[0] == int(before[0].argmax())
        row = torch.from_numpy(before[1].copy())
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[torch.tensor(prompt + out)] = True
        row = torch.where(seen, torch.where(row < 0, row * 1.4, row / 1.4), row)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float()
        row = row - 0.6 * counts - -0.3 * (counts > 0).float()
        assert tokens[1] == plain.draw(row.numpy())
        out.append(tokens[1])
    assert len(set(out)) < len(out)  # tokens repeated: the counts were exercised


# ---- ranges ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("repetition_penalty", 0), ("repetition_penalty", -1.2),
                                              ("repetition_penalty", float("inf")), ("repetition_penalty", 1e-300),
                                              ("repetition_penalty", 1e308), ("frequency_penalty", 2.5),
                                              ("frequency_penalty", -2.01), ("presence_penalty", 3),
                                              ("presence_penalty", True)])
def test_sampling_params_refuse_penalties_outside_vllms_ranges(field, value):
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.fields == [field]
    for edge in ({"frequency_penalty": -2, "presence_penalty": 2, "repetition_penalty": 1e-3},
                 {"repetition_penalty": 7.5}):
        assert SamplingParams(**edge).penalized


# ---- the routes --------------------------------------------------------------------------------------------------


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_routes_serve_the_penalties_and_refuse_them_out_of_range(llama):
    """/v1/generate (native), /v1/completions and /v1/chat/completions: greedy answers with penalties are the
    references' tokens; values outside vLLM's ranges are refused naming the field (OpenAI's routes: 400, the
    native one: 422), where they used to be refused whatever their value."""
    import openai
    from transformers import AutoTokenizer

    from bca_deploy.serving.http import ServerThread, build

    app = build(llama["onnx"], adapter_store=llama["store"], threads=1, served_model_name="tiny-llama")
    session = app.state.session
    text = "the water is hot and the water is"
    prompt = session.tokenize([text])[0]
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        status, answer = post(server.url, "/v1/generate", {"input": [prompt, prompt], "adapter": "a1",
                                                           "max_new_tokens": 12, "repetition_penalty": 1.5})
        assert status == 200, answer
        expected = hf_generate(llama, prompt, "a1", 12, 1.5)
        assert [d["token_ids"] for d in answer["data"]] == [expected, expected]
        assert expected != hf_generate(llama, prompt, "a1", 12)
        status, answer = post(server.url, "/v1/generate", {"input": text, "max_new_tokens": 12,
                                                           "frequency_penalty": 1.2, "presence_penalty": 0.5})
        assert status == 200, answer
        assert answer["data"][0]["token_ids"] == hand_loop(llama, prompt, None, 12, frequency_penalty=1.2,
                                                           presence_penalty=0.5)

        client = openai_client(server.url, timeout=TIMEOUT)
        kw = {"repetition_penalty": 1.3, "frequency_penalty": 0.8, "presence_penalty": 0.4}
        tokens = hand_loop(llama, prompt, "a0", 10, **kw)
        done = client.completions.create(model="a0", prompt=text, max_tokens=10, temperature=0, frequency_penalty=0.8,
                                         presence_penalty=0.4, extra_body={"repetition_penalty": 1.3})
        assert done.choices[0].text == continuation(session, prompt, tokens)
        assert done.usage.completion_tokens == len(tokens)

        messages = [{"role": "user", "content": "the water is hot and the water is hot"}]
        tokenizer = AutoTokenizer.from_pretrained(llama["onnx"])
        chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        chat_ids = list(chat_ids["input_ids"] if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys") else chat_ids)
        chat_tokens = hf_generate(llama, chat_ids, "a2", 10, 1.6)
        chat = client.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0,
                                              extra_body={"repetition_penalty": 1.6})
        assert chat.choices[0].message.content == continuation(session, chat_ids, chat_tokens)
        assert chat_tokens != hf_generate(llama, chat_ids, "a2", 10)

        for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                             ("repetition_penalty", -1)):
            with pytest.raises(openai.BadRequestError) as caught:
                client.completions.create(model="a0", prompt=text, max_tokens=2, extra_body={field: value})
            assert caught.value.body["param"] == field, caught.value.body
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model="a0", messages=messages, max_tokens=2, extra_body={field: value})
            assert caught.value.body["param"] == field, caught.value.body
            status, answer = post(server.url, "/v1/generate", {"input": text, "max_new_tokens": 2, field: value})
            assert status == 422 and answer["error"]["param"] == field, answer
        # null is OpenAI's default (off), as vLLM reads it
        same = client.completions.create(model="a0", prompt=text, max_tokens=6, temperature=0,
                                         extra_body={"presence_penalty": None, "frequency_penalty": None,
                                                     "repetition_penalty": None})
        assert same.choices[0].text == continuation(session, prompt, hf_generate(llama, prompt, "a0", 6))


# ---- generation_config.json's repetition_penalty is the default ---------------------------------------------------


@pytest.fixture(scope="module")
def with_penalty(llama, tmp_path_factory):
    """The llama export with a generation_config.json holding repetition_penalty 1.3 (Qwen2.5-Instruct ships 1.05)."""
    directory = tmp_path_factory.mktemp("penalty-config") / "onnx"
    shutil.copytree(llama["onnx"], directory)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "repetition_penalty": 1.3}))
    return directory


def test_generation_config_repetition_penalty_is_the_default_as_generate_applies_it(llama, with_penalty):
    from bca_deploy.serving.http import ServerThread, build, startup_notes

    defaults = GenerationDefaults.read(with_penalty / "generation_config.json")
    assert defaults.repetition_penalty == 1.3 and defaults.problems == ()
    app = build(with_penalty, threads=1, served_model_name="tiny-llama")
    session = app.state.session
    notes = startup_notes(app.state.server)
    assert not any("not apply" in n for n in notes)
    assert any("repetition_penalty 1.3" in n and "generation_config.json" in n for n in notes), notes

    text = "the water is hot and the water is"
    prompt = session.tokenize([text])[0]
    expected = hf_generate(llama, prompt, None, 12, config_dir=with_penalty)  # generate() with the file's config
    assert expected == hf_generate(llama, prompt, None, 12, 1.3) != hf_generate(llama, prompt, None, 12)
    assert session.generate([prompt], [None], max_new_tokens=12)[0] == expected
    assert session.generate([prompt], [None], max_new_tokens=12, repetition_penalty=1.0)[0] == \
        hf_generate(llama, prompt, None, 12)
    with ServerThread(app, startup_timeout=TIMEOUT) as server:
        status, answer = post(server.url, "/v1/generate", {"input": [prompt], "max_new_tokens": 12})
        assert status == 200 and answer["data"][0]["token_ids"] == expected
        status, answer = post(server.url, "/v1/generate", {"input": [prompt], "max_new_tokens": 12,
                                                           "repetition_penalty": 1})
        assert status == 200 and answer["data"][0]["token_ids"] == hf_generate(llama, prompt, None, 12)
        client = openai_client(server.url, timeout=TIMEOUT)
        done = client.completions.create(model="tiny-llama", prompt=text, max_tokens=12, temperature=0)
        assert done.choices[0].text == continuation(session, prompt, expected)
        own = client.completions.create(model="tiny-llama", prompt=text, max_tokens=12, temperature=0,
                                        extra_body={"repetition_penalty": 1.0})
        assert own.choices[0].text == continuation(session, prompt, hf_generate(llama, prompt, None, 12))


def test_a_generation_config_repetition_penalty_transformers_would_refuse_is_named_and_ignored(tmp_path):
    path = tmp_path / "generation_config.json"
    for value in (0, -1.05, "1.05"):
        path.write_text(json.dumps({"eos_token_id": 2, "repetition_penalty": value}))
        defaults = GenerationDefaults.read(path)
        assert defaults.repetition_penalty is None
        (problem,) = defaults.problems
        assert "repetition_penalty" in problem and "ignored" in problem
    path.write_text(json.dumps({"repetition_penalty": 1.0}))
    assert GenerationDefaults.read(path).applied == {}
