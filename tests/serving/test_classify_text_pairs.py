"""Text pairs at ``MultiAdapterSession.classify`` and ``POST /v1/classify``: a classifier trained on two text columns
(``sentence1``/``sentence2``: MRPC, STS-B, QNLI, NLI...) is served its examples as it read them.

Before, ``/v1/classify`` took single texts (or token ids) only: a pair classifier could be sent its two texts as one
(no separator, every token of type 0), and answered for an input it never saw, without a word; a ``[first,
second]`` row was refused. Now a row may be a pair, tokenized as ``train`` and ``evaluate`` tokenize a two-column
example (``tokenizer(first, second, truncation=True)``), its second text's tokens of type 1.

The reference never touches serving code: each pair alone through the adapter's own PyTorch model
(``AutoModelForSequenceClassification`` + ``load_adapter``), tokenized by transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import wordpiece_tokenizer  # noqa: E402
from head_helpers import VOCAB, build_base, own_model, save_head_adapter  # noqa: E402
from http_helpers import call  # noqa: E402

ATOL = 1e-4
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
PAIRS = [("w1 w2 w3", "w4 w5"), ("w9", "w9 w10 w11 w12 w13"), ("w20 w21 w22 w23", "w7")]


@pytest.fixture(scope="module")
def pair_bank(tmp_path_factory):
    from bca_deploy.exporters import export

    root = tmp_path_factory.mktemp("pairs")
    base = build_base("bert")
    with torch.no_grad():  # random type embeddings (std 0.02) barely move the output: make the types matter
        base.embeddings.token_type_embeddings.weight.mul_(50.0)
    base.save_pretrained(root / "base")
    tokenizer = wordpiece_tokenizer(SPECIALS + WORDS)
    tokenizer.save_pretrained(root / "base")
    adapter = save_head_adapter(root / "base", root / "pair", ["different", "same"], ["query", "value"], 8, seed=0)
    onnx = export(root / "base", root / "onnx", [adapter], merge=False, bank=True, cases=[(2, 6)], verbose=False)
    return {"base": root / "base", "adapter": adapter, "onnx": onnx, "tokenizer": tokenizer}


def _alone(pair_bank, pairs) -> np.ndarray:
    """Each pair alone through the adapter's own PyTorch model, tokenized by transformers."""
    model = own_model(pair_bank["base"], pair_bank["adapter"])
    with torch.no_grad():
        return np.stack([model(**pair_bank["tokenizer"](a, b, return_tensors="pt")).logits[0].double().numpy()
                         for a, b in pairs])


def test_pairs_are_classified_as_the_model_reads_them(pair_bank):
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(pair_bank["onnx"])
    name = session.adapters()[0].name
    served = np.array([r["logits"] for r in session.classify([list(p) for p in PAIRS], [name] * len(PAIRS))])
    np.testing.assert_allclose(served, _alone(pair_bank, PAIRS), atol=ATOL)
    # the two texts sent as one (what a client could do before) is another input: far from the pair's answer
    joined = np.array([r["logits"] for r in session.classify([f"{a} {b}" for a, b in PAIRS], [name] * len(PAIRS))])
    assert np.abs(joined - served).max() > 100 * ATOL


def _post(url: str, body: dict) -> tuple[int, dict]:
    return call(url + "/v1/classify", "POST", body, timeout=60)


def test_http_classify_takes_pairs(pair_bank):
    from bca_deploy.serving.http import ServerThread, build

    with ServerThread(build(pair_bank["onnx"], max_wait_ms=5, threads=1)) as server:
        status, body = _post(server.url, {"input": [list(p) for p in PAIRS], "adapter": "pair"})
        mixed = _post(server.url, {"input": [list(PAIRS[0]), "w1 w2"], "adapter": "pair"})
        three = _post(server.url, {"input": [["w1", "w2", "w3"]], "adapter": "pair"})
    assert status == 200, body
    np.testing.assert_allclose([r["logits"] for r in body["data"]], _alone(pair_bank, PAIRS), atol=ATOL)
    assert [r["label"] for r in body["data"]] == [
        ["different", "same"][int(i)] for i in _alone(pair_bank, PAIRS).argmax(1)]
    for status, body in (mixed, three):  # refused, naming the field; nothing runs
        assert status in (400, 422) and body["error"]["param"] == "input", body


@pytest.mark.parametrize("lengths", [(300, 2), (2, 300), (300, 500), (500, 300), (400, 400), (30, 20)])
def test_long_pairs_are_cut_as_the_tokenizer_cuts_them(pair_bank, lengths):
    """Texts past the model's 64 positions: a pair's ids and types are ``tokenizer(a, b, truncation=True,
    max_length=64)``'s, the longer text losing tokens first (and the odd one when both are long), whatever prefix of a
    long text was tokenized."""
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(pair_bank["onnx"])
    first, second = (" ".join(WORDS[(i * 7 + k) % len(WORDS)] for i in range(n)) for k, n in enumerate(lengths))
    row = session.tokenize_pairs([(first, second)])[0]
    expected = pair_bank["tokenizer"](first, second, truncation=True, max_length=64)
    assert list(row) == expected["input_ids"]
    assert row.token_types == expected["token_type_ids"]
