"""The main job (``bca-deploy demo``) on the embedded all-MiniLM-L6-v2: every stage runs and agrees with PyTorch."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bca_deploy.cli import main
from bca_deploy.demo import run_demo
from bca_deploy.errors import OutputExistsError


def test_demo_runs_every_stage_and_each_matches_pytorch(tmp_path):
    lines: list[str] = []
    steps = run_demo(tmp_path / "demo", log=lines.append)
    assert len(steps) == 7 and len(lines) == 7
    shift, *checks = steps
    assert shift.max_abs_diff > 1e-2  # the seeded adapter really changes the embeddings
    for step in checks:
        if step.max_abs_diff is not None:  # the ONNX export stages validate themselves (they raise on failure)
            assert step.max_abs_diff <= 1e-4, step
    assert steps[1].max_abs_diff == 0.0  # save + load is bit-exact
    bank = json.loads((tmp_path / "demo" / "onnx-bank" / "bca_export.json").read_text())["bank"]
    assert bank["slots"] == [None, "adapter", "adapter-second"]
    assert (tmp_path / "demo" / "onnx-bank" / "adapters" / "adapter-second.onnx_adapter").is_file()


def test_demo_refuses_a_non_empty_output_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        run_demo(tmp_path / "out", export_onnx=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out"), "--no-onnx"])
    assert result.exit_code == 2 and "not empty" in result.output
