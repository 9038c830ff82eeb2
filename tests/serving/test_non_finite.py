"""Adapters whose values are finite but overflow float32 (helper-57's probe).

- A module's ``scaling`` of 1e308 (finite) times its kernel is an infinite ΔW: such an adapter was registered (201),
  and every request on it was a 500 ``internal_error`` (the JSON encoder refused the NaN answer, a traceback in the
  log). It is refused at load now, naming the tensor (422).
- Kernels of 3e38 (finite, ΔW finite) still send the outputs to infinity on any input: the request is a 500
  ``non_finite_output`` naming the adapter (the ``openai`` client raises its ``InternalServerError``), and a request
  for another adapter batched with it is answered exactly as it is alone.

The reference for the healthy row is the in-process :class:`MultiAdapterSession` on the same export.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call, openai_client

from bca_deploy.serving import MultiAdapterSession

TEXT = "the water is hot"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    store = tmp_path_factory.mktemp("non_finite") / "store"
    shutil.copytree(art["store"], store)
    shutil.copytree(store / "bext", store / "hot")
    state = load_file(str(store / "hot" / "adapter_model.safetensors"))
    state = {k: torch.full_like(v, 3e38) if k.endswith(".bca_kernel") else v for k, v in state.items()}
    save_file(state, str(store / "hot" / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(store / "bext", store / "huge")
    config = json.loads((store / "huge" / "adapter_config.json").read_text())
    next(iter(config["modules"].values()))["scaling"] = 1e308
    (store / "huge" / "adapter_config.json").write_text(json.dumps(config))
    app = build(art["onnx"], adapter_store=store, threads=1, max_wait_ms=200.0)
    with ServerThread(app) as server:
        yield art, server.url


def test_an_infinite_delta_is_refused_at_load(served):
    _, url = served
    status, body = call(url + "/v1/adapters", "POST", {"name": "huge"})
    assert status == 422 and body["error"]["type"] == "adapter_does_not_fit", body
    assert "value.bca_kernel" in body["error"]["message"] and "beyond float32" in body["error"]["message"]
    assert "huge" not in json.dumps(call(url + "/v1/adapters")[1]["adapters"])


def test_overflowing_outputs_fail_their_request_alone(served):
    import openai

    art, url = served
    assert call(url + "/v1/adapters", "POST", {"name": "hot"})[0] == 201
    answers: dict[str, tuple[int, dict]] = {}

    def send(adapter: str) -> None:
        answers[adapter] = call(url + "/v1/embeddings", "POST", {"input": [TEXT], "adapter": adapter})

    threads = [threading.Thread(target=send, args=(a,)) for a in ("hot", "a0")]  # one batch (200 ms to form)
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    status, body = answers["hot"]
    assert status == 500 and body["error"]["type"] == "non_finite_output", body
    assert "adapter 'hot'" in body["error"]["message"] and "input 0" in body["error"]["message"]
    status, body = answers["a0"]
    assert status == 200, body
    expected = MultiAdapterSession(art["onnx"]).embed([TEXT], ["a0"])[0]
    np.testing.assert_allclose(body["data"][0]["embedding"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(openai.InternalServerError, match="non-finite|NaN or infinite"):
        openai_client(url).embeddings.create(model="hot", input=[TEXT])
    for encoding in ("float", "base64"):  # base64 would have carried the NaN silently
        status, body = call(url + "/v1/embeddings", "POST", {"model": "hot", "input": TEXT,
                                                             "encoding_format": encoding})
        assert status == 500 and body["error"]["type"] == "non_finite_output", (encoding, body)
    assert call(url + "/health")[0] == 200
