"""A PEFT C3A adapter of a GPT-NeoX (Pythia) model made with transformers 5.x whose ``target_modules`` name the output
layer ``embed_out``, applied on either line.

transformers 5.x loads GPT-NeoX's stored ``embed_out`` as ``lm_head``, so there ``target_modules=["query_key_value",
"embed_out"]`` (a 4.x recipe) adapts ``query_key_value`` alone, and the file holds those kernels. On 4.x the output
layer is ``embed_out`` and the same config adapts it, and ``PeftModel.from_pretrained`` gives it a new random kernel:
PEFT's numbers there are not the trained adapter's. bca-deploy refuses it on 4.x (load and merge, nothing written),
and the message said to "fix the config ... to name the trained modules", not that the file was made on 5.x nor what
to remove; it now names the line and the way out, and done as it says the adapter gives the trained numbers. On 5.x it
gives PEFT's numbers. The file is the one PEFT on 5.x writes: built on either line with ``query_key_value`` alone (the
same kernels), then ``target_modules`` as the user gave it. Tiny random model from a config.
"""

import json

import pytest
import torch
import transformers
from peft import C3AConfig, PeftModel, get_peft_model

from bca_deploy.errors import AdapterFormatError
from bca_deploy.merge import merge_checkpoint
from bca_deploy.models import load_model
from line_helpers import load_and_merge_refusals

FIVE = int(transformers.__version__.split(".")[0]) >= 5
IDS = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32: the paths differ from PEFT by float summation order only
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def five_x_adapter(tmp_path):
    """The base checkpoint, the adapter PEFT on transformers 5.x saves for query_key_value + embed_out (non-zero
    kernels), and the trained numbers (PEFT's model as it trained it)."""
    config = transformers.GPTNeoXConfig(hidden_size=32, vocab_size=96, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "base")
    peft = get_peft_model(transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "base"),
                          C3AConfig(task_type="CAUSAL_LM", target_modules=["query_key_value"], block_size=8))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 0.02 * param.shape[1] * param.shape[2])
    peft.eval().save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["embed_out", "query_key_value"]}))
    return tmp_path / "base", tmp_path / "adapter", _logits(peft)


def test_a_5x_peft_adapter_naming_embed_out_gives_pefts_numbers_on_5x_and_on_4x_names_the_line(tmp_path):
    base, adapter, trained = five_x_adapter(tmp_path)
    peft = PeftModel.from_pretrained(transformers.GPTNeoXForCausalLM.from_pretrained(base), adapter).eval()
    if FIVE:
        _close(_logits(peft), trained)  # embed_out named no module: PEFT adapted query_key_value alone
        _close(_logits(load_model(base, [adapter]).eval()), trained)
        merge_checkpoint(base, [(adapter, 1.0)], tmp_path / "merged", progress=False)
        _close(_logits(transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()), trained)
        return
    assert not torch.allclose(_logits(peft), trained, rtol=1e-3)  # PEFT on 4.x: embed_out with a random kernel
    for what, message in load_and_merge_refusals(base, adapter, tmp_path / "merged").items():
        for needle in ("module embed_out: the config adapts it (target_modules ['embed_out', 'query_key_value']), "
                       "but the file has no kernel for it", "It is this model's output layer, which transformers 5.x "
                       "names lm_head as it loads the checkpoint: the adapter was made with transformers 5.x, where "
                       "the config's 'embed_out' names no module", "Apply it with transformers 5.x (the line it was "
                       "made with); on transformers 4.", "remove 'embed_out' from target_modules to apply the trained "
                       "modules alone"):
            assert needle in message, (what, needle, message)
    # as the message says: the trained numbers, which PEFT on 4.x gives too once the config names them
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["query_key_value"]}))
    _close(_logits(load_model(base, [adapter]).eval()), trained)
    merge_checkpoint(base, [(adapter, 1.0)], tmp_path / "merged", progress=False)
    _close(_logits(transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()), trained)
    _close(_logits(PeftModel.from_pretrained(transformers.GPTNeoXForCausalLM.from_pretrained(base), adapter).eval()),
           trained)


def test_an_output_layer_5x_does_not_rename_is_never_said_to_be_of_5x(tmp_path):
    """DistilBERT's output layer is ``vocab_projector`` on both lines (5.x renames only GPT-NeoX's ``embed_out``): a
    config adapting it whose file has no kernel for it gets the plain refusal (before: on 4.x, "which transformers 5.x
    names lm_head ... the adapter was made with transformers 5.x", false of this model)."""
    from bca_deploy import load_adapter

    config = transformers.DistilBertConfig(vocab_size=96, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=32)
    torch.manual_seed(0)
    peft = get_peft_model(transformers.DistilBertForMaskedLM(config), C3AConfig(block_size=8, target_modules=["q_lin"]))
    peft.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["q_lin", "vocab_projector"]}))
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(transformers.DistilBertForMaskedLM(config), tmp_path / "adapter")
    message = str(caught.value)
    assert "module vocab_projector: the config adapts it" in message and "fix the config" in message, message
    assert "5.x" not in message, message
