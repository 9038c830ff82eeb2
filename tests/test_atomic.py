"""The atomic directory writer: modes, refusals, recovery, and SIGKILL at the two worst moments of a swap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bca_deploy.atomic as atomic
from bca_deploy.atomic import OLD_TAG, TMP_TAG, AtomicDir, atomic_dir, check_target, recover, write_dir
from bca_deploy.errors import OutputExistsError


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_new_directory_gets_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_dir(tmp_path / "out", lambda d: (d / "bca_export.json").write_text("one"))
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755  # not mkdtemp's 0o700
    assert (out / "bca_export.json").stat().st_mode & 0o777 == 0o644
    assert files(out) == {"bca_export.json": "one"} and siblings(out) == []


def test_existing_output_refused_without_overwrite_and_replaced_with_it(tmp_path):
    out = write_dir(tmp_path / "out", lambda d: (d / "bca_export.json").write_text("one"))
    with pytest.raises(OutputExistsError, match=r"not empty; pass --overwrite \(overwrite=True in Python\)"):
        write_dir(out, lambda d: (d / "b.txt").write_text("two"))
    assert files(out) == {"bca_export.json": "one"}
    write_dir(out, lambda d: (d / "b.txt").write_text("two"), overwrite=True)
    assert files(out) == {"b.txt": "two"} and siblings(out) == []
    (tmp_path / "empty").mkdir()  # an empty directory is not an output to protect
    write_dir(tmp_path / "empty", lambda d: (d / "c.txt").write_text("three"))
    assert files(tmp_path / "empty") == {"c.txt": "three"}


def test_file_target_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        check_target(tmp_path / "f", overwrite=True)


def test_failed_build_leaves_target_and_no_temporaryfiles(tmp_path):
    out = write_dir(tmp_path / "out", lambda d: (d / "bca_export.json").write_text("one"))

    def broken(d: Path) -> None:
        (d / "bca_export.json").write_text("half")
        raise RuntimeError("failed while writing")

    with pytest.raises(RuntimeError):
        write_dir(out, broken, overwrite=True)
    assert files(out) == {"bca_export.json": "one"} and siblings(out) == []


def test_keep_existing_carries_other_files_over(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text("notes")
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("x")
    (out / "adapter_config.json").write_text("old")
    write_dir(out, lambda d: (d / "adapter_config.json").write_text("new"), overwrite=True, keep_existing=True)
    assert files(out) == {"README.md": "notes", "sub/x.txt": "x", "adapter_config.json": "new"}


def test_symlinked_target_is_replaced_not_followed(tmp_path):
    real = write_dir(tmp_path / "real", lambda d: (d / "bca_export.json").write_text("one"))
    (tmp_path / "link").symlink_to(real)
    write_dir(tmp_path / "link", lambda d: (d / "b.txt").write_text("two"), overwrite=True)
    assert not (tmp_path / "link").is_symlink() and files(tmp_path / "link") == {"b.txt": "two"}
    assert files(real) == {"bca_export.json": "one"}  # what the link pointed to is untouched


@pytest.mark.parametrize("exchange", [True, False])
def test_replacement_without_exchange_uses_two_renames(tmp_path, monkeypatch, exchange):
    monkeypatch.setattr(atomic, "USE_EXCHANGE", exchange)
    out = write_dir(tmp_path / "out", lambda d: (d / "bca_export.json").write_text("one"))
    write_dir(out, lambda d: (d / "b.txt").write_text("two"), overwrite=True)
    assert files(out) == {"b.txt": "two"} and siblings(out) == []


def test_committed_or_aborted_once(tmp_path):
    staged = AtomicDir(tmp_path / "run", overwrite=True)
    (staged.path / "x").write_text("1")
    assert staged.commit() == tmp_path / "run"
    with pytest.raises(RuntimeError, match="already committed"):
        staged.commit()
    dropped = AtomicDir(tmp_path / "run2")
    dropped.abort()
    assert not (tmp_path / "run2").exists() and siblings(tmp_path / "run2") == []


def test_recover_leaves_live_writers_alone(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:  # our own temporary tree, being written: recover must not touch it
        (tmp / "bca_export.json").write_text("one")
        assert recover(out) is None and tmp.is_dir()
    dead = tmp_path / f".out{TMP_TAG}999999999-0123456789ab"  # no such pid
    dead.mkdir()
    assert recover(out) == out and not dead.exists()


def test_recover_restores_a_tree_set_aside_by_a_dead_writer(tmp_path):
    out = write_dir(tmp_path / "out", lambda d: (d / "bca_export.json").write_text("old"))
    aside = tmp_path / f".out{OLD_TAG}999999999-0123456789ab"
    out.rename(aside)
    (tmp_path / f".out{TMP_TAG}999999999-abcdef012345").mkdir()
    assert recover(out) == out
    assert files(out) == {"bca_export.json": "old"} and siblings(out) == []


def test_recover_touches_only_what_a_bca_deploy_writer_named(tmp_path):
    """The user's own files beside the output, even with names like a writer's, survive recovery (and a command
    that is then refused); only exact leftovers of dead writers go."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "a").write_text("x")
    users = {".results.old-backup": "dir", ".results.tmp-draft": "file", ".results.bca-tmp-notes": "dir",
             f".results{OLD_TAG}1-2": "dir", ".results.old-0123abcd": "dir",  # legacy name, not the legacy layout
             ".results.tmp-abcd1234": "file", ".results.merging-abcd1234.txt": "dir"}
    for name, kind in users.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("precious")
    legacy_tmp = tmp_path / ".results.tmp-k2_9x0aq"  # tempfile.mkdtemp's names, from writers before 0.2
    legacy_tmp.mkdir()
    dead = tmp_path / f".results{TMP_TAG}999999999-0123456789ab"
    dead.mkdir()
    assert recover(out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*users, "results"])
    with pytest.raises(OutputExistsError, match="not empty"):
        write_dir(out, lambda d: (d / "b").write_text("y"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*users, "results"])


_KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import bca_deploy.atomic as atomic

    target, moment = Path(sys.argv[1]), sys.argv[2]
    if moment == "between-renames":  # the two-rename fallback, killed after the old tree went aside
        atomic.USE_EXCHANGE = False
        real_rename = os.rename

        def rename(src, dst):
            real_rename(src, dst)
            if atomic.OLD_TAG in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)

        atomic.os.rename = rename
    else:  # after the exchange, before the old tree (now at the temporary name) is deleted
        def remove(path):
            os.kill(os.getpid(), signal.SIGKILL)

        atomic._remove = remove
    atomic.write_dir(target, lambda d: (d / "bca_export.json").write_text("new"), overwrite=True)
""")


@pytest.mark.parametrize("moment", ["between-renames", "after-exchange"])
def test_sigkill_at_the_worst_moment_is_recovered(tmp_path, moment):
    out = write_dir(tmp_path / "out", lambda d: (d / "bca_export.json").write_text("old"))
    proc = subprocess.run([sys.executable, "-c", _KILL_AT, str(out), moment], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if moment == "between-renames":
        assert not out.exists() and any(OLD_TAG in name for name in siblings(out))  # the window itself
        assert recover(out) == out  # what the next writer of out does first
        assert files(out) == {"bca_export.json": "old"}  # the new tree never landed: the old one is back
    else:
        assert files(out) == {"bca_export.json": "new"}  # the exchange landed: out is the new tree
        assert any(TMP_TAG in name for name in siblings(out))  # the old tree, left at the temporary name
        recover(out)
    assert siblings(out) == []
    write_dir(out, lambda d: (d / "bca_export.json").write_text("next"), overwrite=True)
    assert files(out) == {"bca_export.json": "next"} and siblings(out) == []


def test_an_output_that_is_or_holds_an_input_is_refused(tmp_path):
    from bca_deploy.atomic import check_inputs_outside
    from bca_deploy.errors import OutputExistsError

    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data" / "train.tsv").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "out", target_is_directory=True)
    for target, inputs, needle in (
            (tmp_path / "out", [("the data", tmp_path / "out" / "data" / "train.tsv")], "contains the data"),
            (tmp_path / "link", [("the data", tmp_path / "out" / "data")], "contains the data"),  # through a link
            (tmp_path / "out" / "data" / ".." / "data", [("the model", tmp_path / "out" / "data")], "is the model")):
        with pytest.raises(OutputExistsError, match=needle):
            check_inputs_outside(target, inputs)
    check_inputs_outside(tmp_path / "out" / "data" / "new", [("the data", tmp_path / "out" / "data" / "train.tsv"),
                                                             ("nothing", None)])  # an output beside or inside: fine
    check_inputs_outside(tmp_path / "other", [("the data", tmp_path / "out")])


@pytest.mark.parametrize("dots", ["model/..", "nothing/..", "model/../.", "model/sub/../.."])
def test_an_output_written_through_dot_dot_is_where_the_writer_puts_it(tmp_path, dots):
    """``--out SB/model/.. --overwrite`` got past the check (``..`` kept) while the writer (abspath) replaced SB,
    deleting the model, the adapter and every file beside them."""
    from bca_deploy.atomic import check_inputs_outside
    from bca_deploy.errors import OutputExistsError

    (tmp_path / "model" / "sub").mkdir(parents=True)
    (tmp_path / "adapter").mkdir()
    target = str(tmp_path) + "/" + dots
    with pytest.raises(OutputExistsError, match="contains the model"):
        check_inputs_outside(target, [("the model", tmp_path / "model"), ("the adapter", tmp_path / "adapter")])


def test_an_output_holding_what_an_inputs_links_point_to_is_refused(tmp_path):
    """A Hugging Face cache snapshot is links into ``blobs/``: ``merge --model snap --out blobs --overwrite`` replaced
    the base model's weights with the merged ones (the snapshot then loaded the merged model)."""
    from bca_deploy.atomic import check_inputs_outside
    from bca_deploy.errors import OutputExistsError

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc123").write_text("weights")
    (tmp_path / "snap" / "sub").mkdir(parents=True)
    (tmp_path / "snap" / "sub" / "model.safetensors").symlink_to("../../blobs/abc123")
    (tmp_path / "snap" / "loop").symlink_to(tmp_path / "snap" / "loop")  # a loop is skipped, not a crash
    for target in (tmp_path / "blobs", str(tmp_path / "blobs") + "/../blobs"):
        with pytest.raises(OutputExistsError, match="holds the file that .*model.safetensors"):
            check_inputs_outside(target, [("the model directory", tmp_path / "snap")])
    check_inputs_outside(tmp_path / "merged", [("the model directory", tmp_path / "snap")])


def test_an_output_under_a_file_or_where_nothing_can_be_written_is_named_as_given(tmp_path):
    """Errors name the output the user gave and why, never the hidden sibling the writer would have used."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match=r"afile/sub/deeper: .*afile is a file, not a directory"):
        write_dir(tmp_path / "afile" / "sub" / "deeper", lambda d: None)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match=r"dangling/sub: .*dangling is a symbolic link to nothing"):
        write_dir(tmp_path / "dangling" / "sub", lambda d: None)
    with pytest.raises(OSError) as info:
        write_dir("/proc/bca-deploy-test-output", lambda d: None)  # procfs: no directory can be made there
    assert str(info.value).startswith("[Errno") and "/proc/bca-deploy-test-output: cannot write the output there" \
        in str(info.value) and TMP_TAG not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling"]


def test_an_output_this_user_could_not_clear_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """--overwrite of a tree holding a directory this user cannot empty (read-only, or not listable) used to put
    the new tree in place and leave the old one as a hidden half-deleted sibling, with exit 0. Emulated with
    os.access (root may write anywhere): the write is refused up front, naming the directory, with the old
    tree whole and no sibling left."""
    out = tmp_path / "out"
    (out / "keep" / "locked").mkdir(parents=True)
    (out / "train_log.jsonl").write_text("old")
    (out / "keep" / "locked" / "inner.txt").write_text("inner")
    before = files(out)
    denied = {str(out / "keep" / "locked")}
    real_access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: str(path) not in denied and real_access(path, mode))
    with pytest.raises(OutputExistsError, match=r"out: cannot be replaced: .*keep/locked is not readable and writable "
                                                r"by this user.*nothing was written"):
        write_dir(out, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)
    denied.clear()
    denied.add(str(out))  # the target itself
    with pytest.raises(OutputExistsError, match=r"out is not readable and writable by this user"):
        write_dir(out, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)
    assert files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    denied.clear()
    write_dir(out, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)  # allowed: replaced whole
    assert files(out) == {"new.txt": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_another_users_output_in_a_sticky_directory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """In a sticky directory (/tmp) only the owner may rename an entry; the refusal used to come after the whole
    output was built, naming a hidden temporary directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    out = shared / "theirs"
    out.mkdir()
    (out / "bca_export.json").write_text("x")
    owner = out.lstat().st_uid
    monkeypatch.setattr(atomic.os, "geteuid", lambda: owner + 4242)  # someone else (the tree belongs to `owner`)
    built = []
    with pytest.raises(OutputExistsError, match=r"theirs: cannot be replaced: it belongs to another user and .*shared "
                                                r"is a sticky directory"):
        write_dir(out, lambda tmp: built.append(tmp), overwrite=True)
    assert not built and files(out) == {"bca_export.json": "x"}
    monkeypatch.setattr(atomic.os, "geteuid", lambda: owner)
    write_dir(out, lambda tmp: (tmp / "y.txt").write_text("y"), overwrite=True)
    assert files(out) == {"y.txt": "y"}


# ---- --overwrite replaces only an empty directory or an earlier output -------------------------------------------


def _user_folder(path: Path, *, git: bool = False) -> dict[str, str]:
    path.mkdir()
    (path / "thesis.tex").write_text("three years of work")
    (path / "data").mkdir()
    (path / "data" / "train.csv").write_text("text,label\n")
    if git:
        (path / ".git").mkdir()
        (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (path / "adapter_config.json").write_text("{}")  # even an adapter at the top of a repository is not enough
    return files(path)


@pytest.mark.parametrize("git", [False, True], ids=["user-files", "a-repository"])
@pytest.mark.parametrize("keep_existing", [False, True], ids=["replace", "keep-existing"])
def test_overwrite_refuses_a_folder_that_is_no_output_and_touches_nothing(tmp_path, git, keep_existing):
    """`--overwrite --out .` in a project folder (or ~, or a data folder) moved it aside and deleted it, exit 0."""
    out = tmp_path / "project"
    before = _user_folder(out, git=git)
    built = []
    with pytest.raises(OutputExistsError) as info:
        write_dir(out, lambda d: built.append(d), overwrite=True, keep_existing=keep_existing)
    message = str(info.value)
    assert str(out) in message and "thesis.tex" in message and "data" in message
    assert "choose an empty or new output directory, or remove this one yourself" in message
    assert (".git" in message) == git
    assert not built and files(out) == before and siblings(out) == []


def test_overwrite_replaces_an_empty_folder_and_an_earlier_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert files(write_dir(empty, lambda d: (d / "bca_export.json").write_text("new"), overwrite=True)) == {
        "bca_export.json": "new"}
    run = tmp_path / "run"  # a training run, recognised by a checkpoint in last/
    (run / "last").mkdir(parents=True)
    (run / "last" / "trainer_state.pt").write_text("old")
    (run / "notes.txt").write_text("mine")
    write_dir(run, lambda d: (d / "train_log.jsonl").write_text("new"), overwrite=True)
    assert files(run) == {"train_log.jsonl": "new"}


def test_a_marker_that_is_a_link_or_a_folder_does_not_make_an_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bca_export.json").mkdir()
    (out / "adapter_config.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="not an output of bca-deploy"):
        check_target(out, overwrite=True)
    checkpoint = tmp_path / "checkpoint"  # a transformers checkpoint: only a merge (checkpoint=True) replaces it
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_text("")
    with pytest.raises(OutputExistsError, match="config.json, model.safetensors"):
        check_target(checkpoint, overwrite=True)
    check_target(checkpoint, overwrite=True, checkpoint=True)


def test_a_folder_that_appears_while_the_output_is_built_is_not_replaced_unless_it_is_one(tmp_path):
    """The rule is checked again at the swap: a user's folder created at the target meanwhile was replaced."""
    out = tmp_path / "out"
    staging = AtomicDir(out, overwrite=True)
    (staging.path / "bca_export.json").write_text("new")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not an output of bca-deploy.*notes.txt"):
        staging.commit()
    assert files(out) == {"notes.txt": "mine"} and siblings(out) == []


def test_a_project_that_keeps_its_runs_in_the_demos_folders_is_no_demo_output(tmp_path):
    """helper-106: proj/{src/, README.md, train/sst2/train_result.json} was taken for a demo's output, so
    `--overwrite --out proj` deleted src/ and the README. The demo's layout counts only with nothing else beside it."""
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    (project / "README.md").write_text("mine")
    (project / "train" / "sst2").mkdir(parents=True)
    (project / "train" / "sst2" / "train_result.json").write_text("{}")
    before = files(project)
    with pytest.raises(OutputExistsError, match="not an output of bca-deploy") as info:
        write_dir(project, lambda d: (d / "bca_export.json").write_text("new"), overwrite=True)
    assert "README.md" in str(info.value) and "src" in str(info.value)
    assert files(project) == before and siblings(project) == []
    demo = tmp_path / "demo"  # what demo --out writes: replaced
    for name in ("data", "merged", "onnx-bank"):
        (demo / name).mkdir(parents=True)
    (demo / "adapters" / "sentiment").mkdir(parents=True)
    (demo / "adapters" / "sentiment" / "adapter_config.json").write_text("{}")
    write_dir(demo, lambda d: (d / "bca_export.json").write_text("new"), overwrite=True)
    assert files(demo) == {"bca_export.json": "new"}
