"""``bca_deploy.training.loading``: --task causal-lm on a model that reads later tokens (a BERT-family encoder, which
``AutoModelForCausalLM`` builds as its ``*LMHeadModel`` attending both ways) is refused by train and evaluate, before
a next-token loss that reads its answer is trained or reported; decoders pass."""

from __future__ import annotations

import pytest
import torch

from bca_deploy.training import EvaluateConfig, TrainingConfigError, evaluate, train
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    config,
    one_thread,
    tiny_model_dir,
    write_jsonl,
)

TEXTS = ["the film is a gorgeous and witty ride", "a dull and tedious mess of a movie", "fine acting , thin plot"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal-check")
    return {"root": root, "data": write_jsonl(root / "text.jsonl", [{"text": t} for t in TEXTS * 4]),
            **{kind: tiny_model_dir(root / kind, kind, TEXTS) for kind in ("bert", "bert-bare", "llama", "gpt2")},
            "bert-mlm": _bert_with_lm_head(root / "bert-mlm", root / "bert")}


def _bert_with_lm_head(directory, tokenizer_dir):
    """A tiny BertForMaskedLM (its LM head saved, so evaluate has weights to compute a perplexity with)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=100, max_position_embeddings=64)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def _reads_later_tokens(model_dir) -> bool:
    """Whether transformers' own causal-LM build of ``model_dir`` changes its first position's logits when only the
    last token changes (the reference the refusal is checked against)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    other = ids.clone()
    other[0, -1] = 9
    with torch.no_grad():
        return not torch.equal(model(ids).logits[0, 0], model(other).logits[0, 0])


@pytest.mark.parametrize("kind", ["bert", "bert-bare", "bert-mlm"])
def test_causal_lm_on_an_encoder_is_refused_by_train_and_evaluate(files, kind, tmp_path):
    assert _reads_later_tokens(files[kind])
    with pytest.raises(TrainingConfigError, match="reads later tokens") as err:
        train(config(files[kind], files["data"], tmp_path / "run", task="causal-lm", targets=["query"], max_steps=1))
    assert "--task causal-lm needs a causal language model" in str(err.value) and str(files[kind]) in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    if kind != "bert-mlm":  # (without an LM head evaluate refuses to compute noise before it runs the model)
        return
    with pytest.raises(TrainingConfigError, match="reads later tokens"):
        evaluate(EvaluateConfig(model=files[kind], data=files["data"], task="causal-lm", device="cpu"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_on_a_decoder_still_trains_and_evaluates(files, kind, tmp_path):
    assert not _reads_later_tokens(files[kind])
    result = train(config(files[kind], files["data"], tmp_path / "run", task="causal-lm", max_steps=1))
    assert result.step == 1
    metrics = evaluate(EvaluateConfig(model=files[kind], data=files["data"], task="causal-lm", device="cpu"))
    assert metrics["loss"] > 0
