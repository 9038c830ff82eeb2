"""Adapter-bank exports (``export(..., merge=False, bank=True)``) on tiny BERT and Llama, three adapters each.

The bank graph is checked against references that do not share its bank code:

- each adapter's **single-adapter unmerged export** (``export(model_dir, out, [adapter], merge=False)``,
  itself validated against PyTorch), run on the same inputs with every bank row set to that adapter;
- the PyTorch model row by row (a row alone, its adapter active) for mixed batches;
- the PyTorch model under ``mixed_adapters`` for the per-adapter ``.onnx_adapter`` files activated with
  ``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter``.

The banks come from ``tests/serving/serving_helpers.py`` (shared with the serving tests: exported once
per session); the single-adapter exports are cached here, module-level.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from bca_deploy.exporters import export
from bca_deploy.exporters.bank import (
    ADAPTER_FILE_SUFFIX,
    ADAPTERS_DIR,
    BASE_SLOT,
    SLOT_AXIS,
    adapter_slot,
    adapter_tensors,
    bank_layout,
    layout_from_dict,
    stack_bank,
)
from bca_deploy.exporters.errors import ExportError, ExportMetadataError, UnsupportedExportError
from bca_deploy.exporters.metadata import read_export_metadata
from serving_helpers import (  # noqa: F401
    EXPORTED,
    TASKS,
    banks,
    row_alone,
    save_tiny_adapter,
    token_rows,
    torch_model,
)

from bca_deploy import inject, read_adapter, save_adapter
from bca_deploy.errors import AdapterMismatchError
from bca_deploy.inject import mixed_adapters

ATOL = 1e-4
NAMES = ["bert", "llama"]
LAYERS = 2  # build_model's layer count

_SINGLE: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="session")
def single(banks, tmp_path_factory):
    """``single(model, adapter) -> out_dir``: the validated single-adapter unmerged export of one bank adapter."""

    def get(name: str, adapter: str) -> Path:
        key = (name, adapter)
        if key not in _SINGLE:
            art = banks(name)
            out = tmp_path_factory.mktemp(f"single-{name}-{adapter}") / "onnx"
            _SINGLE[key] = export(art["model"], out, [art["adapters"][adapter]], merge=False, task=TASKS[name],
                                  cases=[(2, 5)], verbose=False)  # validated on one shape: it is a reference
        return _SINGLE[key]

    return get


def ort_session(directory: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])


def base_feeds(session, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for unpadded rows ``ids`` (B, T): mask of ones, zero token types, positions, empty past."""
    feeds = {"input_ids": ids.astype(np.int64)}
    for inp in session.get_inputs():
        if inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(feeds["input_ids"])
        elif inp.name == "token_type_ids":
            feeds[inp.name] = np.zeros_like(feeds["input_ids"])
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64).copy()
        elif inp.name.startswith("past_key_values."):
            shape = [ids.shape[0] if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(inp.shape)]
            feeds[inp.name] = np.zeros(shape, dtype=np.float32)
    return feeds


def step_feeds(session, outputs: dict[str, np.ndarray], new: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
    """Inputs of one decoding step (``new`` (B, 1)) after a prefill of ``past_len`` tokens."""
    feeds = {"input_ids": new.astype(np.int64), "attention_mask": np.ones((new.shape[0], past_len + 1), dtype=np.int64),
             "position_ids": np.full((new.shape[0], 1), past_len, dtype=np.int64)}
    for name, value in outputs.items():
        if name.startswith("present."):
            feeds[name.replace("present", "past_key_values", 1)] = value
    return {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}


def run(session, feeds, run_options=None) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds, run_options), strict=True))


def random_ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 128, size=(batch, length)).astype(np.int64)


def bank_meta(art: dict) -> dict:
    return json.loads((art["onnx"] / "bca_export.json").read_text())["bank"]


def main_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return outputs["logits"] if "logits" in outputs else outputs["last_hidden_state"]


# ---- what the export wrote ------------------------------------------------------------------------------


def _expected_layout(name: str) -> set[tuple[str, int]]:
    """(module leaf name, block size) pairs the bank must hold, from the adapters' specs (not from the export)."""
    return {(t.rsplit(".", 1)[-1] if name == "llama" else t, p) for t, p in
            ((t, p) for targets, p, _ in EXPORTED[name].values() for t in targets)}


@pytest.mark.parametrize("name", NAMES)
def test_bank_metadata_and_files(name, banks):
    import onnxruntime as ort

    art = banks(name)
    meta = json.loads((art["onnx"] / "bca_export.json").read_text())
    assert meta["merged"] is False and meta["task"] == TASKS[name]
    rows = meta["validation"]["rows"]
    assert rows and all(r["passed"] for r in rows)
    assert any("file=" in r["case"] for r in rows)  # the adapter files were validated too
    bank = meta["bank"]
    assert bank["ids_input"] == "adapter_ids" and bank["base_slot"] == BASE_SLOT == 0
    assert bank["slots"] == [None, *EXPORTED[name]]
    layout = layout_from_dict(bank["tensors"])
    # one bank input per (adapted module, block size); 'intermediate.dense' and 'query' are BERT leaf paths
    got = set()
    for entry in layout.values():
        leaf = entry.module.rsplit(".", 1)[-1]
        if name == "bert" and entry.module.endswith("intermediate.dense"):
            leaf = "intermediate.dense"
        got.add((leaf, entry.block_size))
    assert got == _expected_layout(name)
    assert len(layout) == LAYERS * len(got)
    assert set(bank["adapter_files"]) == set(EXPORTED[name])
    for adapter, relative in bank["adapter_files"].items():
        path = art["onnx"] / relative
        assert path.is_file() and path.parent.name == ADAPTERS_DIR and path.name == adapter + ADAPTER_FILE_SUFFIX
        adapter_file = ort.AdapterFormat.read_adapter(str(path))  # owns the parameters' memory: keep it alive
        params = {k: np.array(v.numpy(), copy=True) for k, v in adapter_file.get_parameters().items()}
        assert set(params) == set(layout)  # every bank input, zeros where the adapter does not touch it
        for key, value in params.items():
            assert value.shape == layout[key].bank_shape(2)
            assert not np.take(value, 0, axis=SLOT_AXIS).any()  # slot 0: the base model
        touched = {k for k, v in params.items() if np.take(v, 1, axis=SLOT_AXIS).any()}
        targets, p, _ = EXPORTED[name][adapter]
        assert touched == {k for k, e in layout.items() if e.block_size == p and any(
            e.module.endswith("." + t) for t in targets)}


@pytest.mark.parametrize("name", NAMES)
def test_bank_graph_inputs(name, banks):
    art = banks(name)
    model = onnx.load(str(art["onnx"] / "model.onnx"))
    layout = layout_from_dict(bank_meta(art)["tensors"])
    inputs = {i.name: i for i in model.graph.input}
    ids = inputs["adapter_ids"].type.tensor_type
    assert ids.elem_type == onnx.TensorProto.INT64 and len(ids.shape.dim) == 1
    initializers = {t.name: t for t in model.graph.initializer}
    for key, entry in layout.items():
        assert key in inputs and key in initializers  # overridable: an input with a default
        dims = inputs[key].type.tensor_type.shape.dim
        two, two_f, q, o = entry.slot_shape
        assert dims[SLOT_AXIS].dim_param and SLOT_AXIS == 0
        assert [d.dim_value for d in dims[1:]] == [two, two_f, q, o]
        assert list(initializers[key].dims) == [len(EXPORTED[name]) + 1, two, two_f, q, o]


# ---- parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,adapter", [(n, a) for n in NAMES for a in ("a0", "a1", "a2")])
def test_every_row_on_one_adapter_equals_its_single_export(name, adapter, banks, single):
    art = banks(name)
    bank, alone = ort_session(art["onnx"]), ort_session(single(name, adapter))
    slot = bank_meta(art)["slots"].index(adapter)
    ids = random_ids(3, 6, seed=1)
    feeds = base_feeds(alone, ids)
    want = run(alone, feeds)
    got = run(bank, {**feeds, "adapter_ids": np.full(3, slot, dtype=np.int64)})
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=0, err_msg=key)
    if name == "llama":  # one decoding step with the past each graph produced
        new = random_ids(3, 1, seed=2)
        want2 = run(alone, step_feeds(alone, want, new, 6))
        got2 = run(bank, {**step_feeds(bank, got, new, 6), "adapter_ids": np.full(3, slot, dtype=np.int64)})
        for key in want2:
            np.testing.assert_allclose(got2[key], want2[key], atol=ATOL, rtol=0, err_msg=f"step 2 {key}")
    # the adapter changes the output (the comparison could fail)
    base = run(bank, {**feeds, "adapter_ids": np.zeros(3, dtype=np.int64)})
    assert np.abs(main_output(base) - main_output(want)).max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_mixed_batch_rows_equal_each_row_alone(name, banks, single):
    art = banks(name)
    bank = ort_session(art["onnx"])
    slots = bank_meta(art)["slots"]
    choice = ["a0", None, "a2", "a1", "a1", None, "a0", "a2", "a0"]
    ids = random_ids(len(choice), 5, seed=3)
    got = main_output(run(bank, {**base_feeds(bank, ids),
                                 "adapter_ids": np.array([slots.index(c) for c in choice], dtype=np.int64)}))
    base_model = torch_model(name)
    for b, adapter in enumerate(choice):
        if adapter is None:
            want = row_alone(base_model, ids[b].tolist(), None).numpy()
        else:
            sess = ort_session(single(name, adapter))
            want = main_output(run(sess, base_feeds(sess, ids[b:b + 1])))[0]
        np.testing.assert_allclose(got[b], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")


@pytest.mark.parametrize("name", NAMES)
def test_adapter_files_with_lora_adapter_equal_pytorch(name, banks):
    import onnxruntime as ort

    art = banks(name)
    session = ort_session(art["onnx"])
    model = torch_model(name)
    ids = random_ids(4, 6, seed=4)
    feeds = base_feeds(session, ids)
    for adapter, relative in bank_meta(art)["adapter_files"].items():
        lora = ort.LoraAdapter()
        lora.Load(str(art["onnx"] / relative))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        got = main_output(run(session, {**feeds, "adapter_ids": np.array([1, 0, 0, 1], dtype=np.int64)}, options))
        with torch.no_grad(), mixed_adapters(model, [adapter, None, None, adapter]):
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(4, 6, dtype=torch.long))
        want = (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=adapter)
        # the file really replaced the embedded bank: slot 1 of the graph's default bank is a0
        if adapter != "a0":
            default = main_output(run(session, {**feeds, "adapter_ids": np.array([1, 0, 0, 1], dtype=np.int64)}))
            assert np.abs(default[0] - got[0]).max() > 1e-3


def test_fed_bank_serves_an_adapter_that_was_not_exported(banks):
    """adapter_tensors + stack_bank on an adapter read from disk, fed as the bank inputs: PyTorch parity."""
    art = banks("llama")
    session = ort_session(art["onnx"])
    layout = layout_from_dict(bank_meta(art)["tensors"])
    config, state = read_adapter(art["extra"]["extra"])
    tensors = adapter_tensors(config, state, layout, "model")
    feeds = stack_bank([None, None, tensors], layout)  # slot 1 left empty: zeros = base as well
    ids = random_ids(3, 5, seed=5)
    got = run(session, {**base_feeds(session, ids), **feeds, "adapter_ids": np.array([2, 0, 1], dtype=np.int64)})
    model = torch_model("llama")
    for b, adapter in enumerate(["extra", None, None]):
        np.testing.assert_allclose(got["logits"][b], row_alone(model, ids[b].tolist(), adapter).numpy(), atol=ATOL,
                                   rtol=0, err_msg=f"row {b}")


def test_generation_bank_computes_the_last_positions_logits_when_asked(banks):
    """``logits_to_keep`` = k: the logits of the last k positions only, equal to PyTorch's for each row (left-padded
    rows of different lengths and adapters); the default 0 keeps every position. An encoder bank has no such input."""
    art = banks("llama")
    bank = ort_session(art["onnx"])
    assert "logits_to_keep" in {i.name for i in bank.get_overridable_initializers()}
    assert "logits_to_keep" not in {i.name for i in ort_session(banks("bert")["onnx"]).get_overridable_initializers()}
    slots = bank_meta(art)["slots"]
    choice, lengths = ["a0", None, "a2", "a1"], [7, 3, 5, 7]
    rows = [random_ids(1, n, seed=20 + b)[0] for b, n in enumerate(lengths)]
    ids = np.zeros((len(rows), 7), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, 7 - len(row):], mask[b, 7 - len(row):] = row, 1
    feeds = {**base_feeds(bank, ids), "attention_mask": mask,
             "position_ids": np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1),
             "adapter_ids": np.array([slots.index(c) for c in choice], dtype=np.int64)}
    every = bank.run(["logits"], feeds)[0]
    last = bank.run(["logits"], {**feeds, "logits_to_keep": np.array(1, dtype=np.int64)})[0]
    two = bank.run(["logits"], {**feeds, "logits_to_keep": np.array(2, dtype=np.int64)})[0]
    assert every.shape[:2] == (4, 7) and last.shape[:2] == (4, 1) and two.shape[:2] == (4, 2)
    np.testing.assert_array_equal(two, every[:, -2:])
    model = torch_model("llama")
    for b, (row, adapter) in enumerate(zip(rows, choice, strict=True)):
        want = row_alone(model, row.tolist(), adapter).numpy()
        np.testing.assert_allclose(last[b, 0], want[-1], atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")
    # the present key/values do not depend on it: the next step still sees the whole prompt
    outputs = [o.name for o in bank.get_outputs()]
    np.testing.assert_array_equal(bank.run(outputs[1:2], feeds)[0],
                                  bank.run(outputs[1:2], {**feeds, "logits_to_keep": np.array(1)})[0])


def _logits_graph(lm_head_delta: bool):
    """A tiny graph ``logits = tanh(norm(x) @ W + b)`` (plus ``x @ V(x)``, a weight that is not constant)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 6), dtype=np.float32), "W")
    b = numpy_helper.from_array(np.zeros(6, dtype=np.float32), "b")
    nodes = [helper.make_node("Mul", ["x", "x"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"]),
             helper.make_node("Add", ["y", "b"], ["z"])]
    if lm_head_delta:  # an output layer whose second operand is computed from the activations
        nodes += [helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["ht", "h"], ["v"]),
                  helper.make_node("MatMul", ["h", "v"], ["d"]),
                  helper.make_node("Slice", ["d", "starts", "ends", "axes"], ["d6"]),
                  helper.make_node("Add", ["z", "d6"], ["z2"])]
        extra = [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
                 for n, v in (("starts", [0]), ("ends", [6]), ("axes", [2]))]
    else:
        extra = []
    nodes.append(helper.make_node("Tanh", [nodes[-1].output[0]], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", 6])],
                              [w, b, *extra])
    return graph


@pytest.mark.parametrize("lm_head_delta", [False, True])
def test_logits_to_keep_is_added_only_where_the_logits_are_positionwise(lm_head_delta):
    """The slice goes in front of an output layer reached from ``logits`` through position-wise ops with one
    activation input; a graph that mixes positions on the way (here: a weight computed from every position) is
    left as it was, computing every position."""
    from bca_deploy.exporters.bank import _keep_last_logits

    graph = _logits_graph(lm_head_delta)
    producers = {out: node for node in graph.node for out in node.output}
    before, extra, reshaped = {}, [], set()
    added = _keep_last_logits(graph, producers, {t.name: t for t in graph.initializer}, before, extra, reshaped)
    assert added is not lm_head_delta
    if added:
        (matmul,) = [n for n in graph.node if n.op_type == "MatMul"]
        assert [n.op_type for n in before[id(matmul)]] == ["Neg", "Reshape", "Slice"]
        assert matmul.input[0] == before[id(matmul)][-1].output[0]
        assert {"y", "z", "logits"} <= reshaped
    else:
        assert not before and not extra and not reshaped


def _branch_reading_graph(placeholder: str | None = None):
    """``y = If(cond, then: x + c, else: If(cond, then: x * d, else: x))``: ``c`` and ``d`` are Constants of the
    main graph read only inside the branches (``d`` two levels down), ``dead`` a Constant nothing reads; with
    ``placeholder``, an initializer of that name that only the then-branch reads (as ``x + placeholder``)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype=np.float32):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype)))

    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    inner = helper.make_node("If", ["cond"], ["inner_y"],
                             then_branch=branch("inner_then", [helper.make_node("Mul", ["x", "d"], ["xd"])], "xd"),
                             else_branch=branch("inner_else", [helper.make_node("Identity", ["x"], ["xi"])], "xi"))
    then_nodes = [helper.make_node("Add", ["x", "c"], ["xc"])]
    if placeholder:
        then_nodes.append(helper.make_node("Add", ["xc", placeholder], ["xcp"]))
    outer = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", then_nodes, then_nodes[-1].output[0]),
                             else_branch=branch("else", [inner], "inner_y"))
    nodes = [const("cond", True, np.bool_), const("c", [1.0]), const("d", [2.0]), const("dead", [3.0]), outer]
    inits = [] if placeholder is None else [numpy_helper.from_array(np.zeros(1, np.float32), placeholder)]
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)


def test_tensors_read_inside_subgraphs_are_used():
    """A Constant read only inside an ``If`` branch (DeBERTa-v2's relative-position buckets export that way) is
    used: pruning after the bank rewrite kept it (it dropped it, and onnx refused the graph as not topologically
    sorted), and what the branch computes counts as computed from it; a Constant nothing reads is still pruned."""
    import onnx

    from bca_deploy.exporters.bank import _downstream, _prune_dead

    graph = _branch_reading_graph()
    kept = _prune_dead(list(graph.node), {"y"})
    assert [n.output[0] for n in kept] == ["cond", "c", "d", "y"]
    assert {"y"} <= _downstream(kept, ["c"]) and {"y"} <= _downstream(kept, ["d"])
    del graph.node[:]
    graph.node.extend(kept)
    onnx.checker.check_model(onnx.helper.make_model(graph))


def test_bank_input_read_inside_a_subgraph_is_refused(tmp_path):
    """A bank placeholder an ``If`` branch reads cannot be gathered per row there: the rewrite refuses it, naming
    the node, instead of leaving the branch reading the stacked (S, 1, R, q, o) bank."""
    import onnx

    from bca_deploy.exporters.bank import BankTensor, rewrite_as_bank

    entry = BankTensor("m", 2, 2, 2, "linear")
    path = tmp_path / "model.onnx"
    onnx.save_model(onnx.helper.make_model(_branch_reading_graph(entry.name)), str(path))
    with pytest.raises(ExportError, match=rf"bank input {re.escape(entry.name)} feeds a If node"):
        rewrite_as_bank(path, {entry.name: entry}, {})


@pytest.mark.parametrize("name", NAMES)
def test_validate_rechecks_a_bank_export_with_its_adapters(name, banks, tmp_path):
    """``bca-deploy validate`` of a ``--bank`` export (it used to ask for a ``slots=`` no caller could pass): mixed
    batches over every slot and each adapter file, as the export checked them; adapters missing or out of slot
    order are refused with the slots named."""
    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.exporters import validate

    art = banks(name)
    adapter_dirs = [art["adapters"][n] for n in EXPORTED[name]]  # slot order
    report = validate(art["onnx"], art["model"], adapter_dirs, cases=[(3, 5)], verbose=False)
    assert report.passed and any("file=" in row.case for row in report.rows)
    assert {row.case.split(" file=")[1] for row in report.rows if "file=" in row.case} == set(EXPORTED[name])
    for wrong in ([], adapter_dirs[::-1], adapter_dirs[:1]):
        with pytest.raises(UnsupportedExportError, match="adapter bank of slots") as caught:
            validate(art["onnx"], art["model"], wrong, verbose=False)
        assert all(n in str(caught.value) for n in EXPORTED[name])
    hostile = tmp_path / "hostile-slots"
    shutil.copytree(art["onnx"], hostile)
    meta = json.loads((hostile / "bca_export.json").read_text())
    (hostile / "bca_export.json").write_text(json.dumps({**meta, "bank": {**meta["bank"], "slots": 5}}))
    with pytest.raises(ExportMetadataError, match="bank.slots must be a list"):
        validate(hostile, art["model"], adapter_dirs, verbose=False)
    args = ["validate", "--onnx", str(art["onnx"]), "--model", str(art["model"]), "--cases", "2x4"]
    result = CliRunner().invoke(main, [*args, *(f"--adapter={d}" for d in adapter_dirs)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output and "in that order" in result.output


def test_bank_layout_of_a_model(banks):
    art = banks("bert")
    layout = bank_layout(torch_model("bert"), list(EXPORTED["bert"]))
    assert layout == layout_from_dict(bank_meta(art)["tensors"])
    with pytest.raises(ExportError, match="nothing to bank"):
        bank_layout(torch_model("bert"), ["not-there"])


# ---- refusals -------------------------------------------------------------------------------------------


def test_bank_with_merge_is_refused_before_anything_is_written(banks, tmp_path):
    art = banks("bert")
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExportError, match="merge"):
        export(art["model"], out, list(art["adapters"].values()), merge=True, bank=True, task=TASKS["bert"],
               verbose=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UnsupportedExportError):  # refused before the model is even read
        export(tmp_path / "no-such-model", out, [tmp_path / "no-such-adapter"], merge=True, bank=True, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_modules_to_save_adapter_is_refused(banks, tmp_path):
    from bca_deploy.serving import MultiAdapterSession

    art = banks("bert")
    head = save_tiny_adapter("bert", tmp_path / "adapters" / "head", ["query"], 8, 40,
                             modules_to_save=["encoder.layer.1.output.LayerNorm"])
    config, state = read_adapter(head)
    layout = layout_from_dict(bank_meta(art)["tensors"])
    with pytest.raises(AdapterMismatchError, match="whole modules"):
        adapter_tensors(config, state, layout)
    session = MultiAdapterSession(art["onnx"])
    before, snapshot = session.adapters(), session.snapshot()
    with pytest.raises(AdapterMismatchError, match="LayerNorm"):
        session.register("head", head)
    assert session.adapters() == before and session.snapshot() is snapshot
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExportError, match="whole modules") as refused:
        export(art["model"], out, [art["adapters"]["a0"], head], merge=False, bank=True, task=TASKS["bert"],
               verbose=False)
    # a saved LayerNorm is no classifier head: no text-classification bank would take it either
    assert "export each adapter on its own" in str(refused.value), refused.value
    assert "export them for text-classification" not in str(refused.value), refused.value
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


def test_misfit_adapter_tensors_list_every_problem(banks):
    art = banks("llama")
    layout = layout_from_dict(bank_meta(art)["tensors"])
    for misfit, needle in (("misfit-module", "not adapted in the bank graph"), ("misfit-block", "block size 4")):
        config, state = read_adapter(art["extra"][misfit])
        with pytest.raises(AdapterMismatchError, match=needle) as err:
            adapter_tensors(config, state, layout, "model")
        assert "model.layers.0." in str(err.value) and "model.layers.1." in str(err.value)  # both layers listed


# ---- layers whose input every row shares (DeBERTa-v2's relative-position projections) -----------------------
# name -> (share_att_key, bare encoder, adapter -> targets, the layers of a0 whose input is shared)
SHARED_INPUT = {
    # pos_key_proj / pos_query_proj project the relative-position embeddings (1, 2k, hidden); a1 adapts per-row layers
    "pos-proj": (False, False, {"a0": ["query_proj", "pos_key_proj", "pos_query_proj"],
                                "a1": ["query_proj", "value_proj"]}, ["pos_key_proj", "pos_query_proj"]),
    # share_att_key (DeBERTa-v3's checkpoints set it): query_proj projects both the rows and the embeddings
    "shared-key": (True, True, {"a0": ["query_proj", "value_proj"], "a1": ["value_proj"]}, ["query_proj"]),
}
_SHARED_INPUT: dict[str, dict] = {}


def _relative_deberta(share_att_key: bool, encoder: bool) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.DebertaV2Config(vocab_size=128, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64, relative_attention=True,
                                position_buckets=256, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                                num_labels=3, share_att_key=share_att_key)
    if encoder:
        return tf.DebertaV2Model(config).eval()
    model = tf.DebertaV2ForSequenceClassification(config).eval()
    with torch.no_grad():  # the head 25x its 0.02 init: logits whose adapters' effects are far beyond tolerance
        for module in ("pooler", "classifier"):
            for param in model.get_submodule(module).parameters():
                param.mul_(25.0)
    return model


@pytest.fixture(scope="module")
def shared_input(tmp_path_factory):
    """``shared_input(name)``: {"model": dir, "adapters": [a0 dir, a1 dir], "shared": a0's shared layers} of
    :data:`SHARED_INPUT` (written once per module)."""
    from bca_deploy import inject, save_adapter

    def get(name: str) -> dict:
        if name not in _SHARED_INPUT:
            share_att_key, encoder, adapters, shared = SHARED_INPUT[name]
            root = tmp_path_factory.mktemp(f"shared-input-{name}")
            _relative_deberta(share_att_key, encoder).save_pretrained(root / "model")
            for seed, (adapter, targets) in enumerate(adapters.items()):
                tuned = _relative_deberta(share_att_key, encoder)
                inject(tuned, targets, block_size=8, init="normal", init_std=0.3, seed=seed)
                save_adapter(tuned, root / adapter)
            _SHARED_INPUT[name] = {"model": root / "model", "adapters": [root / a for a in adapters], "shared": shared}
        return _SHARED_INPUT[name]

    return get


@pytest.mark.parametrize("name", sorted(SHARED_INPUT))
def test_bank_of_a_layer_whose_input_the_batch_shares_is_refused_naming_it(shared_input, name, tmp_path):
    """A bank routes each row through its own kernels; DeBERTa-v2's relative-position projections (and with
    share_att_key its query_proj) run once on embeddings (1, 2k, hidden) every row shares. The export went on
    to rewrite such a layer: validation failed (a ValueError from the PyTorch reference, onnxruntime's Reshape
    failure: "Internal error", exit 70, or wrong numbers), and without validation a wrong bank graph was written.
    Now the bank's trace sees the shared input and refuses, validated or not, with an UnsupportedExportError
    naming each module, its adapter and input shape, before anything is written."""
    from bca_deploy.errors import BCAError

    art = shared_input(name)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExportError) as err:
        export(art["model"], out, art["adapters"], merge=False, bank=True, verbose=False, validate=False)
    message = str(err.value)
    assert isinstance(err.value, BCAError)
    for layer in range(LAYERS):
        for leaf in art["shared"]:
            assert f"layer.{layer}.attention.self.{leaf} (adapted by a0" in message, message
    assert re.search(r"its input has shape \(1, 512, 32\) while tracing a batch of 2 rows", message), message
    assert message.count("its input has shape") == LAYERS * len(art["shared"])  # only the shared layers
    assert f"a0 ({art['adapters'][0]})" in message and str(art["adapters"][1]) not in message  # a1 banks fine
    assert "without --bank" in message and "--merge" in message and "--no-merge" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_bank_export_of_a_shared_input_layer_exits_2_with_the_message(shared_input, tmp_path):
    from click.testing import CliRunner

    from bca_deploy.cli import main

    art = shared_input("pos-proj")
    out = tmp_path / "out"
    args = ["export", "--model", str(art["model"]), *(f"--adapter={d}" for d in art["adapters"]), "--bank",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: an adapter-bank graph gives each row"), result.output
    assert "Traceback" not in result.output and "Internal error" not in result.output and "bug" not in result.output
    assert "deberta.encoder.layer.0.attention.self.pos_key_proj (adapted by a0)" in result.output
    assert "deberta.encoder.layer.1.attention.self.pos_query_proj (adapted by a0)" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "merge"), [("pos-proj", False), ("pos-proj", True), ("shared-key", False)])
def test_shared_input_adapter_exports_on_its_own_and_validates(shared_input, name, merge, tmp_path):
    """What the refusal advises works: the adapter alone, merged or unmerged, validates against PyTorch, and its
    shared-input layers count (zeroing their kernels moves the output far beyond what validation allowed)."""
    from bca_deploy import load_adapter
    from bca_deploy.inject import bca_layers

    art = shared_input(name)
    share_att_key, encoder, _, _ = SHARED_INPUT[name]
    out = export(art["model"], tmp_path / "out", art["adapters"][:1], merge=merge, verbose=False, cases=[(2, 5, 2)])
    validation = json.loads((out / "bca_export.json").read_text())["validation"]
    assert validation["passed"]
    allowed = max(row["allowed"] for row in validation["rows"])
    model = type(_relative_deberta(share_att_key, encoder)).from_pretrained(art["model"]).eval()
    load_adapter(model, art["adapters"][0], adapter_name="a0")
    ids = torch.from_numpy(random_ids(2, 5, seed=3))

    def output() -> torch.Tensor:
        with torch.no_grad():
            result = model(input_ids=ids)
        return result.last_hidden_state if encoder else result.logits

    adapted = output()
    with torch.no_grad():
        for path, layer in bca_layers(model):
            if path.rsplit(".", 1)[-1] in art["shared"]:
                layer.bca_kernels["a0"].zero_()
    assert (adapted - output()).abs().max().item() > 10 * allowed


def test_mixed_adapters_on_a_shared_input_layer_raise_a_typed_error_naming_it(shared_input):
    """PyTorch's own per-row routing of the same layer: an InvalidOptionError (a BCAError) naming the module and
    the shared input, was a bare ValueError; adapters of per-row layers still mix."""
    import transformers as tf

    from bca_deploy import load_adapter
    from bca_deploy.errors import BCAError, InvalidOptionError
    from bca_deploy.inject import adapters_disabled, bca_layers, set_adapter

    art = shared_input("pos-proj")
    model = tf.DebertaV2ForSequenceClassification.from_pretrained(art["model"]).eval()
    for directory in art["adapters"]:
        load_adapter(model, directory, adapter_name=directory.name)
    ids = torch.from_numpy(random_ids(2, 5, seed=4))
    with pytest.raises(InvalidOptionError) as err, torch.no_grad(), mixed_adapters(model, ["a0", None]):
        model(input_ids=ids)
    assert isinstance(err.value, BCAError) and isinstance(err.value, ValueError)
    assert re.match(r"deberta\.encoder\.layer\.0\.attention\.self\.pos_(key|query)_proj: a mixed-adapter batch "
                    r"names 2 rows but this layer got an input of shape \(1, 512, 32\) that every row of the batch "
                    r"shares", str(err.value)), str(err.value)
    assert "'a0' outside mixed_adapters" in str(err.value)
    assert all(layer.row_adapters is None for _, layer in bca_layers(model))
    with torch.no_grad(), mixed_adapters(model, ["a1", None]):  # pos_* hold a0 only: every row's base output there
        mixed = model(input_ids=ids).logits
    set_adapter(model, "a1")
    with torch.no_grad():
        alone = model(input_ids=ids[:1]).logits[0]
        with adapters_disabled(model):
            base = model(input_ids=ids[1:]).logits[0]
    torch.testing.assert_close(mixed[0], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base, atol=1e-5, rtol=0)
    assert not torch.allclose(alone, base, atol=1e-3)


# ---- per-adapter classifier heads: RoBERTa (dense + tanh + out_proj on <s>) ---------------------------------
# (BERT's one-Linear head with a pooler: tests/serving/test_classify.py. Decoders' ``score`` head would bank the
# same way, but the exporter does not export decoders for text-classification: see exporters/loading.py.)

# arch -> adapter -> (labels, targets, block size, seed, modules_to_save); labels None: kernels only (no head)
HEAD_BANKS = {
    "roberta": {
        "r2": (["no", "yes"], ["query", "value"], 8, 1, None),  # its whole head: dense and out_proj
        "r5": (["a", "b", "c", "d", "e"], ["query", "value"], 16, 2, ["classifier.out_proj"]),  # dense: the base's
        "rk": (None, ["key"], 8, 3, None),  # no head: the checkpoint's (3 labels)
    },
}


@pytest.fixture(scope="module", params=sorted(HEAD_BANKS))
def head_bank(request, tmp_path_factory):
    from head_helpers import save_base, save_head_adapter, save_kernel_adapter

    arch = request.param
    root = tmp_path_factory.mktemp(f"heads-{arch}")
    base = save_base(arch, root / "base")
    dirs = {}
    for name, (labels, targets, p, seed, saved) in HEAD_BANKS[arch].items():
        if labels is None:
            dirs[name] = save_kernel_adapter(base, root / name, targets, p, seed)
        else:
            dirs[name] = save_head_adapter(base, root / name, labels, targets, p, seed, saved)
    onnx_dir = export(base, root / "onnx", list(dirs.values()), merge=False, bank=True, task="text-classification",
                      cases=[(4, 6)], verbose=False)
    return arch, base, dirs, onnx_dir


def test_an_adapted_head_layer_is_refused_by_a_bank_saying_what_to_do(head_bank, tmp_path):
    """helper-63: PEFT's all-linear adapts a head's own layer (DeBERTa's pooler, RoBERTa's classifier.dense); a bank
    cannot hold both a kernel and a head layer per slot, and said only that. It names the ways that work."""
    from head_helpers import save_head_adapter

    _, base, _, _ = head_bank
    adapter = save_head_adapter(base, tmp_path / "dense", ["x", "y"], ["classifier.dense"], 8, 4,
                                ["classifier.out_proj"])
    with pytest.raises(UnsupportedExportError, match=r"classifier.dense: adapted by BCA and part of the classifier "
                                                     r"head; .* Export such an adapter on its own, without --bank"):
        export(base, tmp_path / "onnx", [adapter], merge=False, bank=True, task="text-classification", verbose=False)
    assert not (tmp_path / "onnx").exists()


def test_head_bank_rows_equal_their_own_models(head_bank):
    """Every row's logits against its adapter's own PyTorch model; padding labels -inf. Through the raw graph
    (adapter_ids) and through MultiAdapterSession.classify."""
    from head_helpers import BASE_LABELS, own_logits, own_model, token_rows

    from bca_deploy.serving import MultiAdapterSession

    arch, base, dirs, onnx_dir = head_bank
    meta = json.loads((onnx_dir / "bca_export.json").read_text())["bank"]
    assert [layer["module"] for layer in meta["head"]["layers"]] == ["classifier.dense", "classifier.out_proj"]
    base_labels = BASE_LABELS[arch]
    labels = {n: spec[0] or list(base_labels.values()) for n, spec in HEAD_BANKS[arch].items()}
    models = {n: own_model(base, d) for n, d in dirs.items()}
    width = max(len(v) for v in labels.values())
    session = ort_session(onnx_dir)
    slots = meta["slots"]
    choice = [*dirs, None, *dirs]
    rows = token_rows(len(choice), seed=6, low=5, high=6)  # equal lengths: the raw graph needs no padding
    ids = np.array(rows, dtype=np.int64)
    got = run(session, {**base_feeds(session, ids),
                        "adapter_ids": np.array([slots.index(c) for c in choice], dtype=np.int64)})["logits"]
    assert got.shape == (len(choice), width)
    for b, adapter in enumerate(choice):
        if adapter is None:
            want = own_logits(own_model(base), rows[b])
        else:
            want = own_logits(models[adapter], rows[b])
        n = len(want)
        np.testing.assert_allclose(got[b, :n], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")
        assert (got[b, n:] == -np.inf).all()
    # the session answers each row with its own labels, rows of any length in one batch
    mixed = MultiAdapterSession(onnx_dir)
    rows = token_rows(2 * len(dirs), seed=7)
    choice = [*dirs, *dirs]
    for b, (result, adapter) in enumerate(zip(mixed.classify(rows, choice), choice, strict=True)):
        want = own_logits(models[adapter], rows[b])
        np.testing.assert_allclose(result["logits"], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")
        assert result["label"] == labels[adapter][int(want.argmax())] and list(result["scores"]) == labels[adapter]


def test_validate_rechecks_a_head_bank(head_bank):
    from bca_deploy.exporters import validate

    _, base, dirs, onnx_dir = head_bank
    report = validate(onnx_dir, base, list(dirs.values()), cases=[(3, 6)], verbose=False)
    assert report.passed and len(report.rows) > len(dirs)


def test_head_adapter_files_carry_the_head(head_bank):
    """``adapters/<name>.onnx_adapter`` activated with onnxruntime's LoraAdapter: id 1 = the adapter with its
    head, id 0 = the base model with the checkpoint's head."""
    import onnxruntime as ort
    from head_helpers import own_logits, own_model, token_rows

    arch, base, dirs, onnx_dir = head_bank
    meta = json.loads((onnx_dir / "bca_export.json").read_text())["bank"]
    session = ort_session(onnx_dir)
    rows = token_rows(2, seed=8, low=6, high=7)
    feeds = {**base_feeds(session, np.array(rows, dtype=np.int64)), "adapter_ids": np.array([1, 0], dtype=np.int64)}
    for name, relative in meta["adapter_files"].items():
        lora = ort.LoraAdapter()
        lora.Load(str(onnx_dir / relative))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        got = run(session, feeds, options)["logits"]
        want = own_logits(own_model(base, dirs[name]), rows[0])
        np.testing.assert_allclose(got[0, :len(want)], want, atol=ATOL, rtol=0, err_msg=name)
        base_want = own_logits(own_model(base), rows[1])
        np.testing.assert_allclose(got[1, :3], base_want, atol=ATOL, rtol=0)


def test_validate_names_an_adapter_file_it_cannot_read_or_parse(banks, tmp_path, monkeypatch):
    """A bank's adapter file that is damaged, or that this user may not read, made ``validate`` exit 70 (onnxruntime's
    "Invalid fd" / parse error reported as a bug). Now: a damaged file is an ExportMetadataError naming it (exit 2);
    an unreadable one is the PermissionError naming it (exit 1), raised before onnxruntime opens it (emulated:
    the tests may run as root)."""
    from click.testing import CliRunner

    import bca_deploy.exporters.bank as bank_module
    from bca_deploy.cli import main
    from bca_deploy.exporters import validate

    art = banks("bert")
    adapter_dirs = [art["adapters"][n] for n in EXPORTED["bert"]]
    copy = tmp_path / "bank"
    shutil.copytree(art["onnx"], copy)
    victim = sorted((copy / "adapters").iterdir())[0]
    args = ["validate", "--onnx", str(copy), "--model", str(art["model"]), "--cases", "2x4",
            *(f"--adapter={d}" for d in adapter_dirs)]
    real = bank_module.require_readable

    def deny(path):
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        real(path)

    monkeypatch.setattr(bank_module, "require_readable", deny)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and f"{victim}: Permission denied" in result.output, result.output
    monkeypatch.setattr(bank_module, "require_readable", real)
    victim.write_bytes(b"\x00not an adapter" * 8)
    # the size bca_export.json records tells first (bank.adapter_digests) ...
    with pytest.raises(ExportMetadataError, match=rf"{re.escape(str(victim))}: not the adapter file this bank exported "
                                                  r"for '\w+' \(120 bytes, the export wrote"):
        validate(copy, art["model"], adapter_dirs, cases=[(2, 4)], verbose=False)
    # ... and in a bank exported before it was recorded, onnxruntime's parse
    meta = json.loads((copy / "bca_export.json").read_text())
    meta["bank"].pop("adapter_digests")
    (copy / "bca_export.json").write_text(json.dumps(meta))
    with pytest.raises(ExportMetadataError, match=rf"{re.escape(str(victim))}: not a readable onnxruntime adapter file"):
        validate(copy, art["model"], adapter_dirs, cases=[(2, 4)], verbose=False)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "not a readable onnxruntime adapter file" in result.output, result.output
    assert "bug" not in result.output


# ---- adapted modules the exported graph does not use (a BertModel's pooler in a feature-extraction graph) ---------
# PEFT's "all-linear" (and any target list naming "dense") adapts BertModel's pooler.dense. A feature-extraction
# graph outputs last_hidden_state only, so torch.onnx.export prunes the pooler, and the bank rewrite failed ("the
# exported graph has no initializer pooler.dense.bca_freq_p8"). The bank leaves such a module out, says so, and
# serving ignores kernels for it.

POOLED_REASON = ("its output is not used by the exported graph (feature-extraction outputs last_hidden_state; the "
                 "pooler is not part of it)")


def _pooled_bert() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return tf.BertModel(cfg).eval()  # with its pooler (all-MiniLM-L6-v2's BertModel has one)


def _peft_adapter(base: Path, directory: Path, seed: int, **fields) -> Path:
    """A PEFT C3A adapter made as users make one (get_peft_model, save_pretrained), kernels drawn non-zero."""
    from peft import C3AConfig, get_peft_model
    from transformers import BertModel

    peft_model = get_peft_model(BertModel.from_pretrained(base), C3AConfig(task_type="FEATURE_EXTRACTION", **fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    peft_model.eval().save_pretrained(directory)
    return directory


def _peft_rows(base: Path, adapter: Path, rows: list[list[int]]) -> list[np.ndarray]:
    """PEFT's own last_hidden_state of each unpadded row (PeftModel.from_pretrained on the base checkpoint)."""
    from peft import PeftModel
    from transformers import BertModel

    model = PeftModel.from_pretrained(BertModel.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row])).last_hidden_state[0].numpy() for row in rows]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """Banks of adapters on a BertModel's pooler.dense: ``all`` (PEFT all-linear alone, exported by the CLI) and
    ``two`` (PEFT ["query", "dense"], then a bca-deploy adapter without the pooler); store adapters beside them."""
    import contextlib
    import io

    from click.testing import CliRunner

    from bca_deploy.cli import main

    root = tmp_path_factory.mktemp("pooled")
    base = root / "model"
    _pooled_bert().save_pretrained(base)
    adapters = {
        "all": _peft_adapter(base, root / "all", 1, block_size=8, target_modules="all-linear"),
        "dense": _peft_adapter(base, root / "dense", 2, block_size=8, target_modules=["query", "dense"]),
        "plain": root / "plain",
        # store adapters: value (held at p8, from "plain") and every dense layer, the pooler's at a block size
        # no exported adapter uses; and one adapting key, which no exported adapter of "two" adapts
        "store": _peft_adapter(base, root / "store", 3, block_size=8, target_modules=["value", "dense"],
                               block_size_pattern={"pooler.dense": 4}),
        "misfit": root / "misfit",
    }
    for name, targets, seed in (("plain", ["query", "value"], 4), ("misfit", ["key", "pooler.dense"], 5)):
        model = _pooled_bert()
        inject(model, targets, block_size=8, init="normal", init_std=0.05, seed=seed)
        save_adapter(model, adapters[name])
    result = CliRunner().invoke(main, ["export", "--model", str(base), "--adapter", str(adapters["all"]), "--bank",
                                       "--task", "feature-extraction", "--cases", "3x5",
                                       "--out", str(root / "bank-all")])
    assert result.exit_code == 0, result.output
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        two = export(base, root / "bank-two", [adapters["dense"], adapters["plain"]], merge=False, bank=True,
                     task="feature-extraction", cases=[(4, 6)])
    return {"base": base, "adapters": adapters, "banks": {"all": root / "bank-all", "two": two},
            "output": {"all": result.output, "two": printed.getvalue()}}


@pytest.mark.parametrize("which", ["all", "two"])
def test_bank_leaves_out_an_adapted_module_the_graph_does_not_use_and_says_so(pooled, which):
    """The export validates (mixed rows and each adapter file against PyTorch, every kernel applied there); pooler.dense
    has no bank input and is recorded as unused, with why; the command output names it; the other modules the
    adapters adapt are banked."""
    directory = pooled["banks"][which]
    meta = json.loads((directory / "bca_export.json").read_text())
    assert meta["validation"]["passed"] and len(meta["validation"]["rows"]) >= 2
    bank = meta["bank"]
    assert bank["unused_modules"] == [{"module": "pooler.dense", "layer_type": "linear", "in_features": 32,
                                       "out_features": 32, "reason": POOLED_REASON}]
    banked = {t["module"] for t in bank["tensors"]}
    expected = {f"encoder.layer.{i}.{m}" for i in range(2) for m in
                ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")}
    expected |= {f"encoder.layer.{i}.attention.self.{m}" for i in range(2)
                 for m in (("key", "value") if which == "all" else ("value",))}
    assert banked == expected
    graph = onnx.load(str(directory / "model.onnx")).graph
    assert not [i.name for i in graph.input if i.name.startswith("pooler.")]
    adapter = "all" if which == "all" else "dense"
    note = [line for line in pooled["output"][which].splitlines() if "pooler.dense" in line]
    assert len(note) == 1 and f"pooler.dense (adapted by {adapter}) is left out of the bank: {POOLED_REASON}" in note[0]
    assert "adapted by plain" not in pooled["output"][which]
    from click.testing import CliRunner

    from bca_deploy.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(directory)])
    assert shown.exit_code == 0, shown.output
    assert f"left out:     pooler.dense (adapted, but {POOLED_REASON}; kernels adapters carry" in shown.output


def test_mixed_rows_of_a_bank_with_an_unused_module_equal_pytorch(pooled):
    """Rows over both exported adapters (their pooler kernels left out) and the base through MultiAdapterSession,
    each against PEFT's / bca-deploy's PyTorch model of that row's adapter alone."""
    from bca_deploy import load_adapter
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(pooled["banks"]["two"])
    rows = token_rows(7, seed=11)
    adapters = ["dense", None, "plain", "dense", "plain", None, "dense"]
    got = session.run(session.pad_ids(rows), adapters)["last_hidden_state"]
    want = dict(zip([b for b, a in enumerate(adapters) if a == "dense"],
                    _peft_rows(pooled["base"], pooled["adapters"]["dense"],
                               [r for r, a in zip(rows, adapters) if a == "dense"]), strict=True))
    model = _pooled_bert()
    load_adapter(model, pooled["adapters"]["plain"], adapter_name="plain")
    for b, (row, adapter) in enumerate(zip(rows, adapters, strict=True)):
        if adapter != "dense":
            want[b] = row_alone(model, row, adapter).numpy()
        np.testing.assert_allclose(got[b, :len(row)], want[b], atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")
    base = row_alone(model, rows[0], None).numpy()
    assert np.abs(got[0, :len(rows[0])] - base).max() > 1e-2  # the adapter changes the numbers: the check can fail


def test_store_adapter_with_a_kernel_on_an_unused_module_registers_and_serves_pytorch(pooled):
    """A PEFT adapter whose pooler.dense kernel (at a block size the bank holds for no module) the graph leaves out
    registers (the fit check accepts it for the module the bank records as unused, and ignores it) and serves PEFT's
    numbers; an adapter adapting a module the bank does not hold (key) is still refused, naming it and nothing else."""
    from bca_deploy.serving import MultiAdapterSession

    session = MultiAdapterSession(pooled["banks"]["two"])
    info = session.register("store", pooled["adapters"]["store"])
    assert info.block_sizes == (4, 8)
    rows = token_rows(4, seed=12)
    adapters = ["store", "dense", "store", None]
    got = session.run(session.pad_ids(rows), adapters)["last_hidden_state"]
    for b, want in zip((0, 2), _peft_rows(pooled["base"], pooled["adapters"]["store"], [rows[0], rows[2]]),
                       strict=True):
        np.testing.assert_allclose(got[b, :len(rows[b])], want, atol=ATOL, rtol=0, err_msg=f"row {b}")
    before = session.adapters()
    with pytest.raises(AdapterMismatchError) as err:
        session.register("misfit", pooled["adapters"]["misfit"])
    message = str(err.value)
    assert "encoder.layer.0.attention.self.key" in message and "encoder.layer.1.attention.self.key" in message
    assert "not adapted in the bank graph" in message and "pooler" not in message
    assert session.adapters() == before
    # the same rule without a session: the layout and the recorded unused modules
    record = read_export_metadata(pooled["banks"]["two"]).bank
    config, state = read_adapter(pooled["adapters"]["store"])
    with pytest.raises(AdapterMismatchError, match=r"module pooler\.dense: not adapted in the bank graph"):
        adapter_tensors(config, state, record.layout)  # without the record of unused modules: refused
    tensors, head = adapter_slot(config, state, record.layout, unused=record.unused)
    assert head is None and tensors and not [k for k in tensors if k.startswith("pooler.")]


def test_bank_without_the_unused_record_loads_as_before(pooled, tmp_path):
    """An export written before unused modules were recorded (no ``unused_modules``) loads and serves; without the
    record a kernel on pooler.dense is refused by name, as any module the bank does not hold. A malformed record, or
    one naming a banked module, is refused as every malformed bank field is."""
    from bca_deploy.serving import MultiAdapterSession

    old = tmp_path / "old"
    shutil.copytree(pooled["banks"]["two"], old)
    meta = json.loads((old / "bca_export.json").read_text())
    bank = {k: v for k, v in meta["bank"].items() if k != "unused_modules"}
    (old / "bca_export.json").write_text(json.dumps({**meta, "bank": bank}))
    assert read_export_metadata(old).bank.unused == ()
    session = MultiAdapterSession(old)
    rows = token_rows(3, seed=13)
    current = MultiAdapterSession(pooled["banks"]["two"])
    np.testing.assert_array_equal(session.embed(rows, ["dense", "plain", None]),
                                  current.embed(rows, ["dense", "plain", None]))
    with pytest.raises(AdapterMismatchError, match=r"module pooler\.dense: not adapted in the bank graph"):
        session.register("store", pooled["adapters"]["store"])
    unused = meta["bank"]["unused_modules"]
    for wrong, needle in (({"unused_modules": 3}, "bank.unused_modules must be a list"),
                          ({"unused_modules": [{**unused[0], "in_features": "32"}]}, "malformed unused module"),
                          ({"unused_modules": [{**unused[0], "module": "encoder.layer.0.attention.self.query"}]},
                           "which bank.tensors adapts")):
        (old / "bca_export.json").write_text(json.dumps({**meta, "bank": {**bank, **wrong}}))
        with pytest.raises(ExportMetadataError, match=needle):
            read_export_metadata(old)


def test_bank_of_adapters_on_unused_modules_alone_is_refused(pooled, tmp_path):
    """Adapters whose every module the graph leaves out would make a bank of the base model: refused, naming them and
    why, before anything is written."""
    only = tmp_path / "only"
    model = _pooled_bert()
    inject(model, ["pooler.dense"], block_size=8, init="normal", init_std=0.05, seed=6)
    save_adapter(model, only)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExportError, match=r"uses none of the modules these adapters adapt \(pooler\.dense: "
                                                     + re.escape(POOLED_REASON)):
        export(pooled["base"], out, [only], merge=False, bank=True, task="feature-extraction", verbose=False)
    assert not out.exists()


def test_validate_rechecks_a_bank_with_an_unused_module(pooled):
    """``bca-deploy validate`` of such a bank with the adapters it was exported with (every kernel loaded in PyTorch,
    the pooler's included): mixed batches and each adapter file pass."""
    from bca_deploy.exporters import validate

    adapters = [pooled["adapters"]["dense"], pooled["adapters"]["plain"]]
    report = validate(pooled["banks"]["two"], pooled["base"], adapters, cases=[(3, 5)], verbose=False)
    assert report.passed and {r.case.split(" file=")[1] for r in report.rows if "file=" in r.case} == {"dense", "plain"}
