"""Tokenizing only as much of a long text as its answer needs: the one rule of every route that takes text.

A request's texts are bounded in characters (``--max-text-chars`` each, ``--max-body-bytes`` in all), not in tokens,
so tokenizing them whole let one request cost seconds of CPU before it was refused (120 prompts of 32,300
characters to a 128-position model: 3.9 MB tokenized, then a 400 ``context_length_exceeded``) while other tenants'
requests waited for the CPU. :func:`bounded_ids` tokenizes a long text's prefix first, doubling it only while the
prefix cannot settle the answer, and the whole text only when no prefix did:

- **refusal** (``most``: decoders' prompts and chat conversations, held to the context): a prefix with more than
  ``most`` + :data:`PREFIX_SLACK_TOKENS` *settled* tokens (below) proves the whole text longer than ``most``, so it
  is refused (:class:`TextPastLimit`) having read about ``most`` tokens' worth of characters. A text that fits is
  never refused so: it ends up tokenized whole, its ids exactly the tokenizer's;
- **truncation** (``truncation=True, max_length=N``: encoders' texts, cut at the model's length): a prefix cut at a
  space whose ``N`` kept tokens are all settled gives exactly the whole text's truncated ids;
- **truncation from the left** (the tokenizer's ``truncation_side`` "left": vLLM's ``truncate_prompt_tokens`` on a
  decoder's prompt keeps its *last* tokens): the mirror image, a *suffix* (below).

A prefix's settled tokens are those ending at least :data:`PREFIX_MARGIN_CHARS` characters before its cut (and the
special tokens the tokenizer adds, offsets ``(0, 0)``: the whole text gets the same ones). Why they are the whole
text's first tokens:

- a prefix is cut just before a space that follows a non-space, where there is one near its end
  (:func:`prefix_cut`). The pre-tokenizers of the common families end a piece there (byte-level BPE's regex: GPT-2,
  RoBERTa, Llama 3, Qwen; ``Metaspace``: SentencePiece, XLM-R, T5; ``BertPreTokenizer``; ``Whitespace``; and Llama
  2's BPE, with no pre-tokenizer, has no token with a space after another character: SentencePiece trains its
  pieces within words), normalizers act within a character and its combining marks (lowercasing, accent
  stripping, NFKC, BERT's removal of control characters), and the model tokenizes each piece alone (BPE, WordPiece, Unigram, WordLevel): the prefix's tokens are the whole
  text's first tokens, one for one;
- a text with no such space near the cut (one run of thousands of letters, CJK without spaces) is cut mid-piece.
  There a token can depend on the piece's length (BPE's merges and Unigram's best segmentation of a periodic run
  shift their phase), but not the count over the same characters by more than a token or two: refusals, which
  need only the count, keep :data:`PREFIX_SLACK_TOKENS` in hand; truncation, which needs the tokens, is read from
  a prefix cut at a space only (else a longer one, else the whole text).

``tests/serving/test_prefix.py`` checks both against whole-text tokenization on hostile texts (100-character words,
runs of one letter, CJK, control characters, accents, whitespace runs) for WordPiece behind BERT's normalizer,
byte-level BPE, Unigram behind NFKC and ``Metaspace``, and BPE with no pre-tokenizer.

A text truncated from the left is read from a suffix starting at a space that follows a non-space (:func:`suffix_cut`;
none near: a longer suffix, else the whole text). The whole text's pieces from that space on are the suffix's, one
for one, by the argument above, except where a normalizer writes something at the start of a text: Llama 2's
``Prepend("▁")`` makes the suffix's first word ``▁▁word`` where the whole text has ``▁word``, so that word's tokens
(and, in a long run of one letter, their phase) may differ. No token spans a space after a non-space (above), so the
tokens from the *second* word end of the suffix on are the whole text's, whatever came before. A suffix's settled
tokens are those starting there and at least :data:`PREFIX_MARGIN_CHARS` in; when ``N`` of them are settled (N: the
``max_length``), the tokenizer's own left truncation of the suffix keeps settled tokens only, the whole text's last
ones, with the same special tokens around them.

A ``max_length`` below the special tokens the tokenizer adds is not truncated by transformers at all (it logs an
error and returns every token): such a text is tokenized whole, so its ids are still exactly the tokenizer's.

A normalizer that deletes text (BERT drops control characters and whitespace) only makes a prefix settle later:
it doubles until it settles or is the whole text. Before a refusal or a truncation, a text thus costs at most about
four times the characters holding ``most`` (or ``N``) tokens, plus the margin, whatever its length; a text that
fits costs what it did, and at most about three times that where it is longer than the first prefix.
Slow (Python) tokenizers give no character offsets: their texts are tokenized whole, as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["bounded_ids", "bounded_text", "TextPastLimit", "PREFIX_CHARS_PER_TOKEN", "PREFIX_MARGIN_CHARS", "PREFIX_SLACK_TOKENS",
           "CUT_WINDOW_CHARS", "prefix_cut", "suffix_cut"]

#: The first prefix of a long text holds this many characters per token the answer needs (twice English text's
#: average of about four), plus the margin: most texts past the context are refused from it, and a text that fits
#: is rarely longer, so is tokenized once, whole.
PREFIX_CHARS_PER_TOKEN = 8
#: A prefix's tokens ending within this many characters of its cut are not counted as the whole text's (see the
#: module docstring): above WordPiece's 100-character words, and far above what a BPE merge or a Unigram segment
#: reaches back.
PREFIX_MARGIN_CHARS = 256
#: A refusal needs this many settled tokens more than ``most``: where a text is cut mid-word, the whole text's count
#: over the same characters may be lower by a few (checks found at most 2).
PREFIX_SLACK_TOKENS = 16
#: A prefix is cut at the last space after a non-space within this many characters of its end, where there is one.
CUT_WINDOW_CHARS = 4096

# " " followed by a non-space, in the reversed window: the last "X " of the window read forwards
_WORD_END_REVERSED = re.compile(r" (?=\S)")
# a space after a non-space, read forwards (where a suffix starts)
_WORD_END = re.compile(r"(?<=\S) ")


class TextPastLimit(Exception):
    """A text shown to have more than the ``most`` tokens asked for: ``tokens`` settled tokens already in its first
    ``chars`` characters (of ``length``). Caught by :meth:`~bca_deploy.serving.MultiAdapterSession.tokenize`, which
    refuses the request with the context-length error naming its field."""

    def __init__(self, tokens: int, chars: int, length: int) -> None:
        super().__init__(f"at least {tokens} tokens in the first {chars} of {length} characters")
        self.tokens, self.chars, self.length = tokens, chars, length


def prefix_cut(text: str, chars: int) -> tuple[int, bool]:
    """Where a prefix of about ``chars`` characters of ``text`` (longer than that) ends, and whether there is a space
    there: just before the last space following a non-space within :data:`CUT_WINDOW_CHARS` (and the second half) of
    the first ``chars`` characters, else at ``chars``, mid-word."""
    low = max(1, chars // 2, chars - CUT_WINDOW_CHARS)
    window = text[low:chars + 1][::-1]
    match = _WORD_END_REVERSED.search(window)
    return (low + len(window) - 1 - match.start(), True) if match else (chars, False)


def suffix_cut(text: str, chars: int) -> tuple[int, bool]:
    """Where a suffix of about ``chars`` characters of ``text`` (longer than that) starts, and whether there is a space
    there: at the first space following a non-space within :data:`CUT_WINDOW_CHARS` (and the first half) of the last
    ``chars`` characters, the suffix starting with that space; else at ``len(text) - chars``, mid-word."""
    start = len(text) - chars
    match = _WORD_END.search(text, start, start + min(chars // 2, CUT_WINDOW_CHARS) + 1)
    return (match.start(), True) if match else (start, False)


def bounded_ids(tokenizer: Callable[..., Mapping[str, Any]], text: str, most: int | None = None,
                **options: Any) -> list[int]:
    """The token ids of ``text`` as ``tokenizer(text, **options)["input_ids"]`` gives them, tokenizing no more of a
    long text than its answer needs (see the module docstring).

    ``most``: the most tokens the text may have (not with truncation): a text shown longer raises
    :class:`TextPastLimit` (one with up to ``most`` tokens gives its ids as the tokenizer does; one a little longer
    may too, for the caller to refuse). With ``truncation=True`` and an integer ``max_length`` in ``options`` (cut on
    the right), the ids are the whole text's truncated ids, from a prefix cut at a space where that settles them;
    with the tokenizer's ``truncation_side`` "left" (its last tokens kept), from a suffix starting at a space.
    """
    if _keeps_end(tokenizer, options):
        return _bounded_suffix(tokenizer, text, options)
    return _bounded(tokenizer, text, most, options)[1]


def bounded_text(tokenizer: Callable[..., Mapping[str, Any]], text: str,
                 **options: Any) -> tuple[str, list[int]]:
    """A prefix of ``text`` that ``tokenizer(prefix, **options)`` (``truncation=True`` and an integer ``max_length``)
    tokenizes to the whole text's truncated ids, and those ids; ``text`` itself where no prefix settles them (see the
    module docstring). A prefix, when cut, holds at least ``max_length`` tokens, the whole text's first ones: what a
    text pair needs, whose two texts are truncated together (:meth:`~bca_deploy.serving.MultiAdapterSession.
    tokenize_pairs`)."""
    return _bounded(tokenizer, text, None, options)


def _bounded(tokenizer: Callable[..., Mapping[str, Any]], text: str, most: int | None,
             options: Mapping[str, Any]) -> tuple[str, list[int]]:
    """(the prefix of ``text`` read, its ids): :func:`bounded_ids`' and :func:`bounded_text`'s one loop."""
    truncate = _truncates(options)
    need = options["max_length"] if truncate else most
    fast = getattr(tokenizer, "is_fast", False) is True  # offsets need a fast (Rust) tokenizer
    if truncate and (getattr(tokenizer, "truncation_side", "right") != "right" or _below_specials(tokenizer, options)):
        need = None  # the end of the text is kept (no prefix settles it), or nothing is cut: the whole text
    if need is not None and fast:
        chars = (need + 1 + PREFIX_SLACK_TOKENS) * PREFIX_CHARS_PER_TOKEN + PREFIX_MARGIN_CHARS
        while len(text) > chars:
            cut, at_space = prefix_cut(text, chars)
            chars *= 2
            if truncate and not at_space:
                continue  # mid-word, the tokens before the cut may differ (not only their count): a longer prefix
            encoding = tokenizer(text[:cut], return_offsets_mapping=True, **options)
            ids, settled = encoding["input_ids"], cut - PREFIX_MARGIN_CHARS
            ends = [end for _, end in encoding["offset_mapping"]]
            if truncate:
                if len(ids) >= need and max(ends, default=0) <= settled:
                    # the whole text has these first tokens, and at least as many: cut the same
                    return text[:cut], list(ids)
            else:
                tokens = sum(1 for end in ends if end <= settled)
                if tokens > need + PREFIX_SLACK_TOKENS:
                    raise TextPastLimit(tokens, cut, len(text))
    return text, list(tokenizer(text, **options)["input_ids"])


def _truncates(options: Mapping[str, Any]) -> bool:
    return options.get("truncation") is True and isinstance(options.get("max_length"), int)


def _keeps_end(tokenizer: Any, options: Mapping[str, Any]) -> bool:
    """Whether ``options`` truncate with a tokenizer that keeps a text's last tokens."""
    return _truncates(options) and getattr(tokenizer, "truncation_side", "right") == "left"


def _below_specials(tokenizer: Any, options: Mapping[str, Any]) -> bool:
    """Whether ``max_length`` is below the special tokens the tokenizer adds: transformers then cuts nothing (it logs
    an error and returns every token), so no prefix or suffix stands for the whole text."""
    if options.get("add_special_tokens", True) is False:
        return False
    count = getattr(tokenizer, "num_special_tokens_to_add", None)
    return callable(count) and options["max_length"] < count(pair=False)


def _bounded_suffix(tokenizer: Callable[..., Mapping[str, Any]], text: str, options: Mapping[str, Any]) -> list[int]:
    """:func:`bounded_ids` of a text truncated from the left (its last ``max_length`` tokens kept): the tokenizer's
    own truncation of a suffix that starts at a space and has that many settled tokens (see the module docstring),
    else of the whole text."""
    need = options["max_length"]
    if getattr(tokenizer, "is_fast", False) is True and not _below_specials(tokenizer, options):
        probe = {k: v for k, v in options.items() if k not in ("truncation", "max_length", "add_special_tokens")}
        chars = (need + 1 + PREFIX_SLACK_TOKENS) * PREFIX_CHARS_PER_TOKEN + PREFIX_MARGIN_CHARS
        while len(text) > chars:
            cut, at_space = suffix_cut(text, chars)
            chars *= 2
            if not at_space:
                continue  # mid-word: the suffix's first piece is not the whole text's
            suffix = text[cut:]
            second = _WORD_END.search(suffix, 1)  # the suffix's second word end: no token spans it
            if second is None:
                continue
            settled = max(PREFIX_MARGIN_CHARS, second.start())
            encoding = tokenizer(suffix, add_special_tokens=False, return_offsets_mapping=True, **probe)
            if sum(1 for start, _ in encoding["offset_mapping"] if start >= settled) >= need:
                # the last max_length tokens (fewer, less the special tokens) are settled: the whole text's last ones
                return list(tokenizer(suffix, **options)["input_ids"])
    return list(tokenizer(text, **options)["input_ids"])
