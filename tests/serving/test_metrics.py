"""Prometheus metrics (``bca_deploy.serving.metrics``): what ``GET /metrics`` shows about adapters.

The tiny BERT bank (exported adapters a0..a2) served in-process on 127.0.0.1 (``ServerThread``);
``/metrics`` is parsed with prometheus_client's text parser.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_helpers import bank, call

from bca_deploy.serving.metrics import BASE_ADAPTER, HIDDEN_ADAPTER, UNKNOWN_ADAPTER, ServerMetrics


def adapter_labels(url: str) -> set[str]:
    """Every ``adapter`` label value of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {s.labels["adapter"] for family in text_string_to_metric_families(text) for s in family.samples
            if "adapter" in s.labels}


def test_adapter_labels_follow_the_listing_option():
    loaded = {"tenant-a", "tenant-b"}
    shown = ServerMetrics(lambda: loaded, lambda: 0)
    hidden = ServerMetrics(lambda: loaded, lambda: 0, show_adapters=False)
    assert [shown.adapter_label(n) for n in ("tenant-a", "ghost", BASE_ADAPTER, None)] == \
        ["tenant-a", UNKNOWN_ADAPTER, BASE_ADAPTER, ""]
    assert [hidden.adapter_label(n) for n in ("tenant-a", "tenant-b", "ghost", BASE_ADAPTER, None)] == \
        [HIDDEN_ADAPTER, HIDDEN_ADAPTER, UNKNOWN_ADAPTER, BASE_ADAPTER, ""]


@pytest.mark.parametrize("list_adapters", [True, False])
def test_metrics_show_adapter_names_only_when_the_server_lists_them(tmp_path_factory, list_adapters):
    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    app = build(art["onnx"], threads=1, max_wait_ms=1, list_adapters=list_adapters)
    with ServerThread(app, startup_timeout=60) as server:
        for body in ({"input": [[5, 6, 7]], "adapter": "a0"}, {"model": "a1", "input": [[5, 6]]},
                     {"input": [[5, 6, 7]]}, {"input": [[5]], "adapter": "ghost"}):
            call(server.url + "/v1/embeddings", "POST", body)
        labels = adapter_labels(server.url)
    if list_adapters:
        assert labels >= {"a0", "a1", BASE_ADAPTER, UNKNOWN_ADAPTER}, labels
    else:  # --no-list-adapters: no adapter's name in /metrics, the same label set otherwise
        assert labels >= {HIDDEN_ADAPTER, BASE_ADAPTER, UNKNOWN_ADAPTER}, labels
        assert not labels & {"a0", "a1", "a2"}, labels


def test_no_client_can_grow_the_label_sets(tmp_path_factory):
    """Invented HTTP methods are all ``other``; an adapter's series go with it when it is unloaded, so
    loading and unloading new names (each request in between counted) leaves no series behind."""
    from bca_deploy.serving.http import ServerThread, build

    art = bank("bert", tmp_path_factory)
    app = build(art["onnx"], adapter_store=art["store"], threads=1, max_wait_ms=1)
    with ServerThread(app, startup_timeout=60) as server:
        for i in range(5):
            assert call(server.url + "/v1/models", f"M{i}X" + "Y" * 1000)[0] == 405
        for i in range(3):
            name = f"tenant-{i}"
            assert call(server.url + "/v1/load_lora_adapter", "POST", {"lora_name": name, "lora_path": "bext"})[0] \
                == 200
            assert call(server.url + "/v1/embeddings", "POST", {"model": name, "input": [[5, 6]]})[0] == 200
            assert name in adapter_labels(server.url)
            assert call(server.url + "/v1/unload_lora_adapter", "POST", {"lora_name": name})[0] == 200
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
            families = list(text_string_to_metric_families(response.read().decode()))
    methods = {s.labels["method"] for f in families for s in f.samples if "method" in s.labels}
    assert methods == {"GET", "POST", "other"}, methods
    labels = {s.labels["adapter"] for f in families for s in f.samples if "adapter" in s.labels}
    assert not {label for label in labels if label.startswith("tenant-")}, labels
    assert labels >= {"a0", "a1", "a2"} or labels >= {""}
    other = [s.value for f in families for s in f.samples
             if s.name == "bca_requests_total" and s.labels.get("method") == "other"]
    assert sum(other) == 5
