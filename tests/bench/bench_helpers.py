"""Shared by the tests of bench/ scripts: a script loaded as a module, with bench/ on the path for its imports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_bench_script(filename: str, module_name: str) -> ModuleType:
    """``bench/<filename>`` executed as the module ``module_name`` (bench/ first on ``sys.path``, as the scripts
    import their siblings ``common`` and ``export``)."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(module_name, REPO / "bench" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
