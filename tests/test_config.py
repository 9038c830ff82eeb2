"""AdapterConfig: JSON round trip, block-size rules, validation messages."""

from __future__ import annotations

import pytest

from bca_deploy.config import AdapterConfig, ModuleSpec, block_size_for, valid_block_sizes
from bca_deploy.errors import AdapterFormatError


def test_valid_block_sizes_are_common_divisors():
    assert valid_block_sizes(384, 1536) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 384]
    assert valid_block_sizes(30, 45) == [1, 3, 5, 15]


def test_block_size_pattern_follows_peft_semantics():
    pattern = {"layers.0.self_attn.q_proj": 4, "down_proj": 16, r"layers\.[12]\.mlp\.up_proj": 2}
    assert block_size_for("model.layers.0.self_attn.q_proj", 8, pattern) == 4
    assert block_size_for("model.layers.10.self_attn.q_proj", 8, pattern) == 8
    assert block_size_for("model.layers.3.mlp.down_proj", 8, pattern) == 16
    assert block_size_for("model.layers.2.mlp.up_proj", 8, pattern) == 2
    assert block_size_for("model.layers.3.mlp.up_proj", 8, pattern) == 8
    assert block_size_for("down_proj", 8, pattern) == 16  # an exact path matches too


def test_json_round_trip(tmp_path):
    config = AdapterConfig(
        target_modules=["q_proj"], block_size=8, block_size_pattern={"q_proj": 4}, scaling=0.5, init="normal",
        modules={"a.q_proj": ModuleSpec(4, 0.5, 32, 64), "b.c_attn": ModuleSpec(8, 1 / 3, 32, 96, "conv1d")},
        modules_to_save=["classifier"], base_model_type="llama", base_model_name_or_path="/m",
    )
    config.save(tmp_path / "c.json")
    assert AdapterConfig.load(tmp_path / "c.json") == config
    assert config.modules["b.c_attn"].weight_shape == (32, 96)
    assert config.modules["a.q_proj"].weight_shape == (64, 32)
    assert config.modules["a.q_proj"].kernel_shape == (16, 8, 4)
    assert config.num_parameters == 32 * 64 // 4 + 32 * 96 // 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"init": "ones"}, "init must be one of"),
        ({"scaling": float("nan")}, "scaling must be finite"),
        ({"block_size_pattern": {"q": -1}}, r"block_size_pattern\['q'\] must be a positive integer"),
        ({"modules": {"m": ModuleSpec(3, 1.0, 32, 32)}}, "module m: block size 3 does not divide"),
        ({"modules": {"m": ModuleSpec(4, 1.0, 32, 32, "conv2d")}}, "module m: layer_type must be one of"),
    ],
)
def test_invalid_values_refused(kwargs, message):
    base = {"target_modules": ["q"], "block_size": 8}
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**{**base, **kwargs})


def test_wrong_format_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(AdapterFormatError, match=f"{path}: 'format' is 'something-else'"):
        AdapterConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(AdapterFormatError, match="expected a JSON object, got list"):
        AdapterConfig.load(path)
