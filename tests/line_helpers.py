"""Shared by the tests of adapters made on one transformers line and applied on the other."""

from __future__ import annotations

from pathlib import Path

import pytest

from bca_deploy.errors import AdapterFormatError, AdapterMismatchError
from bca_deploy.merge import merge_checkpoint
from bca_deploy.models import load_model


def load_and_merge_refusals(base: Path, adapter: Path, merged: Path) -> dict[str, str]:
    """The messages ``load_model`` and ``merge_checkpoint`` refuse ``adapter`` on ``base`` with (each must refuse,
    with a typed error), by what refused; the merge wrote nothing at ``merged``."""
    messages = {}
    for what, run in (("load_model", lambda: load_model(base, [adapter])),
                      ("merge", lambda: merge_checkpoint(base, [(adapter, 1.0)], merged, progress=False))):
        with pytest.raises((AdapterFormatError, AdapterMismatchError)) as caught:
            run()
        messages[what] = str(caught.value)
    assert not merged.exists()
    return messages
