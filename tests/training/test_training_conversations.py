"""causal-lm training on conversations: a ``messages`` column rendered with the model's chat template, loss on the
assistant turns only (``bca_deploy.training.data``: load_causal_lm, tokenize_causal_lm).

Before, a JSONL file of ``{"messages": [...]}`` rows was refused ("causal-lm data needs columns 'prompt' +
'response' ... or 'text'"), and an adapter trained on prompt/response rows was served through
``/v1/chat/completions`` on a prompt shape it never saw. Now the conversation is rendered as ``serve`` renders a chat
request, and the labels are the assistant turns' tokens (their content and the template's end of turn).
"""

from __future__ import annotations

import asyncio
import functools
import json
import types
from pathlib import Path

import pytest
from training_helpers import config, write_jsonl

from bca_deploy.training import DataError, EvaluateConfig, evaluate, train
from bca_deploy.training.data import IGNORE_INDEX, load_dataset

#: A Llama-3-like template: BOS, then each turn as ``<|start|> ROLE <|sep|> CONTENT <|eot|>``.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|> {{ m['role'] }} <|sep|> {{ m['content'] }} <|eot|> "
            "{% endfor %}{% if add_generation_prompt %}<|start|> assistant <|sep|> {% endif %}")
WORDS = ("the", "a", "is", "of", "water", "hot", "cold", "how", "what", "about", "you", "it", "one", "two", "day",
         "sun", "rain", "good", "bad", "yes", "no", "and", "be", "kind", "brief", "red", "blue", "sky", "sea", "tree")
SPECIALS = ["<unk>", "<s>", "</s>", "<|start|>", "<|sep|>", "<|eot|>", "system", "user", "assistant"]
TWO_TURNS = [{"role": "system", "content": "be brief"},
             {"role": "user", "content": "how is the water"},
             {"role": "assistant", "content": "the water is hot"},
             {"role": "user", "content": "what about the sky"},
             {"role": "assistant", "content": "the sky is blue"}]


def _chat_model(directory: Path, template: str | None = TEMPLATE) -> Path:
    """A tiny random Llama and a word-level tokenizer (``template`` as its chat template), saved in ``directory``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = SPECIALS + list(WORDS)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<unk>")
    if template is not None:
        tokenizer.chat_template = template
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return _chat_model(tmp_path_factory.mktemp("chat") / "llama")


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _reference(tokenizer, messages) -> tuple[list[int], list[int]]:
    """By hand: the conversation rendered by transformers and tokenized, the labels marking each assistant turn's
    content and its ``<|eot|>`` (found as the tokens after ``<|start|> assistant <|sep|>``)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for j in range(len(tokens) - 2):
        if tokens[j:j + 3] == ["<|start|>", "assistant", "<|sep|>"]:
            k = j + 3
            while tokens[k] != "<|eot|>":
                labels[k] = ids[k]
                k += 1
            labels[k] = ids[k]
    return ids, labels


def test_labels_are_the_assistant_turns(chat_model, tmp_path):
    tokenizer = _tokenizer(chat_model)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    examples, data = load_dataset(path, "causal-lm", tokenizer, 64, model=chat_model)
    ids, labels = _reference(tokenizer, TWO_TURNS)
    assert examples.format == "messages"
    assert data.input_ids[0] == ids and data.labels[0] == labels
    kept = tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX])
    assert kept == "the water is hot <|eot|> the sky is blue <|eot|>".split()
    # cut at max_length like every causal-lm example: the second reply's tail goes
    _, short = load_dataset(path, "causal-lm", tokenizer, 20, model=chat_model)
    assert short.input_ids[0] == ids[:20] and short.labels[0] == labels[:20]


def test_the_served_prompt_is_the_trained_prompt(chat_model, tmp_path):
    """serve's chat_prompt for the conversation less its last reply is the tokens trained on before that reply."""
    pytest.importorskip("fastapi")
    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.chat_template import ChatTemplateRenderer
    from bca_deploy.serving.http import Server
    from bca_deploy.serving.options import ServeOptions
    from bca_deploy.serving.prefix import bounded_ids

    tokenizer = _tokenizer(chat_model)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    _, data = load_dataset(path, "causal-lm", tokenizer, 64, model=chat_model)
    ids, labels = data.input_ids[0], data.labels[0]
    start = max(i for i in range(len(labels)) if labels[i] == IGNORE_INDEX) + 1  # the last reply's first token
    renderer = ChatTemplateRenderer(lambda: tokenizer, source="test", timeout_s=30, memory_mb=512, workers=1)
    # serve's own Server.chat_prompt and _chat_ids over a session that tokenizes as MultiAdapterSession.tokenize and
    # text_ids do (its own tokenize, over this tokenizer)
    session = types.SimpleNamespace(max_positions=128, with_past=True,
                                    text_ids=lambda text, most=None, **o: bounded_ids(tokenizer, text, most, **o),
                                    # the chat route's texts reach prepare, which tokenizes them (MultiAdapterSession's
                                    # checks of the ids are the session's business, not this test's)
                                    prepare=lambda rows, input_param, keep_tokens=None, text_options=None:
                                    session.tokenize(rows, refuse_param=input_param, **(text_options or {})))
    session.tokenize = functools.partial(MultiAdapterSession.tokenize, session)
    server = types.SimpleNamespace(_chat_ready=True, options=ServeOptions(), session=session, chat_templates=renderer)
    server._chat_ids = functools.partial(Server._chat_ids, server)
    try:
        served = asyncio.run(Server.chat_prompt(server, TWO_TURNS[:-1]))
    finally:
        renderer.close()
    assert served == ids[:start]
    assert tokenizer.convert_ids_to_tokens(ids[start:]) == "the sky is blue <|eot|>".split()


def test_training_on_conversations_lowers_the_loss(chat_model, tmp_path):
    colours, things = ("red", "blue", "hot", "cold"), ("sky", "sea", "tree", "sun", "water", "rain")
    records = [{"messages": [{"role": "user", "content": f"what about the {thing}"},
                             {"role": "assistant", "content": f"the {thing} is {colours[i % 4]}"},
                             {"role": "user", "content": "and you"},
                             {"role": "assistant", "content": "yes"}]}
               for i, thing in enumerate(things * 6)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    result = train(config(chat_model, path, tmp_path / "out", task="causal-lm", eval_data=path, max_steps=24,
                          eval_every=4, lr=1e-1, block_size=4))
    losses = [h["loss"] for h in result.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.05, losses  # (3.53 -> 3.43 here)
    # the loss is taken on the assistant turns alone: 'the THING is COLOUR <|eot|>' and 'yes <|eot|>', 7 tokens each
    assert result.history[-1]["tokens"] == 7 * len(records)
    info = json.loads((result.last_dir / "bca_training.json").read_text())
    assert info["messages_column"] == "messages" and info["tools_column"] == "tools"
    # evaluate reads the file as train did (the column recorded with the adapter)
    last = {k: v for k, v in result.history[-1].items() if k != "step"}
    assert evaluate(EvaluateConfig(model=chat_model, adapter=result.out_dir / "best", data=path)) == last


def test_precedence_and_renamed_column(chat_model, tmp_path):
    tokenizer = _tokenizer(chat_model)
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "how is the", "response": "water", "messages": TWO_TURNS}])
    examples, _ = load_dataset(both, "causal-lm", tokenizer, 64, model=chat_model)
    assert examples.format == "prompt-response"  # a prompt/response pair wins
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"chat": TWO_TURNS, "text": "the sun"}])
    examples, data = load_dataset(renamed, "causal-lm", tokenizer, 64, messages_column="chat", model=chat_model)
    assert examples.format == "messages" and data.labels[0] == _reference(tokenizer, TWO_TURNS)[1]
    examples, _ = load_dataset(renamed, "causal-lm", tokenizer, 64, model=chat_model)
    assert examples.format == "text"  # no 'messages' column: the text column


def test_bad_conversations_are_refused_by_line_and_field(chat_model, tmp_path):
    tokenizer = _tokenizer(chat_model)
    user = {"role": "user", "content": "how is the water"}
    rows = [{"messages": TWO_TURNS},
            {"messages": [user, {"role": "function", "content": "hot"}]},
            {"messages": [user, {"role": "assistant", "content": 3}]},
            {"messages": [user]},
            {"messages": "how is the water"},
            {"messages": [user, {"content": "hot"}]},
            {"messages": []}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", tokenizer, 64, model=chat_model)
    message = str(caught.value)
    assert str(path) in message and "line 1:" not in message
    for expected in ("line 2: messages[1].role must be one of 'system', 'developer', 'user', 'assistant', 'tool', "
                     "got 'function'",
                     "line 3: messages[1].content: must be a string or a list of text parts, got 3",
                     "line 4: 'messages' has no \"assistant\" message",
                     "line 5: 'messages' must be a non-empty list",
                     "line 6: messages[1].role must be one of 'system', 'developer', 'user', 'assistant', 'tool', "
                     "got none",
                     "line 7: 'messages' must be a non-empty list"):
        assert expected in message, message


def test_a_content_that_is_not_text_is_refused_by_line_and_field(chat_model, tmp_path):
    """A lone surrogate (``"\\ud800"`` in JSON) or a NUL in a message's content: refused as the text columns refuse
    them (before: the tokenizer's TypeError, an internal error, exit 70)."""
    path = tmp_path / "odd.jsonl"
    assistant = '{"role": "assistant", "content": '
    path.write_text('{"messages": [{"role": "user", "content": "how \\ud800 is"}, ' + assistant + '"hot"}]}\n'
                    '{"messages": [{"role": "user", "content": "how"}, ' + assistant + '"hot\\u0000"}]}\n')
    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", _tokenizer(chat_model), 64, model=chat_model)
    message = str(caught.value)
    assert "line 1: column 'messages[0].content' holds a lone surrogate '\\ud800' at character 5" in message, message
    assert "line 2: column 'messages[1].content' holds a NUL character at character 4" in message, message


def test_a_template_refusing_every_row_stops_after_eleven(tmp_path):
    """A template that fails every conversation (raises here; loops to the 5 s bound in the worst case) is stopped
    after the 11 problems it shows, not run over the whole file (before: every row, 5 s each for a looping one:
    hours on a 10,000-row file)."""
    model = _chat_model(tmp_path / "llama", template="{{ raise_exception('no conversations here') }}")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": TWO_TURNS}] * 40)
    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", _tokenizer(model), 64, model=model)
    message = str(caught.value)
    assert "line 1: the chat template refused the conversation (no conversations here)" in message, message
    assert message.endswith("... and 1 more"), message


def test_replies_past_max_length_are_not_rendered(chat_model, tmp_path, monkeypatch):
    """Each reply takes two renders of the conversation up to it; those starting past max_length are cut away, so
    they are not rendered (before: a row of 10,000 short messages, under the character bound, rendered 10,000
    times: minutes). The labels are the reference's, cut at max_length."""
    from bca_deploy.serving.chat_template import ChatTemplateRenderer

    renders = []
    real = ChatTemplateRenderer.render_sync
    monkeypatch.setattr(ChatTemplateRenderer, "render_sync",
                        lambda self, *a, **k: renders.append(1) or real(self, *a, **k))
    tokenizer = _tokenizer(chat_model)
    messages = [{"role": ("user", "assistant")[i % 2], "content": "yes"} for i in range(200)]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": messages}])
    _, data = load_dataset(path, "causal-lm", tokenizer, 16, model=chat_model)
    ids, labels = _reference(tokenizer, messages)
    assert data.input_ids[0] == ids[:16] and data.labels[0] == labels[:16]
    assert len(renders) <= 10, len(renders)


def test_a_model_without_a_chat_template_is_refused_before_training(tmp_path):
    plain = _chat_model(tmp_path / "plain", template=None)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(DataError) as caught:
        train(config(plain, path, tmp_path / "out", task="causal-lm", max_steps=1))
    message = str(caught.value)
    assert str(plain) in message and "no" in message and "chat template" in message and "prompt/response" in message
    assert not (tmp_path / "out").exists()


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """A template numbering turns from the total (``loop.length``) writes the first turn differently once a reply
    follows it: the reply's span cannot be found from prefixes, and training says so instead of guessing."""
    rewriting = ("{{ bos_token }}{% for m in messages %}<|start|> {{ m['role'] }} {{ 'one' if loop.length > 2 "
                 "else 'two' }} <|sep|> {{ m['content'] }} <|eot|> {% endfor %}"
                 "{% if add_generation_prompt %}<|start|> assistant <|sep|> {% endif %}")
    model = _chat_model(tmp_path / "rewriting", template=rewriting)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", _tokenizer(model), 64, model=model)
    message = str(caught.value)
    assert "line 1: message 2 (assistant)" in message and "rewrites earlier turns" in message, message


def test_a_generation_prompt_ending_in_a_space_is_refused_naming_the_token_that_joins_it_to_the_reply(tmp_path):
    """helper-111: a template whose generation prompt ends in "assistant: " with a byte-level BPE (" the" one token)
    renders the turns one after another, but the prompt's tokens are no prefix of the conversation's: it was refused
    as "the template rewrites earlier turns", which sent the user after the wrong cause. Now the message names the
    join and what to change."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [" ".join(WORDS)] * 20 + ["user: how is the water\nassistant: the water is hot\n"] * 20
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    directory = tmp_path / "spaced"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    messages = [{"role": "user", "content": "how is the water"}, {"role": "assistant", "content": "the water is hot"}]
    # the premise: the texts follow one another, the tokens do not
    before = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert whole.startswith(before)
    ids = functools.partial(tokenizer, add_special_tokens=False)
    assert ids(whole)["input_ids"][:len(ids(before)["input_ids"])] != ids(before)["input_ids"]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", _tokenizer(directory), 64, model=directory)
    message = str(caught.value)
    assert "line 1: message 1 (assistant)" in message and "'assistant: '" in message, message
    assert "as one token" in message and "rewrites earlier turns" not in message, message
