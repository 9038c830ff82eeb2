"""The OpenAI ``/v1/embeddings`` route of a sentence-transformers model answers as ``SentenceTransformer.encode``:
export keeps the model's sentence-transformers files (modules.json, the Pooling config, sentence_bert_config.json)
and serve takes pooling, normalisation and ``max_seq_length`` from them, as vLLM does (``get_pooling_config``).
The reference is sentence-transformers itself on the same base checkpoint (the base model's rows: no adapter)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
sentence_transformers = pytest.importorskip("sentence_transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import assert_error, call, write_wordpiece_tokenizer  # noqa: E402

from bca_deploy import inject, save_adapter  # noqa: E402
from bca_deploy.errors import ServingError  # noqa: E402
from bca_deploy.serving.http import ServerThread, build  # noqa: E402

TEXTS = ["the water is hot", "zebra", "how many people know this word and that word and the other word too"]
MAX_SEQ_LENGTH = 8  # below the tokenizer's limit: the long text above is cut here by sentence-transformers


def _sentence_transformer_dir(directory: Path, pooling: str, normalize: bool) -> Path:
    """A tiny BERT saved as a sentence-transformers model (its own writer: modules.json, 1_Pooling/config.json,
    sentence_bert_config.json beside the transformers files)."""
    import transformers as tf
    from sentence_transformers import SentenceTransformer, models

    plain = directory.parent / (directory.name + "-hf")
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False
                 ).save_pretrained(plain)
    write_wordpiece_tokenizer(plain)
    body = models.Transformer(str(plain), max_seq_length=MAX_SEQ_LENGTH)
    modules = [body, models.Pooling(32, pooling_mode=pooling)] + ([models.Normalize()] if normalize else [])
    SentenceTransformer(modules=modules, device="cpu").save(str(directory))
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(sentence-transformers dir, its bank export with one adapter): CLS pooling, normalised, max_seq_length 8."""
    from bca_deploy.exporters import export

    root = tmp_path_factory.mktemp("st")
    model_dir = _sentence_transformer_dir(root / "st", "cls", normalize=True)
    model = __import__("transformers").AutoModel.from_pretrained(str(model_dir))
    inject(model, ["query", "value"], block_size=8, init="normal", init_std=0.05, seed=0)
    save_adapter(model, root / "adapter")
    out = export(model_dir, root / "onnx", [root / "adapter"], merge=False, bank=True, verbose=False)
    return model_dir, Path(out)


def _served(export_dir: Path, **options) -> np.ndarray:
    with ServerThread(build(export_dir, threads=1, max_wait_ms=1, **options)) as server:
        status, body = call(server.url + "/v1/embeddings", "POST", {"model": "__base__", "input": TEXTS})
    assert status == 200, body
    return np.array([item["embedding"] for item in body["data"]])


def _encode(model_dir: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)


def _rewrite(export_dir: Path, destination: Path, pooling_config: dict | None = None,
             drop_normalize: bool = False, extra_module: dict | None = None) -> Path:
    shutil.copytree(export_dir, destination)
    modules = json.loads((destination / "modules.json").read_text())
    if drop_normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    if extra_module is not None:
        modules.append(extra_module)
    (destination / "modules.json").write_text(json.dumps(modules))
    if pooling_config is not None:
        path = destination / "1_Pooling" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **pooling_config}))
    return destination


def test_export_keeps_the_sentence_transformers_files(exported):
    model_dir, export_dir = exported
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (export_dir / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_embeddings_equal_sentence_transformers_encode(exported):
    model_dir, export_dir = exported
    served = _served(export_dir)
    np.testing.assert_allclose(served, _encode(model_dir), atol=2e-5)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0)


def test_mean_pooling_without_normalize_follows_the_files(exported, tmp_path):
    model_dir, export_dir = exported
    mean = {"pooling_mode": "mean"}
    changed = _rewrite(export_dir, tmp_path / "onnx", mean, drop_normalize=True)
    reference = _rewrite(model_dir, tmp_path / "st", mean, drop_normalize=True)
    served = _served(changed)
    np.testing.assert_allclose(served, _encode(reference), atol=2e-5)
    assert not np.allclose(np.linalg.norm(served, axis=1), 1.0)
    # the server's options win over the files
    forced = _served(changed, embedding_pooling="cls", embedding_normalize=True)
    np.testing.assert_allclose(forced, _encode(model_dir), atol=2e-5)


def test_a_pooling_not_computed_here_is_refused_at_start_unless_chosen(exported, tmp_path):
    _, export_dir = exported
    changed = _rewrite(export_dir, tmp_path / "onnx", {"pooling_mode": "max"})
    with pytest.raises(ServingError, match=r"1_Pooling/config\.json pools by max.*--embedding-pooling"):
        build(changed, threads=1)
    _served(changed, embedding_pooling="mean")  # chosen knowingly: served


def test_a_module_not_run_here_is_said_at_start(exported, tmp_path):
    from bca_deploy.serving.http import startup_notes

    _, export_dir = exported
    changed = _rewrite(export_dir, tmp_path / "onnx",
                       extra_module={"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    app = build(changed, threads=1)
    notes = startup_notes(app.state.server)
    assert any("sentence_transformers.models.Dense" in n and "modules.json" in n for n in notes), notes


def test_the_native_route_keeps_its_own_parameters(exported):
    """Without ``model`` the request is the native one: its own pooling and normalisation (defaults: mean, not
    normalised), whatever the sentence-transformers files say."""
    model_dir, export_dir = exported
    with ServerThread(build(export_dir, threads=1, max_wait_ms=1)) as server:
        status, body = call(server.url + "/v1/embeddings", "POST", {"input": TEXTS[:2], "pooling": "cls",
                                                                    "normalize": True})
        assert status == 200, body
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], _encode(model_dir)[:2], atol=2e-5)
        status, body = call(server.url + "/v1/embeddings", "POST", {"input": TEXTS[:1]})
        assert status == 200 and not np.isclose(np.linalg.norm(body["data"][0]["embedding"]), 1.0), body
        status, body = call(server.url + "/v1/embeddings", "POST", {"input": TEXTS[:1], "pooling": "max"})
    assert_error(status, body, 422, "invalid_request")  # (the native route's status; an OpenAI request's is 400)


def test_export_copies_no_file_a_link_leads_to_that_is_not_json(exported, tmp_path):
    """A Pooling config that is a link to another file (a secret elsewhere on the machine) was copied into the
    export, byte for byte; sentence-transformers cannot load such a model either. Refused, before anything is
    written."""
    from bca_deploy.exporters import ExportError, export

    model_dir, export_dir = exported
    copy = tmp_path / "st"
    shutil.copytree(model_dir, copy)
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    (copy / "1_Pooling" / "config.json").unlink()
    (copy / "1_Pooling" / "config.json").symlink_to(secret)
    adapter = export_dir.parent / "adapter"
    # refused as a link out of the model directory (atomic.copied_link_problem), before it is read as JSON
    with pytest.raises(ExportError, match=r"1_Pooling/config\.json: links to .*secret\.txt, outside the model "
                                          r"directory") as refused:
        export(copy, tmp_path / "out", [adapter], merge=True, verbose=False)
    assert "hunter2" not in str(refused.value)
    assert not (tmp_path / "out").exists()
