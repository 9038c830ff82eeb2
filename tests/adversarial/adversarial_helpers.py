"""Malformed inputs and the checks every entry point must pass on them (shared by the adversarial tests).

Not a ``conftest.py`` (``tests/conftest.py`` is imported elsewhere as ``conftest``): test modules put this
folder on ``sys.path`` and import what they use.

The promise checked here: a malformed input gives a :class:`bca_deploy.errors.BCAError` subclass with a
message (the CLI: exit code 2, ``Error: ...``, no traceback), and leaves the inputs and any earlier output
exactly as they were (trees compared byte for byte, models tensor for tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))

from bca_deploy.cli import main as cli_main  # noqa: E402
from bca_deploy.errors import BCAError  # noqa: E402

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
#: Inputs tried per entry point, counted as the tests run (the README's reliability figures).
TRIED: dict[str, int] = {}


def count(entry_point: str, n: int = 1) -> None:
    TRIED[entry_point] = TRIED.get(entry_point, 0) + n


#: Random examples per property (scaled per test); BCA_FUZZ_EXAMPLES=1000 for a long run.
FUZZ = int(os.environ.get("BCA_FUZZ_EXAMPLES", "40"))


def figures_fixture(test_file: str):
    """A module-scoped autouse fixture that records the inputs ``test_file`` tried per entry point."""

    @pytest.fixture(scope="module", autouse=True)
    def figures():
        TRIED.clear()
        yield
        record("inputs tried", {"file": test_file, "per_entry_point": dict(sorted(TRIED.items()))})

    return figures


def record(topic: str, data: dict) -> None:
    """Append one JSON line to ``$BCA_RELIABILITY_LOG`` (when set): the figures of the README's reliability section."""
    path = os.environ.get("BCA_RELIABILITY_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"topic": topic, **data}) + "\n")


# ---- trees and models, before and after ----------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256 (files) | 'dir' | 'link -> target'}`` of everything under ``root``."""
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out: dict[str, str] = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            elif not path.is_file():  # a named pipe or a device: reading it would wait or never end
                out[rel] = "special"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def model_digest(model: torch.nn.Module) -> tuple:
    """Everything load_adapter could change: module types by path, tensors, trainable flags, modes."""
    modules = tuple((n, type(m).__name__, m.training) for n, m in model.named_modules())
    tensors = tuple((n, t.dtype, tuple(t.shape), t.detach().clone()) for n, t in model.state_dict().items())
    flags = tuple((n, p.requires_grad) for n, p in model.named_parameters())
    return modules, tensors, flags, tuple(sorted(model.__dict__.get("bca_adapter_configs", {})))


def same_model(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and len(a[1]) == len(b[1]) and all(
        x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a[1], b[1]))


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden siblings a writer of ``parent/name`` left behind."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}."))


# ---- the CLI -------------------------------------------------------------------------------------


def run_cli(args: list[str]):
    """Run ``bca-deploy args`` in-process; returns click's Result (exit code, output)."""
    return CliRunner().invoke(cli_main, [str(a) for a in args])


def assert_clean_cli_error(result, args) -> None:
    """Exit code 2 with one ``Error:`` message (click's usage errors included), never a traceback."""
    output = result.output
    assert result.exit_code == 2, (args, result.exit_code, output, result.exception)
    assert isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in output and "Error" in output, (args, output)


def assert_bca_error(call: Callable[[], object], what: str) -> BCAError:
    """``call()`` raises a BCAError with a non-empty message (any other exception fails the test)."""
    try:
        call()
    except BCAError as exc:
        assert str(exc).strip(), f"{what}: empty message from {type(exc).__name__}"
        return exc
    except Exception as exc:  # noqa: BLE001 - that is the failure being tested for
        raise AssertionError(f"{what}: {type(exc).__name__} instead of a BCAError: {exc}") from exc
    raise AssertionError(f"{what}: accepted")


# ---- malformed adapter directories --------------------------------------------------------------


@dataclass(frozen=True)
class Malformation:
    """One way to break a good adapter directory.

    Attributes:
        name: short id (test ids, messages).
        kind: ``"format"`` (refused by read_adapter already) or ``"misfit"`` (a valid adapter that does
            not fit the base model: refused by every entry point that applies it).
        apply: changes the copied adapter directory in place.
        needle: a piece of text the error message must contain.
    """

    name: str
    kind: str
    apply: Callable[[Path], None]
    needle: str


def _config(directory: Path) -> dict:
    return json.loads((directory / CONFIG).read_text())


def edit_config(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        data = _config(directory)
        fn(data)  # edits data in place (its return value is ignored)
        (directory / CONFIG).write_text(json.dumps(data))

    return apply


def raw_config(raw: bytes) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / CONFIG).write_bytes(raw)

    return apply


def _key_twice(directory: Path) -> None:
    """The config with its ``modules_to_save`` written a second time, emptied: Python's reader keeps the last."""
    text = (directory / CONFIG).read_text().rstrip()
    (directory / CONFIG).write_text(text[:-1] + ', "modules_to_save": []}')


def edit_tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        state = load_file(str(directory / WEIGHTS))
        fn(state)
        save_file(state, str(directory / WEIGHTS))

    return apply


def raw_weights(raw: bytes) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / WEIGHTS).write_bytes(raw)

    return apply


def first_module(data: dict) -> str:
    return sorted(data["modules"])[0]


def _set_module_field(field: str, value) -> Callable[[Path], None]:
    return edit_config(lambda d: d["modules"][first_module(d)].__setitem__(field, value))


def _first_kernel(state: dict) -> str:
    return sorted(k for k in state if k.endswith(".bca_kernel"))[0]


def _set_kernel(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def fn(state: dict) -> None:
        key = _first_kernel(state)
        state[key] = make(state[key])

    return edit_tensors(fn)


def _rename_first_module(new: str) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        data = _config(directory)
        old = first_module(data)
        data["modules"][new] = data["modules"].pop(old)
        (directory / CONFIG).write_text(json.dumps(data))
        state = load_file(str(directory / WEIGHTS))
        state[new + ".bca_kernel"] = state.pop(old + ".bca_kernel")
        save_file(state, str(directory / WEIGHTS))

    return apply


def _add_module(path: str, spec: dict, kernel_shape: tuple[int, ...]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        data = _config(directory)
        data["modules"][path] = spec
        (directory / CONFIG).write_text(json.dumps(data))
        state = load_file(str(directory / WEIGHTS))
        state[path + ".bca_kernel"] = torch.full(kernel_shape, 0.01)
        save_file(state, str(directory / WEIGHTS))

    return apply


def _saved_module(path: str, tensors: dict[str, torch.Tensor], task: dict | None = None) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        data = _config(directory)
        data["modules_to_save"] = [path]
        if task is not None:
            data["task"] = task
        (directory / CONFIG).write_text(json.dumps(data))
        state = load_file(str(directory / WEIGHTS))
        state.update({f"{path}.{k}": v for k, v in tensors.items()})
        save_file(state, str(directory / WEIGHTS))

    return apply


def _peft(fn: Callable[[dict, dict], None]) -> Callable[[Path], None]:
    """Rewrite the adapter as a PEFT C3A directory, then apply ``fn(config, state)``."""

    def apply(directory: Path) -> None:
        from bca_deploy.adapter_io import read_adapter
        from bca_deploy.peft_compat import to_peft

        config, state = read_adapter(directory)
        peft_config, peft_state = to_peft(config, state)
        fn(peft_config, peft_state)
        (directory / CONFIG).write_text(json.dumps(peft_config))
        save_file(peft_state, str(directory / WEIGHTS))

    return apply


def _peft_empty_kernel_of_impossible_shape(directory: Path) -> None:
    """A PEFT C3A directory whose first kernel declares shape [0, 10**20, 8]: 0 bytes, so the size rule holds."""
    _peft(lambda c, s: None)(directory)
    raw = (directory / WEIGHTS).read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    entries = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    out, chunks, offset = {k: v for k, v in header.items() if k == "__metadata__"}, [], 0
    for i, name in enumerate(entries):
        begin, end = header[name]["data_offsets"]
        chunk = b"" if i == 0 else data[begin:end]
        shape = [0, 10**20, 8] if i == 0 else header[name]["shape"]
        out[name] = {**header[name], "shape": shape, "data_offsets": [offset, offset + len(chunk)]}
        chunks.append(chunk)
        offset += len(chunk)
    text = json.dumps(out).encode()
    (directory / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def _remove(name: str) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return apply


def _replace_with_dir(name: str) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / name).unlink()
        (directory / name).mkdir()

    return apply


def _truncate(directory: Path) -> None:
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])


def _pickle_only(directory: Path) -> None:
    (directory / WEIGHTS).unlink()
    torch.save({"x": torch.zeros(1)}, directory / "adapter_model.bin")


def _head_task(num_labels: int, modules: list[str]) -> dict:
    return {"type": "seq-cls", "architecture": "BertForSequenceClassification",
            "head": {"modules": modules, "num_labels": num_labels,
                     "id2label": {str(i): f"L{i}" for i in range(num_labels)},
                     "label2id": {f"L{i}": i for i in range(num_labels)}, "problem_type": None}}


_DENSE = "encoder.layer.1.output.dense"  # a Linear(64 -> 32) of the tiny BERT, used as a stand-in head
_NORM = "encoder.layer.1.output.LayerNorm"

MALFORMATIONS: list[Malformation] = [
    # -- adapter_config.json: bytes, JSON, top-level types
    Malformation("config-not-utf8", "format", raw_config(b'\xff\xfe{"format": "bca-deploy"}'), "UTF-8"),
    Malformation("config-nested-json", "format", raw_config(b"[" * 100_000 + b"]" * 100_000), "nested"),
    Malformation("config-top-level-list", "format", raw_config(b"[1, 2]"), "JSON object"),
    Malformation("config-invalid-json", "format", raw_config(b'{"format": '), "not valid JSON"),
    Malformation("config-nan-literal", "format", lambda d: (d / CONFIG).write_text(
        (d / CONFIG).read_text().replace('"scaling": 1.0', '"scaling": NaN')), "NaN"),
    Malformation("config-empty-file", "format", raw_config(b""), "not valid JSON"),
    # Python's own error told the user to call sys.set_int_max_str_digits()
    Malformation("config-number-of-100k-digits", "format",
                 raw_config(b'{"format": "bca-deploy", "block_size": ' + b"9" * 100_000 + b"}"),
                 "a number of 100000 digits (999999999999...) is too long to be read (at most 4300)"),
    Malformation("format-version-99", "format", edit_config(lambda d: d.__setitem__("format_version", 99)),
                 "format_version 99"),
    Malformation("format-missing", "format", edit_config(lambda d: d.pop("format")), "'format'"),
    # -- wrong JSON types where an object / list / number belongs
    Malformation("modules-is-string", "format", edit_config(lambda d: d.__setitem__("modules", "query")), "modules"),
    Malformation("modules-is-list", "format", edit_config(lambda d: d.__setitem__("modules", [])), "modules"),
    Malformation("module-spec-is-string", "format",
                 edit_config(lambda d: d["modules"].__setitem__(first_module(d), "p=8")), "expected an object"),
    Malformation("module-spec-unknown-key", "format", _set_module_field("bias", True), "unknown key"),
    Malformation("modules-to-save-is-string", "format",
                 edit_config(lambda d: d.__setitem__("modules_to_save", "classifier")), "modules_to_save"),
    Malformation("modules-to-save-ints", "format", edit_config(lambda d: d.__setitem__("modules_to_save", [1, 2])),
                 "modules_to_save"),
    Malformation("target-modules-int", "format", edit_config(lambda d: d.__setitem__("target_modules", 5)),
                 "target_modules"),
    Malformation("base-model-is-list", "format", edit_config(lambda d: d.__setitem__("base_model", [])),
                 "base_model"),
    Malformation("task-is-string", "format", edit_config(lambda d: d.__setitem__("task", "seq-cls")), "'task'"),
    Malformation("task-head-is-list", "format",
                 edit_config(lambda d: d.__setitem__("task", {"type": "seq-cls", "head": [1]})), "task.head"),
    Malformation("task-num-labels-string", "format", edit_config(lambda d: d.__setitem__(
        "task", {**_head_task(2, [_DENSE]), "head": {**_head_task(2, [_DENSE])["head"], "num_labels": "2"}})),
        "num_labels"),
    # -- block sizes, dims, scaling, layer types
    Malformation("block-size-zero", "format", _set_module_field("block_size", 0), "block_size"),
    Malformation("block-size-string", "format", _set_module_field("block_size", "8"), "block_size"),
    Malformation("block-size-bool", "format", _set_module_field("block_size", True), "block_size"),
    Malformation("block-size-non-divisor", "format", _set_module_field("block_size", 3), "does not divide"),
    Malformation("block-size-huge", "format", _set_module_field("block_size", 10**40), "does not divide"),
    Malformation("default-block-size-zero", "format", edit_config(lambda d: d.__setitem__("block_size", 0)),
                 "block_size"),
    Malformation("in-features-zero", "format", _set_module_field("in_features", 0), "in_features"),
    Malformation("in-features-huge", "format", _set_module_field("in_features", 10**30), "in_features"),
    Malformation("scaling-negative", "format", _set_module_field("scaling", -1.0), "scaling"),
    Malformation("scaling-zero", "format", _set_module_field("scaling", 0), "scaling"),
    Malformation("scaling-overflow", "format", lambda d: (d / CONFIG).write_text(
        (d / CONFIG).read_text().replace('"scaling": 1.0', '"scaling": 1e999')), "scaling"),
    Malformation("scaling-string", "format", _set_module_field("scaling", "1"), "scaling"),
    Malformation("layer-type-conv2d", "format", _set_module_field("layer_type", "conv2d"), "layer_type"),
    Malformation("module-path-lone-surrogate", "format", edit_config(
        lambda d: d["modules"].__setitem__("encoder.\ud800", d["modules"].pop(first_module(d)))), "surrogate"),
    Malformation("module-path-with-space", "format", _rename_first_module("encoder.layer 0.query"), "module path"),
    # -- tensors
    Malformation("modules-empty-kernels-present", "format", edit_config(lambda d: d.__setitem__("modules", {})),
                 "unexpected"),
    Malformation("kernel-complex", "format", _set_kernel(lambda k: k.to(torch.complex64)), "complex64"),
    Malformation("kernel-bool", "format", _set_kernel(lambda k: k != 0), "bool"),
    Malformation("kernel-int32", "format", _set_kernel(lambda k: k.to(torch.int32)), "int32"),
    Malformation("kernel-float8", "format", _set_kernel(lambda k: k.to(torch.float8_e4m3fn)), "float8_e4m3fn"),
    Malformation("kernel-nan", "format", _set_kernel(lambda k: k.index_fill(0, torch.tensor([0]), float("nan"))),
                 "NaN"),
    Malformation("kernel-inf", "format", _set_kernel(lambda k: k.index_fill(0, torch.tensor([0]), float("inf"))),
                 "NaN/Inf"),
    Malformation("kernel-wrong-shape", "format", _set_kernel(lambda k: k[:, :, :4].contiguous()), "shape"),
    Malformation("kernel-empty", "format", _set_kernel(lambda k: k[:0].contiguous()), "empty"),
    Malformation("kernel-missing", "format", edit_tensors(lambda s: s.pop(_first_kernel(s))), "missing"),
    Malformation("tensor-unexpected", "format", edit_tensors(lambda s: s.__setitem__("lm_head.weight", torch.zeros(2, 2))),
                 "unexpected"),
    Malformation("saved-tensor-nan", "format", _saved_module(_NORM, {"weight": torch.full((32,), float("nan")),
                                                                     "bias": torch.zeros(32)}), "NaN"),
    Malformation("saved-module-without-tensors", "format",
                 edit_config(lambda d: d.__setitem__("modules_to_save", [_NORM])), "no tensors"),
    Malformation("head-num-labels-mismatch", "format", _saved_module(
        _DENSE, {"weight": torch.zeros(32, 64), "bias": torch.zeros(32)}, _head_task(5, [_DENSE])), "num_labels"),
    # a label name is in every classification answer: a 1 MB one was served, twice in each (helper-61)
    Malformation("head-label-name-1mb", "format", _saved_module(
        _DENSE, {"weight": torch.zeros(32, 64), "bias": torch.zeros(32)}, {**_head_task(32, [_DENSE]), "head": {
            **_head_task(32, [_DENSE])["head"], "id2label": {**{str(i): f"L{i}" for i in range(32)}, "0": "x" * 2**20},
            "label2id": {**{f"L{i}": i for i in range(1, 32)}, "x" * 2**20: 0}}}),
        "id2label values must be label names of at most 1000 characters"),
    # -- files
    Malformation("weights-truncated", "format", _truncate, "safetensors"),
    Malformation("weights-empty", "format", raw_weights(b""), "safetensors"),
    Malformation("weights-garbage", "format", raw_weights(os.urandom(4096)), "safetensors"),
    Malformation("weights-header-too-long", "format", raw_weights(struct.pack("<Q", 1 << 60) + b"{}"), "safetensors"),
    Malformation("weights-missing", "format", _remove(WEIGHTS), "no such file"),
    Malformation("weights-pickle-only", "format", _pickle_only, "pickle"),
    Malformation("weights-is-directory", "format", _replace_with_dir(WEIGHTS), "safetensors"),
    Malformation("config-missing", "format", _remove(CONFIG), "no such"),
    # last-one-wins would change a field silently (a second "task": null: the labels)
    Malformation("config-key-twice", "format", _key_twice, "'modules_to_save' appears twice"),
    Malformation("config-is-directory", "format", _replace_with_dir(CONFIG),
                 "a directory, not a regular file; expected a JSON adapter config"),
    # -- PEFT C3A directories
    Malformation("peft-block-size-string", "format", _peft(lambda c, s: c.__setitem__("block_size", "x")), "block_size"),
    Malformation("peft-pattern-is-list", "format", _peft(lambda c, s: c.__setitem__("block_size_pattern", [1])),
                 "block_size_pattern"),
    Malformation("peft-kernel-empty", "format", _peft(lambda c, s: s.__setitem__(
        sorted(s)[0], torch.zeros(0, 4, 8))), "non-empty"),
    Malformation("peft-kernel-int", "format", _peft(lambda c, s: s.__setitem__(
        sorted(s)[0], s[sorted(s)[0]].to(torch.int64))), "floating"),
    # one dtype rule for both formats: PEFT float8 kernels were widened and accepted where bca-deploy's were refused
    Malformation("peft-kernel-float8", "format", _peft(lambda c, s: s.__setitem__(
        sorted(s)[0], s[sorted(s)[0]].to(torch.float8_e5m2))), "float8_e5m2; adapter tensors must be real floating"),
    Malformation("peft-lora", "format", _peft(lambda c, s: c.__setitem__("peft_type", "LORA")), "LORA"),
    # finite float64 values past float32's range: refused as "has NaN/Inf values", which the file does not hold
    Malformation("peft-kernel-float64-past-float32", "format", _peft(lambda c, s: s.__setitem__(
        sorted(s)[0], s[sorted(s)[0]].double() * 1e300)), "float64 values up to"),
    # taken for no task (a classifier for its bare base model's task) where PEFT refuses the file
    Malformation("peft-task-type-unknown", "format", _peft(lambda c, s: c.__setitem__("task_type", "seq_cls")),
                 "task_type must be one of PEFT's task types"),
    # the fuzz report's: a TypeError each, before the fields were checked
    Malformation("peft-init-weights-list", "format", _peft(lambda c, s: c.__setitem__("init_weights", ["x"])),
                 "init_weights"),
    Malformation("peft-target-modules-with-null", "format", _peft(lambda c, s: c.__setitem__(
        "target_modules", ["query", None])), "target_modules"),
    # a kernel far past the size limit is refused from its shape, before any conversion allocates for it
    Malformation("peft-kernel-too-wide", "format", _peft(lambda c, s: s.__setitem__(
        sorted(s)[0], torch.zeros(1, 1, 2**25, dtype=torch.float16))), "out_features"),
    # an empty kernel passes the size rule whatever its other dimensions: torch overflowed on [0, 10**20, 8] ("Internal
    # error (TypeError)" from every reader)
    Malformation("peft-kernel-impossible-shape", "format", _peft_empty_kernel_of_impossible_shape, "is impossible"),
    # -- valid adapters that do not fit the model
    Malformation("conv1d-declared-on-linear", "misfit", edit_config(
        lambda d: [spec.__setitem__("layer_type", "conv1d") for spec in d["modules"].values()]), "Conv1D"),
    Malformation("linear-on-embedding-table", "misfit", _add_module(
        "embeddings.word_embeddings",
        {"block_size": 8, "scaling": 1.0, "in_features": 32, "out_features": 128, "layer_type": "linear"},
        (16, 4, 8)), "Embedding"),
    Malformation("model-type-llama", "misfit", edit_config(lambda d: d["base_model"].__setitem__("model_type", "llama")),
                 "llama"),
    Malformation("module-not-in-model", "misfit", _rename_first_module("encoder.layer.7.attention.self.query"),
                 "encoder.layer.7"),
    Malformation("shape-mismatch", "misfit", _add_module(
        "encoder.layer.0.attention.self.key",
        {"block_size": 8, "scaling": 1.0, "in_features": 64, "out_features": 64, "layer_type": "linear"},
        (8, 8, 8)), "in=64"),
    Malformation("saved-tensor-wrong-shape", "misfit", _saved_module(_NORM, {"weight": torch.ones(31),
                                                                             "bias": torch.zeros(32)}), "(31,)"),
    Malformation("saved-module-not-in-model", "misfit", _saved_module("score", {"weight": torch.zeros(2, 32)}),
                 "score"),
]


def make_malformed(good: Path, root: Path, bad: Malformation) -> Path:
    """A copy of the adapter directory ``good`` under ``root``, broken by ``bad``."""
    directory = root / bad.name
    shutil.copytree(good, directory)
    bad.apply(directory)
    return directory
