"""A missing optional package is a one-line error naming the extra that installs it, never a traceback.

The package is made unimportable for the test (``sys.modules[name] = None`` makes ``import name`` raise
ImportError), as it is in an install without the extra.
"""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from bca_deploy.cli import main
from bca_deploy.exporters import MissingExtraError, export, validate
from exporters_helpers import exported, tiny  # noqa: F401  (fixtures)


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_export_without_the_onnx_extra(monkeypatch, tiny, tmp_path, module):
    model_dir, adapters = tiny("gpt2")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=rf"needs {module}, which is not installed: pip install 'bca-deploy\[onnx\]'"):
        export(model_dir, tmp_path / "out", adapters, merge=True)
    assert not (tmp_path / "out").exists()


def test_export_without_onnxruntime_but_no_validation(monkeypatch, tiny, tmp_path):
    """onnxruntime is only needed to validate: --no-validate exports with onnx alone."""
    model_dir, adapters = tiny("gpt2")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = export(model_dir, tmp_path / "out", adapters, merge=True, validate=False, verbose=False)
    assert (out / "model.onnx").is_file()


def test_validate_without_onnxruntime(monkeypatch, exported, tiny):
    out = exported("gpt2", "merged")
    model_dir, adapters = tiny("gpt2")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'bca-deploy\[onnx\]'"):
        validate(out, model_dir, adapters, verbose=False)


def test_cli_says_one_line(monkeypatch, tiny, tmp_path):
    model_dir, adapters = tiny("gpt2")
    monkeypatch.setitem(sys.modules, "onnx", None)
    result = CliRunner().invoke(main, ["export", "--model", str(model_dir), "--adapter", str(adapters[0]), "--merge",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == ("Error: ONNX export needs onnx, which is not installed: "
                                     "pip install 'bca-deploy[onnx]'")
    assert "Traceback" not in result.output
