"""An adapter made with the other transformers line, where the two name or build a module differently, is refused
naming the module, what the installed line does with it and what to do (the fit rule ``fit.line_naming``), by
``load_model`` and by ``merge`` alike, nothing written:

* transformers 5.x fuses Mixtral's per-expert Linears (4.x's ``block_sparse_moe.experts.N.w1/w2``) into 3-D
  parameters: an adapter on them applies with 4.x only (it said "not found", as for a misspelt path);
* GPT-NeoX's language-modeling head is ``embed_out`` in 4.x, ``lm_head`` in 5.x: an adapter saving or adapting it
  names the line it was made with (5.x said "not found"; 4.x said to use GPTNeoXForCausalLM, the class in use).

The other line's adapter is this line's own with its paths renamed as that line saves them (the files differ in
nothing else). Tiny random models from configs.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

import bca_deploy as bd
from bca_deploy.adapter_io import load_safetensors, save_safetensors
from bca_deploy.errors import AdapterMismatchError
from bca_deploy.merge import merge_checkpoint
from bca_deploy.models import load_model

FIVE = int(transformers.__version__.split(".")[0]) >= 5
_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
              max_position_embeddings=64)


def renamed_adapter(source, out, renames: dict[str, str], model_type: str | None = None):
    """``source`` as another line (or model) saves it: each module path ``old`` -> ``new`` in its config and its
    tensors' names."""
    def rename(text: str) -> str:
        for old, new in renames.items():
            text = re.sub(rf"(?<![\w.]){re.escape(old)}(?=$|\.)", new, text)
        return text

    config = json.loads((source / "adapter_config.json").read_text())

    def walk(value):
        if isinstance(value, dict):
            return {rename(k): walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return rename(value) if isinstance(value, str) else value

    config = walk(config)
    if model_type is not None:
        config["base_model"]["model_type"] = model_type
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    state, metadata = load_safetensors(source / "adapter_model.safetensors")
    save_safetensors({rename(k): v for k, v in state.items()}, out / "adapter_model.safetensors", metadata)
    return out


def refused(base, adapter, tmp_path, *needles: str) -> None:
    """load_model and merge both refuse ``adapter`` on ``base``, saying every one of ``needles``; merge writes nothing."""
    for what, run in (("load_model", lambda: load_model(base, [adapter])),
                      ("merge", lambda: merge_checkpoint(base, [(adapter, 1.0)], tmp_path / "merged", progress=False))):
        with pytest.raises(AdapterMismatchError) as info:
            run()
        text = str(info.value)
        for needle in needles:
            assert needle in text, f"{what}: {needle!r} not in\n{text}"
        assert "not found in" not in text, text
    assert not (tmp_path / "merged").exists()


def test_an_adapter_on_4x_expert_linears_is_refused_on_5x_saying_5x_fuses_them(tmp_path):
    """On 5.x refused, saying why; on 4.x (a Linear per expert) the same adapter applies and merges."""
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                               **_SMALL)).save_pretrained(tmp_path / "mixtral")
    # 4.x's expert w1 (32 -> 48) and w2 (48 -> 32) are a Llama MLP's gate_proj and down_proj, renamed
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **_SMALL))
    bd.inject(llama, ["q_proj", "gate_proj", "down_proj"], block_size=8, init="normal", init_std=0.05, seed=0)
    bd.save_adapter(llama, tmp_path / "llama")
    adapter = renamed_adapter(tmp_path / "llama", tmp_path / "adapter", {
        f"model.layers.{i}.mlp.{name}": f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}"
        for i in range(2) for name, w, e in (("gate_proj", "w1", 0), ("down_proj", "w2", 3))}, "mixtral")
    if not FIVE:
        model = load_model(tmp_path / "mixtral", [adapter])
        adapted = {name for name, module in model.named_modules() if hasattr(module, "base_layer")}
        assert "model.layers.0.block_sparse_moe.experts.0.w1" in adapted, sorted(adapted)
        assert "model.layers.1.block_sparse_moe.experts.3.w2" in adapted, sorted(adapted)
        merge_checkpoint(tmp_path / "mixtral", [(adapter, 1.0)], tmp_path / "merged", progress=False)
        assert (tmp_path / "merged" / "config.json").is_file()
        return
    refused(tmp_path / "mixtral", adapter, tmp_path, "module model.layers.0.block_sparse_moe.experts.0.w1",
            "model.layers.1.block_sparse_moe.experts.3.w2", f"transformers {transformers.__version__} fuses the "
            "experts of MixtralForCausalLM into 3-D parameters (experts.gate_up_proj", "experts.down_proj",
            "apply it with transformers 4.x", "with targets other than the experts")


@pytest.mark.parametrize("how", ["saved whole", "adapted"])
def test_a_gpt_neox_head_adapter_from_the_other_line_names_the_line(how, tmp_path):
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**_SMALL, "intermediate_size": 64}))
    model.save_pretrained(tmp_path / "neox")
    head = "lm_head" if FIVE else "embed_out"
    other = "embed_out" if FIVE else "lm_head"
    assert getattr(model, head, None) is not None
    bd.inject(model, ["query_key_value"] + ([head] if how == "adapted" else []), block_size=8, init="normal",
              init_std=0.05, seed=0, modules_to_save=[head] if how == "saved whole" else ())
    bd.save_adapter(model, tmp_path / "own")
    load_model(tmp_path / "neox", [tmp_path / "own"])  # this line's own adapter fits
    adapter = renamed_adapter(tmp_path / "own", tmp_path / "adapter", {head: other})
    if FIVE:
        needles = ("module embed_out: transformers", "names it lm_head in GPTNeoXForCausalLM",
                   "made with transformers 4.x; apply it with transformers 4.x")
    else:
        needles = ("module lm_head: GPTNeoXForCausalLM names its language-modeling head embed_out in transformers",
                   "made with transformers 5.x; apply it with transformers 5.x")
    refused(tmp_path / "neox", adapter, tmp_path, *needles)
