"""Checkpoint directories written atomically, and the trainer state that makes a resume exact.

A checkpoint is a directory (``out_dir/last``, ``out_dir/best``) built in a temporary directory beside
it and swapped in with ``os.replace``. Replacing a non-empty directory takes two renames (old → aside,
new → in place); a crash between them leaves the previous checkpoint under ``.<name>.old-*``, which
:func:`recover_dir` puts back. A crash while the temporary directory is being written leaves the
previous checkpoint untouched.

The trainer state (``trainer_state.pt``) holds plain tensors, numbers, strings, lists and dicts only,
saved with ``torch.save`` and read with ``torch.load(weights_only=True)`` (no arbitrary unpickling):
the exact fp32 trainable parameters, optimizer and scheduler state, every rank's RNG states, the data
position and the run's options.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "STATE_FILE",
    "write_dir_atomically",
    "recover_dir",
    "save_state",
    "load_state",
    "rng_state",
    "set_rng_state",
]

STATE_FILE = "trainer_state.pt"
STATE_VERSION = 1


def write_dir_atomically(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Build a directory with ``build(tmp_dir)`` and move it to ``target`` (replacing it) atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        _fsync_dir_files(tmp)
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, aside / target.name)  # aside/<name>: os.replace onto an empty dir is refused
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def recover_dir(target: str | Path) -> Path | None:
    """Return ``target`` if it exists; else restore the newest copy left aside by an interrupted swap.

    Stale temporary directories (``.<name>.tmp-*``) from an interrupted write are removed.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return None
    for stale in parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    asides = sorted(parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and asides and (asides[-1] / target.name).is_dir():
        os.replace(asides[-1] / target.name, target)
    for aside in parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(aside, ignore_errors=True)
    return target if target.exists() else None


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


def load_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
