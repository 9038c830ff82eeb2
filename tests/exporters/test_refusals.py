"""Refusals: each comes before anything is written, with a message that says what would work."""

from __future__ import annotations

import pytest

from bca_deploy.errors import AdapterMismatchError, BCAError, OutputExistsError
from bca_deploy.exporters import (
    RuntimeVersionError,
    UnsupportedExportError,
    ValidationError,
    export,
    supported_tasks,
    validate,
)
from bca_deploy.exporters.export import check_runtime
from bca_deploy.models import TaskError
from exporters_helpers import exported, tiny  # noqa: F401  (fixtures)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_unsupported_architecture_lists_what_bca_deploy_exports(tmp_path):
    from transformers import CTRLConfig

    CTRLConfig(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "ctrl")
    with pytest.raises(UnsupportedExportError, match=r"cannot export model_type 'ctrl'.*llama") as err:
        export(tmp_path / "ctrl", tmp_path / "out", merge=True)
    assert isinstance(err.value, BCAError)
    assert not (tmp_path / "out").exists()


def test_unsupported_task_lists_the_architecture_tasks(tiny, tmp_path):
    model_dir, adapters = tiny("bert")
    with pytest.raises(UnsupportedExportError) as err:
        export(model_dir, tmp_path / "out", adapters, merge=True, task="text-generation-with-past")
    message = str(err.value)
    assert "'text-generation-with-past'" in message and "feature-extraction, text-classification" in message
    assert supported_tasks("bert") == sorted(supported_tasks("bert"))


def test_encoder_decoder_is_refused(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedExportError, match="encoder-decoder"):
        export(tmp_path / "t5", tmp_path / "out", merge=True)


def test_old_onnxruntime_is_refused_for_dft_only(monkeypatch, tiny, tmp_path):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.26.1")
    model_dir, adapters = tiny("llama")
    with pytest.raises(RuntimeVersionError, match=r"1\.27.*fft='matmul'"):
        export(model_dir, tmp_path / "out", adapters, merge=False, fft="dft")
    assert not (tmp_path / "out").exists()
    check_runtime("matmul", validate=True)  # MatMul transforms run on any version
    check_runtime(None, validate=True)


def test_adapter_that_does_not_fit_surfaces_before_writing(tiny, tmp_path):
    model_dir, _ = tiny("qwen2")
    _, llama_adapters = tiny("llama")
    with pytest.raises(AdapterMismatchError, match="model_type"):
        export(model_dir, tmp_path / "out", llama_adapters[:1], merge=False)
    assert _siblings(tmp_path / "out") == []


def test_existing_output_needs_overwrite(exported, tiny, tmp_path):
    model_dir, adapters = tiny("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export(model_dir, out, adapters, merge=True)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaced any non-empty folder (a project, ~, a data folder): now only an earlier output
    with pytest.raises(OutputExistsError, match=f"{out}: .*not an output of bca-deploy.*keep.txt.*choose an empty or new"):
        export(model_dir, out, adapters, merge=True, overwrite=True, verbose=False, cases=[(1, 3, 1)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty folder, then this export's own output
        export(model_dir, out, adapters, merge=True, overwrite=True, verbose=False, cases=[(1, 3, 1)])
        assert (out / "model.onnx").is_file() and (out / "bca_export.json").is_file()
    assert _siblings(out) == ["out"]  # no temporary directory left beside it
    (out / ".git").mkdir()
    with pytest.raises(OutputExistsError, match=f"{out}: .*it holds .git"):
        export(model_dir, out, adapters, merge=True, overwrite=True, verbose=False, cases=[(1, 3, 1)])
    assert (out / ".git").is_dir() and (out / "model.onnx").is_file()
    with pytest.raises(OutputExistsError, match="input"):
        export(model_dir, model_dir, adapters, merge=True, overwrite=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(merge=False, fft="dft", opset=18), r"opset 18 is too low.*>= 20"),
        (dict(merge=False, fft="matmul", opset=11), r"opset 11 is too low.*>= 14"),
        (dict(merge=True, opset=1), r"opset 1 is too low for the models' attention.*>= 14"),  # was a 52 KB graph dump
        (dict(merge=True, opset=21), r"opset 21 is above 20"),
        (dict(merge=True, fft="dft"), r"fft='dft' \(--fft dft\) shapes the BCA subgraph of an unmerged graph"),
        (dict(merge=True, dtype="bf16"), r"dtype must be one of fp32, fp16"),
        (dict(merge=False, fft="cufft"), r"fft must be one of dft, matmul"),
        (dict(merge=True, provider="tpu"), r"provider must be 'cpu' or 'cuda'"),
    ],
)
def test_bad_arguments(tiny, tmp_path, kwargs, match):
    model_dir, adapters = tiny("llama")
    with pytest.raises(UnsupportedExportError, match=match):
        export(model_dir, tmp_path / "out", adapters, **kwargs)
    assert not (tmp_path / "out").exists()


def test_unmerged_without_adapters_is_refused(tiny, tmp_path):
    model_dir, _ = tiny("llama")
    with pytest.raises(UnsupportedExportError, match="needs at least one --adapter"):
        export(model_dir, tmp_path / "out", [], merge=False)


def test_cuda_provider_without_cuda_ep(monkeypatch, tiny, tmp_path):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    model_dir, adapters = tiny("llama")
    with pytest.raises(UnsupportedExportError, match="onnxruntime-gpu"):
        export(model_dir, tmp_path / "out", adapters, merge=True, provider="cuda")


def test_validation_catches_a_graph_without_the_adapters(exported, tiny):
    """The merged Llama graph against the base model alone: every output fails, all reported at once."""
    out = exported("llama", "merged")
    model_dir, _ = tiny("llama")
    with pytest.raises(ValidationError) as err:
        validate(out, model_dir, [], cases=[(1, 5, 1)], verbose=False)
    report = err.value.report
    assert len(report.failures) == len(report.rows) == 10
    assert "logits [b=1 s=5 step 1]" in str(err.value) and "present.1.value [b=1 s=5 step 2 (+1)]" in str(err.value)
    assert "FAIL" in report.table()


def test_failed_validation_leaves_nothing(tiny, tmp_path):
    model_dir, adapters = tiny("gpt2")
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as err:  # atol=rtol=0: float summation order alone fails it
        export(model_dir, out, adapters, merge=False, fft="matmul", atol=0.0, rtol=0.0, verbose=False, cases=[(1, 4, 1)])
    assert err.value.report.failures
    assert _siblings(out) == []


def test_task_head_missing_from_the_checkpoint_is_refused(tiny, tmp_path):
    """A BertModel checkpoint exported for text-classification would get a random classifier."""
    model_dir, adapters = tiny("bert")
    with pytest.raises(TaskError, match=r"classifier\.weight.*noise"):
        export(model_dir, tmp_path / "out", adapters, merge=True, task="text-classification")
    assert not (tmp_path / "out").exists()


def _copy_model(tiny, tmp_path, name="bert"):
    import shutil

    model_dir, adapters = tiny(name)
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy, adapters


def test_a_body_weight_missing_from_the_checkpoint_is_refused(tiny, tmp_path):
    """transformers would initialize it at random, and the validation's reference with it: a graph "validated"
    and wrong. merge refuses the same checkpoint; every loader refuses it, naming the weight."""
    from safetensors.torch import load_file, save_file

    from bca_deploy.errors import CheckpointFormatError
    from bca_deploy.models import load_model

    model_dir, adapters = _copy_model(tiny, tmp_path)
    tensors = load_file(str(model_dir / "model.safetensors"))
    dropped = next(k for k in tensors if k.endswith("layer.1.attention.output.dense.bias"))
    del tensors[dropped]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    for merge in (True, False):
        with pytest.raises(CheckpointFormatError, match=r"no weights for .*layer\.1\.attention\.output\.dense\.bias.*"
                                                        r"at random"):
            export(model_dir, tmp_path / "out", adapters, merge=merge)
        assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointFormatError, match="complete checkpoint"):
        load_model(model_dir, adapters)


def _write_tokenizer(directory):
    from conftest import wordpiece_tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece_tokenizer(specials + ["the", "water", "is", "hot"]).save_pretrained(directory)


def test_a_tokenizer_that_does_not_load_is_refused_before_anything_is_written(tiny, tmp_path):
    from bca_deploy.exporters import ExportError

    model_dir, adapters = _copy_model(tiny, tmp_path)
    _write_tokenizer(model_dir)
    text = (model_dir / "tokenizer.json").read_text()
    (model_dir / "tokenizer.json").write_text(text[:len(text) // 2])
    with pytest.raises(ExportError, match=r"its tokenizer does not load .*remove its files") as err:
        export(model_dir, tmp_path / "out", adapters, merge=True)
    assert str(model_dir) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_tokenizers_own_python_code_is_never_run(tiny, tmp_path, monkeypatch):
    """``auto_map`` in tokenizer_config.json names code in the directory: transformers asks whether to run it (and
    runs it on "y"); bca-deploy never asks. The user's answer is simulated: "y" to any question."""
    import builtins
    import json

    monkeypatch.setattr(builtins, "input", lambda *args: "y")

    from bca_deploy.exporters import ExportError

    model_dir, adapters = _copy_model(tiny, tmp_path)
    _write_tokenizer(model_dir)
    marker = tmp_path / "code-was-run"
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import BertTokenizerFast as EvilTokenizer\n")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    try:  # 4.x refuses the class without its code; 5.x loads tokenizer.json with its own class
        export(model_dir, tmp_path / "out", adapters, merge=True)
    except ExportError as exc:
        assert "tokenizer does not load" in str(exc)
    assert not marker.exists()
    import runpy

    runpy.run_path(str(model_dir / "evil.py"))  # (the code works: run, it leaves the marker)
    assert marker.read_text() == "ran"


def test_a_graph_onnxruntime_cannot_load_at_export_is_not_called_damaged(monkeypatch, tiny, tmp_path):
    """helper-96: Falcon with ALiBi exported a graph onnxruntime refused to load, and export said the file was "not
    what bca-deploy export wrote (damaged, truncated or changed since): export it again", which exporting again
    repeats. A graph refused as it is validated is named as this export's, with the onnxruntime version, and nothing
    is written."""
    import importlib

    import onnxruntime

    from bca_deploy.exporters.errors import ExportError, ExportGraphError

    validate_module = importlib.import_module("bca_deploy.exporters.validate")  # the module, not its function

    def refuse(onnx_path, options, provider="cpu"):
        raise ExportGraphError(onnx_path, "Fail: type (tensor(complex128)) of output arg is not supported")

    monkeypatch.setattr(validate_module, "inference_session", refuse)
    model_dir, adapters = tiny("gpt2")
    with pytest.raises(ExportError) as err:
        export(model_dir, tmp_path / "out", adapters, merge=True, verbose=False, cases=[(1, 3, 1)])
    message = str(err.value)
    assert f"onnxruntime {onnxruntime.__version__} cannot load the graph exported from {model_dir}" in message
    assert "complex128" in message and "gpt2" in message and "damaged" not in message
    assert _siblings(tmp_path / "out") == []
