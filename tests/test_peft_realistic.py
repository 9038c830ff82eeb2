"""PEFT C3A adapters made the way users make them (``get_peft_model`` on a transformers model, ``save_pretrained``),
read by every bca-deploy entry point: ``load_adapter``, ``inspect``, ``convert`` both ways, ``merge``. Each must give
PEFT's own numbers (``PeftModel.from_pretrained``); where bca-deploy refuses a file, PEFT refuses it too or would
compute other numbers, and the message says so. Tiny random models built from configs, kernels drawn non-zero."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import C3AConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import bca_deploy as bd
from bca_deploy.cli import main
from bca_deploy.errors import AdapterFormatError

IDS = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(1))
_SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


def _bert():
    return transformers.BertConfig(hidden_size=32, vocab_size=100, num_labels=3, **_SMALL)


def _roberta():
    return transformers.RobertaConfig(hidden_size=32, vocab_size=100, num_labels=3, pad_token_id=1,
                                      **{**_SMALL, "max_position_embeddings": 70})


def _distilbert():
    return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100,
                                         max_position_embeddings=64, num_labels=3)


def _llama(tied: bool = False):
    return transformers.LlamaConfig(hidden_size=32, vocab_size=96, num_key_value_heads=1, tie_word_embeddings=tied,
                                    **_SMALL)


def _qwen2():
    return transformers.Qwen2Config(hidden_size=32, vocab_size=96, num_key_value_heads=1, tie_word_embeddings=True,
                                    **_SMALL)


# name: (model class, its config, C3AConfig fields, adapter name, the modules PEFT adapts with their block sizes)
REALISTIC = {
    # SEQ_CLS adds modules_to_save ["classifier", "score"]; "all-linear" is saved expanded, the classifier left out
    "bert-seq-cls-all-linear": ("BertForSequenceClassification", _bert,
                                dict(task_type="SEQ_CLS", block_size=8, target_modules="all-linear"), "default", 13),
    # "dense" also names RoBERTa's classifier.dense, which PEFT saves whole (inside modules_to_save "classifier")
    "roberta-seq-cls-dense": ("RobertaForSequenceClassification", _roberta,
                              dict(task_type="SEQ_CLS", block_size=8, target_modules=["query", "value", "dense"]),
                              "default", 10),
    "distilbert-seq-cls": ("DistilBertForSequenceClassification", _distilbert,
                           dict(task_type="SEQ_CLS", block_size=8, target_modules=["q_lin", "v_lin"]), "default", 4),
    # layers_to_transform without layers_pattern; block_size_pattern by exact path and by suffix; a named adapter
    # (save_pretrained writes it in a folder of its name)
    "bert-layers-exact-sizes": ("BertModel", _bert,
                                dict(block_size=8, target_modules=["query", "value", "key"], layers_to_transform=[1],
                                     init_weights="gaussian",
                                     block_size_pattern={"encoder.layer.1.attention.self.query": 4, "value": 16}),
                                "mine", 3),
    # an untied lm_head (saved with its base layer) at its own block size; layers by Llama's pattern
    "llama-causal-lm-head": ("LlamaForCausalLM", _llama,
                             dict(task_type="CAUSAL_LM", block_size=8,
                                  target_modules=["q_proj", "down_proj", "lm_head"], layers_to_transform=[0],
                                  layers_pattern="layers", block_size_pattern={"lm_head": 16}),
                             "default", 3),
    # tied embeddings: "all-linear" leaves the output layer out
    "qwen2-tied-all-linear": ("Qwen2ForCausalLM", _qwen2,
                              dict(task_type="CAUSAL_LM", block_size=8, target_modules="all-linear",
                                   init_weights=False),
                              "default", 14),
}


def _build(arch: str, config) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, arch)(config()).eval()


def _peft_sizes(model: torch.nn.Module) -> dict[str, int]:
    return {n.removeprefix("base_model.model."): m.block_size["default"] if "default" in m.block_size
            else next(iter(m.block_size.values())) for n, m in model.named_modules() if hasattr(m, "c3a_kernel")}


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """Each case trained by PEFT and saved: ``{case: (base dir, adapter dir, PEFT's sizes, PEFT's output)}``."""
    made = {}
    for case, (arch, config, fields, name, count) in REALISTIC.items():
        root = tmp_path_factory.mktemp(case)
        _build(arch, config).save_pretrained(root / "base")
        torch.manual_seed(3)
        peft_model = get_peft_model(getattr(transformers, arch).from_pretrained(root / "base"), C3AConfig(**fields),
                                    adapter_name=name)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "c3a_kernel" in param_name:
                    param.normal_(0.0, 2.0)
        peft_model.eval().save_pretrained(root / "peft")
        directory = root / "peft" if name == "default" else root / "peft" / name
        # PEFT's own reload is the reference
        reloaded = PeftModel.from_pretrained(getattr(transformers, arch).from_pretrained(root / "base"), directory)
        sizes = _peft_sizes(reloaded)
        assert len(sizes) == count, sizes
        expected = _out(reloaded.eval())
        torch.testing.assert_close(expected, _out(peft_model), rtol=0, atol=0)
        made[case] = (root / "base", directory, sizes, expected)
    return made


@pytest.mark.parametrize("case", sorted(REALISTIC))
def test_peft_adapters_as_users_save_them_give_pefts_numbers_everywhere(case, realistic, tmp_path):
    arch = REALISTIC[case][0]
    base, directory, sizes, expected = realistic[case]
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert saved["target_modules"] != "all-linear"  # get_peft_model expands it before saving

    def fresh() -> torch.nn.Module:
        return getattr(transformers, arch).from_pretrained(base).eval()

    ours = bd.load_adapter(fresh(), directory)
    assert {n: layer.block_sizes["default"] for n, layer in bd.bca_layers(ours)} == sizes
    torch.testing.assert_close(_out(ours), expected, rtol=1e-5, atol=1e-5)

    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(directory)])
    assert result.exit_code == 0, result.output
    if saved.get("task_type") == "SEQ_CLS":  # PEFT records no labels: inspect reads them off the saved label layer
        labels = transformers.AutoConfig.from_pretrained(base).num_labels
        assert f"with {labels} labels (from its saved label layer; names not recorded" in result.output, result.output
    for args in (["convert", "--adapter", str(directory), "--to", "bca", "--out", str(tmp_path / "bca")],
                 ["convert", "--adapter", str(tmp_path / "bca"), "--to", "peft", "--out", str(tmp_path / "back")],
                 ["merge", "--model", str(base), "--adapter", str(directory), "--out", str(tmp_path / "merged"),
                  "--no-progress", "--no-fsync"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    torch.testing.assert_close(_out(bd.load_adapter(fresh(), tmp_path / "bca")), expected, rtol=1e-5, atol=1e-5)
    again = PeftModel.from_pretrained(fresh(), tmp_path / "back").eval()
    assert _peft_sizes(again) == sizes
    torch.testing.assert_close(_out(again), expected, rtol=1e-5, atol=1e-5)
    merged = getattr(transformers, arch).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_out(merged), expected, rtol=1e-5, atol=1e-5)


def test_a_seq_cls_adapter_saves_roberta_classifier_dense_whole_and_adapts_the_encoders_dense(realistic):
    """``target_modules`` "dense" with task SEQ_CLS: PEFT saves ``classifier`` (and so ``classifier.dense``) whole
    and adapts only the encoder's dense layers; bca-deploy reads the file the same way."""
    _, directory, sizes, _ = realistic["roberta-seq-cls-dense"]
    assert not any(name.startswith("classifier") for name in sizes)
    config, state = bd.read_adapter(directory)
    assert sorted(config.modules) == sorted(sizes)
    assert config.modules_to_save == ["classifier"]
    assert {k for k in state if k.startswith("classifier.")} == {
        "classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"}


def _gpt2_dir(tmp_path):
    """GPT-2 (attention and MLP layers are transformers' Conv1D) saved, and a C3A file naming its ``c_attn``."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                                         n_positions=64)).save_pretrained(tmp_path / "gpt2")
    directory = tmp_path / "c_attn"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "C3A", "task_type": "CAUSAL_LM", "block_size": 8, "target_modules": ["c_attn"], "bias": "none"}))
    save_file({f"base_model.model.transformer.h.{i}.attn.c_attn.c3a_kernel": torch.randn(12, 4, 8) for i in range(2)},
              directory / "adapter_model.safetensors", metadata={"format": "pt"})
    return directory


def test_a_c3a_kernel_for_a_conv1d_layer_is_refused_as_peft_refuses_it(tmp_path):
    """PEFT's C3A adapts torch.nn.Linear only: ``get_peft_model`` and ``PeftModel.from_pretrained`` raise TypeError
    on GPT-2's Conv1D ``c_attn``. A C3A file naming such a layer was loaded by ``load_adapter`` as a Conv1D adapter
    (a ΔW PEFT never computes, in a layout no PEFT file defines); now it is refused naming the layer, here and
    across GPT-2's ``transformer.`` prefix, as merge refuses it."""
    directory = _gpt2_dir(tmp_path)
    gpt2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        get_peft_model(gpt2, C3AConfig(block_size=8, target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), directory)

    for model_class, named in ((transformers.GPT2LMHeadModel, ""),
                               (transformers.GPT2Model, " (h.0.attn.c_attn in this model)")):
        model = model_class.from_pretrained(tmp_path / "gpt2").eval()
        before = _out(model)
        with pytest.raises(AdapterFormatError) as err:
            bd.load_adapter(model, directory)
        message = str(err.value)
        assert f"module transformer.h.0.attn.c_attn{named}: a transformers Conv1D layer in this" in message, message
        assert "PEFT's C3A adapts torch.nn.Linear only" in message, message
        assert not list(bd.bca_layers(model)) and torch.equal(_out(model), before)
    result = CliRunner().invoke(main, ["merge", "--model", str(tmp_path / "gpt2"), "--adapter", str(directory),
                                       "--out", str(tmp_path / "merged"), "--no-progress"])
    assert result.exit_code != 0 and "is a Conv1D" in result.output, result.output


def test_a_missing_kernel_peft_would_initialise_to_zero_is_no_refusal(tmp_path):
    """``init_weights`` true: PEFT gives a module its config adapts and its file has no kernel for a zero kernel (a
    no-op), so PEFT's numbers are those of the kernels in the file. bca-deploy refused such a file ("PEFT would
    give it a zero kernel"); now it loads it with PEFT's numbers. With another init_weights PEFT draws a random
    kernel there, and the file is still refused by name."""
    torch.manual_seed(0)
    transformers.BertModel(_bert()).save_pretrained(tmp_path / "base")

    def bert() -> torch.nn.Module:
        return transformers.BertModel.from_pretrained(tmp_path / "base").eval()

    peft_model = get_peft_model(bert(), C3AConfig(block_size=8, target_modules=["query", "value"], init_weights=True,
                                                  layers_to_transform=[0]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0)
    expected = _out(peft_model.eval())
    peft_model.save_pretrained(tmp_path / "peft")
    # the file's config widened to both layers: PEFT reloads it with zero kernels in layer 1, the same numbers
    wide = tmp_path / "wide"
    shutil.copytree(tmp_path / "peft", wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [0, 1]}))
    reloaded = PeftModel.from_pretrained(bert(), wide).eval()
    assert len(_peft_sizes(reloaded)) == 4
    torch.testing.assert_close(_out(reloaded), expected, rtol=1e-6, atol=1e-6)

    ours = bd.load_adapter(bert(), wide)
    assert sorted(n for n, _ in bd.bca_layers(ours)) == ["encoder.layer.0.attention.self.query",
                                                         "encoder.layer.0.attention.self.value"]
    torch.testing.assert_close(_out(ours), expected, rtol=1e-5, atol=1e-5)

    random_init = tmp_path / "random"
    shutil.copytree(wide, random_init)
    (random_init / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [0, 1],
                                                                 "init_weights": "xavier_uniform"}))
    assert (_out(PeftModel.from_pretrained(bert(), random_init).eval()) - expected).abs().max() > 1e-4
    with pytest.raises(AdapterFormatError, match="module encoder.layer.1.attention.self.query: the config adapts it"):
        bd.load_adapter(bert(), random_init)
    assert sorted(load_file(wide / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
