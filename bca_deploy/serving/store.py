"""``AdapterStore``: adapter directories under one root, addressed by name, never by path.

A server loads adapters by name from its store (``<root>/<name>/``). Everything in an entry is
resolved and must stay inside the store: the name is checked against
:data:`~bca_deploy.serving.session.ADAPTER_NAME_PATTERN` (one path component, no ``..``), the entry
directory with symbolic links followed must lie inside the root, and so must every file and folder in
it (a ``adapter_config.json`` that is a link to ``/etc/passwd`` is refused before it is opened).
Errors name the adapter, never the store's location, and never list the store's other entries.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import CONFIG_FILE, run_adapter_dir
from ..errors import AdapterNameError, InputNotFoundError, UnknownAdapterError
from .session import check_adapter_name

__all__ = ["AdapterStore", "MAX_ENTRY_FILES", "LISTING_TTL_S", "redact_roots"]

#: The most files and folders one store entry may hold (an adapter directory has two or three).
MAX_ENTRY_FILES = 64
#: How long :meth:`AdapterStore.listing` reuses a listing of an unchanged store directory, at least (seconds).
LISTING_TTL_S = 1.0


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
    """``message`` with each directory in ``roots`` removed where it appears as a path: ``root/x`` becomes ``x``,
    ``root`` alone becomes ``placeholder``. Only whole path occurrences count (not preceded or followed by a
    path character), so a short relative root such as ``tok`` or ``.`` leaves "tokenizer" and full stops alone.
    Longer roots go first (an absolute path before the relative one inside it)."""
    for root in sorted(set(roots), key=len, reverse=True):
        if not root:
            continue
        edge = r"(?<![\w./~-])" + re.escape(root)
        message = re.sub(edge + re.escape(os.sep) + r"(?=[\w.~-])", "", message)
        message = re.sub(edge + r"(?![\w./~-])", placeholder.replace("\\", "\\\\"), message)
    return message


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
        candidate = self._resolve(name)
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

    def _resolve(self, name: str) -> Path | None:
        """The checked directory of ``name``, or None if the store has no adapter directory of that name."""
        check_adapter_name(name)
        candidate = self._resolved(self.root / name, name)
        if not self._inside(candidate):
            raise AdapterNameError(f"adapter {name!r} resolves outside the adapter store")
        # an adapter directory, or a training run (bca-deploy train --out <store>/<name>): its best/ or last/
        try:
            adapter = self._resolved(run_adapter_dir(candidate), name)
            if not self._inside(adapter):
                raise AdapterNameError(f"adapter {name!r} resolves outside the adapter store")
            return adapter if (adapter / CONFIG_FILE).is_file() else None
        except PermissionError:  # one entry this user may not read is that entry's problem, not the store's
            raise AdapterNameError(f"adapter {name!r}: its directory in the adapter store cannot be read by the "
                                   "server (permission denied)") from None

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def _check_contents(self, name: str, directory: Path) -> None:
        # Every entry (files, folders, links at any depth) must resolve inside the store; nothing is opened.
        seen = 0
        for current, dirs, files in os.walk(directory, followlinks=False):
            for child in (*dirs, *files):
                seen += 1
                if seen > MAX_ENTRY_FILES:
                    raise AdapterNameError(f"adapter {name!r} holds more than {MAX_ENTRY_FILES} files; an adapter "
                                           "directory holds its config and weights")
                path = Path(current, child)
                if not self._inside(self._resolved(path, name)):
                    relative = path.relative_to(directory)
                    raise AdapterNameError(f"adapter {name!r}: {relative} is a link to a file outside the adapter "
                                           "store; store entries must be self-contained")

    def names(self) -> list[str]:
        """Adapter names that :meth:`path` accepts: valid names of self-contained adapter directories in the store."""
        names = []
        for child in sorted(self.root.iterdir()):
            try:
                if (path := self._resolve(child.name)) is not None:
                    self._check_contents(child.name, path)
                    names.append(child.name)
            except AdapterNameError:
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
        """``message`` with the store's location removed (paths become relative to the store)."""
        return redact_roots(message, (str(self.root), str(self.given), str(self.given.absolute())), "<store>")
