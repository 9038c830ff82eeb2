"""``AdapterStore``: adapter directories under one root, addressed by name, never by path.

A server loads adapters by name from its store (``<root>/<name>/``). Everything in an entry is
resolved and must stay inside the store: the name is checked against
:data:`~bca_deploy.serving.session.ADAPTER_NAME_PATTERN` (one path component, no ``..``), the entry
directory with symbolic links followed must lie inside the root, and so must every file and folder in
it (a ``adapter_config.json`` that is a link to ``/etc/passwd`` is refused before it is opened).
Errors name the adapter, never the store's location, and never list the store's other entries.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..config import CONFIG_FILE, run_adapter_dir
from ..errors import AdapterNameError, InputNotFoundError, UnknownAdapterError
from .session import check_adapter_name

__all__ = ["AdapterStore", "MAX_ENTRY_FILES", "redact_roots"]

#: The most files and folders one store entry may hold (an adapter directory has two or three).
MAX_ENTRY_FILES = 64


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

    def redact(self, message: str) -> str:
        """``message`` with the store's location removed (paths become relative to the store)."""
        return redact_roots(message, (str(self.root), str(self.given), str(self.given.absolute())), "<store>")
