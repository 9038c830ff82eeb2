"""Completions' ``echo: true`` with ``logprobs``: the prompt's own log-probabilities, what evaluation harnesses
(lm-evaluation-harness' ``local-completions``) score a continuation by, through the official ``openai`` client against
a real ``bca-deploy serve`` (the tiny Llama export of ``http_helpers.llama_bank``).

The reference is PyTorch: the same Llama with the same adapters loaded, the prompt (and the generated tokens) run
alone, teacher-forced: log_softmax of the logits at position t - 1 evaluated at token t, and ``torch.topk`` of it.
Requests for several adapters run at once; prompts as text and as token ids; ``max_tokens`` 0 and more.
"""

from __future__ import annotations

import concurrent.futures
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


@pytest.fixture(scope="module")
def model(torch_llama):
    return torch_llama


def teacher_forced(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """(len(ids) - 1, V) float64: row t is log_softmax of PyTorch's logits at position t, which scores ids[t + 1]."""
    return torch.log_softmax(row_alone(model, ids, adapter)[:-1].double(), dim=-1)


def greedy(model, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < n and (not tokens or tokens[-1] != 2):  # </s> ends
        tokens.append(int(row_alone(model, [*prompt, *tokens], adapter)[-1].argmax()))
    return tokens


def text_of(session, token: int) -> str:
    return session.tokenizer.decode([token], skip_special_tokens=False)


def check_choice(choice, session, model, prompt: list[int], adapter: str | None, top: int, max_tokens: int,
                 prompt_text: str) -> None:
    """The echoed choice: text, every token's entry (prompt first, the first null), against PyTorch."""
    generated = greedy(model, prompt, adapter, max_tokens) if max_tokens else []
    ids = [*prompt, *generated]
    assert choice.text == prompt_text + continuation(session, prompt, generated)
    shown = choice.logprobs
    assert shown.tokens == [text_of(session, t) for t in ids]
    assert shown.token_logprobs[0] is None and shown.top_logprobs[0] is None  # nothing comes before it
    lp = teacher_forced(model, ids, adapter)
    for t in range(1, len(ids)):
        assert shown.token_logprobs[t] == pytest.approx(lp[t - 1, ids[t]].item(), abs=ATOL), (adapter, t)
        values, best = torch.topk(lp[t - 1], top)
        expected = {text_of(session, i): v for i, v in zip(best.tolist(), values.tolist())}
        expected.setdefault(text_of(session, ids[t]), lp[t - 1, ids[t]].item())
        assert shown.top_logprobs[t].keys() == expected.keys(), (adapter, t)
        assert list(shown.top_logprobs[t].values()) == pytest.approx(list(expected.values()), abs=ATOL)
    # where each token's text starts in the echoed text: a prompt token after the one before it, a generated one as
    # without echo, after the prompt's text
    assert shown.text_offset[:len(prompt)] == [len(session.decode(prompt[:t])) for t in range(len(prompt))]
    assert shown.text_offset[len(prompt):] == [len(prompt_text) + len(continuation(session, prompt, generated[:j]))
                                               for j in range(len(generated))]


def test_echoed_prompts_logprobs_of_adapters_at_once_equal_pytorchs(llm, session, model):
    """Requests for three adapters and the base model at once, prompts as text and as token ids (several per
    request), ``max_tokens`` 0 (the prompt alone) and 4 (greedy), ``logprobs`` 0, 1, 3: each choice's text is the
    prompt's then the generated text, its ``tokens`` / ``token_logprobs`` / ``top_logprobs`` list the prompt's tokens
    (the first null), each PyTorch's teacher-forced log_softmax for that adapter, then the generated tokens', and
    ``text_offset`` runs over the whole text; ``usage`` counts the prompt once and no generated token for 0."""
    texts = ["the water is hot and", "you can see the day"]
    id_prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 60, 70]]
    jobs = [("a0", texts, 0, 1), ("a1", id_prompts, 4, 3), ("a2", texts[:1], 4, 0), ("tiny-llama", id_prompts, 0, 2),
            ("a2", id_prompts[:1], 0, 1), ("a1", texts[1:], 0, 3)]

    def ask(job):
        name, prompts, max_tokens, top = job
        return llm.completions.create(model=name, prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True,
                                      logprobs=top)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, prompts, max_tokens, top), answer in zip(jobs, answers, strict=True):
        adapter = None if name == "tiny-llama" else name
        ids = [session.tokenize([p], truncate=False)[0] if isinstance(p, str) else p for p in prompts]
        assert len(answer.choices) == len(prompts)
        for choice, prompt, sent in zip(answer.choices, ids, prompts, strict=True):
            echoed = sent if isinstance(sent, str) else session.decode(sent)  # token ids: decoded
            check_choice(choice, session, model, prompt, adapter, top, max_tokens, echoed)
            assert choice.finish_reason == "length" or max_tokens
        assert answer.usage.prompt_tokens == sum(len(p) for p in ids)
        if not max_tokens:
            assert answer.usage.completion_tokens == 0


def test_echo_streamed_first_chunk_is_the_scored_prompt(llm, session, model):
    """Streamed (``n`` 2 sampled, seeded), each choice's first chunk is the prompt with its log-probabilities, then
    its generated tokens' as without echo; together they are the unstreamed answer's (same seed, same tokens), and
    the prompt's numbers are PyTorch's."""
    request = dict(model="a2", prompt="the water is hot and", max_tokens=3, temperature=1.3, seed=7, n=2, echo=True,
                   logprobs=2)
    whole = llm.completions.create(**request)
    per_choice: dict[int, dict] = {}
    first_text: dict[int, str] = {}
    for chunk in llm.completions.create(**request, stream=True):
        for c in chunk.choices:
            got = per_choice.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
            first_text.setdefault(c.index, c.text)
            got["text"] += c.text
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "text_offset"):
                    got[key] += getattr(c.logprobs, key)
    prompt = session.tokenize([request["prompt"]], truncate=False)[0]
    lp = teacher_forced(model, prompt, "a2")
    for choice in whole.choices:
        got = per_choice[choice.index]
        assert first_text[choice.index] == request["prompt"]
        assert got["text"] == choice.text and got["tokens"] == choice.logprobs.tokens
        assert got["text_offset"] == choice.logprobs.text_offset
        assert got["token_logprobs"][0] is None and choice.logprobs.token_logprobs[0] is None
        assert got["token_logprobs"][1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=ATOL)
        assert choice.logprobs.token_logprobs[1:len(prompt)] == pytest.approx(
            [lp[t - 1, prompt[t]].item() for t in range(1, len(prompt))], abs=ATOL)
        assert choice.text.startswith(request["prompt"]) and len(choice.logprobs.tokens) == len(prompt) + 3


def harness_loglikelihood(choice, ctxlen: int, generated: int) -> tuple[float, bool]:
    """What lm-evaluation-harness' ``local-completions`` reads of a choice (its ``parse_logprobs``): the sum of
    ``token_logprobs`` over the continuation (after ``ctxlen`` prompt tokens, less the ``generated`` tokens at the
    end), and whether each continuation token is the most likely one (its logprob is its ``top_logprobs``' largest)."""
    stop = len(choice.logprobs.token_logprobs) - generated
    logprobs = choice.logprobs.token_logprobs[ctxlen:stop]
    greedy_ = all(lp == max(top.values()) for lp, top in zip(logprobs, choice.logprobs.top_logprobs[ctxlen:stop]))
    return sum(logprobs), greedy_


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_harness_loglikelihood_equals_pytorchs(llm, session, model, max_tokens):
    """lm-evaluation-harness' request for loglikelihood tasks (context + continuation token ids per prompt, ``echo``,
    ``max_tokens`` 1 as it sends it now or 0 as it did, ``logprobs`` 1, temperature 0, a seed), parsed as it parses
    the answer: each continuation's log-likelihood is PyTorch's sum of teacher-forced log-probabilities, and
    ``is_greedy`` is whether PyTorch's argmax is every continuation token. A text request's continuation span is
    found by ``text_offset`` instead, with the same numbers."""
    torch.manual_seed(0)
    cases = []  # (context ids, continuation ids); one continuation is the greedy one, so is_greedy is True there
    for context_len, continuation_len in ((5, 3), (9, 1), (3, 6)):
        context = [1, *torch.randint(3, 128, (context_len - 1,)).tolist()]
        cases.append((context, torch.randint(3, 128, (continuation_len,)).tolist()))
    cases.append((cases[0][0], greedy(model, cases[0][0], "a1", 3)))
    answer = llm.completions.create(model="a1", prompt=[c + k for c, k in cases], max_tokens=max_tokens,
                                    temperature=0, echo=True, logprobs=1, seed=1234)
    found = []
    for choice, (context, cont) in zip(sorted(answer.choices, key=lambda c: c.index), cases, strict=True):
        lp = teacher_forced(model, context + cont, "a1")
        rows = lp[len(context) - 1:]
        expected = sum(rows[j, t].item() for j, t in enumerate(cont))
        expected_greedy = all(int(rows[j].argmax()) == t for j, t in enumerate(cont))
        value, is_greedy = harness_loglikelihood(choice, len(context), max_tokens)
        assert value == pytest.approx(expected, abs=ATOL * len(cont))
        assert is_greedy == expected_greedy
        found.append(is_greedy)
    assert found[-1] and not all(found)

    # as text: the continuation's tokens are those whose text starts at or after the context's text
    context, cont = "the water is", " hot and you"
    choice = llm.completions.create(model="a0", prompt=context + cont, max_tokens=max_tokens, temperature=0,
                                    echo=True, logprobs=1).choices[0]
    offsets = choice.logprobs.text_offset[:len(choice.logprobs.text_offset) - max_tokens]
    start = next(i for i, o in enumerate(offsets) if o >= len(context))
    ids = session.tokenize([context + cont], truncate=False)[0]
    assert start == len(session.tokenize([context], truncate=False)[0])
    lp = teacher_forced(model, ids, "a0")
    value, _ = harness_loglikelihood(choice, start, max_tokens)
    assert value == pytest.approx(sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids))), abs=ATOL * 3)
    assert choice.text.startswith(context + cont)


def test_echo_without_logprobs_and_max_tokens_zero_refusals(llm, session):
    """``echo`` alone repeats the prompt (token ids decoded) before the generated text, ``logprobs`` null; with
    ``max_tokens`` 0 it is the prompt alone, streamed or not; ``max_tokens`` 0 without ``echo`` is refused by name."""
    plain = llm.completions.create(model="a0", prompt="the water is", max_tokens=3, temperature=0)
    echoed = llm.completions.create(model="a0", prompt="the water is", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == "the water is" + plain.choices[0].text and echoed.choices[0].logprobs is None
    only = llm.completions.create(model="a0", prompt=[[1, 40, 41], [50, 51]], max_tokens=0, echo=True, n=2)
    assert [c.text for c in only.choices] == [session.decode([1, 40, 41])] * 2 + [session.decode([50, 51])] * 2
    assert {c.finish_reason for c in only.choices} == {"length"} and only.usage.completion_tokens == 0
    assert only.usage.prompt_tokens == 5
    chunks = list(llm.completions.create(model="a0", prompt="the water is", max_tokens=0, echo=True, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == "the water is"
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as caught:
        llm.completions.create(model="a0", prompt="the day", max_tokens=0)
    assert caught.value.body["param"] == "max_tokens" and '"echo": true' in caught.value.body["message"]


def test_echo_logprob_entries_past_the_bound_are_refused_by_name():
    from bca_deploy.errors import BCAError
    from bca_deploy.serving import openai as routes
    from bca_deploy.serving.decoding import SamplingParams

    # 4 prompts x 2 choices of 100 tokens, echoed with logprobs 20 and no new token: 16,800 prompt entries
    rows, params = [[1] * 100] * 8, [SamplingParams(max_new_tokens=0, prompt_logprobs=20)] * 8
    routes.check_logprob_entries(2**20, rows, params, {"logprobs": 20}, "logprobs", "ask fewer")  # taken
    with pytest.raises(BCAError) as caught:
        routes.check_logprob_entries(1000, rows, params, {"logprobs": 20}, "logprobs", "ask fewer")
    assert caught.value.param == "logprobs" and "16,800" in str(caught.value)
