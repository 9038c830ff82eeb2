"""Data files and run habits that users bring from other tools: JSON arrays (pandas, datasets' to_json), runs
stopped by a scheduler (SIGTERM) and resumed, output directories that are mount points."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from bca_deploy.training import DataError, train
from bca_deploy.training.data import load_seq_cls
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    REPO,
    config,
    data_and_bert,
    one_thread,
    read_tensors,
    subprocess_env,
    write_jsonl,
)

EXAMPLES = [
    {"text": "a fine film", "label": "positive"},
    {"text": "two\nlines, a \"quote\" and a\ttab", "label": "negative"},
    {"text": "ünïcödé 🎬", "label": "positive"},
]


def _fields(examples):
    return examples.texts, examples.labels, examples.label_names, examples.text_columns


@pytest.mark.parametrize("layout", ["pandas", "indented", "one-line"])
def test_a_json_array_of_objects_reads_as_the_same_lines_file(tmp_path, layout):
    """A ``.json`` file holding one array of objects (pandas ``to_json(orient="records")``, ``json.dump(rows)``) gives
    the examples the same objects give one per line, each numbered by the line its object starts on."""
    reference = load_seq_cls(write_jsonl(tmp_path / "ref.jsonl", EXAMPLES))
    path = tmp_path / "data.json"
    if layout == "pandas":
        # what pandas' to_json(orient="records") writes: one line, no spaces, "/" escaped
        path.write_text(json.dumps(EXAMPLES, separators=(",", ":")).replace("/", "\\/"), encoding="utf-8")
        expected_lines = [1, 1, 1]
    elif layout == "indented":
        path.write_text(json.dumps(EXAMPLES, indent=2, ensure_ascii=False), encoding="utf-8")
        expected_lines = [2, 6, 10]  # each object spans '{', two fields and '}'
    else:
        path.write_text(json.dumps(EXAMPLES), encoding="utf-8")
        expected_lines = [1, 1, 1]
    examples = load_seq_cls(path)
    assert _fields(examples) == _fields(reference)
    assert examples.lines == expected_lines


def test_a_json_array_with_bom_and_crlf(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(EXAMPLES, indent=1).replace("\n", "\r\n").encode())
    assert _fields(load_seq_cls(path)) == _fields(load_seq_cls(write_jsonl(tmp_path / "ref.jsonl", EXAMPLES)))


@pytest.mark.parametrize("text, message", [
    ('[{"text": "a", "label": 1},\n 5,\n {"text": "b", "label": 0}]',
     "line 2: expected a JSON object in the array, got a number"),
    ('[{"text": "a", "label": 1},\n {"text": "b", "text": "c", "label": 0}]',
     "line 2: key 'text' appears more than once"),
    ('[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]', "line 2: not valid JSON (Expecting ',' delimiter"),
    ('[{"text": "a", "label": 1},\n {"text": "b", "label": 0}',
     "line 2: expected ',' or ']' after an array item (the array is not closed)"),
    ('[{"text": "a", "label": 1},\n {"text": "b", "label": 0},\n]', "line 3: not valid JSON"),
    ('[{"text": "a", "label": 1}]\n[{"text": "b", "label": 0}]', "line 2: more data after the array ends"),
    ("[" * 100_000 + "]" * 100_000, "line 1: JSON nested too deeply"),
    ("  []\n", "the JSON array is empty"),
    ('[\n{"text": "a", "label": 1},\n{"text": "b"}\n]', "line 3: label in column 'label': missing (no such field)"),
])
def test_a_bad_json_array_is_one_error_naming_the_line(tmp_path, text, message):
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_seq_cls(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_one_pretty_printed_object_says_which_layouts_are_read(tmp_path):
    """``{"data": [...]}`` over many lines was one "not valid JSON" problem per line; now one sentence."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": 1, "data": EXAMPLES}, indent=2))
    with pytest.raises(DataError) as info:
        load_seq_cls(path)
    msg = str(info.value)
    assert "one JSON object spread over several lines" in msg and "key 'data' holds a list" in msg
    assert "line 2" not in msg and msg.count("\n") == 0


def test_json_lines_in_a_json_file_still_read_line_by_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES[:1]) + "\n" + json.dumps(EXAMPLES[2]) + "\n")
    examples = load_seq_cls(path)
    assert examples.lines == [1, 3] and examples.texts == [[EXAMPLES[0]["text"], EXAMPLES[2]["text"]]]



@pytest.mark.parametrize("name, text, hints", [
    ("labels.jsonl", '{"sentence": "a", "labels": 1}\n{"sentence": "b", "labels": 0}\n',
     ["label column 'label' not found (the file has 'labels': pass --label-column labels)"]),
    ("caps.csv", "Text,Label\nhello,1\nbye,0\n",
     ["the file has 'Text': --text-columns Text", "the file has 'Label': pass --label-column Label"]),
    ("no-header.tsv", "a fine film\t1\na dull one\t0\n",
     ["line 1 looks like an example, not a header", "such as 'sentence\\tlabel'"]),
])
def test_a_missing_column_names_the_near_miss_or_the_missing_header(tmp_path, name, text, hints):
    """A file with ``labels`` (transformers' name for the model's input), ``Text``/``Label`` or no header row was
    refused listing the columns found; the message now says what to pass, or that line 1 is an example."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_seq_cls(path)
    for hint in hints:
        assert hint in str(info.value), str(info.value)


# ---- a run stopped by SIGTERM (a scheduler, `docker stop`, `kill`) and resumed ------------------------------------

# Runs the real CLI (`bca-deploy train ...`) in a child process that sends itself SIGTERM right after optimizer step K
# (argv[1]), so the signal lands at a known step whatever the machine's speed.
_TERM_AT_STEP = """
import os, signal, sys
# the signal's default action, as in a terminal session: a test run under nohup inherits SIGHUP ignored, which the run
# rightly leaves alone (it would then never see the signal)
signal.signal(getattr(signal, sys.argv[2]), signal.SIG_DFL)
from bca_deploy.training import trainer
after = trainer._TrainingRun._after_step
def _after_step(self, logs, save_every):
    after(self, logs, save_every)
    if self.step == int(sys.argv[1]):
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
trainer._TrainingRun._after_step = _after_step
from bca_deploy.cli import main
main(["train", *sys.argv[3:]])
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_and_bert(tmp_path_factory.mktemp("user-files"), 256)


def _terminated_run(files, out, step, *options, signal_name="SIGTERM"):
    args = ["--model", str(files["bert"]), "--data", str(files["small"]), "--block-size", "8", "--batch-size", "16",
            "--max-length", "32", "--no-progress", "--out", str(out), *options]
    proc = subprocess.run([sys.executable, "-c", _TERM_AT_STEP, str(step), signal_name, *args], capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env(), timeout=300)
    return proc.returncode, proc.stderr


def _beside(out):
    """What a run left beside --out (its staging directory, its lock file)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _log(out):
    """train_log.jsonl's records without the throughput (which differs between runs)."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_a_termination_signal_before_the_first_checkpoint_leaves_nothing_and_says_so(files, tmp_path, signal_name):
    """SIGTERM's (and SIGHUP's: a closed terminal or SSH session) default action killed the run on the spot: exit
    -15 (-1), no message, its staging directory and lock file left beside --out. Now it unwinds as Ctrl-C does,
    says what is left, and exits 128 + the signal's number."""
    out = tmp_path / "run"
    code, err = _terminated_run(files, out, 3, "--max-steps", "10", "--save-every", "100", signal_name=signal_name)
    assert code == 128 + getattr(signal, signal_name), err[-2000:]
    assert (f"training terminated ({signal_name}) at step 3 of 10, before its first checkpoint: nothing was "
            "written") in err
    assert "Traceback" not in err
    assert not out.exists() and _beside(out) == []


def test_sigterm_then_resume_gives_the_uninterrupted_run_and_its_log(files, tmp_path):
    """A run terminated at step 5 (checkpoint of step 4) and resumed ends with the weights, evaluations and
    train_log.jsonl of a run never stopped (the log held steps 5.. twice: from before the stop and again)."""
    options = dict(max_steps=8, save_every=2, eval_data=files["small"], eval_every=3, log_every=1)
    flags = ["--max-steps", "8", "--save-every", "2", "--eval-data", str(files["small"]), "--eval-every", "3",
             "--log-every", "1"]
    out = tmp_path / "run"
    code, err = _terminated_run(files, out, 5, *flags)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert f"{out / 'last'} holds the checkpoint of step 4; run the same command with --resume" in err
    assert _beside(out) == []
    assert [r["step"] for r in _log(out) if "loss" in r] == [1, 2, 3, 4, 5]
    resumed = train(config(files["bert"], files["small"], out, resume=True, **options))
    reference = train(config(files["bert"], files["small"], tmp_path / "ref", **options))
    assert resumed.resumed_from == 4
    ref, got = read_tensors(reference.last_dir), read_tensors(resumed.last_dir)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert resumed.history == reference.history
    assert _log(out) == _log(tmp_path / "ref")


def test_ctrl_c_says_which_checkpoint_is_left(files, tmp_path, capsys):
    def interrupt_at_5(step, logs):
        if step == 5:
            raise KeyboardInterrupt

    out, options = tmp_path / "run", dict(max_steps=8, save_every=2, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        train(config(files["bert"], files["small"], out, **options), on_step=interrupt_at_5)
    err = capsys.readouterr().err
    assert f"training interrupted at step 5 of 8: {out / 'last'} holds the checkpoint of step 4" in err
    assert json.loads((out / "last" / "bca_training.json").read_text())["step"] == 4
    train(config(files["bert"], files["small"], out, resume=True, **options))  # step 5 is trained (and logged) again
    reference = train(config(files["bert"], files["small"], tmp_path / "ref", **options))
    assert [r["step"] for r in _log(out)] == list(range(1, 9)) and _log(out) == _log(reference.out_dir)


def test_a_log_line_cut_short_by_a_kill_is_dropped_on_resume(files, tmp_path):
    """A SIGKILL in the middle of appending leaves half a line; the resumed run's lines were appended to it."""
    options = dict(max_steps=4, save_every=2, log_every=1)

    def stop_at_3(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(files["bert"], files["small"], out, **options), on_step=stop_at_3)
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    train(config(files["bert"], files["small"], out, resume=True, **options))
    reference = train(config(files["bert"], files["small"], tmp_path / "ref", **options))
    assert _log(out) == _log(reference.out_dir)


# ---- the launcher's SIGTERM while a process finds its peer gone ------------------------------------------------

# Under torchrun, when one process dies the launcher sends the others SIGTERM, often just as they find the peer gone
# in a collective (gloo's "Connection closed by peer") and unwind. The child below pretends that in one process: after
# step 2 (a checkpoint written) the step raises gloo's error, and SIGTERM comes at a chosen point of the unwind:
# while the error is being identified ("finding"), or while the process group is torn down ("teardown").
_PEER_GONE_THEN_SIGTERM = """
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from bca_deploy.training import trainer
after = trainer._TrainingRun._after_step
def _after_step(self, logs, save_every):
    after(self, logs, save_every)
    if self.step == 2:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
trainer._TrainingRun._after_step = _after_step
def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
if sys.argv[1] == "finding":
    trainer.peer_failure = lambda d, exc: (sigterm(), True)[1]
else:
    trainer.peer_failure = lambda d, exc: True
    trainer.destroy = lambda d: sigterm()
from bca_deploy.cli import main
main(["train", *sys.argv[2:]])
"""


@pytest.mark.parametrize("when", ["finding", "teardown"])
def test_the_launchers_sigterm_while_a_peer_failure_unwinds_does_not_silence_it(files, tmp_path, when):
    """A flake of the torchrun kill test (ci119): rank 0 found its killed peer gone, and the launcher's SIGTERM,
    arriving then, killed it at the signal's default action (the handler was already gone): exit -15 and not a word
    of what --out held. Now the signal is ignored from the moment the run unwinds, and the message comes."""
    out = tmp_path / "run"
    args = ["--model", str(files["bert"]), "--data", str(files["small"]), "--block-size", "8", "--batch-size", "16",
            "--max-length", "32", "--no-progress", "--out", str(out), "--max-steps", "10", "--save-every", "2"]
    proc = subprocess.run([sys.executable, "-c", _PEER_GONE_THEN_SIGTERM, when, *args], capture_output=True,
                          text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM), (proc.returncode, proc.stderr[-2000:])
    assert ("rank 0: another process of this distributed run stopped (its own error, and the launcher's summary, say "
            f"why); training stopped at step 2 of 10: {out / 'last'} holds the checkpoint of step 2") in proc.stderr, \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (out / "last" / "adapter_model.safetensors").is_file()


# ---- an --out that is a mount point (a container's volume, `docker run -v $PWD/runs:/out ... --out /out`) ------------


@pytest.fixture
def mount_point(tmp_path):
    """An empty tmpfs mounted at ``tmp_path/volume`` (skipped where this user may not mount)."""
    point = tmp_path / "volume"
    point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(point)]
    if not sys.platform.startswith("linux") or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_an_out_that_is_a_mount_point_is_refused_before_training(files, mount_point):
    """Training ran to its first checkpoint, then renaming the staged run onto the mount point failed (EBUSY): exit 1
    naming a hidden temporary directory, the steps lost. Now refused before the first step, naming --out."""
    def never(step, logs):
        raise AssertionError("training started although --out cannot be written")

    from bca_deploy.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match=f"{mount_point}: is a mount point.*inside it"):
        train(config(files["bert"], files["small"], mount_point, max_steps=2), on_step=never)
    assert list(mount_point.iterdir()) == [] and _beside(mount_point) == []
    # a directory inside it is an ordinary output
    result = train(config(files["bert"], files["small"], mount_point / "run", max_steps=2))
    assert (result.last_dir / "adapter_model.safetensors").is_file()


# ---- a run that diverges without reaching NaN --------------------------------------------------------------------


def test_a_run_whose_loss_explodes_says_it_diverged(files, tmp_path, capsys):
    """At lr 1e6 without clipping the loss ends in the millions (NaN is caught; this is not): the run used to end
    as any other, printing only its final loss. The warning compares with the loss the train log itself records
    for step 1 (the model before any update)."""
    result = train(config(files["bert"], files["small"], tmp_path / "run", max_steps=20, lr=1e6, head_lr=1e6,
                          max_grad_norm=0, log_every=1))
    err = capsys.readouterr().err
    first = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and result.train_loss > 100 * first["loss"]
    assert f"warning: the training loss rose from {first['loss']:.4g} at step 1 to {result.train_loss:.4g}" in err
    assert "--lr 1e+06, --head-lr 1e+06" in err and "--max-grad-norm" in err
    # an ordinary run says nothing of the kind
    train(config(files["bert"], files["small"], tmp_path / "fine", max_steps=20, log_every=1))
    assert "diverged" not in capsys.readouterr().err


def test_a_regression_run_is_summed_up_as_one_output_not_1_labels(files, tmp_path):
    from bca_deploy.training.report import final_summary

    rows = [line.split("\t") for line in files["small"].read_text().splitlines()[1:]]
    data = tmp_path / "scores.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{int(y) * 4 + 0.25:.2f}\n" for s, y in rows))
    result = train(config(files["bert"], data, tmp_path / "run", max_steps=2, new_head=True))
    summary = final_summary(result, files["bert"], None)
    assert "seq-cls, BertForSequenceClassification, regression (1 output);" in summary, summary
    assert "1 labels" not in summary
    assert f"evaluate --model {files['bert']} --adapter" in summary and "--data HELDOUT.tsv" in summary


def test_the_next_commands_name_a_held_out_file_in_the_training_datas_format(files, tmp_path):
    from bca_deploy.training.report import final_summary

    rows = [line.split("\t") for line in files["small"].read_text().splitlines()[1:]]
    data = write_jsonl(tmp_path / "train.jsonl", [{"sentence": s, "label": int(y)} for s, y in rows])
    result = train(config(files["bert"], data, tmp_path / "run", max_steps=2))
    summary = final_summary(result, files["bert"], None)
    assert "--data HELDOUT.jsonl" in summary and "HELDOUT.tsv" not in summary, summary  # was .tsv for any format


def test_a_json_record_interrupted_mid_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    """train_result.json (and bca_training.json) were written in place: a Ctrl-C or SIGTERM in the middle left half a
    file, which --resume on the finished run then could not read."""
    from pathlib import Path

    from bca_deploy.training import trainer

    path = tmp_path / "train_result.json"
    path.write_text('{"step": 1}\n')
    real_write = Path.write_text

    def half_then_interrupt(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer._write_json(path, {"step": 2, "history": list(range(100))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1} and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_ctrl_c_of_an_overwrite_run_before_its_checkpoint_says_the_earlier_run_is_kept(files, tmp_path, capsys):
    from training_helpers import tree

    out = tmp_path / "run"
    train(config(files["bert"], files["small"], out, max_steps=2))
    before = tree(out)

    def interrupt_at_2(step, logs):
        if step == 2:
            raise KeyboardInterrupt

    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        train(config(files["bert"], files["small"], out, max_steps=8, save_every=4, overwrite=True),
              on_step=interrupt_at_2)
    assert "training interrupted at step 2 of 8, before its first checkpoint: what was there is kept as it was" \
        in capsys.readouterr().err
    assert tree(out) == before


def test_the_resume_hint_of_an_overwrite_run_works_as_given(files, tmp_path, capsys):
    """The hint after stopping an --overwrite run must be a command that runs: --resume with --overwrite is refused."""
    out = tmp_path / "run"
    train(config(files["bert"], files["small"], out, max_steps=2))

    def interrupt_at_3(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    options = dict(max_steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(config(files["bert"], files["small"], out, overwrite=True, **options), on_step=interrupt_at_3)
    assert "run the same command with --resume in place of --overwrite" in capsys.readouterr().err
    assert train(config(files["bert"], files["small"], out, resume=True, **options)).resumed_from == 2


def test_held_out_class_ids_beside_training_class_names_are_refused(files, tmp_path):
    """helper-64: a training file naming its classes (1 -> good, 0 -> not_good) gets them numbered in sorted order
    (good=0); a held-out file of the data set's own ids (1 = good) was read as the adapter's ids and scored the
    opposite (0.22 for a 0.78 model), silently, at training and at evaluate. Refused, naming the numbering; the
    names themselves read as before, and with --label-names the ids mean the order given."""
    from bca_deploy.training import EvaluateConfig, evaluate

    rows = [line.split("\t") for line in files["small"].read_text().splitlines()[1:]]
    names = {"1": "good", "0": "not_good"}
    named = tmp_path / "named.tsv"
    named.write_text("sentence\tlabel\n" + "".join(f"{s}\t{names[y]}\n" for s, y in rows))
    ids = tmp_path / "ids.tsv"
    ids.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    refusal = "its labels are class ids, but the classes were named by the training file"
    with pytest.raises(DataError, match=rf"{refusal} .*named\.tsv and numbered in sorted order \(0=good, 1=not_good\)"):
        train(config(files["bert"], named, tmp_path / "refused", max_steps=1, new_head=True, eval_data=ids))
    assert not (tmp_path / "refused").exists()
    result = train(config(files["bert"], named, tmp_path / "run", max_steps=1, new_head=True, eval_data=named))
    with pytest.raises(DataError, match=refusal):
        evaluate(EvaluateConfig(model=files["bert"], adapter=result.best_dir, data=ids, device="cpu"))
    assert evaluate(EvaluateConfig(model=files["bert"], adapter=result.best_dir, data=named, device="cpu"))
    ordered = train(config(files["bert"], named, tmp_path / "ordered", max_steps=1, new_head=True, eval_data=ids,
                           label_names=["not_good", "good"]))  # the ids' own order, given
    assert evaluate(EvaluateConfig(model=files["bert"], adapter=ordered.best_dir, data=ids, device="cpu"))
    # evaluate --label-names says what the file's ids mean: the same metric as the names file gives
    by_names = evaluate(EvaluateConfig(model=files["bert"], adapter=result.best_dir, data=named, device="cpu"))
    mapped = evaluate(EvaluateConfig(model=files["bert"], adapter=result.best_dir, data=ids, device="cpu",
                                     label_names=["not_good", "good"]))
    assert mapped == by_names
    with pytest.raises(DataError, match=r"--label-names 'great': not classes of the adapter"):
        evaluate(EvaluateConfig(model=files["bert"], adapter=result.best_dir, data=ids, device="cpu",
                                label_names=["not_good", "great"]))
    with pytest.raises(DataError, match="this file's labels are class names"):
        evaluate(EvaluateConfig(model=files["bert"], adapter=result.best_dir, data=named, device="cpu",
                                label_names=["not_good", "good"]))
    # a copy made by convert (either format) carries the record, so it is checked alike (helper-66: it was not)
    from bca_deploy.adapter_io import convert_adapter

    for to in ("peft", "bca"):
        copy = convert_adapter(result.best_dir, tmp_path / f"copy-{to}", to=to)
        with pytest.raises(DataError, match=refusal):
            evaluate(EvaluateConfig(model=files["bert"], adapter=copy, data=ids, device="cpu"))
        assert evaluate(EvaluateConfig(model=files["bert"], adapter=copy, data=named, device="cpu")) == by_names
    renamed = convert_adapter(result.best_dir, tmp_path / "renamed", to="bca", label_names=["fine", "poor"])
    import json

    assert json.loads((renamed / "bca_training.json").read_text())["label_names"] == ["fine", "poor"]
