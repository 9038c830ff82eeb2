"""Log-probabilities of byte-level tokens that are only part of a character, through the official ``openai`` client
against a real ``bca-deploy serve``.

A byte-level BPE (GPT-2's, Llama 3's, Qwen's) writes an emoji or a CJK character it has no merge for as two to four
tokens, each a piece of the character's UTF-8. Decoded alone each is ``"\\ufffd"``: the server listed them all as
``"�"`` (chat's ``bytes`` were ``[239, 191, 189]``, the replacement character's, not the token's), and completions'
``top_logprobs`` dict kept one of them (every such alternative had the same key). OpenAI writes such a token as
``"bytes:\\xe2\\x80"`` with its true bytes; so does the server now, and every test here fails on the code before.

The reference is independent of the serving code: the tokenizer's own vocabulary pieces
(``convert_ids_to_tokens``) read through GPT-2's byte table (written out here, checked against transformers' copy
where it has one), the prompt's UTF-8 (the pieces' bytes put together must be it), and the in-process
:class:`~bca_deploy.serving.MultiAdapterSession`'s greedy tokens (which ``test_session.py`` checks against PyTorch).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import ServeProcess, _save_adapter, openai_client  # noqa: E402

from bca_deploy.serving import MultiAdapterSession  # noqa: E402

#: Emoji and CJK: the BPE below learns merges for some of these characters (whole-character tokens) and leaves the
#: others as their bytes (partial tokens).
PROMPT = "the water 😊 is 水 and 日本語 🎉 hot 龍"
CORPUS = ["the water is hot and you can see the day", "the water 😊 is hot", "水 水 水 and the water",
          "hello world"]
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant :{% endif %}")
TOP = 20


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode``, inverted: a byte-level piece's character -> its byte (as published by OpenAI's
    GPT-2 encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny Llama export (one adapter) whose tokenizer is a byte-level BPE with a chat template."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bca_deploy.exporters import export as export_model

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = TEMPLATE
    vocab = len(tokenizer)

    def model():
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2))

    root = tmp_path_factory.mktemp("byte-tokens")
    model().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapter = _save_adapter(model, root / "adapters" / "a0", ["q_proj", "v_proj"], 8, 3)
    onnx = Path(export_model(root / "model", root / "onnx", [adapter], merge=False, bank=True,
                             task="text-generation-with-past", verbose=False))
    return onnx


@pytest.fixture(scope="module")
def llm(export, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "byte-tokens-serve.log"
    with ServeProcess(export, "--served-model-name", "tiny-bytes", "--max-wait-ms", "2", log=log) as process:
        yield openai_client(process.url)


@pytest.fixture(scope="module")
def session(export):
    return MultiAdapterSession(export, intra_op_threads=1)


class Pieces:
    """Each token id's text and bytes in log-probabilities, from the tokenizer's vocabulary and GPT-2's byte table:
    a piece whose bytes are not valid UTF-8 alone is ``"bytes:"`` + each byte as ``\\xNN``; any other is the id
    decoded alone (special tokens kept) and its UTF-8."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        table = gpt2_byte_decoder()
        self.raw: dict[int, bytes] = {}
        self.text: dict[int, str] = {}
        special = set(tokenizer.all_special_ids)
        for token in range(len(tokenizer)):
            piece = tokenizer.convert_ids_to_tokens(token)
            if token in special:
                self.raw[token], self.text[token] = piece.encode(), piece
                continue
            raw = bytes(table[c] for c in piece)
            self.raw[token] = raw
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                self.text[token] = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            else:
                self.text[token] = tokenizer.decode([token], skip_special_tokens=False)
        self.by_text = {text: token for token, text in self.text.items()}

    def partial(self, token: int) -> bool:
        return self.text[token].startswith("bytes:")


@pytest.fixture(scope="module")
def pieces(session):
    """The reference, checked: the byte table is transformers' own (where it still has a copy), the prompt's pieces
    put together are its UTF-8, it has partial tokens and whole non-ASCII characters, and no two ids share a text."""
    try:
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    except ImportError:  # transformers 5 dropped its copy
        pass
    else:
        assert gpt2_byte_decoder() == {c: b for b, c in bytes_to_unicode().items()}
    reference = Pieces(session.tokenizer)
    ids = session.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert b"".join(reference.raw[t] for t in ids) == PROMPT.encode()
    assert any(reference.partial(t) for t in ids)
    assert any(not reference.partial(t) and not reference.raw[t].isascii() for t in ids)  # " 😊", " 水"
    assert len(reference.by_text) == len(reference.text)
    return reference


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_write_partial_tokens_as_their_bytes(llm, session, pieces, stream):
    """``echo`` with ``logprobs`` 20: the prompt's tokens (emoji and CJK pieces among them) and the generated ones are
    each the reference's text; each position's ``top_logprobs`` has its 20 alternatives (plus the chosen one), none
    lost to another's key."""
    ids = session.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    generated = session.generate([ids], ["a0"], max_new_tokens=4)[0]
    answer = llm.completions.create(model="a0", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=TOP,
                                    stream=stream)
    tokens, tops = [], []
    for choice in ([c for chunk in answer for c in chunk.choices] if stream else answer.choices):
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            tops += choice.logprobs.top_logprobs
    assert tokens == [pieces.text[t] for t in [*ids, *generated]]
    assert tops[0] is None
    partial = 0
    for position, top in enumerate(tops[1:], start=1):
        assert TOP <= len(top) <= TOP + 1, (position, top)  # each alternative its own key
        assert all(key in pieces.by_text for key in top), top
        assert tokens[position] in top
        partial += sum(key.startswith("bytes:") for key in top)
    assert partial > len(tops)  # partial tokens are among the alternatives, several per position


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_give_partial_tokens_their_true_bytes(llm, session, pieces, stream):
    """Chat's ``logprobs`` with ``top_logprobs`` 20: each token's ``bytes`` are its own (a partial token's are not
    the replacement character's), its ``token`` the reference's text; a whole-character token is unchanged (its
    decode and that decode's UTF-8)."""
    messages = [{"role": "user", "content": PROMPT}]
    text = session.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = session.tokenizer(text, add_special_tokens=False)["input_ids"]
    generated = session.generate([ids], ["a0"], max_new_tokens=6)[0]
    answer = llm.chat.completions.create(model="a0", messages=messages, max_tokens=6, temperature=0, stream=stream,
                                         logprobs=True, top_logprobs=TOP)
    content = [entry for chunk in answer for c in chunk.choices if c.logprobs for entry in c.logprobs.content] \
        if stream else answer.choices[0].logprobs.content
    assert [c.token for c in content] == [pieces.text[t] for t in generated]
    assert [c.bytes for c in content] == [list(pieces.raw[t]) for t in generated]
    seen_partial = seen_whole = 0
    for c in content:
        assert len({t.token for t in c.top_logprobs}) == TOP
        for alternative in c.top_logprobs:
            token = pieces.by_text[alternative.token]
            assert alternative.bytes == list(pieces.raw[token]), alternative
            if pieces.partial(token):
                seen_partial += 1
                assert alternative.bytes != [239, 191, 189]
            else:
                seen_whole += 1
                assert alternative.token == session.tokenizer.decode([token], skip_special_tokens=False)
                assert alternative.bytes == list(alternative.token.encode())
    assert seen_partial and seen_whole
