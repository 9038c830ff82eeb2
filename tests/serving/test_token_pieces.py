"""A token's own text and bytes in log-probabilities (:func:`bca_deploy.serving.session.token_pieces`) for the byte
decoders other than byte-level BPE's (``test_openai_byte_tokens.py`` serves that one): SentencePiece's byte fallback
(Llama 2, Mistral, Gemma write a character missing from the vocabulary as ``<0xE2>`` pieces), and a tokenizer with no
byte decoder, whose tokens are text whatever they hold.

The reference is the text's own UTF-8: the pieces the tokenizer gives for a character, read as the hex they name, put
together, must be its bytes; each piece of a character alone is ``"bytes:\\xNN"``, and a whole character is its decode.
"""

from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")

from bca_deploy.serving.session import token_pieces  # noqa: E402


def byte_fallback_tokenizer():
    """A SentencePiece-style BPE: "▁" for spaces, a few words, every byte as ``<0xNN>``, decoded as Llama 2's is."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "é": 4, **{f"<0x{b:02X}>": 5 + b for b in range(256)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_pieces_of_a_character_are_written_as_their_bytes():
    tok = byte_fallback_tokenizer()
    for character in ("’", "水", "😊"):
        ids = [t for t in tok(character, add_special_tokens=False)["input_ids"] if t != 3]  # less the "▁" before it
        assert len(ids) == len(character.encode()) > 1
        pieces = token_pieces(tok, ids)
        raw = [bytes([int(tok.convert_ids_to_tokens(t)[3:5], 16)]) for t in ids]
        assert b"".join(raw) == character.encode()
        assert [pieces[t] for t in ids] == [(f"bytes:\\x{r[0]:02x}", r) for r in raw]
    # a whole character of the vocabulary, and a byte piece that is one (ASCII): their decode and its UTF-8
    whole = tok.convert_tokens_to_ids(["é", "<0x41>"])
    assert [token_pieces(tok, whole)[t] for t in whole] == [("é", "é".encode()), ("A", b"A")]


def test_a_tokenizer_without_a_byte_decoder_keeps_its_tokens_text():
    """A word-level vocabulary that holds U+FFFD itself: no byte decoder, so it is that text and that text's UTF-8."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "\ufffd": 1, "water": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    assert token_pieces(tok, [1, 2]) == {1: ("\ufffd", "\ufffd".encode()), 2: ("water", b"water")}
