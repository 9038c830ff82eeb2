"""Hostile exports: what ``serve``, ``validate`` and ``inspect`` read from an export directory that is not what
``bca-deploy export --bank`` wrote.

- files that are not regular files (a FIFO blocked every reader forever: ``require_readable`` opened before looking);
- the base head file ``bca_head_base.npz``: a zip bomb (expanded before its member names were checked), arrays of
  a dtype that is not a real float (datetime64, complex, structured: silently cast to float32);
- a bank graph changed since export (an extra required input, ``adapter_ids`` as int32, ``input_ids`` as float, the
  ``logits`` output renamed): loaded, then every request failed inside onnxruntime (an "Internal error", exit 70)
  or was refused as the wrong task.

One tiny text-classification bank (a BERT classifier with a 3-label head, one adapter) is exported per module;
every case edits a copy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bca_deploy as bd
from bca_deploy.cli import main
from bca_deploy.errors import ServingError, require_readable

HEAD_FILE = "bca_head_base.npz"
WEIGHT, BIAS = "classifier.bca_head_weight", "classifier.bca_head_bias"


def _classifier():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return tf.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def cls_bank(tmp_path_factory):
    from bca_deploy.exporters import export

    root = tmp_path_factory.mktemp("export-inputs")
    _classifier().save_pretrained(root / "model")
    model = bd.inject(_classifier(), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0)
    adapter = bd.save_adapter(model, root / "a0")
    onnx = Path(export(root / "model", root / "onnx", [adapter], merge=False, bank=True, task="text-classification",
                       cases=[(2, 4)], verbose=False))
    assert json.loads((onnx / "bca_export.json").read_text())["bank"]["head"]["base_file"] == HEAD_FILE
    return {"root": root, "model": root / "model", "adapter": adapter, "onnx": onnx}


def _copy(art, directory: Path) -> Path:
    shutil.copytree(art["onnx"], directory)
    return directory


def _bounded(fn, fifos=(), seconds: float = 60.0):
    """``fn()`` in a thread; a call still blocked after ``seconds`` (on a FIFO: the old behaviour) fails the test,
    after the FIFOs are opened for writing until the thread is released (a blocked ``open`` returns, its read ends)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    blocked = thread.is_alive()
    for _ in range(200):
        if not thread.is_alive():
            break
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(0.2)
    if blocked:
        pytest.fail(f"still blocked after {seconds:.0f} s (a FIFO read as a file)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


# ---- 1. anything that is not a regular file ---------------------------------------------------------------


def test_require_readable_refuses_what_is_not_a_regular_file_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-pipe"
    link.symlink_to(fifo)
    directory = tmp_path / "folder"
    directory.mkdir()
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    try:
        cases = {fifo: "a named pipe (FIFO)", link: "a named pipe (FIFO)", directory: "a directory",
                 sock_path: "a socket", Path(os.devnull): "a character device"}
        for path, what in cases.items():
            with pytest.raises(OSError) as caught:
                _bounded(lambda p=path: require_readable(p), [fifo], seconds=10)
            assert caught.value.filename == str(path) and caught.value.strerror == f"{what}, not a regular file", \
                (path, caught.value)
    finally:
        sock.close()
    regular = tmp_path / "file"
    regular.write_bytes(b"x")
    (tmp_path / "link-to-file").symlink_to(regular)
    for path in (regular, tmp_path / "link-to-file"):  # a regular file, through a link or not: no error
        require_readable(path)
    with pytest.raises(FileNotFoundError):
        require_readable(tmp_path / "missing")


def test_a_fifo_adapter_file_is_one_line_in_inspect_validate_and_serve(cls_bank, tmp_path):
    """``inspect`` and ``validate`` of a bank whose ``adapters/*.onnx_adapter`` is a FIFO blocked forever."""
    from bca_deploy.serving import MultiAdapterSession

    export = _copy(cls_bank, tmp_path / "bank")
    victim = export / "adapters" / "a0.onnx_adapter"
    victim.unlink()
    os.mkfifo(victim)
    result = _bounded(lambda: CliRunner().invoke(main, ["inspect", str(export)]), [victim])
    assert result.exit_code == 0 and \
        "adapters:     NOT loadable: adapters/a0.onnx_adapter (a named pipe (FIFO), not a regular file)" in \
        result.output, result.output
    result = _bounded(lambda: CliRunner().invoke(main, ["validate", "--onnx", str(export), "--model",
                                                        str(cls_bank["model"]), "--adapter", str(cls_bank["adapter"]),
                                                        "--cases", "2x4"]), [victim])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == \
        f"Error: {victim}: a named pipe (FIFO), not a regular file", result.output
    with pytest.raises(OSError, match="a named pipe"):
        _bounded(lambda: MultiAdapterSession(export), [victim])


# ---- 2. the base head file ------------------------------------------------------------------------------


def _head_arrays(art) -> dict[str, np.ndarray]:
    with np.load(art["onnx"] / HEAD_FILE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _npy_member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], zero_bytes: int) -> None:
    """A deflated member ``name`` whose header declares a float32 array of ``shape``, holding ``zero_bytes`` zeros."""
    with archive.open(name, "w", force_zip64=True) as member:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
        member.write(header.getvalue())
        chunk = bytes(1 << 20)
        for _ in range(zero_bytes >> 20):
            member.write(chunk)


def test_a_fifo_head_file_is_refused_naming_it(cls_bank, tmp_path):
    from bca_deploy.serving import MultiAdapterSession

    export = _copy(cls_bank, tmp_path / "bank")
    (export / HEAD_FILE).unlink()
    os.mkfifo(export / HEAD_FILE)
    with pytest.raises(ServingError) as caught:
        _bounded(lambda: MultiAdapterSession(export), [export / HEAD_FILE])
    assert str(caught.value) == (f"{export / HEAD_FILE}: cannot read the base model's head (a named pipe (FIFO), "
                                 "not a regular file)")


def test_head_arrays_of_other_dtypes_are_refused_not_cast(cls_bank, tmp_path):
    from bca_deploy.serving import MultiAdapterSession

    arrays = _head_arrays(cls_bank)
    weight = arrays[WEIGHT]
    cases = {
        "datetime": (np.zeros(weight.shape, dtype="datetime64[D]"), "dtype datetime64[D]"),
        "complex": (weight.astype(np.complex64) + 1j, "dtype complex64"),
        "structured": (np.zeros(weight.shape, dtype=[("a", "<f4")]), "dtype [('a', '<f4')]"),
        "int": (np.ones(weight.shape, dtype=np.int32), "dtype int32"),
    }
    for name, (value, needle) in cases.items():
        export = _copy(cls_bank, tmp_path / name)
        np.savez(export / HEAD_FILE, **{**arrays, WEIGHT: value})
        with pytest.raises(ServingError) as caught:
            MultiAdapterSession(export)
        message = str(caught.value)
        assert f"{export / HEAD_FILE}: the base model's head does not fit" in message, (name, message)
        assert f"{WEIGHT}.npy: {needle}, expected a real float array" in message, (name, message)
    # float64 and float16 are real floats: accepted (read as float32)
    export = _copy(cls_bank, tmp_path / "float64")
    np.savez(export / HEAD_FILE, **{k: v.astype(np.float64) for k, v in arrays.items()})
    session = MultiAdapterSession(export)
    np.testing.assert_array_equal(session._base_head.tensors[WEIGHT], weight)


def test_a_head_file_zip_bomb_is_refused_from_its_headers_without_expanding_it(cls_bank, tmp_path):
    """A member that is not a head input, and a head input whose header declares a huge array: each ~32 MB of
    zeros deflated to ~32 KB. Both were expanded (np.load of every member) before the names and shapes were checked."""
    from bca_deploy.serving import MultiAdapterSession

    arrays = _head_arrays(cls_bank)
    export = _copy(cls_bank, tmp_path / "bomb")
    with zipfile.ZipFile(export / HEAD_FILE, "w", zipfile.ZIP_DEFLATED) as archive:
        _npy_member(archive, "extra.npy", (8 << 20,), 32 << 20)
        _npy_member(archive, f"{WEIGHT}.npy", (2048, 4096), 32 << 20)
        with archive.open(f"{BIAS}.npy", "w") as member:
            np.save(member, arrays[BIAS])
    assert (export / HEAD_FILE).stat().st_size < 90_000
    tracemalloc.start()
    try:
        with pytest.raises(ServingError) as caught:
            MultiAdapterSession(export)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated while refusing it"
    message = str(caught.value)
    assert f"{export / HEAD_FILE}: the base model's head does not fit" in message, message
    assert "extra: not a head input of this graph" in message and \
        f"{WEIGHT}.npy: (2048, 4096), expected (32, 3)" in message, message
    # a file larger than the head can be is refused by its size, before it is opened as a zip
    export = _copy(cls_bank, tmp_path / "large")
    np.savez(export / HEAD_FILE, **arrays, padding=np.random.default_rng(0).random(40_000))
    with pytest.raises(ServingError, match=r"bytes, more than this bank's head can take"):
        MultiAdapterSession(export)


# ---- 3. a bank graph changed since export ------------------------------------------------------------------


def _tamper(graph_path: Path, case: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(graph_path))
    graph = model.graph

    def retype(name: str, elem_type: int, to: int) -> None:
        for value in graph.input:
            if value.name == name:
                value.type.tensor_type.elem_type = elem_type
        for node in graph.node:
            for k, x in enumerate(node.input):
                if x == name:
                    node.input[k] = f"{name}_cast"
        graph.node.insert(0, helper.make_node("Cast", [name], [f"{name}_cast"], to=to))

    if case == "extra_input":
        graph.input.append(helper.make_tensor_value_info("extra_in", TensorProto.FLOAT, [1]))
        graph.node.append(helper.make_node("Identity", ["extra_in"], ["extra_out"]))
        graph.output.append(helper.make_tensor_value_info("extra_out", TensorProto.FLOAT, [1]))
    elif case == "ids_int32":
        retype("adapter_ids", TensorProto.INT32, TensorProto.INT64)
    elif case == "input_ids_float":
        retype("input_ids", TensorProto.FLOAT, TensorProto.INT64)
    elif case == "logits_renamed":
        for value in graph.output:
            if value.name == "logits":
                value.name = "logits2"
        for node in graph.node:
            for k, x in enumerate(node.output):
                if x == "logits":
                    node.output[k] = "logits2"
    onnx.save(model, str(graph_path))


GRAPH_CASES = {
    "extra_input": "input 'extra_in' (tensor(float)) is not one bca-deploy feeds",
    "ids_int32": "input 'adapter_ids' is tensor(int32), expected tensor(int64)",
    "input_ids_float": "input 'input_ids' is tensor(float), expected tensor(int64)",
    "logits_renamed": "output 'logits' is missing (a text-classification graph gives it; outputs: logits2)",
}


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_a_changed_bank_graph_is_refused_at_start_in_one_line(cls_bank, tmp_path, case):
    from bca_deploy.serving import MultiAdapterSession

    export = _copy(cls_bank, tmp_path / case)
    graph = export / "model.onnx"
    _tamper(graph, case)
    needle = GRAPH_CASES[case]
    with pytest.raises(ServingError) as caught:
        MultiAdapterSession(export)
    message = str(caught.value)
    assert message.startswith(f"{graph}: not the adapter-bank graph bca-deploy export wrote (") and needle in message \
        and "\n" not in message, message
    result = CliRunner().invoke(main, ["inspect", str(export)])
    assert result.exit_code == 0 and "graph:        NOT servable: " in result.output and needle in result.output \
        and "serve with" not in result.output, result.output
    result = CliRunner().invoke(main, ["validate", "--onnx", str(export), "--model", str(cls_bank["model"]),
                                       "--adapter", str(cls_bank["adapter"]), "--cases", "2x4"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"Error: {graph}: ") and \
        needle in lines[0], result.output


def test_the_untouched_bank_passes_every_check(cls_bank):
    """The checks above refuse what export does not write, and nothing it does."""
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(cls_bank["onnx"])
    assert session.serves("classify") and session.adapters()[0].name == "a0"
    result = CliRunner().invoke(main, ["inspect", str(cls_bank["onnx"])])
    assert result.exit_code == 0 and "serve with:   bca-deploy serve" in result.output, result.output


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
