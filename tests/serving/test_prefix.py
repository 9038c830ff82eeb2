"""Tokenizing only a long text's prefix (:mod:`bca_deploy.serving.prefix`) against tokenizing it whole.

The reference is the tokenizer itself on the whole text: a text within the limit must get exactly its ids, a refused
one must really be longer, a truncated one must keep exactly the ids truncation keeps, and the characters handed to
the tokenizer must be bounded by the limit, not by the text. Four tokenizer families, built here (nothing
downloaded): WordPiece behind BERT's normalizer (lowercases, strips accents, drops control characters and
whitespace), byte-level BPE (GPT-2, Llama 3), SentencePiece-style Unigram behind NFKC and ``Metaspace`` (XLM-R, T5),
and BPE with no pre-tokenizer over ``▁``-joined text (Llama 2's ``tokenizer.json``); texts drawn to be hostile:
100-character words, runs of thousands of one or two letters, CJK without spaces, control characters, accents,
whitespace runs, special tokens' strings.
"""

from __future__ import annotations

import random
import string
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tokenizer builder

from bca_deploy.serving.prefix import (  # noqa: E402
    PREFIX_CHARS_PER_TOKEN,
    PREFIX_MARGIN_CHARS,
    PREFIX_SLACK_TOKENS,
    TextPastLimit,
    bounded_ids,
    prefix_cut,
    suffix_cut,
)

WORDS = ("the", "water", "is", "hot", "of", "and", "a", "to", "in", "that", "it", "was", "for", "on", "are", "with",
         "they", "be", "at", "one", "have", "this", "from", "Éléphant", "naïve", "cafe\u0301", "ﬁne",
         "Ｆｕｌｌ")


def _piece(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.5:
        return rng.choice(WORDS)
    if k < 0.55:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(90, 180)))  # past WordPiece's 100
    if k < 0.61:
        return "".join(chr(rng.randint(0x4E00, 0x4E80)) for _ in range(rng.randint(1, 400)))  # CJK, no spaces
    if k < 0.65:
        return "\x00\x07\u200b\ufeff"  # BERT's normalizer drops them
    if k < 0.72:
        return rng.choice(["  ", "\t", "\n\n", "   \n ", " \u3000 "])
    if k < 0.78:
        return "".join(rng.choice(".,;!?-=*") for _ in range(rng.randint(1, 40)))
    if k < 0.83:
        return str(rng.randint(0, 10**12))
    if k < 0.86:
        return "🙂👍🏽"
    if k < 0.9:
        return rng.choice(["<s>", "</s>", "[SEP]", "[CLS]", "<unk>"])
    return "x" * rng.randint(300, 5000) if rng.random() < 0.3 else "ab" * rng.randint(100, 3000)  # one long piece


def _text(rng: random.Random, size: int) -> str:
    parts, length = [], 0
    while length < size:
        part = _piece(rng) + rng.choice([" ", " ", " ", "", "\n", "  "])
        parts.append(part)
        length += len(part)
    return "".join(parts)


_CORPUS = [_text(random.Random(i), 300) for i in range(80)]


def _fast(core, **specials):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def _wordpiece():
    from conftest import wordpiece_tokenizer  # BertNormalizer(lowercase: strips accents) + BertPreTokenizer

    return wordpiece_tokenizer(list(dict.fromkeys([
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
        *("##" + c for c in string.ascii_lowercase), *(w for w in WORDS if w.isascii()),
        "ab", "##ab", "##abab", "xx", "##xx", "##xxxx"])))


def _bytelevel():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return _fast(core, bos_token="<s>", eos_token="</s>")


def _unigram():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    rng = random.Random(5)
    pieces = ["<unk>", "<s>", "</s>"]
    pieces += sorted({c for text in _CORPUS for c in text} - {" "}) + ["▁"]
    pieces += ["▁" + w.lower() for w in WORDS] + [w.lower() for w in WORDS]
    pieces += ["ab" * n for n in (1, 2, 3, 4, 8)] + ["▁ab", "▁abab", "b", "ba", "bab"]
    pieces += ["x" * n for n in (2, 3, 5, 8)]
    vocab = [(p, 0.0 if i < 3 else -rng.uniform(1, 12)) for i, p in enumerate(dict.fromkeys(pieces))]
    core = Tokenizer(models.Unigram(vocab, unk_id=0))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return _fast(core, unk_token="<unk>", eos_token="</s>")


def _no_pre_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, processors, trainers

    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.train_from_iterator([t.replace(" ", "▁") for t in _CORPUS[:40]], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _fast(core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


FAMILIES = {"wordpiece": _wordpiece, "bytelevel": _bytelevel, "unigram": _unigram,
            "no_pre_tokenizer": _no_pre_tokenizer}
_BUILT: dict[str, object] = {}


@pytest.fixture(params=sorted(FAMILIES))
def tokenizer(request):
    if request.param not in _BUILT:
        _BUILT[request.param] = FAMILIES[request.param]()
    return _BUILT[request.param]


class Recording:
    """A tokenizer that counts the characters handed to it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars, self.calls = tokenizer, 0, 0

    def __call__(self, text, **options):
        self.chars += len(text)
        self.calls += 1
        return self.tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _ids(tokenizer, text: str, **options) -> list[int]:
    return list(tokenizer(text, **options)["input_ids"])


def test_a_text_gets_the_tokenizers_own_ids_and_is_refused_only_when_it_is_longer(tokenizer):
    rng = random.Random(1)
    refused = fitted = 0
    for i in range(36):
        text = _text(rng, rng.choice([1_500, 6_000, 20_000]))
        options = {"add_special_tokens": False} if i % 2 else {}  # chat prompts: the template wrote them
        whole = _ids(tokenizer, text, **options)
        for most in (16, 100, 400, len(whole), len(whole) - 1):
            try:
                ids = bounded_ids(tokenizer, text, most, **options)
            except TextPastLimit as past:
                refused += 1
                assert len(whole) > most, (most, len(whole), past)
                assert past.tokens <= len(whole) + PREFIX_SLACK_TOKENS and past.chars < len(text)
            else:
                fitted += 1
                assert ids == whole  # a text within the limit: exactly the ids it had
    assert refused > 30 and fitted > 30, (refused, fitted)  # both ways taken


def test_truncated_texts_keep_exactly_the_ids_truncation_keeps(tokenizer):
    rng = random.Random(2)
    for _ in range(30):
        text = _text(rng, rng.choice([1_500, 6_000, 20_000]))
        for length in (8, 64, 512):
            expected = _ids(tokenizer, text, truncation=True, max_length=length)
            assert bounded_ids(tokenizer, text, truncation=True, max_length=length) == expected, length


def test_a_prefix_cut_at_a_space_settles_the_whole_texts_first_tokens(tokenizer):
    """The argument of the module docstring, checked: at a cut before a space that follows a non-space, the
    prefix's tokens ending a margin before the cut are exactly the whole text's first tokens; at a cut mid-word
    (a run of one piece), their count is within the slack of the whole text's over the same characters."""
    rng = random.Random(3)
    spaced = 0
    for _ in range(40):
        text = _text(rng, rng.choice([3_000, 12_000]))
        whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for _ in range(6):
            cut, at_space = prefix_cut(text, rng.randint(600, len(text) - 1))
            assert cut < len(text) and (text[cut] == " " and not text[cut - 1].isspace()) == at_space
            prefix = tokenizer(text[:cut], add_special_tokens=False, return_offsets_mapping=True)
            end = cut - PREFIX_MARGIN_CHARS
            settled = [t for t, (_, e) in zip(prefix["input_ids"], prefix["offset_mapping"]) if e <= end]
            if at_space:
                spaced += 1
                assert settled == whole["input_ids"][:len(settled)], cut
            else:
                over_same = sum(1 for _, e in whole["offset_mapping"] if e <= end)
                assert len(settled) <= over_same + PREFIX_SLACK_TOKENS // 4, cut
    assert spaced > 100


def test_the_work_before_a_refusal_is_bounded_by_the_limit_not_the_text(tokenizer):
    text = "the water is hot " * 1_900  # 32,300 characters, ~7,600 tokens
    first = (128 + 1 + PREFIX_SLACK_TOKENS) * PREFIX_CHARS_PER_TOKEN + PREFIX_MARGIN_CHARS
    recording = Recording(tokenizer)
    with pytest.raises(TextPastLimit) as past:
        bounded_ids(recording, text, 128)
    assert recording.calls == 1 and recording.chars <= first, (recording.calls, recording.chars)
    assert past.value.tokens > 128 + PREFIX_SLACK_TOKENS and past.value.length == len(text)
    recording = Recording(tokenizer)
    expected = _ids(tokenizer, text, truncation=True, max_length=128)
    assert bounded_ids(recording, text, truncation=True, max_length=128) == expected
    assert recording.calls == 1 and recording.chars <= first


def test_text_a_normalizer_deletes_only_makes_the_prefix_grow():
    """BERT's normalizer drops control characters and whitespace and strips accents: a text whose first 40,000
    characters are nothing to it still fits, with exactly its ids, and one past the limit after them is refused."""
    tokenizer = _wordpiece()
    head = "\x00\x07 \t\u200b" * 8_000
    fits = head + "The WATER is Hót " * 20
    whole = _ids(tokenizer, fits)
    assert len(whole) < 100
    assert bounded_ids(tokenizer, fits, 100) == whole
    assert bounded_ids(tokenizer, fits, truncation=True, max_length=40) == _ids(tokenizer, fits, truncation=True,
                                                                                max_length=40)
    recording = Recording(tokenizer)
    with pytest.raises(TextPastLimit):
        bounded_ids(recording, head + "The WATER is Hót " * 8_000, 100)
    assert recording.chars < 4 * (len(head) + 120 * 17)  # doubled past the deleted text, not read to the end


def test_a_text_with_no_offsets_is_tokenized_whole():
    tokenizer = _wordpiece()
    text = "the water is hot " * 500
    slow = Recording(tokenizer)
    slow.is_fast = False  # a Python tokenizer gives no offsets
    assert bounded_ids(slow, text, 16) == _ids(tokenizer, text) and slow.chars == len(text)
    tokenizer.truncation_side = "left"
    try:
        slow = Recording(tokenizer)
        slow.is_fast = False
        assert bounded_ids(slow, text, truncation=True, max_length=16) == _ids(
            tokenizer, text, truncation=True, max_length=16)
        assert slow.chars == len(text)
    finally:
        tokenizer.truncation_side = "right"


@pytest.fixture
def left(tokenizer):
    """The family's tokenizer keeping a text's last tokens (vLLM's tokenizer of a generating model)."""
    tokenizer.truncation_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.truncation_side = "right"


def test_texts_truncated_from_the_left_keep_exactly_the_ids_truncation_keeps(left):
    """vLLM's ``truncate_prompt_tokens`` on a prompt: the last ``max_length`` tokens, special tokens around them, as
    the tokenizer gives them from the whole text; a length below the special tokens (transformers then cuts
    nothing) included."""
    rng = random.Random(12)
    bounded = 0
    for i in range(30):
        text = _text(rng, rng.choice([1_500, 6_000, 20_000]))
        options = {"add_special_tokens": False} if i % 2 else {}
        for length in (1, 2, 8, 64, 512):
            expected = _ids(left, text, truncation=True, max_length=length, **options)
            recording = Recording(left)
            assert bounded_ids(recording, text, truncation=True, max_length=length, **options) == expected, length
            bounded += recording.chars < len(text)
    assert bounded > 15  # the suffix was taken, not only the whole text


def test_a_suffix_cut_at_a_space_settles_the_whole_texts_last_tokens(tokenizer):
    """The suffix argument of the module docstring, checked: from a space after a non-space on, the suffix's tokens
    starting past its second word end and the margin are exactly the whole text's over the same characters, also
    where a run of thousands of one piece follows the cut."""
    from bca_deploy.serving.prefix import _WORD_END

    rng = random.Random(13)
    checked = 0
    for _ in range(40):
        text = _text(rng, rng.choice([3_000, 12_000]))
        if rng.random() < 0.4:  # a long run of one piece right after a word end
            k = rng.randint(300, len(text) - 300)
            text = text[:k] + "x " + rng.choice(["ab", "x", "aab"]) * rng.randint(200, 2000) + " " + text[k:]
        whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for _ in range(6):
            cut, at_space = suffix_cut(text, rng.randint(600, len(text) - 1))
            assert 0 < cut < len(text) and (text[cut] == " " and not text[cut - 1].isspace()) == at_space
            second = _WORD_END.search(text, cut + 1)
            if not at_space or second is None:
                continue
            settled = max(PREFIX_MARGIN_CHARS, second.start() - cut)
            suffix = tokenizer(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
            mine = [t for t, (s, _) in zip(suffix["input_ids"], suffix["offset_mapping"]) if s >= settled]
            theirs = [t for t, (s, _) in zip(whole["input_ids"], whole["offset_mapping"]) if s >= cut + settled]
            assert mine == theirs, cut
            checked += 1
    assert checked > 100


def test_the_work_before_a_left_truncation_is_bounded_by_the_length_not_the_text(left):
    text = "the water is hot " * 1_900  # 32,300 characters, ~7,600 tokens
    first = (128 + 1 + PREFIX_SLACK_TOKENS) * PREFIX_CHARS_PER_TOKEN + PREFIX_MARGIN_CHARS
    recording = Recording(left)
    assert bounded_ids(recording, text, truncation=True, max_length=128) == _ids(left, text, truncation=True,
                                                                                 max_length=128)
    # one look at the suffix, one truncation of it: twice the first suffix at most, whatever the text's length
    assert recording.calls == 2 and recording.chars <= 2 * first, (recording.calls, recording.chars)


def test_prefix_cut_ends_before_a_space_after_a_word():
    text = "aaa bbb   ccc " + "d" * 50
    assert prefix_cut(text, 12) == (7, True)  # "aaa bbb" | "   ccc": the space after the word, not in the run
    assert prefix_cut("x" * 100, 60) == (60, False)
    assert prefix_cut("ab " + "x" * 100, 90) == (90, False)  # the only space is in the first half: mid-word


def test_suffix_cut_starts_at_a_space_after_a_word():
    text = "d" * 50 + " aaa   bbb ccc"
    assert suffix_cut(text, 12) == (54, True)  # "   bbb ccc": from the space after a word, its whole run kept
    assert suffix_cut(text, 8) == (60, True)  # " ccc"
    assert suffix_cut("x" * 100, 60) == (40, False)
    assert suffix_cut("x" * 100 + " ab", 90) == (13, False)  # the only space is in the last half: mid-word
