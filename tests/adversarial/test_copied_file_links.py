"""Files an export or a merge copies from the model directory, where they are symbolic links.

A model folder from elsewhere may hold ``merges.txt -> ~/.aws/credentials`` or ``chat_template.jinja -> ../../secret``:
export and merge copied the target's content into an output the user then publishes or serves. A copied file must
lie, links followed, in the model directory's own tree, or in its Hugging Face cache repository (whose snapshot
files all link into ``../../blobs/``); a model directory that is itself a link is that folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
from adversarial_helpers import assert_bca_error, assert_clean_cli_error, leftovers, run_cli, tree_digest  # noqa: E402
from conftest import wordpiece_tokenizer  # noqa: E402
from exporters_helpers import build_model  # noqa: E402

import bca_deploy as bd  # noqa: E402
from bca_deploy.merge import merge_checkpoint  # noqa: E402

SECRET = "SECRET-aws_secret_access_key=do-not-publish-7f3e"
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny BERT with a tokenizer and a README (``model/``), and an adapter for it."""
    root = tmp_path_factory.mktemp("links")
    build_model("bert").save_pretrained(root / "model")
    wordpiece_tokenizer(TOKENS).save_pretrained(root / "model")
    (root / "model" / "README.md").write_text("# tiny\n")
    model = bd.inject(build_model("bert"), ["query", "value"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, root / "adapter")
    return root


def _model_with_secret(base: Path, tmp_path: Path, name: str, relative: bool) -> tuple[Path, Path]:
    """A copy of the model whose ``name`` links to a secret file outside it (relatively: ``../secret``)."""
    model_dir = tmp_path / "model"
    shutil.copytree(base / "model", model_dir)
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    (model_dir / name).unlink(missing_ok=True)
    (model_dir / name).symlink_to("../secret" if relative else secret)
    return model_dir, secret


def _nowhere_under(root: Path) -> None:
    """The secret's content is in no file under ``root`` (which may not exist)."""
    if root.exists():
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def _export(model_dir: Path, out: Path, base: Path) -> Path:
    from exporters import export

    return export(model_dir, out, [base / "adapter"], merge=True, validate=False, verbose=False)


def _merge(model_dir: Path, out: Path, base: Path) -> Path:
    return merge_checkpoint(model_dir, [(base / "adapter", 1.0)], out, progress=False)


COMMANDS = {"export": _export, "merge": _merge}
CLI = {"export": lambda m, o, b: ["export", "--model", m, "--adapter", b / "adapter", "--out", o, "--merge",
                                   "--no-validate"],
       "merge": lambda m, o, b: ["merge", "--model", m, "--adapter", b / "adapter", "--out", o, "--no-progress"]}


@pytest.mark.parametrize("command, name, relative", [
    ("export", "merges.txt", False),
    ("export", "chat_template.jinja", True),
    ("merge", "README.md", False),
    ("merge", "special_tokens_map.json", True),
])
def test_a_copied_file_linking_outside_the_model_is_refused(base, tmp_path, command, name, relative):
    model_dir, secret = _model_with_secret(base, tmp_path, name, relative)
    before = tree_digest(model_dir)
    out = tmp_path / "out"

    error = assert_bca_error(lambda: COMMANDS[command](model_dir, out, base), f"{command} {name}")
    message = str(error)
    assert f"{model_dir / name}: links to {secret}, outside the model directory {model_dir}" in message, message
    assert "copy the file into" in message and "remove the link" in message, message
    assert not out.exists() and leftovers(tmp_path, "out") == []
    args = CLI[command](model_dir, out, base)
    result = run_cli(args)
    assert_clean_cli_error(result, args)
    assert str(secret) in result.output and SECRET not in result.output, result.output
    assert not out.exists() and leftovers(tmp_path, "out") == []
    _nowhere_under(out)
    assert tree_digest(model_dir) == before and secret.read_text() == SECRET


def _hf_cache(base: Path, tmp_path: Path) -> Path:
    """The model laid out as huggingface_hub caches it: ``models--org--tiny/snapshots/<rev>/x -> ../../blobs/<sha>``
    (a nested file: ``../../../blobs``); returns the snapshot."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for path in sorted((base / "model").rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(base / "model")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(repo).parts) - 1), "blobs", blob.name))
    return snapshot


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("layout", ["hf-cache", "hf-cache-through-a-link", "linked-folder"])
def test_linked_model_layouts_still_copy_their_files(base, tmp_path, command, layout):
    """A Hugging Face cache snapshot (every file a link into the repo's blobs/), a link to one, and a model
    directory given as a link to the folder: copied as before, the files' content, no links."""
    if layout == "linked-folder":
        shutil.copytree(base / "model", tmp_path / "real")
        target = tmp_path / "real"
    else:
        target = _hf_cache(base, tmp_path)
    model_dir = target if layout == "hf-cache" else tmp_path / "mylink"
    if model_dir != target:
        model_dir.symlink_to(target, target_is_directory=True)

    out = COMMANDS[command](model_dir, tmp_path / "out", base)

    names = [n for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
             if (base / "model" / n).exists()] + (["README.md"] if command == "merge" else [])
    assert "tokenizer.json" in names
    for name in names:
        assert not (out / name).is_symlink() and (out / name).read_bytes() == (base / "model" / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
