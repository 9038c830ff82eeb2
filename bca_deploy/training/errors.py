"""Errors the trainer raises before the first step, on top of :mod:`bca_deploy.errors`.

Each subclasses :class:`bca_deploy.errors.BCAError` and a built-in (``ValueError``, and
``FileNotFoundError`` for a missing file) so callers catch them the usual way and the CLI prints them as
one clean message. Validators collect every problem and raise once (see
:func:`bca_deploy.errors.format_problems`).
"""

from __future__ import annotations

from ..errors import BCAError

__all__ = ["DataError", "DataFileNotFoundError", "TrainingConfigError", "CheckpointError", "TrainingDivergedError",
           "PeerFailedError", "TrainingTerminated"]


class DataError(BCAError, ValueError):
    """A data file cannot be used: unknown format, missing column, empty, bad or out-of-range label."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file does not exist."""


class TrainingConfigError(BCAError, ValueError):
    """An option of :func:`bca_deploy.training.train` / :func:`evaluate` is invalid or inconsistent."""


class CheckpointError(BCAError, ValueError):
    """A training checkpoint cannot be resumed: missing, damaged, or written by a run with other options."""


class TrainingDivergedError(TrainingConfigError, FloatingPointError):
    """The training loss became NaN or infinite: the options (learning rate, clipping) made the run diverge.
    The checkpoints written before it are kept."""


class PeerFailedError(BCAError, RuntimeError):
    """Another process of a distributed run (torchrun, accelerate) stopped: killed, out of memory, or failed with its
    own error, which it and the launcher report. This process stops too, saying what ``--out`` holds."""


class TrainingTerminated(KeyboardInterrupt):
    """A training run was sent SIGTERM (``kill``, a scheduler's pre-emption, ``docker stop``) or SIGHUP (its terminal
    or SSH session closed): raised where the run was, like Ctrl-C's ``KeyboardInterrupt``, so the run unwinds as it
    does for Ctrl-C (an unfinished staging directory is removed, the lock released; ``last/`` keeps the latest
    checkpoint). The CLI exits with 128 + the signal's number (143, 129), as a shell reports a program the signal
    killed."""

    def __init__(self, signal_number: int = 15) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signal_number).name
        except ValueError:
            return f"signal {self.signal_number}"
