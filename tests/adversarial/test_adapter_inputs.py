"""Malformed adapter directories through every entry point that reads one.

Each of :data:`MALFORMATIONS` (wrong bytes, wrong JSON types, bad block sizes, dtypes, values, files, PEFT
variants, and valid adapters that do not fit the model) goes through read_adapter, load_adapter, the
streaming merge, the bank export's adapter reading, serving registration, export, and the CLI's inspect,
convert, merge and export. Every one must answer a BCAError with a message (the CLI: exit code 2, no
traceback) and leave the adapter, the base model directory, the in-memory model and any earlier output
exactly as they were. Then hypothesis mutates the config's JSON and the kernels at random.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adversarial_helpers import (  # noqa: E402
    CONFIG,
    MALFORMATIONS,
    WEIGHTS,
    Malformation,
    assert_bca_error,
    assert_clean_cli_error,
    count,
    leftovers,
    FUZZ,
    make_malformed,
    model_digest,
    figures_fixture,
    run_cli,
    same_model,
    tree_digest,
)
from exporters_helpers import build_model  # noqa: E402
from serving_helpers import banks  # noqa: E402,F401  (the session-wide bank exports)

from bca_deploy.adapter_io import load_adapter, read_adapter  # noqa: E402
from bca_deploy.errors import BCAError  # noqa: E402
from bca_deploy.merge import merge_checkpoint  # noqa: E402

figures = figures_fixture("test_adapter_inputs.py")


@pytest.fixture(scope="module")
def art(banks):  # noqa: F811
    """The tiny BERT bank: its model directory, a good adapter (query/value, p=8), the exported bank graph."""
    return banks("bert")


@pytest.fixture(scope="module")
def malformed(art, tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    return {m.name: make_malformed(art["adapters"]["a0"], root, m) for m in MALFORMATIONS}


@pytest.fixture(scope="module")
def session(art):
    from bca_deploy.serving import MultiAdapterSession

    return MultiAdapterSession(art["onnx"])


@pytest.fixture(scope="module")
def earlier_merge(art, tmp_path_factory):
    """A good merged model that a refused ``merge --overwrite`` must leave untouched."""
    out = tmp_path_factory.mktemp("earlier") / "merged"
    merge_checkpoint(art["model"], [(art["adapters"]["a0"], 1.0)], out, progress=False)
    return out


def test_catalog_covers_every_kind():
    names = [m.name for m in MALFORMATIONS]
    assert len(names) == len(set(names))
    assert {m.kind for m in MALFORMATIONS} == {"format", "misfit"}


@pytest.mark.parametrize("bad", MALFORMATIONS, ids=lambda m: m.name)
def test_library_entry_points_refuse(bad: Malformation, art, malformed, session, tmp_path):
    from bca_deploy.exporters import export
    from bca_deploy.exporters.bank import adapter_tensors

    directory = malformed[bad.name]
    inputs = {p: tree_digest(p) for p in (directory, art["model"])}

    if bad.kind == "format":
        error = assert_bca_error(lambda: read_adapter(directory), f"read_adapter({bad.name})")
        assert bad.needle in str(error), (bad.name, str(error))
    else:
        read_adapter(directory)  # a valid adapter: only applying it to this model must fail
    count("read_adapter")

    model = build_model("bert")
    before = model_digest(model)
    error = assert_bca_error(lambda: load_adapter(model, directory), f"load_adapter({bad.name})")
    assert bad.needle in str(error), (bad.name, str(error))
    assert same_model(before, model_digest(model)), f"{bad.name}: a refused load_adapter changed the model"
    load_adapter(model, art["adapters"]["a0"])  # nothing half-injected: 'default' is still free
    count("load_adapter")

    out = tmp_path / "merged"
    error = assert_bca_error(lambda: merge_checkpoint(art["model"], [(directory, 1.0)], out, progress=False),
                             f"merge_checkpoint({bad.name})")
    assert bad.needle in str(error), (bad.name, str(error))
    assert not out.exists() and leftovers(tmp_path, "merged") == []
    count("merge_checkpoint")

    def bank_slots():
        config, state = read_adapter(directory, validate=False)
        return adapter_tensors(config, state, session.layout, session.base_model_prefix, model_type="bert")

    assert_bca_error(bank_slots, f"bank adapter_tensors({bad.name})")
    count("bank adapter_tensors")

    adapters, snapshot = session.adapters(), session.snapshot()
    assert_bca_error(lambda: session.register("x", directory), f"session.register({bad.name})")
    assert session.adapters() == adapters and session.snapshot() is snapshot
    count("MultiAdapterSession.register")

    out = tmp_path / "onnx"
    assert_bca_error(lambda: export(art["model"], out, [directory], merge=True, task="feature-extraction",
                                    validate=False, verbose=False), f"export({bad.name})")
    assert not out.exists() and leftovers(tmp_path, "onnx") == []
    count("export")

    assert {p: tree_digest(p) for p in inputs} == inputs, f"{bad.name}: an input changed"


@pytest.mark.parametrize("bad", MALFORMATIONS, ids=lambda m: m.name)
def test_cli_refuses_without_traceback(bad: Malformation, art, malformed, earlier_merge, tmp_path):
    directory = malformed[bad.name]
    inputs = {p: tree_digest(p) for p in (directory, art["model"], earlier_merge)}

    result = run_cli(["inspect", directory])
    if bad.kind == "format":
        assert_clean_cli_error(result, ["inspect", bad.name])
    else:
        assert result.exit_code == 0, result.output
    count("cli inspect")

    result = run_cli(["convert", "--adapter", directory, "--to", "peft", "--out", tmp_path / "converted"])
    if bad.kind == "format":
        assert_clean_cli_error(result, ["convert", bad.name])
        assert not (tmp_path / "converted").exists()
    else:
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
    count("cli convert")

    # merge into a new directory, and over an earlier good merge with --overwrite: both refused, nothing changed
    for out, extra in ((tmp_path / "merged", []), (earlier_merge, ["--overwrite"])):
        args = ["merge", "--model", art["model"], "--adapter", directory, "--out", out, "--no-progress", *extra]
        assert_clean_cli_error(run_cli(args), [bad.name, *args])
        count("cli merge")
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path, "merged") == []

    args = ["export", "--model", art["model"], "--adapter", directory, "--merge", "--task", "feature-extraction",
            "--no-validate", "--out", tmp_path / "onnx"]
    assert_clean_cli_error(run_cli(args), [bad.name, *args])
    assert not (tmp_path / "onnx").exists()
    count("cli export")

    assert {p: tree_digest(p) for p in inputs} == inputs, f"{bad.name}: an input or an earlier output changed"


# ---- a weights file that declares GiBs (sparse: a few KB on disk) ----------------------------------------------

_GIANT = 1 << 30


def _sparse_giant(good: Path, directory: Path, name: str) -> None:
    """``good`` copied, its weights file rewritten with tensor ``name`` declared as F32 [2^28] (1 GiB, a hole)."""
    import struct

    shutil.copytree(good, directory)
    state = load_file(str(directory / WEIGHTS))
    state.pop(name, None)
    header, raw = {"__metadata__": {"format": "pt"}}, b""
    for key, tensor in state.items():
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [len(raw), len(raw) + len(data)]}
        raw += data
    header[name] = {"dtype": "F32", "shape": [_GIANT // 4], "data_offsets": [len(raw), len(raw) + _GIANT]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(directory / WEIGHTS, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw)
        f.truncate(8 + len(text) + len(raw) + _GIANT)


@pytest.mark.parametrize("name", ["encoder.layer.0.attention.self.query.bca_kernel", "lm_head.weight"],
                         ids=["kernel-declared-1GiB", "unexpected-tensor-declared-1GiB"])
def test_sparse_giant_refused_unread_everywhere(name, art, session, earlier_merge, tmp_path, monkeypatch):
    """Every entry point refuses it, naming the tensor, from the header: before, each read the declared GiB into
    memory first (inspect: ~3 GB RSS for this file). ``load_safetensors`` (every reader's way to the tensor data)
    fails the test if anything reads the data."""
    import bca_deploy.adapter_io as adapter_io
    from bca_deploy.exporters import export

    directory = tmp_path / "giant"
    _sparse_giant(art["adapters"]["a0"], directory, name)
    inputs = {p: tree_digest(p) for p in (art["model"], earlier_merge)}  # (hashing the giant would read its GiB)
    stats = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}

    def refuse(path):
        raise AssertionError(f"{path}: tensor data read")

    monkeypatch.setattr(adapter_io, "load_safetensors", refuse)
    needle = f"tensor {name}: declares F32 [{_GIANT // 4}], {_GIANT:,} bytes"
    model = build_model("bert")
    for what, call in (("read_adapter", lambda: read_adapter(directory)),
                       ("load_adapter", lambda: load_adapter(model, directory)),
                       ("merge_checkpoint", lambda: merge_checkpoint(art["model"], [(directory, 1.0)],
                                                                     tmp_path / "merged", progress=False)),
                       ("export", lambda: export(art["model"], tmp_path / "onnx", [directory], merge=True,
                                                 task="feature-extraction", validate=False, verbose=False))):
        error = assert_bca_error(call, what)
        assert needle in str(error) and "refused before reading any tensor data" in str(error), (what, str(error))
    error = assert_bca_error(lambda: session.register("giant", directory), "session.register")
    assert "refused unread" in str(error)  # the session's own bound, from the file's size
    for args in (["inspect", directory], ["convert", "--adapter", directory, "--to", "peft", "--out", tmp_path / "c"],
                 ["merge", "--model", art["model"], "--adapter", directory, "--out", earlier_merge, "--overwrite",
                  "--no-progress"]):
        result = run_cli(args)
        assert_clean_cli_error(result, args)
        assert needle in result.output, (args, result.output)
    assert not any((tmp_path / n).exists() for n in ("merged", "onnx", "c"))
    assert {p: tree_digest(p) for p in inputs} == inputs
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()} == stats


# ---- random mutations ----------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_MODULE = "encoder.layer.0.attention.self.query"
_PATHS = [
    ("format",), ("format_version",), ("layout",), ("target_modules",), ("block_size",), ("block_size_pattern",),
    ("scaling",), ("init",), ("modules",), ("modules", _MODULE), ("modules", _MODULE, "block_size"),
    ("modules", _MODULE, "scaling"), ("modules", _MODULE, "in_features"), ("modules", _MODULE, "out_features"),
    ("modules", _MODULE, "layer_type"), ("modules_to_save",), ("base_model",), ("base_model", "model_type"),
    ("task",), ("task", "type"), ("task", "head"), ("task", "architecture"),
]


def _set_path(data: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[path[-1]] = value


def _check_read_and_load(directory: Path, good: Path) -> bool:
    """read_adapter and load_adapter accept ``directory`` or refuse it with a BCAError, model untouched on refusal."""
    model = build_model("bert")
    before = model_digest(model)
    try:
        read_adapter(directory)
        load_adapter(model, directory)
        return True
    except BCAError as exc:
        assert str(exc).strip()
        assert same_model(before, model_digest(model)), "a refused load changed the model"
        load_adapter(model, good)
        return False
    finally:
        count("read_adapter (random)")
        count("load_adapter (random)")


@settings(max_examples=FUZZ * 3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(_PATHS), value=_JSON)
def test_random_config_values(art, tmp_path, path, value):
    good = art["adapters"]["a0"]
    directory = tmp_path / "mutant"
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(good, directory)
    data = json.loads((directory / CONFIG).read_text())
    if path[0] == "modules" and len(path) == 3 and path[1] not in data["modules"]:
        return
    _set_path(data, path, value)
    (directory / CONFIG).write_text(json.dumps(data))  # NaN/Infinity are written as literals: refused too
    _check_read_and_load(directory, good)


_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int64, torch.bool,
           torch.complex64, torch.uint8]


@settings(max_examples=FUZZ * 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(_DTYPES), shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
       special=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]))
def test_random_kernels(art, tmp_path, dtype, shape, special):
    good = art["adapters"]["a0"]
    directory = tmp_path / "mutant"
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(good, directory)
    state = load_file(str(directory / WEIGHTS))
    key = f"{_MODULE}.bca_kernel"
    kernel = torch.full(shape, 0.5).to(dtype)
    if special is not None and dtype.is_floating_point and kernel.numel():
        kernel.view(-1)[0] = special
    state[key] = kernel
    save_file(state, str(directory / WEIGHTS))
    accepted = _check_read_and_load(directory, good)
    expected = (dtype.is_floating_point and tuple(shape) == (4, 4, 8) and special is None)
    assert accepted == expected, (dtype, shape, special)
