"""bca_export.json: the one reader (what serve, validate and the Ray deployment use) against what export writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bca_deploy.errors import AdapterFormatError
from bca_deploy.exporters.bank import SLOT_AXIS, BankRecord, BankTensor, HeadLabels, HeadLayer, HeadLayout, layout_to_dict
from bca_deploy.exporters.errors import ExportMetadataError
from bca_deploy.exporters.metadata import METADATA_FILE, read_export_metadata

LAYOUT = {t.name: t for t in (BankTensor("encoder.layer.0.attention.self.query", 8, 32, 32, "linear"),
                              BankTensor("h.0.attn.c_attn", 16, 32, 96, "conv1d"))}
HEAD = HeadLayout(("classifier",), (HeadLayer("classifier", 32, 3, True, True),))
LABELS = HeadLabels(("neg", "neutral", "pos"), "single_label_classification")


def _bank(**changes) -> dict:
    bank = {"ids_input": "adapter_ids", "base_slot": 0, "slot_axis": SLOT_AXIS, "slots": [None, "a", "b"],
            "adapter_files": {"a": "adapters/a.onnx_adapter", "b": "adapters/b.onnx_adapter"},
            "base_model_prefix": "bert", "model_type": "bert", "tensors": layout_to_dict(LAYOUT),
            "head": {**HEAD.to_dict(), "base": LABELS.to_dict(), "base_file": "bca_head_base.npz",
                     "adapters": {"a": None, "b": HeadLabels(("x", "y")).to_dict()}}}
    return {**bank, **changes}


def _write(directory, data) -> None:
    (directory / METADATA_FILE).write_text(json.dumps(data))


def test_what_export_writes_reads_back_typed(tmp_path):
    assert read_export_metadata(tmp_path) is None  # optimum's exports have none
    _write(tmp_path, {"format": "bca-deploy-onnx", "task": "text-classification", "merged": False, "dtype": "fp32",
                      "bank": _bank(), "validation": {"rows": []}})
    metadata = read_export_metadata(tmp_path)
    assert (metadata.task, metadata.dtype, metadata.merged, metadata.kind) == ("text-classification", "fp32", False,
                                                                              "adapter-bank")
    bank = metadata.bank
    assert bank.adapters == ["a", "b"] and bank.slots == (None, "a", "b") and bank.layout == LAYOUT
    assert bank.head == HEAD and bank.base_labels == LABELS and bank.base_head_file == "bca_head_base.npz"
    assert bank.adapter_labels == {"a": None, "b": HeadLabels(("x", "y"))}
    assert metadata.fields["validation"] == {"rows": []}
    _write(tmp_path, {"task": "feature-extraction", "merged": True, "bank": None})
    assert read_export_metadata(tmp_path).kind == "merged" and read_export_metadata(tmp_path).bank is None


def test_a_task_no_export_writes_is_refused_escaped(tmp_path):
    """The task is shown by inspect and /health: a name no export writes (an escape sequence here) is refused."""
    _write(tmp_path, {"task": "\x1b[2J evil", "merged": True, "bank": None})
    with pytest.raises(ExportMetadataError, match=r"task must be one of .*text-classification.*got '\\x1b\[2J evil'"):
        read_export_metadata(tmp_path)


@pytest.mark.parametrize("field, value, needle", [("opset", "1" * 10_000_000, "opset must be an ONNX opset number"),
                                                  ("opset", True, "opset must be"), ("fft", "\x1b[2J", "fft must be"),
                                                  ("dtype", "fp32" * 1000, "dtype must be a dtype name")])
def test_fields_inspect_shows_are_what_an_export_writes(tmp_path, field, value, needle):
    """inspect printed a 10 MB opset string whole (helper-57's probe): the fields it shows are checked on read."""
    _write(tmp_path, {"task": "feature-extraction", "merged": False, "bank": None, field: value})
    with pytest.raises(ExportMetadataError, match=needle) as caught:
        read_export_metadata(tmp_path)
    assert len(str(caught.value)) < 1000


def test_every_problem_is_reported_at_once_naming_the_file_and_fields(tmp_path):
    _write(tmp_path, {"task": 3, "merged": "yes", "dtype": ["fp32"],
                      "bank": _bank(slots=5, tensors=[], slot_axis=2, model_type=7,
                                    adapter_files={"a": "../../etc/passwd"})})
    with pytest.raises(ExportMetadataError) as caught:
        read_export_metadata(tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / METADATA_FILE))
    for needle in ("task must be one of feature-extraction, ", "merged must be true or false", "dtype must be a string",
                   "bank.slots must be a list", "bank.tensors must be a non-empty list", "bank.slot_axis is 2",
                   "bank.model_type must be a string", "bank.adapter_files['a'] must be a path inside the export",
                   "re-export the bank"):
        assert needle in message, (needle, message)


@pytest.mark.parametrize("raw, needle", [
    (b"\xff{}", "not UTF-8 text"),
    (b"[" * 50_000 + b"]" * 50_000, "nested"),
    (b'{"task": "x", "bank": {"slots": [null, "a"], "tensors": [{"module": "q", "block_size": 1e400}]}}', "Infinity"),
])
def test_unreadable_files_are_refused_naming_them(tmp_path, raw, needle):
    (tmp_path / METADATA_FILE).write_bytes(raw)
    with pytest.raises((AdapterFormatError, ExportMetadataError), match=needle) as caught:
        read_export_metadata(tmp_path)
    assert METADATA_FILE in str(caught.value)


def test_head_labels_and_layout_are_checked_field_by_field():
    assert HeadLabels.from_dict(LABELS.to_dict()) == LABELS
    assert HeadLayout.from_dict(HEAD.to_dict()) == HEAD
    for data, needle in (({"num_labels": 0, "id2label": {}}, "num_labels must be a positive integer"),
                         ({"num_labels": True, "id2label": {"0": "a"}}, "num_labels must be a positive integer"),
                         ({"num_labels": 2, "id2label": {"0": "a", "01": "b"}}, "id2label must map"),
                         ({"num_labels": 1, "id2label": {"0": 5}}, "id2label must map"),
                         ([1], "labels must be an object")):
        with pytest.raises(ValueError, match=needle):
            HeadLabels.from_dict(data)
    two_label_layers = {**HEAD.to_dict(), "layers": [HEAD.to_dict()["layers"][0]] * 2}
    for data, needle in ((two_label_layers, "exactly one label layer"),
                         ({"modules": [], "layers": []}, "head.modules"),
                         ({**HEAD.to_dict(), "layers": [{"module": "c", "in_features": 0, "out_features": 3,
                                                         "labels": True, "bias": True}]}, "malformed head layer")):
        with pytest.raises(ValueError, match=needle):
            HeadLayout.from_dict(data)
    with pytest.raises(ValueError, match="one file per slot's adapter"):
        BankRecord.from_dict(_bank(adapter_files={"a": "adapters/a.onnx_adapter"}))


def test_a_head_layout_with_a_norm_layer_round_trips_and_bad_kinds_are_refused():
    """A head layer's ``kind`` (helper-101: ModernBERT's head.norm is held per slot): absent (an older export) reads
    as a Linear; a norm is square and never the label layer; an unknown kind is malformed."""
    norm = HeadLayer("head.norm", 32, 32, False, False, kind="norm")
    head = HeadLayout(("head", "classifier"), (norm, HeadLayer("classifier", 32, 3, True, True)))
    assert HeadLayout.from_dict(head.to_dict()) == head
    assert norm.slot_shapes() == {"head.norm.bca_head_weight": (32,), "head.norm.bca_head_bias": (32,)}
    old = {"modules": ["classifier"], "layers": [{k: v for k, v in HEAD.to_dict()["layers"][0].items() if k != "kind"}]}
    assert HeadLayout.from_dict(old) == HEAD
    label = {"module": "classifier", "in_features": 32, "out_features": 3, "labels": True, "bias": True}
    for bad in ({"module": "n", "in_features": 32, "out_features": 16, "labels": False, "bias": True, "kind": "norm"},
                {"module": "n", "in_features": 32, "out_features": 32, "labels": False, "bias": True, "kind": "conv"},
                {**label, "kind": "norm"}):
        with pytest.raises(ValueError, match="malformed head layer"):
            HeadLayout.from_dict({"modules": ["head", "classifier"], "layers": [bad, label]})


def test_inspect_describes_an_export_and_reads_its_display_fields_defensively(tmp_path):
    from click.testing import CliRunner

    from bca_deploy.cli import main

    import onnx
    from onnx import TensorProto, helper

    # the interface serve feeds and reads (int64 text inputs and adapter ids, float logits): inspect checks it
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"] if n != "adapter_ids" else ["b"])
              for n in ("input_ids", "attention_mask", "adapter_ids")]
    # ... and takes every bank input the metadata records (a graph without them is from another bank: not servable)
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in [*LAYOUT, *HEAD.names()]]
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "g", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # serve reads it: inspect checks it is a file
    (tmp_path / "adapters").mkdir()
    for name in ("a", "b"):
        (tmp_path / "adapters" / f"{name}.onnx_adapter").write_bytes(b"\0" * 500)
    rows = [{"max_abs_diff": 2.5e-7, "passed": True}, {"max_abs_diff": 1e-8, "passed": True}]
    _write(tmp_path, {"task": "text-classification", "merged": False, "fft": "matmul", "opset": 18, "dtype": "fp32",
                      "bank": _bank(), "bca_deploy_version": "0.1.0", "torch_version": "2.13.0",
                      "validation": {"rows": rows, "tolerance": "1e-04", "provider": "cpu"}})
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for needle in ("kind:         adapter bank, unmerged (matmul transforms); opset 18, fp32",
                   "adapters:     a, b (slots 1..2; slot 0 is the base model)",
                   "bank inputs:  2 (2 modules, block sizes 8, 16)",
                   "heads:        per slot (classifier); base: 3 labels; own head: b",
                   "validated:    2 of 2 comparisons passed at export, max |onnxruntime - PyTorch| 2.50e-07",
                   "files:        model.onnx + 2 adapter files (0.0 MB)", f"serve with:   bca-deploy serve {tmp_path}"):
        assert needle in result.output, (needle, result.output)
    # an adapter file this user may not read (emulated: the tests may run as root) is said instead of how to serve
    # (a directory that cannot be listed hid its files: inspect listed model.onnx alone and exited 0)
    with pytest.MonkeyPatch.context() as patch:
        import bca_deploy.exporters.metadata as metadata_module

        def deny(path):
            if Path(path).name == "b.onnx_adapter":
                raise PermissionError(13, "Permission denied", str(path))

        patch.setattr(metadata_module, "require_readable", deny)
        result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0 and "adapters:     NOT loadable: adapters/b.onnx_adapter (Permission denied)" \
        in result.output and "serve with" not in result.output, result.output
    # a config.json or tokenizer file serve would refuse (a pipe: serve said "no config.json", inspect "serve with")
    (tmp_path / "config.json").unlink()
    os.mkfifo(tmp_path / "config.json")
    (tmp_path / "tokenizer.json").symlink_to(tmp_path / "nowhere")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0 and "files:        NOT servable: config.json: a named pipe (FIFO), not a regular " \
        "file; tokenizer.json: " in result.output and "serve with" not in result.output, result.output
    (tmp_path / "config.json").unlink()
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    good_graph = (tmp_path / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(b"\0" * 1000)  # what onnxruntime would refuse is said instead of how to serve
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "graph:        NOT loadable: onnxruntime cannot load this graph (not an ONNX model: DecodeError" \
        in result.output and "serve with" not in result.output, result.output
    colon = tmp_path.parent / f"{tmp_path.name}: copy"  # the reason is shown whole whatever the path holds
    shutil.copytree(tmp_path, colon)
    result = CliRunner().invoke(main, ["inspect", str(colon)])
    assert "graph:        NOT loadable: onnxruntime cannot load this graph (not an ONNX model: DecodeError" \
        in result.output, result.output
    shutil.rmtree(colon)
    (tmp_path / "model.onnx").write_bytes(good_graph)
    # display-only fields of any shape read as absent; a malformed typed field is the reader's one error
    _write(tmp_path, {"task": "feature-extraction", "merged": True, "validation": {"rows": [1, {"passed": "yes"}]},
                      "adapters": [3], "bca_deploy_version": 7})
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0 and "validated:    0 of 2 comparisons passed at export (" in result.output, \
        result.output
    _write(tmp_path, {"task": "feature-extraction", "bank": {"slots": "a"}})
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "bank.slots must be a list" in result.output, result.output
    (tmp_path / METADATA_FILE).unlink()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0 and "without bca_export.json" in result.output, result.output
    # a record without its graph is an export all the same, and said to be incomplete (not "no adapter_config")
    _write(tmp_path, {"task": "text-classification", "merged": True})
    (tmp_path / "model.onnx").unlink()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 0 and "files:        no model.onnx: an incomplete export" in result.output \
        and "serve with" not in result.output, result.output
    (tmp_path / METADATA_FILE).unlink()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "neither an adapter directory (no adapter_config.json) nor an ONNX export" \
        in result.output, result.output


def test_inspect_checks_the_tokenizer_files_serve_reads_and_only_those(tmp_path):
    """helper-91: inspect's export check walked every tokenizer file name whether or not the export had a tokenizer;
    serve loads a tokenizer only when one of TOKENIZER_FILES is present (else it serves token ids, reading none of
    them), so a leftover broken special_tokens_map.json read "NOT servable" for an export serve starts on."""
    from bca_deploy.exporters.metadata import _served_file_problems
    from bca_deploy.models import has_tokenizer_files, load_saved_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "special_tokens_map.json").symlink_to(tmp_path / "nowhere")
    assert not has_tokenizer_files(tmp_path)  # serve's own decision: no tokenizer to load, so nothing it refuses
    assert _served_file_problems(tmp_path) == []
    (tmp_path / "tokenizer.json").write_text("{}")  # now serve loads one, and its loader refuses the dangling link
    with pytest.raises(FileNotFoundError, match="special_tokens_map.json"):
        load_saved_tokenizer(tmp_path)
    assert _served_file_problems(tmp_path) == ["special_tokens_map.json: No such file or directory"]
    (tmp_path / "config.json").unlink()
    assert _served_file_problems(tmp_path) == ["no config.json", "special_tokens_map.json: No such file or directory"]
