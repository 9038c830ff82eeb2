"""End-to-end training on tiny random models and SST-2 rows: learning, the task/head the adapter records,
--no-head, labels against the head, recipes, reload, gradient checkpointing, accumulation, bf16."""

from __future__ import annotations

import json

import pytest
import torch

import bca_deploy as bd
from bca_deploy.errors import BlockSizeError, TargetModuleError
from bca_deploy.training import DataError, DataFileNotFoundError, EvaluateConfig, TrainingConfigError, evaluate, train
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    config,
    make_data,
    one_thread,
    read_tensors,
    sst2_rows,
    tiny_model_dir,
    tree,
    write_jsonl,
    write_tsv,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    paths = make_data(root / "data")
    texts = [s for s, _ in sst2_rows("train", 256)]
    paths["bert"] = tiny_model_dir(root / "bert", "bert", texts)  # a *ForSequenceClassification checkpoint
    # A learnable task for the tests of the defaults: SST-2 rows led by a cue word that gives the label.
    paths["cue"] = write_tsv(root / "data" / "cue.tsv",
                             [(f"{'great' if y else 'awful'} {s}", y) for s, y in sst2_rows("train", 64)])
    # an encoder without a head, whose features depend on its input (and know the cue words)
    paths["bare"] = tiny_model_dir(root / "bare", "bert-bare", texts + ["great awful"] * 40, initializer_range=0.2)
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def learned(files):
    """40 steps with the default recipe (no optimizer or lr option) from a bare encoder, evaluated every 10."""
    return train(config(files["bare"], files["cue"], files["root"] / "learned", eval_data=files["cue"],
                        max_steps=40, eval_every=10, log_every=5))


def _never(step, logs):
    raise AssertionError(f"training started (step {step}) although the input is invalid")


def _evaluate(model, adapter, data):
    return evaluate(EvaluateConfig(model=model, adapter=adapter, data=data))


# ---- learning with the defaults, and what the adapter records --------------------------------------


def test_defaults_learn(learned):
    losses = [h["loss"] for h in learned.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.1 and learned.final_metrics["accuracy"] > 0.9, losses  # (0.49 -> 0.28 here)
    log = [json.loads(line) for line in (learned.out_dir / "train_log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in log if "loss" in r and "eval" not in r]
    assert sum(train_losses[-2:]) < sum(train_losses[:2])
    # every linear layer of 2: 4 of 32 x 32 and 2 of 32 x 64 (intermediate), d_out * d_in / 8 kernel parameters each
    assert learned.trainable_parameters == {"adapter": 2 * (4 * 32 * 32 + 2 * 32 * 64) // 8, "head": 32 * 2 + 2}
    assert learned.recipe == "default" and learned.config["optimizer"] == "adamw"
    # the learning rates of every step are logged, kernels and head apart
    assert set(log[0]["lr"]) == {"bca_p8", "head"}


def test_adapter_records_task_head_and_labels(learned, files):
    """Trained from a bare encoder (BertModel), the adapter says BertForSequenceClassification, 2 labels."""
    config_, state = bd.read_adapter(learned.out_dir / "best")
    task = config_.task
    assert task.type == "seq-cls" and task.architecture == "BertForSequenceClassification"
    assert task.head.modules == ["classifier"] == config_.modules_to_save
    assert task.head.num_labels == 2 and task.head.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert task.head.label2id == {"LABEL_0": 0, "LABEL_1": 1}
    assert task.head.problem_type == "single_label_classification"
    assert task.export_task == "text-classification"
    assert learned.task == task.to_dict()
    # the adapter_io round trip: it loads into the class it names, head included, with equal outputs
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(files["bare"], num_labels=task.head.num_labels)
    bd.load_adapter(model, learned.out_dir / "best")
    assert torch.equal(model.classifier.weight, state["classifier.weight"])
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    again = bd.load_adapter(AutoModelForSequenceClassification.from_pretrained(files["bare"], num_labels=2),
                            learned.out_dir / "best")
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_saved_adapter_reproduces_metrics_exactly(learned, files):
    best = {k: v for k, v in next(h for h in learned.history if h["step"] == learned.best_step).items() if k != "step"}
    assert _evaluate(files["bare"], learned.out_dir / "best", files["cue"]) == best
    assert _evaluate(files["bare"], learned.out_dir / "last", files["cue"]) == learned.final_metrics
    info = json.loads((learned.out_dir / "best" / "bca_training.json").read_text())
    assert info["step"] == learned.best_step and info["num_labels"] == 2
    result = json.loads((learned.out_dir / "train_result.json").read_text())
    assert result["step"] == 40 and result["final_metrics"] == learned.final_metrics


def test_a_held_out_file_without_the_recorded_columns_names_whose_columns_they_are(learned, files, tmp_path):
    """helper-97: evaluate reads a file by the columns the run was trained on (auto-detected then); a file with a
    text column of another name was refused as "text column 'sentence' not found", an option never given."""
    path = write_tsv(tmp_path / "other.tsv", [("a great film", 1), ("an awful film", 0)], header=("text", "label"))
    with pytest.raises(DataError) as err:
        _evaluate(files["bare"], learned.out_dir / "best", path)
    message = str(err.value)
    assert "text column 'sentence' not found" in message and "columns found in" in message, message
    assert f"the columns are those {learned.out_dir / 'best'} was trained on (--text-columns sentence; " \
        "--label-column label, recorded in its bca_training.json); pass --text-columns" in message, message
    metrics = evaluate(EvaluateConfig(model=files["bare"], adapter=learned.out_dir / "best", data=path,
                                      text_columns=["text"]))
    assert metrics["n"] == 2


def test_a_training_record_that_is_not_what_train_wrote_is_refused_naming_its_fields(learned, files, tmp_path):
    """evaluate reads bca_training.json (the options it falls back to) by the one JSON rule, every field it uses
    typed: one TrainingConfigError naming the file and each field (these were TypeErrors, a RecursionError,
    a tokenizer error deep in the run, or an evaluation at a wrong length)."""
    import shutil

    from bca_deploy.errors import AdapterFormatError

    good = json.loads((learned.out_dir / "best" / "bca_training.json").read_text())
    cases = {
        "fields": ({**good, "max_length": "128", "task": "seq2seq", "text_columns": "sentence", "num_labels": 1e9,
                    "label_names": ["a", 3], "regression": "no"},
                   ["max_length: expected a positive integer, got '128'", "task: expected one of seq-cls, causal-lm",
                    "text_columns: expected a list of one or two column names", "num_labels: expected an integer",
                    "label_names: expected a list of label names", "regression: expected true or false"]),
        "names-vs-count": ({**good, "label_names": ["a", "b", "c"]}, ["label_names: 3 names for num_labels 2"]),
        "columns": ({**good, "label_column": 7, "modules_to_save": [None]}, ["label_column: expected a column name",
                                                                             "modules_to_save: expected a list"]),
    }
    for name, (info, needles) in cases.items():
        adapter = tmp_path / name
        shutil.copytree(learned.out_dir / "best", adapter)
        (adapter / "bca_training.json").write_text(json.dumps(info))
        with pytest.raises(TrainingConfigError) as caught:
            _evaluate(files["bare"], adapter, files["cue"])
        assert "bca_training.json is not a training record" in str(caught.value)
        assert all(n in str(caught.value) for n in needles), (name, str(caught.value))
    adapter = tmp_path / "nested"
    shutil.copytree(learned.out_dir / "best", adapter)
    (adapter / "bca_training.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFormatError, match="bca_training.json: JSON nested too deeply"):
        _evaluate(files["bare"], adapter, files["cue"])


def test_label_names_string_labels_and_regression(files, tmp_path):
    rows = sst2_rows("train", 48)
    named = write_tsv(tmp_path / "named.tsv", [(s, "positive" if y else "negative") for s, y in rows])
    result = train(config(files["bare"], named, tmp_path / "a", max_steps=2))
    head = bd.read_adapter(result.last_dir)[0].task.head
    assert head.id2label == {0: "negative", 1: "positive"}  # string labels: sorted names
    ints = write_tsv(tmp_path / "ints.tsv", rows)
    result = train(config(files["bare"], ints, tmp_path / "b", max_steps=2, label_names=["bad", "good"]))
    assert bd.read_adapter(result.last_dir)[0].task.head.id2label == {0: "bad", 1: "good"}
    # names given in another order fix the ids of string labels
    result = train(config(files["bare"], named, tmp_path / "c", max_steps=2, label_names=["positive", "negative"]))
    assert bd.read_adapter(result.last_dir)[0].task.head.label2id == {"positive": 0, "negative": 1}
    with pytest.raises(DataError, match="'meh' is not one of the classes 'negative', 'positive'"):
        train(config(files["bare"], named, tmp_path / "d", eval_data=write_tsv(tmp_path / "e.tsv", [("x", "meh")])),
              on_step=_never)


def test_regression_sentence_pairs(files, tmp_path):
    rows = sst2_rows("train", 48)
    records = [{"a": s, "b": rows[(i + 1) % len(rows)][0], "score": float(y) + 0.25 * (i % 3)}
               for i, (s, y) in enumerate(rows)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = train(config(files["bare"], path, tmp_path / "out", eval_data=path, text_columns=["a", "b"],
                          label_column="score", max_steps=3))
    assert result.metric == "pearson" and result.config["num_labels"] == 1 and result.config["regression"]
    assert set(result.final_metrics) == {"pearson", "mse", "loss", "n"}
    head = bd.read_adapter(result.last_dir)[0].task.head
    assert head.num_labels == 1 and head.problem_type == "regression"
    assert _evaluate(files["bare"], result.out_dir / "last", path) == result.final_metrics


def test_causal_lm_prompt_response(files, tmp_path, capsys):
    rows = sst2_rows("train", 64)
    records = [{"prompt": f"review : {s} sentiment :", "response": "good" if y else "bad"} for s, y in rows]
    path = write_jsonl(tmp_path / "lm.jsonl", records)
    llama = tiny_model_dir(tmp_path / "llama", "llama", [r["prompt"] + " " + r["response"] for r in records])
    result = train(config(llama, path, tmp_path / "out", task="causal-lm", eval_data=path, max_steps=20,
                          eval_every=10, lr=1e-2, progress=True))
    recipe = next(line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("recipe"))
    assert "lr 0.01" in recipe and "head" not in recipe  # no head is trained, so no head rate is shown
    assert result.config["targets"] == ["q_proj", "v_proj"] and result.metric == "perplexity"
    assert result.history[-1]["perplexity"] < result.history[0]["perplexity"]
    task = bd.read_adapter(result.last_dir)[0].task
    assert task.type == "causal-lm" and task.architecture == "LlamaForCausalLM" and task.head is None
    last = {k: v for k, v in result.history[-1].items() if k != "step"}
    assert _evaluate(llama, result.out_dir / "best", path) == last


def test_examples_longer_than_the_models_positions_are_cut_at_its_limit(files, tmp_path, capsys):
    """max_length 128 against a model of 64 positions: one long example used to fail the forward pass (an
    internal error); examples are cut at 64, a note says so, and evaluate reads the file the same way."""
    rows = sst2_rows("train", 32)
    long = " ".join(s for s, _ in rows)  # far more than 64 tokens
    path = write_tsv(tmp_path / "long.tsv", [(long, 1), *rows])
    result = train(config(files["bert"], path, tmp_path / "out", eval_data=path, max_steps=2, max_length=128))
    assert result.config["max_length"] == 64
    assert "max_length 128 is more than the model's 64 positions" in capsys.readouterr().err
    assert _evaluate(files["bert"], result.out_dir / "last", path) == result.final_metrics


# ---- the head: kept, replaced, left out --------------------------------------------------------------


def test_no_head_trains_only_kernels(files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = train(config(files["bert"], files["small"], tmp_path / "nohead", eval_data=files["small"],
                          max_steps=3, no_head=True))
    config_, state = bd.read_adapter(result.last_dir)
    assert config_.modules_to_save == [] and config_.task.type == "seq-cls" and config_.task.head is None
    assert all(k.endswith(".bca_kernel") for k in state) and len(state) == 2 * 6  # 6 linear layers in each of 2
    assert result.trainable_parameters["head"] == 0
    # the base model's head is used as it is: loading the adapter into the base reproduces the metric
    base = AutoModelForSequenceClassification.from_pretrained(files["bert"])
    before = base.classifier.weight.clone()
    bd.load_adapter(base, result.last_dir)
    assert torch.equal(base.classifier.weight, before)
    assert _evaluate(files["bert"], result.last_dir, files["small"]) == result.final_metrics


def test_no_head_refused_without_a_trained_head(files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingConfigError, match="has none .*its head would be random"):
        train(config(files["bare"], files["small"], out, no_head=True), on_step=_never)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_labels_checked_against_a_trained_head(files, tmp_path):
    """A label outside a checkpoint's trained head is refused; a new head only with --new-head."""
    three = write_tsv(tmp_path / "three.tsv", [("good", 1), ("bad", 0), ("meh", 2)])
    msg = _refused(files["bert"], tmp_path, DataError, r"outside the base model's trained head \(2 classes\)",
                   data=three)
    assert "line 4: label 2" in msg and "--new-head" in msg
    _refused(files["bert"], tmp_path, TrainingConfigError, "trained head has 2 classes; pass --new-head",
             num_labels=3)
    result = train(config(files["bert"], three, tmp_path / "new", max_steps=1, new_head=True))
    assert bd.read_adapter(result.last_dir)[0].task.head.num_labels == 3
    # the eval file is checked against the head too
    _refused(files["bert"], tmp_path, DataError, "line 4: label 2", eval_data=three)


def test_class_count_is_bounded(files, tmp_path):
    huge = write_tsv(tmp_path / "huge.tsv", [("good", 1), ("bad", 10**12)])
    msg = _refused(files["bare"], tmp_path, DataError, "line 3: label 1000000000000 implies", data=huge)
    assert "at most 100,000" in msg
    _refused(files["bare"], tmp_path, TrainingConfigError, "at most 100,000 classes", num_labels=10**6)


def test_names_from_a_trained_head_are_kept(files, tmp_path):
    named = tiny_model_dir(tmp_path / "named", "bert", [s for s, _ in sst2_rows("train", 64)],
                           id2label={0: "neg", 1: "pos"})
    data = write_tsv(tmp_path / "d.tsv", [(s, "pos" if y else "neg") for s, y in sst2_rows("train", 32)])
    result = train(config(named, data, tmp_path / "out", max_steps=1))
    assert bd.read_adapter(result.last_dir)[0].task.head.id2label == {0: "neg", 1: "pos"}


def test_a_trained_head_naming_two_classes_alike_is_refused_naming_it_and_the_fix(files, tmp_path):
    """A base classifier whose config.json id2label gives two classes one name was refused as 'task.head.id2label
    names must be distinct', a field the user never wrote: it names the base model's config and --label-names, which
    trains."""
    twice = tiny_model_dir(tmp_path / "twice", "bert", [s for s, _ in sst2_rows("train", 64)],
                           id2label={0: "sentiment", 1: "sentiment"})
    data = write_tsv(tmp_path / "d.tsv", sst2_rows("train", 32))
    with pytest.raises(TrainingConfigError, match=r"--model .*twice: the base model's classification head names its "
                                                  r"classes in its config's id2label, where 'sentiment' names classes "
                                                  r"0 and 1; .* pass --label-names"):
        train(config(twice, data, tmp_path / "out", max_steps=1))
    assert not (tmp_path / "out").exists()
    result = train(config(twice, data, tmp_path / "named", max_steps=1, label_names=["neg", "pos"]))
    assert bd.read_adapter(result.last_dir)[0].task.head.id2label == {0: "neg", 1: "pos"}


# ---- recipes ------------------------------------------------------------------------------------------


def test_paper_recipe_divides_kernel_lr_by_block_size(files, tmp_path):
    seen = {}
    train(config(files["bert"], files["small"], tmp_path / "a", recipe="paper", block_size_pattern={"value": 16},
                 max_steps=1), on_step=lambda s, logs: seen.update(logs["lr_groups"]))
    assert seen == {"bca_p8": 0.1 / 8, "bca_p16": 0.1 / 16, "head": 0.1}
    # the paper recipe scales each module's kernels by its own p (ΔW = p · B(w)); recorded per module
    modules = bd.read_adapter(tmp_path / "a" / "last")[0].modules
    assert {spec.scaling for name, spec in modules.items() if name.endswith("query")} == {8.0}
    assert {spec.scaling for name, spec in modules.items() if name.endswith("value")} == {16.0}
    seen.clear()
    result = train(config(files["bert"], files["small"], tmp_path / "b", recipe="paper", lr=2e-3, head_lr=1e-2,
                          lr_divide_by_block_size=False, scaling=1.0, max_steps=1),
                   on_step=lambda s, logs: seen.update(logs["lr_groups"]))
    assert seen == {"bca_p8": 2e-3, "head": 1e-2}  # explicit options override the recipe
    assert result.config["optimizer"] == "adadelta" and result.config["given"]["lr"] == 2e-3
    assert {spec.scaling for spec in bd.read_adapter(result.last_dir)[0].modules.values()} == {1.0}


def test_head_only_and_seeds_repeat(files, tmp_path):
    runs = [train(config(files["bert"], files["small"], tmp_path / f"h{i}", eval_data=files["small"],
                         method="head-only", lr=1e-2, head_lr=1e-2, max_steps=3, seed=seed))
            for i, seed in enumerate((5, 5, 6))]
    assert runs[0].trainable_parameters == {"adapter": 0, "head": 66}
    a, b, c = (read_tensors(r.last_dir) for r in runs)
    assert sorted(a) == ["classifier.bias", "classifier.weight", "state.classifier.bias", "state.classifier.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])
    assert _evaluate(files["bert"], runs[0].last_dir, files["small"]) == runs[0].final_metrics


def test_a_head_only_run_with_a_new_head_of_another_size_is_evaluated_from_its_run_directory(files, tmp_path):
    """head-only + new_head, 3 classes over the checkpoint's 2-class head: evaluate (given the run directory, which
    stands for last/) rebuilds the 3-class head from the run's tensors and gets the metric train logged (it was an
    internal error: the checkpoint's 2-class head did not fit); merge/export readers name what the run is."""
    from bca_deploy.errors import AdapterFormatError

    data = write_tsv(tmp_path / "three.tsv", [(s, i % 3) for i, (s, _) in enumerate(sst2_rows("train", 36))])
    run = train(config(files["bert"], data, tmp_path / "run", eval_data=data, method="head-only", new_head=True,
                       lr=1e-2, head_lr=1e-2, max_steps=3))
    assert run.task["head"]["num_labels"] == 3 and not (tmp_path / "run" / "best" / "adapter_config.json").exists()
    got = _evaluate(files["bert"], tmp_path / "run", data)
    assert got == run.final_metrics and got["n"] == 36
    with pytest.raises(AdapterFormatError, match="a checkpoint of a --method head-only/custom run"):
        bd.read_adapter(bd.config.run_adapter_dir(tmp_path / "run"))


@pytest.mark.parametrize("damage", ["nan", "integers", "declared-larger"])
def test_a_head_only_checkpoint_with_values_no_run_writes_is_refused_by_evaluate(files, tmp_path, monkeypatch, damage):
    """evaluate restored a head-only run's trainable tensors as given: NaN weights printed a NaN loss beside an
    accuracy, integer ones were cast in silently (truncated: another loss), and a tensor declared larger than its
    parameter was read whole before its shape was compared. Names, shapes and dtypes are checked from the header,
    before any data is read; NaN/Inf is refused once read."""
    import struct

    from safetensors.torch import load_file, save_file

    import bca_deploy.adapter_io as adapter_io
    from bca_deploy.config import TRAINABLE_FILE
    from bca_deploy.errors import BCAError

    run = train(config(files["bert"], files["small"], tmp_path / "run", method="head-only", lr=1e-2, head_lr=1e-2,
                       max_steps=1))
    path = run.last_dir / TRAINABLE_FILE
    state = load_file(path)
    if damage == "declared-larger":  # a sparse file: 1 GiB declared, nothing on disk
        rows = 2**23
        header = json.dumps({"classifier.weight": {"dtype": "F32", "shape": [rows, 32],
                                                   "data_offsets": [0, rows * 32 * 4]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + rows * 32 * 4)

        def refuse(p):
            raise AssertionError(f"{p}: tensor data read")

        monkeypatch.setattr(adapter_io, "load_safetensors", refuse)
        needle = f"classifier.weight: shape ({rows}, 32), the model's is (2, 32)"
    else:
        weight = state["classifier.weight"]
        state["classifier.weight"] = torch.full_like(weight, float("nan")) if damage == "nan" \
            else (weight * 100).to(torch.int64)
        save_file(state, path)
        # the lines resume's trainer state is refused with (training.checkpoint.trained_value_problems)
        needle = "the trained tensors are damaged:\n  - classifier.weight: holds NaN/Inf values" if damage == "nan" \
            else "classifier.weight: dtype I64, expected floating-point values (F32, F16, BF16 or F64)"
    with pytest.raises(BCAError) as refused:
        _evaluate(files["bert"], run.last_dir, files["small"])
    assert str(refused.value).startswith(str(path)) and needle in str(refused.value), str(refused.value)


def test_prepared_peft_model(files, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(files["bert"])
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    result = train(config(None, files["small"], tmp_path / "lora", method="custom", lr=1e-3,
                          modules_to_save=["classifier"], max_steps=2),
                   model=model, tokenizer=AutoTokenizer.from_pretrained(files["bert"]))
    assert result.trainable_parameters == {"adapter": 2 * 2 * 4 * (32 + 32), "head": 66}
    assert (result.last_dir / "trainable_parameters.safetensors").is_file()


# ---- gradient checkpointing, accumulation, bf16 ---------------------------------------------------------


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
    assert model.is_gradient_checkpointing  # (5.x keeps no per-module gradient_checkpointing attribute)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 + 2
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_gradient_checkpointing_in_trainer(files, tmp_path, capfd):
    """Same weights with and without checkpointing, and nothing printed for it: transformers 5.x warns on its old
    name (gradient_checkpointing_enable, gone in 6.x) and on a config whose use_cache is on (the suite's filters
    hide FutureWarnings, so the warning is made an error here)."""
    import warnings

    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        runs = [train(config(files["bert"], files["small"], tmp_path / str(gc), lr=1e-2, max_steps=3,
                             gradient_checkpointing=gc)) for gc in (False, True)]
    a, b = (read_tensors(r.last_dir) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    printed = capfd.readouterr()
    assert "use_cache" not in printed.out + printed.err and "deprecated" not in printed.out + printed.err


def test_bf16_recipe_runs_on_cpu_and_reloads_exactly(files, tmp_path):
    """The GPU recipe (bf16 base + autocast, fp32 kernels and head), exercised on CPU."""
    result = train(config(files["bert"], files["small"], tmp_path / "bf16", eval_data=files["small"], lr=1e-2,
                          max_steps=2, precision="bf16"))
    assert result.precision == "bf16"
    tensors = read_tensors(result.last_dir)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert _evaluate(files["bert"], result.last_dir, files["small"]) == result.final_metrics


def test_gradient_accumulation_matches_a_bigger_batch(files, tmp_path):
    no_dropout = tiny_model_dir(tmp_path / "bert0", "bert", [s for s, _ in sst2_rows("train", 256)], dropout=0.0)
    common = dict(lr=1e-2, max_steps=2, max_grad_norm=0.0)
    big = train(config(no_dropout, files["small"], tmp_path / "big", **common))
    acc = train(config(no_dropout, files["small"], tmp_path / "acc", **common, batch_size=8, grad_accum_steps=2))
    a, b = read_tensors(big.last_dir), read_tensors(acc.last_dir)
    # the same examples per step (length grouping groups whole steps); padding differs (each micro-batch pads to
    # its own longest), which changes float rounding only
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# ---- refusals before the first step -----------------------------------------------------------------


def _refused(model, tmp_path, error, match, **options):
    """Train into a fresh --out that must be refused; nothing may be written there, no leftovers beside it."""
    out = tmp_path / "refused"
    data = options.pop("data", None) or _small(tmp_path)
    with pytest.raises(error, match=match) as info:
        train(config(model, data, out, **options), on_step=_never)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".refused.") and not p.name.endswith(".lock")]
    return str(info.value)


def _small(tmp_path):
    path = tmp_path / "small-rows.tsv"
    if not path.exists():
        write_tsv(path, sst2_rows("train", 64))
    return path


def test_refuses_missing_file(files, tmp_path):
    msg = _refused(files["bert"], tmp_path, DataFileNotFoundError, "data file not found", data=tmp_path / "missing.tsv")
    assert str(tmp_path / "missing.tsv") in msg
    both = _refused(files["bert"], tmp_path, DataFileNotFoundError, "missing.tsv", data=tmp_path / "missing.tsv",
                    eval_data=tmp_path / "missing_dev.tsv")
    assert "missing_dev.tsv" in both


def test_refuses_missing_column(files, tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("fine", 1)], header=("review", "label"))
    msg = _refused(files["bert"], tmp_path, DataError, "no text column", data=path)
    assert str(path) in msg and "columns found" in msg and "'review', 'label'" in msg
    msg = _refused(files["bert"], tmp_path, DataError, "label column 'stars' not found", label_column="stars")
    assert "'sentence', 'label'" in msg


def test_refuses_empty_data(files, tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("sentence\tlabel\n")
    _refused(files["bert"], tmp_path, DataError, "empty", data=path)
    _refused(files["bert"], tmp_path, DataError, "empty", eval_data=path)


def test_a_tokenizer_with_ids_past_the_models_embedding_is_refused_before_training_and_evaluation(files, learned,
                                                                                                   tmp_path, capsys):
    """A tokenizer that does not belong to the model (here: 140 words over a 100-row embedding; on transformers
    5.x, a tokenizer class picked from the model type) made the embedding lookup fail mid-run (exit 70,
    ``IndexError``). train and evaluate now name the data file, the lines and the ids before any step."""
    import shutil

    from click.testing import CliRunner

    from bca_deploy.cli import main
    from training_helpers import word_tokenizer

    model = tmp_path / "model"
    shutil.copytree(files["bert"], model)
    rows = sst2_rows("train", 64)
    wide = word_tokenizer(tmp_path / "wide", [s for s, _ in rows], vocab_size=140)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    wide.save_pretrained(model)
    data = write_tsv(tmp_path / "d.tsv", rows)
    words = {w: i for i, w in enumerate(wide.convert_ids_to_tokens(list(range(140))))}
    first_bad = next(i for i, (s, _) in enumerate(rows) if any(words.get(w, 0) >= 100 for w in s.lower().split()))
    msg = _refused(model, tmp_path, DataError, "gives token ids the model has no embedding for", data=data,
                   eval_data=data)
    assert "vocab_size 100: ids 0..99" in msg and f"line {first_bad + 2}: id" in msg  # line 1 is the header
    assert msg.count(str(data)) == 2  # the training and the evaluation file, reported at once
    inside = [w for w, i in words.items() if 5 <= i < 100 and w.isalpha()][:16]  # data that uses none of them trains, with a note
    train(config(model, write_tsv(tmp_path / "fits.tsv", [(w, i % 2) for i, w in enumerate(inside)]),
                 tmp_path / "fits", max_steps=1))
    assert "note: 40 token(s) of the tokenizer have no embedding row in the model (ids 100..139: " \
        in capsys.readouterr().err
    result = CliRunner().invoke(main, ["train", "--model", str(model), "--data", str(data), "--out",
                                       str(tmp_path / "cli"), "--block-size", "8", "--max-length", "32", "--no-progress"])
    assert result.exit_code == 2 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert not (tmp_path / "cli").exists()
    with pytest.raises(DataError, match="gives token ids the model has no embedding for"):
        _evaluate(model, learned.out_dir, data)  # an adapter trained on another tokenizer's ids


def test_refuses_unknown_target_and_bad_block_size(files, tmp_path):
    msg = _refused(files["bert"], tmp_path, TargetModuleError, "matched no module", targets=["q_proj"])
    assert "query" in msg  # lists the modules that exist
    msg = _refused(files["bert"], tmp_path, BlockSizeError, "block size 5 does not divide", block_size=5)
    assert "valid block sizes" in msg


def test_refuses_bad_options_all_at_once(files, tmp_path):
    msg = _refused(files["bert"], tmp_path, TrainingConfigError, "invalid training options", optimizer="sgd",
                   lr=-1.0, eval_every=5, batch_size=0)
    for part in ("--optimizer 'sgd'", "--lr must be > 0", "--eval-every is set but there is no evaluation data",
                 "--batch-size must be >= 1"):
        assert part in msg
    assert tree(files["bert"])  # the model directory is untouched (read only)


def test_held_out_class_names_are_read_against_the_recorded_classes_never_renumbered(files, tmp_path):
    """Training labels that are ids (0/1) and held-out labels that are names: the names were numbered by
    their own sorted order, so a held-out file of 'pos' rows scored class 0 (accuracy inverted, best/ picked
    on it). They are now read as evaluate reads them: the recorded names (LABEL_0, LABEL_1) or refused."""
    rows = sst2_rows("dev", 40)
    named = write_tsv(tmp_path / "named.tsv", [(s, "pos" if y else "neg") for s, y in rows])
    recorded = write_tsv(tmp_path / "recorded.tsv", [(s, f"LABEL_{y}") for s, y in rows])
    ids = write_tsv(tmp_path / "ids.tsv", rows)
    with pytest.raises(DataError, match=r"(?s)label 'neg' is not one of the classes 'LABEL_0', 'LABEL_1'.*"
                                        r"numbers its classes"):
        train(config(files["bare"], files["cue"], tmp_path / "refused", eval_data=named, max_steps=1))
    assert not (tmp_path / "refused").exists()
    # more names than the training ids' classes: the same refusal, never a range error about the names' own
    # numbering ("label 2" for a line whose label is 'tech') with advice to widen the head
    three = write_tsv(tmp_path / "three.tsv", [(s, ("food", "sports", "tech")[i % 3]) for i, (s, _) in enumerate(rows)])
    with pytest.raises(DataError, match=r"(?s)label '\w+' is not one of the classes 'LABEL_0', 'LABEL_1'.*"
                                        r"numbers its classes.*records \(LABEL_0, LABEL_1\)") as refused:
        train(config(files["bare"], files["cue"], tmp_path / "refused", eval_data=three, max_steps=1))
    assert "range" not in str(refused.value) and "--num-labels" not in str(refused.value)
    assert not (tmp_path / "refused").exists()
    result = train(config(files["bare"], files["cue"], tmp_path / "run", eval_data=recorded, max_steps=6))
    alone = evaluate(EvaluateConfig(model=files["bare"], adapter=tmp_path / "run" / "last", data=ids))
    assert result.final_metrics["accuracy"] == alone["accuracy"]
    assert result.final_metrics["loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_one_class_is_refused_and_a_single_used_class_is_noted(files, tmp_path, capsys):
    one = write_tsv(tmp_path / "one.tsv", [(s, "pos") for s, _ in sst2_rows("train", 8)])
    with pytest.raises(DataError, match="one class \\('pos'\\) makes no classifier.*--label-names"):
        train(config(files["bare"], one, tmp_path / "one", max_steps=1))
    with pytest.raises(DataError, match="one class makes no classifier"):
        train(config(files["bare"], files["small"], tmp_path / "one-output", num_labels=1, max_steps=1))
    train(config(files["bare"], one, tmp_path / "named", label_names=["neg", "pos"], max_steps=1))
    assert "every label in" in capsys.readouterr().err
    from_one = write_tsv(tmp_path / "from_one.tsv", [(s, 1 + y) for s, y in sst2_rows("train", 8)])
    train(config(files["bare"], from_one, tmp_path / "ids", max_steps=1))
    assert "no training example of class 0 of the head's 3" in capsys.readouterr().err
    negative = write_tsv(tmp_path / "negative.tsv", [(s, -y) for s, y in sst2_rows("train", 8)])
    with pytest.raises(DataError, match=r"label -1 \(class ids start at 0\)"):
        train(config(files["bare"], negative, tmp_path / "negative", max_steps=1))


def test_held_out_labels_of_mostly_one_class_are_noted_when_accuracy_picks_best(files, tmp_path, capsys):
    """helper-97: on a 95/5 split of SST-2, 3 steps of a head that answered the majority class scored accuracy 0.95
    (MCC 0) and were best/, without a word; the default --metric-for-best is accuracy."""
    rows = sst2_rows("train", 20)
    skewed = write_tsv(tmp_path / "skewed.tsv", [(s, 0) for s, _ in rows[:18]] + [(s, 1) for s, _ in rows[18:]])
    train(config(files["bert"], files["small"], tmp_path / "accuracy", eval_data=skewed, max_steps=1))
    assert "skewed.tsv: 90% of the labels are class 0 ('LABEL_0'): answering it alone scores accuracy 0.9000" \
        in capsys.readouterr().err
    train(config(files["bert"], files["small"], tmp_path / "mcc", eval_data=skewed, max_steps=1,
                 metric_for_best="mcc"))
    train(config(files["bert"], files["small"], tmp_path / "balanced", eval_data=files["dev"], max_steps=1))
    assert "of the labels are class" not in capsys.readouterr().err


def test_snli_pairs_without_a_gold_label_are_noted_when_trained_as_a_class(files, tmp_path, capsys):
    """SNLI's and MNLI's files write gold_label "-" for a pair the annotators did not agree on (HF datasets maps it to
    -1, run_glue drops it): read as a class name, it silently made a class of its own. Trained as one, with a note."""
    rows = sst2_rows("train", 9)
    names = ["entailment", "neutral", "contradiction", "entailment", "-", "neutral", "contradiction", "-", "neutral"]
    snli = write_tsv(tmp_path / "snli.tsv", [(s, y) for (s, _), y in zip(rows, names)])
    train(config(files["bare"], snli, tmp_path / "snli", max_steps=1))
    err = capsys.readouterr().err
    assert "snli.tsv: 2 row(s) have the label '-', trained as a class of its own (4 classes); SNLI and MNLI" in err, err
    three = write_tsv(tmp_path / "three.tsv", [(s, y) for (s, _), y in zip(rows, names) if y != "-"])
    train(config(files["bare"], three, tmp_path / "three", max_steps=1))
    assert "trained as a class of its own" not in capsys.readouterr().err
