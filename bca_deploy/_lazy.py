"""Lazy package attributes (PEP 562): a package's public names are imported from their modules on first use,
so importing the package (and the CLI's ``--help``) does not import torch, onnxruntime or transformers."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``exports`` (name -> module, relative: ``".engine"``).

    A name is imported on its first lookup and then stored in the package, so later lookups are plain attributes.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


def keep_exports(package: str, exports: Mapping[str, str]) -> None:
    """Keep ``package``'s public names when a submodule of the same name is imported.

    Importing ``package.NAME`` (the module) sets the package attribute ``NAME`` to the module, hiding the public
    name: ``bca_deploy.inject`` is the function ``inject`` of the module ``inject``. A submodule that defines its own
    name is replaced by that object; one that does not is not stored, so the name stays lazy (resolved from its
    module by ``__getattr__``). The submodules stay importable (``sys.modules``, ``from .inject import ...``).
    A package should rather not name a module after a function another module defines (the training package's
    ``evaluate`` function lives in ``evaluation``: a module ``evaluate`` made ``from bca_deploy.training import
    evaluate`` the module).
    """
    prefix = f"{package}."

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if isinstance(value, types.ModuleType) and name in exports and value.__name__ == prefix + name:
                if exports[name] != f".{name}" or not hasattr(value, name):
                    return
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Package
