"""``merge --out`` and ``export --out`` inside the adapter they read (``--adapter a0 --out a0/merged``) were written
there (saving the adapter again deletes them). Now refused before anything is written, naming the output and the
adapter (exit 2 in the CLI). A folder of adapters (a store, of adapters or training runs) stays a valid place for an
output: ``serve --adapter-store`` lists only the adapter directories in it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adversarial_helpers import assert_clean_cli_error, run_cli  # noqa: E402

import bca_deploy as bd  # noqa: E402
from bca_deploy.errors import OutputExistsError  # noqa: E402
from bca_deploy.merge import merge_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """``base/`` (a tiny Llama) and ``store/a0``, ``store/a1`` (two adapters: a folder of adapters only)."""
    root = tmp_path_factory.mktemp("among")
    tiny_llama().save_pretrained(root / "base")
    model = bd.inject(tiny_llama(), ["q_proj", "v_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, root / "store" / "a0")
    shutil.copytree(root / "store" / "a0", root / "store" / "a1")
    return root


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _cases(root: Path) -> list[tuple[Path, list[str]]]:
    adapter = root / "store" / "a0"
    return [(adapter / "merged", [f"{adapter / 'merged'}: is inside the adapter {adapter}"]),
            (adapter / "sub" / "merged", [f"is inside the adapter {adapter}"])]


def _merge(base: Path, adapter: Path, out: Path) -> None:
    merge_checkpoint(base, [(adapter, 1.0)], out, progress=False)


def _export(base: Path, adapter: Path, out: Path) -> None:
    from bca_deploy.exporters import export

    export(base, out, [adapter], merge=False, task="text-generation", verbose=False)


@pytest.mark.parametrize("command, write", [("merge", _merge), ("export", _export)])
def test_output_into_an_adapter_is_refused_naming_both(setup, command, write):
    before = _snapshot(setup)
    adapter = setup / "store" / "a0"
    for out, words in _cases(setup):
        with pytest.raises(OutputExistsError) as caught:
            write(setup / "base", adapter, out)
        for word in words:
            assert word in str(caught.value), str(caught.value)
        args = [command, "--model", setup / "base", "--adapter", adapter, "--out", out]
        result = run_cli(args)
        assert_clean_cli_error(result, args)
        assert words[0] in " ".join(result.output.split()), result.output
    assert _snapshot(setup) == before  # nothing written


def test_beside_adapters_is_a_valid_output_place(setup, tmp_path):
    """The usual layouts (``./adapter``, ``./base``, ``--out ./merged``; a folder of adapters or runs, ``--out
    runs/merged``) merge as before, and a store with a merged model in it still lists its adapters only."""
    shutil.copytree(setup / "store" / "a0", tmp_path / "adapter")
    shutil.copytree(setup / "base", tmp_path / "base")
    merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    assert (tmp_path / "merged" / "config.json").is_file()
    shutil.copytree(setup / "store" / "a0", tmp_path / "one" / "adapter")
    merge_checkpoint(tmp_path / "base", [(tmp_path / "one" / "adapter", 1.0)], tmp_path / "one" / "merged",
                     progress=False)
    assert (tmp_path / "one" / "merged" / "config.json").is_file()
    store = tmp_path / "store"
    shutil.copytree(setup / "store", store)
    merge_checkpoint(tmp_path / "base", [(store / "a0", 1.0)], store / "merged", progress=False)
    assert (store / "merged" / "config.json").is_file()
    from bca_deploy.serving.store import AdapterStore

    assert AdapterStore(store).names() == ["a0", "a1"]
