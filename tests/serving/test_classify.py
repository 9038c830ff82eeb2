"""Sequence classification through adapter-bank graphs: ``MultiAdapterSession.classify`` and ``/v1/classify``.

Two set-ups:

- **shared head**: a ``BertForSequenceClassification`` checkpoint (its head) with kernel-only adapters;
  every row classifies with the checkpoint's head, through its adapter's kernels;
- **per-adapter heads**: a bare ``BertModel`` (no classifier) with classifier adapters that each save
  their own head, with different label sets (2 and 3 labels; one also saves the pooler), plus one
  kernel-only adapter (no head anywhere: its rows cannot be classified).

References never touch bank code: each row is run alone through its adapter's **own** PyTorch model
(``AutoModelForSequenceClassification.from_pretrained(base, num_labels=...)`` + ``load_adapter``).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_helpers import own_logits, own_model, save_base, save_head_adapter, token_rows

import bca_deploy as bd
from bca_deploy.errors import AdapterMismatchError, ServingError

ATOL = 1e-4
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
ROWS = [[5, 9, 2, 7], [3, 3, 8], [11, 4, 6, 1, 2], [7], [2, 9, 9, 4], [6, 6]]
CHOICES = ["a0", "a1", None, "a1", "a0", None]


# ---- shared head (the checkpoint's) ----------------------------------------------------------------------


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
    assert {a.head for a in session.adapters()} == {"base"}
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
    # a classifier has no embeddings to give: refused, one row or several (once pooled logits, or a numpy error)
    for rows in (ROWS[:1], ROWS[:2]):
        with pytest.raises(ServingError, match="'text-classification'; embeddings need a feature-extraction export"):
            session.embed(rows, ["a0"] * len(rows))
    assert (session.serves("classify"), session.serves("embed"), session.serves("generate")) == (True, False, False)


def test_http_classify(classifier):
    from bca_deploy.serving.http import ServerThread, build

    root, adapters, onnx_dir = classifier
    with ServerThread(build(onnx_dir, max_wait_ms=2, threads=1)) as server:
        status, body = _post(server.url, {"input": ROWS[:3], "adapter": "a1"})
    assert status == 200 and body["adapter"] == "a1" and [d["index"] for d in body["data"]] == [0, 1, 2]
    for item, row in zip(body["data"], ROWS[:3], strict=True):
        reference = _reference(root, adapters, row, "a1")
        np.testing.assert_allclose([item["scores"][LABELS[i]] for i in range(3)], reference, atol=1e-5, rtol=0)


# ---- per-adapter heads ----------------------------------------------------------------------------------

# name -> (labels, targets, block size, seed, modules_to_save); exported into one bank, slots 1.. in this order
HEADS = {
    "pos2": (["neg", "pos"], ["query", "value"], 8, 1, None),
    "tri3": (["red", "green", "blue"], ["key", "intermediate.dense"], 16, 2, ["bert.pooler", "classifier"]),
}
LATE = {"late5": (["a", "b", "c", "d", "e"], ["query", "value"], 8, 3, None)}  # registered at run time


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    from bca_deploy.exporters import export

    root = tmp_path_factory.mktemp("heads")
    base = save_base("bert", root / "base")
    dirs = {n: save_head_adapter(base, root / n, *spec) for n, spec in {**HEADS, **LATE}.items()}
    plain = bd.inject(_bare_bert(base), ["query"], block_size=8, init="normal", init_std=0.1, seed=4)
    dirs["plain"] = bd.save_adapter(plain, root / "plain")  # kernels only: no head, and the base has none
    onnx_dir = export(base, root / "onnx", [dirs["pos2"], dirs["tri3"], dirs["plain"]], merge=False, bank=True,
                      task="text-classification", cases=[(4, 6)], verbose=False)
    models = {n: own_model(base, d) for n, d in dirs.items() if n != "plain"}
    return {"root": root, "base": base, "dirs": dirs, "onnx": onnx_dir, "models": models}


def _bare_bert(base: Path):
    from transformers import BertModel

    return BertModel.from_pretrained(base)


def _check_rows(results, rows, choices, models, labels):
    for b, (result, row, adapter) in enumerate(zip(results, rows, choices, strict=True)):
        want = own_logits(models[adapter], row)
        np.testing.assert_allclose(result["logits"], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")
        assert result["label"] == labels[adapter][int(want.argmax())]
        assert list(result["scores"]) == labels[adapter]
        probs = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
        np.testing.assert_allclose([result["scores"][k] for k in labels[adapter]], probs, atol=1e-5, rtol=0)


def test_each_row_gets_its_own_head_and_labels(heads):
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(heads["onnx"])
    infos = {a.name: a for a in session.adapters()}
    assert infos["pos2"].head == "own" and infos["pos2"].labels == ("neg", "pos")
    assert infos["tri3"].labels == ("red", "green", "blue") and infos["plain"].head is None
    rows = token_rows(8, seed=1)
    choices = ["pos2", "tri3", "tri3", "pos2", "tri3", "pos2", "pos2", "tri3"]
    results = session.classify(rows, choices)
    _check_rows(results, rows, choices, heads["models"], {n: spec[0] for n, spec in HEADS.items()})
    # the heads matter: the same row through both adapters' kernels and heads differs beyond the label count
    assert {len(r["logits"]) for r in results} == {2, 3}
    # in the raw graph the 2-label rows carry one padding label, -inf: it never wins an argmax
    logits = session.run(session.pad_ids(rows[:2]), choices[:2], ["logits"])["logits"]
    assert logits.shape == (2, 3) and logits[0, 2] == -np.inf and np.isfinite(logits[1]).all()


def test_rows_without_a_head_are_refused_before_running(heads):
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(heads["onnx"])
    rows = token_rows(3, seed=2)
    for choices, needle in (([None, "pos2", "pos2"], "base checkpoint has none"),
                            (["pos2", "plain", "tri3"], "'plain'")):
        with pytest.raises(ServingError, match=needle):
            session.classify(rows, choices)
    # the graph itself answers NaN for them: no head, no number
    logits = session.run(session.pad_ids(rows[:2]), [None, "plain"], ["logits"])["logits"]
    assert np.isnan(logits).all()
    # embeddings-like access to the same rows is untouched: run still works for every row
    assert session.snapshot().refusal("plain", "embed") is None
    assert session.snapshot().refusal("plain", "classify") is not None


def test_a_head_registered_at_run_time(heads):
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(heads["onnx"])
    info = session.register("late5", heads["dirs"]["late5"])
    assert info.head == "own" and info.labels == tuple(LATE["late5"][0])
    rows = token_rows(6, seed=3)
    choices = ["late5", "pos2", "tri3", "late5", "pos2", "tri3"]
    labels = {n: spec[0] for n, spec in {**HEADS, **LATE}.items()}
    _check_rows(session.classify(rows, choices), rows, choices, heads["models"], labels)
    # the bank's label axis grew to 5: the 2- and 3-label rows are padded with -inf
    logits = session.run(session.pad_ids(rows[:3]), choices[:3], ["logits"])["logits"]
    assert logits.shape == (3, 5) and (logits[1, 2:] == -np.inf).all() and (logits[2, 3:] == -np.inf).all()
    # an adapter's head replaced under the same name: the new labels from the next batch on
    session.register("pos2", heads["dirs"]["late5"], replace=True)
    _check_rows(session.classify(rows[:1], ["pos2"]), rows[:1], ["late5"], heads["models"], labels)


def test_a_head_naming_two_classes_alike_is_refused_at_load(heads, tmp_path):
    """An adapter whose id2label gives two classes one name (label2id built from it, as transformers builds it, keeps
    one of them) was loaded, and its answers keyed the scores by name: classes 1 and 2 both 'dup', the answer said
    "label": "dup" with class 1's score while "scores" held class 2's alone, class 1 gone. Refused at load, naming the
    name and its classes (the adapter config's rule, as the bank record's HeadLabels already held it)."""
    from bca_deploy.errors import AdapterFormatError
    from bca_deploy.serving import MultiAdapterSession

    twice = shutil.copytree(heads["dirs"]["tri3"], tmp_path / "twice")
    config = json.loads((twice / "adapter_config.json").read_text())
    config["task"]["head"]["id2label"] = {"0": "red", "1": "dup", "2": "dup"}
    config["task"]["head"]["label2id"] = {"red": 0, "dup": 2}
    (twice / "adapter_config.json").write_text(json.dumps(config))
    session = MultiAdapterSession(heads["onnx"])
    with pytest.raises(AdapterFormatError, match=r"id2label names must be distinct .*'dup' names classes 1 and 2"):
        session.register("twice", twice)
    assert "twice" not in [a.name for a in session.adapters()]


def test_a_head_wider_than_max_labels_is_refused_and_the_label_axis_narrows_again(heads, tmp_path):
    """One adapter of 100,000 labels (within the format's limit) made every tenant's rows compute 100,000 labels from
    its load on, unload included (23 -> 174 ms for another tenant's 8 rows), and a 64-row answer 337 MB (helper-61).
    A head wider than ``max_labels`` is refused at load (the exported heads always taken), and the label axis
    narrows back when the widest head leaves; the other adapters' answers do not change."""
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(heads["onnx"], max_labels=4)
    assert session.max_labels == 4
    rows, choices = token_rows(4, seed=5), ["pos2", "tri3", "tri3", "pos2"]
    before = session.classify(rows, choices)
    bytes_before = session.bank_memory()["bytes_per_slot"]
    with pytest.raises(AdapterMismatchError, match=r"adapter 'late5': its classifier has 5 labels; this server takes "
                                                   r"heads of up to 4 \(--max-labels\)"):
        session.register("late5", heads["dirs"]["late5"])
    assert [a.name for a in session.adapters()] == ["plain", "pos2", "tri3"]
    wide = MultiAdapterSession(heads["onnx"], max_labels=5)
    wide.register("late5", heads["dirs"]["late5"])
    assert wide.run(wide.pad_ids(rows[:1]), ["pos2"], ["logits"])["logits"].shape == (1, 5)
    wide.unregister("late5")
    assert wide.run(wide.pad_ids(rows[:1]), ["pos2"], ["logits"])["logits"].shape == (1, 3)  # the widest left: tri3
    assert wide.bank_memory()["bytes_per_slot"] == bytes_before
    assert wide.classify(rows, choices) == before
    # exported heads are taken whatever the limit: they set the graph's own width
    assert MultiAdapterSession(heads["onnx"], max_labels=1).max_labels == 3


def _misfits(heads, root: Path) -> list[tuple[Path, str]]:
    """Adapters whose head the BERT head bank cannot hold, each with the text its refusal must contain."""
    from bca_deploy.adapter_io import write_adapter_dir

    base = heads["base"]
    out = []
    norm = save_head_adapter(base, root / "norm", ["x", "y"], ["query"], 8, 5,
                             modules_to_save=["classifier", "bert.encoder.layer.1.output.LayerNorm"])
    out.append((norm, "bert.encoder.layer.1.output.LayerNorm"))
    config, state = bd.read_adapter(heads["dirs"]["pos2"])
    narrow = dict(state)
    narrow["classifier.weight"] = state["classifier.weight"][:, :16].contiguous()
    out.append((write_adapter_dir(root / "narrow", config.to_dict(), narrow), "classifier.weight: shape (2, 16)"))
    broken = dict(state)
    broken["classifier.bias"] = torch.tensor([0.0, float("nan")])
    out.append((write_adapter_dir(root / "nan", config.to_dict(), broken), "classifier.bias: has NaN/Inf"))
    embed = save_head_adapter(base, root / "embed", ["x", "y"], ["query"], 8, 6,
                              modules_to_save=["classifier", "bert.embeddings.word_embeddings"])
    out.append((embed, "bert.embeddings.word_embeddings"))
    data = json.loads((heads["dirs"]["pos2"] / "adapter_config.json").read_text())
    data["task"]["head"]["num_labels"] = 3
    data["task"]["head"]["id2label"]["2"] = "odd"
    data["task"]["head"]["label2id"]["odd"] = 2
    lying = root / "lying"
    shutil.copytree(heads["dirs"]["pos2"], lying)
    (lying / "adapter_config.json").write_text(json.dumps(data))
    out.append((lying, "task.head.num_labels is 3 but no head weight has 3 rows"))
    # helper-61's: loaded (201) and served, its labels LABEL_0/1; export refuses it (TaskError)
    data = json.loads((heads["dirs"]["pos2"] / "adapter_config.json").read_text())
    data["task"] = {"type": "causal-lm", "architecture": None, "head": None}
    other_task = root / "other-task"
    shutil.copytree(heads["dirs"]["pos2"], other_task)
    (other_task / "adapter_config.json").write_text(json.dumps(data))
    out.append((other_task, "it was trained for causal-lm; this graph serves text-classification (seq-cls adapters)"))
    # the label layer's bias missing was taken as zeros (logits off the adapter's own); other head layers refused it
    unbiased = {k: v for k, v in state.items() if k != "classifier.bias"}
    out.append((write_adapter_dir(root / "unbiased", config.to_dict(), unbiased),
                "classifier.bias: missing (the adapter saves classifier.weight)"))
    return out


def test_misfit_heads_are_refused_and_nothing_changes(heads, tmp_path):
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(heads["onnx"])
    before, snapshot, memory = session.adapters(), session.snapshot(), session.bank_memory()
    for directory, needle in _misfits(heads, tmp_path):
        with pytest.raises(AdapterMismatchError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            session.register("misfit", directory)
        assert session.adapters() == before and session.snapshot() is snapshot
    assert session.bank_memory() == memory


def _edited_export(source: Path, directory: Path, edit) -> Path:
    """A copy of the export ``source`` whose bca_export.json ``edit(metadata)`` changed in place."""
    shutil.copytree(source, directory)
    metadata = json.loads((directory / "bca_export.json").read_text())
    edit(metadata)
    (directory / "bca_export.json").write_text(json.dumps(metadata))
    return directory


def test_hostile_head_records_and_files_are_refused_naming_them(heads, classifier, tmp_path):
    """A head-bank export whose head record or files are not what export wrote: one error naming the field or file
    (each was an AttributeError, KeyError, StopIteration, an onnxruntime error or a broadcast error in a request)."""
    from bca_deploy.errors import BCAError
    from bca_deploy.serving import MultiAdapterSession

    def head(edit):
        return lambda m: edit(m["bank"]["head"])

    def set_labels(name, value):
        return head(lambda h: h["adapters"].__setitem__(name, value))

    cases = {
        "adapters-is-list": (head(lambda h: h.__setitem__("adapters", ["pos2"])), "bank.head.adapters must be an object"),
        "labels-missing-one": (set_labels("pos2", {"num_labels": 2, "id2label": {"0": "neg"}}), "id2label must map"),
        "labels-huge-count": (set_labels("pos2", {"num_labels": 10**12, "id2label": {"0": "neg"}}), "id2label must map"),
        "labels-count-string": (set_labels("tri3", {"num_labels": "3", "id2label": {}}), "num_labels must be"),
        # helper-61's: served, the answer's scores collapsing two labels into one key; a 1 MB name twice per answer
        "labels-repeated": (set_labels("tri3", {"num_labels": 3, "id2label": {"0": "a", "1": "a", "2": "b"}}),
                            "id2label names must be distinct"),
        "labels-1mb-name": (set_labels("tri3", {"num_labels": 3, "id2label": {"0": "a" * 2**20, "1": "b", "2": "c"}}),
                            "id2label names must be at most 1000 characters"),
        "labels-problem-type": (set_labels("tri3", {"num_labels": 1, "id2label": {"0": "x"}, "problem_type": "ranking"}),
                                "problem_type must be one of"),
        "no-label-layer": (head(lambda h: [layer.__setitem__("labels", False) for layer in h["layers"]]),
                           "exactly one label layer"),
        "layers-empty": (head(lambda h: h.__setitem__("layers", [])), "bank.head.layers must be"),
        "modules-string": (head(lambda h: h.__setitem__("modules", "classifier")), "bank.head.modules must be"),
        "layer-size-float": (head(lambda h: h["layers"][0].__setitem__("in_features", 32.0)), "malformed head layer"),
        "layer-not-in-graph": (head(lambda h: h["layers"][-1].__setitem__("module", "scorer")),
                               "scorer.bca_head_bias, scorer.bca_head_weight the metadata records are not inputs of "
                               "the graph"),
        "tensor-not-in-graph": (lambda m: m["bank"]["tensors"][0].__setitem__("module", "bert.nope"),
                                "bert.nope.bca_freq_p8 the metadata records are not inputs of the graph"),
        # the graph's per-slot head, unrecorded, served its exported defaults: LABEL_0/1 and a class lost (helper-61)
        "head-not-recorded": (lambda m: m["bank"].__setitem__("head", None),
                              "bank inputs of the graph the metadata does not record: bert.pooler.dense.bca_head_"),
        "tensor-wrong-size": (lambda m: m["bank"]["tensors"][0].__setitem__("in_features", 64),
                              "the graph declares"),
        "slot-without-file": (lambda m: m["bank"]["adapter_files"].pop("tri3"), "one file per slot's adapter"),
        "slots-not-base-first": (lambda m: m["bank"].__setitem__("slots", ["pos2", None]), "bank.slots must be"),
        "slot-twice": (lambda m: m["bank"].__setitem__("slots", [None, "pos2", "pos2", "plain"]), "names an adapter twice"),
    }
    for name, (edit, needle) in cases.items():
        directory = _edited_export(heads["onnx"], tmp_path / name, edit)
        with pytest.raises(BCAError) as caught:
            MultiAdapterSession(directory)
        assert needle in str(caught.value), (name, str(caught.value))
    # the files the record names
    broken = _edited_export(heads["onnx"], tmp_path / "adapter-file-garbage",  # an export before the file digests
                            lambda m: m["bank"].pop("adapter_digests"))
    (broken / "adapters" / "pos2.onnx_adapter").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ServingError, match="pos2.onnx_adapter: not a readable onnxruntime adapter file") as caught:
        MultiAdapterSession(broken)
    assert "onnxruntime_src" not in str(caught.value) and "valid lora parameter format" in str(caught.value)
    _, _, shared = classifier
    base_file = json.loads((shared / "bca_export.json").read_text())["bank"]["head"]["base_file"]
    assert base_file
    cases = {
        "garbage": (b"PK\x03\x04 not a zip", "cannot read the base model's head"),
        "wrong-shape": ({"classifier.bca_head_weight": np.zeros((32, 2), np.float32),
                         "classifier.bca_head_bias": np.zeros(2, np.float32)}, "(32, 2), expected (32, 3)"),
        "foreign-tensor": ({"classifier.bca_head_weight": np.zeros((32, 3), np.float32),
                            "classifier.bca_head_bias": np.zeros(3, np.float32),
                            "pooler.bca_head_weight": np.zeros((32, 32), np.float32)}, "not a head input of this graph"),
        "non-finite": ({"classifier.bca_head_weight": np.full((32, 3), np.nan, np.float32),
                        "classifier.bca_head_bias": np.zeros(3, np.float32)}, "NaN/Inf values"),
        "label-layer-missing": ({}, "the label layer must be present exactly when base labels are recorded"),
    }
    for name, (content, needle) in cases.items():
        directory = _edited_export(shared, tmp_path / f"base-{name}", lambda m: None)
        if isinstance(content, bytes):
            (directory / base_file).write_bytes(content)
        else:
            np.savez(directory / base_file, **content)
        with pytest.raises(ServingError) as caught:
            MultiAdapterSession(directory)
        assert needle in str(caught.value) and base_file in str(caught.value), (name, str(caught.value))
    outside = _edited_export(shared, tmp_path / "base-outside",
                             head(lambda h: h.__setitem__("base_file", "/etc/passwd")))
    with pytest.raises(BCAError, match="bank.head.base_file must be a path inside the export"):
        MultiAdapterSession(outside)


def test_export_refuses_heads_it_cannot_bank(heads, tmp_path):
    import dataclasses

    from bca_deploy.adapter_io import write_adapter_dir
    from bca_deploy.exporters import export
    from bca_deploy.exporters.errors import UnsupportedExportError
    from bca_deploy.models import TaskError

    misfits = dict((needle.split(":")[0], d) for d, needle in _misfits(heads, tmp_path / "adapters"))
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExportError, match="bert.encoder.layer.1.output.LayerNorm: a LayerNorm"):
        export(heads["base"], out, [heads["dirs"]["pos2"], misfits["bert.encoder.layer.1.output.LayerNorm"]],
               merge=False, bank=True, task="text-classification", verbose=False)
    with pytest.raises(TaskError, match="contradicts"):  # the adapter was trained for seq-cls
        export(heads["base"], out, [heads["dirs"]["pos2"]], merge=False, bank=True, task="feature-extraction",
               verbose=False)
    config, state = bd.read_adapter(heads["dirs"]["pos2"])  # the same head without the task recorded
    untasked = write_adapter_dir(tmp_path / "untasked", dataclasses.replace(config, task=None).to_dict(), state)
    with pytest.raises(UnsupportedExportError, match="feature-extraction bank graph shares every whole module"):
        export(heads["base"], out, [untasked], merge=False, bank=True, task="feature-extraction", verbose=False)
    with pytest.raises(UnsupportedExportError, match="no slot of this bank can classify"):
        export(heads["base"], out, [heads["dirs"]["plain"]], merge=False, bank=True, task="text-classification",
               verbose=False)
    assert not out.exists()


def test_snapshot_answers_unchanged_across_register_and_unregister(heads):
    """A batch's snapshot gives bit-identical logits while adapters come and go, slots are reused and the
    bank grows (its arrays reallocated) and widens (more labels)."""
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(heads["onnx"])
    rows = token_rows(4, seed=4)
    choices = ["pos2", "tri3", "pos2", "tri3"]
    snapshot = session.snapshot()
    feeds = session.pad_ids(rows)
    before = session.run(feeds, choices, ["logits"], snapshot)["logits"]
    capacity = session.bank_memory()["capacity"]
    session.unregister("pos2")
    session.register("pos2", heads["dirs"]["late5"])  # same name, other kernels and a 5-label head
    for i in range(capacity + 2):  # fills every free slot, then grows the bank
        session.register(f"x{i}", heads["dirs"]["tri3"])
        if i % 3 == 0:
            session.unregister(f"x{i}")
    assert session.bank_memory()["capacity"] > capacity
    after = session.run(feeds, choices, ["logits"], snapshot)["logits"]
    np.testing.assert_array_equal(after, before)
    labels = {"pos2": LATE["late5"][0], "tri3": HEADS["tri3"][0]}
    models = {"pos2": heads["models"]["late5"], "tri3": heads["models"]["tri3"]}
    _check_rows(session.classify(rows, choices), rows, choices, models, labels)


# ---- HTTP ---------------------------------------------------------------------------------------------------


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/classify", method="POST", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_classify_with_per_adapter_heads(heads):
    from bca_deploy.serving.http import ServerThread, build

    rows = token_rows(3, seed=5)
    labels = {n: spec[0] for n, spec in HEADS.items()}
    with ServerThread(build(heads["onnx"], max_wait_ms=50, threads=1)) as server:
        results: dict[str | None, tuple[int, dict]] = {}

        def send(adapter):
            results[adapter] = _post(server.url, {"input": rows, "adapter": adapter})

        # sent together, so they can share a batch: the headless request is refused alone
        threads = [threading.Thread(target=send, args=(a,)) for a in ("pos2", "tri3", None, "plain")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for adapter in ("pos2", "tri3"):
        status, body = results[adapter]
        assert status == 200 and body["adapter"] == adapter
        _check_rows(body["data"], rows, [adapter] * 3, heads["models"], labels)
    for adapter in (None, "plain"):
        status, body = results[adapter]
        assert status == 400 and "no classifier head" in body["error"]["message"], body


def test_roberta_rows_fit_the_positions_after_its_padding_offset(tmp_path):
    """RoBERTa's position ids start after the padding index: a table of 66 rows holds 64 tokens. The server
    took rows up to 66, and a 65-token row failed inside onnxruntime (a Gather out of bounds): an HTTP 500
    "internal error". Now: 64 tokens answer (equal to PyTorch), 65 are a 422 naming the limit while a request
    sent with it is answered, and export refuses validation cases that do not fit."""
    from bca_deploy.errors import ContextLengthError
    from bca_deploy.exporters import UnsupportedExportError, export
    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.http import ServerThread, build
    from head_helpers import save_kernel_adapter

    base = save_base("roberta", tmp_path / "base")
    adapter = save_kernel_adapter(base, tmp_path / "r0", ["query", "value"], 8, seed=0)
    with pytest.raises(UnsupportedExportError, match=r"longer than the model's 64 positions.*\n  - 1x65: 65 tokens"):
        export(base, tmp_path / "refused", [adapter], merge=False, bank=True, cases=[(1, 65)], verbose=False)
    assert not (tmp_path / "refused").exists()
    onnx_dir = export(base, tmp_path / "onnx", [adapter], merge=False, bank=True, cases=[(1, 64)], verbose=False)
    session = MultiAdapterSession(onnx_dir)
    assert session.max_positions == 64
    longest = token_rows(1, seed=7, low=64, high=65)
    with pytest.raises(ContextLengthError, match="input: 65 tokens; the model's maximum context length is 64 positions"):
        session.classify([longest[0] + [5]], ["r0"])
    results: dict[str, tuple[int, dict]] = {}
    with ServerThread(build(onnx_dir, max_wait_ms=50, threads=1)) as server:
        def send(key, rows):
            results[key] = _post(server.url, {"input": rows, "adapter": "r0"})

        threads = [threading.Thread(target=send, args=("fits", longest)),
                   threading.Thread(target=send, args=("too long", [longest[0] + [5]]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    status, body = results["too long"]
    assert status == 400 and "65 tokens; the model's maximum context length is 64 positions" in body["error"]["message"], \
        body
    status, body = results["fits"]
    assert status == 200, body
    want = own_logits(own_model(base, adapter), longest[0])
    np.testing.assert_allclose(body["data"][0]["logits"], want, atol=ATOL, rtol=0)
