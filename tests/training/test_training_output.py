"""Never lose a user's run: refusals of a non-empty --out, --resume with nothing to resume, --overwrite that
keeps the earlier run until the new one has a checkpoint, damaged checkpoints, real kills, exact resume."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bca_deploy.errors import OutputExistsError
from bca_deploy.training import CheckpointError, TrainingConfigError, train
from bca_deploy.training.checkpoint import RunDirectory, recover_dir
from training_helpers import (  # noqa: F401 - one_thread is an autouse fixture
    REPO,
    config,
    data_and_bert,
    one_thread,
    read_tensors,
    subprocess_env,
    tree,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_and_bert(tmp_path_factory.mktemp("output"), 256)


@pytest.fixture
def earlier(files, tmp_path):
    """An --out holding a finished run (best/, last/, log), and a snapshot of every byte in it."""
    out = tmp_path / "run"
    train(config(files["bert"], files["small"], out, eval_data=files["small"], max_steps=2, lr=1e-2))
    return out, tree(out)


def _never(step, logs):
    raise AssertionError(f"training started (step {step}) although it must be refused")


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and
                  not p.name.endswith(".lock"))


# ---- refusals: the earlier run is untouched ---------------------------------------------------------


def test_non_empty_out_is_refused(files, earlier):
    out, before = earlier
    with pytest.raises(OutputExistsError, match="is not empty .*pass --resume .* --overwrite") as info:
        train(config(files["bert"], files["small"], out, max_steps=2), on_step=_never)
    assert "best, last, train_log.jsonl" in str(info.value)
    assert tree(out) == before and not _leftovers(out)
    # any file counts, not only an earlier run
    other = out.parent / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="holds mine.txt"):
        train(config(files["bert"], files["small"], other, max_steps=2), on_step=_never)
    assert (other / "mine.txt").read_text() == "keep me"


def test_an_out_holding_an_input_is_refused_even_with_overwrite(files, earlier, tmp_path):
    """train --overwrite replaces --out: with the data file or the base model inside it, that deleted them (the
    run then even printed next steps naming the deleted model). Now refused first, every byte left as it was."""
    import shutil

    out, before = earlier
    shutil.copy(files["small"], out / "data.tsv")
    shutil.copytree(files["bert"], out / "model")
    snapshot = tree(out)
    for model, data, eval_data, needle in ((files["bert"], out / "data.tsv", None, "contains the training data"),
                                           (out / "model", files["small"], None, "contains the model directory"),
                                           (files["bert"], files["small"], out / "data.tsv", "contains the evaluation data"),
                                           (out, files["small"], None, "is the model directory")):
        with pytest.raises(OutputExistsError, match=needle):
            train(config(model, data, out, eval_data=eval_data, max_steps=1, overwrite=True), on_step=_never)
        assert tree(out) == snapshot
    assert before.items() <= snapshot.items()


def test_resume_with_nothing_to_resume_says_what_is_missing(files, tmp_path, earlier):
    out, before = earlier
    with pytest.raises(CheckpointError, match="does not exist, so there is no run to continue"):
        train(config(files["bert"], files["small"], tmp_path / "absent", resume=True), on_step=_never)
    assert not (tmp_path / "absent").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no last/ directory; it is empty"):
        train(config(files["bert"], files["small"], empty, resume=True), on_step=_never)
    (empty / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="no last/ directory; it holds x.txt"):
        train(config(files["bert"], files["small"], empty, resume=True), on_step=_never)
    (out / "last" / "trainer_state.pt").rename(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="has no trainer_state.pt .*adapter_config.json"):
        train(config(files["bert"], files["small"], out, resume=True), on_step=_never)
    (tmp_path / "state.pt").rename(out / "last" / "trainer_state.pt")
    assert tree(out) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-mapping", "missing-key", "wrong-shape",
                                    "optimizer-shape", "history-records", "deflated", "kernel-nan",
                                    "kernel-integers", "kernel-float8", "optimizer-nan"])
def test_damaged_trainer_state_is_a_typed_error(files, earlier, damage):
    out, _ = earlier
    state_path = out / "last" / "trainer_state.pt"
    raw = state_path.read_bytes()
    if damage == "truncated":
        state_path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        state_path.write_bytes(b"\x00\x01not a checkpoint" * 10)
    elif damage == "deflated":  # torch.load expands a deflated member whatever it declares: 973 KB of one 1 GB
        import zipfile           # member took 1.2 GB to read (helper-146); torch.save stores members as they are

        with zipfile.ZipFile(state_path) as archive:
            members = [(m.filename, archive.read(m)) for m in archive.infolist()]
        with zipfile.ZipFile(state_path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                archive.writestr(name, data)
    else:
        state = torch.load(state_path, weights_only=True)
        if damage == "not-a-mapping":
            state = [1, 2, 3]
        elif damage == "missing-key":
            del state["optimizer"]
        elif damage == "optimizer-shape":  # torch loads it as given and failed at the first step (exit 70; helper-80)
            slot = next(iter(state["optimizer"]["state"].values()))
            key = next(k for k, v in slot.items() if v.dim() > 0)
            slot[key] = torch.zeros(7)
        elif damage == "history-records":  # a list, but not of records: a KeyError at the first save (exit 70)
            state["history_json"] = "[{}, {}]"
        elif damage.startswith("kernel-"):  # trained on and blamed on the learning rate ("diverged"), or cast into
            name = next(iter(state["trainable"]))  # the kernels silently (integers truncated; float8, a floating-point
            kernel = state["trainable"][name]      # type evaluate refused, was taken here: its values a few bits each)
            state["trainable"][name] = torch.full_like(kernel, float("nan")) if damage == "kernel-nan" \
                else kernel.to(torch.float8_e4m3fn) if damage == "kernel-float8" else (kernel * 100).to(torch.int64)
        elif damage == "optimizer-nan":
            slot = next(iter(state["optimizer"]["state"].values()))
            key = next(k for k, v in slot.items() if v.dim() > 0)
            slot[key] = torch.full_like(slot[key], float("inf"))
        else:
            name = next(iter(state["trainable"]))
            state["trainable"][name] = torch.zeros(3)
        torch.save(state, state_path)
    damaged = tree(out)
    match = {"truncated": "cannot read the trainer state", "garbage": "cannot read the trainer state",
             "not-a-mapping": "expected a mapping", "missing-key": "'optimizer' is missing",
             "wrong-shape": "does not fit this run", "optimizer-shape": r"optimizer state '\w+' .* shape \(7,\)",
             "history-records": "history entry 0 is not an evaluation record",
             "deflated": r"cannot read the trainer state \(member '.*' is compressed .* torch.save stores",
             "kernel-nan": r"the trainer state is damaged; .*\n  - .*bca_kernels.default: holds NaN/Inf values",
             "kernel-integers": r"the trainer state is damaged; .*\n  - .*: dtype I64, expected floating-point values "
                                r"\(F32, F16, BF16 or F64\)",
             "kernel-float8": r"the trainer state is damaged; .*\n  - .*: dtype F8_E4M3, expected floating-point values "
                              r"\(F32, F16, BF16 or F64\)",
             "optimizer-nan": r"optimizer state '\w+' of parameter 0 of group 0 holds NaN/Inf values"}[damage]
    with pytest.raises(CheckpointError, match=match) as info:
        train(config(files["bert"], files["small"], out, eval_data=files["small"], max_steps=2, lr=1e-2,
                     resume=True), on_step=_never)
    assert "--overwrite" in str(info.value)
    assert tree(out) == damaged and not _leftovers(out)


def test_resume_and_overwrite_together_and_a_second_run_on_the_same_out(files, earlier):
    out, before = earlier
    with pytest.raises(TrainingConfigError, match="--resume and --overwrite both given"):
        train(config(files["bert"], files["small"], out, resume=True, overwrite=True), on_step=_never)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # as another run holding --out would
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(TrainingConfigError, match="another training run is writing there now"):
            train(config(files["bert"], files["small"], out, overwrite=True), on_step=_never)
    assert tree(out) == before


def test_an_out_this_user_cannot_write_is_refused_before_a_step_is_trained(files, earlier, tmp_path, monkeypatch):
    """--resume into a run this user may not write trained until its first checkpoint and then failed (the steps
    lost); an --out under a file said "(File exists)"; a lock file that cannot be created beside --out was
    blamed on --out itself. Each is now refused at once, naming what is wrong (permissions emulated with
    os.access: the tests may run as root)."""
    import bca_deploy.atomic as atomic
    import bca_deploy.training.checkpoint as checkpoint

    out, before = earlier
    real_access = os.access
    for denied in (out, out / "last"):
        blocked = lambda path, mode, denied=denied: Path(path) != denied and real_access(path, mode)  # noqa: E731
        monkeypatch.setattr(checkpoint.os, "access", blocked)
        monkeypatch.setattr(atomic.os, "access", blocked)
        with pytest.raises((TrainingConfigError, OutputExistsError), match=rf"{denied}.*(permission denied|not "
                                                                          r"readable and writable)"):
            train(config(files["bert"], files["small"], out, resume=True, max_steps=4), on_step=_never)
    monkeypatch.undo()
    assert tree(out) == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainingConfigError, match="a parent of it is a file, not a directory"):
        train(config(files["bert"], files["small"], tmp_path / "afile" / "run"), on_step=_never)
    (tmp_path / ".blocked.lock").mkdir()  # the lock file's place is taken
    with pytest.raises(TrainingConfigError, match=r"cannot create the run's lock file .*\.blocked\.lock beside it"):
        train(config(files["bert"], files["small"], tmp_path / "blocked"), on_step=_never)


# ---- --overwrite keeps the earlier run until the new one has a checkpoint ------------------------------


class _Stop(Exception):
    pass


def test_overwrite_replaces_only_at_the_first_checkpoint(files, earlier):
    out, before = earlier
    seen = []

    def watch(step, logs):
        seen.append((step, tree(out) == before))
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(config(files["bert"], files["small"], out, max_steps=10, save_every=2, lr=1e-2, overwrite=True),
              on_step=watch)
    assert seen == [(1, True), (2, False), (3, False)]  # the old run stayed until step 2's checkpoint
    info = json.loads((out / "last" / "bca_training.json").read_text())
    assert info["step"] == 2 and not (out / "best").exists()  # the new run (no eval data: no best/)
    assert not _leftovers(out)


@pytest.mark.parametrize("git", [False, True], ids=["user-files", "a-repository"])
def test_overwrite_of_a_folder_that_is_no_run_is_refused_and_an_earlier_run_replaced(files, earlier, tmp_path, git):
    """train --overwrite --out ~ (or a project folder) carried all of it into the run: now a folder that holds no run
    (or holds .git) is refused before any step, naming it and what is in it; an earlier run is still replaced."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    if git:
        (mine / ".git").mkdir()
        (mine / "train_result.json").write_text("{}")  # a run at the top of a repository: still refused
    before = tree(mine)
    with pytest.raises(OutputExistsError, match=f"{mine}: .*(not an output of bca-deploy|holds .git).*notes.txt"):
        train(config(files["bert"], files["small"], mine, max_steps=1, overwrite=True), on_step=_never)
    assert tree(mine) == before and not _leftovers(mine)
    out, _ = earlier
    train(config(files["bert"], files["small"], out, max_steps=2, save_every=2, lr=5e-2, seed=3, overwrite=True))
    assert json.loads((out / "train_result.json").read_text())["step"] == 2 and not _leftovers(out)


def test_overwrite_replaces_the_run_and_keeps_the_users_other_files(files, earlier):
    """--overwrite swapped the whole --out for the new run's tree: notes and an export put in the run directory were
    gone, exit 0, no message (helper-75). HF Trainer's overwrite_output_dir leaves them; so does this now: the run's
    own entries are replaced, the rest is carried over byte for byte (links kept as links)."""
    out, before = earlier
    (out / "NOTES.md").write_text("what I tried")
    (out / "onnx-export" / "adapters").mkdir(parents=True)
    (out / "onnx-export" / "model.onnx").write_bytes(b"\x08\x07" * 1000)
    (out / "onnx-export" / "adapters" / "a.onnx_adapter").write_bytes(b"kernel")
    (out / "data-link").symlink_to(files["small"])
    mine = {p: p.read_bytes() for p in [out / "NOTES.md", out / "onnx-export" / "model.onnx",
                                        out / "onnx-export" / "adapters" / "a.onnx_adapter"]}
    old_last = (out / "last" / "adapter_model.safetensors").read_bytes()
    train(config(files["bert"], files["small"], out, max_steps=3, save_every=2, lr=5e-2, seed=7, overwrite=True))
    assert {p: p.read_bytes() for p in mine} == mine
    assert (out / "data-link").is_symlink() and os.readlink(out / "data-link") == str(files["small"])
    assert (out / "last" / "adapter_model.safetensors").read_bytes() != old_last  # the run itself was replaced
    assert json.loads((out / "train_result.json").read_text())["step"] == 3 and not (out / "best").exists()
    assert not _leftovers(out)


def test_a_file_that_cannot_be_carried_stops_the_overwrite_before_the_swap(files, earlier, monkeypatch):
    """A user's file the new run cannot link or copy (another owner's, unreadable): the run stops at its first
    checkpoint, naming it, and --out is left exactly as it was (the earlier run and the file)."""
    import shutil as shutil_module

    from bca_deploy.training import checkpoint

    out, _ = earlier
    (out / "NOTES.md").write_text("what I tried")
    before = tree(out)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.os, "link", refused)
    monkeypatch.setattr(shutil_module, "copy2", refused)
    with pytest.raises(TrainingConfigError, match=r"cannot carry NOTES\.md into the new run's directory \(Permission "
                                                  r"denied\); the earlier run and everything else in --out are kept"):
        train(config(files["bert"], files["small"], out, max_steps=3, save_every=2, lr=5e-2, overwrite=True))
    assert tree(out) == before and not _leftovers(out)


def test_overwrite_stopped_before_its_first_checkpoint_keeps_the_earlier_run(files, earlier):
    out, before = earlier

    def stop(step, logs):
        raise _Stop

    with pytest.raises(_Stop):
        train(config(files["bert"], files["small"], out, max_steps=10, save_every=5, overwrite=True), on_step=stop)
    assert tree(out) == before and not _leftovers(out)


def _changed(out: Path, before: dict[str, bytes]) -> bool:
    """Whether ``out`` differs from ``before``, read while a run writes it (a file can go between listing and
    reading it: the run is swapping a directory in, so not settled yet)."""
    try:
        return tree(out) != before
    except FileNotFoundError:
        return False


def test_kills_during_overwrite_leave_the_old_run_or_the_new(files, earlier):
    """Real SIGKILLs at several moments of an --overwrite run; after recovery --out is either run, whole."""
    out, before = earlier
    cmd = [sys.executable, "-m", "bca_deploy.training", "train", "--model", str(files["bert"]), "--data",
           str(files["small"]), "--out", str(out), "--overwrite", "--block-size", "8", "--batch-size", "16",
           "--max-length", "32", "--save-every", "1", "--max-steps", "100000", "--no-progress", "--lr", "0.01"]
    outcomes = []
    for delay in (0.5, 4.0, None):  # early (loading), mid-start, and right after the first checkpoint swap
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                                env=subprocess_env())
        deadline = time.time() + (delay if delay is not None else 120)
        while time.time() < deadline and proc.poll() is None:
            if delay is None and (out / "last" / "bca_training.json").exists() and _changed(out, before):
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        RunDirectory.open(out, resume=False, overwrite=True).close()  # what the next run does first
        if tree(out) == before:
            outcomes.append("old")
        else:
            info = json.loads((out / "last" / "bca_training.json").read_text())
            assert info["step"] >= 1 and (out / "last" / "trainer_state.pt").is_file()
            assert not (out / "best").exists()  # the new run has no eval data, the old one had
            outcomes.append("new")
        assert not _leftovers(out)
    assert outcomes[-1] == "new" and "old" in outcomes


# ---- resume -----------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_resume_reaches_the_same_weights(files, tmp_path):
    options = dict(max_steps=6, save_every=2, eval_data=files["small"], eval_every=3)
    reference = train(config(files["bert"], files["small"], tmp_path / "ref", **options))

    def kill_at_5(step, logs):
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        train(config(files["bert"], files["small"], tmp_path / "run", **options), on_step=kill_at_5)
    assert json.loads((tmp_path / "run" / "last" / "bca_training.json").read_text())["step"] == 4
    with pytest.raises(CheckpointError, match="batch_size: checkpoint has 16, this run has 8"):
        train(config(files["bert"], files["small"], tmp_path / "run", resume=True, **{**options, "batch_size": 8}))
    resumed = train(config(files["bert"], files["small"], tmp_path / "run", resume=True, **options))
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


def test_resume_on_other_examples_of_the_same_count_is_refused(files, tmp_path):
    """The count alone let a resume go on with another file of as many rows (or other columns, another template)."""
    options = dict(max_steps=4, save_every=2)

    def kill_at_3(step, logs):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(config(files["bert"], files["small"], tmp_path / "run", **options), on_step=kill_at_3)
    lines = Path(files["small"]).read_text().splitlines(keepends=True)
    shuffled = tmp_path / "shuffled.tsv"  # the same rows, in another order: another trajectory
    shuffled.write_text("".join(lines[:1] + lines[2:] + lines[1:2]))
    with pytest.raises(CheckpointError, match=r"training data: the \d+ examples read from .*shuffled\.tsv .* are "
                                              r"not the ones the checkpoint was trained on"):
        train(config(files["bert"], shuffled, tmp_path / "run", resume=True, **options))
    moved = tmp_path / "moved" / "train.tsv"  # the same bytes elsewhere: the same examples, resumed
    moved.parent.mkdir()
    moved.write_text("".join(lines))
    resumed = train(config(files["bert"], moved, tmp_path / "run", resume=True, **options))
    assert resumed.resumed_from == 2 and resumed.step == 4


def test_resume_after_sigkill(files, tmp_path):
    """A real process killed at an arbitrary moment (maybe mid-checkpoint) resumes to the same weights."""
    args = ["--model", str(files["bert"]), "--data", str(files["small"]), "--block-size", "8", "--batch-size", "16",
            "--max-length", "32", "--save-every", "1", "--no-progress", "--scheduler", "constant", "--warmup-ratio", "0"]
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
    constant = dict(save_every=1, max_steps=target, scheduler="constant", warmup_ratio=0.0)
    resumed = train(config(files["bert"], files["small"], tmp_path / "run", resume=True, **constant))
    reference = train(config(files["bert"], files["small"], tmp_path / "ref", **constant))
    assert resumed.resumed_from == killed_at
    ref, got = read_tensors(reference.last_dir), read_tensors(resumed.last_dir)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_resuming_a_finished_run_changes_nothing_and_says_so(files, earlier, capsys):
    """--resume on a run already at its --max-steps has nothing to do: its result (loss, throughput) and every
    file stay as they were; it used to rewrite train_result.json with a NaN loss and zero throughput."""
    out, before = earlier
    result = train(config(files["bert"], files["small"], out, eval_data=files["small"], max_steps=2, lr=1e-2,
                          resume=True), on_step=_never)
    assert tree(out) == before
    assert result.step == 2 and math.isfinite(result.train_loss) and result.samples_per_second > 0
    assert "nothing to resume" in capsys.readouterr().err


def test_a_finished_runs_result_written_again_keeps_the_logged_loss_and_is_read_back(files, earlier, capsys):
    """A finished run resumed without its train_result.json (lost, or not this run's) had it written again with the
    loss NaN ('"train_loss": NaN', which is not JSON): the next resume's reader refused it, so every resume wrote it
    again. It keeps the loss train_log.jsonl records for the step (null when the log has none, said in the summary),
    and the next resume reads it back as it stands."""
    from bca_deploy.training.report import final_summary

    out, before = earlier
    result_file = out / "train_result.json"
    recorded = json.loads(before["train_result.json"])["train_loss"]

    def resume():
        return train(config(files["bert"], files["small"], out, eval_data=files["small"], max_steps=2, lr=1e-2,
                            resume=True), on_step=_never)

    for logged in (True, False):
        if not logged:  # the log's record of step 2 without its loss: nothing to keep
            log = out / "train_log.jsonl"
            records = [json.loads(line) for line in log.read_text().splitlines()]
            log.write_text("".join(json.dumps({k: v for k, v in r.items() if not (r["step"] == 2 and k == "loss")})
                                   + "\n" for r in records))
        result_file.unlink()
        result = resume()
        text = result_file.read_text()
        assert "NaN" not in text and json.loads(text)["train_loss"] == (recorded if logged else None), text
        assert result.train_loss == (recorded if logged else None)
        summary = final_summary(result, files["bert"], files["small"])
        assert (f"final train loss {recorded:.4f}" if logged else
                "final train loss not recorded (no step trained now, and train_log.jsonl records no loss for step 2)") \
            in summary, summary
        capsys.readouterr()
        again = resume()  # reads it back: nothing written
        assert "nothing to resume; its train_result.json is kept as it was" in capsys.readouterr().err
        assert result_file.read_text() == text and again.train_loss == result.train_loss


_RESUME_IN_A_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a reader of /dev/zero fails here, not the machine
sys.path.insert(0, sys.argv[1])
from training_helpers import config
from bca_deploy.training import train
model, data, out = sys.argv[2:5]
result = train(config(model, data, out, eval_data=data, max_steps=2, lr=1e-2, resume=True))
print(json.dumps({"out_dir": str(result.out_dir), "step": result.step}))
"""


@pytest.mark.parametrize("kind", ["named-pipe", "link-to-dev-zero"])
def test_a_finished_runs_result_that_is_not_a_file_is_written_again_not_read(files, earlier, kind):
    """--resume of a finished run read its train_result.json with read_text(): a named pipe there blocked it for ever,
    a link to /dev/zero read until memory ran out (MemoryError at a 4 GB limit). It is read by the one JSON rule (a
    regular file within its bound) and, not being one, written again from the checkpoint."""
    out, before = earlier
    result_file = out / "train_result.json"
    result_file.unlink()
    if kind == "named-pipe":
        os.mkfifo(result_file)
    else:
        result_file.symlink_to("/dev/zero")
    run = subprocess.run([sys.executable, "-c", _RESUME_IN_A_CHILD, str(Path(__file__).parent), str(files["bert"]),
                          str(files["small"]), str(out)], capture_output=True, text=True, timeout=60,
                         env=subprocess_env(), cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"out_dir": str(out), "step": 2}
    assert result_file.is_file() and not result_file.is_symlink()
    assert json.loads(result_file.read_text())["out_dir"] == str(out)
    assert {k: v for k, v in tree(out).items() if k != "train_result.json"} == \
        {k: v for k, v in before.items() if k != "train_result.json"}


@pytest.mark.parametrize("edit", ["moved", "loss-a-string", "unknown-field"])
def test_a_finished_runs_result_of_another_place_or_kind_is_written_again(files, earlier, edit):
    """A train_result.json that is not this run's was printed as it stood: a run moved to another folder named its old
    folder as the adapter to use next, and a hand-edited loss "0.5" failed in the summary with a traceback. Such a
    record is written again from the checkpoint, with this run's paths."""
    from bca_deploy.training.report import final_summary

    out, _ = earlier
    result_file = out / "train_result.json"
    data = json.loads(result_file.read_text())
    if edit == "moved":
        data.update(out_dir="/elsewhere/run", last_dir="/elsewhere/run/last", best_dir="/elsewhere/run/best")
    elif edit == "loss-a-string":
        data["train_loss"] = "0.5"
    else:
        data["note"] = "mine"
    result_file.write_text(json.dumps(data))
    result = train(config(files["bert"], files["small"], out, eval_data=files["small"], max_steps=2, lr=1e-2,
                          resume=True), on_step=_never)
    assert (result.out_dir, result.last_dir, result.best_dir, result.step) == (out, out / "last", out / "best", 2)
    summary = final_summary(result, files["bert"], files["small"])
    assert f"adapter: {out / 'best'}" in summary and "/elsewhere" not in summary
    rewritten = json.loads(result_file.read_text())
    assert rewritten["out_dir"] == str(out) and isinstance(rewritten["train_loss"], float) and "note" not in rewritten


def test_a_diverging_run_is_a_refused_input_not_a_bug(files, tmp_path):
    from bca_deploy.errors import BCAError
    from bca_deploy.training import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match="training loss is (nan|inf).*lower the learning rate") as caught:
        train(config(files["bert"], files["small"], tmp_path / "run", max_steps=3, lr=1e30, head_lr=1e30,
                     max_grad_norm=0))
    assert isinstance(caught.value, BCAError)  # the CLI prints one Error: line, exit 2


def test_a_run_records_its_base_model_where_it_is_not_as_typed(files, tmp_path, monkeypatch):
    """``train --model ../models/bert`` recorded "../models/bert" as base_model_name_or_path, relative to where the
    run was started; ``convert --to peft`` then handed that to AutoPeftModelFor*, which looked for it relative to
    wherever it ran (helper-78). A local base model is recorded by its absolute path, and the PEFT copy loads from
    anywhere."""
    from click.testing import CliRunner
    from peft import AutoPeftModelForSequenceClassification

    from bca_deploy.cli import main

    monkeypatch.chdir(files["bert"].parent)
    out = tmp_path / "run"
    train(config(Path(files["bert"].name), files["small"], out, max_steps=1))
    recorded = json.loads((out / "last" / "adapter_config.json").read_text())["base_model"]["name_or_path"]
    assert recorded == str(files["bert"].resolve())
    result = CliRunner().invoke(main, ["convert", "--adapter", str(out), "--to", "peft", "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft")
    assert type(model.base_model.model).__name__ == "BertForSequenceClassification"


def test_a_run_replaced_from_inside_it_is_written_whole(files, tmp_path, monkeypatch):
    """train --out . --overwrite in the run folder it replaces: the swap puts a new folder at that path while the
    process's working directory is the old one (deleted), so the run's later relative writes failed ('.train_result
    .json.bca-tmp-...: No such file or directory', the run left without train_result.json) → --out is made absolute
    once."""
    out = tmp_path / "run"
    train(config(files["bert"], files["small"], out, max_steps=1))
    monkeypatch.chdir(out)
    result = train(config(files["bert"], files["small"], Path("."), max_steps=1, overwrite=True))
    assert json.loads((out / "train_result.json").read_text())["step"] == result.step == 1
    assert (out / "last" / "adapter_config.json").is_file()


def test_a_target_entry_that_matches_nothing_beside_others_is_named(files, tmp_path, capsys):
    """--targets query,w1 on a model without w1 layers trained query alone without a word (transformers 5.x fuses
    Mixtral's expert w1/w2 into 3-D parameters: --targets q_proj,w1,w2 adapted q_proj only; helper-85). Entries that
    matched nothing are now named; the run goes on with the others, as PEFT does."""
    train(config(files["bert"], files["small"], tmp_path / "run", max_steps=1, targets=["query", "w1", "w2"]))
    err = capsys.readouterr().err
    assert "note: --targets w1, w2 matched no Linear/Conv1D layer of BertForSequenceClassification; adapting 2 layers" \
        in err, err


def test_fused_moe_experts_named_in_targets_are_said_to_be_fused(files, tmp_path, capsys, recwarn):
    """transformers 5.x fuses Mixtral's per-expert w1/w2/w3 into 3-D parameters: --targets q_proj,w1,w2 adapted
    q_proj alone, the note saying only that w1, w2 matched nothing. It now says why, in the library's warning words
    (bca_deploy.inject.unmatched_targets: one rule for both), said once (the warning is not repeated). On 4.x the
    experts are Linears: adapted, no note."""
    import transformers

    from training_helpers import sst2_rows, word_tokenizer

    model_dir = tmp_path / "mixtral"
    tokenizer = word_tokenizer(model_dir, [s for s, _ in sst2_rows("train", 64)])
    torch.manual_seed(0)
    transformers.MixtralForSequenceClassification(transformers.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
        num_labels=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train(config(model_dir, files["small"], tmp_path / "run", max_steps=1, targets=["q_proj", "w1", "w2"]))
    err = capsys.readouterr().err
    assert not [w for w in recwarn if "matched no Linear/Conv1D layer" in str(w.message)]
    if transformers.__version__.startswith("4."):
        assert "note: --targets" not in err, err
        return
    assert err.count("note: --targets") == 1, err
    assert "note: --targets w1, w2 matched no Linear/Conv1D layer of MixtralForSequenceClassification; adapting 2 " \
           "layers matched by the others. w1, w2: transformers 5." in err, err
    assert "fuses the experts of MixtralForSequenceClassification into 3-D parameters" in err, err


def test_targets_naming_qwen2_moe_experts_beside_the_shared_expert_are_said_to_leave_the_experts(files, tmp_path,
                                                                                                   capsys, recwarn):
    """--targets q_proj,gate_proj on a Qwen2-MoE trained the shared expert's gate_proj alone on transformers 5.x (the
    routed experts are fused 3-D parameters there) without a word, as gate_proj matched something; on 4.x it trains
    every expert's too. The note now names gate_proj and the experts it leaves out, in the library's warning words
    (bca_deploy.inject.unmatched_targets), once; on 4.x no note."""
    import transformers

    from training_helpers import sst2_rows, word_tokenizer

    model_dir = tmp_path / "qwen2_moe"
    tokenizer = word_tokenizer(model_dir, [s for s, _ in sst2_rows("train", 64)])
    torch.manual_seed(0)
    transformers.Qwen2MoeForSequenceClassification(transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts_per_tok=2,
        vocab_size=100, max_position_embeddings=64, pad_token_id=0, num_labels=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train(config(model_dir, files["small"], tmp_path / "run", max_steps=1, targets=["q_proj", "gate_proj"]))
    err = capsys.readouterr().err
    assert not [w for w in recwarn if "routed experts" in str(w.message)]
    modules = json.loads((tmp_path / "run" / "last" / "adapter_config.json").read_text())["modules"]
    if transformers.__version__.startswith("4."):
        assert "note: --targets" not in err and "model.layers.1.mlp.experts.3.gate_proj" in modules, err
        return
    assert not any(".experts." in m for m in modules) and "model.layers.1.mlp.shared_expert.gate_proj" in modules
    assert err.count("note: --targets") == 1, err
    assert "note: --targets gate_proj adapted 2 layers of Qwen2MoeForSequenceClassification (" in err and \
        "and none of its routed experts: transformers 5." in err and "(shared_expert.gate_proj); to adapt the " \
        "experts, use transformers 4.x" in err, err
