"""Directories written atomically: the one writer for adapters, checkpoints, merged models and exports.

A directory is built in a hidden temporary sibling (``.<name>.bca-tmp-<pid>-<id>``), every file and
directory in it is fsynced, and it is then put in place:

* ``target`` absent: one ``rename`` (``renameat2(RENAME_NOREPLACE)`` on Linux, so a directory created
  meanwhile by someone else is never replaced by accident);
* ``target`` present (``overwrite``): Linux swaps the two trees in one atomic step
  (``renameat2(RENAME_EXCHANGE)``), so ``target`` is the old tree or the new one at every instant, never
  missing; the old tree, now at the temporary name, is then deleted. Where the exchange is not available
  (another OS, a filesystem without it), the old tree is renamed aside (``.<name>.bca-old-<pid>-<id>``)
  and the new one renamed in; a crash between the two renames leaves ``target`` missing for an instant,
  and :func:`recover` (run by every write to the same ``target``) renames the old tree back.

Leftovers of a killed writer (temporary trees, trees set aside) carry the writer's pid; :func:`recover`
removes those whose process is gone, restoring a tree set aside when ``target`` is missing, and leaves
the ones of live writers alone. Directories are created with ``0o777`` masked by the umask (the mode
``mkdir`` gives), not the ``0o700`` of :func:`tempfile.mkdtemp`; files a library writes private get
``0o666 & ~umask`` (:func:`give_default_mode`). Replacing a tree is refused up front when this user could
not delete the old one (:func:`check_target`).

Only an output may be replaced (:func:`replace_refusal`, the one rule every writer's ``--overwrite`` goes
through): an empty directory, or one a bca-deploy stage wrote, recognised by an entry that stage leaves
(:data:`OUTPUT_MARKERS`; a merge also replaces a transformers checkpoint, which is what it writes). A home
directory, a project folder, a folder holding a ``.git`` or anything else is refused before anything is written.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import OutputExistsError

__all__ = ["AtomicDir", "atomic_dir", "write_dir", "write_text", "check_target", "check_inputs_outside",
           "check_outside_adapters",
           "copied_link_problem", "recover", "replace_refusal", "current_umask", "give_default_mode", "OUTPUT_MARKERS",
           "TMP_TAG", "OLD_TAG"]

#: Infixes of the hidden siblings a writer creates: ``.<name><TAG><pid>-<hex>``.
TMP_TAG = ".bca-tmp-"
OLD_TAG = ".bca-old-"

_LEGACY_TMP_TAGS = (".tmp-", ".merging-")
_LEGACY_OLD_TAG = ".old-"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
#: Whether an atomic exchange is tried at all (tests turn it off to exercise the two-rename fallback).
USE_EXCHANGE = True


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the call (or the flag) is not supported here."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``), else by
    setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def give_default_mode(path: str | Path) -> None:
    """Give a file a writer created private (safetensors 0.8 writes 0o600) the mode ``open()`` would have:
    ``0o666 & ~umask``, so another user (a service account running ``serve``) can read what was written."""
    os.chmod(path, 0o666 & ~current_umask())


#: The most entries of an input directory :func:`check_inputs_outside` looks through for links (a model or adapter
#: directory holds a few dozen; a larger tree is not walked further).
_LINK_SCAN_LIMIT = 10_000


def check_inputs_outside(target: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output directory that is, or contains, one of the command's inputs, or a file an input's symbolic
    links point to (a Hugging Face cache snapshot links into ``blobs/``): replacing it (``--overwrite``) would
    delete them. ``inputs`` are ``(what, path)`` pairs (None paths are skipped); paths are compared where they
    really are, and the output where the writer puts it (``out/x/..`` is ``out``, as :class:`AtomicDir` sees it).

    Raises:
        OutputExistsError: naming the output, the input and what it is, before anything is written.
    """
    target = Path(target)
    written = Path(os.path.abspath(target))  # what AtomicDir replaces: ".." taken lexically, as abspath does
    real = written.parent.resolve() / written.name
    real = real.resolve() if real.is_symlink() else real
    for what, path in inputs:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if real == resolved or real in resolved.parents:
            relation = "is" if real == resolved else "contains"
            raise OutputExistsError(f"{target}: {relation} {what} {path}, an input of this command; writing the output "
                                    "there would delete it: choose another output directory")
        link = _link_into(Path(path), real) if resolved.is_dir() else None
        if link is not None:
            raise OutputExistsError(f"{target}: holds the file that {link} (in {what} {path}) links to; writing the "
                                    "output there would delete it: choose another output directory")


def check_outside_adapters(target: str | Path, adapters: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output directory (a merged model, an export) inside one of the command's input adapter directories
    (``adapters``: ``(what, path)`` pairs, None paths skipped): it writes a model into the adapter it reads, and
    saving that adapter again (``--overwrite``) replaces its directory and deletes the model. Compared where the
    paths really are, the output where the writer puts it, as :func:`check_inputs_outside` compares them. (A folder
    of adapters, a store, is a valid place: ``serve --adapter-store`` lists only the adapter directories in it.)

    Raises:
        OutputExistsError: naming the output and the adapter, before anything is written.
    """
    target = Path(target)
    written = Path(os.path.abspath(target))
    real = written.parent.resolve() / written.name
    for what, path in adapters:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in real.parents:
            raise OutputExistsError(f"{target}: is inside {what} {path}, an input of this command; writing the output "
                                    "there puts it in the adapter's own directory (saving the adapter again replaces "
                                    "that directory and deletes it): choose an output directory outside it")


def copied_link_problem(path: str | Path, directory: str | Path, what: str, copier: str) -> str | None:
    """Why the file ``path`` of the input ``directory`` may not be copied into an output, or None: the one rule for
    what a copied file may link to, used by every command that copies an input's files (an export's tokenizer and
    sentence-transformers files, a merge's other files).

    The file, once every link on the way is followed, must lie in ``directory``'s own tree (``directory`` itself
    resolved first, so a model directory given as a link to ``/data/models/x`` is that folder) or, for a directory in
    a Hugging Face cache snapshot (``.../models--org--name/snapshots/<rev>/...``, whose files are links to
    ``../../blobs/<hash>``), in that repository's folder ``.../models--org--name``. Anything else (a downloaded
    model's ``merges.txt`` linking to ``~/.aws/credentials``, a ``chat_template.jinja`` to ``../../secret``) would
    carry a file from elsewhere on this machine into an output that is then published or served.

    Args:
        path: the file in ``directory`` (lexically: ``directory / name``).
        directory: the input directory ``path`` is copied from.
        what: the input, for the message ("the model directory").
        copier: what copies it, for the message ("an export copies", "the merge copies").
    """
    root = Path(directory).resolve()
    try:
        target = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or a loop: refused by the readability checks, never copied
        return None
    allowed = [root, *(folder.parent.parent for folder in (root, *root.parents)
                       if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"))]
    if any(target == top or top in target.parents for top in allowed):
        return None
    inside = f"{what} {directory}" + (f" (or its Hugging Face cache repository {allowed[1]})" if len(allowed) > 1
                                      else "")
    return (f"{path}: links to {target}, outside {inside}; {copier} this file into its output, which would carry "
            f"that file's content with it: copy the file into {directory} in place of the link, or remove the link")


def _link_into(directory: Path, real: Path) -> Path | None:
    """A symbolic link under ``directory`` (not followed into) whose target lies in ``real``, if any."""
    seen = 0
    for current, dirs, files in os.walk(directory, followlinks=False):
        for name in (*dirs, *files):
            seen += 1
            if seen > _LINK_SCAN_LIMIT:
                return None
            path = Path(current, name)
            if path.is_symlink():
                try:
                    resolved = path.resolve()
                except (OSError, RuntimeError):  # a loop: it points at nothing there is to lose
                    continue
                if resolved == real or real in resolved.parents:
                    return path
    return None


#: The entries by which a directory is recognised as an output of a bca-deploy stage (name -> what leaves it), so
#: ``--overwrite`` may replace it. Files must be regular files, folders folders (a name alone is not enough).
OUTPUT_MARKERS: dict[str, str] = {
    "bca_export.json": "an ONNX export (export, demo's onnx-*)",
    "adapter_config.json": "an adapter (save_adapter, convert, a training checkpoint)",
    "bca_training.json": "a training checkpoint's record (train's best/ and last/)",
    "trainer_state.pt": "a training checkpoint's resumable state (train's last/)",
    "train_result.json": "a finished training run (train --out)",
    "train_log.jsonl": "a training run's log (train --out)",
}
#: A training run's checkpoint folders: recognised when they hold a checkpoint (a marker above).
_RUN_FOLDERS = ("last", "best")
#: The demo's layout (demo --out): recognised when one of its folders holds an output (a marker above) one
#: level down, as ``adapters/<task>/adapter_config.json`` and ``train/<task>/train_result.json`` do.
_DEMO_FOLDERS = ("adapters", "train")
#: Every entry ``demo --out`` writes at its top (besides ``onnx-*`` exports): a folder holding anything else is not one.
_DEMO_ENTRIES = frozenset({"adapters", "train", "data", "merged"})
#: A directory holding one of these is never replaced, whatever else it holds (a repository, a user's home).
_NEVER_REPLACED = (".git", ".hg", ".svn", ".ssh", ".bashrc", ".profile")
#: What a transformers checkpoint holds (a merge writes one): config.json beside one of these weights.
_CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")


def _marked(directory: Path, checkpoint: bool) -> bool:
    """Whether ``directory`` holds a bca-deploy stage's marker (or, with ``checkpoint``, is a transformers
    checkpoint); links are not followed (a link named like a marker does not make a folder an output)."""
    def is_file(path: Path) -> bool:
        return path.is_file() and not path.is_symlink()

    if any(is_file(directory / name) for name in OUTPUT_MARKERS):
        return True
    for name in _RUN_FOLDERS:
        folder = directory / name
        if folder.is_dir() and not folder.is_symlink() and any(is_file(folder / m) for m in OUTPUT_MARKERS):
            return True
    # the demo's layout counts only where nothing else is beside it: a project folder that keeps its runs under
    # train/<task>/ (helper-106: proj/{src, README.md, train/sst2/}) is not a demo's output
    demo_only = all(name in _DEMO_ENTRIES or name.startswith("onnx-") for name in os.listdir(directory))
    for name in _DEMO_FOLDERS if demo_only else ():
        folder = directory / name
        if folder.is_dir() and not folder.is_symlink() and any(
                sub.is_dir() and not sub.is_symlink() and any(is_file(sub / m) for m in OUTPUT_MARKERS)
                for sub in folder.iterdir()):
            return True
    return checkpoint and is_file(directory / "config.json") and any(is_file(directory / w) for w in _CHECKPOINT_WEIGHTS)


def replace_refusal(target: str | Path, *, checkpoint: bool = False) -> str | None:
    """Why ``--overwrite`` must not replace the directory ``target``, or None when it may.

    The one rule of every writer: an empty directory may be replaced, and so may an output of a bca-deploy
    stage (it holds an entry of :data:`OUTPUT_MARKERS`, or is a training run whose ``last/``/``best/`` holds
    one; with ``checkpoint``, a merge's output, a transformers checkpoint: ``config.json`` and weights). Anything
    else (a home directory, a project folder, a data folder, a folder holding ``.git``) is refused: replacing it
    would delete what the user keeps there.
    """
    target = Path(target)
    if target.is_symlink():
        return None  # the link is replaced, never what it points to
    try:
        entries = sorted(p.name for p in target.iterdir())
    except OSError:
        return None  # not a readable directory: the other checks name it
    if not entries:
        return None
    never = [name for name in _NEVER_REPLACED if name in entries]
    if not never and _marked(target, checkpoint):
        return None
    ours = {*OUTPUT_MARKERS, *_RUN_FOLDERS, *_DEMO_FOLDERS}
    shown = never + [name for name in entries if name not in ours and name not in never]
    listing = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
    why = (f"it holds {never[0]}" if never else "it is not an output of bca-deploy (none of "
           f"{', '.join(OUTPUT_MARKERS)} in it)")
    return (f"{target}: --overwrite (overwrite=True in Python) replaces only an empty directory or an earlier "
            f"bca-deploy output, and {why}; in it, not from bca-deploy: {listing}. Nothing was written: choose an "
            "empty or new output directory, or remove this one yourself")


def check_target(target: str | Path, overwrite: bool, *, checkpoint: bool = False) -> None:
    """Refuse a ``target`` that cannot be written: a file, a non-empty directory without ``overwrite``, or one
    that ``overwrite`` may not replace (:func:`replace_refusal`; ``checkpoint``: the writer writes a transformers
    checkpoint, and may replace one).

    Raises:
        OutputExistsError: naming ``target`` and the fix.
    """
    target = Path(target)
    for parent in Path(os.path.abspath(target)).parents:  # the nearest one that exists must be a directory
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                what = "a symbolic link to nothing" if not parent.exists() else "a file, not a directory"
                raise OutputExistsError(f"{target}: {parent} is {what}; choose an output path whose parent "
                                        "directories are directories")
            break
    if target.is_symlink() and not target.is_dir():
        raise OutputExistsError(f"{target}: is a symbolic link to something that is not a directory; remove it first")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target}: exists and is not a directory")
    if target.is_dir() and os.path.ismount(target):  # renaming the new tree onto it fails (EBUSY) once all is built
        raise OutputExistsError(f"{target}: is a mount point, which cannot be replaced (an output is built beside it "
                                f"and renamed into place); choose a directory inside it, such as {target / 'out'}")
    if target.is_dir() and not overwrite and not _is_empty_dir(target):
        raise OutputExistsError(f"{target}: exists and is not empty; pass --overwrite (overwrite=True in Python) to replace it")
    if target.is_dir() and not _is_empty_dir(target):
        refusal = replace_refusal(target, checkpoint=checkpoint)
        if refusal is not None:
            raise OutputExistsError(refusal)
    if target.is_dir() and not target.is_symlink() and not _is_empty_dir(target):
        blocker = _removal_blocker(target)
        if blocker is not None:
            raise OutputExistsError(f"{target}: cannot be replaced: {blocker}; nothing was written. Fix the "
                                    "permissions or choose another output directory")


def _removal_blocker(target: Path) -> str | None:
    """Why this user could not move ``target`` aside and delete its old tree (which replacing it does), or None.

    Checked before anything is written: otherwise the new tree goes in place and the old one stays behind as a
    hidden, half-deleted sibling. Each directory of the tree must be readable, writable and searchable (to list
    and delete its entries); in a sticky parent (``/tmp``), ``target`` must be this user's (or the parent's).
    """
    parent = target.parent
    try:
        info, parent_info = target.lstat(), parent.stat()
    except OSError:
        return None  # gone meanwhile: nothing to remove
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    if (euid not in (None, 0) and parent_info.st_mode & stat.S_ISVTX
            and euid not in (info.st_uid, parent_info.st_uid)):
        return f"it belongs to another user and {parent} is a sticky directory"
    needed = os.R_OK | os.W_OK | os.X_OK  # list it, delete its entries
    if not os.access(target, needed):
        return f"{target} is not readable and writable by this user, so its old contents could not be removed"
    for current, dirs, _ in os.walk(target, followlinks=False):  # os.walk yields only what it could list
        for name in dirs:
            path = os.path.join(current, name)
            if not os.path.islink(path) and not os.access(path, needed):
                return f"{path} is not readable and writable by this user, so its old contents could not be removed"
    return None


def _owner_alive(name: str, tag: str) -> bool:
    """Whether the process that created ``.<x><tag><pid>-<hex>`` still runs (ours counts as alive)."""
    try:
        pid = int(name.rsplit(tag, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# What each writer's sibling names end with, exactly (anything else beside the target is the user's, never touched):
# ours ``<pid>-<12 hex>`` (see _sibling); before 0.2, tempfile.mkdtemp's 8 characters and ``.old-<8 hex>``.
_SUFFIX = {TMP_TAG: r"\d+-[0-9a-f]{12}", OLD_TAG: r"\d+-[0-9a-f]{12}", ".tmp-": r"[a-z0-9_]{8}",
           ".merging-": r"[a-z0-9_]{8}", ".old-": r"[0-9a-f]{8}"}


def _leftovers(target: Path, tag: str) -> list[Path]:
    """Siblings ``.<target name><tag><suffix>`` that a bca-deploy writer of ``target`` made: the exact name
    format and, for the looser names of writers before 0.2, a directory (all they made)."""
    pattern = glob.escape(str(target.parent / f".{target.name}{tag}")) + "*"
    shape = re.compile(re.escape(f".{target.name}{tag}") + _SUFFIX[tag])
    legacy = tag not in (TMP_TAG, OLD_TAG)
    return [Path(p) for p in glob.glob(pattern) if shape.fullmatch(os.path.basename(p))
            and not (legacy and (os.path.islink(p) or not os.path.isdir(p)))]


def recover(target: str | Path) -> Path | None:
    """Clean up after writers of ``target`` that were killed; return ``target`` if it exists then.

    Temporary trees of dead writers are deleted. A tree set aside by a dead writer is renamed back to
    ``target`` when ``target`` is missing (the swap never finished: the old tree is restored), and is
    deleted otherwise. Leftovers of live writers are not touched.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return None
    for tmp in _leftovers(target, TMP_TAG):
        if not _owner_alive(tmp.name, TMP_TAG):
            _remove(tmp)
    asides = [p for p in _leftovers(target, OLD_TAG) if not _owner_alive(p.name, OLD_TAG)]
    # Writers before bca-deploy 0.2 left ".<name>.tmp-*" / ".<name>.merging-*" trees and ".<name>.old-*/<name>".
    for tag in _LEGACY_TMP_TAGS:
        for tmp in _leftovers(target, tag):
            _remove(tmp)
    holders = [h for h in _leftovers(target, _LEGACY_OLD_TAG) if (h / target.name).is_dir()]  # the old layout
    for holder in holders:
        if not _exists(target):
            asides.append(holder / target.name)
        else:
            _remove(holder)
    asides.sort(key=lambda p: p.lstat().st_mtime)
    if asides and not _exists(target):
        newest = asides.pop()
        if not _renameat2(newest, target, _RENAME_NOREPLACE):
            os.rename(newest, target)
        _fsync_dir(target.parent)
    for aside in asides:
        _remove(aside)
    for holder in holders:
        if holder.exists():
            _remove(holder)
    return target if _exists(target) else None


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every directory, deepest first."""
    dirs = []
    for current, _, files in os.walk(root):
        dirs.append(current)
        for name in files:
            path = os.path.join(current, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for current in reversed(dirs):
        _fsync_dir(Path(current))


def _carry_over(old: Path, new: Path) -> None:
    """Copy into ``new`` every entry of ``old`` that ``new`` does not have (hard links where possible)."""
    for entry in old.iterdir():
        dest = new / entry.name
        if _exists(dest):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _install(tmp: Path, target: Path, overwrite: bool, fsync: bool, checkpoint: bool = False) -> None:
    if fsync:
        _fsync_tree(tmp)
    if _is_empty_dir(target):
        os.rename(tmp, target)  # rename(2) replaces an empty directory in one step
        if fsync:
            _fsync_dir(target.parent)
        return
    if not _exists(target):
        try:
            if not _renameat2(tmp, target, _RENAME_NOREPLACE):
                os.rename(tmp, target)
            if fsync:
                _fsync_dir(target.parent)
            return
        except FileExistsError:
            pass  # created meanwhile by someone else
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if not overwrite:
            raise OutputExistsError(f"{target}: was created by someone else while this was written; nothing replaced")
    elif not overwrite:
        raise OutputExistsError(f"{target}: exists and is not empty; pass --overwrite (overwrite=True in Python) to replace it")
    refusal = replace_refusal(target, checkpoint=checkpoint)  # again: it may have changed while the tree was built
    if refusal is not None:
        raise OutputExistsError(refusal)
    if USE_EXCHANGE and _renameat2(tmp, target, _RENAME_EXCHANGE):
        # One atomic step: target is the new tree, tmp the old one.
        if fsync:
            _fsync_dir(target.parent)
        _remove(tmp)
        return
    aside = _sibling(target, OLD_TAG)
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    if fsync:
        _fsync_dir(target.parent)
    _remove(aside)


class AtomicDir:
    """A directory built beside ``target`` and put in place by :meth:`commit` (or dropped by :meth:`abort`).

    For writes that span more than one block of code (a training run staged until its first checkpoint);
    as a context manager it commits when the block succeeds and aborts when it raises::

        with AtomicDir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text(...)

    On creation, leftovers of killed writers of ``target`` are cleaned up (:func:`recover`) and ``target``
    is checked (:func:`check_target`).

    Args:
        target: the directory to create or replace.
        overwrite: replace a non-empty ``target`` (an empty directory is always replaced).
        keep_existing: with an existing ``target``, carry over its entries the new tree does not
            write (hard links, else copies), e.g. other files beside an adapter.
        fsync: fsync every file and directory before the swap, and the parent after it.
        checkpoint: the writer writes a transformers checkpoint (merge), and ``overwrite`` may replace one
            (:func:`replace_refusal`).

    Attributes:
        path: the temporary directory to fill (same filesystem as ``target``, mode ``0o777 & ~umask``).
        target: the absolute ``target``.
    """

    def __init__(self, target: str | Path, *, overwrite: bool = False, keep_existing: bool = False,
                 fsync: bool = True, checkpoint: bool = False) -> None:
        self.target = Path(os.path.abspath(target))
        self.overwrite, self.keep_existing, self.fsync, self.checkpoint = overwrite, keep_existing, fsync, checkpoint
        recover(self.target)
        check_target(self.target, overwrite, checkpoint=checkpoint)
        self.path: Path | None = None
        path = _sibling(self.target, TMP_TAG)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path)  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
        except OSError as exc:  # named by the output the user gave, not by the hidden sibling
            raise OSError(exc.errno, f"{self.target}: cannot write the output there ({exc.strerror})") from None
        self.path = path

    def commit(self) -> Path:
        """Put the built tree at ``target`` (atomically, see the module docstring); returns ``target``."""
        if self.path is None:
            raise RuntimeError(f"{self.target}: this AtomicDir was already committed or aborted")
        try:
            if self.keep_existing and self.target.is_dir():
                _carry_over(self.target, self.path)
            _install(self.path, self.target, self.overwrite, self.fsync, self.checkpoint)
        except BaseException:
            self.abort()
            raise
        self.path = None
        return self.target

    def abort(self) -> None:
        """Drop the temporary tree; ``target`` is untouched."""
        if self.path is not None:
            _remove(self.path)
            self.path = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_dir(
    target: str | Path, *, overwrite: bool = False, keep_existing: bool = False, fsync: bool = True,
    checkpoint: bool = False,
) -> AtomicDir:
    """``with atomic_dir(target, overwrite=...) as tmp: ...``: fill ``tmp``; it replaces ``target`` when the
    block succeeds, and is deleted (``target`` untouched) when it raises. See :class:`AtomicDir`."""
    return AtomicDir(target, overwrite=overwrite, keep_existing=keep_existing, fsync=fsync, checkpoint=checkpoint)


def write_dir(
    target: str | Path,
    build: Callable[[Path], None],
    *,
    overwrite: bool = False,
    keep_existing: bool = False,
    fsync: bool = True,
) -> Path:
    """Call ``build(tmp)`` to fill a temporary directory, then put it at ``target`` atomically.

    See :func:`atomic_dir` for the arguments; returns ``target``.
    """
    with atomic_dir(target, overwrite=overwrite, keep_existing=keep_existing, fsync=fsync) as tmp:
        build(tmp)
    return Path(target)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to the file ``path`` whole or not at all: a hidden sibling is written, then renamed
    over it, so a Ctrl-C, SIGTERM or kill mid-write leaves the earlier file (for files a run rewrites in place:
    its result and log). No fsync: a power cut may lose the new text, never mix the two."""
    path = Path(path)
    tmp = _sibling(path, TMP_TAG)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
