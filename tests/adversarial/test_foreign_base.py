"""An adapter applied to a model other than the base it was trained on, whose module names and shapes it fits.

PEFT records a C3A adapter's base only as ``base_model_name_or_path`` (no ``model_type``); a BERT adapter then fitted a
RoBERTa or ELECTRA of the same sizes by name and shape and was merged, exported and served without a word (PEFT loads
it too). Now the type of the local base directory it records is the adapter's type for the one fit rule
(:func:`bca_deploy.fit.model_type_problem`): another type is refused by every command, nothing written. A checkpoint
of the same type under another name (another BERT, or one fine-tuned from it) is applied with a warning naming the
recorded base (:func:`bca_deploy.fit.base_name_note`): the merged weights are still PEFT's own merge.
"""

from __future__ import annotations

import dataclasses
import logging
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adversarial_helpers import assert_clean_cli_error, leftovers, model_digest, run_cli, same_model, tree_digest  # noqa: E402
from http_helpers import log_lines  # noqa: E402
from serving_helpers import banks  # noqa: E402,F401  (the session-wide bank exports)

from bca_deploy.adapter_io import load_adapter, read_adapter, write_adapter_dir  # noqa: E402
from bca_deploy.errors import AdapterMismatchError  # noqa: E402
from bca_deploy.fit import ForeignBaseWarning, base_name_note, model_target, recorded_base_note  # noqa: E402
from bca_deploy.merge import merge_checkpoint  # noqa: E402
from bca_deploy.peft_compat import to_peft  # noqa: E402

_SIZES = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Three checkpoints of one size: a BERT (the adapter's base), another BERT, a RoBERTa and an ELECTRA (module
    names as BERT's); and a C3A adapter PEFT itself trained on the first, recording it as its base."""
    from peft import C3AConfig, get_peft_model

    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    bert = _save(tf.BertModel(tf.BertConfig(max_position_embeddings=64, **_SIZES), add_pooling_layer=False),
                 root / "bert")
    torch.manual_seed(1)
    other = _save(tf.BertModel(tf.BertConfig(max_position_embeddings=64, **_SIZES), add_pooling_layer=False),
                  root / "bert-other")
    roberta = _save(tf.RobertaModel(tf.RobertaConfig(max_position_embeddings=66, **_SIZES), add_pooling_layer=False),
                    root / "roberta")
    electra = _save(tf.ElectraModel(tf.ElectraConfig(embedding_size=32, max_position_embeddings=64, **_SIZES)),
                    root / "electra")
    peft_model = get_peft_model(tf.BertModel.from_pretrained(bert, add_pooling_layer=False),
                                C3AConfig(target_modules=["query", "value"], block_size=8))
    torch.manual_seed(2)
    for name, param in peft_model.named_parameters():
        if "c3a_kernel" in name:
            param.data.normal_(0, 0.05)
    peft_model.save_pretrained(root / "adapter")
    recorded = json.loads((root / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(bert) and "model_type" not in recorded  # PEFT's own record: the path, no type
    return {"bert": bert, "other": other, "roberta": roberta, "electra": electra, "adapter": root / "adapter"}


@pytest.mark.parametrize("kind", ["roberta", "electra"])
def test_a_peft_adapter_of_a_bert_is_refused_on_another_type_by_every_command(made, kind, tmp_path):
    adapter, base = made["adapter"], made[kind]
    inputs = {p: tree_digest(p) for p in (adapter, base)}
    needles = ["'bert'", repr(kind), str(made["bert"])]

    with pytest.raises(AdapterMismatchError) as caught:
        merge_checkpoint(base, [(adapter, 1.0)], tmp_path / "merged", progress=False)
    assert all(n in str(caught.value) for n in needles), str(caught.value)
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path, "merged") == []

    model = getattr(tf, {"roberta": "RobertaModel", "electra": "ElectraModel"}[kind]).from_pretrained(base)
    before = model_digest(model)
    with pytest.raises(AdapterMismatchError) as caught:
        load_adapter(model, adapter)
    assert all(n in str(caught.value) for n in needles), str(caught.value)
    assert same_model(before, model_digest(model))

    for args in (["merge", "--model", base, "--adapter", adapter, "--out", tmp_path / "cli", "--no-progress"],
                 ["export", "--model", base, "--adapter", adapter, "--merge", "--task", "feature-extraction",
                  "--no-validate", "--out", tmp_path / "onnx"],
                 ["convert", "--adapter", adapter, "--model", base, "--to", "bca", "--out", tmp_path / "conv"]):
        result = run_cli(args)
        assert_clean_cli_error(result, args)
        assert all(n in result.output for n in needles), (args, result.output)
    assert not any((tmp_path / n).exists() for n in ("cli", "onnx", "conv"))
    assert {p: tree_digest(p) for p in inputs} == inputs


def test_another_checkpoint_of_the_type_is_merged_as_peft_merges_it_with_a_warning(made, tmp_path):
    from peft import PeftModel

    with pytest.warns(ForeignBaseWarning) as caught:
        merge_checkpoint(made["other"], [(made["adapter"], 1.0)], tmp_path / "merged", progress=False)
    message = str(caught[0].message)
    assert str(made["bert"]) in message and str(made["other"]) in message, message
    # applied all the same: the weights are PEFT's own merge of the adapter into that model
    reference = PeftModel.from_pretrained(tf.BertModel.from_pretrained(made["other"], add_pooling_layer=False),
                                          made["adapter"]).merge_and_unload().state_dict()
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.value.weight"):
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-5, atol=1e-6)
        assert not torch.equal(merged[key], load_file(str(made["other"] / "model.safetensors"))[key])

    model = tf.BertModel.from_pretrained(made["other"], add_pooling_layer=False)
    with pytest.warns(ForeignBaseWarning, match="bert-other"):
        load_adapter(model, made["adapter"])

    args = ["merge", "--model", made["other"], "--adapter", made["adapter"], "--out", tmp_path / "cli", "--no-progress"]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert f"warning: {made['adapter']} records base model '{made['bert']}'" in result.output, result.output

    # the recorded base itself: without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForeignBaseWarning)
        merge_checkpoint(made["bert"], [(made["adapter"], 1.0)], tmp_path / "merged-base", progress=False)
        load_adapter(tf.BertModel.from_pretrained(made["bert"], add_pooling_layer=False), made["adapter"])
        # the same directory by another spelling (a trailing slash, a relative path)
        load_adapter(tf.BertModel.from_pretrained(str(made["bert"]) + "/", add_pooling_layer=False), made["adapter"])


@pytest.mark.parametrize("recorded, applied, warned", [
    ("google-bert/bert-base-uncased", "/models/bert-base-uncased", False),  # the hub id and where it was put
    ("google-bert/bert-base-uncased",
     "/home/u/.cache/huggingface/hub/models--google-bert--bert-base-uncased/snapshots/86b5e0934494bd15c9632b12f734a8a67f723594",
     False),
    ("bert-base-uncased", "BERT-base-uncased", False),
    ("google-bert/bert-base-uncased", "FacebookAI/roberta-base", True),
    ("google-bert/bert-base-uncased", "/models/bert-base-cased", True),
    (None, "/models/x", False), ("", "/models/x", False), ("/models/x", None, False),
])
def test_base_names_are_compared_by_the_models_own_name(recorded, applied, warned):
    from bca_deploy.config import AdapterConfig

    config = AdapterConfig(target_modules=["query"], block_size=8, base_model_name_or_path=recorded)
    target = dataclasses.replace(model_target(torch.nn.Linear(2, 2)), name_or_path=applied)
    assert (base_name_note(config, target) is not None) == warned


def test_a_huge_recorded_base_is_compared_in_a_bounded_time():
    """A recorded base nothing bounds (an adapter config's ``base_model_name_or_path``, an export's
    ``bank.adapter_bases`` entry) of 800,000 characters made of ``models--``: the hub-cache name was read with a regex
    that backtracked cubically (16,000 characters: a minute; this one: days), holding the load that warns. Now the
    note comes at once, naming the base cut to 200 characters; hub cache paths still give the model's own name."""
    code = (
        "from bca_deploy.fit import recorded_base_note\n"
        "for tail in ('', '/snapshots/x'):\n"
        "    note = recorded_base_note('models--' * 100_000 + tail, 'org/model', 'the model')\n"
        "    assert note is not None and len(note) < 1_000, len(note or '')\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    cache = "/hub/models--org--my-model/snapshots/abc"
    for recorded, applied, warned in ((cache, "org/my-model", False), (cache + "/sub", "my-model", False),
                                      ("/hub/models--my-model/snapshots/abc", "x/my-model", False),
                                      (cache, "org/other", True), ("/hub/models--org--m/snapshots/", "org/m", True)):
        assert (recorded_base_note(recorded, applied, "the model") is not None) == warned, recorded


def test_a_recorded_base_whose_config_is_a_fifo_is_not_read(made, tmp_path):
    """The recorded base is a path the adapter file names: a config.json there that is a named pipe is not opened
    (the adapter is then as one recording no base), in a bounded time."""
    import shutil

    base = tmp_path / "base"
    base.mkdir()
    os.mkfifo(base / "config.json")
    adapter = tmp_path / "adapter"
    shutil.copytree(made["adapter"], adapter)
    data = json.loads((adapter / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(data))
    run = subprocess.run([sys.executable, "-m", "bca_deploy.cli", "merge", "--model", str(made["roberta"]), "--adapter",
                          str(adapter), "--out", str(tmp_path / "merged"), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr  # nothing tells its type: merged, as PEFT would
    assert "warning:" in run.stderr and str(base) in run.stderr  # but not without a word


def test_a_peft_copy_served_from_a_store_is_refused_when_its_base_is_another_type(banks, made, tmp_path):  # noqa: F811
    """A bank's session takes an adapter by the same rule: a PEFT file that fits the BERT bank's layout but records
    a RoBERTa directory as its base is refused, and the session is as it was."""
    from bca_deploy.serving import MultiAdapterSession

    art = banks("bert")
    config, state = read_adapter(art["adapters"]["a0"])
    config.base_model_type = None  # as PEFT writes it: the base named by its path alone
    peft_config, peft_state = to_peft(config, state, base_model_name_or_path=str(made["roberta"]))
    directory = write_adapter_dir(tmp_path / "peft", peft_config, peft_state)
    session = MultiAdapterSession(art["onnx"])
    adapters, snapshot = session.adapters(), session.snapshot()
    with pytest.raises(AdapterMismatchError, match="'roberta'"):
        session.register("foreign", directory)
    assert session.adapters() == adapters and session.snapshot() is snapshot
    with pytest.raises(AdapterMismatchError, match="'roberta'"):
        merge_checkpoint(art["model"], [(directory, 1.0)], tmp_path / "merged", progress=False)


def test_convert_against_a_model_checks_each_kernels_output_size(made, tmp_path):
    """A kernel that fits its module's d_in/p but not its d_out (ΔW of a 64x32 weight on a 32x32 Linear): ``convert
    --model`` said "checked against the layers of" the model and wrote it; merge refused it. Now both refuse it."""
    import shutil

    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(made["adapter"], adapter)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in sorted(state) if "layer.0.attention.self.query" in k)
    state[key] = torch.full((8, 4, 8), 0.01)  # d_in/p = 4 as the module's; d_out/p = 8, twice its
    save_file(state, str(adapter / "adapter_model.safetensors"))
    for args in (["convert", "--adapter", adapter, "--model", made["bert"], "--to", "bca", "--out", tmp_path / "c"],
                 ["merge", "--model", made["bert"], "--adapter", adapter, "--out", tmp_path / "m", "--no-progress"]):
        result = run_cli(args)
        assert_clean_cli_error(result, args)
        assert "module encoder.layer.0.attention.self.query: weight (32, 32) (in=32, out=32) but the adapter was " \
               "trained on in=32, out=64" in result.output, (args, result.output)
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()


def test_a_named_pipe_put_in_place_of_a_json_file_after_the_look_is_refused_not_waited_on(tmp_path):
    """Every JSON file is looked at (a regular file?) and then read: a named pipe put there in between (a base model
    directory an adapter records is read where no store snapshots it) blocked the reader forever. The swap is
    simulated by a first look that says "a file"; the read must then refuse the pipe, in a bounded time."""
    fifo = tmp_path / "base" / "config.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    code = (
        "import pathlib, sys\n"
        "looked = pathlib.Path.is_file\n"
        f"pathlib.Path.is_file = lambda self: True if str(self) == {str(fifo)!r} else looked(self)\n"
        "from bca_deploy.config import read_json\n"
        "from bca_deploy.errors import BCAError\n"
        "try:\n"
        f"    read_json(pathlib.Path({str(fifo)!r}), what='model config')\n"
        "except BCAError as exc:\n"
        "    print('refused:', exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and f"refused: {fifo}: cannot read (a named pipe (FIFO), not a regular file)" \
        in run.stdout, (run.stdout, run.stderr)


def _recording(directory: Path, base: Path | str | None, out: Path) -> Path:
    """A copy of adapter ``directory`` that records ``base`` as the checkpoint it was trained on."""
    import shutil

    shutil.copytree(directory, out)
    data = json.loads((out / "adapter_config.json").read_text())
    data["base_model"]["name_or_path"] = None if base is None else str(base)
    (out / "adapter_config.json").write_text(json.dumps(data))
    return out


def test_a_bank_session_registers_an_adapter_of_another_checkpoint_with_the_warning(banks, tmp_path):  # noqa: F811
    """``MultiAdapterSession.register`` (what ``serve``, its store loads and Ray use) applied the model-type refusal
    but said nothing of an adapter recording another checkpoint of the type, which load, merge and export warn of:
    now it registers it with the same warning, naming the recorded base and the model the bank was exported from;
    the bank's own base, or none recorded, without a word."""
    from bca_deploy.serving import MultiAdapterSession

    art = banks("bert")
    foreign = _recording(art["adapters"]["a0"], "/elsewhere/bert-other", tmp_path / "foreign")
    session = MultiAdapterSession(art["onnx"], load_exported=False)
    with pytest.warns(ForeignBaseWarning) as caught:
        session.register("foreign", foreign)
    message = str(caught[0].message)
    assert f"{foreign} records base model '/elsewhere/bert-other'" in message, message
    assert str(art["model"].resolve()) in message, message
    with pytest.warns(ForeignBaseWarning, match="records base model '/elsewhere/bert-other'"):  # as merge says it
        merge_checkpoint(art["model"], [(foreign, 1.0)], tmp_path / "merged", progress=False)

    heard: list[str] = []  # a caller's own channel (the server's log): said there, not as a Python warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForeignBaseWarning)
        session.register("heard", foreign, warn=heard.append)
        assert len(heard) == 1 and "'/elsewhere/bert-other'" in heard[0], heard
        for name, base in (("own", art["model"]), ("unrecorded", None)):
            session.register(name, _recording(art["adapters"]["a0"], base, tmp_path / name))
    assert {a.name for a in session.adapters()} == {"foreign", "heard", "own", "unrecorded"}


def test_the_server_logs_the_warning_of_a_store_entry_and_answers_as_usual(banks, tmp_path):  # noqa: F811
    """Loaded from the adapter store (``serve --load``, ``POST /v1/adapters``), the warning goes to the server's log
    (event ``adapter_foreign_base``, with the entry's own path): the client's answer is the adapter's description as
    for any load, which never holds a server path (the paths are the operator's)."""
    from bca_deploy.serving.http import LOGGER_NAME, ServerThread, build
    from http_helpers import call

    art = banks("bert")
    store = tmp_path / "store"
    store.mkdir()
    _recording(art["adapters"]["a0"], "/elsewhere/bert-other", store / "foreign")
    _recording(art["adapters"]["a0"], art["model"], store / "own")
    with log_lines(LOGGER_NAME, logging.WARNING) as lines:
        app = build(art["onnx"], adapter_store=store, load=["foreign"], threads=1)
        events = [json.loads(line) for line in lines if '"adapter_foreign_base"' in line]
        assert len(events) == 1 and events[0]["adapter"] == "foreign", lines
        assert events[0]["warning"].startswith(f"{store / 'foreign'} records base model '/elsewhere/bert-other'")
        with ServerThread(app) as server:
            status, answer = call(server.url + "/v1/adapters", "POST", {"name": "foreign", "replace": True})
            assert status == 201 and answer["name"] == "foreign" and answer["source"] == "store", answer
            assert str(tmp_path) not in json.dumps(answer)
            assert call(server.url + "/v1/adapters", "POST", {"name": "own"})[0] == 201
    events = [json.loads(line) for line in lines if '"adapter_foreign_base"' in line]
    assert [e["adapter"] for e in events] == ["foreign", "foreign"], lines


def test_exported_adapters_recording_another_checkpoint_are_registered_with_the_warning(banks, tmp_path):  # noqa: F811
    """A bank exported with an adapter that records another checkpoint (export warns) was served without a word: its
    adapter file carries no config, and ``register_exported`` (every exported adapter as a session starts, and a
    ``POST /v1/adapters`` naming one) said nothing. The export now records each adapter's base (``bank.adapter_bases``)
    and registering it gives :meth:`register`'s warning, to ``warn`` (the server's log) or as a ForeignBaseWarning;
    an adapter recording the bank's own base, or none, says nothing."""

    from bca_deploy.exporters import export
    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.http import LOGGER_NAME, build

    art = banks("bert")
    foreign = _recording(art["adapters"]["a0"], "/elsewhere/bert-other", tmp_path / "adapters" / "foreign")
    own = _recording(art["adapters"]["a1"], art["model"], tmp_path / "adapters" / "own")
    with pytest.warns(ForeignBaseWarning, match="'/elsewhere/bert-other'"):  # the export says it, as before
        onnx = export(art["model"], tmp_path / "onnx", [foreign, own], merge=False, bank=True,
                      task="feature-extraction", verbose=False)
    with pytest.warns(ForeignBaseWarning) as caught:
        session = MultiAdapterSession(onnx)
    messages = [str(w.message) for w in caught if issubclass(w.category, ForeignBaseWarning)]
    assert len(messages) == 1 and "exported adapter 'foreign'" in messages[0], messages
    assert "records base model '/elsewhere/bert-other'" in messages[0] and str(art["model"].resolve()) in messages[0]
    heard: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForeignBaseWarning)
        session.register_exported("own", name="own-again")
        session.register_exported("foreign", name="again", warn=heard.append)
    assert len(heard) == 1 and "'/elsewhere/bert-other'" in heard[0], heard
    # the warning made an error (-W error::ForeignBaseWarning): nothing is registered, nothing replaced (before: the
    # adapter was registered when the exception came)
    before = {a.name: a.source for a in session.adapters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForeignBaseWarning)
        for name, replace in (("refused", False), ("own-again", True)):
            with pytest.raises(ForeignBaseWarning, match="exported adapter 'foreign'"):
                session.register_exported("foreign", name=name, replace=replace)
    assert {a.name: a.source for a in session.adapters()} == before
    with log_lines(LOGGER_NAME, logging.WARNING) as lines, warnings.catch_warnings():
        warnings.simplefilter("error", ForeignBaseWarning)  # serve logs it: no Python warning
        build(onnx, threads=1)
    events = [json.loads(line) for line in lines if '"adapter_foreign_base"' in line]
    assert [e["adapter"] for e in events] == ["foreign"], lines


def test_bases_recorded_for_adapters_the_bank_does_not_hold_are_refused_by_name(banks, tmp_path):  # noqa: F811
    """``bank.adapter_bases`` naming an adapter the bank does not hold (a hand-edited ``bca_export.json``: a typo of
    the adapter's name) was read without a word, and the misspelt adapter's warning silently went with it; it is now
    refused as the other per-adapter records are, naming the strangers and the bank's adapters."""
    import shutil

    from bca_deploy.exporters.errors import ExportMetadataError
    from bca_deploy.serving import MultiAdapterSession

    art = banks("bert")
    copy = tmp_path / "bank"
    shutil.copytree(art["onnx"], copy)
    meta = json.loads((copy / "bca_export.json").read_text())
    slots = meta["bank"]["slots"][1:]
    meta["bank"]["adapter_bases"] = {f"{slots[0]}x": "/elsewhere/bert-other"}
    (copy / "bca_export.json").write_text(json.dumps(meta))
    with pytest.raises(ExportMetadataError, match=rf"bank.adapter_bases names adapters the bank does not hold "
                                                  rf"\(\['{slots[0]}x'\]\); its adapters are"):
        MultiAdapterSession(copy)
    meta["bank"]["adapter_bases"] = {slots[0]: "/elsewhere/bert-other"}
    (copy / "bca_export.json").write_text(json.dumps(meta))
    with pytest.warns(ForeignBaseWarning, match="'/elsewhere/bert-other'"):
        MultiAdapterSession(copy)


def test_the_warning_quotes_a_recorded_base_model_holding_control_characters(banks, tmp_path):  # noqa: F811
    """``bca_export.json``'s ``base_model`` (the checkpoint the bank was exported from) went into the foreign-base
    warning as it was written: an escape sequence in it reached the operator's terminal as itself. It is quoted."""
    import shutil

    from bca_deploy.serving import MultiAdapterSession

    art = banks("bert")
    copy = tmp_path / "bank"
    shutil.copytree(art["onnx"], copy)
    meta = json.loads((copy / "bca_export.json").read_text())
    meta["base_model"] = "/models/bert\x1b]0;pwned\x07"
    meta["bank"]["adapter_bases"] = {meta["bank"]["slots"][1]: "/elsewhere/bert-other"}
    (copy / "bca_export.json").write_text(json.dumps(meta))
    with pytest.warns(ForeignBaseWarning) as caught:
        MultiAdapterSession(copy)
    text = " ".join(str(w.message) for w in caught if issubclass(w.category, ForeignBaseWarning))
    assert "'/models/bert\\x1b]0;pwned\\x07'" in text and "\x1b" not in text and "\x07" not in text, text
