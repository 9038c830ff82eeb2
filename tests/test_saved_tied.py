"""PEFT C3A adapters of a model whose vocabulary was resized before training (chat fine-tunes that add tokens): PEFT's
``save_embedding_layers`` saves the input and output embeddings beside the kernels, and on a model with tied word
embeddings (Qwen2, Llama with ``tie_word_embeddings``) that is one Parameter saved under two names,
``model.embed_tokens.weight`` and ``lm_head.weight``. Every number is PEFT's own (``PeftModel.from_pretrained`` on the
same resized model): the adapter active, disabled (PEFT writes the saved embeddings into the base model itself, so
they stay), unloaded, merged in memory (``merge_and_unload``) and merged on disk (``bca-deploy merge``, a tied
checkpoint that stores ``model.embed_tokens.weight`` alone).

bca-deploy refused these files ("tensor lm_head.weight: no such parameter"): the fit check listed a model's parameters
once each, so the tied name was unknown. A file whose two tensors differ is computed as PEFT computes it: the tie
stays, and the value written last in the model's parameter order (``lm_head.weight``) is the one used. A module PEFT
saved with its own copy (``modules_to_save``), which PEFT computes untied, is refused on a tied model, naming it."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import C3AConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bca_deploy as bd
from bca_deploy.cli import main
from bca_deploy.errors import AdapterMismatchError
from bca_deploy.merge import merge_checkpoint

IDS = torch.tensor([[1, 5, 101, 103, 7, 60], [3, 100, 2, 9, 102, 40]])  # 100..103: the added tokens
VOCAB, RESIZED = 96, 104
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=64)
E, L = "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"  # PEFT's names


def _resized(base_dir, arch):
    """The base model as the user rebuilds it: loaded, vocabulary resized (its new rows drawn the same way each time:
    bca-deploy and PEFT get the same model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch).from_pretrained(base_dir)
        torch.manual_seed(5)
        model.resize_token_embeddings(RESIZED)
    return model.eval()


def _train(base_dir, arch, out, **peft_kwargs):
    """PEFT as users run it on a resized model: kernels and the added tokens' embedding rows trained (drawn here)."""
    model = get_peft_model(_resized(base_dir, arch), C3AConfig(block_size=8, task_type="CAUSAL_LM", **peft_kwargs))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0)
        embedding = model.get_input_embeddings().weight
        embedding[VOCAB:] = torch.randn_like(embedding[VOCAB:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{case: (base directory, class name, adapter directory)}; the resized tied base saved too (``resized_base``)."""
    root = tmp_path_factory.mktemp("saved_tied")
    cases = {}
    for arch, tied in (("Qwen2ForCausalLM", True), ("LlamaForCausalLM", False)):
        config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(tie_word_embeddings=tied, **_SMALL)
        torch.manual_seed(0)
        base = root / f"{arch}-base"
        getattr(transformers, arch)(config).save_pretrained(base)
        cases[arch] = (base, arch, _train(base, arch, root / f"{arch}-adapter", target_modules=["q_proj", "v_proj"]))
    base, arch, adapter = cases["Qwen2ForCausalLM"]
    state = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(state[E], state[L]) and state[E].shape == (RESIZED, 32)  # PEFT saved the one Parameter twice
    differ = root / "qwen2-differ"  # the two names with different values: PEFT keeps the tie, lm_head's value wins
    shutil.copytree(adapter, differ)
    state[L] = state[L] + torch.randn(state[L].shape, generator=torch.Generator().manual_seed(7))
    save_file(state, differ / "adapter_model.safetensors", metadata={"format": "pt"})
    cases["qwen2-differ"] = (base, arch, differ)
    _resized(base, arch).save_pretrained(root / "resized_base")  # tied: stores model.embed_tokens.weight alone
    return root, cases


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


def _out(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", ["Qwen2ForCausalLM", "qwen2-differ", "LlamaForCausalLM"])
def test_resized_embeddings_load_as_peft_loads_them(made, case):
    _, cases = made
    base, arch, adapter = cases[case]
    peft = PeftModel.from_pretrained(_resized(base, arch), adapter).eval()
    ours = bd.load_adapter(_resized(base, arch), adapter)
    assert _rel(_out(ours), _out(peft)) < 1e-5
    with peft.disable_adapter():
        peft_disabled = _out(peft)
    with bd.adapters_disabled(ours):
        assert _rel(_out(ours), peft_disabled) < 1e-5  # the saved embeddings stay, as PEFT wrote them into the base
    peft_tied = peft.get_base_model().lm_head.weight is peft.get_base_model().model.embed_tokens.weight
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == peft_tied == (case != "LlamaForCausalLM")
    merged = bd.remove_adapters(ours, merge=True)
    peft_merged = peft.merge_and_unload()
    assert _rel(_out(merged), _out(peft_merged)) < 1e-5
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == peft_tied
    assert merged.config.tie_word_embeddings == peft_merged.config.tie_word_embeddings


def test_unloaded_keeps_the_saved_embeddings_as_peft_does(made):
    _, cases = made
    base, arch, adapter = cases["qwen2-differ"]
    peft_base = PeftModel.from_pretrained(_resized(base, arch), adapter).unload()
    plain = bd.remove_adapters(bd.load_adapter(_resized(base, arch), adapter), merge=False)
    assert _rel(_out(plain), _out(peft_base)) < 1e-5
    lm_head = load_file(adapter / "adapter_model.safetensors")[L]
    assert torch.equal(plain.model.embed_tokens.weight, lm_head)  # one Parameter, lm_head's saved value


@pytest.mark.parametrize("case", ["Qwen2ForCausalLM", "qwen2-differ"])
def test_streaming_merge_into_a_tied_checkpoint_matches_peft(made, case, tmp_path):
    root, cases = made
    base, arch, adapter = cases[case]
    with safe_open(str(root / "resized_base" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    result = CliRunner().invoke(main, ["merge", "--model", str(root / "resized_base"), "--adapter", str(adapter),
                                       "--out", str(tmp_path / "merged"), "--no-progress", "--no-fsync"])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # still tied: the embedding holds the one value
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    merged = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(_resized(base, arch), adapter).merge_and_unload()
    assert _rel(_out(merged), _out(peft)) < 1e-5


@pytest.mark.parametrize("case", ["Qwen2ForCausalLM", "qwen2-differ"])
def test_a_copy_of_the_adapter_saved_back_loads_as_peft_loads_it(made, case, tmp_path):
    """save_adapter writes the tied Parameter under both names again (two tensors: safetensors refuses shared ones),
    as base weights: PEFT's names outside modules_to_save (the copies listed both embeddings in modules_to_save, so
    PEFT, and bca-deploy reading either copy, computed the rebuilt base's embeddings with adapters disabled)."""
    _, cases = made
    base, arch, adapter = cases[case]
    original = PeftModel.from_pretrained(_resized(base, arch), adapter).eval()
    with original.disable_adapter():
        disabled = _out(original)
    active = _out(original)
    ours = bd.load_adapter(_resized(base, arch), adapter)
    bd.save_adapter(ours, tmp_path / "again", format="peft")
    bd.save_adapter(ours, tmp_path / "bca")
    state = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert torch.equal(state[E], state[L])
    peft = PeftModel.from_pretrained(_resized(base, arch), tmp_path / "again").eval()
    assert _rel(_out(peft), active) < 1e-5
    with peft.disable_adapter():
        assert _rel(_out(peft), disabled) < 1e-5
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["modules_to_save"] is None
    for copy in ("again", "bca"):
        model = bd.load_adapter(_resized(base, arch), tmp_path / copy)
        assert _rel(_out(model), active) < 1e-5
        with bd.adapters_disabled(model):
            assert _rel(_out(model), disabled) < 1e-5
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("saved", [["embed_tokens", "lm_head"], ["lm_head"]])
def test_peft_copies_of_tied_modules_are_refused_naming_them(made, saved, tmp_path):
    """PEFT's modules_to_save wraps each module in a copy of its own: on a tied model the copies are untied while the
    adapter is active, which one Parameter cannot compute. Refused by load and merge, naming the module and the way
    out; once the base model is untied, the adapter loads and gives PEFT's numbers."""
    _, cases = made
    base, arch, _ = cases["Qwen2ForCausalLM"]
    model = get_peft_model(transformers.Qwen2ForCausalLM.from_pretrained(base),
                           C3AConfig(block_size=8, task_type="CAUSAL_LM", target_modules=["q_proj"],
                                     modules_to_save=saved))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save.default" in name or "c3a_kernel" in name:
                param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path / "adapter")
    needle = (r"module lm_head: saved whole with its own copy \(PEFT modules_to_save\), so the adapter computes "
              r"lm_head.weight untied from model.embed_tokens.weight.* Untie them in the base model first")
    tied = transformers.Qwen2ForCausalLM.from_pretrained(base).eval()
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=needle):
        bd.load_adapter(tied, tmp_path / "adapter")
    assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items())
    with pytest.raises(AdapterMismatchError, match=needle):
        merge_checkpoint(base, [(tmp_path / "adapter", 1.0)], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    untied = transformers.Qwen2ForCausalLM.from_pretrained(base).eval()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    untied.config.tie_word_embeddings = False
    ours = bd.load_adapter(untied, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(transformers.Qwen2ForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    ids = IDS % VOCAB  # this base is not resized
    assert _rel(_out(ours, ids), _out(peft, ids)) < 1e-5
    with peft.disable_adapter(), bd.adapters_disabled(ours):
        assert _rel(_out(ours, ids), _out(peft, ids)) < 1e-5


def test_two_adapters_saving_one_tied_parameter_are_refused(made, tmp_path):
    """Two names of one Parameter are one module copy: an adapter saving it under the other name than an adapter
    already loaded would replace that adapter's values, and is refused as one saving the same name is."""
    _, cases = made
    base, arch, adapter = cases["Qwen2ForCausalLM"]
    trained = bd.inject(_resized(base, arch), ["k_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(trained, tmp_path / "head")
    # one saving the tied lm_head.weight whole (inject refuses that now: it trained nothing; older adapters have it)
    config = json.loads((tmp_path / "head" / "adapter_config.json").read_text())
    (tmp_path / "head" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    saved = load_file(tmp_path / "head" / "adapter_model.safetensors")
    saved["lm_head.weight"] = trained.lm_head.weight.detach().clone()
    save_file(saved, tmp_path / "head" / "adapter_model.safetensors", metadata={"format": "pt"})
    assert [k for k in saved if not k.endswith("bca_kernel")] == ["lm_head.weight"]
    embedding_only = tmp_path / "embedding"
    shutil.copytree(adapter, embedding_only)
    state = load_file(adapter / "adapter_model.safetensors")
    del state[L]
    save_file(state, embedding_only / "adapter_model.safetensors", metadata={"format": "pt"})
    model = bd.load_adapter(_resized(base, arch), tmp_path / "head")
    with pytest.raises(AdapterMismatchError, match="tensor model.embed_tokens.base_layer.weight: a base weight of "
                                                   "adapter 'second', but adapter 'default' of this Qwen2ForCausalLM "
                                                   r"saves lm_head.weight whole \(the same Parameter\)"):
        bd.load_adapter(model, embedding_only, adapter_name="second")
    assert sorted(bd.adapter_configs(model)) == ["default"]
