"""One training command: the typed config, its validation (every problem at once), the recipes, and the
commands generated from it (bca-deploy train == python -m bca_deploy.training train)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from bca_deploy.cli import main
from bca_deploy.training import RECIPES, EvaluateConfig, TrainConfig, TrainingConfigError
from bca_deploy.training.cli import evaluate_command, train_command
from bca_deploy.training.loading import DEFAULT_TARGETS
from training_helpers import REPO, make_data, one_thread, sst2_rows, subprocess_env, tiny_model_dir  # noqa: F401


def test_validation_reports_every_problem_at_once(tmp_path):
    cfg = TrainConfig(model=tmp_path / "nope", data=None, out=tmp_path / "o", lr=-1.0, batch_size=0,
                      optimizer="sgd", eval_every=5, warmup_ratio=1.5, resume=True, overwrite=True,
                      max_grad_norm=float("nan"), label_names=["a", "a"], num_labels=3, targets="query")
    with pytest.raises(TrainingConfigError) as info:
        cfg.validate()
    msg = str(info.value)
    for part in ("--data is required", f"--model {tmp_path / 'nope'}: directory not found", "--lr must be > 0",
                 "--batch-size must be >= 1", "--optimizer 'sgd': choose one of adamw, adadelta",
                 "--eval-every is set but there is no evaluation data", "--warmup-ratio must be in [0, 1)",
                 "--resume and --overwrite both given", "--max-grad-norm must be a finite number",
                 "--label-names must be distinct, repeated: 'a'", "--label-names gives 2 names but --num-labels is 3",
                 "--targets must be a non-empty list of names"):
        assert part in msg, (part, msg)
    assert msg.count("\n  - ") >= 12
    assert TrainConfig(model=tmp_path, data="d.tsv", out="o").problems() == []


def test_options_that_belong_to_another_task_or_conflict(tmp_path):
    cfg = TrainConfig(model=tmp_path, data="d", out="o", task="causal-lm", num_labels=2, no_head=True)
    problems = cfg.problems()
    assert "--num-labels is for seq-cls; --task is causal-lm" in problems
    assert any("--no-head/--new-head are for seq-cls" in p for p in problems)
    cfg = TrainConfig(model=tmp_path, data="d", out="o", no_head=True, new_head=True, modules_to_save=["x"])
    assert len(cfg.problems()) == 2


def test_columns_seeds_and_devices_that_cannot_mean_what_they_say(tmp_path):
    """Each was accepted (the label column trained on as text, a response that is its own prompt) or an internal
    error (a seed past torch's range; --device cuda on a CPU-only torch, or meta)."""
    from bca_deploy.training.runtime import usable_device

    cfg = TrainConfig(model=tmp_path, data="d", out="o", text_columns=["sentence", "label"], seed=2**63)
    problems = cfg.problems()
    assert "--text-columns includes the label column 'label': the labels would be read as text" in problems
    assert any(p.startswith("--seed must be in [0, 9223372036854775807]") for p in problems)
    assert "--text-columns names 'a' twice" in TrainConfig(model=tmp_path, data="d", out="o",
                                                           text_columns=["a", "a"]).problems()
    same = TrainConfig(model=tmp_path, data="d", out="o", task="causal-lm", prompt_column="r", response_column="r")
    assert any("--prompt-column and --response-column are both 'r'" in p for p in same.problems())
    # the conversation column named as the tools column was ignored without a word (no tools read)
    for cfg in (TrainConfig(model=tmp_path, data="d", out="o", task="causal-lm", tools_column="messages"),
                EvaluateConfig(model=tmp_path, data="d", messages_column="chat", tools_column="chat")):
        assert any(p.startswith(f"--tools-column and --messages-column are both {cfg.tools_column!r}")
                   for p in cfg.problems()), cfg.problems()
    assert any("the label column" in p for p in EvaluateConfig(model=tmp_path, data="d", text_columns=["y"],
                                                               label_column="y").problems())
    assert TrainConfig(model=tmp_path, data="d", out="o", seed=2**63 - 1).problems() == []
    assert "--targets: for the adapter; --method head-only trains the head alone" in TrainConfig(
        model=tmp_path, data="d", out="o", method="head-only", targets=["query"]).problems()  # was ignored
    import torch

    assert usable_device("cpu") == torch.device("cpu")
    for request, needle in (("meta", "not on meta devices"), ("xyz", "--device 'xyz'"),
                            *([] if torch.cuda.is_available() else [("cuda", "CPU-only build"),
                                                                     ("cuda:1", "CPU-only build")])):
        with pytest.raises(TrainingConfigError, match=needle):
            usable_device(request)


def test_recipes_fill_only_what_was_not_given():
    default = TrainConfig(model="m", data="d", out="o").resolved()
    r = RECIPES["default"]["seq-cls"]
    assert (default.optimizer, default.lr, default.head_lr, default.scheduler) == (r.optimizer, r.lr, r.head_lr,
                                                                                   r.scheduler)
    paper = TrainConfig(model="m", data="d", out="o", recipe="paper", lr=0.5, warmup_steps=3).resolved()
    assert paper.optimizer == "adadelta" and paper.lr == 0.5 and paper.lr_divide_by_block_size is True
    assert paper.warmup_steps == 3 and paper.warmup_ratio is None and paper.warmup == 3
    assert TrainConfig(model="m", data="d", out="o", lr=0.5, warmup_steps=3).overrides() == {"lr": 0.5,
                                                                                               "warmup_steps": 3}
    with pytest.raises(TrainingConfigError, match="--recipe 'nope'"):
        TrainConfig(model="m", data="d", out="o", recipe="nope").resolved()


def test_default_recipe_and_targets_are_the_measured_ones():
    """The defaults bench/train_sweep.py chose on held-out training rows (bench/results/train_sweep_seq-cls.md,
    stages 1 and 4); change them only with a sweep that beats them."""
    r = RECIPES["default"]["seq-cls"]
    assert (r.optimizer, r.lr, r.head_lr, r.lr_divide_by_block_size, r.weight_decay) == ("adamw", 1e-3, 3e-3, False, 0.0)
    assert (r.scheduler, r.warmup_ratio, r.max_grad_norm, r.scaling) == ("linear", 0.06, 1.0, 1.0)
    # every linear layer of a BERT encoder ("output.dense" matches the attention and the feed-forward output)
    assert DEFAULT_TARGETS["bert"] == ["query", "key", "value", "output.dense", "intermediate.dense"]
    assert DEFAULT_TARGETS["llama"] == ["q_proj", "v_proj"]
    lm = RECIPES["default"]["causal-lm"]  # bench/results/train_sweep_causal-lm.md, stages 1 and 2
    assert (lm.optimizer, lm.lr, lm.head_lr, lm.scheduler, lm.warmup_ratio) == ("adamw", 3e-2, 3e-3, "linear", 0.06)
    paper = RECIPES["paper"]["seq-cls"]  # the paper's recipe as printed, kernels scaled by p so that it trains
    assert (paper.optimizer, paper.lr, paper.head_lr, paper.lr_divide_by_block_size) == ("adadelta", 0.1, 0.1, True)
    assert (paper.scheduler, paper.max_grad_norm, paper.scaling, paper.adadelta_eps) == ("constant", 0.0, "p", 1e-6)


def test_every_field_is_an_option_of_both_commands():
    """bca-deploy train and python -m bca_deploy.training train are one command object, generated from TrainConfig."""
    assert main.commands["train"] is train_command and main.commands["evaluate"] is evaluate_command
    from bca_deploy.training.cli import module_main  # noqa: F401 - builds its group from the same commands

    options = {name for param in train_command.params for name in [param.name]}
    assert options == {f.name for f in fields(TrainConfig)}
    assert {p.name for p in evaluate_command.params} == {f.name for f in fields(EvaluateConfig)}
    flags = {opt for param in train_command.params for opt in param.opts + param.secondary_opts}
    for needed in ("--label-column", "--text-columns", "--num-labels", "--init", "--scheduler", "--warmup-ratio",
                   "--grad-accum-steps", "--weight-decay", "--no-head", "--label-names", "--recipe",
                   "--no-progress", "--regression", "--no-regression", "--no-group-by-length"):
        assert needed in flags, needed
    every_help = [param.help for param in train_command.params]
    assert all(h and len(h) > 10 for h in every_help)


def test_help_is_the_same_from_both_entry_points():
    direct = CliRunner().invoke(main, ["train", "--help"])
    assert direct.exit_code == 0
    module = subprocess.run([sys.executable, "-m", "bca_deploy.training", "train", "--help"], capture_output=True,
                            text=True, cwd=REPO, env={**subprocess_env(), "COLUMNS": "80"}, timeout=120)
    assert module.returncode == 0, module.stderr
    strip = lambda text: "".join(text.split("Options:", 1)[1].split())  # noqa: E731 - usage lines name the program
    assert strip(module.stdout) == strip(direct.output)


def test_cli_reports_several_mistakes_at_once_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "d.tsv"), "--out", str(tmp_path / "o"),
                                       "--lr", "-1", "--batch-size", "0", "--resume", "--overwrite"])
    assert result.exit_code == 2
    for part in ("--model is required", "--lr must be > 0", "--batch-size must be >= 1", "--resume and --overwrite"):
        assert part in result.output, result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
    bad = CliRunner().invoke(main, ["train", "--block-size-pattern", "value", "--data", "d", "--out", "o"])
    assert bad.exit_code == 2 and "expected NAME=P" in bad.output


def test_same_run_same_output_from_both_entry_points(tmp_path):
    data = make_data(tmp_path / "data")
    model = tiny_model_dir(tmp_path / "bert", "bert", [s for s, _ in sst2_rows("train", 64)])
    args = ["--model", str(model), "--data", str(data["small"]), "--eval-data", str(data["small"]),
            "--block-size", "8", "--batch-size", "16", "--max-length", "32", "--max-steps", "2", "--lr", "0.01"]
    direct = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "a")])
    assert direct.exit_code == 0, direct.output
    module = subprocess.run([sys.executable, "-m", "bca_deploy.training", "train", *args, "--out", str(tmp_path / "b")],
                            capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert module.returncode == 0, module.stderr

    def shape(text):  # the lines, with the numbers that differ between two runs (time, speed) and paths removed
        import re

        text = text.replace(str(tmp_path / "a"), "OUT").replace(str(tmp_path / "b"), "OUT")
        return [re.sub(r"\d+(\.\d+)?", "N", line) for line in text.splitlines() if line.strip()]

    assert shape(module.stdout) == shape(direct.stdout)
    summary = direct.stdout
    assert summary.startswith("done: 2 steps") and "eval at step 2: accuracy" in summary
    assert f"adapter: {tmp_path / 'a' / 'best'} (seq-cls, BertForSequenceClassification, 2 labels" in summary
    assert f"bca-deploy merge --model {model} --adapter {tmp_path / 'a' / 'best'}" in summary
    assert "bca-deploy export" in summary and "bca-deploy serve" in summary
    start = module.stderr
    for part in ("bca-deploy train: seq-cls, recipe 'default'", "64 rows", "12 modules", "classifier:",
                 "2 labels: LABEL_0, LABEL_1", "recipe    default: adamw", "overridden: lr=0.01", "device    cpu",
                 "lr kernels"):
        assert part in start, (part, start)
    assert "You should probably TRAIN" not in start + direct.output and "Traceback" not in start
    ev = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--adapter", str(tmp_path / "a" / "best"),
                                   "--data", str(data["small"])])
    assert ev.exit_code == 0 and ev.output.startswith("accuracy ") and "You should probably" not in ev.output


def test_help_does_not_import_torch():
    code = ("import sys; from bca_deploy.cli import main; from bca_deploy.training.__main__ import module_main; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=subprocess_env(),
                         timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_progress_bar_is_drawn_on_a_terminal_of_size_zero(monkeypatch):
    """A pty nobody sized (``script``, some CI runners) reports 0 x 0; tqdm's own sizing then prints blank lines."""
    import pty

    from bca_deploy.training.trainer import _Printer

    master, slave = pty.openpty()  # a fresh pty: 0 columns, 0 rows
    assert tuple(os.get_terminal_size(slave)) == (0, 0)
    with os.fdopen(slave, "w") as term:
        monkeypatch.setattr(sys, "stderr", term)
        printer = _Printer(True)
        bar = printer.bar(2, 0)
        for _ in range(2):
            printer.update(bar, 0.5, {"bca_p8": 3e-3, "head": 1e-2})
        printer.close(bar)
        term.flush()
    import select

    chunks = []
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunks.append(os.read(master, 65536))
        except OSError:  # EIO: everything written before the slave closed has been read
            break
    os.close(master)
    text = b"".join(chunks).decode()
    assert "2/2" in text and "loss 0.5000, lr kernels 3.0e-03, head 1.0e-02" in text, text


def test_the_next_commands_offer_export_only_for_an_architecture_export_takes(tmp_path):
    """train printed "bca-deploy export ... && bca-deploy serve" after training an architecture export refuses
    (cohere, opt...); the summary now says why there is no export instead."""
    import transformers as tf

    from bca_deploy.training.report import export_refusal

    tf.CohereConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp_path / "cohere")
    tf.BertConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    assert "cannot export model_type 'cohere'" in export_refusal(tmp_path / "cohere")
    assert export_refusal(tmp_path / "bert") is None


def test_list_options_take_json_arrays_and_refuse_empty_items():
    """A class name with a comma needs the JSON form; an empty item would renumber the classes after it."""
    from bca_deploy.training.cli import parse_list

    assert parse_list("negative, neutral ,positive") == ["negative", "neutral", "positive"]
    assert parse_list("query,value,") == ["query", "value"]  # one trailing comma, as shells and editors leave it
    assert parse_list('["0-5, low", " 5-10, high "]') == ["0-5, low", "5-10, high"]
    assert parse_list(None) is None
    for value in ("negative,,positive", ",negative", "", "a,,", "[]", '["a", ""]', '["a", 1]', '["a"', "[a, b]"):
        with pytest.raises(click.BadParameter):
            parse_list(value)
    result = CliRunner().invoke(main, ["train", "--model", "m", "--data", "d.tsv", "--label-names", "neg,,pos"])
    assert result.exit_code == 2 and "'--label-names'" in result.output and "no empty item" in result.output, \
        result.output


def test_the_documented_functions_are_functions_whatever_was_imported_first():
    """``from bca_deploy.training import train, evaluate`` gave the module evaluate (imported by the module trainer,
    which binds the package attribute): ``evaluate(EvaluateConfig(...))`` raised "'module' object is not callable"."""
    code = ("import types\nfrom bca_deploy.training import train, evaluate\nimport bca_deploy.training as bt\n"
            "import bca_deploy\nimport bca_deploy.inject\n"
            "assert all(isinstance(f, types.FunctionType) for f in (train, evaluate, bt.evaluate, bca_deploy.inject))\n"
            "from bca_deploy.training.evaluation import TRAINING_FILE\n"
            "import bca_deploy.training.evaluation as module\nassert isinstance(module, types.ModuleType)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_broken_tokenizer_is_refused_by_name(tmp_path):
    """helper-67: a tokenizer.json that is not JSON raised tokenizers' own Exception: train and evaluate exited 70."""
    from bca_deploy.training.loading import load_tokenizer

    model_dir = tiny_model_dir(tmp_path / "bert", "bert", ["a film", "a dull mess"])
    (model_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(TrainingConfigError, match=rf"--model {model_dir}: cannot load a tokenizer \("):
        load_tokenizer(model_dir)


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGETS))
def test_each_default_target_names_a_linear_layer_of_its_model_type(model_type):
    """Every model type with default targets gets adapters from them: each entry matches at least one Linear (or
    GPT-2's Conv1D) of a model of that type, built on the meta device from transformers' own config class
    (a default naming no layer was refused as matching nothing)."""
    import torch
    import transformers

    from bca_deploy.inject import match_target_modules

    config = transformers.AutoConfig.for_model(model_type)  # its default sizes: on the meta device, no memory
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    for target in DEFAULT_TARGETS[model_type]:  # each entry alone: it matches, and only Linear/Conv1D layers
        assert match_target_modules(model, [target]), (model_type, target)


def test_every_exported_model_type_has_default_targets():
    """`train` without --targets on a model type export supports refused for albert, mpnet, smollm3 and granite
    ("no default target modules"), so the path train -> export stopped at its first step for them."""
    from bca_deploy.exporters.loading import DECODER_MODEL_TYPES, ENCODER_MODEL_TYPES

    assert sorted(set(ENCODER_MODEL_TYPES + DECODER_MODEL_TYPES) - set(DEFAULT_TARGETS)) == []
