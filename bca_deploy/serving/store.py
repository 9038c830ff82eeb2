"""``AdapterStore``: adapter directories under one root, addressed by name, never by path.

A server loads adapters by name from its store (``<root>/<name>/``); the name is checked against
:data:`~bca_deploy.serving.session.ADAPTER_NAME_PATTERN` (one path component, no ``..``) and the
resolved directory (symbolic links followed) must still lie inside the root, so a request can never
make the server read outside the store.
"""

from __future__ import annotations

from pathlib import Path

from ..config import CONFIG_FILE
from ..errors import AdapterNameError, UnknownAdapterError
from .session import check_adapter_name

__all__ = ["AdapterStore"]


class AdapterStore:
    """A directory whose sub-directories are adapter directories (bca-deploy or PEFT C3A).

    Args:
        root: the store's directory (must exist).
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: adapter store directory not found")
        self.root = root.resolve()

    def path(self, name: str) -> Path:
        """The directory of adapter ``name``.

        Raises:
            AdapterNameError: an invalid name, or one that resolves outside the store (a symbolic link out).
            UnknownAdapterError: no adapter directory of that name in the store.
        """
        candidate = self._resolve(name)
        if candidate is None:
            raise UnknownAdapterError(f"no adapter {name!r} in the store {self.root} (available: "
                                      f"{', '.join(self.names()) or '(none)'})")
        return candidate

    def _resolve(self, name: str) -> Path | None:
        """The checked directory of ``name``, or None if the store has no adapter directory of that name."""
        check_adapter_name(name)
        candidate = (self.root / name).resolve()
        if candidate.parent != self.root and self.root not in candidate.parents:
            raise AdapterNameError(f"adapter {name!r} resolves outside the adapter store {self.root}")
        return candidate if (candidate / CONFIG_FILE).is_file() else None

    def names(self) -> list[str]:
        """Adapter names that :meth:`path` accepts: valid names of adapter directories inside the store."""
        names = []
        for child in sorted(self.root.iterdir()):
            try:
                if self._resolve(child.name) is not None:
                    names.append(child.name)
            except AdapterNameError:
                continue
        return names
