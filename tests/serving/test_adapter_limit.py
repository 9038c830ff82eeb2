"""``--max-loaded-adapters``: a client cannot load adapters without bound (helper-59's probe: 300 loads of one store
entry under new names grew the server by 1 GB, with nothing to stop a client at 30 loads a second).

On the tiny BERT bank (three exported adapters loaded at start) with a limit of 4: a fourth loads, a fifth is a
409 ``adapter_limit`` on both load routes (the ``openai`` client's ``ConflictError``), a reload in place at the
limit is allowed, and after an unload the next load succeeds. Loopback only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_loaded_adapters=4)
    with ServerThread(app) as server:
        yield server.url


def _loaded(url: str) -> list[str]:
    return sorted(a["name"] for a in call(url + "/v1/adapters")[1]["adapters"])


def test_loads_stop_at_the_limit_until_one_is_unloaded(url):
    assert _loaded(url) == ["a0", "a1", "a2"]
    assert call(url + "/v1/adapters", "POST", {"name": "bext"})[0] == 201
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "more", "lora_path": "bext"}),
                        ("/v1/adapters", {"name": "misfit"})):
        status, answer = call(url + route, "POST", body)
        assert status == 409 and answer["error"]["type"] == "adapter_limit", (route, answer)
        assert "limit of 4 loaded adapters (--max-loaded-adapters)" in answer["error"]["message"]
    assert _loaded(url) == ["a0", "a1", "a2", "bext"]
    status, _ = call(url + "/v1/adapters", "POST", {"name": "bext", "replace": True})  # in place: no new slot
    assert status in (200, 201)
    assert call(url + "/v1/adapters/a0", "DELETE")[0] == 200
    assert call(url + "/v1/load_lora_adapter", "POST", {"lora_name": "more", "lora_path": "bext"})[0] == 200
    assert _loaded(url) == ["a1", "a2", "bext", "more"]


def test_the_openai_client_raises_its_conflict_error(url):
    import openai

    from http_helpers import openai_client

    client = openai_client(url)
    with pytest.raises(openai.ConflictError, match="adapter_limit|--max-loaded-adapters"):
        client.post("/load_lora_adapter", body={"lora_name": "again", "lora_path": "bext"}, cast_to=object)


def test_reloading_an_exported_adapter_whose_file_was_damaged_is_a_500_naming_it(tmp_path_factory):
    """An exported adapter unloaded, its file then changed, and loaded again: the digest refusal was a 400
    ``bad_request``, as if the client had erred; the export is at fault: 500 ``export_damaged``, naming the file and
    no path. The other adapters keep answering."""
    import json
    import shutil

    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    export = tmp_path_factory.mktemp("damaged") / "onnx"
    shutil.copytree(art["onnx"], export)
    files = json.loads((export / "bca_export.json").read_text())["bank"]["adapter_files"]
    app = build(export, threads=1)
    with ServerThread(app) as server:
        assert call(server.url + "/v1/adapters/a0", "DELETE")[0] == 200
        shutil.copy(export / files["a1"], export / files["a0"])
        for route, body in (("/v1/adapters", {"name": "a0"}), ("/v1/load_lora_adapter", {"lora_name": "a0"})):
            status, answer = call(server.url + route, "POST", body)
            assert status == 500 and answer["error"]["type"] == "export_damaged", (route, answer)
            assert "a0.onnx_adapter: not the adapter file this bank exported for 'a0'" in answer["error"]["message"]
            assert str(export) not in answer["error"]["message"]
        status, answer = call(server.url + "/v1/embeddings", "POST", {"input": [[5, 6, 7]], "model": "a1"})
        assert status == 200, answer
