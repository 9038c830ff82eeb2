"""Shared pieces for the training tests: SST-2 rows from ../shared, a word-level tokenizer, tiny models on disk."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SST2 = REPO.parent / "shared" / "data" / "sst2"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sst2_rows(split: str, n: int, offset: int = 0) -> list[tuple[str, int]]:
    """The first ``n`` (sentence, label) rows of SST-2 ``split`` after ``offset``."""
    rows = []
    with open(SST2 / f"{split}.tsv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for i, (sentence, label) in enumerate(reader):
            if i < offset:
                continue
            if len(rows) == n:
                break
            rows.append((sentence.strip(), int(label)))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        f.writelines("\t".join(str(v) for v in row) + "\n" for row in rows)
    return path


def text_pair_data(root: Path) -> tuple[Path, Path, Path]:
    """``(model, pairs, single)``: a tiny bare BERT over 32 SST-2 training sentences, and those sentences as a file of
    text pairs (``sentence1`` each, ``sentence2`` the one before it) and as a file of single texts, both labelled:
    what a pair-trained and a single-text-trained adapter of one model are trained on."""
    rows = sst2_rows("train", 32)
    model = tiny_model_dir(root / "bare", "bert-bare", [s for s, _ in rows])
    pairs = write_tsv(root / "pairs.tsv", [(s, rows[i - 1][0], y) for i, (s, y) in enumerate(rows)],
                      header=("sentence1", "sentence2", "label"))
    return model, pairs, write_tsv(root / "single.tsv", rows)


def word_tokenizer(directory: Path, texts, vocab_size: int = 100):
    """A BertTokenizerFast over the ``vocab_size - 5`` most frequent words of ``texts``."""
    from conftest import wordpiece_tokenizer

    counts = collections.Counter(w for t in texts for w in t.lower().split())
    words = [w for w, _ in counts.most_common() if w not in SPECIALS][: vocab_size - len(SPECIALS)]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + words) + "\n")
    return wordpiece_tokenizer(SPECIALS + words)  # (not vocab_file=: transformers 5.x ignores it)


def tiny_model_dir(directory: Path, kind: str, texts, num_labels: int = 2, seed: int = 0, dropout: float = 0.1,
                   id2label: dict[int, str] | None = None, initializer_range: float = 0.02) -> Path:
    """Save a tiny random model with a tokenizer: ``bert`` (BertForSequenceClassification, its head saved),
    ``bert-bare`` (BertModel: an encoder without a head, like all-MiniLM-L6-v2), ``llama`` (causal LM) or
    ``gpt2`` (causal LM whose output layer is its input embeddings).

    ``initializer_range`` (BERT): at the usual 0.02 a random tiny encoder's attention is near uniform, so its
    [CLS] output barely depends on the input (differences ~1e-3) and nothing can be learnt from it; 0.2 gives
    features that differ between inputs, for tests that check that training learns."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(directory, texts)
    torch.manual_seed(seed)
    if kind.startswith("bert"):
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=64, num_labels=num_labels,
                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                         initializer_range=initializer_range)
        if id2label is not None:
            cfg.id2label = dict(id2label)
            cfg.label2id = {v: k for k, v in id2label.items()}
        model = BertModel(cfg) if kind == "bert-bare" else BertForSequenceClassification(cfg)
    elif kind == "gpt2":  # input and output embeddings tied (one tensor)
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records) -> Path:
    import json

    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return path


def char_chat_tokenizer(directory: Path, chat_template: str) -> Path:
    """Save at ``directory`` a character-level tokenizer (``<s>``, ``</s>`` and the tool tags single tokens; 103
    tokens) carrying ``chat_template``: what the conversation path reads (the tokenizer and its template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "\n", *(chr(c) for c in range(32, 127)), "<tool_call>", "</tool_call>",
             "<tool_response>", "</tool_response>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"</?tool_call>|</?tool_response>|</?s>|[\s\S]"),
                                              behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return directory


def chat_reference(tokenizer, messages, tools=None, ignore_index: int = -100) -> tuple[list[int], list[int]]:
    """By hand: transformers' render of ``messages`` (with ``tools``), tokenized; the labels are the tokens of each
    assistant turn's text past ``<s>assistant\\n`` through its ``</s>`` (found in the text, mapped by the tokens'
    offsets), ``ignore_index`` elsewhere. For templates writing each turn as ``<s>ROLE\\nTEXT</s>``."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans, at = [], 0
    while (start := text.find("<s>assistant\n", at)) >= 0:
        end = text.index("</s>", start) + len("</s>")
        spans.append((start + len("<s>assistant\n"), end))
        at = end
    labels = [t if any(a <= s < b for a, b in spans) else ignore_index for t, (s, _) in zip(ids, offsets)]
    return ids, labels


def refused_conversations(path: Path, tokenizer, model: Path, expected) -> str:
    """``load_dataset`` of the causal-lm file ``path`` refuses it; every line of ``expected`` is in the message, which
    names no problem on line 1 (the good row every bad-rows file starts with). Returns the message."""
    from bca_deploy.training import DataError
    from bca_deploy.training.data import load_dataset

    with pytest.raises(DataError) as caught:
        load_dataset(path, "causal-lm", tokenizer, 1024, model=model)
    message = str(caught.value)
    assert "line 1:" not in message, message
    for line in expected:
        assert line in message, message
    return message


def read_tensors(directory: Path) -> dict:
    """Every tensor an adapter directory (or trainer state) holds, by name."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for name in ("adapter_model.safetensors", "trainable_parameters.safetensors"):
        if (directory / name).is_file():
            out.update(load_file(str(directory / name)))
    state = directory / "trainer_state.pt"
    if state.is_file():
        out.update({f"state.{k}": v for k, v in torch.load(state, weights_only=True)["trainable"].items()})
    return out


def data_and_bert(root: Path, rows: int) -> dict[str, Path]:
    """The data files of :func:`make_data` under ``root/data``, a tiny BERT classifier whose tokenizer knows the
    first ``rows`` SST-2 training rows (``"bert"``), and ``root`` itself (``"root"``)."""
    paths = make_data(root / "data")
    paths["bert"] = tiny_model_dir(root / "bert", "bert", [s for s, _ in sst2_rows("train", rows)])
    paths["root"] = root
    return paths


def make_data(directory: Path) -> dict[str, Path]:
    """SST-2 subsets in ``directory``: train (256 rows), small (64 rows), dev (128 rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "train": write_tsv(directory / "train.tsv", sst2_rows("train", 256)),
        "small": write_tsv(directory / "small.tsv", sst2_rows("train", 64)),
        "dev": write_tsv(directory / "dev.tsv", sst2_rows("dev", 128)),
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the training tests with one intra-op thread, restored afterwards.

    On a shared 2-core machine, two threads made these tiny steps ~19x slower than one (the threads
    wait for each other at every small parallel region while other processes hold the cores), and
    results are only bit-reproducible between processes with the same thread count.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def config(model, data, out, **options):
    """A :class:`TrainConfig` with the small, fast settings the tests use (``options`` override them)."""
    from bca_deploy.training import TrainConfig

    return TrainConfig(model=model, data=data, out=out, **{**FAST, **options})


FAST = dict(block_size=8, batch_size=16, max_length=32, progress=False)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes), to check that a directory was left untouched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def subprocess_env() -> dict:
    """Environment for child processes: one thread each, like the tests themselves, offline."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
