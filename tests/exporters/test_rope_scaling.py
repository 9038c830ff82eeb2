"""RoPE scaling whose behaviour depends on the row's length: ``longrope`` (Phi-3 128k style) switches from its short
to its long factors once a row passes ``original_max_position_embeddings``. transformers decides that in Python on
4.x (the trace froze the short factors: the graph validated on short rows and was wrong past the switch) and copies
into a buffer on 5.x (the export failed: ``aten::copy``). The graph now selects the factors itself, and the default
validation tries rows across the switch where it is short. Other scaling types (linear, yarn, llama3) are fixed
per position, and ``dynamic`` only changes past ``max_position_embeddings``, the most positions validation and
serving take."""

from __future__ import annotations

import json

import pytest
import torch
from exporters_helpers import ort_torch_logit_diffs

from bca_deploy import inject, save_adapter
from bca_deploy.exporters import ValidationError, export
from bca_deploy.exporters.validate import Case, check_cases
from bca_deploy.models import load_model

SWITCH = 24  # original_max_position_embeddings: above the default cases' 17 positions, below max_position_embeddings


def _phi3_longrope():
    import transformers as tf

    torch.manual_seed(0)
    short = [1.0 + 0.1 * i for i in range(4)]  # head_dim 8: 4 factors each
    long = [4.0 + 2.0 * i for i in range(4)]
    config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=64,
                  original_max_position_embeddings=SWITCH)
    if int(tf.__version__.split(".")[0]) >= 5:
        config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                     "long_factor": long, "original_max_position_embeddings": SWITCH}
    else:
        config["rope_scaling"] = {"type": "longrope", "short_factor": short, "long_factor": long}
    return tf.Phi3ForCausalLM(tf.Phi3Config(**config))


@pytest.fixture(scope="module")
def longrope_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("longrope")
    model = _phi3_longrope()
    model.save_pretrained(root / "model")
    inject(model, ["qkv_proj", "o_proj"], block_size=8, init="normal", init_std=0.05, seed=0)
    save_adapter(model, root / "adapter")
    return root / "model", [root / "adapter"]


@pytest.mark.parametrize("merge", [True, False])
def test_longrope_graph_switches_factors_past_original_max_positions(tmp_path, longrope_dirs, merge):
    """Rows past the switch (a prefill of 30, and a prefill of 20 whose new tokens cross it) match PyTorch with the
    adapter, merged and unmerged; before, 4.57's graph kept the short factors (0.02-0.04 max logit error) and 5.x's
    export failed."""
    model_dir, adapters = longrope_dirs
    out = export(model_dir, tmp_path / "onnx", adapters, merge=merge, verbose=False)
    meta = json.loads((out / "bca_export.json").read_text())
    assert meta["validation"]["passed"]
    generator = torch.Generator().manual_seed(1)
    for length, steps in [(5, 3), (SWITCH + 6, 3), (SWITCH - 4, 6)]:
        ids = torch.randint(3, 128, (2, length), generator=generator)
        diffs = ort_torch_logit_diffs(out, load_model(model_dir, adapters), ids, torch.ones_like(ids), steps)
        assert max(diffs) < 1e-4, f"rows of {length} + {steps} new tokens: {diffs}"


def test_default_validation_crosses_the_longrope_switch(longrope_dirs):
    """The default cases (17 positions at most) never reached a switch at 24: validation now adds a row past it
    and one whose new tokens carry it across; an explicit ``cases`` is left as given."""
    from bca_deploy.exporters.loading import rope_switch_length
    from bca_deploy.models import load_config

    config = load_config(longrope_dirs[0])
    assert rope_switch_length(config) == SWITCH
    cases = check_cases(None, config, with_past=True)
    assert Case(2, SWITCH + 1, 2) in cases and Case(2, SWITCH - 1, 3) in cases
    assert Case(1, SWITCH + 1) in check_cases(None, config, with_past=False)
    assert check_cases([(2, 5, 2)], config, with_past=True) == (Case(2, 5, 2),)


def test_validation_catches_a_graph_that_froze_the_short_factors(tmp_path, longrope_dirs, monkeypatch):
    """Traced the way it was (transformers' own switch, in Python on 4.x), the graph fails the default validation
    now that it tries rows across the switch (on 5.x that trace does not export at all)."""
    import contextlib
    import importlib

    import transformers

    from bca_deploy.exporters import ExportError

    export_module = importlib.import_module("bca_deploy.exporters.export")  # the module, not the function
    monkeypatch.setattr(export_module, "_traceable_rope", lambda model: contextlib.nullcontext())
    expected = ValidationError if int(transformers.__version__.split(".")[0]) < 5 else ExportError
    with pytest.raises(expected):
        export(longrope_dirs[0], tmp_path / "onnx", longrope_dirs[1], merge=True, verbose=False)
    assert not (tmp_path / "onnx").exists()
