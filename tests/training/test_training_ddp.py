"""The same trainer under torchrun: two CPU processes on gloo, rank 0 writes, the adapter loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import bca_deploy as bd
from bca_deploy.training import EvaluateConfig, evaluate
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    REPO,
    make_data,
    one_thread,
    sst2_rows,
    subprocess_env,
    tiny_model_dir,
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_torchrun_two_cpu_processes(tmp_path):
    data = make_data(tmp_path / "data")
    model_dir = tiny_model_dir(tmp_path / "bert", "bert", [s for s, _ in sst2_rows("train", 256)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bca_deploy.training", "train", "--model", str(model_dir), "--data", str(data["small"]),
           "--eval-data", str(data["dev"]), "--out", str(out), "--device", "cpu", "--block-size", "8",
           "--batch-size", "8", "--max-length", "32", "--max-steps", "4", "--save-every", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: 4 steps") == 1  # the summary is printed once, by rank 0
    result = json.loads((out / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == 4
    assert result["config"]["world_size"] == 2
    # 2 processes x batch 8 = 16 examples a step
    assert result["samples_per_second"] * result["train_seconds"] == pytest.approx(4 * 16)

    from transformers import AutoModelForSequenceClassification

    model = bd.load_adapter(AutoModelForSequenceClassification.from_pretrained(model_dir), out / "last")
    assert len(list(bd.bca_layers(model))) == 2 * 6  # the default targets: every linear layer of 2
    assert any(layer.bca_kernels["default"].abs().sum() > 0 for _, layer in bd.bca_layers(model))
    # the metric both ranks computed together equals one process evaluating everything
    metrics = evaluate(EvaluateConfig(model=model_dir, adapter=out / "last", data=data["dev"]))
    assert metrics["accuracy"] == result["final_metrics"]["accuracy"]
    assert metrics["n"] == result["final_metrics"]["n"] == 128
    assert metrics["loss"] == pytest.approx(result["final_metrics"]["loss"], rel=1e-5)
