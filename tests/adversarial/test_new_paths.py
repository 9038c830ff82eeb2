"""Hostile inputs on the paths added with base weights and bank digests (helper-56's review).

- A base weight (``<module>.base_layer.<param>``, PEFT's extra tensors) or a ``modules_to_save`` tensor whose values
  are finite in the file's dtype but beyond the range of the dtype the model holds the parameter in (float64 1e300
  into a float32 model) was written into the model as Inf by ``load_adapter`` and into the merged checkpoint by
  ``bca-deploy merge``. It is refused now, naming the tensor, before anything changes or is written. The reference
  is torch's own cast (``torch.finfo``), never bca-deploy's.
- A tampered ``bank.base_weights`` record of 200,000 malformed entries made ``serve`` fail with a 30 MB message (every
  entry listed); the message now names a few and counts the rest.

Tiny random Llama built from a config; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import C3AConfig, get_peft_model
from safetensors.torch import load_file, save_file

import bca_deploy as bd
from bca_deploy.cli import main
from bca_deploy.errors import AdapterMismatchError

P = "base_model.model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_paths")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"),
                           C3AConfig(block_size=8, task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(root / "adapter")
    return root


def _edited(tiny, tmp_path, value, modules_to_save=None):
    directory = tmp_path / "edited"
    shutil.copytree(tiny / "adapter", directory)
    state = load_file(directory / "adapter_model.safetensors")
    state[P + "model.norm.weight"] = value
    save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    if modules_to_save is not None:
        config = json.loads((directory / "adapter_config.json").read_text())
        config["modules_to_save"] = modules_to_save
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


# the tensor's name as bca-deploy reports it: PEFT's extra tensor is a base weight; listed in modules_to_save, the
# module's own
KINDS = {"base weight": (None, r"tensor model\.norm\.base_layer\.weight: the base model's own model\.norm\.weight"),
         "modules_to_save": (["norm"], r"tensor model\.norm\.weight:")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_value_that_overflows_the_models_dtype_is_refused_and_nothing_changes(tiny, tmp_path, kind):
    modules_to_save, needle = KINDS[kind]
    huge = torch.full((32,), 1e300, dtype=torch.float64)
    assert torch.isfinite(huge).all() and torch.isinf(huge.to(torch.float32)).all()  # torch's own cast: Inf
    directory = _edited(tiny, tmp_path, huge, modules_to_save)
    model = transformers.LlamaForCausalLM.from_pretrained(tiny / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=needle + r".*values up to 1e\+300 overflow the float32"):
        bd.load_adapter(model, directory)
    assert not list(bd.bca_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = CliRunner().invoke(main, ["merge", "--model", str(tiny / "base"), "--adapter", str(directory),
                                       "--out", str(tmp_path / "merged"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "model.norm" in result.output and "overflow the F32" in result.output
    assert not (tmp_path / "merged").exists()


def test_the_largest_value_the_models_dtype_holds_is_taken(tiny, tmp_path):
    """The boundary: float64 float32-max casts to a finite float32 (torch's cast), so it loads, as that value."""
    largest = torch.finfo(torch.float32).max
    value = torch.full((32,), largest, dtype=torch.float64)
    assert torch.isfinite(value.to(torch.float32)).all()
    model = bd.load_adapter(transformers.LlamaForCausalLM.from_pretrained(tiny / "base"),
                            _edited(tiny, tmp_path, value))
    assert torch.equal(model.model.norm.weight.detach(), torch.full((32,), largest, dtype=torch.float32))


def test_a_bank_record_of_many_malformed_digests_is_refused_in_a_short_message(tiny, tmp_path):
    from bca_deploy.exporters.bank import BankRecord
    from bca_deploy.exporters.metadata import METADATA_FILE

    result = CliRunner().invoke(main, ["export", "--model", str(tiny / "base"), "--adapter", str(tiny / "adapter"),
                                       "--bank", "--out", str(tmp_path / "bank"), "--cases", "1x3"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bank" / METADATA_FILE).read_text())["bank"]
    BankRecord.from_dict(data)  # as exported: fine
    data["base_weights"] = {f"p{i}": {"dtype": "float32"} for i in range(200_000)}
    with pytest.raises(ValueError) as err:
        BankRecord.from_dict(data)
    message = str(err.value)
    assert "bank.base_weights['p0']: expected" in message and "199,995 more malformed entries" in message
    assert len(message) < 5_000, len(message)
