"""End-to-end training on tiny random models and SST-2 rows: learning, reload, recipe, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bca_deploy as bd
from bca_deploy.errors import BlockSizeError, OutputExistsError, TargetModuleError
from bca_deploy.training import DataError, DataFileNotFoundError, TrainingConfigError, evaluate, train
from bca_deploy.training.checkpoint import recover_dir
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    REPO,
    make_data,
    one_thread,
    read_tensors,
    sst2_rows,
    subprocess_env,
    tiny_model_dir,
    write_jsonl,
    write_tsv,
)

FAST = dict(batch_size=16, max_length=32, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    paths = make_data(root / "data")
    texts = [s for s, _ in sst2_rows("train", 256)]
    paths["bert"] = tiny_model_dir(root / "bert", "bert", texts)
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def learned(files):
    """40 AdamW steps on 64 rows, evaluated on the same rows every 10 steps."""
    out = files["root"] / "learned"
    result = train(files["bert"], files["small"], out_dir=out, eval_path=files["small"], block_size=8,
                   optimizer="adamw", lr=0.1, max_steps=40, eval_every=10, log_every=5, **FAST)
    return result


def _never(step, logs):
    raise AssertionError(f"training started (step {step}) although the input is invalid")


# ---- learning and reloading ----------------------------------------------------------------------


def test_loss_decreases(learned):
    losses = [h["loss"] for h in learned.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.03, losses
    log = [json.loads(line) for line in (learned.out_dir / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in log if "loss" in r and "eval" not in r]
    assert sum(train_losses[-2:]) < sum(train_losses[:2])
    assert learned.trainable_parameters == {"adapter": 2 * 2 * (32 * 32 // 8), "head": 32 * 2 + 2}


def test_saved_adapter_reproduces_metrics_exactly(learned, files):
    best = {k: v for k, v in next(h for h in learned.history if h["step"] == learned.best_step).items() if k != "step"}
    assert evaluate(files["bert"], learned.out_dir / "best", files["small"]) == best
    assert evaluate(files["bert"], learned.out_dir / "last", files["small"]) == learned.final_metrics
    # the adapter directory is a plain bca-deploy adapter with the head beside the kernels
    config, state = bd.read_adapter(learned.out_dir / "best")
    assert config.modules_to_save == ["classifier"] and "classifier.weight" in state
    info = json.loads((learned.out_dir / "best" / "bca_training.json").read_text())
    assert info["step"] == learned.best_step and info["num_labels"] == 2


def test_paper_recipe_divides_kernel_lr_by_block_size(files, tmp_path):
    seen = {}
    train(files["bert"], files["small"], out_dir=tmp_path / "a", block_size=8, block_size_pattern={"value": 16},
          max_steps=1, on_step=lambda s, logs: seen.update(logs["lr_groups"]), **FAST)
    assert seen == {"bca_p8": 0.1 / 8, "bca_p16": 0.1 / 16, "head": 0.1}
    seen.clear()
    train(files["bert"], files["small"], out_dir=tmp_path / "b", block_size=8, optimizer="adamw", lr=2e-3,
          head_lr=1e-2, max_steps=1, on_step=lambda s, logs: seen.update(logs["lr_groups"]), **FAST)
    assert seen == {"bca_p8": 2e-3, "head": 1e-2}


def test_regression_sentence_pairs(files, tmp_path):
    rows = sst2_rows("train", 48)
    records = [{"a": s, "b": rows[(i + 1) % len(rows)][0], "score": float(y) + 0.25 * (i % 3)}
               for i, (s, y) in enumerate(rows)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = train(files["bert"], path, out_dir=tmp_path / "out", eval_path=path, text_columns=["a", "b"],
                   label_column="score", block_size=8, optimizer="adamw", lr=1e-2, max_steps=3, num_labels=None,
                   **FAST)
    assert result.metric == "pearson" and result.config["num_labels"] == 1 and result.config["regression"]
    assert set(result.final_metrics) == {"pearson", "mse", "loss", "n"}
    assert evaluate(files["bert"], result.out_dir / "last", path) == result.final_metrics


def test_causal_lm_prompt_response(files, tmp_path):
    rows = sst2_rows("train", 64)
    records = [{"prompt": f"review : {s} sentiment :", "response": "good" if y else "bad"} for s, y in rows]
    path = write_jsonl(tmp_path / "lm.jsonl", records)
    llama = tiny_model_dir(tmp_path / "llama", "llama", [r["prompt"] + " " + r["response"] for r in records])
    result = train(llama, path, task="causal-lm", out_dir=tmp_path / "out", eval_path=path, block_size=8,
                   optimizer="adamw", lr=1e-2, max_steps=20, eval_every=10, **FAST)
    assert result.config["targets"] == ["q_proj", "v_proj"] and result.metric == "perplexity"
    first, last = result.history[0]["perplexity"], result.history[-1]["perplexity"]
    assert last < first
    last = {k: v for k, v in result.history[-1].items() if k != "step"}
    assert evaluate(llama, result.out_dir / "best", path) == last


def test_head_only_and_seeds_repeat(files, tmp_path):
    runs = [train(files["bert"], files["small"], out_dir=tmp_path / f"h{i}", eval_path=files["small"],
                  method="head-only", optimizer="adamw", lr=1e-2, max_steps=3, seed=seed, **FAST)
            for i, seed in enumerate((5, 5, 6))]
    assert runs[0].trainable_parameters == {"adapter": 0, "head": 66}
    a, b, c = (read_tensors(r.last_dir) for r in runs)
    assert sorted(a) == ["classifier.bias", "classifier.weight", "state.classifier.bias", "state.classifier.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])
    assert evaluate(files["bert"], runs[0].last_dir, files["small"]) == runs[0].final_metrics


def test_prepared_peft_model(files, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(files["bert"])
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    result = train(None, files["small"], out_dir=tmp_path / "lora", model=model,
                   tokenizer=AutoTokenizer.from_pretrained(files["bert"]), method="custom", optimizer="adamw",
                   lr=1e-3, modules_to_save=["classifier"], max_steps=2, **FAST)
    assert result.trainable_parameters == {"adapter": 2 * 2 * 4 * (32 + 32), "head": 66}
    assert (result.last_dir / "trainable_parameters.safetensors").is_file()


# ---- gradient checkpointing ----------------------------------------------------------------------


def test_gradient_checkpointing_gives_equal_gradients(files):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(files["bert"])
    bd.inject(model, ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0,
              modules_to_save=["classifier"])
    model.train()
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # same dropout masks
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.bert.encoder.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 + 2
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_gradient_checkpointing_in_trainer(files, tmp_path):
    runs = [train(files["bert"], files["small"], out_dir=tmp_path / str(gc), block_size=8, optimizer="adamw",
                  lr=1e-2, max_steps=3, gradient_checkpointing=gc, **FAST) for gc in (False, True)]
    a, b = (read_tensors(r.last_dir) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- resume -----------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_resume_reaches_the_same_weights(files, tmp_path):
    kwargs = dict(block_size=8, max_steps=6, save_every=2, eval_path=files["small"], eval_every=3, **FAST)
    reference = train(files["bert"], files["small"], out_dir=tmp_path / "ref", **kwargs)

    def kill_at_5(step, logs):
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        train(files["bert"], files["small"], out_dir=tmp_path / "run", on_step=kill_at_5, **kwargs)
    assert json.loads((tmp_path / "run" / "last" / "bca_training.json").read_text())["step"] == 4
    with pytest.raises(OutputExistsError, match="resume=True"):
        train(files["bert"], files["small"], out_dir=tmp_path / "run", **kwargs)
    with pytest.raises(TrainingConfigError, match="batch_size: checkpoint has 16, this run has 8"):
        train(files["bert"], files["small"], out_dir=tmp_path / "run", resume=True, **{**kwargs, "batch_size": 8})
    resumed = train(files["bert"], files["small"], out_dir=tmp_path / "run", resume=True, **kwargs)
    assert resumed.resumed_from == 4 and resumed.step == 6
    # 64 rows / batch 16 = 4 batches an epoch: the data position crossed an epoch boundary
    ref, got = read_tensors(reference.last_dir), read_tensors(resumed.last_dir)
    assert ref.keys() == got.keys() and any(".bca_kernel" in k for k in ref)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert resumed.history == reference.history and resumed.best_step == reference.best_step
    ref_opt = torch.load(reference.last_dir / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    got_opt = torch.load(resumed.last_dir / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    for key in ref_opt:
        for buf in ref_opt[key]:
            assert torch.equal(ref_opt[key][buf], got_opt[key][buf])


def test_resume_after_sigkill(files, tmp_path):
    """A real process killed at an arbitrary moment (maybe mid-checkpoint) resumes to the same weights."""
    args = ["--model", str(files["bert"]), "--data", str(files["small"]), "--block-size", "8", "--batch-size", "16",
            "--max-length", "32", "--save-every", "1", "--no-progress"]
    cmd = [sys.executable, "-m", "bca_deploy.training", "train", *args, "--out", str(tmp_path / "run"),
           "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=subprocess_env())
    info = tmp_path / "run" / "last" / "bca_training.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(info.read_text())["step"] >= 3:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    last = recover_dir(tmp_path / "run" / "last")  # the kill may have hit between the two renames of a swap
    killed_at = json.loads((last / "bca_training.json").read_text())["step"]
    target = killed_at + 3
    resumed = train(files["bert"], files["small"], out_dir=tmp_path / "run", resume=True, block_size=8,
                    save_every=1, max_steps=target, **FAST)
    reference = train(files["bert"], files["small"], out_dir=tmp_path / "ref", block_size=8, save_every=1,
                      max_steps=target, **FAST)
    assert resumed.resumed_from == killed_at
    ref, got = read_tensors(reference.last_dir), read_tensors(resumed.last_dir)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


# ---- refusals before the first step -----------------------------------------------------------------


def _refused(files, tmp_path, error, match, data=None, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as info:
        train(files["bert"], data or files["small"], out_dir=out, on_step=_never, **{**FAST, "block_size": 8, **kwargs})
    assert not (out / "last").exists()
    return str(info.value)


def test_refuses_missing_file(files, tmp_path):
    msg = _refused(files, tmp_path, DataFileNotFoundError, "data file not found", data=tmp_path / "missing.tsv")
    assert str(tmp_path / "missing.tsv") in msg
    both = _refused(files, tmp_path, DataFileNotFoundError, "missing.tsv", data=tmp_path / "missing.tsv",
                    eval_path=tmp_path / "missing_dev.tsv")
    assert "missing_dev.tsv" in both


def test_refuses_missing_column(files, tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("fine", 1)], header=("review", "label"))
    msg = _refused(files, tmp_path, DataError, "no text column", data=path)
    assert str(path) in msg and "columns found" in msg and "'review', 'label'" in msg
    msg = _refused(files, tmp_path, DataError, "label column 'stars' not found", label_column="stars")
    assert "'sentence', 'label'" in msg


def test_refuses_empty_data(files, tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("sentence\tlabel\n")
    _refused(files, tmp_path, DataError, "empty", data=path)
    _refused(files, tmp_path, DataError, "empty", eval_path=path)


def test_refuses_label_outside_head(files, tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("good", 1), ("bad", 0), ("meh", 2)])
    msg = _refused(files, tmp_path, DataError, r"outside the classification head's range 0\.\.1", data=path,
                   num_labels=2)
    assert "line 4: label 2" in msg
    # the eval file is checked against the head that the training labels define
    _refused(files, tmp_path, DataError, "line 4: label 2", eval_path=path)
    _refused(files, tmp_path, DataError, "label 'positive'", data=write_tsv(tmp_path / "e.tsv", [("x", "positive")]))


def test_refuses_unknown_target_and_bad_block_size(files, tmp_path):
    msg = _refused(files, tmp_path, TargetModuleError, "matched no module", targets=["q_proj"])
    assert "query" in msg  # lists the modules that exist
    msg = _refused(files, tmp_path, BlockSizeError, "block size 5 does not divide", block_size=5)
    assert "valid block sizes" in msg


def test_refuses_bad_options_all_at_once(files, tmp_path):
    msg = _refused(files, tmp_path, TrainingConfigError, "invalid training options", optimizer="sgd", lr=-1.0,
                   eval_every=5, batch_size=0)
    for part in ("optimizer 'sgd'", "lr must be a positive number", "eval_every is set but there is no evaluation data",
                 "batch_size must be an integer >= 1"):
        assert part in msg


def test_module_cli(files, tmp_path, capsys):
    from bca_deploy.training.__main__ import main

    assert main(["train", "--model", str(files["bert"]), "--data", str(tmp_path / "nope.tsv"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "Error:" in capsys.readouterr().err
    out = tmp_path / "cli"
    assert main(["train", "--model", str(files["bert"]), "--data", str(files["small"]), "--eval-data",
                 str(files["small"]), "--out", str(out), "--block-size", "8", "--max-steps", "2", "--batch-size", "16",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--model", str(files["bert"]), "--adapter", str(out / "best"), "--data",
                 str(files["small"])]) == 0
    assert json.loads(capsys.readouterr().out) == result["final_metrics"]


def test_bf16_recipe_runs_on_cpu_and_reloads_exactly(files, tmp_path):
    """The GPU recipe (bf16 base + autocast, fp32 kernels and head), exercised on CPU."""
    result = train(files["bert"], files["small"], out_dir=tmp_path / "bf16", eval_path=files["small"], block_size=8,
                   optimizer="adamw", lr=1e-2, max_steps=2, precision="bf16", **FAST)
    assert result.precision == "bf16"
    tensors = read_tensors(result.last_dir)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert evaluate(files["bert"], result.last_dir, files["small"]) == result.final_metrics


def test_gradient_accumulation_matches_a_bigger_batch(files, tmp_path):
    no_dropout = tiny_model_dir(tmp_path / "bert0", "bert", [s for s, _ in sst2_rows("train", 256)], dropout=0.0)
    common = dict(block_size=8, optimizer="adamw", lr=1e-2, max_steps=2, max_length=32, progress=False)
    big = train(no_dropout, files["small"], out_dir=tmp_path / "big", batch_size=16, **common)
    acc = train(no_dropout, files["small"], out_dir=tmp_path / "acc", batch_size=8, grad_accum_steps=2, **common)
    a, b = read_tensors(big.last_dir), read_tensors(acc.last_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
