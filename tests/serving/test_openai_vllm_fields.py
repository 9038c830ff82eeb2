"""Fields a vLLM user's script sends with the official ``openai`` client, against a real ``bca-deploy serve``:
``n`` choices per prompt, vLLM's ``ignore_eos`` and ``min_tokens``, ``seed`` -1 (vLLM's "no seed") and negative
seeds, and ``stream_options.continuous_usage_stats``. Each used to be refused with a 400 (``n: 2 is not supported``,
``ignore_eos: True is not supported``, ``seed: Input should be greater than or equal to 0``, ``stream_options: 1
unknown key(s)``): every test here fails on that code.

References are independent of the serving code, on the tiny Llama of ``http_helpers.py``:

- sampled choices: the in-process :meth:`MultiAdapterSession.generate` of the prompt alone with the seed vLLM gives
  choice j (``seed + j``, vLLM's ``ParentRequest``), as ``test_openai_conformance.py`` checks seeded sampling;
- ``ignore_eos`` / ``min_tokens``: a hand loop over the PyTorch model's logits (the whole sequence run again at every
  step) that sets the end ids' logits to -inf before ``min_tokens`` tokens (vLLM's ``MinTokensLogitsProcessor``) and
  ends at an end-of-sequence id unless ``ignore_eos`` (vLLM's ``check_stop``);
- negative seeds: torch's own reading of one (``Generator.manual_seed``, vLLM's generators), modulo 2**64.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import continuation, reference_llama  # noqa: E402
from http_helpers import llama, llm, server, session  # noqa: E402,F401 - module fixtures
from serving_helpers import StepGate  # noqa: E402

from bca_deploy.inject import mixed_adapters  # noqa: E402
from bca_deploy.serving import MultiAdapterSession  # noqa: E402
from bca_deploy.serving.engine import GenerationEngine, SamplingParams, SamplingParamsError  # noqa: E402

EOS = {2}  # the tiny Llama's end-of-sequence id (config.json and the tokenizer's </s>)
PROMPTS = ["the water is hot and", "you can see the"]


@functools.cache
def _hand_loop(root: str, prompt: tuple[int, ...], adapter: str | None, new: int, ignore_eos: bool, min_tokens: int,
               stop_ids: tuple[int, ...]) -> tuple[int, ...]:
    model = reference_llama(root)
    ends = set(stop_ids) | (set() if ignore_eos else EOS)
    ids, out = list(prompt), []
    for _ in range(new):
        x = torch.tensor([ids])
        with torch.no_grad(), mixed_adapters(model, [adapter]):
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
        if len(out) < min_tokens:
            logits[sorted(ends)] = -float("inf")
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in ends:
            break
    return tuple(out)


def hand_loop(llama, prompt, adapter, new, ignore_eos=False, min_tokens=0, stop_ids=()) -> list[int]:
    """Greedy tokens of ``prompt`` alone as vLLM ends them (see the module docstring)."""
    return list(_hand_loop(str(llama["root"]), tuple(prompt), adapter, new, ignore_eos, min_tokens, tuple(stop_ids)))


def candidates(session, adapter: str, new: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """200 random token-id prompts and their greedy continuations through ``adapter`` with no end id (found with the
    session in one batch, fast; the tests check the server against the hand loop, not against these)."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, 128, size=int(rng.integers(3, 9)))] for _ in range(200)]
    return list(zip(prompts, session.generate(prompts, [adapter] * len(prompts), max_new_tokens=new,
                                              eos_token_id=[]), strict=True))


def early_eos_prompts(session, adapter: str, within: int, count: int) -> list[list[int]]:
    """Token-id prompts whose greedy continuation through ``adapter`` ends at an end-of-sequence id within
    ``within`` tokens, not at the first (so that ``ignore_eos`` and ``min_tokens`` change the answer)."""
    found = [p for p, tokens in candidates(session, adapter, within, seed=3) if EOS & set(tokens[1:])
             and not EOS & {tokens[0]}]
    if len(found) < count:
        pytest.skip("not enough prompts of the tiny Llama end early")
    return found[:count]


def distinct_words_prompt(session, adapter: str, tokens: int) -> list[int]:
    """A token-id prompt whose greedy continuation (``ignore_eos``) starts with ``tokens`` distinct ordinary tokens
    (no special token, so each is one word of the text)."""
    for prompt, head in candidates(session, adapter, tokens, seed=5):
        if min(head) > 2 and len(set(head)) == tokens:
            return prompt
    pytest.skip("no prompt of the tiny Llama starts with distinct ordinary tokens")


def sampled(session, prompt: str, adapter: str, n: int, temperature: float, seed: int) -> str:
    ids = session.tokenize([prompt], truncate=False)[0]
    tokens = session.generate([ids], [adapter], max_new_tokens=n, do_sample=True, temperature=temperature,
                              seed=seed)[0]
    return continuation(session, ids, tokens)


def stream_texts(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.text if hasattr(choice, "text") else
                                                                 choice.delta.content or "")
    return texts


def test_n_choices_sample_as_vllm_seeds_them(llm, session):
    """``n``: every prompt's n choices, choice ``i * n + j`` being prompt i's j-th, sampled with ``seed + j`` (vLLM's
    child requests), streamed or not; usage counts each prompt's tokens once (OpenAI, vLLM). It was refused (400)."""
    answer = llm.completions.create(model="a1", prompt=PROMPTS, n=3, max_tokens=6, temperature=1.3, seed=11)
    assert [c.index for c in answer.choices] == list(range(6))
    for i, prompt in enumerate(PROMPTS):
        for j in range(3):
            assert answer.choices[i * 3 + j].text == sampled(session, prompt, "a1", 6, 1.3, 11 + j), (i, j)
    assert len({c.text for c in answer.choices[:3]}) > 1  # the choices differ
    prompt_tokens = sum(len(session.tokenize([p], truncate=False)[0]) for p in PROMPTS)
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == 6 * 6  # no </s> in these (a choice ending early would count less)
    chunks = list(llm.completions.create(model="a1", prompt=PROMPTS, n=3, max_tokens=6, temperature=1.3, seed=11,
                                         stream=True, stream_options={"include_usage": True}))
    assert stream_texts(chunks) == {c.index: c.text for c in answer.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == answer.usage.model_dump()
    # chat: one prompt, n choices; greedy choices are equal (vLLM answers n copies)
    messages = [{"role": "user", "content": "what is the day"}]
    chat = llm.chat.completions.create(model="a0", messages=messages, n=2, max_tokens=4, temperature=0)
    alone = llm.chat.completions.create(model="a0", messages=messages, max_tokens=4, temperature=0)
    assert [c.message.content for c in chat.choices] == [alone.choices[0].message.content] * 2
    assert chat.usage.prompt_tokens == alone.usage.prompt_tokens
    assert chat.usage.completion_tokens == 2 * alone.usage.completion_tokens
    # every choice is a row: the request's rows stay within --max-request-rows (256), n counted in; n >= 1
    with pytest.raises(openai.APIStatusError) as caught:
        llm.completions.create(model="a0", prompt=PROMPTS, n=200, max_tokens=2)
    assert caught.value.status_code == 413 and "n: 400 rows" in caught.value.body["message"]
    assert caught.value.body["param"] == "n", caught.value.body  # the field, as every other refusal names it
    with pytest.raises(openai.BadRequestError) as caught:
        llm.completions.create(model="a0", prompt=PROMPTS, n=0, max_tokens=2)
    assert caught.value.body["param"] == "n"


def test_ignore_eos_and_min_tokens_end_rows_as_vllm(llm, llama, session):
    """``ignore_eos``: the row goes on past the end-of-sequence id (its text left out), to ``max_tokens``;
    ``min_tokens``: no end id before that many tokens. Both were refused (400); streamed as answered whole."""
    prompts = early_eos_prompts(session, "a0", within=5, count=2)
    for prompt in prompts:
        plain = hand_loop(llama, prompt, "a0", 10)
        for extra in ({"ignore_eos": True}, {"min_tokens": len(plain) + 2}, {"min_tokens": 10},
                      {"ignore_eos": True, "min_tokens": 3}):
            expected = hand_loop(llama, prompt, "a0", 10, extra.get("ignore_eos", False), extra.get("min_tokens", 0))
            assert expected != plain  # the field changes the answer
            answer = llm.completions.create(model="a0", prompt=prompt, max_tokens=10, temperature=0, extra_body=extra)
            choice = answer.choices[0]
            assert choice.text == continuation(session, prompt, expected), extra
            assert answer.usage.completion_tokens == len(expected), extra
            assert choice.finish_reason == ("stop" if expected[-1] in EOS and not extra.get("ignore_eos") else
                                            "length"), extra
            chunks = list(llm.completions.create(model="a0", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                                 extra_body=extra))
            assert stream_texts(chunks) == {0: choice.text}
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    # vLLM's rule: min_tokens may not exceed max_tokens (the default one too: 16 on completions)
    for extra, words in (({"max_tokens": 3, "extra_body": {"min_tokens": 4}}, "max_tokens (3)"),
                         ({"extra_body": {"min_tokens": 17}}, "max_tokens (16)"),
                         ({"extra_body": {"min_tokens": -1}}, "min_tokens")):
        with pytest.raises(openai.BadRequestError) as caught:
            llm.completions.create(model="a0", prompt=prompts[0], **extra)
        assert caught.value.body["param"] == "min_tokens" and words in caught.value.body["message"]


def test_min_tokens_holds_stop_token_ids_and_stop_strings(llm, llama, session):
    """Before ``min_tokens``, ``stop_token_ids`` are never chosen (masked, as vLLM masks them) and a stop string in
    the text of those tokens does not end the row; one that ends after them does (vLLM's detokenizer)."""
    prompt = distinct_words_prompt(session, "a2", 6)
    plain = hand_loop(llama, prompt, "a2", 12, ignore_eos=True)
    words = continuation(session, prompt, plain).split()  # words[k] is token k's, for k < 6
    second = plain[1]
    # stop_token_ids: the second token, held for 3 tokens
    expected = hand_loop(llama, prompt, "a2", 12, ignore_eos=True, min_tokens=3, stop_ids=[second])
    answer = llm.completions.create(model="a2", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "min_tokens": 3, "stop_token_ids": [second]})
    assert answer.choices[0].text == continuation(session, prompt, expected)
    assert answer.usage.completion_tokens == len(expected)
    # stop strings: the second word is in the first 3 tokens' text, the fifth after them
    full = continuation(session, prompt, plain)
    stops = [" " + words[1], " " + words[4]]
    for extra, cut_at in (({}, words[1]), ({"min_tokens": 3}, words[4])):
        body = {"ignore_eos": True, **extra}
        expected_text = full[:full.index(" " + cut_at)]
        answer = llm.completions.create(model="a2", prompt=prompt, max_tokens=12, temperature=0, stop=stops,
                                        extra_body=body)
        assert answer.choices[0].text == expected_text and answer.choices[0].finish_reason == "stop", extra
        chunks = list(llm.completions.create(model="a2", prompt=prompt, max_tokens=12, temperature=0, stop=stops,
                                             stream=True, extra_body=body))
        assert stream_texts(chunks) == {0: expected_text}, extra


def test_seed_minus_one_is_no_seed_and_negative_seeds_are_torchs(llm, session):
    """``seed``: vLLM takes int64; -1 is "no seed" (vLLM's ``SamplingParams``; UIs send it for "random"), another
    negative seed is the one torch's ``manual_seed`` makes of it (modulo 2**64). Both were refused (400)."""
    assert torch.Generator().manual_seed(-5).initial_seed() == 2**64 - 5  # torch's reading, the reference
    ids = session.tokenize([PROMPTS[0]], truncate=False)[0]
    tokens = session.generate([ids], ["a2"], max_new_tokens=6, do_sample=True, temperature=1.0, seed=2**64 - 5)[0]
    for _ in range(2):
        answer = llm.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=-5)
        assert answer.choices[0].text == continuation(session, ids, tokens)
    answer = llm.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=-1)
    assert answer.choices[0].finish_reason in ("stop", "length")
    # seed -1 with n: the choices are unseeded (not -1 + j)
    assert len(llm.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=2, seed=-1, n=2).choices) == 2
    for seed in (2**63, -(2**63) - 1):  # outside int64, as vLLM refuses it
        with pytest.raises(openai.BadRequestError) as caught:
            llm.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=2, seed=seed)
        assert caught.value.body["param"] == "seed"


def test_continuous_usage_stats_give_every_chunk_its_choices_usage(llm, session):
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): every chunk carries its choice's
    prompt tokens and completion tokens so far; the last chunk the request's usage. It was refused (unknown key)."""
    prompt_tokens = len(session.tokenize([PROMPTS[1]], truncate=False)[0])
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(llm.completions.create(model="a0", prompt=PROMPTS[1], n=2, max_tokens=5, temperature=0, stream=True,
                                         stream_options=options, extra_body={"ignore_eos": True}))
    counts: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        assert chunk.usage.prompt_tokens == prompt_tokens
        assert chunk.usage.total_tokens == prompt_tokens + chunk.usage.completion_tokens
        counts[choice.index].append(chunk.usage.completion_tokens)
    for index, seen in counts.items():
        assert seen == sorted(seen) and seen[-1] == 5, (index, seen)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    # sent alone it reads include_usage as vLLM's StreamOptions defaults it (true): the same usage, not none (it was
    # none: a vLLM client asking for every chunk's usage got no usage at all); with include_usage false, none (vLLM's
    # rule: continuous only with include_usage); a value that is not a boolean is refused
    alone = list(llm.completions.create(model="a0", prompt=PROMPTS[1], n=2, max_tokens=5, temperature=0, stream=True,
                                        stream_options={"continuous_usage_stats": True},
                                        extra_body={"ignore_eos": True}))
    def by_choice(stream):  # the two choices' chunks interleave as their rows' tokens arrive: compare each's own
        return {i: [(c.choices, c.usage) for c in stream if c.choices and c.choices[0].index == i] for i in (0, 1)}

    assert by_choice(alone) == by_choice(chunks) and len(alone) == len(chunks)
    assert (alone[-1].choices, alone[-1].usage) == (chunks[-1].choices, chunks[-1].usage)
    for options in ({"include_usage": False, "continuous_usage_stats": True}, {"continuous_usage_stats": False}):
        plain = list(llm.completions.create(model="a0", prompt=PROMPTS[1], max_tokens=2, temperature=0, stream=True,
                                            stream_options=options))
        assert all(c.usage is None for c in plain) and all(c.choices for c in plain), options
    with pytest.raises(openai.BadRequestError) as caught:
        llm.completions.create(model="a0", prompt=PROMPTS[1], max_tokens=2, stream=True,
                               stream_options={"continuous_usage_stats": "yes"})
    assert caught.value.body["param"] == "stream_options"


def test_a_preempted_row_keeps_its_min_tokens_count(llama):
    """A row held by ``min_tokens`` that is pre-empted (another tenant below its share arrives) and recomputed keeps
    its count: its tokens stay the hand loop's for the row alone (no end id before ``min_tokens``, then the end)."""
    session = MultiAdapterSession(llama["onnx"], intra_op_threads=1)
    prompts = early_eos_prompts(session, "a1", within=4, count=2)
    third = early_eos_prompts(session, "a0", within=4, count=1)[0]
    gate = StepGate(steps=[2])

    async def main():
        engine = GenerationEngine(session, max_batch_rows=2, observer=gate, preempt_wait_steps=1)
        await engine.start()
        try:
            with engine._cond:  # both rows wait before the engine admits any
                held = [engine.submit(p, "a1", SamplingParams(max_new_tokens=12, min_tokens=8)) for p in prompts]
            await gate.paused()
            light = engine.submit(third, "a0", SamplingParams(max_new_tokens=3, ignore_eos=True))
            gate.go()
            return [await s.collect() for s in [*held, light]], [*held, light]
        finally:
            gate.go()
            await engine.stop()

    results, streams = asyncio.run(asyncio.wait_for(main(), 120))
    assert sum(s.preemptions for s in streams[:2]) >= 1, "no row was pre-empted"
    for prompt, result in zip(prompts, results[:2], strict=True):
        assert result.token_ids == hand_loop(llama, prompt, "a1", 12, min_tokens=8)
    assert results[2].token_ids == hand_loop(llama, third, "a0", 3, ignore_eos=True)
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(max_new_tokens=4, min_tokens=5)
    assert caught.value.field == "min_tokens"


@pytest.mark.parametrize("stop, min_tokens, sent, stopped", [
    (["bc"], 2, "a", True),  # begins in the first 2 tokens' text, ends after them: it counts (vLLM's window)
    (["ab"], 2, "abcd", False),  # wholly in the first 2 tokens' text: it does not
    (["ab", "abcz"], 2, "abcd", False),  # held back as the start of a longer one, still wholly in them
    (["ab"], 0, "", True),  # without min_tokens the same text ends the row
    (["cd"], 3, "ab", True),
])
def test_the_detokenizer_matches_stop_strings_past_min_tokens(stop, min_tokens, sent, stopped):
    """Stop strings after ``min_tokens`` as vLLM's detokenizer matches them: one that ends in the text of the
    first ``min_tokens`` tokens does not count, one that ends after them does, wherever it begins; each token here is
    one character (a, b, c, d)."""
    from bca_deploy.serving.engine import _Detokenizer

    detok = _Detokenizer(lambda ids: "".join("abcd"[i] for i in ids), stop, min_tokens=min_tokens)
    text, hit = "", False
    for token in range(4):
        delta, hit = detok.push(token)
        text += delta
        if hit:
            break
    if not hit:
        text += detok.flush()
    assert (text, hit) == (sent, stopped)
