"""Checkpoint and run directories written so that a kill at any instant loses nothing the user had.

Checkpoints (``out/last``, ``out/best``) are written by bca-deploy's one atomic directory writer
(:mod:`bca_deploy.atomic`): built in a temporary sibling, fsynced, and swapped in, so ``last`` is the previous
checkpoint or the new one at every instant. A whole training run is built the same way
(:class:`RunDirectory`): until its first checkpoint it lives in the writer's hidden temporary sibling of
``--out``, and only then replaces what ``--out`` held, so an earlier run there stays intact until the new one
has a checkpoint, and a run killed before that leaves ``--out`` as it was. Leftovers of killed writers are
cleaned up (or an interrupted swap restored) by the next run into the same place (:func:`recover_dir`).

The trainer state (``trainer_state.pt``) holds plain tensors, numbers, strings, lists and dicts only,
saved with ``torch.save`` and read with ``torch.load(weights_only=True)`` (no arbitrary unpickling):
the exact fp32 trainable parameters, optimizer and scheduler state, every rank's RNG states, the data
position and the run's options. A damaged state is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..atomic import atomic_dir, check_target, recover, write_dir
from ..errors import first_line, format_problems, open_regular
from .errors import CheckpointError, TrainingConfigError

#: The dtypes of the values training writes (its parameters' floating-point types), by their safetensors names.
TRAINED_DTYPES = ("F32", "F16", "BF16", "F64")


def trained_value_problems(tensors: Mapping[str, Any]) -> list[str]:
    """One line for each tensor to be restored into a model's parameters that is not what training writes: the rule
    of a resume's trainer state (``last/trainer_state.pt``) and of evaluate's ``trainable_parameters.safetensors``.

    ``tensors`` maps names to tensors read (``torch.Tensor``: dtype and values checked) or to header entries not read
    yet (anything with a safetensors ``dtype`` string, such as :class:`bca_deploy.merge.TensorInfo`: dtype only, so
    that a file is refused before its data is read). A dtype other than :data:`TRAINED_DTYPES` is refused (integers
    were cast into the parameters silently, truncated; float8 values lost all but a few bits), and so are NaN/Inf
    values (trained on, the run was then said to diverge; evaluated, a NaN loss printed beside an accuracy).
    """
    from ..merge import safetensors_dtype_name

    problems = []
    for name, tensor in tensors.items():
        read = isinstance(tensor, torch.Tensor)
        dtype = safetensors_dtype_name(tensor.dtype) if read else str(tensor.dtype)
        if dtype not in TRAINED_DTYPES:
            problems.append(f"{name}: dtype {dtype}, expected floating-point values ({', '.join(TRAINED_DTYPES[:-1])} "
                            f"or {TRAINED_DTYPES[-1]})")
        elif read and not bool(torch.isfinite(tensor).all()):
            problems.append(f"{name}: holds NaN/Inf values")
    return problems

__all__ = [
    "STATE_FILE",
    "write_dir_atomically",
    "recover_dir",
    "RunDirectory",
    "save_state",
    "load_state",
    "rng_state",
    "set_rng_state",
]

STATE_FILE = "trainer_state.pt"
STATE_VERSION = 1
LOG_FILE = "train_log.jsonl"
RESULT_FILE = "train_result.json"
#: What a run writes at the top of ``--out``: what ``--overwrite`` replaces. Anything else there is the user's (notes,
#: an export put beside the run) and is carried into the new run's directory, as HF Trainer's overwrite_output_dir
#: leaves it.
RUN_ENTRIES = frozenset({"best", "last", LOG_FILE, RESULT_FILE})


def write_dir_atomically(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Build a directory with ``build(tmp_dir)`` and put it at ``target`` (replacing it) atomically.

    :func:`bca_deploy.atomic.write_dir` with ``overwrite=True``, kept here for the trainer.
    """
    return write_dir(target, build, overwrite=True)


def recover_dir(target: str | Path) -> Path | None:
    """Return ``target`` if it exists after cleaning up killed writers (:func:`bca_deploy.atomic.recover`)."""
    return recover(target)


def _check_writable_run(out: Path) -> None:
    """Refuse to resume into a run this user could not write its next checkpoint and log lines into, before
    any step is trained (otherwise the steps up to the first checkpoint are lost)."""
    if not os.access(out, os.R_OK | os.W_OK | os.X_OK):
        raise TrainingConfigError(f"--out {out}: --resume cannot write there (permission denied); the run's "
                                  "checkpoints and train_log.jsonl are written in it")
    check_target(out / "last", overwrite=True)  # the next checkpoint replaces last/


class RunDirectory:
    """Where a training run writes: ``--out`` itself (resume), or a staging directory until the first checkpoint.

    A fresh run and an ``--overwrite`` run write into ``.<out>.run-*`` beside ``--out``;
    :meth:`first_checkpoint_written` swaps it into place, so an earlier run in ``--out`` stays intact until
    the new one has a checkpoint, and a run killed earlier leaves ``--out`` as it was. A lock file beside
    ``--out`` keeps a second run from using the same ``--out`` at the same time.

    Open it with :meth:`open`, which also enforces the rules for a non-empty ``--out``.
    """

    def __init__(self, out: Path, lock: Any, staging: contextlib.ExitStack | None = None,
                 staging_path: Path | None = None) -> None:
        self.out = out
        self._stack = staging  # holds the atomic writer's context until the first checkpoint
        self.staging = staging_path
        self._lock = lock
        self._lock_path = out.parent / f".{out.name}.lock"

    @classmethod
    def open(cls, out: str | Path, resume: bool, overwrite: bool) -> RunDirectory:
        """Lock ``out``, repair an interrupted swap, and check it may be used.

        Raises:
            OutputExistsError: ``out`` is not empty and neither ``resume`` nor ``overwrite`` is set.
            CheckpointError: ``resume`` but ``out`` holds nothing resumable (the message says what is missing).
            TrainingConfigError: ``out`` is a file, or another run holds the lock.
        """
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise TrainingConfigError(f"--out {out}: exists and is not a directory")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise TrainingConfigError(f"--out {out}: a parent of it is a file, not a directory; choose an output "
                                      "path whose parent directories are directories") from None
        except OSError as exc:
            raise TrainingConfigError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
        lock_path = out.parent / f".{out.name}.lock"
        try:
            lock = open(lock_path, "w")
        except OSError as exc:  # the lock lives beside --out (so a swap of --out keeps it): its parent must be writable
            raise TrainingConfigError(f"--out {out}: cannot create the run's lock file {lock_path} beside it "
                                      f"({exc.strerror or exc}); {out.parent} must be writable by this user") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise TrainingConfigError(f"--out {out}: another training run is writing there now") from None
        try:
            recover(out)
            if out.is_dir():
                recover(out / "last")
            contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            if resume:
                _check_resumable(out, contents)
                _check_writable_run(out)
                return cls(out, lock, None)
            if contents and not overwrite:
                from ..errors import OutputExistsError

                raise OutputExistsError(
                    f"--out {out} is not empty ({_listing(contents)}); pass --resume to continue the run there, "
                    "--overwrite to replace it (the earlier run is kept until the new one writes its first "
                    "checkpoint), or choose another --out"
                )
            stack = contextlib.ExitStack()
            staging = stack.enter_context(atomic_dir(out, overwrite=True))
        except BaseException:
            cls(out, lock).close()
            raise
        return cls(out, lock, stack, staging)

    @property
    def path(self) -> Path:
        """The directory to write into now."""
        return self.staging if self.staging is not None else self.out

    def first_checkpoint_written(self) -> None:
        """Put the run in place of ``--out`` (replacing an earlier run there); later writes go to ``--out``."""
        if self._stack is None:
            return
        _carry_other_entries(self.out, self.staging)
        stack, self._stack, self.staging = self._stack, None, None
        stack.close()  # the atomic writer installs the staged tree (an exchange on Linux)

    def close(self) -> None:
        """Drop a staging directory that never reached a checkpoint, and release the lock."""
        if self._stack is not None:
            stack, self._stack, self.staging = self._stack, None, None
            with contextlib.suppress(_Abandoned):
                stack.__exit__(_Abandoned, _Abandoned(), None)  # the writer deletes its temporary tree
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock_path.unlink()  # while still held, so no other run is between open and lock
            self._lock.close()
            self._lock = None


def _carry_other_entries(out: Path, staging: Path) -> None:
    """Put what an earlier ``out`` holds besides a run's own entries (:data:`RUN_ENTRIES`) into the new run's
    ``staging`` tree before it replaces ``out``: files hard-linked (no data copied, same file system: the staging tree
    is beside ``out``; copied where a link is refused), folders rebuilt around them, links kept as links. The
    originals stay in ``out`` until the swap, so a kill before it loses nothing."""
    if not out.is_dir() or out.is_symlink():
        return

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(source, target, follow_symlinks=False)

    for entry in sorted(out.iterdir()):
        target = staging / entry.name
        if entry.name in RUN_ENTRIES or os.path.lexists(target):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, target, symlinks=True, copy_function=link_or_copy)
            else:
                link_or_copy(str(entry), str(target))
        except (OSError, shutil.Error) as exc:  # before the swap: nothing of the earlier run or of the user's is lost
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            raise TrainingConfigError(
                f"--out {out}: cannot carry {entry.name} into the new run's directory ({reason}); the earlier run "
                f"and everything else in --out are kept as they were: move {entry.name} out of --out, or make it "
                "readable, and run again") from None


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"holds {shown}" + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_resumable(out: Path, contents: list[str]) -> None:
    """Raise :class:`CheckpointError` saying what is missing when ``out`` holds no resumable run."""
    start_fresh = "run without --resume to start a new run"
    if not out.is_dir():
        raise CheckpointError(f"--resume: {out} does not exist, so there is no run to continue; {start_fresh}")
    if "last" not in contents:
        what = _listing(contents) if contents else "is empty"
        raise CheckpointError(f"--resume: {out} has no checkpoint to continue (no last/ directory; it {what}); "
                              f"{start_fresh}, or --overwrite to replace what is there")
    if not (out / "last" / STATE_FILE).is_file():
        raise CheckpointError(f"--resume: {out / 'last'} has no {STATE_FILE} (it holds "
                              f"{', '.join(sorted(p.name for p in (out / 'last').iterdir())) or 'nothing'}); "
                              "pass --overwrite to start the run over")


class _Abandoned(Exception):
    """Raised into the atomic writer to make it drop a run that never reached its first checkpoint."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, every CUDA device, Python's ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_python_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save({"version": STATE_VERSION, **state}, directory / STATE_FILE)


# key -> (type, what it is) of every entry a trainer state must hold
_STATE_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "version": (int, "an integer"),
    "step": (int, "an integer"),
    "micro_step": (int, "an integer"),
    "run_config": (dict, "a mapping"),
    "trainable": (dict, "a mapping of tensors"),
    "optimizer": (dict, "a mapping"),
    "scheduler": (dict, "a mapping"),
    "rng": (list, "a list"),
    "history_json": (str, "a string"),
}


def _archive_problem(handle: BinaryIO) -> str | None:
    """Why the open ``handle`` is not a zip archive as ``torch.save`` writes it (None: it is one), from its directory
    alone: every member stored as it is, and no more bytes in them than the file holds. ``torch.load`` expands a
    compressed member in memory whatever the tensor it holds declares: a 973 KB file of one deflated 1 GB member took
    1.2 GB to load before any check (``weights_only`` stops code, not size). The handle is left at its start."""
    size = os.fstat(handle.fileno()).st_size
    try:
        with zipfile.ZipFile(handle) as archive:  # a passed handle stays open
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        return f"not a zip archive as torch.save writes ({first_line(exc)})"
    finally:
        handle.seek(0)
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.file_size != member.compress_size:
            return (f"member {member.filename[:200]!r} is compressed ({member.compress_size:,} bytes that expand to "
                    f"{member.file_size:,}); torch.save stores every member as it is")
    if sum(m.file_size for m in members) > size:
        return f"its members claim more bytes than the file's {size:,}"
    return None


def load_state(directory: Path) -> dict[str, Any]:
    """Read and check ``directory/trainer_state.pt``.

    Raises:
        CheckpointError: the file is missing, not a regular file, not a zip archive as torch.save writes it (a
            compressed member is refused before anything is expanded: :func:`_archive_problem`), holds something
            other than plain data (``weights_only`` refuses it), or lacks an entry the trainer needs.
    """
    path = directory / STATE_FILE
    fix = "pass --overwrite to start the run over (the damaged checkpoint is replaced only once the new run " \
          "has written its first one)"
    if not path.is_file():
        raise CheckpointError(f"{path}: no trainer state to resume from; {fix}")
    try:  # opened once, as a regular file without blocking (a named pipe swapped in since the look is refused)
        with open_regular(path) as handle:
            problem = _archive_problem(handle)
            if problem:
                raise CheckpointError(f"{path}: cannot read the trainer state ({problem}); {fix}")
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for a damaged file
        raise CheckpointError(f"{path}: cannot read the trainer state ({first_line(exc)}); {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the trainer state is {type(state).__name__}, expected a mapping; {fix}")
    problems = []
    for key, (kind, what) in _STATE_KEYS.items():
        if key not in state:
            problems.append(f"{key!r} is missing")
        elif not isinstance(state[key], kind) or isinstance(state[key], bool):
            problems.append(f"{key!r} is {type(state[key]).__name__}, expected {what}")
    if not problems:
        if state["version"] != STATE_VERSION:
            problems.append(f"'version' is {state['version']}, this bca-deploy reads {STATE_VERSION}")
        if state["step"] < 0 or state["micro_step"] < 0:
            problems.append("'step' and 'micro_step' must be >= 0")
        bad = [k for k, v in state["trainable"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            problems.append(f"'trainable' holds entries that are not named tensors: {bad[:5]}")
    if problems:
        raise CheckpointError(format_problems(f"{path}: the trainer state is damaged; {fix}:", problems))
    return state
