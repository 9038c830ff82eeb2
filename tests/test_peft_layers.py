"""PEFT C3A configs that choose their modules by layer (``layers_to_transform``, ``layers_pattern``), by regex, by
exclusion (``exclude_modules``, ``modules_to_save``) and give them their own block sizes (``block_size_pattern``):
read as PEFT reads them, refused by module and field where the config and the kernels disagree, and written back so
PEFT adapts the same modules. Tiny random models, real PEFT, non-zero kernels."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from peft import C3AConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import bca_deploy as bd
from bca_deploy.cli import main
from bca_deploy.errors import AdapterFormatError
from conftest import model_output, tiny_bert, tiny_llama

Q0, V0 = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"
Q1, V1 = "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"


def _trained(model: nn.Module, config: C3AConfig, seed: int = 3) -> PeftModel:
    """``get_peft_model`` with every kernel drawn non-zero (PEFT scales ΔW by 1/in_features: make it visible)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0)
    return peft_model.eval()


def _peft_sizes(peft_model: PeftModel) -> dict[str, int]:
    """The modules PEFT adapted, with each one's block size."""
    modules = peft_model.base_model.model.named_modules()
    return {n: m.block_size["default"] for n, m in modules if hasattr(m, "c3a_kernel")}


def _our_sizes(model: nn.Module) -> dict[str, int]:
    return {n: layer.block_sizes["default"] for n, layer in bd.bca_layers(model)}


def _edited(directory, out, **fields):
    """A copy of the adapter ``directory`` at ``out`` with ``fields`` set in its adapter_config.json."""
    shutil.copytree(directory, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(fields)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _peft_output(factory, directory, ids):
    """PEFT's own output for the adapter ``directory`` on ``factory()``, or None when PEFT refuses to load it."""
    try:
        return model_output(PeftModel.from_pretrained(factory(), directory).eval(), ids)
    except (RuntimeError, ValueError, TypeError):  # size mismatch in load_state_dict; C3AConfig's checks; null sizes
        return None


@pytest.fixture(scope="module")
def bert_layer0(tmp_path_factory):
    """PEFT's adapter on layer 0's query (p=8) and value (p=4) of a tiny BERT: its directory and PEFT's output."""
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    peft_model = _trained(tiny_bert(), C3AConfig(block_size=8, target_modules=["query", "value"],
                                                 layers_to_transform=[0], layers_pattern="layer",
                                                 block_size_pattern={"value": 4}))
    assert _peft_sizes(peft_model) == {Q0: 8, V0: 4}
    directory = tmp_path_factory.mktemp("bert") / "peft"
    peft_model.save_pretrained(directory)
    return directory, ids, model_output(peft_model, ids)


# (fields set in the config, the module the error names, what it says of the field, what PEFT does with the file)
DISAGREEMENTS = {
    "block-size": ({"block_size": 16}, Q0, "gives it block size 16 (block_size)", "refuses"),
    "block-size-pattern": ({"block_size_pattern": {"value": 8}}, V0,
                           "gives it block size 8 (block_size_pattern['value'])", "refuses"),
    "block-size-absent": ({"block_size": None}, Q0, "PEFT's default 256", "refuses"),  # the key deleted below
    "block-size-null": ({"block_size": None}, "block_size", "block_size must be a positive integer, got null",
                        "refuses"),
    "layers-elsewhere": ({"layers_to_transform": [1]}, Q0, "it is in layer 0, not in layers_to_transform [1]",
                         "differs"),
    "layers-without-kernels": ({"layers_to_transform": [0, 1]}, V1, "has no kernel for it", "differs"),
    "layer-index-int": ({"layers_to_transform": 1}, V0, "it is in layer 0, not in layers_to_transform 1", "differs"),
    "layers-pattern-elsewhere": ({"layers_pattern": "encoder"}, Q0, "no layer index after layers_pattern ['encoder']",
                                 "refuses"),
    "target-narrower": ({"target_modules": ["query"]}, V0, "target_modules ['query'] names neither it", "differs"),
    "regex-target": ({"target_modules": r".*\.query", "layers_to_transform": None, "layers_pattern": None}, V0,
                     "target_modules '.*\\\\.query' does not match its whole path", "differs"),
    "regex-with-layers": ({"target_modules": r".*\.(query|value)"}, "layers_to_transform",
                          "PEFT's C3AConfig refuses layers_to_transform with a regex target", "refuses"),
    "saved-whole": ({"modules_to_save": ["attention"]}, V0, "inside modules_to_save entry 'attention'", "refuses"),
}


@pytest.mark.parametrize("case", sorted(DISAGREEMENTS))
def test_a_config_that_disagrees_with_its_kernels_is_refused_by_module_and_field(case, bert_layer0, tmp_path):
    """The file as PEFT wrote it loads onto exactly PEFT's modules, at PEFT's sizes, with PEFT's outputs. Edited so
    that its config and kernels disagree, PEFT refuses it or computes other numbers than the ones trained (it
    builds the modules from the config, then drops the kernels it has no module for and draws new ones where
    the file has none); bca-deploy used the kernels alone, silently. Now every reader refuses it, naming the
    module and the field, and the model is left as it was."""
    directory, ids, expected = bert_layer0
    ours = bd.load_adapter(tiny_bert(), directory)
    assert _our_sizes(ours) == {Q0: 8, V0: 4}
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=1e-5, atol=1e-5)

    fields, module, says, peft_does = DISAGREEMENTS[case]
    bad = _edited(directory, tmp_path / "bad", **fields)
    if case == "block-size-absent":
        config = json.loads((bad / "adapter_config.json").read_text())
        del config["block_size"]
        (bad / "adapter_config.json").write_text(json.dumps(config))
    peft_out = _peft_output(tiny_bert, bad, ids)
    if peft_does == "refuses":
        assert peft_out is None
    else:
        assert (peft_out - expected).abs().max() > 1e-3

    model = tiny_bert()
    before = model_output(model, ids)
    with pytest.raises(AdapterFormatError) as err:
        bd.load_adapter(model, bad)
    message = str(err.value)
    assert str(bad) in message and module in message and says in message, message
    assert not list(bd.bca_layers(model)) and torch.equal(model_output(model, ids), before)


@pytest.mark.parametrize("case", ["block-size", "layers-elsewhere", "saved-whole"])
def test_convert_and_merge_refuse_a_disagreeing_config_before_writing(case, bert_layer0, tmp_path):
    """Without a model (convert, merge into a checkpoint), the kernels the config cannot have produced are refused
    the same way, and nothing is written. PEFT itself refuses or computes other numbers (checked above)."""
    directory, ids, expected = bert_layer0
    fields, module, says, _ = DISAGREEMENTS[case]
    bad = _edited(directory, tmp_path / "bad", **fields)
    tiny_bert().save_pretrained(tmp_path / "base")
    runner = CliRunner()
    for args, out in ((["convert", "--adapter", str(bad), "--to", "bca", "--out", str(tmp_path / "bca")], "bca"),
                      (["convert", "--adapter", str(bad), "--to", "peft", "--out", str(tmp_path / "peft2")], "peft2"),
                      (["merge", "--model", str(tmp_path / "base"), "--adapter", str(bad), "--out",
                        str(tmp_path / "merged"), "--no-progress"], "merged")):
        result = runner.invoke(main, args)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert module in result.output and says in result.output, result.output
        assert not (tmp_path / out).exists()
    # the file as PEFT wrote it merges into PEFT's numbers
    result = runner.invoke(main, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(directory),
                                  "--out", str(tmp_path / "merged"), "--no-progress"])
    assert result.exit_code == 0, result.output
    from transformers import BertModel

    merged = BertModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(model_output(merged, ids), expected, rtol=1e-5, atol=1e-5)


def test_exclude_modules_is_read_as_peft_tuners_read_it(tmp_path, input_ids):
    """``exclude_modules`` (set on the config: peft 0.21's C3AConfig has no such field, so its file leaves it out):
    a file that says which modules were excluded loads onto exactly the modules PEFT trained. The same file without
    it (as peft 0.21 writes it) asks for a kernel it lacks: PEFT's own reload draws a random one there, and
    bca-deploy refuses it by name; a file excluding a module it has a kernel for is refused by name too."""
    config = C3AConfig(block_size=8, target_modules=["query", "value"])
    config.exclude_modules = [V0]
    peft_model = _trained(tiny_bert(), config)
    assert _peft_sizes(peft_model) == {Q0: 8, Q1: 8, V1: 8}
    expected = model_output(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path / "as-written")
    assert "exclude_modules" not in json.loads((tmp_path / "as-written" / "adapter_config.json").read_text())

    full = _edited(tmp_path / "as-written", tmp_path / "full", exclude_modules=[V0])
    ours = bd.load_adapter(tiny_bert(), full)
    assert _our_sizes(ours) == {Q0: 8, Q1: 8, V1: 8}
    torch.testing.assert_close(model_output(ours, input_ids), expected, rtol=1e-5, atol=1e-5)

    assert (_peft_output(tiny_bert, tmp_path / "as-written", input_ids) - expected).abs().max() > 1e-3
    with pytest.raises(AdapterFormatError, match=re.escape(f"module {V0}: the config adapts it (target_modules "
                                                           "['query', 'value']), but the file has no kernel for it")):
        bd.load_adapter(tiny_bert(), tmp_path / "as-written")

    wrong = _edited(tmp_path / "as-written", tmp_path / "wrong", exclude_modules=["value"])
    with pytest.raises(AdapterFormatError, match=re.escape(f"a kernel for module {V1}, which the config does not "
                                                           "adapt: exclude_modules entry 'value' excludes it")):
        bd.read_adapter(wrong)


def test_missing_kernels_are_found_across_a_base_model_prefix(tmp_path, input_ids):
    """An adapter trained on ``LlamaForCausalLM`` (paths ``model.layers...``) loaded into ``LlamaModel`` (paths
    ``layers...``): PEFT's layer rules are read on the file's paths, so the file as written loads with PEFT's
    numbers, and one whose layers_to_transform asks for a layer without kernels is refused naming both paths."""
    from transformers import LlamaModel

    peft_model = _trained(tiny_llama(), C3AConfig(block_size=8, target_modules=["q_proj", "down_proj"],
                                                  layers_to_transform=[1], layers_pattern="layers",
                                                  block_size_pattern={"down_proj": 16}))
    assert _peft_sizes(peft_model) == {"model.layers.1.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 16}
    expected = peft_model.base_model.model.model(input_ids=input_ids).last_hidden_state
    peft_model.save_pretrained(tmp_path / "peft")

    def bare() -> LlamaModel:
        return tiny_llama().model

    ours = bd.load_adapter(bare(), tmp_path / "peft")
    assert isinstance(ours, LlamaModel)
    assert _our_sizes(ours) == {"layers.1.self_attn.q_proj": 8, "layers.1.mlp.down_proj": 16}
    torch.testing.assert_close(model_output(ours, input_ids), expected, rtol=1e-5, atol=1e-5)

    bad = _edited(tmp_path / "peft", tmp_path / "bad", layers_to_transform=[0, 1])
    assert (_peft_output(tiny_llama, bad, input_ids) - model_output(peft_model, input_ids)).abs().max() > 1e-3
    with pytest.raises(AdapterFormatError) as err:
        bd.load_adapter(bare(), bad)
    message = str(err.value)
    for module in ("q_proj", "down_proj"):
        assert f"module model.layers.0.{'self_attn' if module == 'q_proj' else 'mlp'}.{module} " \
               f"(layers.0.{'self_attn' if module == 'q_proj' else 'mlp'}.{module} in this model): the config adapts " \
               f"it" in message, message
    assert "layers.1" not in message.replace("layers_to_transform [0, 1]", ""), message


def test_a_top_level_module_keeps_its_own_block_size_through_a_peft_round_trip(tmp_path, input_ids):
    """PEFT gives ``lm_head`` its own block size by the exact key ``"lm_head"`` (no ``.*\\.key$`` regex matches a
    path without a dot, so PEFT looks the path up). ``convert --to peft`` refused such an adapter ("PEFT's
    block_size_pattern cannot select it"). Now PEFT → bca-deploy → PEFT gives PEFT the same modules, the same
    sizes, bit-equal kernels and its outputs (``lm_head``, named exactly, is adapted whatever
    ``layers_to_transform`` says, as PEFT does)."""
    peft_model = _trained(tiny_llama(), C3AConfig(block_size=8, target_modules=["q_proj", "lm_head"],
                                                  layers_to_transform=[1], layers_pattern="layers",
                                                  block_size_pattern={"lm_head": 4}))
    sizes = _peft_sizes(peft_model)
    assert sizes == {"model.layers.1.self_attn.q_proj": 8, "lm_head": 4}
    expected = model_output(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = bd.load_adapter(tiny_llama(), tmp_path / "peft")
    assert _our_sizes(ours) == sizes
    torch.testing.assert_close(model_output(ours, input_ids), expected, rtol=1e-5, atol=1e-5)
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), "--to", "peft",
                                       "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output

    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "back").eval()
    assert _peft_sizes(again) == sizes
    torch.testing.assert_close(model_output(again, input_ids), expected, rtol=0, atol=0)
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    # every tensor comes back bit-equal: the kernels, and lm_head's base weight (PEFT's save_embedding_layers)
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.cls_out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_out(torch.relu(self.proj(x)))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(16, 4)


class _Net(nn.Module):
    """``blocks.0.cls_out`` (adapted) beside ``cls.out`` (saved whole): PEFT reads each modules_to_save entry as a
    regex, so ``cls.out`` also matches the path part ``cls_out``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([_Block()])
        self.cls = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.cls.out(x)


def test_an_adapter_peft_would_load_onto_fewer_modules_is_not_written(tmp_path):
    """PEFT never adapts a module a ``modules_to_save`` entry matches as a regex (``cls.out`` matches
    ``blocks.0.cls_out``): the PEFT copy of this adapter loaded with ``blocks.0.cls_out`` unadapted, its numbers
    off ours. It is refused before anything is written, naming the module and the entry."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    config = C3AConfig(block_size=8, target_modules=["blocks.0.proj", "blocks.0.cls_out"], modules_to_save=["cls.out"])
    assert _peft_sizes(_trained(_Net(), config)) == {"blocks.0.proj": 8}  # PEFT's own reading of such a config

    ours = bd.inject(_Net(), ["blocks.0.proj", "blocks.0.cls_out"], block_size=8, init="normal", init_std=0.5, seed=0,
                     modules_to_save=["cls.out"])
    assert _our_sizes(ours) == {"blocks.0.proj": 8, "blocks.0.cls_out": 8}
    assert (ours(x) - _Net()(x)).abs().max() > 1e-3
    with pytest.raises(AdapterFormatError, match=re.escape(
            "a kernel for module blocks.0.cls_out, which the config does not adapt: it is inside modules_to_save "
            "entry 'cls.out'")):
        bd.save_adapter(ours, tmp_path / "for-peft", format="peft")
    assert not (tmp_path / "for-peft").exists()
    bd.save_adapter(ours, tmp_path / "bca")  # its own format holds it
    torch.testing.assert_close(bd.load_adapter(_Net(), tmp_path / "bca")(x), ours(x), rtol=0, atol=0)


def test_inspect_says_how_peft_narrowed_the_targets(bert_layer0):
    """``targets:`` shows PEFT's ``target_modules`` as saved; with ``layers_to_transform`` the kernels adapt fewer
    modules than those names select, and the line says by which fields (the module table lists the kernels' own)."""
    from click.testing import CliRunner

    from bca_deploy.cli import main

    directory, _, _ = bert_layer0
    result = CliRunner().invoke(main, ["inspect", str(directory)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("targets:"))
    assert line.endswith("(layers_to_transform [0], layers_pattern 'layer')"), line
    assert "modules:      2 " in result.output


@pytest.mark.parametrize("target", ["(.*)*y", "(a|a)+", r"(\w+\.)*query"])
def test_a_regex_that_backtracks_without_bound_is_not_matched(bert_layer0, tmp_path, target):
    """A file's target_modules regex is matched against every kernel's path; Python's re backtracks, so "(.*)*y" on
    a 36-character module path would run for ages (a store entry hanging a server's loader). Such a pattern is not
    cross-checked: the kernels say what is adapted, as for any adapter, with PEFT's numbers for them."""
    import subprocess
    import sys

    directory, ids, expected = bert_layer0
    edited = tmp_path / "edited"
    shutil.copytree(directory, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config.update(target_modules=target, layers_to_transform=None, layers_pattern=None)
    (edited / "adapter_config.json").write_text(json.dumps(config))
    code = f"import bca_deploy as bd; c, _ = bd.read_adapter({str(edited)!r}); print(sorted(c.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(sorted([Q0, V0]))
    ours = bd.load_adapter(tiny_bert(), edited)
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=1e-5, atol=1e-5)


def test_a_module_adapted_without_a_kernel_is_refused_by_merge_and_by_convert_given_the_model(bert_layer0, tmp_path):
    """The config adapts layer 1 too, the file has kernels for layer 0 only: PEFT draws random kernels for layer 1
    (its numbers differ, checked above). Loading and export refused it; merge (which has the checkpoint's layers)
    wrote a checkpoint with layer 1 unadapted, and convert (no model) a bca adapter every later stage accepted
    (helper-73). Now merge refuses it, and so does convert given the base (--model, or the adapter's recorded
    base_model_name_or_path when that is a local directory); without one, convert says it could not check."""
    directory, ids, expected = bert_layer0
    fields, module, says, _ = DISAGREEMENTS["layers-without-kernels"]
    bad = _edited(directory, tmp_path / "bad", **fields)
    tiny_bert().save_pretrained(tmp_path / "base")
    runner = CliRunner()
    refused = [(["merge", "--model", str(tmp_path / "base"), "--adapter", str(bad), "--out", str(tmp_path / "merged"),
                 "--no-progress"], "merged"),
               (["convert", "--adapter", str(bad), "--to", "bca", "--out", str(tmp_path / "bca"), "--model",
                 str(tmp_path / "base")], "bca")]
    recorded = _edited(directory, tmp_path / "recorded", base_model_name_or_path=str(tmp_path / "base"), **fields)
    refused.append((["convert", "--adapter", str(recorded), "--to", "peft", "--out", str(tmp_path / "peft")], "peft"))
    for args, out in refused:
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
        assert module in result.output and says in result.output, result.output
        assert not (tmp_path / out).exists()
    unchecked = runner.invoke(main, ["convert", "--adapter", str(bad), "--to", "bca", "--out", str(tmp_path / "u")])
    assert unchecked.exit_code == 0 and "not checked against a base model (pass --model)" in unchecked.output
    # another model is no base to check against: refused when given, not claimed as checked when recorded (helper-76)
    tiny_llama().save_pretrained(tmp_path / "llama")
    other = runner.invoke(main, ["convert", "--adapter", str(bad), "--to", "bca", "--out", str(tmp_path / "o"),
                                 "--model", str(tmp_path / "llama")])
    assert other.exit_code == 2 and "(LlamaForCausalLM) lacks module(s) the adapter adapts" in other.output, \
        other.output
    assert not (tmp_path / "o").exists()
    elsewhere = _edited(directory, tmp_path / "elsewhere", base_model_name_or_path=str(tmp_path / "llama"), **fields)
    recorded_other = runner.invoke(main, ["convert", "--adapter", str(elsewhere), "--to", "bca", "--out",
                                          str(tmp_path / "r")])
    assert recorded_other.exit_code == 0 and "not checked against a base model" in recorded_other.output
    assert "checked against the layers" not in recorded_other.output
    # the file as PEFT wrote it converts, checked against the base, to PEFT's numbers
    good = runner.invoke(main, ["convert", "--adapter", str(directory), "--to", "bca", "--out", str(tmp_path / "ok"),
                                "--model", str(tmp_path / "base")])
    assert good.exit_code == 0 and f"checked against the layers of {tmp_path / 'base'}" in good.output, good.output
    torch.testing.assert_close(model_output(bd.load_adapter(tiny_bert(), tmp_path / "ok"), ids), expected,
                               rtol=1e-5, atol=1e-5)
