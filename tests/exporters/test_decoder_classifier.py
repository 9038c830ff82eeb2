"""A classifier trained on a decoder (``LlamaForSequenceClassification``, ``GPT2ForSequenceClassification``)
goes the whole way: train records the pad id it pooled by, merge writes it, export (alone, merged, in a bank)
bakes it into the graph, and serve answers rows of different lengths as PyTorch answers each row alone.

Such a classifier reads each row's last token that is not ``config.pad_token_id``; Llama's and GPT-2's base
configs have none (transformers then refuses a batch of several rows), so every stage must agree on one.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from training_helpers import config, sst2_rows, word_tokenizer, write_tsv  # noqa: E402

from bca_deploy.exporters import UnsupportedExportError, export  # noqa: E402
from bca_deploy.models import load_model  # noqa: E402

TEXTS = ["a great movie", "this film is terrible and boring and long and not at all what i wanted", "ok",
         "the plot , the actors , the music : all good"]


def _decoder_checkpoint(directory: Path, kind: str, texts) -> Path:
    """A tiny causal LM whose config has no pad_token_id (as Llama's and GPT-2's), with a tokenizer whose pad id
    is 0 while the model's EOS is 3."""
    import transformers as tf

    tokenizer = word_tokenizer(directory, texts)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                                 bos_token_id=2, eos_token_id=3))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                                   max_position_embeddings=64, bos_token_id=2, eos_token_id=3))
    assert model.config.pad_token_id is None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request, tmp_path_factory):
    """(base dir, [two trained seq-cls adapter dirs], tokenizer) for one decoder."""
    from transformers import AutoTokenizer

    from bca_deploy.training import train

    root = tmp_path_factory.mktemp(f"decoder-cls-{request.param}")
    rows = sst2_rows("train", 64)
    data = write_tsv(root / "train.tsv", rows)
    base = _decoder_checkpoint(root / "base", request.param, [t for t, _ in rows])
    adapters = []
    for seed in (0, 1):
        train(config(base, data, root / f"run{seed}", max_steps=2, seed=seed, lr=0.05))
        adapters.append(root / f"run{seed}" / "last")
    return base, adapters, AutoTokenizer.from_pretrained(str(base))


def _alone(base: Path, adapter: Path, tokenizer, texts) -> np.ndarray:
    """PyTorch logits of each text alone (no padding at all), (len(texts), num_labels)."""
    model = load_model(base, [adapter])
    with torch.no_grad():
        return np.stack([model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits[0].numpy() for t in texts])


def test_training_records_the_pad_id_and_merge_writes_it(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from bca_deploy.merge import merge_checkpoint

    base, adapters, tokenizer = trained
    head = json.loads((adapters[0] / "adapter_config.json").read_text())["task"]["head"]
    assert head["pad_token_id"] == tokenizer.pad_token_id == 0
    stored = set(safe_open(str(base / "model.safetensors"), "pt").keys())
    # the causal LM's own head: stored by Llama (untied), tied to the input embedding (not stored) by GPT-2
    assert ("lm_head.weight" in stored) == (json.loads((base / "config.json").read_text())["model_type"] == "llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_checkpoint(base, [(adapters[0], 1.0)], tmp_path / "merged", progress=False)
    written = set(safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt").keys())
    # not carried into the classifier, which does not load it (a Llama-7B's is 262 MB): said, once
    assert "lm_head.weight" not in written and "score.weight" in written
    notes = [str(w.message) for w in caught if "not writing" in str(w.message)]
    assert len(notes) == ("lm_head.weight" in stored), notes
    assert all("lm_head.weight" in n and "LlamaForSequenceClassification" in n for n in notes)
    merged, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"),
                                                                      output_loading_info=True)
    merged.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert merged.config.pad_token_id == 0
    # transformers itself can now batch the merged classifier (right padding, its own rule), as the adapter did
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        logits = merged(**batch).logits.numpy()
    np.testing.assert_allclose(logits, _alone(base, adapters[0], tokenizer, TEXTS), atol=1e-5)


def test_bank_serves_mixed_lengths_and_adapters_as_pytorch_alone(trained, tmp_path):
    from bca_deploy.serving import MultiAdapterSession

    base, adapters, tokenizer = trained
    out = export(base, tmp_path / "bank", adapters, merge=False, bank=True, verbose=False)
    session = MultiAdapterSession(out)
    names = [info.name for info in session.adapters()]  # one per adapter, in the order given
    rows = [names[0], names[1], names[0], names[1]]
    answers = session.classify(TEXTS, rows)
    for name, adapter in zip(names, adapters, strict=True):
        picked = [i for i, r in enumerate(rows) if r == name]
        reference = _alone(base, adapter, tokenizer, [TEXTS[i] for i in picked])
        served = np.array([answers[i]["logits"] for i in picked])
        np.testing.assert_allclose(served, reference, atol=1e-4)
    # the rows differ in length by up to 14 tokens: had the short rows been read at a padding position, they
    # would differ from their answers alone by far more than the tolerance
    assert len({len(tokenizer(t)["input_ids"]) for t in TEXTS}) == len(TEXTS)


def test_merged_graph_classifies_as_pytorch(trained, tmp_path):
    import onnxruntime as ort

    base, adapters, tokenizer = trained
    out = export(base, tmp_path / "merged", [adapters[1]], merge=True, verbose=False)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    for text, reference in zip(TEXTS, _alone(base, adapters[1], tokenizer, TEXTS)):
        ids = np.array([tokenizer(text)["input_ids"]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
        logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0]
        np.testing.assert_allclose(logits, reference, atol=1e-4)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_graphs_take_the_inputs_optimums_classifier_feeds(trained, tmp_path, merge):
    """A decoder's text-classification graph takes ``input_ids`` and ``attention_mask`` only, as optimum exports it:
    ``ORTModelForSequenceClassification`` feeds no ``position_ids``. Before, the graph required them, and that class
    refused every call ("Input position_ids is required by model but not provided"). A batch padded on the right
    gives each text's logits alone."""
    import onnxruntime as ort

    base, adapters, tokenizer = trained
    out = export(base, tmp_path / "graph", [adapters[1]], merge=merge, verbose=False)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    batch = tokenizer(TEXTS, padding=True, return_tensors="np", return_token_type_ids=False)
    logits = session.run(["logits"], {k: v.astype(np.int64) for k, v in batch.items()})[0]
    np.testing.assert_allclose(logits, _alone(base, adapters[1], tokenizer, TEXTS), atol=1e-4)


def test_optimums_classifier_runs_the_merged_graph(trained, tmp_path):
    """What the README names for a merged export: ``ORTModelForSequenceClassification`` (transformers 4.x, where
    optimum-onnx installs) gives PyTorch's logits and the adapter's labels."""
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForSequenceClassification

    base, adapters, tokenizer = trained
    out = export(base, tmp_path / "merged", [adapters[1]], merge=True, verbose=False)
    model = ORTModelForSequenceClassification.from_pretrained(out)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    logits = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits, _alone(base, adapters[1], tokenizer, TEXTS), atol=1e-4)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}


def test_the_peft_copy_says_how_to_load_it_and_then_batches_as_the_adapter(trained, tmp_path):
    """``convert --to peft`` of a decoder classifier: PEFT keeps no head record, and the base config.json has no
    ``pad_token_id``, so ``AutoPeftModelForSequenceClassification.from_pretrained(dir)`` refused every batch of two
    rows ("Cannot handle batch sizes > 1 if no padding token is defined"), and nothing said which id the classifier was
    trained to skip. convert now prints the call; made as printed, it gives the adapter's logits for a padded batch."""
    import re

    from click.testing import CliRunner
    from peft import AutoPeftModelForSequenceClassification

    from bca_deploy.cli import main

    base, adapters, tokenizer = trained
    out = tmp_path / "peft"
    result = CliRunner().invoke(main, ["convert", "--adapter", str(adapters[0]), "--to", "peft", "--out", str(out)])
    if json.loads((base / "config.json").read_text())["model_type"] == "gpt2":  # PEFT's C3A adapts nn.Linear only
        assert result.exit_code == 2 and "supports torch.nn.Linear only" in result.output and not out.exists()
        return
    assert result.exit_code == 0, result.output
    hint = re.search(r"from_pretrained\('([^']+)', (.*)\) \(its base config\.json has no pad_token_id\)", result.output)
    assert hint is not None and hint.group(1) == str(out), result.output
    assert hint.group(2) == "pad_token_id=0"  # 2 labels named LABEL_i: as the base config has them
    model = AutoPeftModelForSequenceClassification.from_pretrained(hint.group(1), pad_token_id=0).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits, _alone(base, adapters[0], tokenizer, TEXTS), atol=1e-5)


def test_an_adapter_without_a_recorded_pad_id_takes_the_tokenizers(trained, tmp_path, capsys):
    """PEFT (and bca-deploy before it recorded one) write no pad id: the base's tokenizer gives it, by the rule
    training pads with; without a tokenizer either, export says what to set, before writing anything."""
    import shutil

    base, adapters, tokenizer = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters[0], adapter)
    data = json.loads((adapter / "adapter_config.json").read_text())
    del data["task"]["head"]["pad_token_id"]
    (adapter / "adapter_config.json").write_text(json.dumps(data))
    out = export(base, tmp_path / "onnx", [adapter], merge=False)  # validated against PyTorch on padded batches
    assert f"note: the classifier reads each text's last token that is not id {tokenizer.pad_token_id}, the pad id of " \
        in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id
    from bca_deploy.merge import merge_checkpoint

    merged = merge_checkpoint(base, [(adapter, 1.0)], tmp_path / "merged", progress=False)
    assert json.loads((merged / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id  # it batches

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(base / name, bare / name)
    with pytest.raises(UnsupportedExportError, match=r"pad_token_id.*config\.json"):
        export(bare, tmp_path / "never", [adapter], merge=False, verbose=False)
    assert not (tmp_path / "never").exists()


def test_rows_of_pad_tokens_are_read_as_alone_whatever_their_neighbours(trained, tmp_path):
    """A row made only of the pad id is read at its first token (transformers' rule, alone); left padding had read
    it at a padding position, so its answer depended on the longest row it was batched with (another tenant's)."""
    from bca_deploy.serving import MultiAdapterSession

    base, adapters, tokenizer = trained
    out = export(base, tmp_path / "bank", adapters[:1], merge=False, bank=True, verbose=False)
    session = MultiAdapterSession(out)
    name = session.adapters()[0].name
    pad = tokenizer.pad_token_id
    rows = [[pad], [pad, pad, pad], [7, 8, pad], list(range(5, 25))]
    batched = [a["logits"] for a in session.classify(rows, [name] * len(rows))]
    model = load_model(base, [adapters[0]])
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row])).logits[0].tolist() for row in rows]
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_evaluate_reads_each_text_where_it_is_read_alone_when_the_config_names_another_pad(tmp_path):
    """A base config whose pad_token_id (5) is not the tokenizer's (0): rows padded with the tokenizer's id were read
    at a padding position (the classifier reads past the config's id only), so the loss depended on the batch."""
    import dataclasses

    from bca_deploy.training import EvaluateConfig, evaluate, train

    rows = sst2_rows("train", 48)
    data = write_tsv(tmp_path / "train.tsv", rows)
    base = _decoder_checkpoint(tmp_path / "base", "llama", [t for t, _ in rows])
    config_file = base / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "pad_token_id": 5}))
    run = train(config(base, data, tmp_path / "run", max_steps=1, seed=0))
    assert json.loads((run.last_dir / "adapter_config.json").read_text())["task"]["head"]["pad_token_id"] == 5
    one = EvaluateConfig(model=base, adapter=run.last_dir, data=data, device="cpu", batch_size=1)
    by_one, by_sixteen = evaluate(one), evaluate(dataclasses.replace(one, batch_size=16))
    assert by_one["loss"] == pytest.approx(by_sixteen["loss"], abs=1e-5)
