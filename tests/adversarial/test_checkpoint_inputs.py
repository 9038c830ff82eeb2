"""Malformed model directories through the streaming merge (library and CLI), and hostile CLI arguments.

Every broken checkpoint must be refused with a BCAError naming the file (CLI: exit code 2, no traceback),
before anything is written, with the model directory, the adapter and an earlier merged output untouched.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adversarial_helpers import (  # noqa: E402
    FUZZ,
    assert_bca_error,
    assert_clean_cli_error,
    count,
    leftovers,
    figures_fixture,
    run_cli,
    tree_digest,
)
from exporters_helpers import build_model  # noqa: E402

import bca_deploy as bd  # noqa: E402
from bca_deploy.merge import merge_checkpoint  # noqa: E402

QUERY = "encoder.layer.0.attention.self.query.weight"

figures = figures_fixture("test_checkpoint_inputs.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    build_model("bert").save_pretrained(root / "single")
    build_model("bert").save_pretrained(root / "sharded", max_shard_size="20KB")
    model = bd.inject(build_model("bert"), ["query", "value"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, root / "adapter")
    merge_checkpoint(root / "single", [(root / "adapter", 1.0)], root / "earlier", progress=False)
    return root


def _shard_with(directory: Path, key: str) -> Path:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][key]


def _edit_index(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        path = d / "model.safetensors.index.json"
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return apply


def _edit_config(**changes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **changes}))

    return apply


def _write(name: str, raw: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(raw)


def _truncate(d: Path) -> None:
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-100])


def _header(d: Path, header: dict) -> None:
    text = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)


def _duplicate(d: Path) -> None:
    other = next(p for p in sorted(d.glob("model-*.safetensors")) if p != _shard_with(d, QUERY))
    tensors = load_file(str(other))
    tensors[QUERY] = torch.zeros(32, 32)
    save_file(tensors, str(other), metadata={"format": "pt"})


def _int_weight(d: Path) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    tensors[QUERY] = tensors[QUERY].to(torch.int32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")


# name -> (sharded?, change, needle)
BROKEN: dict[str, tuple[bool, Callable[[Path], None], str]] = {
    "shard-truncated": (False, _truncate, "truncated"),
    "shard-empty": (False, _write("model.safetensors", b""), "too short"),
    "shard-header-length-huge": (False, _write("model.safetensors", struct.pack("<Q", 1 << 62) + b"{}"), "impossible"),
    "shard-header-not-utf8": (False, _write("model.safetensors", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"),
                              "not valid JSON"),
    "shard-header-entry-without-dtype": (False, lambda d: _header(d, {"x": {"shape": [1], "data_offsets": [0, 4]}}),
                                         "malformed header entry"),
    "shard-header-is-list": (False, lambda d: _header(d, [1]), "JSON object"),
    # the fuzz report's: each was an "Internal error" (RecursionError, ValueError, OverflowError, TypeError)
    "shard-header-nested": (False, _write("model.safetensors", struct.pack("<Q", 400_000) + b"[" * 200_000
                                          + b"]" * 200_000), "nested"),
    "shard-header-huge-integer": (False, _write("model.safetensors", struct.pack("<Q", 5_060) + b'{"a": {"shape": ['
                                                + b"9" * 5_000 + b'], "dtype": "F32", "data_offsets": [0, 4]}}'),
                                  "header"),
    "shard-header-infinite-shape": (False, _write("model.safetensors", struct.pack("<Q", 72) + b'{"a": {"dtype": "F32", '
                                                  b'"shape": [Infinity], "data_offsets": [0, 4]}}    '), "Infinity"),
    "shard-header-float-shape": (False, lambda d: _header(d, {"a": {"dtype": "F32", "shape": [1.0],
                                                                    "data_offsets": [0, 4]}}), "malformed header entry"),
    "index-shard-is-list": (True, _edit_index(lambda i: i["weight_map"].__setitem__(QUERY, ["x"])), "plain file names"),
    "index-shard-is-object": (True, _edit_index(lambda i: i["weight_map"].__setitem__(QUERY, {"a": 1})),
                              "plain file names"),
    "shard-offsets-overlap": (False, lambda d: _header(d, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                                          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
                              "contiguous"),
    "shard-is-directory": (False, lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()),
                           "model.safetensors: a directory, not a regular file, expected a safetensors file"),
    "weights-pickle-only": (False, _pickle_only, "convert the checkpoint to safetensors"),
    # other files are copied: a link to a device was copied until the disk was full; a named pipe waited forever
    "other-file-links-to-dev-zero": (False, lambda d: (d / "notes.txt").symlink_to("/dev/zero"), "a character device, not a regular file (through a link)"),
    "other-file-is-a-named-pipe": (False, lambda d: __import__("os").mkfifo(d / "notes.txt"), "a named pipe (FIFO), not a regular file"),
    "other-file-links-to-nothing": (False, lambda d: (d / "notes.txt").symlink_to(d / "gone"), "cannot be copied: No such file or directory (through a link)"),
    "adapted-weight-is-int32": (False, _int_weight, "I32"),
    "config-not-utf8": (False, _write("config.json", b"\xff\xfe{}"), "UTF-8"),
    "config-nested": (False, _write("config.json", b"[" * 100_000 + b"]" * 100_000), "nested"),
    "config-is-list": (False, _write("config.json", b"[]"), "JSON object"),
    "config-layers-beyond-tensors": (True, lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "num_hidden_layers": 10**9})), "holds only"),
    # a config.json that does not describe the weights: the merged copy would not load, or load wrongly
    "config-intermediate-size-edited": (True, _edit_config(intermediate_size=128), "its weights do not fit its "
                                        "config.json"),
    "config-vocab-size-edited": (False, _edit_config(vocab_size=64), "tensor embeddings.word_embeddings.weight "
                                 "(model.safetensors): stored [128, 32], config.json gives [64, 32]"),
    "config-one-layer-more": (False, _edit_config(num_hidden_layers=3), "no tensor of encoder.layer.2"),
    "config-of-another-model": (True, lambda d: build_model("llama").config.to_json_file(d / "config.json"),
                                "none of the checkpoint's"),
    "index-weight-map-is-list": (True, _edit_index(lambda i: i.__setitem__("weight_map", [])), "weight_map"),
    # transformers cannot load these (KeyError/TypeError on 'metadata'): merge wrote such a copy and exited 0
    "index-metadata-is-list": (True, _edit_index(lambda i: i.__setitem__("metadata", [1])), "'metadata' must be an "
                               "object"),
    "index-metadata-missing": (True, _edit_index(lambda i: i.pop("metadata")), "'metadata' must be an object"),
    "index-not-utf8": (True, _write("model.safetensors.index.json", b"\xff{}"), "UTF-8"),
    "index-shard-outside": (True, _edit_index(lambda i: i["weight_map"].__setitem__(QUERY, "../x.safetensors")),
                            "plain file names"),
    "index-shard-missing": (True, _edit_index(lambda i: i["weight_map"].__setitem__(QUERY, "model-missing.safetensors")),
                            "missing"),
    "index-points-to-wrong-shard": (True, _edit_index(lambda i: i["weight_map"].__setitem__(
        QUERY, sorted(set(i["weight_map"].values()))[-1])), "does not hold it"),
    "tensor-in-two-shards": (True, _duplicate, "present in both"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_checkpoint_refused(base, tmp_path, name):
    sharded, change, needle = BROKEN[name]
    model_dir = tmp_path / "model"
    shutil.copytree(base / ("sharded" if sharded else "single"), model_dir)
    change(model_dir)
    inputs = {p: tree_digest(p) for p in (model_dir, base / "adapter", base / "earlier")}

    error = assert_bca_error(lambda: merge_checkpoint(model_dir, [(base / "adapter", 1.0)], tmp_path / "out",
                                                      progress=False), f"merge_checkpoint({name})")
    assert needle in str(error), (name, str(error))
    count("merge_checkpoint (model directory)")
    for out, extra in ((tmp_path / "out", []), (base / "earlier", ["--overwrite"])):
        args = ["merge", "--model", model_dir, "--adapter", base / "adapter", "--out", out, "--no-progress", *extra]
        result = run_cli(args)
        assert_clean_cli_error(result, [name, *args])
        count("cli merge (model directory)")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []
    assert {p: tree_digest(p) for p in inputs} == inputs, f"{name}: an input or the earlier output changed"


# ---- hostile CLI arguments ------------------------------------------------------------------------


def _invalid_float(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return True
    return value != value or value in (float("inf"), float("-inf"))


@settings(max_examples=FUZZ * 3 // 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=12).filter(_invalid_float).filter(lambda t: not t.startswith("-")))
def test_random_invalid_weights(base, tmp_path, text):
    args = ["merge", "--model", base / "single", "--adapter", base / "adapter", "--weight", text, "--out", tmp_path / "o"]
    result = run_cli(args)
    assert_clean_cli_error(result, args)
    assert "--weight" in result.output and not (tmp_path / "o").exists()
    count("cli merge --weight (random)")


def _valid_cases(text: str) -> bool:
    items = text.split(",")
    for item in items:
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            return False
        if not all(1 <= int(p) <= 4096 for p in parts):
            return False
    return True


@settings(max_examples=FUZZ * 3 // 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(alphabet="0123456789x,X -.", min_size=1, max_size=12), st.text(min_size=1, max_size=8))
       .filter(lambda t: not _valid_cases(t) and not t.startswith("-")))
def test_random_invalid_cases(base, tmp_path, text):
    args = ["export", "--model", base / "single", "--cases", text, "--out", tmp_path / "o"]
    result = run_cli(args)
    assert_clean_cli_error(result, args)
    assert "--cases" in result.output
    count("cli export --cases (random)")


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(port=st.one_of(st.integers(max_value=0), st.integers(min_value=65536)),
       rows=st.integers(max_value=0))
def test_random_invalid_serve_numbers(base, port, rows):
    for option, value in (("--port", port), ("--max-batch-rows", rows)):
        args = ["serve", base, option, str(value)]
        result = run_cli(args)
        assert_clean_cli_error(result, args)
        assert option in result.output
        count(f"cli serve {option} (random)")
