"""``AdapterStore``: adapter directories under one root, addressed by name, never by path.

A server loads adapters by name from its store (``<root>/<name>/``). Everything in an entry is
resolved and must stay inside the store: the name is checked against
:data:`~bca_deploy.serving.session.ADAPTER_NAME_PATTERN` (one path component, no ``..``), the entry
directory with symbolic links followed must lie inside the root, and so must every file and folder in
it (a ``adapter_config.json`` that is a link to ``/etc/passwd`` is refused before it is opened).
Errors name the adapter, never the store's location, and never list the store's other entries.

A server reads an entry through :meth:`AdapterStore.snapshot`: a private copy of the files the reader opens,
taken with ``read`` (never a memory map: a file truncated under a map kills the process with SIGBUS), each
file opened without blocking (a named pipe swapped in is refused, not waited on) from one open handle of the
entry's directory, and checked unchanged from start to end (a file written or replaced meanwhile is read
again), so a load sees one state of the entry: the old adapter or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..config import (
    CONFIG_FILE,
    MAX_JSON_BYTES,
    WEIGHTS_FILE,
    nested_adapters,
    nested_adapters_hint,
    run_adapter_dir,
)
from ..errors import AdapterFormatError, AdapterNameError, InputNotFoundError, UnknownAdapterError
from .session import check_adapter_name

__all__ = ["AdapterStore", "MAX_ENTRY_FILES", "LISTING_TTL_S", "SNAPSHOT_TRIES", "redact_roots"]

#: The most files and folders one store entry may hold (an adapter directory has two or three).
MAX_ENTRY_FILES = 64
#: How long :meth:`AdapterStore.listing` reuses a listing of an unchanged store directory, at least (seconds).
LISTING_TTL_S = 1.0
#: How many times :meth:`AdapterStore.snapshot` reads an entry that changes while it is read before it gives up.
SNAPSHOT_TRIES = 5
#: The name prefix of a snapshot's private directory (in the system's temporary directory).
_SNAPSHOT_PREFIX = "bca-store-"
#: A weights file the pickle-only hint looks for (:func:`bca_deploy.adapter_io.read_adapter`).
_PICKLE_WEIGHTS = "adapter_model.bin"


class _Changed(Exception):
    """The entry changed while :meth:`AdapterStore.snapshot` read it (read it again)."""


def _file_kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "not a file")


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


@dataclasses.dataclass
class _Listing:
    """The last listing of one store (:meth:`AdapterStore.listing`)."""

    lock: Any
    key: tuple[int, int, int, int] | None = None
    names: list[str] | None = None
    expires: float = 0.0


#: Store root -> its last listing (shared by every AdapterStore of that root: the Ray router makes one per request).
_LISTINGS: dict[Path, _Listing] = {}
_LISTINGS_LOCK = threading.Lock()


def redact_roots(message: str, roots: Iterable[str], placeholder: str) -> str:
    """``message`` with each directory in ``roots`` removed where it appears as a path: ``root/x`` becomes ``x``, and
    ``root`` alone becomes ``placeholder`` where it is unmistakably a path (absolute, or with a separator in it). Only
    whole path occurrences count (not preceded or followed by a path character), so a short relative root such as
    ``tok`` or ``.`` leaves "tokenizer" and full stops alone; and a relative root that is one bare name (``serve
    export``, ``--adapter-store adapters/``) is not replaced where it stands alone, as a word of the message's own
    prose ("a feature-extraction export", "seq-cls adapters") would be: alone it is a folder name, no location.
    Longer roots go first (an absolute path before the relative one inside it)."""
    for root in sorted(set(roots), key=len, reverse=True):
        if not root:
            continue
        edge = r"(?<![\w./~-])" + re.escape(root)
        message = re.sub(edge + re.escape(os.sep) + r"(?=[\w.~-])", "", message)
        if os.path.isabs(root) or os.sep in root or (os.altsep and os.altsep in root):
            message = re.sub(edge + r"(?![\w./~-])", placeholder.replace("\\", "\\\\"), message)
    return message


def _snapshot_root() -> str:
    """A pattern for where a snapshot's copy of an entry lies (the entry's own path follows it) in a reader's message."""
    return (r"(?<![\w./~-])" + re.escape(os.path.join(tempfile.gettempdir(), _SNAPSHOT_PREFIX)) + r"[A-Za-z0-9_]+"
            + re.escape(os.sep))


class AdapterStore:
    """A directory whose sub-directories are adapter directories (bca-deploy or PEFT C3A), or training runs
    (``bca-deploy train --out <store>/<name>``), which stand for their ``best/`` adapter (``last/`` when
    the run has no ``best/``; :func:`bca_deploy.config.run_adapter_dir`).

    Args:
        root: the store's directory (must exist).
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputNotFoundError(f"{root}: adapter store directory not found (expected an existing directory)")
        self.given = root
        self.root = root.resolve()

    def path(self, name: str) -> Path:
        """The checked directory of adapter ``name``, every file in it resolved inside the store.

        Raises:
            AdapterNameError: an invalid name, or an entry that is (or holds) a symbolic link out of the store.
            UnknownAdapterError: no adapter directory of that name in the store.
        """
        candidate = self._resolve(name, explain=True)
        if candidate is None:
            raise UnknownAdapterError(f"no adapter {name!r} in the adapter store")
        self._check_contents(name, candidate)
        return candidate

    def _resolved(self, path: Path, name: str) -> Path:
        """``path.resolve()``; a symbolic-link loop (RuntimeError on Python < 3.13, OSError after) is the entry's fault."""
        try:
            return path.resolve()
        except RuntimeError:
            raise AdapterNameError(f"adapter {name!r}: {path.name} is a symbolic-link loop") from None
        except OSError as exc:  # ELOOP from Python 3.13 on; anything else is named as what it is
            what = "is a symbolic-link loop" if exc.errno == errno.ELOOP else f"cannot be resolved ({exc.strerror})"
            raise AdapterNameError(f"adapter {name!r}: {path.name} {what}") from None

    def _resolve(self, name: str, explain: bool = False) -> Path | None:
        """The checked directory of ``name``, or None if the store has no adapter directory of that name. ``explain``
        (a request naming it): an entry holding adapters only in folders inside it is refused naming them, which
        costs a look inside (the listing leaves such an entry out without one)."""
        check_adapter_name(name)
        candidate = self._resolved(self.root / name, name)
        if not self._inside(candidate):
            raise AdapterNameError(f"adapter {name!r} resolves outside the adapter store")
        # an adapter directory, or a training run (bca-deploy train --out <store>/<name>): its best/ or last/
        try:
            adapter = self._resolved(run_adapter_dir(candidate), name)
            if not self._inside(adapter):
                raise AdapterNameError(f"adapter {name!r} resolves outside the adapter store")
            if (adapter / CONFIG_FILE).is_file():
                return adapter
            where = adapter.relative_to(candidate) / CONFIG_FILE if candidate in adapter.parents else CONFIG_FILE
            with contextlib.suppress(OSError):  # there, but a named pipe, socket, device or folder: say so
                if stat.S_ISREG(mode := os.stat(adapter / CONFIG_FILE).st_mode):
                    return adapter  # it is one now (replaced meanwhile)
                raise AdapterFormatError(f"adapter {name!r}: {where} is {_file_kind(mode)}, not a regular file")
            if os.path.islink(adapter / CONFIG_FILE):  # there by name: not "no adapter of that name"
                raise AdapterFormatError(f"adapter {name!r}: {where} is a symbolic link that leads to no file")
            if explain and adapter == candidate and (
                    hint := nested_adapters_hint(candidate, entry=name, keep=self._holds)):
                # PEFT's save_pretrained folder of named adapters, or a transformers Trainer's output_dir: the entry
                # is there, holding adapters, which was answered "no adapter of that name in the store"
                raise AdapterFormatError(f"adapter {name!r}: its folder has no {CONFIG_FILE}{hint}")
            return None
        except PermissionError:  # one entry this user may not read is that entry's problem, not the store's
            raise AdapterNameError(f"adapter {name!r}: its directory in the adapter store cannot be read by the "
                                   "server (permission denied)") from None

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def _holds(self, path: Path) -> bool:
        """Whether ``path`` resolves inside the store (its links read, as :meth:`_check_contents` reads them; False for
        a loop): asked before the file it leads to is looked at."""
        try:
            return self._inside(path.resolve())
        except (OSError, RuntimeError):  # a loop (RuntimeError before Python 3.13)
            return False

    def _check_contents(self, name: str, directory: Path) -> None:
        # Every entry (files, folders, links at any depth) must resolve inside the store; nothing is opened.
        # Read lazily (os.scandir, not os.walk, which lists a whole folder first): an entry holding a folder of
        # a million files costs MAX_ENTRY_FILES reads, not the folder's listing.
        seen = 0
        pending = [directory]
        while pending:
            current = pending.pop()
            try:
                with os.scandir(current) as children:
                    for child in children:
                        seen += 1
                        if seen > MAX_ENTRY_FILES:
                            raise AdapterNameError(f"adapter {name!r} holds more than {MAX_ENTRY_FILES} files; an "
                                                   "adapter directory holds its config and weights")
                        path = Path(child.path)
                        if not self._inside(self._resolved(path, name)):
                            relative = path.relative_to(directory)
                            raise AdapterNameError(f"adapter {name!r}: {relative} is a link to a file outside the "
                                                   "adapter store; store entries must be self-contained")
                        if child.is_dir(follow_symlinks=False):
                            pending.append(path)
            except OSError as exc:  # a folder in the entry that cannot be listed: the entry's problem
                if current == directory and isinstance(exc, PermissionError):
                    raise AdapterNameError(f"adapter {name!r}: its directory in the adapter store cannot be read by "
                                           "the server (permission denied)") from None
                if current == directory or not isinstance(exc, (PermissionError, FileNotFoundError)):
                    raise AdapterNameError(f"adapter {name!r}: its directory in the adapter store cannot be read "
                                           f"({exc.strerror or type(exc).__name__})") from None

    def nested(self) -> list[tuple[str, list[str]]]:
        """Folders of the store (valid names, inside it) with no adapter at their top but adapter directories inside
        them, each with those folders' names (:func:`~bca_deploy.config.nested_adapters`): a folder PEFT's
        ``save_pretrained`` wrote adapters not named ``default`` to, or a transformers Trainer's output_dir. No request
        can name the adapters inside (a name is one path component), unless an entry of the store is (a link to) it:
        those are left out. Said at start-up, as :meth:`path` says it to a request naming the folder."""
        entries: dict[str, Path] = {}
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                check_adapter_name(child.name)
                if self._inside(resolved := self._resolved(child, child.name)):
                    entries[child.name] = resolved
            except AdapterNameError:
                continue
        served = set(entries.values())
        out = []
        for name, folder in entries.items():
            if os.path.lexists(run_adapter_dir(folder) / CONFIG_FILE):
                continue
            inside = [n for n in nested_adapters(folder, self._holds) if (folder / n).resolve() not in served]
            if inside:
                out.append((name, inside))
        return out

    def unnamed(self) -> list[str]:
        """Folders of the store no request can name (their names are not valid adapter names: a space, a leading
        ``-``, letters outside ASCII), so never served; hidden ones (``.git``) left out. Said at start-up: they were
        missing from the listing without a word."""
        out = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                check_adapter_name(child.name)
            except AdapterNameError:
                out.append(child.name)
        return out

    def names(self) -> list[str]:
        """Adapter names that :meth:`path` accepts: valid names of self-contained adapter directories in the store
        whose config and weights are regular files (not named pipes, sockets or devices, which no load reads)."""
        names = []
        for child in sorted(self.root.iterdir()):
            try:
                if (path := self._resolve(child.name)) is not None and (path / WEIGHTS_FILE).is_file():
                    self._check_contents(child.name, path)
                    names.append(child.name)
            except (AdapterNameError, AdapterFormatError):
                continue
        return names

    def listing(self) -> list[str]:
        """:meth:`names`, reused while the store's directory is unchanged for a short while: what ``GET /v1/adapters``
        and the Ray router's ``GET /v1/models`` list. A store of 20,000 entries takes seconds to check, and a
        client polling the listing would keep a thread busy with it. The same listing is reused while the
        directory's inode, modification and change times are those it was made with (an entry added, removed or
        renamed shows at once) and for at most :data:`LISTING_TTL_S` seconds, or twice the time the listing
        took if longer (a change inside an entry, a file added to it, shows within that). Concurrent callers
        share one listing in progress. Call it off the event loop (it may take seconds)."""
        import time

        with _LISTINGS_LOCK:
            cached = _LISTINGS.setdefault(self.root, _Listing(threading.Lock()))
        with cached.lock:  # one listing at a time per store: callers arriving meanwhile get its result
            key = self._listing_key()
            now = time.monotonic()
            if key is not None and cached.names is not None and cached.key == key and now < cached.expires:
                return list(cached.names)
            names = self.names()
            took = time.monotonic() - now
            cached.key, cached.names = key, names
            cached.expires = time.monotonic() + max(LISTING_TTL_S, 2 * took)
            return list(names)

    def _listing_key(self) -> tuple[int, int, int, int] | None:
        try:
            info = os.stat(self.root)
        except OSError:
            return None  # the listing says what is wrong
        return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns

    def redact(self, message: str) -> str:
        """``message`` with the store's location removed (paths become relative to the store), and a snapshot's
        (:meth:`snapshot`: its copy of an entry has the entry's path under it)."""
        message = re.sub(_snapshot_root(), "", message)
        return redact_roots(message, (str(self.root), str(self.given.absolute()), str(self.given)), "<store>")

    def unsnapshotted(self, message: str) -> str:
        """``message`` with the paths of :meth:`snapshot` copies turned back into the entries' own paths in the store:
        what an operator is told (a client's messages go through :meth:`redact`)."""
        return re.sub(_snapshot_root(), lambda _: str(self.root) + os.sep, message)

    @contextlib.contextmanager
    def snapshot(self, name: str, directory: Path, *, max_bytes: int | None = None) -> Iterator[Path]:
        """A private copy of adapter ``name``'s files (``directory``, from :meth:`path`), for a reader to read and
        then deleted: one state of the entry, whatever happens to it meanwhile.

        The config and the weights are read through one open handle of the entry's directory, each opened without
        blocking and refused unless a regular file inside the store (the opened file itself is checked, so a link
        swapped in after :meth:`path` looked is refused too), read with ``read`` (a memory-mapped file truncated
        by a writer kills the process with SIGBUS), and read again, whole, if anything about the entry changed
        from the first look to the last (an in-place write, a file or the whole directory replaced by a rename).
        A file over its reader's limit (``max_bytes`` for the weights, the JSON limit for the config) is not read:
        the copy is a sparse file of the same size, which the reader refuses unread with its own message.

        The copy's path ends with the entry's own path (``<temporary>/<name>/``, or ``<name>/best/``), so the
        reader's messages, passed through :meth:`redact`, read as for the entry itself.

        Raises:
            AdapterFormatError: a file that is not a regular file, cannot be read, or kept changing over
                :data:`SNAPSHOT_TRIES` reads.
            AdapterNameError: a file that turned out to lie outside the store.
        """
        relative = directory.relative_to(self.root)
        scratch = Path(tempfile.mkdtemp(prefix=_SNAPSHOT_PREFIX))
        try:
            copy = scratch / relative
            for _ in range(SNAPSHOT_TRIES):
                shutil.rmtree(scratch / relative.parts[0], ignore_errors=True)
                copy.mkdir(parents=True)
                try:
                    self._copy_entry(name, directory, copy, max_bytes)
                    break
                except _Changed:
                    continue
            else:
                raise AdapterFormatError(f"adapter {name!r} changed while it was read ({SNAPSHOT_TRIES} times); load "
                                         "it again once it is written (put an adapter in place whole: write it "
                                         "beside the store and rename it in)")
            yield copy
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _opened_inside(self, fd: int) -> bool:
        """Whether the file open as ``fd`` lies inside the store (Linux: its path as the kernel has it)."""
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return True  # no /proc: path() checked the names before
        return self._inside(Path(where))

    def _copy_entry(self, name: str, directory: Path, copy: Path, max_bytes: int | None) -> None:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
        try:
            folder = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise _Changed from None  # renamed away since path() looked: look again
        except OSError as exc:
            raise AdapterFormatError(f"adapter {name!r}: its directory cannot be read ({exc.strerror})") from None
        try:
            if not self._opened_inside(folder):
                raise AdapterNameError(f"adapter {name!r} resolves outside the adapter store")
            seen: dict[str, tuple[int, ...] | None] = {}
            for file, limit in ((CONFIG_FILE, MAX_JSON_BYTES), (WEIGHTS_FILE, max_bytes)):
                try:  # its type before opening it (opening a device may do anything), and again once open
                    if not stat.S_ISREG(mode := os.stat(file, dir_fd=folder).st_mode):
                        raise AdapterFormatError(f"adapter {name!r}: {file} is {_file_kind(mode)}, not a regular file")
                    fd = os.open(file, flags, dir_fd=folder)
                except FileNotFoundError:
                    seen[file] = None  # the reader says what is missing
                    continue
                except OSError as exc:
                    what = "a symbolic-link loop" if exc.errno == errno.ELOOP else exc.strerror
                    raise AdapterFormatError(f"adapter {name!r}: {file} cannot be read ({what})") from None
                with os.fdopen(fd, "rb", buffering=0) as source:
                    before = os.fstat(fd)
                    if not stat.S_ISREG(before.st_mode):
                        raise AdapterFormatError(f"adapter {name!r}: {file} is {_file_kind(before.st_mode)}, "
                                                 "not a regular file")
                    if not self._opened_inside(fd):
                        raise AdapterNameError(f"adapter {name!r}: {file} is a link to a file outside the adapter "
                                               "store; store entries must be self-contained")
                    seen[file] = _identity(before)
                    self._copy_file(name, file, source, before.st_size, limit, copy / file)
                    if _identity(os.fstat(fd)) != seen[file]:
                        raise _Changed
            if seen[WEIGHTS_FILE] is None:
                with contextlib.suppress(OSError):  # the reader's hint for a pickle-only adapter
                    os.stat(_PICKLE_WEIGHTS, dir_fd=folder)
                    (copy / _PICKLE_WEIGHTS).touch()
            # the last look: every file still the one read, the entry still this directory
            for file, identity in seen.items():
                try:
                    now = _identity(os.stat(file, dir_fd=folder))
                except FileNotFoundError:
                    now = None
                except OSError:
                    raise _Changed from None
                if now != identity:
                    raise _Changed
            try:
                if os.stat(directory).st_ino != os.fstat(folder).st_ino:
                    raise _Changed
            except FileNotFoundError:
                raise _Changed from None
        finally:
            os.close(folder)

    @staticmethod
    def _copy_file(name: str, file: str, source: Any, size: int, limit: int | None, target: Path) -> None:
        with open(target, "wb") as out:
            if limit is not None and size > limit:
                out.truncate(size)  # sparse: the reader refuses it by its size, unread
                return
            copied = 0
            try:
                while chunk := source.read(1 << 20):
                    copied += len(chunk)
                    if copied > size:
                        raise _Changed  # grew while read
                    out.write(chunk)
            except OSError as exc:
                raise AdapterFormatError(f"adapter {name!r}: {file} cannot be read ({exc.strerror})") from None
            if copied != size:
                raise _Changed
