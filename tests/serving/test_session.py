"""``MultiAdapterSession`` and ``AdapterStore`` on tiny adapter-bank exports, checked against PyTorch.

The banks (tiny BERT for ``run``/``embed``, tiny Llama for ``generate``; three exported adapters each,
plus fitting and misfit adapters that were not exported) come from ``serving_helpers.py``. References:

- ``run``/``embed``: the PyTorch model with every adapter loaded, each row run **alone** with its adapter
  active (``set_adapter``; ``adapters_disabled`` for base rows), i.e. not through the per-row routing;
- greedy ``generate``: PyTorch ``model.generate(do_sample=False)`` on the left-padded mixed batch under
  ``mixed_adapters`` (itself checked against dense references in ``tests/test_mixed_adapters.py``), and
  each prompt generated alone.

Tests that register or unregister adapters use a session of their own.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import (
    EXPORTED,
    EXTRA,
    VOCAB,
    banks,  # noqa: F401  (fixture)
    row_alone,
    save_tiny_adapter,
    token_rows,
    torch_model,
)

from bca_deploy.errors import (
    AdapterExistsError,
    AdapterMismatchError,
    AdapterNameError,
    ContextLengthError,
    InputNotFoundError,
    ServingError,
    UnknownAdapterError,
)
from bca_deploy.inject import mixed_adapters
from bca_deploy.serving import MultiAdapterSession
from bca_deploy.serving.store import AdapterStore

ATOL = 1e-4
CHOICES = ["a0", "a1", "a2", None]


@pytest.fixture(scope="module")
def bert(banks):
    return banks("bert")


@pytest.fixture(scope="module")
def llama(banks):
    return banks("llama")


@pytest.fixture(scope="module")
def bert_session(bert):
    """A shared BERT session: never registered into or unregistered from."""
    return MultiAdapterSession(bert["onnx"])


@pytest.fixture(scope="module")
def llama_session(llama):
    """A shared Llama session: never registered into or unregistered from."""
    return MultiAdapterSession(llama["onnx"])


def ref_embedding(ids: list[int], adapter: str | None) -> np.ndarray:
    """Mean-pooled last_hidden_state of one unpadded row in PyTorch."""
    return row_alone(torch_model("bert"), ids, adapter).mean(0).numpy()


def check_embeddings(session, rows, adapters, **kwargs):
    got = session.embed(rows, adapters, **kwargs)
    assert got.shape == (len(rows), 32)
    for b, (row, adapter) in enumerate(zip(rows, adapters)):
        np.testing.assert_allclose(got[b], ref_embedding(row, adapter), atol=ATOL, rtol=0,
                                   err_msg=f"row {b} ({adapter})")
    return got


# ---- loading -----------------------------------------------------------------------------------------------


def test_exported_adapters_are_registered(bert, bert_session):
    from bca_deploy.exporters.bank import adapter_tensors

    from bca_deploy import read_adapter

    assert [a.name for a in bert_session.adapters()] == sorted(EXPORTED["bert"])
    snapshot = bert_session.snapshot()
    assert sorted(snapshot.slots) == sorted(EXPORTED["bert"]) and sorted(snapshot.slots.values()) == [1, 2, 3]
    for info in bert_session.adapters():
        assert info.block_sizes == (EXPORTED["bert"][info.name][1],)
    # the slots loaded from the .onnx_adapter files hold what the adapter directories give
    for name, directory in bert["adapters"].items():
        config, state = read_adapter(directory)
        want = adapter_tensors(config, state, bert_session.layout)
        slot = snapshot.slots[name]
        for key, bank in snapshot.feeds.items():
            value = bank.numpy()[slot]
            if key in want:
                np.testing.assert_allclose(value, want[key], rtol=0, atol=1e-7)
            else:
                assert not value.any()
        assert not any(b.numpy()[0].any() for b in snapshot.feeds.values())  # slot 0: base
    assert bert_session.describe()["adapters"] == sorted(EXPORTED["bert"])


def test_not_a_bank_export_is_refused(tmp_path, bert):
    with pytest.raises(ServingError, match="model.onnx"):
        MultiAdapterSession(tmp_path)
    shutil.copy(bert["onnx"] / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "bca_export.json").write_text('{"task": "feature-extraction", "merged": true, "bank": null}')
    with pytest.raises(ServingError, match="--bank"):
        MultiAdapterSession(tmp_path)


def _hostile_metadata(good: dict) -> dict[str, bytes]:
    import json

    bank = good["bank"]
    return {
        "not-utf8": b"\xff\xfe{}",
        "nested": b"[" * 100_000 + b"]" * 100_000,
        "top-level-list": b"[1]",
        "bank-is-list": json.dumps({**good, "bank": [1]}).encode(),
        "no-task": json.dumps({k: v for k, v in good.items() if k != "task"}).encode(),
        "no-tensors": json.dumps({**good, "bank": {k: v for k, v in bank.items() if k != "tensors"}}).encode(),
        "tensors-is-object": json.dumps({**good, "bank": {**bank, "tensors": {"x": [1e308, -5]}}}).encode(),
        "tensor-entry-wrong": json.dumps({**good, "bank": {**bank, "tensors": [{"module": 3}]}}).encode(),
        "block-size-string": json.dumps({**good, "bank": {**bank, "tensors": [
            {**bank["tensors"][0], "block_size": "8"}]}}).encode(),
        "adapter-file-outside": json.dumps({**good, "bank": {**bank, "adapter_files": {"a0": "../../x.onnx_adapter"}}}
                                           ).encode(),
        # helper-61's: exit 70 from inspect and serve (TypeError: unhashable type; ValueError: embedded null byte)
        "task-is-list": json.dumps({**good, "task": ["feature-extraction"]}).encode(),
        "adapter-file-nul": json.dumps({**good, "bank": {**bank, "adapter_files": {
            **bank["adapter_files"], "a0": "adapters/a0\u0000.onnx_adapter"}}}).encode(),
    }


def test_hostile_export_metadata_is_refused_naming_the_file(tmp_path, bert):
    """A bca_export.json that is not what export writes: an error naming the file, never an internal error
    (each of these was an AttributeError, KeyError, TypeError, RecursionError or UnicodeDecodeError)."""
    import json

    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.errors import BCAError
    from bca_deploy.exporters import validate

    good = json.loads((bert["onnx"] / "bca_export.json").read_text())
    for name, raw in _hostile_metadata(good).items():
        directory = tmp_path / name
        shutil.copytree(bert["onnx"], directory)
        (directory / "bca_export.json").write_bytes(raw)
        with pytest.raises(BCAError) as caught:
            MultiAdapterSession(directory)
        assert "bca_export.json" in str(caught.value), (name, str(caught.value))
        with pytest.raises(BCAError, match="bca_export.json"):  # validate reads it by the same reader
            validate(directory, bert["model"], verbose=False)
        result = CliRunner().invoke(main, ["inspect", str(directory)])
        assert result.exit_code == 2 and "bca_export.json" in result.output, (name, result.output)
    # a metadata file of another bank (a bank input the graph lacks): validate exited 70 (onnxruntime's Gather error)
    good["bank"]["tensors"][0]["module"] = "bert.nope"
    directory = tmp_path / "another-bank"
    shutil.copytree(bert["onnx"], directory)
    (directory / "bca_export.json").write_text(json.dumps(good))
    adapters = [str(bert["adapters"][n]) for n in ("a0", "a1", "a2")]
    result = CliRunner().invoke(main, ["validate", "--onnx", str(directory), "--model", str(bert["model"]),
                                       *[a for path in adapters for a in ("--adapter", path)]])
    assert result.exit_code == 2 and "bert.nope.bca_freq_p8 the metadata records are not inputs of the graph" \
        in result.output, result.output
    result = CliRunner().invoke(main, ["inspect", str(directory)])
    assert "NOT servable" in result.output and "serve with" not in result.output, result.output


@pytest.mark.parametrize("model_type", ["llama", ""])
def test_a_bank_model_type_edited_away_from_the_shipped_config_is_refused_naming_both_files(tmp_path, bert,
                                                                                            model_type):
    """bank.model_type edited in bca_export.json ("bert" -> "llama") made every registration fail as the adapter's
    fault ("base model_type is 'bert' but the bank graph is 'llama'") while serve started; emptied, any adapter was
    registered unchecked. The export is refused where its metadata is read (serve, register, validate, inspect),
    naming the file, the field and the config.json the graph ships with."""
    import json

    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.exporters.errors import ExportMetadataError

    directory = tmp_path / "bank"
    shutil.copytree(bert["onnx"], directory)
    meta = json.loads((directory / "bca_export.json").read_text())
    assert meta["bank"]["model_type"] == "bert"
    meta["bank"]["model_type"] = model_type
    (directory / "bca_export.json").write_text(json.dumps(meta))
    needle = (f"bank.model_type is 'llama', but the graph was exported from a 'bert' model (model_type in "
              f"{directory / 'config.json'} beside it)" if model_type else
              "bank.model_type must be the model type the graph was exported from (config.json's model_type, such as "
              "'bert') or null, got ''")
    with pytest.raises(ExportMetadataError) as caught:
        MultiAdapterSession(directory).register("again", bert["adapters"]["a0"])
    assert str(caught.value).startswith(f"{directory / 'bca_export.json'}: ") and needle in str(caught.value), \
        str(caught.value)
    result = CliRunner().invoke(main, ["inspect", str(directory)])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_an_adapter_file_holding_tensors_the_graph_has_no_input_for_is_refused(tmp_path, bert):
    """A bank exported before the digests were recorded (or one whose digests were rewritten) with a file of
    another export (another block size: its kernels are no input of this graph) had those tensors dropped, and the
    adapter was served as the base model with 0 parameters."""
    import json

    import onnxruntime as ort

    directory = tmp_path / "bank"
    shutil.copytree(bert["onnx"], directory)
    meta = json.loads((directory / "bca_export.json").read_text())
    meta["bank"].pop("adapter_digests")
    (directory / "bca_export.json").write_text(json.dumps(meta))
    path = directory / meta["bank"]["adapter_files"]["a0"]
    params = {k: v.numpy().copy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
    renamed = {k.replace("bca_freq_p8", "bca_freq_p32"): v for k, v in params.items()}
    assert renamed != params
    adapter = ort.AdapterFormat()
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in renamed.items()})
    adapter.export_adapter(str(path))
    with pytest.raises(ServingError, match=r"(?s)a0\.onnx_adapter: not the adapter file this bank exported:.*"
                                           r"bca_freq_p32: not an input of this bank's graph"):
        MultiAdapterSession(directory)


def test_an_adapter_file_that_is_not_the_one_exported_is_refused(tmp_path, bert):
    """Another adapter's file of the same shapes copied over an exported one (a mixed-up copy between exports, a
    damaged file) was served as that adapter, with the other's numbers, and ``validate`` of it was "Internal error
    (InvalidArgument)" when the file came from another export. The export records each file's size and sha256
    (``bank.adapter_digests``); serve and validate refuse a file that differs, naming it, before onnxruntime reads
    it. A bank exported before the digests were recorded loads as before."""
    import hashlib
    import json

    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.errors import BCAError

    meta = json.loads((bert["onnx"] / "bca_export.json").read_text())
    files = meta["bank"]["adapter_files"]
    for name, relative in files.items():
        data = (bert["onnx"] / relative).read_bytes()
        assert meta["bank"]["adapter_digests"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    adapters = [str(bert["adapters"][n]) for n in ("a0", "a1", "a2")]
    for case in ("swapped", "truncated"):
        directory = tmp_path / case
        shutil.copytree(bert["onnx"], directory)
        if case == "swapped":
            shutil.copy(directory / files["a1"], directory / files["a0"])
            why = "its sha256 differs from the one the export recorded"
        else:
            data = (directory / files["a0"]).read_bytes()
            (directory / files["a0"]).write_bytes(data[: len(data) // 2])
            why = f"{len(data) // 2:,} bytes, the export wrote {len(data):,}"
        message = f"a0.onnx_adapter: not the adapter file this bank exported for 'a0' ({why}); export the bank again"
        with pytest.raises(ServingError) as caught:
            MultiAdapterSession(directory)
        assert message in str(caught.value)
        result = CliRunner().invoke(main, ["validate", "--onnx", str(directory), "--model", str(bert["model"]),
                                           *[a for path in adapters for a in ("--adapter", path)]])
        assert result.exit_code == 2 and message in result.output, result.output
    old = tmp_path / "before-digests"
    shutil.copytree(bert["onnx"], old)
    meta["bank"].pop("adapter_digests")
    (old / "bca_export.json").write_text(json.dumps(meta))
    assert [a.name for a in MultiAdapterSession(old).adapters()] == ["a0", "a1", "a2"]
    # files larger than a bank's can be, sparse ones declaring GiBs, are refused from their size, unread (onnxruntime
    # read a 20 GiB one whole: the server reached 20.9 GB); for every export, digests or not
    sparse = tmp_path / "sparse"
    shutil.copytree(old, sparse)
    with open(sparse / files["a0"], "r+b") as f:
        f.truncate(3 << 30)
    with pytest.raises(ServingError, match=r"a0.onnx_adapter: 3,221,225,472 bytes, more than an adapter file of this "
                                           r"bank holds \(at most [\d,]+\); export the bank again"):
        MultiAdapterSession(sparse)
    shutil.copy(old / files["a0"], sparse / files["a0"])
    with open(sparse / "model.onnx", "r+b") as f:
        f.truncate(3 << 30)
    with pytest.raises(BCAError, match=r"model.onnx: onnxruntime cannot load this graph \(3,221,225,472 bytes, more "
                                       r"than an ONNX file can hold"):
        MultiAdapterSession(sparse)
    result = CliRunner().invoke(main, ["inspect", str(sparse)])
    assert "more than an ONNX file can hold" in result.output, result.output
    # ... and there, a file of tensors the graph has no inputs for is refused by validate, not an internal error
    import numpy as np
    import onnxruntime as ort

    foreign = ort.AdapterFormat()
    foreign.set_parameters({"no.such.input": ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 3), np.float32))})
    foreign.export_adapter(str(old / files["a0"]))
    result = CliRunner().invoke(main, ["validate", "--onnx", str(old), "--model", str(bert["model"]),
                                       *[a for path in adapters for a in ("--adapter", path)]])
    assert result.exit_code == 2 and "a0.onnx_adapter: not an adapter file of this bank graph" in result.output, \
        result.output


# ---- run / embed parity ----------------------------------------------------------------------------------


def test_embed_mixed_batch_matches_pytorch(bert_session):
    rows = token_rows(10, seed=1)
    adapters = [CHOICES[b % 4] for b in range(len(rows))][::-1]
    adapters[3] = "__base__"
    got = check_embeddings(bert_session, rows, adapters)
    # adapters make a difference, so the comparison could fail
    same_row = bert_session.embed([rows[0]] * 4, CHOICES)
    assert min(np.abs(same_row[i] - same_row[j]).max() for i in range(4) for j in range(i)) > 1e-3
    np.testing.assert_allclose(got[0], same_row[CHOICES.index(adapters[0])], atol=ATOL, rtol=0)


def test_embed_pooling_options(bert_session):
    rows = token_rows(4, seed=2)
    adapters = ["a2", None, "a0", "a1"]
    cls = bert_session.embed(rows, adapters, pooling="cls")
    last = bert_session.embed(rows, adapters, pooling="last")
    normed = bert_session.embed(rows, adapters, normalize=True)
    model = torch_model("bert")
    for b, (row, adapter) in enumerate(zip(rows, adapters)):
        hidden = row_alone(model, row, adapter).numpy()
        np.testing.assert_allclose(cls[b], hidden[0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(last[b], hidden[-1], atol=ATOL, rtol=0)
        mean = hidden.mean(0)
        np.testing.assert_allclose(normed[b], mean / np.linalg.norm(mean), atol=ATOL, rtol=0)
    with pytest.raises(ServingError, match="pooling"):
        bert_session.embed(rows, adapters, pooling="max")


def test_run_mixed_batch_matches_pytorch(bert_session):
    rows = token_rows(9, seed=3)
    adapters = ["a1", None, "a0", "a2", "a2", "a0", None, "a1", "a0"]
    feeds = bert_session.pad_ids(rows)
    out = bert_session.run(feeds, adapters)
    assert set(out) == set(bert_session.output_names)
    hidden = out["last_hidden_state"]
    for b, (row, adapter) in enumerate(zip(rows, adapters)):
        want = row_alone(torch_model("bert"), row, adapter).numpy()
        np.testing.assert_allclose(hidden[b, :len(row)], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")


def test_run_ortvalues_leaves_the_outputs_asked_for_on_the_providers_device(llama_session, monkeypatch):
    """``on_device`` outputs are bound to the session's device (a GPU's under provider="cuda", checked with the
    device the binding is asked for), every other output to host memory; the numbers equal a plain run's."""
    from bca_deploy.exporters.validate import empty_past

    session = llama_session
    feeds = session.pad_ids(token_rows(3, seed=8), side="left")
    feeds.update(empty_past(session.session, 3))
    presents = [n for n in session.output_names if n.startswith("present")]
    plain = {k: v.numpy() for k, v in session.run_ortvalues(feeds, ["a0", None, "a1"]).items()}
    asked: dict[str, str] = {}
    real_binding = session.session.io_binding

    class RecordingBinding:
        def __init__(self):
            self.inner = real_binding()

        def bind_output(self, name, device_type="cpu", device_id=0):
            asked[name] = f"{device_type}:{device_id}"
            self.inner.bind_output(name, "cpu", 0)  # this machine has only host memory

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    monkeypatch.setattr(session.session, "io_binding", RecordingBinding, raising=False)
    monkeypatch.setattr(session, "_device", ("cuda", 1))
    bound = session.run_ortvalues(feeds, ["a0", None, "a1"], on_device=presents)
    assert presents and asked == {n: ("cuda:1" if n in presents else "cpu:0") for n in session.output_names}
    for name, value in bound.items():
        np.testing.assert_array_equal(value.numpy(), plain[name], err_msg=name)


def test_run_groups_rows_by_adapter_and_answers_in_request_order(bert_session, monkeypatch):
    """Interleaved adapters reach the graph grouped (each slot Gather reads the bank in runs); answers come back
    in the request's order, equal to running the interleaved batch as given."""
    rows = token_rows(7, seed=5)
    adapters = ["a1", None, "a0", "a1", None, "a0", "a1"]
    feeds = bert_session.pad_ids(rows)
    as_given = {k: v.numpy() for k, v in bert_session.run_ortvalues(feeds, adapters).items()}
    seen = []
    original = bert_session._run_ids
    slots = bert_session.snapshot().ids

    def spy(feeds, ids, *args, **kwargs):
        seen.append(list(ids))
        return original(feeds, ids, *args, **kwargs)

    monkeypatch.setattr(bert_session, "_run_ids", spy)
    out = bert_session.run(feeds, adapters)
    # grouped by slot (base = 0 first), stable
    assert seen == [list(slots([None, None, "a0", "a0", "a1", "a1", "a1"]))]
    for name, value in out.items():
        np.testing.assert_allclose(value, as_given[name], atol=1e-6, rtol=0, err_msg=name)
    seen.clear()
    bert_session.run(feeds, sorted(adapters, key=str))  # already grouped: passed through as given
    assert seen == [list(slots(sorted(adapters, key=str)))]


def test_run_llama_prefill_matches_pytorch(llama_session):
    rows = token_rows(5, seed=4, low=4, high=5)  # equal lengths: no padding
    adapters = ["a2", "a0", None, "a1", "a0"]
    feeds = llama_session.pad_ids(rows)
    for name, inp in llama_session.inputs.items():
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((len(rows), inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    logits = llama_session.run(feeds, adapters, ["logits"])["logits"]
    for b, (row, adapter) in enumerate(zip(rows, adapters)):
        want = row_alone(torch_model("llama"), row, adapter).numpy()
        np.testing.assert_allclose(logits[b], want, atol=ATOL, rtol=0, err_msg=f"row {b} ({adapter})")


def test_run_refuses_bad_requests(bert_session, llama_session):
    rows = token_rows(3, seed=5)
    with pytest.raises(ServingError, match="3 rows"):
        bert_session.run(bert_session.pad_ids(rows), ["a0", None])
    with pytest.raises(UnknownAdapterError) as err:
        bert_session.embed(rows, ["a0", "nope", "zzz"])
    # every unknown name, and never the loaded ones (other tenants' names): the one not_loaded refusal
    assert str(err.value) == "adapters 'nope', 'zzz' are not loaded on this server"
    with pytest.raises(ServingError):
        bert_session.pad_ids([[1, 2], []])
    with pytest.raises(ServingError, match="token ids"):
        bert_session.pad_ids([[1, VOCAB]])
    # each graph answers what its task gives, and names the export another request needs
    with pytest.raises(ServingError, match="'text-generation-with-past'; embeddings need a feature-extraction"):
        llama_session.embed(rows, [None] * 3)
    with pytest.raises(ServingError, match="classification needs a text-classification export"):
        llama_session.classify(rows, [None] * 3)
    with pytest.raises(ServingError, match="'feature-extraction'; generation needs a text-generation-with-past"):
        bert_session.generate(rows, [None] * 3)
    with pytest.raises(ServingError, match="classification needs"):
        bert_session.classify(rows, [None] * 3)
    assert [k for k in ("embed", "classify", "generate") if bert_session.serves(k)] == ["embed"]
    assert [k for k in ("embed", "classify", "generate") if llama_session.serves(k)] == ["generate"]


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_texts_without_a_tokenizer_give_a_serving_error(model, bert_session, llama_session):
    session = bert_session if model == "bert" else llama_session
    assert not any((session.export_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    for _ in range(2):  # the second time from what the first look found, with the same message
        with pytest.raises(ServingError, match="has no tokenizer files; send token ids"):
            if model == "bert":
                session.embed(["some text"], [None])
            else:
                session.generate(["some text"], [None], max_new_tokens=2)


def test_a_tokenizer_that_does_not_load_is_named_once_and_token_ids_still_work(tmp_path, bert, monkeypatch):
    """Tokenizer files transformers cannot load: ``warm_up`` (serve's start) refuses them; a session used in-process
    anyway gives text inputs one ServingError naming the export (the failure is remembered: not loaded again per
    request), serves token ids, and ``tokenizer_problem`` says why."""
    import transformers

    directory = tmp_path / "export"
    shutil.copytree(bert["onnx"], directory)
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizerFast"}')
    session = MultiAdapterSession(directory)
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(ServingError, match="a server does not start with a tokenizer it cannot use"):
        session.warm_up()
    assert session.tokenizer_problem is not None and "cannot load the tokenizer saved in" in session.tokenizer_problem
    for _ in range(3):
        with pytest.raises(ServingError, match="cannot load the tokenizer saved in .*; send token ids"):
            session.embed(["some text"], [None])
    assert len(calls) == 1
    assert session.embed([[5, 6, 7]], [None]).shape[0] == 1


# ---- registering at run time -----------------------------------------------------------------------------


def test_register_a_new_adapter_without_re_export(bert, llama):
    session = MultiAdapterSession(bert["onnx"])
    info = session.register("bext", bert["extra"]["bext"])
    assert info.name == "bext" and info.block_sizes == (8,) and info.modules == 4
    # a name sorting first shifts every slot: each adapter must still get its own kernels
    session.register("0first", bert["extra"]["bext"])
    assert [a.name for a in session.adapters()] == ["0first", "a0", "a1", "a2", "bext"]
    rows = token_rows(8, seed=6)
    adapters = ["bext", "a0", None, "0first", "a2", "bext", "a1", "a0"]
    want = [ref_embedding(r, "bext" if a == "0first" else a) for r, a in zip(rows, adapters)]
    got = session.embed(rows, adapters)
    for b in range(len(rows)):
        np.testing.assert_allclose(got[b], want[b], atol=ATOL, rtol=0, err_msg=f"row {b} ({adapters[b]})")
    with pytest.raises(AdapterExistsError, match="already loaded"):
        session.register("bext", bert["extra"]["bext"])
    session.register("bext", bert["extra"]["bpeft"], replace=True)
    np.testing.assert_allclose(session.embed(rows[:1], ["bext"])[0], ref_embedding(rows[0], "bpeft"), atol=ATOL, rtol=0)


def test_peft_format_adapter_registers_and_matches(bert, llama):
    assert EXTRA["bert"]["bpeft"][3] == "peft" and EXTRA["llama"]["peftish"][3] == "peft"
    assert (bert["extra"]["bpeft"] / "adapter_config.json").read_text().count('"C3A"') == 1
    session = MultiAdapterSession(bert["onnx"])
    session.register("p", bert["extra"]["bpeft"])
    rows = token_rows(4, seed=7)
    got = session.embed(rows, ["p", None, "p", "a2"])
    for b, adapter in enumerate(["bpeft", None, "bpeft", "a2"]):
        np.testing.assert_allclose(got[b], ref_embedding(rows[b], adapter), atol=ATOL, rtol=0)
    gen = MultiAdapterSession(llama["onnx"])
    gen.register("peftish", llama["extra"]["peftish"])
    prompt = token_rows(1, seed=8, low=4, high=5)[0]
    assert gen.generate([prompt], ["peftish"], max_new_tokens=6)[0] == ref_generate_alone(prompt, "peftish", 6)


def test_unregister_then_use(bert):
    session = MultiAdapterSession(bert["onnx"])
    info = session.unregister("a1")
    assert info.name == "a1" and [a.name for a in session.adapters()] == ["a0", "a2"]
    with pytest.raises(UnknownAdapterError) as err:
        session.embed(token_rows(2, seed=9), ["a1", None])
    assert str(err.value) == "adapter 'a1' is not loaded on this server"
    with pytest.raises(UnknownAdapterError) as err:
        session.unregister("a1")
    assert str(err.value) == "adapter 'a1' is not loaded on this server"
    rows = token_rows(2, seed=9)  # the others still answer correctly after the slots moved
    check_embeddings(session, rows, ["a2", "a0"])


@pytest.mark.parametrize("misfit,needle", [
    ("misfit-block", "block size 4"),
    ("misfit-module", "not adapted in the bank graph"),
    ("wrong-model", "bert"),
    ("nan", "NaN"),
])
def test_misfit_adapter_is_refused_before_any_change(misfit, needle, llama, bert, tmp_path):
    if misfit in ("misfit-block", "misfit-module"):
        directory = llama["extra"][misfit]
    elif misfit == "wrong-model":
        directory = bert["adapters"]["a0"]  # a BERT adapter for the Llama graph
    else:
        directory = tmp_path / "nan"
        shutil.copytree(llama["extra"]["extra"], directory)
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(directory / "adapter_model.safetensors"))
        key = min(k for k in tensors if k.endswith("gate_proj.bca_kernel"))
        tensors[key][0, 0, 0] = float("nan")
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    session = MultiAdapterSession(llama["onnx"])
    before, snapshot = session.adapters(), session.snapshot()
    with pytest.raises(AdapterMismatchError, match=needle):
        session.register("new", directory)
    assert session.adapters() == before and session.snapshot() is snapshot
    with pytest.raises(UnknownAdapterError):
        session.snapshot().ids(["new"])


def test_an_adapter_file_larger_than_any_fitting_adapter_is_refused_unread(llama, tmp_path):
    """A store entry whose weights file declares a 1 GiB tensor (sparse: a few KB on disk) took the server from 0.46
    to 3.35 GB before its 422; the session knows how large an adapter of its graph can be and refuses it unread."""
    import json as json_module
    import resource
    import struct

    from bca_deploy.errors import AdapterFormatError

    directory = tmp_path / "evil"
    shutil.copytree(llama["extra"]["extra"], directory)
    header = json_module.dumps({"lm_head.weight": {"dtype": "F32", "shape": [1 << 28],
                                                   "data_offsets": [0, 1 << 30]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(directory / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (1 << 30))  # sparse: nothing written
    session = MultiAdapterSession(llama["onnx"])
    assert 0 < session.max_adapter_bytes < 1 << 30
    before, peak = session.snapshot(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(AdapterFormatError, match="more than any adapter of this graph holds.*refused unread"):
        session.register("evil", directory)
    assert session.snapshot() is before
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 << 10  # KiB: nothing near 1 GiB read
    session.register("extra", llama["extra"]["extra"])  # a real adapter is far under the bound


def test_register_tensors_refuses_misfits(bert):
    session = MultiAdapterSession(bert["onnx"])
    key, entry = next(iter(session.layout.items()))
    before = session.snapshot()
    for tensors, needle in (({key: np.zeros((1, 2, 3), np.float32)}, "shape"),
                            ({"nope.bca_freq_p8": np.zeros(entry.slot_shape, np.float32)}, "not a bank input"),
                            ({key: np.full(entry.slot_shape, np.nan, np.float32)}, "NaN")):
        with pytest.raises(AdapterMismatchError, match=needle):
            session.register_tensors("t", tensors)
    assert session.snapshot() is before


@pytest.mark.parametrize("name", ["../x", "a/b", "", "__base__", ".hidden", "x" * 200, "a..b", "-x", "a b", None])
def test_invalid_adapter_names(name, bert):
    session = MultiAdapterSession(bert["onnx"], load_exported=False)
    with pytest.raises(AdapterNameError):
        session.register(name, bert["extra"]["bext"])
    with pytest.raises(AdapterNameError):
        session.register_tensors(name, {})
    assert session.adapters() == []


def test_valid_unusual_names(bert):
    session = MultiAdapterSession(bert["onnx"], load_exported=False)
    for name in ("x" * 128, "A.b_c-9", "7"):
        session.register(name, bert["extra"]["bext"])
    assert len(session.adapters()) == 3


# ---- consistency --------------------------------------------------------------------------------------------


def test_snapshot_keeps_serving_an_unregistered_adapter(bert, llama):
    session = MultiAdapterSession(bert["onnx"])
    rows = token_rows(3, seed=10)
    snapshot = session.snapshot()
    before = session.embed(rows, ["a1", "a0", None])
    session.unregister("a1")
    session.register("a1", bert["extra"]["bext"])  # same name, different adapter
    kept = session.embed(rows, ["a1", "a0", None], snapshot=snapshot)
    np.testing.assert_array_equal(kept, before)
    np.testing.assert_allclose(session.embed(rows[:1], ["a1"])[0], ref_embedding(rows[0], "bext"), atol=ATOL, rtol=0)
    session.unregister("a1")
    with pytest.raises(UnknownAdapterError):
        session.embed(rows[:1], ["a1"])
    np.testing.assert_array_equal(session.embed(rows, ["a1", "a0", None], snapshot=snapshot), before)
    gen = MultiAdapterSession(llama["onnx"])
    prompt = token_rows(1, seed=11, low=3, high=4)[0]
    snap = gen.snapshot()
    gen.unregister("a2")
    assert gen.generate([prompt], ["a2"], max_new_tokens=5, snapshot=snap)[0] == ref_generate_alone(prompt, "a2", 5)


# ---- generation ---------------------------------------------------------------------------------------------


def ref_generate_alone(prompt: list[int], adapter: str | None, new: int) -> list[int]:
    model = torch_model("llama")
    ids = torch.tensor([prompt])
    with torch.no_grad(), mixed_adapters(model, [adapter]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_pytorch(llama_session):
    model = torch_model("llama")
    rows = token_rows(6, seed=12, low=2, high=9)
    adapters = ["a0", None, "a2", "a1", "a2", "a0"]
    new = 10
    got = llama_session.generate(rows, adapters, max_new_tokens=new)
    pad = model.config.eos_token_id
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    with torch.no_grad(), mixed_adapters(model, adapters):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    for b in range(len(rows)):
        ref = out[b, length:].tolist()
        assert got[b] == ref[:len(got[b])], f"row {b} ({adapters[b]})"
        assert len(got[b]) == new or got[b][-1] == model.config.eos_token_id
        assert got[b] == ref_generate_alone(rows[b], adapters[b], new), f"row {b} alone (PyTorch)"
        assert llama_session.generate([rows[b]], [adapters[b]], max_new_tokens=new)[0] == got[b], f"row {b} alone"
    assert len({tuple(g) for g in got}) > 3  # rows differ, so a mix-up would show


def test_generation_with_a_runtime_registered_adapter(llama):
    session = MultiAdapterSession(llama["onnx"])
    session.register("extra", llama["extra"]["extra"])
    rows = token_rows(3, seed=13)
    got = session.generate(rows, ["extra", "a1", "extra"], max_new_tokens=6)
    for b, adapter in enumerate(["extra", "a1", "extra"]):
        assert got[b] == ref_generate_alone(rows[b], adapter, 6)


def test_per_row_max_new_tokens_and_eos(llama_session):
    rows = token_rows(3, seed=14)
    got = llama_session.generate(rows, ["a0", None, "a2"], max_new_tokens=[2, 5, 3])
    eos = llama_session.config.eos_token_id
    assert all(len(g) == n or (len(g) < n and g[-1] == eos) for g, n in zip(got, [2, 5, 3]))
    full = llama_session.generate(rows, ["a0", None, "a2"], max_new_tokens=5)
    for g, f in zip(got, full):
        assert g == f[:len(g)]
    # stopping at a chosen end token: the row ends with it
    stop = full[1][2]
    stopped = llama_session.generate(rows, ["a0", None, "a2"], max_new_tokens=5, eos_token_id=stop)
    assert stopped[1] == full[1][:full[1].index(stop) + 1]


def test_sampling_is_seeded_and_independent_of_the_batch(llama_session):
    rows = token_rows(4, seed=15)
    adapters = ["a1", None, "a0", "a2"]
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.3, "top_k": 50, "top_p": 0.95}
    first = llama_session.generate(rows, adapters, seed=[1, 2, 3, 4], **kwargs)
    again = llama_session.generate(rows, adapters, seed=[1, 2, 3, 4], **kwargs)
    assert first == again
    for b in range(4):
        alone = llama_session.generate([rows[b]], [adapters[b]], seed=[b + 1], **kwargs)[0]
        assert alone == first[b], f"row {b}"
    # the same row in another batch, another position, next to greedy rows
    mixed = llama_session.generate([rows[0], rows[2]], [None, "a1"], max_new_tokens=8, do_sample=[False, True],
                                   temperature=[1.0, 1.3], top_k=[0, 50], top_p=[1.0, 0.95], seed=[None, 1])
    assert mixed[1] == llama_session.generate([rows[2]], ["a1"], seed=1, **kwargs)[0]
    assert mixed[0] == llama_session.generate([rows[0]], [None], max_new_tokens=8)[0]
    other = llama_session.generate(rows, adapters, seed=[5, 6, 7, 8], **kwargs)
    assert other != first  # sampling really samples
    greedy = llama_session.generate(rows, adapters, max_new_tokens=8)
    assert greedy != first


@pytest.mark.parametrize("kwargs,needle", [
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"seed": [1, 2, 3]}, "seed"),
    ({"temperature": [1.0]}, "temperature"),
])
def test_bad_sampling_parameters(kwargs, needle, llama_session):
    with pytest.raises(ServingError, match=needle):
        llama_session.generate([[5, 6], [7]], ["a0", None], **kwargs)


def test_bad_generation_requests(llama_session):
    with pytest.raises(ServingError, match="adapter names"):
        llama_session.generate([[5, 6], [7]], ["a0"])
    with pytest.raises(ServingError):
        llama_session.generate([], [])
    with pytest.raises(UnknownAdapterError, match="nope"):
        llama_session.generate([[5, 6]], ["nope"])
    with pytest.raises(ContextLengthError, match="positions") as err:
        llama_session.check_inputs([[5] * 60], max_new_tokens=10)
    assert err.value.param == "max_new_tokens"


# ---- the adapter store --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    (root / "store").mkdir()
    for name in ("extra", "peftish"):
        shutil.copytree(llama["extra"][name], root / "store" / name)
    (root / "store" / "not-an-adapter").mkdir()
    outside = save_tiny_adapter("llama", root / "outside" / "escaped", ["q_proj"], 8, 50)
    (root / "store" / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "store" / "link-in").symlink_to(root / "store" / "extra", target_is_directory=True)
    return root


def test_store_paths(store):
    s = AdapterStore(store / "store")
    assert s.path("extra") == (store / "store" / "extra").resolve()
    assert s.path("peftish") == (store / "store" / "peftish").resolve()
    assert s.path("link-in") == (store / "store" / "extra").resolve()  # a link inside the store is fine
    assert {"extra", "link-in", "peftish"} <= set(s.names()) and "not-an-adapter" not in s.names()


@pytest.mark.parametrize("name", ["../outside/escaped", "..", "a/b", "/etc", "", "__base__", ".hidden", "x" * 200])
def test_store_refuses_traversal_names(name, store):
    with pytest.raises(AdapterNameError):
        AdapterStore(store / "store").path(name)


def test_store_entry_may_be_a_training_run(store, tmp_path):
    # bca-deploy train --out <store>/<name> writes <name>/best: the run stands for its best adapter
    root = tmp_path / "runs"
    shutil.copytree(store / "store" / "extra", root / "sentiment" / "best")
    (root / "sentiment" / "train_log.jsonl").write_text("{}\n")
    (root / "outside-best").mkdir()
    (root / "outside-best" / "best").symlink_to(store / "outside" / "escaped", target_is_directory=True)
    # a run without --eval-data has only last/: it stands for that
    shutil.copytree(store / "store" / "extra", root / "topic" / "last")
    s = AdapterStore(root)
    assert s.path("sentiment") == (root / "sentiment" / "best").resolve()
    assert s.path("topic") == (root / "topic" / "last").resolve()
    assert s.names() == ["sentiment", "topic"]
    with pytest.raises(AdapterNameError, match="outside"):
        s.path("outside-best")


def test_an_entry_the_server_may_not_read_is_its_own_problem_not_the_stores(store, monkeypatch):
    """An entry directory without read/search permission made Path.is_file raise PermissionError: every
    GET /v1/adapters and a load of that name were HTTP 500. Now the listing leaves it out and loading it is an
    AdapterNameError (HTTP 422) naming it (emulated: the tests may run as root)."""
    import bca_deploy.serving.store as store_module

    locked = (store / "store" / "locked")
    shutil.copytree(store / "store" / "extra", locked)
    real = store_module.run_adapter_dir

    def run_adapter_dir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(Path(path) / "adapter_config.json"))
        return real(path)

    monkeypatch.setattr(store_module, "run_adapter_dir", run_adapter_dir)
    s = AdapterStore(store / "store")
    assert "locked" not in s.names() and {"extra", "peftish"} <= set(s.names())
    with pytest.raises(AdapterNameError, match="adapter 'locked': its directory in the adapter store cannot be read"):
        s.path("locked")


def test_store_refuses_a_link_out_of_the_store(store):
    assert (store / "store" / "link-out" / "adapter_config.json").is_file()  # it would load
    with pytest.raises(AdapterNameError, match="outside"):
        AdapterStore(store / "store").path("link-out")


def test_store_names_only_lists_loadable_adapters(store):
    s = AdapterStore(store / "store")
    assert "link-out" not in s.names()


def test_store_unknown_name_names_only_the_request(store):
    # issue #12: an error never shows the store's other entries (other tenants' adapters) or its location
    s = AdapterStore(store / "store")
    for name in ("missing", "not-an-adapter"):
        with pytest.raises(UnknownAdapterError) as err:
            s.path(name)
        assert name in str(err.value)
        assert "extra" not in str(err.value) and "peftish" not in str(err.value) and str(store) not in str(err.value)
    with pytest.raises(InputNotFoundError, match="adapter store directory not found"):  # a FileNotFoundError too
        AdapterStore(store / "nope")
    (store / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match="expected an existing directory"):
        AdapterStore(store / "a-file")


def test_store_then_session(store, llama):
    session = MultiAdapterSession(llama["onnx"])
    s = AdapterStore(store / "store")
    session.register("extra", s.path("extra"))
    prompt = token_rows(1, seed=16)[0]
    assert session.generate([prompt], ["extra"], max_new_tokens=5)[0] == ref_generate_alone(prompt, "extra", 5)
    assert os.path.realpath(session.adapters()[-1].source) == str(s.path("extra"))


_FIRST_USE_FROM_THREADS = """
import sys, threading
from bca_deploy.serving import MultiAdapterSession
session = MultiAdapterSession(sys.argv[1])
barrier, errors = threading.Barrier(4), []
def first_use():
    barrier.wait()
    try:
        session.config, session.pad_token_id
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_use) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
sys.exit(1 if errors else 0)
"""


def test_first_use_of_the_config_from_several_threads_at_once(llama_session):
    """A generation engine's thread and the event loop's can both be the first to read the config; in a fresh
    process (transformers not imported yet) that used to raise ImportError in one of them (2 of 3 runs)."""
    import subprocess

    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _FIRST_USE_FROM_THREADS, str(llama_session.export_dir)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_texts_with_tokens_the_model_cannot_embed_are_refused_naming_them(tmp_path):
    """An export whose tokenizer has tokens past the model's embedding (added without resizing it): the
    session says so once the tokenizer is loaded (``serve`` prints it at start), a text using one is refused
    naming the text and the token (it was "token ids must be integers in [0, 128)", for a request of texts),
    and texts without them are served."""
    from transformers import AutoTokenizer

    from bca_deploy.exporters import export
    from exporters_helpers import build_model
    from http_helpers import write_wordpiece_tokenizer

    model_dir = tmp_path / "model"
    build_model("bert").save_pretrained(model_dir)
    write_wordpiece_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["zzqextra", "zzqmore"])
    tokenizer.save_pretrained(model_dir)
    adapter = save_tiny_adapter("bert", tmp_path / "a0", ["query"], 8, seed=0)
    session = MultiAdapterSession(export(model_dir, tmp_path / "onnx", [adapter], merge=False, bank=True,
                                         verbose=False))
    session.tokenizer  # noqa: B018  (serve loads it at start)
    assert "2 token(s) of the tokenizer have no embedding row in the model (ids 128..129: 'zzqextra', 'zzqmore'" \
        in session.tokenizer_mismatch
    with pytest.raises(ServingError, match=r"input 1: the text has tokens this model has no embedding for "
                                           r"\('zzqmore'\): the tokenizer saved in .* does not fit its model"):
        session.prepare(["a b c", "a zzqmore b"])
    rows = session.prepare(["a b c"])
    assert rows == [tokenizer("a b c")["input_ids"]] and max(rows[0]) < 128


def test_one_requests_many_texts_do_not_hold_another_requests_text(tmp_path_factory, monkeypatch):
    """A copy of the tokenizer is taken per text, in the order asked for: with every copy busy, a text asked for while
    another thread tokenizes many goes next. A lock was held for a whole call, so a request of 120 long texts (1.1 s)
    kept every other request's text, and every stream's detokenizer, waiting (a one-text request: 2.1 s p50 beside
    two such requests, 14 ms after). Order only, no timings: one copy, and a recording tokenizer starts the second
    thread mid-call."""
    import threading
    import time

    from bca_deploy.serving import session as session_module
    from http_helpers import bank  # the tiny BERT export with its WordPiece tokenizer

    monkeypatch.setattr(session_module, "TOKENIZER_COPIES", 1)
    session = MultiAdapterSession(bank("bert", tmp_path_factory)["onnx"], intra_op_threads=1)
    session.tokenizer  # noqa: B018  # loaded: one copy in the pool
    pool = session._tokenizers
    (real,) = pool._free
    calls: list[str] = []
    other = threading.Thread(target=lambda: session.tokenize(["the day"]))

    class Recording:
        def __call__(self, text, **kwargs):
            calls.append(text)
            if text == "a 3":  # the other request arrives while this one is in the middle of its texts
                asked = pool._next
                other.start()
                deadline = time.monotonic() + 10
                while pool._next == asked and time.monotonic() < deadline:
                    time.sleep(0.01)  # until it has asked for the copy
            return real(text, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    pool._free = [Recording()]
    many = session.tokenize([f"a {i}" for i in range(20)])
    other.join(timeout=60)
    assert calls.index("the day") == 4, calls  # right after the text being tokenized when it asked
    pool._free = [real]
    assert many == session.tokenize([f"a {i}" for i in range(20)])  # the same ids as without the interleaving


def test_one_long_text_holds_one_tokenizer_copy_not_every_request(tmp_path_factory):
    """helper-65: 118 chat messages of 32 KB (3.9 MB) took 5 s to tokenize under the one tokenizer lock, and every
    other request (and stream) waited that long, though the long request was refused as too long afterwards. Now it
    holds one of the session's copies: here the long text's call waits until another thread has tokenized and
    detokenized its own text, which it could not do if the long call held the only tokenizer (10 s timeout)."""
    import threading

    from http_helpers import bank

    session = MultiAdapterSession(bank("bert", tmp_path_factory)["onnx"], intra_op_threads=1)
    expected = session.tokenize(["the day"])
    expected_text = session.decode(expected[0])
    pool = session._tokenizers
    done = threading.Event()
    results: list = []

    class Slow:
        def __init__(self, real):
            self.real = real

        def __call__(self, text, **kwargs):
            if text == "long":
                assert done.wait(10), "another request's text waited for this one"
            return self.real(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.real, name)

    pool._free = [Slow(t) for t in pool._free]
    long = threading.Thread(target=lambda: results.append(session.tokenize(["long"])))
    asked = pool._next
    long.start()
    while pool._next == asked and long.is_alive():  # until the long call has taken its copy
        threading.Event().wait(0.01)
    assert session.tokenize(["the day"]) == expected and session.decode(expected[0]) == expected_text
    done.set()
    long.join(10)
    assert results and not long.is_alive()


def test_the_turn_pool_serves_in_order_and_skips_a_waiter_that_gave_up():
    import signal
    import threading
    import time

    from bca_deploy.serving.session import TurnPool

    pool, order = TurnPool(["copy"]), []
    held = pool.use()
    held.__enter__()  # the one item is in use: everyone below waits

    def take(name: str) -> None:
        with pool.use():
            order.append(name)

    threads = []
    for name in ("b", "c"):
        threads.append(threading.Thread(target=take, args=(name,)))
        threads[-1].start()
        while pool._next != len(threads) + 1:  # this one has its ticket before the next one asks
            time.sleep(0.001)
    # the main thread asks too and is interrupted while it waits (Ctrl-C in a script calling the library):
    # its turn is given up, or the pool would wait for it forever once b and c are done
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        pool.use().__enter__()
    timer.join()
    held.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    with pool.use() as item:  # does not wait for the abandoned turn
        order.append("main")
    assert order == ["b", "c", "main"] and item == "copy" and not any(t.is_alive() for t in threads)
    two = TurnPool(["x", "y"])
    with two.use() as first, two.use() as second:  # two items: two holders at once
        assert {first, second} == {"x", "y"}
    made = []
    grows = TurnPool(["a"], make=lambda: made.append(len(made)) or f"made{len(made)}", most=3)
    with grows.use() as one:
        pass
    with grows.use() as again, grows.use() as second, grows.use() as third:  # made only while all are in use
        assert (one, again) == ("a", "a") and {second, third} == {"made1", "made2"} and len(made) == 2
    assert grows._room == 0 and sorted(grows._free) == ["a", "made1", "made2"]


def test_a_tokenizer_that_does_not_load_stops_the_server_before_it_starts(tmp_path_factory, monkeypatch):
    """A broken (or remote-code) tokenizer in an export: warm_up, which serve and the Ray replicas run before taking
    requests, refuses it naming the file, instead of a server whose every text request fails. The remote code is
    never run, whatever a user would answer transformers' question (simulated: "y")."""
    import builtins
    import json
    import shutil

    monkeypatch.setattr(builtins, "input", lambda *args: "y")

    from http_helpers import bank

    source = bank("bert", tmp_path_factory)["onnx"]
    broken = tmp_path_factory.mktemp("broken-tokenizer") / "onnx"
    shutil.copytree(source, broken)
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[:len(text) // 2])
    with pytest.raises(ServingError, match=r"cannot load the tokenizer saved in .*remove them to serve token ids"):
        MultiAdapterSession(broken, intra_op_threads=1).warm_up()
    remote = tmp_path_factory.mktemp("remote-tokenizer") / "onnx"
    shutil.copytree(source, remote)
    marker = remote.parent / "code-was-run"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import BertTokenizerFast as EvilTokenizer\n")
    config = json.loads((remote / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    (remote / "tokenizer_config.json").write_text(json.dumps(config))
    try:  # 4.x refuses the class without its code; 5.x loads tokenizer.json with its own class
        MultiAdapterSession(remote, intra_op_threads=1).warm_up()
    except ServingError as exc:
        assert "cannot load the tokenizer" in str(exc)
    assert not marker.exists()


def test_texts_cut_far_below_the_models_positions_are_said(tmp_path, tmp_path_factory):
    """A tokenizer_config.json whose model_max_length is 3 made every served text "[CLS] word [SEP]", silently."""
    import json

    from http_helpers import bank

    directory = tmp_path / "export"
    shutil.copytree(bank("bert", tmp_path_factory)["onnx"], directory)
    assert MultiAdapterSession(directory).truncation_note is None  # not loaded yet: nothing claimed
    plain = MultiAdapterSession(directory)
    plain.warm_up()
    assert plain.truncation_note is None
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 3}))
    session = MultiAdapterSession(directory)
    session.warm_up()
    assert session.truncation_note.startswith("texts are cut at 3 tokens: the tokenizer_config.json of ")
    assert f"model holds {session.max_positions} positions" in session.truncation_note
    assert session.tokenize(["the water is hot"]) == [session.tokenize(["the water"])[0][:3]]


def test_ids_past_the_graphs_embedding_rows_are_refused_whatever_config_json_claims(tmp_path, bert):
    """A config.json whose vocab_size was raised above the graph's word-embedding rows: an id between the two reached
    onnxruntime's Gather (out of bounds: HTTP 500). The graph's rows bound ids, and the claim is said at start."""
    import json

    directory = tmp_path / "export"
    shutil.copytree(bert["onnx"], directory)
    plain = MultiAdapterSession(directory)
    rows = plain.embedding_rows
    assert rows == plain.vocabulary and plain.vocabulary_note is None
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": 99_999}))
    session = MultiAdapterSession(directory)
    assert session.vocabulary == rows and f"claims vocab_size 99999, but the graph embeds {rows}" in session.vocabulary_note
    with pytest.raises(ServingError, match=rf"token ids must be integers in \[0, {rows}\); got \[{rows}\]"):
        session.embed([[5, rows]], [None])
    assert session.embed([[5, rows - 1]], [None]).shape[0] == 1


def test_no_spin_reaches_onnxruntime_and_changes_no_answer(tmp_path_factory):
    """``serve --no-spin`` (``ServeOptions.spin``) is onnxruntime's ``session.intra_op.allow_spinning`` 0 on the
    session the server runs (read back from onnxruntime's own session options); spinning (the default) leaves
    onnxruntime's setting alone; the vectors are the same either way."""
    import click
    from click.testing import CliRunner

    from bca_deploy.serving.http import build
    from bca_deploy.serving.options import ServeOptions, click_options
    from http_helpers import bank

    key = "session.intra_op.allow_spinning"
    seen = {}

    @click.command()
    @click_options
    def command(options):
        seen["options"] = options

    assert CliRunner().invoke(command, ["--no-spin"]).exit_code == 0 and seen["options"].spin is False
    assert CliRunner().invoke(command, []).exit_code == 0 and seen["options"].spin is True
    export = bank("bert", tmp_path_factory)["onnx"]
    vectors = {}
    for spin in (True, False):
        app = build(export, options=ServeOptions(spin=spin, threads=1))
        session = app.state.server.session
        try:
            entry = session.session.get_session_options().get_session_config_entry(key)
        except Exception:  # noqa: BLE001 - onnxruntime's answer for a key never set
            entry = None
        assert entry == (None if spin else "0"), (spin, entry)
        vectors[spin] = session.embed(["a day at the sea"], [None])
        app.state.server.chat_templates.close()
    assert np.array_equal(vectors[True], vectors[False])
