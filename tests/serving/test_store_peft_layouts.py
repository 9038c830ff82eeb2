"""Adapter store entries laid out as PEFT and transformers save adapters, loaded by name, against PEFT's numbers.

An entry a user copies in as PEFT saved it: ``save_pretrained`` of adapters not named ``default`` writes each to a
folder of its name (``run/pos/``, ``run/neg/``) and nothing at the top, and a transformers ``Trainer``'s output_dir
holds ``checkpoint-<step>/`` folders. Loaded by name, either was answered "no adapter 'run' in the adapter store"
(a 404, though the entry is there) while ``load_adapter``, ``merge`` and ``inspect`` name the folders inside. Now the
store names them too (inside the entry, never the store's location) and says how to load one; done as it says (a
link in the store), the adapter serves PEFT's own numbers. Tiny random BERT classifier; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import C3AConfig, PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from exporters_helpers import graph_feeds  # noqa: E402
from http_helpers import assert_error, call  # noqa: E402

from bca_deploy.cli import main  # noqa: E402
from bca_deploy.errors import AdapterFormatError  # noqa: E402

IDS = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(1))
#: fp32: the bank graph differs from PEFT by float summation order only (~1e-7 of the largest logit here)
RTOL = 1e-5


def _config():
    return transformers.BertConfig(hidden_size=32, vocab_size=100, num_labels=3, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base, two PEFT adapters saved as ``save_pretrained`` saves named ones (``store/run/{pos,neg}``, each with
    its classifier saved whole), and a bank graph exported with ``pos``."""
    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_config()).save_pretrained(root / "base")
    torch.manual_seed(3)
    peft_model = get_peft_model(transformers.BertForSequenceClassification.from_pretrained(root / "base"),
                                C3AConfig(task_type="SEQ_CLS", block_size=8, target_modules=["query", "value"]),
                                adapter_name="pos")
    peft_model.add_adapter("neg", C3AConfig(task_type="SEQ_CLS", block_size=8, target_modules=["query", "value"]))
    with torch.no_grad():  # kernels and heads drawn non-zero (ΔW entries ~0.02, as large as the base weights)
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 0.02 * param.shape[1] * param.shape[2])
            elif "modules_to_save" in name:
                param.normal_(0.0, 0.5)
    store = root / "store"
    peft_model.eval().save_pretrained(store / "run", selected_adapters=["pos", "neg"])
    assert sorted(p.name for p in (store / "run").iterdir()) == ["README.md", "neg", "pos"]  # no adapter at the top
    result = CliRunner().invoke(main, ["export", "--model", str(root / "base"), "--adapter", str(store / "run" / "pos"),
                                       "--bank", "--out", str(root / "bank"), "--cases", "1x5"])
    assert result.exit_code == 0, result.output
    return {"root": root, "base": root / "base", "store": store, "bank": root / "bank"}


def _peft_logits(base: Path, adapter: Path) -> np.ndarray:
    """PEFT's own forward of ``adapter`` (the reference)."""
    model = PeftModel.from_pretrained(transformers.BertForSequenceClassification.from_pretrained(base), adapter)
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.numpy()


def _served(made, store: Path, entry: str) -> np.ndarray:
    """The logits of store entry ``entry`` loaded by name into the bank, as the server loads it."""
    import onnxruntime as ort

    from bca_deploy.serving.http import register_from_store
    from bca_deploy.serving.session import MultiAdapterSession
    from bca_deploy.serving.store import AdapterStore

    session = MultiAdapterSession(made["bank"])
    adapters = AdapterStore(store)
    register_from_store(session, adapters, "live", entry, adapters.path(entry), replace=False)
    graph = ort.InferenceSession(str(made["bank"] / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(graph_feeds(graph, IDS.numpy()), ["live", "live"])["logits"]


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    err = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert err < RTOL, f"max relative error {err:.3g} against PEFT"


def test_a_peft_folder_of_named_adapters_in_the_store_names_them_and_serves_one_given_its_own_entry(made, tmp_path):
    from bca_deploy.serving.store import AdapterStore

    store = tmp_path / "store"
    shutil.copytree(made["store"], store)
    expected = ("adapter 'run': its folder has no adapter_config.json; it holds the adapter directories neg/, pos/ "
                "(PEFT saves an adapter not named 'default' in a folder of its name): give run/neg an entry of its own "
                "in the adapter store (move or link it there) and load it by that name")
    with pytest.raises(AdapterFormatError) as caught:
        AdapterStore(store).path("run")
    assert str(caught.value) == expected  # inside the entry only: no store location
    assert AdapterStore(store).names() == []

    (store / "neg").symlink_to("run/neg", target_is_directory=True)  # as the message says
    assert AdapterStore(store).names() == ["neg"]
    _close(_served(made, store, "neg"), _peft_logits(made["base"], store / "run" / "neg"))


def test_a_trainer_output_dir_in_the_store_names_its_best_and_last_checkpoints(made, tmp_path):
    """A transformers Trainer's output_dir: each ``checkpoint-<step>/`` is an adapter (here PEFT's ``pos`` copied, as a
    Trainer saves it), ``trainer_state.json`` records the best."""
    from bca_deploy.serving.store import AdapterStore

    store = tmp_path / "store"
    for step in (5, 10, 15):
        shutil.copytree(made["store"] / "run" / "pos", store / "out" / f"checkpoint-{step}")
        (store / "out" / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"best_model_checkpoint": "trainer/out/checkpoint-10", "global_step": step}))
    expected = ("adapter 'out': its folder has no adapter_config.json; it holds the checkpoints checkpoint-5/, "
                "checkpoint-10/, checkpoint-15/ of a transformers Trainer run (its output_dir; each checkpoint is an "
                "adapter saved during training): give one an entry of its own in the adapter store (move or link it "
                "there) and load it by that name, such as the best, out/checkpoint-10 (trainer_state.json's "
                "best_model_checkpoint), or the last, out/checkpoint-15")
    with pytest.raises(AdapterFormatError) as caught:
        AdapterStore(store).path("out")
    assert str(caught.value) == expected
    (store / "best").symlink_to("out/checkpoint-10", target_is_directory=True)
    _close(_served(made, store, "best"), _peft_logits(made["base"], made["store"] / "run" / "pos"))


def test_the_server_answers_a_folder_of_named_adapters_with_what_it_holds(made, tmp_path):
    """``POST /v1/adapters {"name": "run"}`` was a 404 "no adapter 'run' in the adapter store"."""
    from bca_deploy.serving.http import ServerThread, build

    store = tmp_path / "store"
    shutil.copytree(made["store"], store)
    with ServerThread(build(made["bank"], adapter_store=store, threads=1, max_wait_ms=2)) as server:
        status, body = call(server.url + "/v1/adapters", "POST", {"name": "run"})
        assert_error(status, body, 422, "invalid_adapter", ["adapter 'run'", "neg/, pos/", "give run/neg an entry"])
        status, body = call(server.url + "/v1/adapters", "POST", {"name": "nothing"})
        assert_error(status, body, 404, "unknown_adapter", ["no adapter 'nothing' in the adapter store"])


def test_folders_holding_adapters_only_inside_them_are_said_at_start(made, tmp_path):
    """Left out of the listing without a word, as folders with invalid names were (those are said at start too)."""
    from bca_deploy.serving.http import build, startup_notes

    store = tmp_path / "store"
    shutil.copytree(made["store"], store)
    shutil.copytree(made["store"] / "run" / "pos", store / "out" / "checkpoint-5")
    shutil.copytree(made["store"] / "run" / "pos", store / "plain")  # an adapter: not said
    notes = startup_notes(build(made["bank"], adapter_store=store, threads=1).state.server)
    said = [n for n in notes if "hold adapters only in folders inside them" in n]
    assert said == ["2 folder(s) of the adapter store hold adapters only in folders inside them (as PEFT saves adapters "
                    "not named 'default', or a transformers Trainer its checkpoints), which no request can name: "
                    "'out' (checkpoint-5/); 'run' (neg/, pos/); give each adapter to serve an entry of its own (move or "
                    "link it into the store)"], notes
    # done as it says: each adapter inside an entry of its own (a link), nothing left to say
    (store / "neg").symlink_to("run/neg", target_is_directory=True)
    (store / "pos").symlink_to("run/pos", target_is_directory=True)
    shutil.move(store / "out" / "checkpoint-5", store / "checkpoint-5")
    notes = startup_notes(build(made["bank"], adapter_store=store, threads=1).state.server)
    assert not any("hold adapters only in folders" in n for n in notes), notes


def test_folders_inside_an_entry_linked_out_of_the_store_are_neither_named_nor_looked_through(tmp_path):
    """A folder inside an entry that is (or whose config is) a link out of the store is no adapter the store could
    serve, even given an entry of its own: it is not named, in a request's answer or at start, and its config is not
    looked at (before: named, with the advice to link it into the store, which the store then refuses)."""
    from bca_deploy.errors import UnknownAdapterError
    from bca_deploy.serving.store import AdapterStore

    outside, store = tmp_path / "outside", tmp_path / "store"
    for folder in (outside / "secret", outside / "ckpt", store / "tr" / "checkpoint-1", store / "run" / "b"):
        folder.mkdir(parents=True)
    for config in (outside / "secret", outside / "ckpt", store / "tr" / "checkpoint-1"):
        (config / "adapter_config.json").write_text("{}")
    (store / "run" / "a").symlink_to(outside / "secret", target_is_directory=True)
    (store / "run" / "b" / "adapter_config.json").symlink_to(outside / "secret" / "adapter_config.json")
    (store / "tr" / "checkpoint-9").symlink_to(outside / "ckpt", target_is_directory=True)
    (store / "loop").mkdir()
    (store / "loop" / "l").symlink_to(store / "loop" / "l")  # a link loop beside nothing else: no adapter inside

    with pytest.raises(UnknownAdapterError, match="^no adapter 'run' in the adapter store$"):
        AdapterStore(store).path("run")
    with pytest.raises(AdapterFormatError) as caught:
        AdapterStore(store).path("tr")
    assert "the checkpoint checkpoint-1/ of" in str(caught.value) and "checkpoint-9" not in str(caught.value)
    assert AdapterStore(store).nested() == [("tr", ["checkpoint-1"])]


def test_folder_names_inside_entries_are_said_at_start_without_control_characters(made, tmp_path):
    """A folder's name is the file system's: a line break or a terminal escape in it is shown escaped in the start-up
    note that ``serve`` prints to the operator's terminal (before: written raw, as the entries' names never were)."""
    from bca_deploy.serving.http import build, startup_notes

    store = tmp_path / "store"
    shutil.copytree(made["store"] / "run" / "pos", store / "run" / "a\nnote: forged\x1b]0;title\x07")
    notes = startup_notes(build(made["bank"], adapter_store=store, threads=1).state.server)
    said = [n for n in notes if "hold adapters only in folders inside them" in n]
    assert len(said) == 1 and "'run' (a\\nnote: forged\\x1b]0;title\\x07/)" in said[0], notes
    assert all(c.isprintable() for n in notes for c in n)
