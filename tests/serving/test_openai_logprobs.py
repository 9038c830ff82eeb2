"""``logprobs`` / ``top_logprobs`` on ``/v1/chat/completions`` and ``/v1/completions`` through the official ``openai``
client against a real ``bca-deploy serve`` (the tiny Llama export of ``http_helpers.llama_bank``).

The reference is PyTorch: the same Llama with the same adapters loaded, each answer's prompt + generated tokens run
alone, log_softmax of its logits (the model's raw distribution, vLLM's default) and ``torch.topk`` of it. Requests
for several adapters run at once (one running batch), streamed and not, ``n`` > 1 sampled.
"""

from __future__ import annotations

import concurrent.futures
import functools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import continuation
from http_helpers import llama, llm, server, session, torch_llama  # noqa: F401 - module fixtures
from serving_helpers import row_alone


ATOL = 1e-4
CHAT = [{"role": "user", "content": "what is the water"}]
PROMPTS = ["the water is hot and", "you can see the"]


class Reference:
    """log_softmax of PyTorch's logits for the generated tokens of one answer; token texts <-> ids."""

    def __init__(self, model, session) -> None:
        self.model, self.tokenizer = model, session.tokenizer
        self.ids = self.tokenizer.get_vocab()  # word-level: one id per text

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one per test module
    def logprobs(self, prompt: tuple[int, ...], tokens: tuple[int, ...], adapter: str | None) -> torch.Tensor:
        logits = row_alone(self.model, [*prompt, *tokens], adapter)
        return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)].double(), dim=-1)

    def greedy(self, prompt: list[int], adapter: str | None, n: int) -> list[int]:
        tokens: list[int] = []
        while len(tokens) < n and (not tokens or tokens[-1] != 2):  # </s> ends
            tokens.append(int(row_alone(self.model, [*prompt, *tokens], adapter)[-1].argmax()))
        return tokens


@pytest.fixture(scope="module")
def ref(torch_llama, session):
    return Reference(torch_llama, session)


def chat_ids(session) -> list[int]:
    text = session.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return session.tokenizer(text, add_special_tokens=False)["input_ids"]


def streamed_chat(chunks) -> tuple[str, list]:
    text, content = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                content += choice.logprobs.content
    return text, content


def test_chat_logprobs_of_adapters_in_one_batch_equal_pytorchs(llm, session, ref):
    """Chat requests for three adapters and the base model at once, each asking a different ``top_logprobs`` (and
    one asking none), half of them streamed: every generated token's ``logprob`` is PyTorch's log_softmax for that
    adapter's model, ``top_logprobs`` are ``torch.topk`` of it, most likely first, with each token's text and
    bytes; the streamed chunks' log-probabilities together are the tokens' in order."""
    prompt = chat_ids(session)
    jobs = [("a0", 5, False), ("a1", 0, True), ("a2", 20, False), ("tiny-llama", 2, True), ("a1", None, False),
            ("a0", 5, True), ("a2", 20, True)]

    def ask(job):
        model, top, stream = job
        extra = {} if top is None else {"logprobs": True, "top_logprobs": top}
        answer = llm.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0, stream=stream,
                                             **extra)
        if stream:
            return streamed_chat(answer)
        choice = answer.choices[0]
        return choice.message.content, None if choice.logprobs is None else choice.logprobs.content

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, top, stream), (text, content) in zip(jobs, answers, strict=True):
        adapter = None if model == "tiny-llama" else model
        expected = ref.greedy(prompt, adapter, 6)
        assert text == continuation(session, prompt, expected), (model, top, stream)
        if top is None:
            assert content is None or content == []
            continue
        assert [ref.ids[c.token] for c in content] == expected, (model, top, stream)
        lp = ref.logprobs(tuple(prompt), tuple(expected), adapter)
        for j, (token, c) in enumerate(zip(expected, content, strict=True)):
            assert c.logprob == pytest.approx(lp[j, token].item(), abs=ATOL)
            assert c.bytes == list(c.token.encode())
            values, ids = torch.topk(lp[j], top)
            assert [t.token for t in c.top_logprobs] == [ref.text(i) for i in ids.tolist()], (model, j)
            assert [t.logprob for t in c.top_logprobs] == pytest.approx(values.tolist(), abs=ATOL)
            assert all(t.bytes == list(t.token.encode()) for t in c.top_logprobs)


def test_completion_logprobs_sampled_n_and_streamed_equal_pytorchs(llm, session, ref):
    """Completions' legacy shape: two prompts, ``n=2`` sampled choices each (seeded), ``logprobs=3``: each token's
    ``token_logprobs`` is the raw log_softmax (PyTorch, the tokens the server sampled), ``top_logprobs`` holds the
    3 most likely tokens plus the chosen one when it is not among them, ``text_offset`` is where each token's text
starts in the choice's text;
    the same request streamed (same seed, same tokens) gives the same log-probabilities, chunk by chunk."""
    request = dict(model="a2", prompt=PROMPTS, max_tokens=5, temperature=1.5, seed=17, n=2, logprobs=3)
    whole = llm.completions.create(**request)
    chunks = list(llm.completions.create(**request, stream=True))
    per_choice: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            got = per_choice.setdefault(choice.index, {"text": "", "tokens": [], "token_logprobs": [],
                                                       "top_logprobs": [], "text_offset": []})
            got["text"] += choice.text
            if choice.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    got[key] += getattr(choice.logprobs, key)
    assert len(whole.choices) == 4
    for choice in whole.choices:
        prompt = session.tokenize([PROMPTS[choice.index // 2]], truncate=False)[0]
        shown = choice.logprobs
        tokens = [ref.ids[t] for t in shown.tokens]
        assert len(tokens) == whole.usage.completion_tokens // 4 or tokens[-1] == 2
        assert choice.text == continuation(session, prompt, tokens)
        lp = ref.logprobs(tuple(prompt), tuple(tokens), "a2")
        for j, token in enumerate(tokens):
            assert shown.token_logprobs[j] == pytest.approx(lp[j, token].item(), abs=ATOL)
            values, ids = torch.topk(lp[j], 3)
            expected = {ref.text(i): v for i, v in zip(ids.tolist(), values.tolist())}
            expected.setdefault(ref.text(token), lp[j, token].item())
            assert shown.top_logprobs[j].keys() == expected.keys()
            assert list(shown.top_logprobs[j].values()) == pytest.approx(list(expected.values()), abs=ATOL)
            # where the token's text starts in the choice's text (OpenAI's meaning)
            assert shown.text_offset[j] == len(continuation(session, prompt, tokens[:j]))
        streamed = per_choice[choice.index]
        assert streamed["text"] == choice.text and streamed["tokens"] == shown.tokens
        assert streamed["text_offset"] == shown.text_offset
        assert streamed["token_logprobs"] == pytest.approx(shown.token_logprobs, abs=ATOL)
    assert len({tuple(c.logprobs.tokens) for c in whole.choices}) > 1  # the choices really differ


def test_completion_logprobs_zero_lists_the_chosen_token_alone(llm, session, ref):
    """``logprobs: 0`` (OpenAI, vLLM): each chosen token's log-probability, and in ``top_logprobs`` that token
    alone; a request without ``logprobs`` in the same batch gets null."""
    prompt = session.tokenize([PROMPTS[1]], truncate=False)[0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        zero, none = pool.map(lambda extra: llm.completions.create(model="a0", prompt=PROMPTS[1], max_tokens=4,
                                                                   temperature=0, **extra),
                              [{"logprobs": 0}, {}])
    tokens = ref.greedy(prompt, "a0", 4)
    lp = ref.logprobs(tuple(prompt), tuple(tokens), "a0")
    shown = zero.choices[0].logprobs
    assert [ref.ids[t] for t in shown.tokens] == tokens
    assert shown.token_logprobs == pytest.approx([lp[j, t].item() for j, t in enumerate(tokens)], abs=ATOL)
    assert [list(top) for top in shown.top_logprobs] == [[t] for t in shown.tokens]
    assert none.choices[0].logprobs is None and none.choices[0].text == zero.choices[0].text


@pytest.mark.parametrize(("route", "extra", "param", "says"), [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "from 0 to 20"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", '"logprobs": true'),
    ("chat", {"logprobs": False, "top_logprobs": 3}, "top_logprobs", '"logprobs": true'),
    ("chat", {"extra_body": {"logprobs": 1}}, "logprobs", "true or false"),
    ("completions", {"logprobs": 21}, "logprobs", "from 0 to 20"),
    ("completions", {"logprobs": -1}, "logprobs", "from 0 to 20"),
    ("completions", {"extra_body": {"logprobs": True}}, "logprobs", "from 0 to 20"),
    ("completions", {"extra_body": {"top_logprobs": 2}}, "top_logprobs", "completions take \"logprobs\""),
])
def test_logprobs_out_of_range_are_refused_by_name(llm, route, extra, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            llm.chat.completions.create(model="a0", messages=CHAT, max_tokens=2, **extra)
        else:
            llm.completions.create(model="a0", prompt="the day", max_tokens=2, **extra)
    assert caught.value.body["param"] == param and says in caught.value.body["message"], caught.value.body
    assert caught.value.status_code == 400 and caught.value.body["type"] == "invalid_request"


def test_a_token_cut_by_a_stop_string_is_listed_streamed_or_not(llm, session, ref):
    """A stop string ends the row inside the text of its last token: that token is still listed (``usage`` counts
    it, as vLLM lists it), with its text offset where its text would start; streamed, its log-probability comes with
    the last chunk. Streamed and unstreamed answers list the same tokens, numbers and offsets."""
    prompt = session.tokenize([PROMPTS[0]], truncate=False)[0]
    tokens = ref.greedy(prompt, "a1", 6)
    # the first word from the second on that the text before it does not hold ends the row
    last = next(j for j in range(1, 6) if " " + ref.text(tokens[j]) not in continuation(session, prompt, tokens[:j]))
    stop = " " + ref.text(tokens[last])
    request = dict(model="a1", prompt=PROMPTS[0], max_tokens=6, temperature=0, stop=[stop], logprobs=1)
    whole = llm.completions.create(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and whole.usage.completion_tokens == last + 1
    assert [ref.ids[t] for t in choice.logprobs.tokens] == tokens[:last + 1]
    assert choice.text == continuation(session, prompt, tokens[:last])
    assert choice.logprobs.text_offset == [len(continuation(session, prompt, tokens[:j])) for j in range(last + 1)]
    text, got = "", {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in llm.completions.create(**request, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                for key in got:
                    got[key] += getattr(c.logprobs, key)
    assert text == choice.text and got["tokens"] == choice.logprobs.tokens
    assert got["text_offset"] == choice.logprobs.text_offset
    assert got["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=ATOL)
