"""Base weights: PEFT's ``save_embedding_layers`` tensors, which PEFT loads into the base model itself.

PEFT writes them when ``lm_head`` is a target (``lm_head.base_layer.weight``, the adapted layer's frozen weight) and
when the vocabulary was resized before training (``model.embed_tokens.weight`` and ``lm_head.weight``). The new
tokens' rows are drawn at random when the vocabulary is resized, so the base a user rebuilds (resized again) differs
from the one the adapter was trained on. ``PeftModel.from_pretrained`` loads the saved values into the base model.
bca-deploy dropped the ``base_layer`` copies, so every path computed with the user's rows. A re-saved adapter listed
the embeddings in ``modules_to_save``, so with adapters disabled it computed with the rebuilt base's rows.

Every number here is PEFT 0.21.2's own, on the same freshly resized base: active, disabled, unloaded and merged.
The exception is a tied ``lm_head`` that is adapted: PEFT's ``merge_and_unload`` adds ΔW to the Parameter shared
with the input embedding, so its merged model differs from its active one. bca-deploy's merge unties it and must
equal PEFT's active model. The paths are ``load_adapter``, ``remove_adapters``, ``bca-deploy merge``, ``convert``
both ways and ``save_adapter`` in both formats, each read back by bca-deploy and by PEFT. Tiny random Llama (tied and
untied) and GPT-2 models, built from configs.
"""

from __future__ import annotations

import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import C3AConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import bca_deploy as bd
from bca_deploy.cli import main
from bca_deploy.errors import AdapterFormatError, AdapterMismatchError
from bca_deploy.fit import bank_target, check_adapter, model_target
from bca_deploy.merge import merge, unmerge
from test_saved_tied import RESIZED, VOCAB, _resized  # the same tiny vocabularies, resized the same way

IDS = torch.tensor([[1, 5, 101, 103, 7, 60], [3, 100, 2, 9, 102, 40]])  # 100..103: the added tokens
P = "base_model.model."


def _llama(tied):
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                    tie_word_embeddings=tied)


def _gpt2(tied):
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)


# case: (class, config, C3A targets, whether lm_head and the input embedding are one Parameter)
CASES = {
    "llama-untied-lm_head": ("LlamaForCausalLM", _llama, ["q_proj", "v_proj", "lm_head"], False),
    "llama-tied-lm_head": ("LlamaForCausalLM", _llama, ["q_proj", "lm_head"], True),
    "gpt2-tied-lm_head": ("GPT2LMHeadModel", _gpt2, ["lm_head"], True),  # its other layers are Conv1D: no C3A
    "llama-untied-resized": ("LlamaForCausalLM", _llama, ["q_proj", "v_proj"], False),  # embeddings saved
}


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


def _close(got, want, what):
    err = _rel(got, want)
    assert err < 1e-5, f"{what}: max relative error {err:.3g} against PEFT"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{case: SimpleNamespace(base, arch, adapter, resized (a saved resized base), tied, PEFT's outputs)}."""
    root = tmp_path_factory.mktemp("base_weights")
    cases = {}
    for case, (arch, config, targets, tied) in CASES.items():
        torch.manual_seed(0)
        base = root / case / "base"
        getattr(transformers, arch)(config(tied)).save_pretrained(base)
        model = get_peft_model(_resized(base, arch), C3AConfig(block_size=8, task_type="CAUSAL_LM",
                                                              target_modules=targets))
        torch.manual_seed(3)
        with torch.no_grad():  # trained kernels; the new tokens' rows as drawn when this run resized
            for name, param in model.named_parameters():
                if "c3a_kernel" in name:
                    param.normal_(0.0, 2.0)
            head = model.get_output_embeddings()
            getattr(head, "base_layer", head).weight[VOCAB:] = torch.randn(RESIZED - VOCAB, 32)
            model.get_input_embeddings().weight[VOCAB:] = torch.randn(RESIZED - VOCAB, 32)
        adapter = root / case / "adapter"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(adapter)
        _resized(base, arch).save_pretrained(root / case / "resized")
        peft = PeftModel.from_pretrained(_resized(base, arch), adapter).eval()
        active = _out(peft)
        with peft.disable_adapter():
            disabled = _out(peft)
        unloaded = _out(PeftModel.from_pretrained(_resized(base, arch), adapter).unload())
        merged = _out(PeftModel.from_pretrained(_resized(base, arch), adapter).merge_and_unload())
        if tied and "lm_head" in targets:
            assert _rel(merged, active) > 0.1  # PEFT's merge added ΔW to the shared embedding too
            merged = active  # what a merge must keep
        cases[case] = SimpleNamespace(base=base, arch=arch, adapter=adapter, resized=root / case / "resized",
                                      tied=tied, active=active, disabled=disabled, unloaded=unloaded, merged=merged)
    return cases


def test_peft_saves_base_weights_and_they_differ_from_a_rebuilt_base(made):
    """The files hold what the docstring says, and a rebuilt base computes other numbers (the cases show)."""
    saved = {case: sorted(k for k in load_file(c.adapter / "adapter_model.safetensors") if "c3a_kernel" not in k)
             for case, c in made.items()}
    assert saved == {"llama-untied-lm_head": [P + "lm_head.base_layer.weight"],
                     "llama-tied-lm_head": [P + "lm_head.base_layer.weight"],
                     "gpt2-tied-lm_head": [P + "lm_head.base_layer.weight"],
                     "llama-untied-resized": [P + "lm_head.weight", P + "model.embed_tokens.weight"]}
    for case, c in made.items():
        assert _rel(c.disabled, _out(_resized(c.base, c.arch))) > 1e-3, case


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_adapter_gives_pefts_numbers(made, case):
    c = made[case]
    ours = bd.load_adapter(_resized(c.base, c.arch), c.adapter)
    _close(_out(ours), c.active, "load_adapter, active")
    with bd.adapters_disabled(ours):
        _close(_out(ours), c.disabled, "load_adapter, disabled")
    head, embedding = ours.get_output_embeddings(), ours.get_input_embeddings()
    assert (getattr(head, "base_layer", head).weight is embedding.weight) == c.tied  # still tied where it was
    _close(_out(bd.remove_adapters(ours, merge=True)), c.merged, "remove_adapters(merge=True)")
    plain = bd.remove_adapters(bd.load_adapter(_resized(c.base, c.arch), c.adapter), merge=False)
    _close(_out(plain), c.unloaded, "remove_adapters(merge=False)")


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_merge_gives_pefts_numbers(made, case, tmp_path):
    c = made[case]
    result = CliRunner().invoke(main, ["merge", "--model", str(c.resized), "--adapter", str(c.adapter),
                                       "--out", str(tmp_path / "merged"), "--no-progress", "--no-fsync"])
    assert result.exit_code == 0, result.output
    merged = getattr(transformers, c.arch).from_pretrained(tmp_path / "merged").eval()
    _close(_out(merged), c.merged, "bca-deploy merge")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resaved_or_converted_adapter_keeps_its_base_weights(made, case, tmp_path):
    """PEFT -> load -> save_adapter (both formats), and convert --to bca -> --to peft: each copy read by bca-deploy
    (and the PEFT copies by PEFT) gives the original's numbers, disabled too (the copies listed the embeddings as
    modules saved whole, so their disabled numbers were the rebuilt base's)."""
    c = made[case]
    ours = bd.load_adapter(_resized(c.base, c.arch), c.adapter)
    merge(ours)  # saved merged: the base weights are written without ΔW
    bd.save_adapter(ours, tmp_path / "bca")
    unmerge(ours)
    bd.save_adapter(ours, tmp_path / "peft", format="peft")
    runner = CliRunner()
    for args in (["convert", "--adapter", str(c.adapter), "--to", "bca", "--out", str(tmp_path / "converted")],
                 ["convert", "--adapter", str(tmp_path / "converted"), "--to", "peft", "--out", str(tmp_path / "back")],
                 ["merge", "--model", str(c.resized), "--adapter", str(tmp_path / "bca"), "--out",
                  str(tmp_path / "merged"), "--no-progress", "--no-fsync"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    for copy in ("bca", "peft", "converted", "back"):
        model = bd.load_adapter(_resized(c.base, c.arch), tmp_path / copy)
        _close(_out(model), c.active, f"{copy}: load_adapter, active")
        with bd.adapters_disabled(model):
            _close(_out(model), c.disabled, f"{copy}: load_adapter, disabled")
    for copy in ("peft", "back"):
        peft = PeftModel.from_pretrained(_resized(c.base, c.arch), tmp_path / copy).eval()
        _close(_out(peft), c.active, f"{copy}: PEFT, active")
        with peft.disable_adapter():
            _close(_out(peft), c.disabled, f"{copy}: PEFT, disabled")
    original = load_file(c.adapter / "adapter_model.safetensors")
    for copy in ("peft", "back"):  # PEFT's own names and values, and no modules_to_save
        again = load_file(tmp_path / copy / "adapter_model.safetensors")
        assert {k for k in again if "c3a_kernel" not in k} == {k for k in original if "c3a_kernel" not in k}
        assert all(torch.equal(again[k], v) for k, v in original.items() if "c3a_kernel" not in k)
    merged = getattr(transformers, c.arch).from_pretrained(tmp_path / "merged").eval()
    _close(_out(merged), c.merged, "bca-deploy merge of the bca-deploy copy")


def _edited(made, case, tmp_path, edit):
    """A copy of ``case``'s adapter (PEFT's, or its bca-deploy conversion with ``bca``) with ``edit`` applied to
    its tensors."""
    directory = tmp_path / "edited"
    shutil.copytree(made[case].adapter, directory)
    state = load_file(directory / "adapter_model.safetensors")
    edit(state)
    save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    return directory


BAD = {
    # a vocabulary resized to another size than the model's
    "lm_head-shape": ("llama-untied-lm_head",
                      lambda s: s.update({P + "lm_head.base_layer.weight": torch.zeros(VOCAB, 32)}),
                      AdapterFormatError, r"tensor 'base_model\.model\.lm_head\.base_layer\.weight': shape \(96, 32\), "
                                          r"expected the base layer's weight of lm_head, \(104, 32\)"),
    "embedding-shape": ("llama-untied-resized",
                        lambda s: s.update({P + "model.embed_tokens.weight": torch.zeros(VOCAB, 32)}),
                        AdapterMismatchError, r"tensor model\.embed_tokens\.base_layer\.weight: the base model's own "
                                              r"model\.embed_tokens\.weight the adapter was trained with: shape "
                                              r"\(96, 32\), this LlamaForCausalLM has \(104, 32\)"),
    "embedding-dtype": ("llama-untied-resized",
                        lambda s: s.update({P + "model.embed_tokens.weight": torch.zeros(RESIZED, 32,
                                                                                         dtype=torch.int32)}),
                        AdapterMismatchError, r"tensor model\.embed_tokens\.base_layer\.weight: dtype int32; adapter "
                                              "tensors must be real floating point"),
    "module-the-model-lacks": ("llama-untied-resized",
                               lambda s: s.update({P + "model.extra_norm.weight": torch.ones(32)}),
                               AdapterMismatchError,
                               r"tensor model\.extra_norm\.base_layer\.weight: the base model's own "
                               r"model\.extra_norm\.weight the adapter was trained with; this LlamaForCausalLM has "
                               "no such parameter"),
    "base-layer-without-kernel": ("llama-untied-lm_head",
                                  lambda s: s.update({P + "model.layers.0.mlp.up_proj.base_layer.weight":
                                                      torch.zeros(64, 32)}),
                                  AdapterFormatError, r"the base layer's weight of model\.layers\.0\.mlp\.up_proj, "
                                                      "which the file has no kernel for"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_base_weight_is_refused_naming_it_and_nothing_changes(made, bad, tmp_path):
    case, edit, error, needle = BAD[bad]
    c = made[case]
    directory = _edited(made, case, tmp_path, edit)
    model = _resized(c.base, c.arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=needle):
        bd.load_adapter(model, directory)
    assert not list(bd.bca_layers(model)) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = CliRunner().invoke(main, ["merge", "--model", str(c.resized), "--adapter", str(directory),
                                       "--out", str(tmp_path / "merged"), "--no-progress"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "base_layer.weight" in result.output, result.output
    assert not (tmp_path / "merged").exists()


def test_a_second_adapter_with_other_base_values_is_refused(made, tmp_path):
    """A model has one base model: an adapter whose base weights differ from those another adapter of the model wrote
    is refused (the first adapter would compute with them); with the same values it loads."""
    c = made["llama-untied-resized"]
    model = bd.load_adapter(_resized(c.base, c.arch), c.adapter, adapter_name="first")
    bd.load_adapter(model, c.adapter, adapter_name="same")  # the same base values: fine
    other = _edited(made, "llama-untied-resized", tmp_path,
                    lambda s: s.update({P + "lm_head.weight": s[P + "lm_head.weight"] + 1.0}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=r"tensor lm_head\.base_layer\.weight: a base weight of adapter "
                                                   r"'other' with other values than adapter 'first'"):
        bd.load_adapter(model, other, adapter_name="other")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(bd.adapter_configs(model)) == ["first", "same"]


def test_a_bank_graph_refuses_base_weights_naming_them(made):
    """Every row of a bank graph shares the base model's weights: the one fit check refuses an adapter that would
    replace them (the server's POST /v1/adapters runs it)."""
    config, state = bd.read_adapter(made["llama-untied-lm_head"].adapter)
    layout = {f"bank{i}": SimpleNamespace(module=m, block_size=s.block_size, in_features=s.in_features,
                                          out_features=s.out_features, layer_type=s.layer_type)
              for i, (m, s) in enumerate(sorted(config.modules.items()))}
    needle = (r"tensor lm_head\.base_layer\.weight: the base model's own lm_head\.weight the adapter was trained "
              "with; the bank graph cannot take it")
    with pytest.raises(AdapterMismatchError, match=needle):
        check_adapter(config, state, bank_target(layout, base_model_prefix="model"))
    # a graph that can tell its own values takes base weights equal to them (nothing to replace), and no others
    for graph, fits in ((bd.load_adapter(_resized(made["llama-untied-lm_head"].base, "LlamaForCausalLM"),
                                         made["llama-untied-lm_head"].adapter), True),
                        (_resized(made["llama-untied-lm_head"].base, "LlamaForCausalLM"), False)):  # rebuilt rows
        names = {name: info.key for name, info in model_target(graph).params.items()}  # lm_head.base_layer.weight

        def matches(name, value, graph=graph, names=names):
            own = graph.get_parameter(names[name])
            return torch.equal(own, value.to(own.dtype))

        target = bank_target(layout, base_model_prefix="model", base_matches=matches)
        if fits:
            check_adapter(config, state, target)
        else:
            with pytest.raises(AdapterMismatchError, match=needle):
                check_adapter(config, state, target)
