"""Injection into tiny random BERT, Llama and GPT-2 (Conv1D): exactness, freezing, refusals."""

from __future__ import annotations

import pytest
import torch

import bca_deploy as bd
from bca_deploy.errors import BlockSizeError, TargetModuleError
from bca_deploy.inject import adapter_names
from bca_deploy.layers import BCALinear
from conftest import TINY_MODELS, model_output, tiny_bert, tiny_llama


def dense_reference(factory, adapted):
    """A fresh copy of the base model with W0 + ΔW written into each adapted weight (dense math)."""
    ref = factory()
    with torch.no_grad():
        for name, layer in bd.bca_layers(adapted):
            base = ref.get_submodule(name)
            for adapter in layer.active_adapters:
                delta = layer.scalings[adapter] * bd.materialize(layer.bca_kernels[adapter].detach())
                base.weight += delta.T if layer.layer_type == "conv1d" else delta
    return ref


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_zero_init_is_bit_exact_base(arch, input_ids):
    factory, targets, p = TINY_MODELS[arch]
    base_out = model_output(factory(), input_ids)
    model = bd.inject(factory(), targets, block_size=p)
    assert torch.equal(model_output(model, input_ids), base_out)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_nonzero_kernels_equal_dense_delta(arch, input_ids):
    factory, targets, p = TINY_MODELS[arch]
    model = bd.inject(factory(), targets, block_size=p, init="normal", init_std=0.1, seed=0, scaling=0.5)
    out = model_output(model, input_ids)
    ref = model_output(dense_reference(factory, model), input_ids)
    base = model_output(factory(), input_ids)
    assert (out - base).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_every_target_wrapped_and_base_frozen():
    model = bd.inject(tiny_llama(), ["q_proj", "v_proj"], block_size=8)
    wrapped = dict(bd.bca_layers(model))
    assert sorted(wrapped) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bca_kernels.default" in n for n in trainable)
    kernels, other = bd.trainable_parameters(model)
    # q_proj 32->32, v_proj 32->16 (2 key-value heads of 8): d_out*d_in/p each, 2 layers
    assert kernels == 2 * (32 * 32 // 8) + 2 * (16 * 32 // 8) and other == 0


def test_regex_targets_and_block_size_override():
    model = bd.inject(tiny_llama(), r".*\.(q|down)_proj", block_size=8,
                      block_size_pattern={"layers.0.self_attn.q_proj": 4, "down_proj": 16})
    layers = dict(bd.bca_layers(model))
    assert set(layers) == {f"model.layers.{i}.{m}" for i in range(2)
                           for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert layers["model.layers.0.self_attn.q_proj"].bca_kernels["default"].shape == (8, 8, 4)
    assert layers["model.layers.1.self_attn.q_proj"].bca_kernels["default"].shape == (4, 4, 8)
    assert layers["model.layers.0.mlp.down_proj"].bca_kernels["default"].shape == (2, 4, 16)


def test_kernels_are_fp32_on_bf16_base(input_ids):
    model = bd.inject(tiny_llama().to(torch.bfloat16), ["q_proj"], block_size=8, init="normal", seed=0)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.bca_kernels["default"].dtype == torch.float32
    assert model(input_ids=input_ids).logits.dtype == torch.bfloat16


def test_disable_and_enable(input_ids):
    base = model_output(tiny_bert(), input_ids)
    model = bd.inject(tiny_bert(), ["query"], block_size=8, init="normal", init_std=0.1, seed=0)
    adapted = model_output(model, input_ids)
    with bd.adapters_disabled(model):
        assert torch.equal(model_output(model, input_ids), base)
    assert torch.equal(model_output(model, input_ids), adapted)
    bd.disable_adapters(model)
    assert torch.equal(model_output(model, input_ids), base)
    bd.enable_adapters(model)
    assert torch.equal(model_output(model, input_ids), adapted)


def test_two_active_adapters_sum_their_deltas(input_ids):
    model = bd.inject(tiny_bert(), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0)
    bd.inject(model, ["query"], block_size=4, init="normal", init_std=0.1, seed=1, adapter_name="second")
    bd.set_adapter(model, ["default", "second"])
    out = model_output(model, input_ids)
    ref = model_output(dense_reference(tiny_bert, model), input_ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    bd.set_adapter(model, "second")
    only_second = model_output(model, input_ids)
    torch.testing.assert_close(only_second, model_output(dense_reference(tiny_bert, model), input_ids),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown adapter"):
        bd.set_adapter(model, "nope")


def test_gradients_through_adapted_layers_match_dense(input_ids):
    """The input gradient flows through ΔWᵀ exactly (PEFT's C3A gets this wrong for p ≥ 3)."""
    model = bd.inject(tiny_bert(), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0)
    ref = dense_reference(tiny_bert, model).double()
    model.double()  # float64 so the comparison is about the math, not rounding
    grads = []
    for m in (model, ref):
        embeds = m.embeddings.word_embeddings(input_ids).detach().requires_grad_()
        m(inputs_embeds=embeds).last_hidden_state.square().sum().backward()
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    kernel = model.get_submodule("encoder.layer.0.attention.self.query").bca_kernels["default"]
    assert kernel.grad is not None and kernel.grad.abs().sum() > 0


def test_remove_adapters_restores_plain_model(input_ids):
    base = model_output(tiny_llama(), input_ids)
    model = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", init_std=0.1, seed=0)
    bd.remove_adapters(model)
    assert not list(bd.bca_layers(model))
    assert torch.equal(model_output(model, input_ids), base)


# ---- refusals: clear message, model untouched -----------------------------------------------------


def test_unknown_target_lists_available_names():
    model = tiny_llama()
    with pytest.raises(TargetModuleError) as err:
        bd.inject(model, ["query"], block_size=8)
    assert "matched no module" in str(err.value) and "q_proj" in str(err.value)
    assert not list(bd.bca_layers(model))


def test_a_regex_string_that_names_a_layer_alone_says_it_must_match_the_whole_path():
    # README: target_modules=["query", "value"] "or a regex string". The string "q_proj" matches no whole path
    # (PEFT's rule), while the names listed beside it include q_proj: the message says how to write it both ways.
    model = tiny_llama()
    with pytest.raises(TargetModuleError) as err:
        bd.inject(model, "q_proj", block_size=8)
    message = str(err.value)
    assert "regular expression matched against each module's whole path" in message
    assert "'model.layers.0.self_attn.q_proj'" in message and r"r'.*\.q_proj'" in message and "(['q_proj'])" in message
    assert not list(bd.bca_layers(model))
    # the two ways it suggests select the same layers
    paths = [n for n, _ in bd.bca_layers(bd.inject(tiny_llama(), r".*\.q_proj", block_size=8))]
    assert paths == [n for n, _ in bd.bca_layers(bd.inject(tiny_llama(), ["q_proj"], block_size=8))]
    assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_non_linear_target_refused():
    with pytest.raises(TargetModuleError, match="LayerNorm.*not a Linear"):
        bd.inject(tiny_bert(), ["LayerNorm"], block_size=8)


def test_block_size_not_dividing_refused_up_front():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BlockSizeError) as err:
        bd.inject(model, ["q_proj", "gate_proj"], block_size=8, block_size_pattern={"gate_proj": 12})
    msg = str(err.value)
    assert "model.layers.0.mlp.gate_proj" in msg and "in_features=32, out_features=64" in msg
    assert "valid block sizes for it: 1, 2, 4, 8, 16, 32" in msg
    # nothing was wrapped, not even the q_proj modules that would have fitted
    assert not list(bd.bca_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_targets_refused():
    with pytest.raises(TargetModuleError, match="empty"):
        bd.inject(tiny_bert(), [], block_size=8)


def test_duplicate_adapter_name_refused():
    model = bd.inject(tiny_bert(), ["query"], block_size=8)
    with pytest.raises(TargetModuleError, match="already has an adapter named 'default'"):
        bd.inject(model, ["query"], block_size=8)


def test_unknown_init_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        bd.inject(tiny_bert(), ["query"], block_size=8, init="ones")


def test_bcalinear_rejects_other_layers():
    with pytest.raises(TargetModuleError, match="Conv2d cannot be adapted"):
        BCALinear(torch.nn.Conv2d(2, 2, 1))


def test_block_size_pattern_keys_must_select_a_targeted_module():
    """A key matching no targeted module trained every module at the default size, silently; a key that is not a
    regular expression was an internal error (re.error)."""
    model = tiny_llama()
    with pytest.raises(TargetModuleError) as caught:
        bd.inject(model, ["q_proj", "v_proj"], block_size=8, block_size_pattern={"nomatch": 16, "(": 8, "v_proj": 16})
    message = str(caught.value)
    assert "key 'nomatch' matches none of the" in message and "key '(' is not a valid regular expression" in message
    assert "key 'v_proj'" not in message  # that key selects modules: fine
    assert not any(isinstance(m, BCALinear) for m in model.modules())  # refused before anything was injected
    bd.inject(model, ["q_proj", "v_proj"], block_size=8, block_size_pattern={"layers.1.self_attn.v_proj": 16})


def test_cli_names_the_option_of_a_repeated_pattern_key(tmp_path):
    from click.testing import CliRunner

    from bca_deploy.cli import main

    result = CliRunner().invoke(main, ["train", "--model", str(tmp_path), "--data", "d.tsv", "--out", str(tmp_path / "o"),
                                       "--block-size-pattern", "value=8,value=16"])
    assert result.exit_code == 2 and "Invalid value for '--block-size-pattern': 'value' is given twice" in result.output


# ---- two adapters that each save the same module whole (a classifier head) ------------------------------


def _peft_head_adapter(base_dir, out, seed):
    """A PEFT C3A SEQ_CLS adapter with its own trained classifier (modules_to_save), and PEFT's model of it."""
    from peft import C3AConfig, get_peft_model
    from transformers import BertForSequenceClassification

    model = get_peft_model(BertForSequenceClassification.from_pretrained(base_dir),
                           C3AConfig(task_type="SEQ_CLS", target_modules=["query", "value"], block_size=8,
                                     init_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    return model.eval()


def test_a_second_adapter_saving_the_same_head_is_refused_and_the_first_kept(tmp_path, input_ids):
    from bca_deploy.errors import AdapterMismatchError
    from transformers import BertForSequenceClassification

    tiny_bert(num_labels=3).save_pretrained(tmp_path / "base")
    foo = _peft_head_adapter(tmp_path / "base", tmp_path / "foo", seed=1)
    _peft_head_adapter(tmp_path / "base", tmp_path / "second", seed=2)
    with torch.no_grad():
        reference = foo(input_ids=input_ids).logits  # PEFT's foo: foo's kernels with foo's head
    model = bd.load_adapter(BertForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "foo",
                            adapter_name="foo")
    with pytest.raises(AdapterMismatchError, match=r"adapter 'second' saves module classifier whole.*'foo'") as err:
        bd.load_adapter(model, tmp_path / "second", adapter_name="second")
    assert "\n" not in str(err.value)
    assert adapter_names(model) == ["foo"]  # nothing of 'second' left behind
    bd.set_adapter(model, "foo")
    with torch.no_grad():
        got = model(input_ids=input_ids).logits
    assert float((got - reference).abs().max() / reference.abs().max()) < 1e-5
    # save_adapter saves foo's own head
    bd.save_adapter(model, tmp_path / "foo-again", adapter_name="foo")
    again = bd.load_adapter(BertForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "foo-again")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=input_ids).logits, reference, atol=1e-5 * float(reference.abs().max()))
    # inject() refuses the same, before touching the model
    with pytest.raises(AdapterMismatchError, match="'foo'"):
        bd.inject(model, ["key"], block_size=8, adapter_name="third", modules_to_save=["classifier"])
    assert adapter_names(model) == ["foo"]
    assert not any(isinstance(m, BCALinear) for n, m in model.named_modules() if n.endswith(".key"))
    # an adapter without a head still loads beside it
    bd.inject(model, ["key"], block_size=8, adapter_name="kernels")
    assert adapter_names(model) == ["foo", "kernels"]


def test_a_tied_lm_head_saved_whole_is_refused_naming_the_module_it_follows():
    """helper-78: `--modules-to-save lm_head` on a tied model trained nothing of it and saved the base values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        max_position_embeddings=64, tie_word_embeddings=True)).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(TargetModuleError, match=r"'lm_head'.*'model\.embed_tokens\.weight'.*save 'model\.embed_tokens'"):
        bd.inject(tied, target_modules=["q_proj"], block_size=8, modules_to_save=["lm_head"])
    assert not any(isinstance(m, BCALinear) for m in tied.modules())  # refused before anything was changed

    bd.inject(tied, target_modules=["q_proj"], block_size=8, modules_to_save=["lm_head", "embed_tokens"])
    assert tied.lm_head.weight.requires_grad  # both named: the shared weight trains
    untied = tiny_llama()  # an untied lm_head is its own module: saved whole as before
    bd.inject(untied, target_modules=["q_proj"], block_size=8, modules_to_save=["lm_head"])
    assert untied.lm_head.weight.requires_grad and not untied.model.embed_tokens.weight.requires_grad


def test_target_entries_that_match_nothing_beside_others_are_named_in_a_warning():
    """inject(model, ["query", "w1", "w2"]) on a model without w1 layers adapted query alone without a word (train
    printed a note, the library said nothing); entries that matched nothing are now named in a warning, in train's
    words (bca_deploy.inject.unmatched_targets), and the others adapted, as PEFT does."""
    model = tiny_bert()
    from bca_deploy.inject import UnmatchedTargetsWarning

    with pytest.warns(UnmatchedTargetsWarning, match=r"target_modules w1, w2 matched no Linear/Conv1D layer of BertModel; "
                            r"adapting 2 layers matched by the others$"):
        bd.inject(model, ["query", "w1", "w2"], block_size=8)
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in bd.bca_layers(model)) == ["query", "query"]


def test_fused_moe_experts_named_as_targets_are_said_to_be_fused_on_transformers_5():
    """transformers 5.x fuses Mixtral's per-expert w1/w2/w3 into 3-D parameters: inject(model, ["q_proj", "w1",
    "w2"]) adapted q_proj alone without a word. The warning now names w1, w2 and says why, in the words the fit rule
    uses for an adapter made with 4.x (bca_deploy.fit.fused_experts_reason). On 4.x they are Linears, adapted."""
    import warnings

    import transformers

    from test_merge_moe import CONFIGS

    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["mixtral"]())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bd.inject(model, ["q_proj", "w1", "w2"], block_size=8)
    said = [str(w.message) for w in caught if "matched no Linear/Conv1D layer" in str(w.message)]
    adapted = {n.rsplit(".", 1)[-1] for n, _ in bd.bca_layers(model)}
    if transformers.__version__.startswith("4."):
        assert adapted == {"q_proj", "w1", "w2"} and not said, said
        return
    assert adapted == {"q_proj"}
    assert len(said) == 1, said
    assert said[0].startswith("target_modules w1, w2 matched no Linear/Conv1D layer of MixtralForCausalLM; adapting "
                              "2 layers matched by the others. w1, w2: transformers 5."), said[0]
    assert "fuses the experts of MixtralForCausalLM into 3-D parameters (experts.gate_up_proj, experts.down_proj: " \
           "every expert's weight in one tensor)" in said[0] and said[0].endswith(
               "adapt them with transformers 4.x, or target other modules"), said[0]


@pytest.mark.parametrize("make, task, saved", [(lambda: tiny_bert(num_labels=3), "SEQ_CLS", ["classifier"]),
                                               (tiny_llama, "CAUSAL_LM", [])], ids=["bert-classifier", "llama"])
def test_all_linear_adapts_the_layers_peft_adapts(make, task, saved):
    """PEFT's ``target_modules="all-linear"`` (``--targets all-linear``, what PEFT users type) was a regex that matched
    nothing: "matched no module". It now adapts what PEFT's C3A adapts (every Linear but the output layer; a
    classifier's head saved whole), and the adapter equals PEFT's with the same kernels."""
    import warnings

    from peft import C3AConfig, get_peft_model

    peft_model = get_peft_model(make(), C3AConfig(target_modules="all-linear", block_size=8, task_type=task))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if hasattr(m, "c3a_kernel") and not hasattr(m.base_layer, "c3a_kernel"))
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "matched nothing" warning either
        bd.inject(model, "all-linear", block_size=8, init="normal", init_std=0.05, seed=0, modules_to_save=saved)
    assert sorted(n for n, _ in bd.bca_layers(model)) == theirs and theirs
    assert bd.adapter_configs(model)["default"].target_modules == "all-linear"
    listed = make()
    bd.inject(listed, ["all-linear"], block_size=8, modules_to_save=saved)  # --targets all-linear
    assert sorted(n for n, _ in bd.bca_layers(listed)) == theirs
