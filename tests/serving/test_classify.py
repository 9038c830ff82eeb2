"""Sequence classification through an adapter-bank graph: ``MultiAdapterSession.classify`` and ``/v1/classify``.

The classifier head comes from the checkpoint (shared by every row); the adapters adapt the encoder. Each
row's label scores are compared with the PyTorch model run on that row alone with its adapter active.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch

import bca_deploy as bd
from bca_deploy.errors import ServingError

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
ROWS = [[5, 9, 2, 7], [3, 3, 8], [11, 4, 6, 1, 2], [7], [2, 9, 9, 4], [6, 6]]
CHOICES = ["a0", "a1", None, "a1", "a0", None]


def _tiny_classifier():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3, id2label=LABELS,
                        label2id={v: k for k, v in LABELS.items()})
    model = tf.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a random head (std 0.02) squashes every difference; widen it so adapters show
        model.classifier.weight.mul_(100.0)
    return model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from bca_deploy.exporters import export

    root = tmp_path_factory.mktemp("classify")
    _tiny_classifier().save_pretrained(root / "model")
    adapters = []
    for seed, (targets, p) in enumerate(((["query", "value"], 8), (["key", "intermediate.dense"], 16))):
        model = bd.inject(_tiny_classifier(), targets, block_size=p, init="normal", init_std=0.2, seed=seed)
        adapters.append(bd.save_adapter(model, root / f"a{seed}"))
    onnx_dir = export(root / "model", root / "onnx", adapters, merge=False, bank=True, task="text-classification",
                      cases=[(3, 6)], verbose=False)
    return root, adapters, onnx_dir


def _reference(root, adapters, row, adapter):
    """Class probabilities of ``row`` alone, from a fresh PyTorch model with only ``adapter`` loaded."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(root / "model").eval()
    if adapter is not None:
        bd.load_adapter(model, adapters[int(adapter[1])], adapter_name=adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long)).logits
    return torch.softmax(logits.double(), -1)[0].numpy()


def test_classify_mixed_batch_matches_each_row_alone(classifier):
    from bca_deploy.serving import MultiAdapterSession

    root, adapters, onnx_dir = classifier
    session = MultiAdapterSession(onnx_dir)
    results = session.classify(ROWS, CHOICES)
    references = [_reference(root, adapters, row, a) for row, a in zip(ROWS, CHOICES, strict=True)]
    for result, reference in zip(results, references, strict=True):
        got = np.array([result["scores"][LABELS[i]] for i in range(3)])
        np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
        assert result["label"] == LABELS[int(reference.argmax())]
        assert result["score"] == pytest.approx(reference.max(), abs=1e-5)
    # the adapters matter: the same row scores differently per adapter
    feeds = session.pad_ids([ROWS[0]] * 3)
    logits = session.run(feeds, ["a0", "a1", None], ["logits"])["logits"]
    assert np.abs(logits[0] - logits[2]).max() > 1e-2 and np.abs(logits[1] - logits[2]).max() > 1e-2
    with pytest.raises(ServingError, match="generation needs"):
        session.generate(ROWS[:1], [None])


def test_http_classify(classifier):
    from bca_deploy.serving.http import ServerThread, build

    root, adapters, onnx_dir = classifier
    with ServerThread(build(onnx_dir, max_wait_ms=2, threads=1)) as server:
        request = urllib.request.Request(server.url + "/v1/classify", method="POST",
                                         data=json.dumps({"input": ROWS[:3], "adapter": "a1"}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    assert body["adapter"] == "a1" and [d["index"] for d in body["data"]] == [0, 1, 2]
    for item, row in zip(body["data"], ROWS[:3], strict=True):
        reference = _reference(root, adapters, row, "a1")
        np.testing.assert_allclose([item["scores"][LABELS[i]] for i in range(3)], reference, atol=1e-5, rtol=0)
