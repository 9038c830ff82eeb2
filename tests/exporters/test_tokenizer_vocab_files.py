"""Every vocabulary file a tokenizer of an exported model type reads is known by name: an export carries it beside
the graph (``_write_model_files``), and the readers check it before transformers opens it (``TOKENIZER_READS``).

The reference is transformers' own ``vocab_files_names`` of each tokenizer class its auto mapping names for the
model type (DeBERTa-v2/v3 reads ``spm.model``, XLM-RoBERTa ``sentencepiece.bpe.model``): an export of a DeBERTa-v3
checkpoint without ``tokenizer.json`` (as ``microsoft/deberta-v3-base`` ships) used to leave ``spm.model`` behind,
and ``serve`` could not load the tokenizer its ``tokenizer_config.json`` announced.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers.models.auto import tokenization_auto

from bca_deploy.config import TOKENIZER_FILES, TOKENIZER_READS, has_tokenizer_files
from bca_deploy.exporters.export import _write_model_files
from bca_deploy.exporters.loading import DECODER_MODEL_TYPES, ENCODER_MODEL_TYPES


def _vocab_file_names(model_type: str) -> set[str]:
    """File names the tokenizer classes transformers maps ``model_type`` to read (those whose class loads here:
    a slow class needing sentencepiece, not installed, is named by its fast sibling's list too)."""
    entry = tokenization_auto.TOKENIZER_MAPPING_NAMES.get(model_type)
    names: set[str] = set()
    for class_name in entry if isinstance(entry, tuple) else (entry,):
        if not class_name:
            continue
        cls = tokenization_auto.tokenizer_class_from_name(class_name)
        if cls is None:
            continue
        try:
            names.update(cls.vocab_files_names.values())
        except ImportError:  # a dummy object for a class whose backend is missing
            continue
    return names


@pytest.mark.parametrize("model_type", [*ENCODER_MODEL_TYPES, *DECODER_MODEL_TYPES])
def test_every_vocabulary_file_of_an_exported_model_type_is_read_checked_and_copied(model_type, tmp_path):
    names = _vocab_file_names(model_type)
    if tokenization_auto.TOKENIZER_MAPPING_NAMES.get(model_type) is not None:  # 5.x maps llama to no class (it is
        assert names, f"transformers names no tokenizer files for {model_type}"  # resolved from the checkpoint)
    assert names <= set(TOKENIZER_READS), f"{model_type}: {sorted(names - set(TOKENIZER_READS))} not in TOKENIZER_READS"
    vocab = names - {"tokenizer.json", "merges.txt"}  # a vocabulary alone (no tokenizer.json) is a tokenizer
    assert vocab <= set(TOKENIZER_FILES), f"{model_type}: {sorted(vocab - set(TOKENIZER_FILES))}"

    model_dir, out = tmp_path / "model", tmp_path / "export"
    model_dir.mkdir()
    out.mkdir()
    for name in names:
        (model_dir / name).write_bytes(f"{name} of {model_type}".encode())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8))
    _write_model_files(model, model_dir, out, ())
    for name in names:
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), f"{name} not carried into the export"
    if vocab:
        only_vocab = tmp_path / "only-vocab"
        only_vocab.mkdir()
        for name in vocab:
            (only_vocab / name).write_bytes(b"x")
        assert has_tokenizer_files(only_vocab)
