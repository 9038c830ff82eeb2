"""The click layer: every command has --help; errors are one clean line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import bca_deploy as bd
from bca_deploy.cli import main
from conftest import tiny_llama


@pytest.fixture
def adapter_dir(tmp_path):
    model = bd.inject(tiny_llama(), ["q_proj", "v_proj"], block_size=8, init="normal", seed=0, scaling=1 / 32)
    return bd.save_adapter(model, tmp_path / "adapter")


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in main.commands:
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage:" in sub.output


def test_inspect(adapter_dir):
    result = CliRunner().invoke(main, ["inspect", str(adapter_dir)])
    assert result.exit_code == 0, result.output
    assert "base model:   llama" in result.output
    assert "kernel parameters: 384" in result.output
    assert "model.layers.1.self_attn.v_proj  linear      32      16     8  0.03125" in result.output


def test_convert_to_peft_and_back_is_exact(adapter_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "--adapter", str(adapter_dir), "--to", "peft", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["convert", "--adapter", str(tmp_path / "p"), "--to", "bca", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    before = load_file(adapter_dir / "adapter_model.safetensors")
    after = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_existing_output_is_a_clean_error(adapter_dir, tmp_path):
    runner = CliRunner()
    args = ["convert", "--adapter", str(adapter_dir), "--to", "peft", "--out", str(tmp_path / "p")]
    assert runner.invoke(main, args).exit_code == 0
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert "already holds an adapter" in result.output and "Traceback" not in result.output
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_merge_command_matches_in_memory_merge(adapter_dir, tmp_path, input_ids):
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    runner = CliRunner()
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(adapter_dir), "--adapter", str(adapter_dir),
            "--weight", "0.5", "--weight", "0.25", "--out", str(out), "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    adapted = bd.load_adapter(tiny_llama(), adapter_dir)
    for _, layer in bd.bca_layers(adapted):
        layer.scalings["default"] *= 0.75  # 0.5 + 0.25 of the same adapter
    torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted(input_ids=input_ids).logits,
                               rtol=1e-5, atol=1e-5)
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "exists" in again.output
    bad = runner.invoke(main, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(adapter_dir),
                               "--adapter", str(adapter_dir), "--weight", "1.0", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "got 1 --weight for 2 --adapter" in bad.output
    assert not (tmp_path / "x").exists()


def test_export_and_validate_commands(tmp_path):
    from conftest import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "base")
    model = bd.inject(tiny_bert(), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0)
    bd.save_adapter(model, tmp_path / "adapter")
    runner = CliRunner()
    common = ["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    result = runner.invoke(main, ["export", *common, "--task", "feature-extraction", "--cases", "1x5,2x9",
                                  "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert "last_hidden_state" in result.output
    ok = runner.invoke(main, ["validate", "--onnx", str(tmp_path / "onnx"), *common, "--cases", "2x7"])
    assert ok.exit_code == 0, ok.output
    # a tolerance no float computation meets: the check must fail and say so
    strict = runner.invoke(main, ["validate", "--onnx", str(tmp_path / "onnx"), *common, "--atol", "1e-12"])
    assert strict.exit_code == 2 and "Error:" in strict.output
    bad = runner.invoke(main, ["export", *common, "--cases", "2by9", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'2by9' is not BATCHxSEQ" in bad.output


def test_train_and_evaluate_commands(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
    from training_helpers import make_data, sst2_rows, tiny_model_dir

    data = make_data(tmp_path)
    model_dir = tiny_model_dir(tmp_path / "model", "bert", [t for t, _ in sst2_rows("train", 64)])
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--model", str(model_dir), "--data", str(data["train"]),
                                  "--eval-data", str(data["dev"]), "--out", str(tmp_path / "run"),
                                  "--targets", "query,value", "--block-size", "8", "--optimizer", "adamw",
                                  "--lr", "1e-2", "--batch-size", "8", "--max-length", "32", "--max-steps", "4"])
    assert result.exit_code == 0, result.output
    assert "done: 4 steps" in result.output
    ev = runner.invoke(main, ["evaluate", "--model", str(model_dir), "--adapter", str(tmp_path / "run" / "last"),
                              "--data", str(data["dev"])])
    assert ev.exit_code == 0, ev.output
    final = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[-1])
    assert "accuracy" in ev.output, (ev.output, final)
    missing = runner.invoke(main, ["train", "--model", str(model_dir), "--data", str(tmp_path / "nope.tsv"),
                                   "--out", str(tmp_path / "run2")])
    assert missing.exit_code == 2 and "nope.tsv" in missing.output
    assert not (tmp_path / "run2").exists()


def test_export_bank_and_its_refusals(tmp_path):
    import json

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapters = []
    for seed, targets in enumerate((["q_proj", "v_proj"], ["gate_proj"])):
        model = bd.inject(tiny_llama(), targets, block_size=8, init="normal", seed=seed)
        adapters.append(bd.save_adapter(model, tmp_path / f"ad{seed}"))
    runner = CliRunner()
    common = ["export", "--model", str(tmp_path / "base"), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
              "--cases", "2x5"]
    refused = runner.invoke(main, common + ["--merge", "--bank", "--out", str(tmp_path / "onnx")])
    assert refused.exit_code == 2 and "merge" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "onnx").exists()
    result = runner.invoke(main, common + ["--bank", "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "wrote adapter-bank ONNX model" in result.output
    bank = json.loads((tmp_path / "onnx" / "bca_export.json").read_text())["bank"]
    assert bank["slots"] == [None, "ad0", "ad1"]
    assert {t["module"].rsplit(".", 1)[-1] for t in bank["tensors"]} == {"q_proj", "v_proj", "gate_proj"}
    for name in ("ad0", "ad1"):
        assert (tmp_path / "onnx" / bank["adapter_files"][name]).is_file()
    # serve refuses a graph that is not a bank, as a clean error, before binding any port
    plain = runner.invoke(main, ["export", "--model", str(tmp_path / "base"), "--adapter", str(adapters[0]),
                                 "--cases", "1x4", "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    served = runner.invoke(main, ["serve", str(tmp_path / "plain"), "--port", "1"])
    assert served.exit_code == 2 and "not an adapter-bank graph" in served.output and "--bank" in served.output
