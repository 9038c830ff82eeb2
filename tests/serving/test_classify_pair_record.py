"""A classifier head records whether it was trained on text pairs (``task.head.text_pair``, written by ``train`` from
the file's text columns, carried into the bank export); served, single texts for a pair-trained head are refused (400
naming the field and the form expected), and pairs for a single-text one. Before, both were answered without a word:
a label read off an input the head never saw. A head that records nothing (an adapter from before, or made elsewhere)
takes either, as before."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from http_helpers import call  # noqa: E402
from training_helpers import config, one_thread, text_pair_data  # noqa: E402,F401

from bca_deploy.errors import ServingError  # noqa: E402


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    from bca_deploy.exporters import export
    from bca_deploy.training import train

    root = tmp_path_factory.mktemp("pair_record")
    model, pairs, single = text_pair_data(root)
    adapters = {"pair": train(config(model, pairs, root / "pair", max_steps=1)).last_dir,
                "single": train(config(model, single, root / "single", max_steps=1)).last_dir}
    # the pair adapter as written before the record: no text_pair in its task entry
    adapters["older"] = root / "older"
    shutil.copytree(adapters["pair"], adapters["older"])
    written = json.loads((adapters["older"] / "adapter_config.json").read_text())
    written["task"]["head"].pop("text_pair", None)
    (adapters["older"] / "adapter_config.json").write_text(json.dumps(written))
    onnx = export(model, root / "onnx", [adapters[n] for n in ("pair", "single", "older")], merge=False, bank=True,
                  cases=[(2, 6)], verbose=False)
    return {"adapters": adapters, "onnx": onnx}


def test_training_records_pairs_and_the_server_refuses_the_other_kind(bank):
    from bca_deploy.serving import MultiAdapterSession
    from bca_deploy.serving.http import ServerThread, build

    heads = {n: json.loads((d / "adapter_config.json").read_text())["task"]["head"]
             for n, d in bank["adapters"].items()}
    assert heads["pair"]["text_pair"] is True and heads["single"]["text_pair"] is False
    assert "text_pair" not in heads["older"]
    text, pair = "a charming journey", ["a charming", "journey"]
    session = MultiAdapterSession(bank["onnx"])
    names = {a.name for a in session.adapters()}
    assert names == {"pair", "single", "older"}
    with pytest.raises(ServingError, match=r"input 1: a single text, but adapter 'pair' was trained on text pairs "
                                           r"\(its head's text_pair is true\): send each row as a pair"):
        session.classify([pair, text], ["pair", "pair"])
    with pytest.raises(ServingError, match=r"input 0: a text pair, but adapter 'single' was trained on single texts "
                                           r"\(its head's text_pair is false\)"):
        session.classify([pair], ["single"])
    with ServerThread(build(bank["onnx"], max_wait_ms=5, threads=1)) as server:
        def post(adapter, rows):
            return call(server.url + "/v1/classify", "POST", {"input": rows, "adapter": adapter}, timeout=60)

        refused = {("pair", "text"): post("pair", [text]), ("single", "pair"): post("single", [pair])}
        answered = {("pair", "pair"): post("pair", [pair]), ("single", "text"): post("single", [text]),
                    ("older", "text"): post("older", [text]), ("older", "pair"): post("older", [pair]),
                    ("pair", "ids"): post("pair", [[2, 7, 3]])}  # token ids: the client's own tokenization
    for key, (status, body) in refused.items():
        assert status == 400 and body["error"]["param"] == "input", (key, body)
        assert "text_pair" in body["error"]["message"] and f"adapter {key[0]!r}" in body["error"]["message"]
    for key, (status, body) in answered.items():
        assert status == 200 and len(body["data"]) == 1, (key, body)
