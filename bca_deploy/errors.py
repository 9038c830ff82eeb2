"""The error hierarchy. Every error subclasses a built-in so callers can catch it the usual way.

Messages name the thing (module path, tensor, shape, file), what came in, what was expected, and
the fix; validators collect every failure and report them together.
"""

from __future__ import annotations

import re

from typing import BinaryIO

__all__ = [
    "BCAError",
    "ExportFileError",
    "BlockSizeError",
    "TargetModuleError",
    "AdapterFormatError",
    "AdapterMismatchError",
    "OutputExistsError",
    "InputNotFoundError",
    "NonFiniteError",
    "UnknownAdapterError",
    "AdapterNameError",
    "ServingError",
    "ContextLengthError",
    "AdapterExistsError",
    "CheckpointFormatError",
    "InvalidOptionError",
    "MissingExtraError",
    "format_problems",
    "first_line",
    "open_regular",
    "read_at_most",
    "require_readable",
]


class BCAError(Exception):
    """Base class of every error bca-deploy raises on purpose.

    ``reported_by_first_process``: set on a process of a distributed run (torchrun) other than rank 0 when rank 0
    raises the same refusal: the CLI prints it once, from rank 0, rather than once per process.
    """

    reported_by_first_process = False


class BlockSizeError(BCAError, ValueError):
    """A block size does not divide a target module's dimensions."""


class TargetModuleError(BCAError, ValueError):
    """A target-module pattern matched nothing, or matched a module that cannot be adapted."""


class AdapterFormatError(BCAError, ValueError):
    """An adapter directory or config is malformed (missing file, bad JSON, unknown version...)."""


class AdapterMismatchError(BCAError, ValueError):
    """An adapter does not fit the model or checkpoint it is applied to."""


class NonFiniteError(BCAError, ValueError):
    """NaN or Inf found in kernels or in a merged weight."""


class OutputExistsError(BCAError, FileExistsError):
    """An output path exists and overwriting was not asked for."""


class InputNotFoundError(BCAError, FileNotFoundError):
    """An input directory or file does not exist (a model, an adapter, an adapter store)."""


class UnknownAdapterError(BCAError, KeyError):
    """A request names an adapter that is not loaded."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterNameError(BCAError, ValueError):
    """An adapter name is not allowed (characters, length, reserved, outside the adapter store), is taken,
    or names no adapter the model holds (library calls; serving requests get :class:`UnknownAdapterError`)."""


class MissingExtraError(BCAError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra that installs it."""


class ServingError(BCAError, RuntimeError):
    """A serving runtime cannot do what was asked (wrong kind of graph, task, or request)."""


class ExportFileError(ServingError):
    """A file of the served export is missing, damaged or not the one the export wrote (an adapter file whose size or
    sha256 differs from the record). The operator's export is at fault, not the request: a server answers 500."""


class ContextLengthError(ServingError, ValueError):
    """A prompt (plus the new tokens asked for) longer than the model's positions: a request whose values
    cannot be served (HTTP 400 ``context_length_exceeded``, as OpenAI and vLLM answer it). ``param`` names the
    request field to change."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdapterExistsError(ServingError, ValueError):
    """A load of an adapter name that is loaded already (without ``replace``): HTTP 409."""


class CheckpointFormatError(BCAError, ValueError):
    """A model directory or safetensors file is malformed or not a transformers safetensors checkpoint."""


class InvalidOptionError(BCAError, ValueError):
    """An option or argument has a value it does not accept (the message names it and the accepted values)."""


def format_problems(header: str, problems: list[str], limit: int = 50) -> str:
    """One message listing every problem found, most important first, capped at ``limit`` lines."""
    lines = [header]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for a one-line error naming the cause: its first non-empty line, cut at
    ``limit`` characters, else the exception's type (for exceptions raised without a message)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__


# onnxruntime's messages open with its source location and the C++ signature of the function that threw
# ("/onnxruntime_src/.../adapter_format_utils.cc:93 const onnxruntime::...::F(gsl::span<const unsigned char>) The
# buffer does not appear to be..."): cut at a length, the reason was lost behind them.
_ORT_LOCATION = re.compile(r"^(?:\[ONNXRuntimeError\] : \d+ : \w+ : )?\S+\.(?:cc|cpp|h):\d+ (?:[^()]*\([^()]*\)(?: const)? )?")


def onnxruntime_reason(exc: BaseException, limit: int = 300) -> str:
    """An onnxruntime exception's reason for a one-line error: :func:`first_line` without its source location and
    C++ signature."""
    return _ORT_LOCATION.sub("", first_line(exc, limit=10_000), count=1)[:limit] or type(exc).__name__


def printable(text: str) -> str:
    """``text`` for a terminal: every character that is not printable (escape sequences that retitle the terminal
    or recolour it, carriage returns and line breaks that forge output lines) shown as its escape (``\\x1b``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def open_regular(path: object) -> BinaryIO:
    """``path`` opened for reading in binary, once it is known to be a regular file (symbolic links followed) this
    user may read: before a library reads it and misreports the problem (safetensors says "No such file or
    directory", onnxruntime "Invalid fd" or a parse failure) or blocks on it forever (a named pipe nobody writes to).

    Raises:
        OSError: naming the path: ``FileNotFoundError``/``PermissionError`` as the system says them, or, for anything
            that is not a regular file, what it is (``IsADirectoryError`` for a directory; ``errno.EINVAL`` with
            "a named pipe (FIFO), not a regular file" and the like for pipes, sockets and devices). Nothing is opened
            before the file's type is known, and the file is opened without blocking (then checked again: a FIFO
            swapped in after the first look is refused, not waited on).
    """
    import errno
    import os
    import stat

    def refuse(mode: int) -> None:
        if stat.S_ISREG(mode):
            return
        what = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "not a file")
        code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
        raise OSError(code, f"{what}, not a regular file", os.fspath(path))

    refuse(os.stat(path).st_mode)  # before opening: opening a FIFO blocks, opening a device may do anything
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        refuse(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_at_most(handle: BinaryIO, limit: int) -> bytes:
    """What is left of ``handle``, but no more than ``limit`` + 1 bytes (one more than ``limit``: the caller tells a
    file over its bound by the length), read in pieces of at most 1 MiB: ``handle.read(limit + 1)`` sets aside
    ``limit`` + 1 bytes before it reads one (16 MiB for a 2 KB config.json under a 16 MiB bound)."""
    pieces, total = [], 0
    while total <= limit:
        piece = handle.read(min(1 << 20, limit + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


def require_readable(path: object) -> None:
    """Refuse ``path`` unless it is a regular file this user may read (:func:`open_regular`, closed again)."""
    open_regular(path).close()


def why_not_readable(path: object) -> str:
    """Why :func:`require_readable` refuses ``path`` ("a directory, not a regular file", "Permission denied"), for a
    message that says what the thing given is rather than "no such file"; "a regular file" when it is one."""
    try:
        require_readable(path)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return "a regular file"
