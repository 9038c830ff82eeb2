"""Causal-lm examples longer than the model itself (its positions, or its tokenizer's ``model_max_length``).

helper-141 (walking train -> serve with a Qwen2.5-style tools template on a 512-position model): a tools prompt of
~800 tokens was left out with "raise --max-length to train on them"; raised to 1024, the run said "examples are cut at
512 tokens" and then the same advice again, which cannot help. transformers also printed "Token indices sequence
length is longer than the specified maximum sequence length for this model (791 > 512). Running this sequence
through the model will result in indexing errors" about a conversation that is cut before any model reads it. The
advice now names the model's limit and says to shorten the examples, and the transformers line is gone."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import config, write_jsonl

from bca_deploy.training import DataError, EvaluateConfig, evaluate, train

#: Each turn ``<|start|> ROLE <|sep|> CONTENT <|eot|>`` after a BOS (a Llama-3-like template).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|> {{ m['role'] }} <|sep|> {{ m['content'] }} <|eot|> "
            "{% endfor %}{% if add_generation_prompt %}<|start|> assistant <|sep|> {% endif %}")
WORDS = ["the", "water", "is", "hot", "how", "sky", "blue", "what", "about", "you", "may", "call", "these", "tools"]
SPECIALS = ["<unk>", "<s>", "</s>", "<|start|>", "<|sep|>", "<|eot|>", "system", "user", "assistant"]
#: the model's positions, and its tokenizer's model_max_length
POSITIONS = 24
SHORT = {"messages": [{"role": "user", "content": "how is the water"},
                      {"role": "assistant", "content": "the water is hot"}]}  # 17 tokens
#: a long system prompt (a tools list, in a real template) before the reply: its prompt alone is 40+ tokens
LONG = {"messages": [{"role": "system", "content": " ".join(["you may call these tools"] * 7)},
                     {"role": "user", "content": "what about the sky"},
                     {"role": "assistant", "content": "the sky is blue"}]}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A tiny random Llama of :data:`POSITIONS` positions, its word-level tokenizer's ``model_max_length`` the same
    (as a real checkpoint's: Qwen2.5's 32768 and its config's max_position_embeddings)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("positions") / "llama"
    vocab = SPECIALS + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<unk>", model_max_length=POSITIONS)
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=POSITIONS,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_examples_longer_than_the_model_are_not_sent_to_a_longer_max_length(small_model, tmp_path, capfd):
    data = write_jsonl(tmp_path / "chat.jsonl", [SHORT, LONG, SHORT])
    train(config(small_model, data, tmp_path / "run", task="causal-lm", max_length=64, max_steps=1, batch_size=2))
    err = capfd.readouterr().err
    assert f"examples are cut at {POSITIONS} tokens" in err, err  # (the clip itself, as before)
    [note] = [line for line in err.splitlines() if "no target token" in line]
    assert f"1 example has no target token within max_length={POSITIONS}" in note and "(line 2)" in note, note
    assert f"the model reads at most {POSITIONS} tokens (its positions)" in note, note
    assert "shorten them" in note and "raise --max-length" not in note, note
    # below the model's limit, a longer max_length does help: the advice stays
    train(config(small_model, data, tmp_path / "run2", task="causal-lm", max_length=20, max_steps=1, batch_size=2))
    [note] = [line for line in capfd.readouterr().err.splitlines() if "no target token" in line]
    assert note.endswith("raise --max-length to train on them"), note


def test_no_indexing_errors_line_from_transformers_for_a_conversation_cut_before_the_model(small_model, tmp_path,
                                                                                          capfd, caplog):
    """transformers' "Token indices sequence length is longer than the specified maximum sequence length for this
    model (42 > 24). Running this sequence through the model will result in indexing errors": the conversation is
    tokenized whole to find its turns, then cut; no model runs it. Each process prints it once per tokenizer."""
    data = write_jsonl(tmp_path / "chat.jsonl", [SHORT, LONG, SHORT])
    train(config(small_model, data, tmp_path / "run", task="causal-lm", max_length=POSITIONS, max_steps=1,
                 batch_size=2))
    err = capfd.readouterr().err
    assert "no target token" in err, err  # the long conversation was read (and left out)
    # printed by transformers' own handler, or (under pytest, which holds the stream it was made with) its record
    for said in (err, caplog.text):
        assert "Token indices sequence length" not in said and "indexing errors" not in said, said


def test_a_file_of_only_such_examples_is_refused_naming_the_models_limit(small_model, tmp_path):
    train(config(small_model, write_jsonl(tmp_path / "chat.jsonl", [SHORT, SHORT]), tmp_path / "run",
                 task="causal-lm", max_length=POSITIONS, max_steps=1, batch_size=2))
    held = write_jsonl(tmp_path / "held.jsonl", [LONG, LONG])
    with pytest.raises(DataError) as caught:
        evaluate(EvaluateConfig(model=small_model, adapter=tmp_path / "run", data=held))
    message = str(caught.value)
    assert f"no example has a target token within max_length={POSITIONS}" in message, message
    assert f"the model reads at most {POSITIONS} tokens (its positions)" in message, message
    assert "raise max_length" not in message, message
