"""The validation report, the tolerance table, fp16 and external-data exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bca_deploy.exporters import (
    TOLERANCES,
    Case,
    ExportGraphError,
    Tolerance,
    ValidationReport,
    ValidationRow,
    export,
    validate,
)
from exporters_helpers import GRAPH_DAMAGE, damage_graph, exported, tiny  # noqa: F401  (fixtures)


def test_tolerance_table():
    assert (TOLERANCES["fp32"].atol, TOLERANCES["fp32"].rtol) == (1e-4, 1e-5)
    assert TOLERANCES["fp16"].atol > TOLERANCES["fp32"].atol
    assert Case.of((2, 3)) == Case(2, 3, 1) and Case.of((2, 3, 4)).new_tokens == 4
    with pytest.raises(ValueError, match="batch, seq"):
        Case.of((0, 3))


def test_the_relative_tolerance_is_of_the_outputs_scale_not_of_each_element():
    """Float noise from summation order follows the magnitudes summed: a logit near 0 in a row of logits
    around 14 gets the same 1.2e-4 as the large ones (seen on a phi3 bank that refused itself under an
    absolute-only 1e-4). A dropped adapter (1e-3 here) still fails, and so do NaNs and scale-1 outputs."""
    fp32 = TOLERANCES["fp32"]
    logits = np.linspace(-14.0, 14.0, 57)  # 0.0 is logits[28]
    noisy = logits.copy()
    noisy[28] += 1.2e-4
    limit = 1e-4 + 1e-5 * 14.0  # the rule, written out: atol + rtol * max|ref|
    assert fp32.bound(logits) == pytest.approx(limit)
    assert fp32.passes(noisy, logits)
    assert not np.allclose(noisy, logits, atol=1e-4, rtol=1e-5)  # element-wise rtol would refuse it
    adapter_dropped = logits.copy()
    adapter_dropped[3] += 1e-3
    assert not fp32.passes(adapter_dropped, logits)
    small = np.linspace(-1.0, 1.0, 57)
    assert not fp32.passes(small + 1.2e-4, small)  # at scale 1 the bound is 1.1e-4
    with_nan = logits.copy()
    with_nan[0] = np.nan
    assert not fp32.passes(with_nan, logits)
    assert fp32.passes(np.zeros((2, 0)), np.zeros((2, 0)))
    assert fp32.overridden(atol=1e-3) == Tolerance(1e-3, 1e-5) and fp32.overridden(rtol=0.0) == Tolerance(1e-4, 0.0)
    assert str(fp32) == "1e-04+1e-05·max|ref|"


def test_a_model_with_large_logits_passes_its_own_export_and_the_cli_overrides_both_parts(tmp_path):
    """A head scaled ×1e5 (logits in the tens of thousands): the graph differs from PyTorch by ~1e-2, float
    noise of 3e-7 of the scale, which an absolute-only tolerance refused. ``--rtol 0`` restores that
    refusal (exit 2, nothing written)."""
    import torch
    from click.testing import CliRunner

    from bca_deploy.cli import EXIT_USER_ERROR, main
    from exporters_helpers import build_model

    model = build_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e5)
    model.save_pretrained(tmp_path / "model")
    args = ["export", "--model", str(tmp_path / "model"), "--merge", "--task", "text-generation"]
    strict = CliRunner().invoke(main, [*args, "--rtol", "0", "--out", str(tmp_path / "strict")])
    assert strict.exit_code == EXIT_USER_ERROR and "does not match PyTorch" in strict.output, strict.output
    assert not (tmp_path / "strict").exists()
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "onnx" / "bca_export.json").read_text())["validation"]
    assert recorded["passed"] and max(r["max_abs_diff"] for r in recorded["rows"]) > 1e-3  # beyond atol alone
    report = validate(tmp_path / "onnx", tmp_path / "model", rtol=0.0, raise_on_failure=False, verbose=False)
    assert not report.passed


def test_report_table_and_failures():
    report = ValidationReport("m.onnx", "feature-extraction", "fp32", "cpu", "1e-04")
    report.rows.append(ValidationRow("last_hidden_state", "b=1 s=5", (1, 5, 32), 2e-7, 1e-7, "1e-04", True))
    assert report.passed and "all passed" in str(report)
    report.rows.append(ValidationRow("last_hidden_state", "b=2 s=11", (2, 11, 32), 0.5, 0.1, "1e-04", False))
    assert not report.passed and len(report.failures) == 1
    assert "1 of 2 FAILED" in report.table()
    assert json.loads(json.dumps(report.to_dict()))["passed"] is False


def test_validate_an_existing_directory(exported, tiny, capsys):
    out = exported("qwen2", "matmul")
    model_dir, adapters = tiny("qwen2")
    report = validate(out, model_dir, adapters, cases=[(2, 4, 2)])
    assert report.passed and report.task == "text-generation-with-past"  # read from bca_export.json
    assert len(report.rows) == 10
    assert "present.1.value" in capsys.readouterr().out


def test_a_failed_validation_says_which_adapters_the_export_was_made_with(exported, tiny):
    """Validating against other adapters than the export's fails (rightly); the error then says what
    ``bca_export.json`` records, as absolute paths."""
    import os

    from bca_deploy.exporters import ValidationError

    out = exported("llama", "matmul")
    model_dir, adapters = tiny("llama")
    assert len(adapters) == 2
    with pytest.raises(ValidationError) as err:
        validate(out, model_dir, adapters[:1], cases=[(1, 4, 1)], verbose=False)
    recorded = " ".join(f"--adapter {os.path.abspath(a)}" for a in adapters)
    assert f"note: {out / 'bca_export.json'} records that this graph was exported with {recorded}" in str(err.value)
    assert validate(out, model_dir, adapters, cases=[(1, 4, 1)], verbose=False).note == ""


def test_validation_cases_longer_than_the_models_positions_are_refused_naming_them(exported, tiny):
    """A case past the position table (tiny llama: 64) failed inside onnxruntime, exit 70 from the CLI. With
    past, the new tokens count too. Every such case is listed, before anything runs."""
    from click.testing import CliRunner

    from bca_deploy.cli import EXIT_USER_ERROR, main
    from bca_deploy.exporters import UnsupportedExportError

    out = exported("llama", "matmul")
    model_dir, adapters = tiny("llama")
    with pytest.raises(UnsupportedExportError) as err:
        validate(out, model_dir, adapters, cases=[(1, 60, 4), (1, 60, 5), (2, 65, 1)])
    message = str(err.value)
    assert "longer than the model's 64 positions" in message and "1x60 with 4" not in message
    assert "  - 1x60 with 5 new token(s): 65 positions\n  - 2x65 with 1 new token(s): 66 positions" in message
    result = CliRunner().invoke(main, ["validate", "--onnx", str(out), "--model", str(model_dir),
                                       *[a for adapter in adapters for a in ("--adapter", str(adapter))],
                                       "--cases", "1x64"])
    assert result.exit_code == EXIT_USER_ERROR and "Traceback" not in result.output, result.output
    assert "1x64 with 1 new token(s): 65 positions" in result.output


@pytest.mark.parametrize("how", GRAPH_DAMAGE)
def test_a_graph_onnxruntime_refuses_is_named_by_validate_and_its_cli(exported, tiny, tmp_path, how):
    import shutil

    from click.testing import CliRunner

    from bca_deploy.cli import EXIT_USER_ERROR, main
    from bca_deploy.exporters.validate import check_graph_file

    damaged = tmp_path / "export" / "onnx"
    shutil.copytree(exported("bert", "matmul"), damaged)
    damage_graph(damaged / "model.onnx", how)
    model_dir, adapters = tiny("bert")
    with pytest.raises(ExportGraphError, match=r"onnxruntime cannot load this graph"):
        validate(damaged, model_dir, adapters)
    with pytest.raises(ExportGraphError, match=r"onnxruntime cannot load this graph"):
        check_graph_file(damaged / "model.onnx")  # the same files, refused without building a session
    result = CliRunner().invoke(main, ["validate", "--onnx", str(damaged), "--model", str(model_dir),
                                       *[a for adapter in adapters for a in ("--adapter", str(adapter))]])
    assert result.exit_code == EXIT_USER_ERROR and "Traceback" not in result.output, result.output
    assert f"Error: {damaged / 'model.onnx'}: onnxruntime cannot load this graph (" in result.output


def test_a_graph_this_user_may_not_read_is_a_permission_error_not_a_damaged_graph(exported, tiny, monkeypatch):
    """onnxruntime reports an unreadable model.onnx as a graph it cannot load ("system error number 13"), which
    was shown as "damaged ... export it again". It is now the PermissionError naming the file (CLI exit 1),
    before onnxruntime opens it (emulated with the readability check: the tests may run as root)."""
    import importlib

    from click.testing import CliRunner

    from bca_deploy.cli import main

    validate_module = importlib.import_module("bca_deploy.exporters.validate")  # the package's validate is a function

    onnx_dir = exported("bert", "matmul")
    model_dir, adapters = tiny("bert")
    graph = onnx_dir / "model.onnx"

    def deny(path):
        if Path(path) == graph:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(validate_module, "require_readable", deny)
    with pytest.raises(PermissionError):
        validate(onnx_dir, model_dir, adapters, verbose=False)
    result = CliRunner().invoke(main, ["validate", "--onnx", str(onnx_dir), "--model", str(model_dir),
                                       *[a for adapter in adapters for a in ("--adapter", str(adapter))]])
    assert result.exit_code == 1 and f"Error: {graph}: Permission denied" in result.output, result.output
    assert "damaged" not in result.output


def test_fp16_export(tiny, tmp_path):
    model_dir, adapters = tiny("llama")
    out = export(model_dir, tmp_path / "fp16", adapters, merge=False, fft="matmul", dtype="fp16", verbose=False,
                 cases=[(2, 7, 2)])
    meta = json.loads((out / "bca_export.json").read_text())
    assert meta["dtype"] == "fp16" and meta["validation"]["passed"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {o.type for o in session.get_outputs()} == {"tensor(float16)"}
    # the kernels were not rounded to fp16 on the way: the constant is rfft(fp32 kernel), in fp32
    import onnx

    from bca_deploy import read_adapter
    from bca_deploy.exporters import frequency_kernels

    name = "model.layers.0.self_attn.o_proj"
    _, state = read_adapter(adapters[0])
    graph = onnx.load(str(out / "model.onnx")).graph
    constant = next(onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name == f"{name}.bca_freq_p8")
    assert constant.dtype == np.float32
    np.testing.assert_allclose(constant, frequency_kernels(state[f"{name}.bca_kernel"]).numpy(), rtol=0, atol=1e-7)


def test_external_data_export_keeps_the_bca_constants(monkeypatch, tiny, tmp_path):
    """Graphs over 2 GB are saved with external data; force that path on a tiny model."""
    import onnx

    import importlib

    # (the package's ``export`` attribute is the function; the module is reached by name)
    monkeypatch.setattr(importlib.import_module("bca_deploy.exporters.export"), "EXTERNAL_DATA_BYTES", 0)
    model_dir, adapters = tiny("llama")
    out = export(model_dir, tmp_path / "ext", adapters, merge=False, fft="dft", verbose=False, cases=[(1, 6, 2)])
    assert (out / "model.onnx_data").is_file()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    freq = [i for i in graph.initializer if ".bca_freq_p" in i.name]
    # every constant of 1 KiB or more lives in model.onnx_data (onnx keeps smaller ones inline)
    large = [i for i in freq if 4 * int(np.prod(i.dims)) >= 1024]
    assert large and all(i.data_location == onnx.TensorProto.EXTERNAL for i in large)
    assert json.loads((out / "bca_export.json").read_text())["validation"]["passed"]
    from bca_deploy.exporters.validate import check_graph_file

    check_graph_file(out / "model.onnx")  # serve-ray's check before Ray starts passes what export wrote
    data = (out / "model.onnx_data").read_bytes()
    (out / "model.onnx_data").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportGraphError, match=r"reads bytes up to \d+ of 'model.onnx_data', which has \d+"):
        check_graph_file(out / "model.onnx")
    (out / "model.onnx_data").unlink()
    with pytest.raises(ExportGraphError, match=r"reads external data from 'model.onnx_data', which is not a file"):
        check_graph_file(out / "model.onnx")


@pytest.mark.parametrize("task", ["text-generation", "feature-extraction-with-past"])
def test_other_decoder_tasks(tiny, tmp_path, task):
    """No-past decoders validate one step; hidden-state decoders with past compare hidden states and presents."""
    model_dir, adapters = tiny("llama")
    out = export(model_dir, tmp_path / task, adapters, merge=False, fft="matmul", task=task, verbose=False,
                 cases=[(2, 5, 2)])
    rows = json.loads((out / "bca_export.json").read_text())["validation"]["rows"]
    outputs = {r["output"] for r in rows}
    assert ("logits" if task == "text-generation" else "last_hidden_state") in outputs
    assert all(r["passed"] for r in rows)


def test_a_bank_exported_before_names_were_made_safe_still_validates(tmp_path, monkeypatch, capsys):
    """Slot names come from folder names, now made safe (``exp+1`` is ``exp_1``, ``_draft`` is ``draft``): a bank
    exported before that recorded the folder names, and validate with the same folders must still take it, not tell
    the user to pass the adapters it was exported with (helper-76)."""
    import functools

    import bca_deploy as bd
    import bca_deploy.models as models
    from conftest import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "base")
    folders = [tmp_path / "exp+1", tmp_path / "_draft"]
    for seed, folder in enumerate(folders):
        model = tiny_bert()
        bd.inject(model, ["query", "value"], block_size=8, init="normal", init_std=0.05, seed=seed)
        bd.save_adapter(model, folder)
    with monkeypatch.context() as m:  # the export as the earlier code named its slots
        m.setattr(models, "adapter_names", functools.partial(models.adapter_names, safe=False))
        out = export(tmp_path / "base", tmp_path / "old-bank", folders, merge=False, bank=True, verbose=False)
    assert json.loads((out / "bca_export.json").read_text())["bank"]["slots"] == [None, "exp+1", "_draft"]
    report = validate(out, tmp_path / "base", folders, verbose=False)
    assert report.passed and any("file=exp+1" in row.case for row in report.rows), report.rows
    capsys.readouterr()
    new = export(tmp_path / "base", tmp_path / "new-bank", folders, merge=False, bank=True, verbose=True)
    assert json.loads((new / "bca_export.json").read_text())["bank"]["slots"] == [None, "exp_1", "draft"]
    printed = capsys.readouterr().out  # the name to request each adapter by, beside its folder (helper-77)
    assert f"adapter exp_1: {folders[0]}\n" in printed and f"adapter draft: {folders[1]}\n" in printed, printed
    assert validate(new, tmp_path / "base", folders, verbose=False).passed


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem")
def test_a_graph_file_that_fails_to_read_is_named(tmp_path):
    """model.onnx as a link to /proc/self/mem (a regular file of size 0 whose read fails with EIO): serve and inspect
    said "Error: Input/output error", naming no file (helper-80). The I/O error now carries the graph's path."""
    import importlib

    validate_module = importlib.import_module("bca_deploy.exporters.validate")
    graph = tmp_path / "model.onnx"
    graph.symlink_to("/proc/self/mem")
    with pytest.raises(OSError) as info:
        validate_module.check_graph_file(graph)
    assert info.value.filename == str(graph), info.value
