"""PEFT C3A adapters made as users make them (``get_peft_model`` on a tiny transformers model, kernels and saved
modules drawn non-zero, ``save_pretrained``), taken through every bca-deploy path a user runs: ``load_adapter``,
``bca-deploy merge``, ``bca-deploy export`` (unmerged, ``--merge``, ``--bank``) run under onnxruntime, and a bank
graph serving the adapter registered live. Each must give PEFT's own numbers (its active forward, or
``merge_and_unload`` where PEFT's forward is known wrong). The cases are those a sweep over architectures and
``C3AConfig`` options found broken at some point, plus a few that pass as a baseline (the sweep: helper-54's
report). Tiny random models from configs; nothing is downloaded."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import C3AConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "exporters"))
from exporters_helpers import graph_feeds  # noqa: E402

import bca_deploy as bd  # noqa: E402
from bca_deploy.cli import main
from bca_deploy.models import load_model

IDS = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(1))
_SMALL = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
#: fp32: the paths differ from PEFT by float summation order only (~1e-7 of the largest output here)
RTOL = 1e-5


def _bert(**kw):
    return transformers.BertConfig(hidden_size=32, vocab_size=100, **{**_SMALL, **kw})


def _distilbert(**kw):
    return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100,
                                         max_position_embeddings=64, **kw)


def _llama(**kw):
    return transformers.LlamaConfig(hidden_size=32, vocab_size=96, num_key_value_heads=1, **{**_SMALL, **kw})


def _phi3(**kw):
    return transformers.Phi3Config(hidden_size=32, vocab_size=96, num_key_value_heads=2, pad_token_id=0,
                                   **{**_SMALL, **kw})


def _neox(**kw):
    return transformers.GPTNeoXConfig(hidden_size=32, vocab_size=96, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, **kw)


# name: (model class, config, C3AConfig fields, save_pretrained kwargs, paths to run)
CASES = {
    # PEFT wraps every module whose path *ends with* a modules_to_save entry, without a dot before it: SEQ_CLS's
    # "classifier" also wraps DistilBERT's pre_classifier, which the file then holds as a saved module
    "distilbert-pre-classifier-layers-pattern": (
        "DistilBertForSequenceClassification", lambda: _distilbert(num_labels=2),
        dict(task_type="SEQ_CLS", block_size=8, target_modules=["q_lin", "lin2"], layers_to_transform=[0],
             layers_pattern="layer"), {}, ("load", "merge", "export", "bank")),
    # save_embedding_layers: PEFT saves both embeddings (base weights) beside the kernels
    "llama-save-embedding-layers": (
        "LlamaForCausalLM", _llama, dict(task_type="CAUSAL_LM", block_size=8, target_modules=["q_proj"]),
        dict(save_embedding_layers=True), ("load", "merge", "export")),
    # a block size equal to the hidden size; Phi-3's fused qkv_proj / gate_up_proj; lm_head adapted (PEFT saves
    # its base weight too)
    "phi3-fused-lm-head-block-eq-hidden": (
        "Phi3ForCausalLM", _phi3, dict(task_type="CAUSAL_LM", block_size=32,
                                       target_modules=["qkv_proj", "gate_up_proj", "down_proj", "lm_head"]),
        {}, ("load", "merge", "export", "bank")),
    # GPT-NeoX (Pythia) stores its output layer as embed_out, which transformers 5.x renames to lm_head as it loads
    # (its conversion mapping): merge and training on 5.x refused every such checkpoint as "saved tied" (helper-81)
    "gpt-neox-embed-out": (
        "GPTNeoXForCausalLM", _neox, dict(task_type="CAUSAL_LM", block_size=8, target_modules=["query_key_value"]),
        {}, ("load", "merge")),
    # baselines: a regex target with a classifier head saved whole; per-module sizes and a named adapter
    "bert-seq-cls-regex": (
        "BertForSequenceClassification", lambda: _bert(num_labels=3),
        dict(task_type="SEQ_CLS", block_size=4,
             target_modules=r".*encoder\.layer\.\d+\.(attention\.self\.(query|key)|output\.dense)"),
        {}, ("load", "merge", "export", "bank")),
    "llama-named-layers-block-pattern": (
        "LlamaForCausalLM", _llama,
        dict(task_type="CAUSAL_LM", block_size=8, target_modules=["q_proj", "v_proj", "down_proj"],
             layers_to_transform=[1], layers_pattern="layers", block_size_pattern={"down_proj": 16},
             init_weights="kaiming_uniform"),
        {}, ("load", "merge", "export", "bank")),
}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _feeds(session, slot: int | None = None) -> dict[str, np.ndarray]:
    return graph_feeds(session, IDS.numpy(), slot)


def _run_onnx(directory, slot: int | None = None) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = session.run(None, _feeds(session, slot))
    return out[names.index("logits" if "logits" in names else "last_hidden_state")]


def _close(got, expected: torch.Tensor, what: str) -> None:
    got = torch.as_tensor(np.asarray(got, dtype=np.float32))
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    err = float((got - expected).abs().max() / expected.abs().max())
    assert err < RTOL, f"{what}: max relative error {err:.3g} against PEFT"


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def _draw(peft_model) -> None:
    """Kernels and saved modules drawn non-zero: ΔW entries ~0.02, as large as the base weights (PEFT divides by
    d_in)."""
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "c3a_kernel" in param_name:
                param.normal_(0.0, 0.02 * param.shape[1] * param.shape[2])
            elif param.requires_grad:
                param.normal_(0.0, 0.5)


def _peft_adapter(tmp_path, arch: str, config, fields: dict, save: dict, name: str = "default"):
    """``(base dir, adapter dir, PEFT's model)``: the base saved, PEFT's model with non-zero kernels and saved
    modules, saved as PEFT saves it."""
    cls = getattr(transformers, arch)
    torch.manual_seed(0)
    cls(config()).save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    peft_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), C3AConfig(**copy.deepcopy(fields)),
                                adapter_name=name)
    _draw(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "peft", **save)
    return tmp_path / "base", tmp_path / "peft" / ("" if name == "default" else name), peft_model


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_adapter_gives_pefts_numbers_on_every_path(case, tmp_path):
    arch, config, fields, save, paths = CASES[case]
    base, adapter, peft_model = _peft_adapter(tmp_path, arch, config, fields, save)
    expected = _logits(peft_model)
    cls = getattr(transformers, arch)
    if "load" in paths:
        _close(_logits(bd.load_adapter(cls.from_pretrained(base).eval(), adapter)), expected, "load_adapter")
    if "merge" in paths:
        _cli("merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"),
             "--no-progress", "--no-fsync")
        _close(_logits(cls.from_pretrained(tmp_path / "merged").eval()), expected, "bca-deploy merge")
    if "export" in paths:
        for label, extra in (("onnx-unmerged", ()), ("onnx-merged", ("--merge",))):
            _cli("export", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / label),
                 "--cases", "1x5", *extra)
            _close(_run_onnx(tmp_path / label), expected, f"export ({label})")
    if "bank" in paths:
        from bca_deploy.serving.session import MultiAdapterSession

        _cli("export", "--model", str(base), "--adapter", str(adapter), "--bank", "--out", str(tmp_path / "bank"),
             "--cases", "1x5")
        _close(_run_onnx(tmp_path / "bank", slot=1), expected, "export --bank, slot 1")
        session = MultiAdapterSession(tmp_path / "bank")
        session.register("live", adapter)  # what POST /v1/adapters does
        feeds = _feeds(_ort_session(tmp_path / "bank"))  # the graph's inputs but adapter_ids and the banks
        out = session.run(feeds, ["live", None])
        got = out["logits" if "logits" in out else "last_hidden_state"]
        _close(got[:1], expected[:1], "bank, the adapter registered live")
        _close(got[1:], _logits(cls.from_pretrained(base).eval())[1:], "bank, a base-model row beside it")


def _ort_session(directory):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def test_two_peft_adapters_sum_as_pefts_merge_sums_them(tmp_path):
    """Two named adapters of one PeftModel (each saved in a folder of its name), at different block sizes on a shared
    layer: ``merge`` with both and an unmerged export of both give ``merge_and_unload`` of both. PEFT 0.21.2's own
    forward with both active is not the reference: ``C3ALinear.forward`` feeds each adapter the previous adapter's
    output (``x = BlockCircularConvolution.apply(x, kernel) / x.size(-1)`` rebinds ``x``), which differs from the
    sum its merge computes (here by ~1e-2 of the logits)."""
    base, first, peft_model = _peft_adapter(
        tmp_path, "LlamaForCausalLM", _llama,
        dict(task_type="CAUSAL_LM", block_size=8, target_modules=["q_proj", "v_proj"]), {}, name="alpha")
    peft_model.add_adapter("beta", C3AConfig(task_type="CAUSAL_LM", block_size=16,
                                             target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "c3a_kernel.beta" in param_name:
                param.normal_(0.0, 0.02 * param.shape[1] * param.shape[2])
    peft_model.save_pretrained(tmp_path / "peft", selected_adapters=["alpha", "beta"])
    second = tmp_path / "peft" / "beta"
    expected = _logits(copy.deepcopy(peft_model).merge_and_unload(adapter_names=["alpha", "beta"]).eval())
    peft_model.base_model.set_adapter(["alpha", "beta"])
    assert float((_logits(peft_model) - expected).abs().max() / expected.abs().max()) > 1e-4  # PEFT's chained forward

    _cli("merge", "--model", str(base), "--adapter", str(first), "--adapter", str(second),
         "--out", str(tmp_path / "merged"), "--no-progress", "--no-fsync")
    _close(_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()), expected, "merge")
    model = bd.load_adapter(transformers.LlamaForCausalLM.from_pretrained(base).eval(), first, adapter_name="a")
    model = bd.load_adapter(model, second, adapter_name="b")
    bd.set_adapter(model, ["a", "b"])
    _close(_logits(model), expected, "load_adapter, both active")
    _cli("export", "--model", str(base), "--adapter", str(first), "--adapter", str(second),
         "--out", str(tmp_path / "onnx"), "--cases", "1x5")
    _close(_run_onnx(tmp_path / "onnx"), expected, "export of both (unmerged)")


def test_a_peft_adapter_with_trained_biases_of_its_layers_gives_pefts_numbers(tmp_path):
    """``bias="c3a_only"`` (PEFT trains the adapted layers' biases and saves them as ``<module>.base_layer.bias``):
    base weights, written into the base model as PEFT does, on every path. It was refused ("bca-deploy adapters
    train no biases"). A bank, whose rows share one base model, refuses biases other than its own, naming them."""
    base, adapter, peft_model = _peft_adapter(tmp_path, "BertForSequenceClassification", lambda: _bert(num_labels=2),
                                              dict(task_type="SEQ_CLS", block_size=8, target_modules=["query", "value"],
                                                   bias="c3a_only"), {})
    expected = _logits(peft_model)
    cls = transformers.BertForSequenceClassification
    _close(_logits(bd.load_adapter(cls.from_pretrained(base).eval(), adapter)), expected, "load_adapter")
    _cli("merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--no-progress")
    _close(_logits(cls.from_pretrained(tmp_path / "merged").eval()), expected, "bca-deploy merge")
    for name, extra in (("unmerged", []), ("fused", ["--merge"])):
        _cli("export", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / name), "--cases", "1x5",
             *extra)
        _close(_run_onnx(tmp_path / name), expected, f"export {extra}")
    result = CliRunner().invoke(main, ["export", "--model", str(base), "--adapter", str(adapter), "--bank",
                                       "--out", str(tmp_path / "bank")])
    assert result.exit_code == 2 and "query.base_layer.bias" in result.output, result.output
    assert not (tmp_path / "bank").exists()


def test_a_peft_adapter_training_every_bias_is_refused_naming_bias_and_nothing_is_written(tmp_path):
    # bias="all": PEFT also trains and saves every other bias of the model (LayerNorms, unadapted layers), not loaded
    base, adapter, _ = _peft_adapter(tmp_path, "BertForSequenceClassification", lambda: _bert(num_labels=2),
                                     dict(task_type="SEQ_CLS", block_size=8, target_modules=["query"], bias="all"), {})
    for args in (["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                  "--no-progress"],
                 ["export", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "bias='all' is not supported" in result.output and "bias='c3a_only'" in result.output, result.output
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_peft_classifier_trained_from_a_bare_encoder_exports_with_its_own_label_count(tmp_path):
    """The usual PEFT recipe: ``AutoModelForSequenceClassification.from_pretrained(bare_encoder, num_labels=3)``,
    ``get_peft_model``, ``save_pretrained``. The bare encoder's config.json says 2 labels (transformers' default)
    and holds no classifier. ``export --bank`` took the adapter's 3-row head; ``export`` (merged or not) refused
    ``classifier.weight`` (3, 32) against (2, 32), and ``merge`` refused the classifier the checkpoint lacks. Now
    every stage reads the head from the saved label layer (models.saved_label_head): 3 labels, ``LABEL_<i>``."""
    torch.manual_seed(0)
    transformers.BertModel(_bert()).save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3),
        C3AConfig(task_type="SEQ_CLS", block_size=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.5)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model)
    _cli("export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"), "--bank",
         "--out", str(tmp_path / "bank"), "--cases", "1x5")
    _close(_run_onnx(tmp_path / "bank", slot=1)[..., :3], expected, "export --bank")
    _cli("export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"), "--merge",
         "--out", str(tmp_path / "merged"), "--cases", "1x5")
    _close(_run_onnx(tmp_path / "merged"), expected, "export --merge")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["num_labels"] == 3
    _cli("export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"),
         "--out", str(tmp_path / "unmerged"), "--cases", "1x5")
    _close(_run_onnx(tmp_path / "unmerged"), expected, "export")
    _cli("merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"), "--out",
         str(tmp_path / "checkpoint"), "--no-progress")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "checkpoint").eval()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert merged.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    _close(_logits(merged), expected, "merge")


def test_a_peft_token_classification_adapter_merges_and_its_export_says_why_not(tmp_path):
    """TOKEN_CLS: ``bca-deploy merge`` gives PEFT's numbers (the checkpoint keeps its token-classification head);
    ``export`` is refused naming the PEFT task_type (it asked to "pass a task", as if one would do)."""
    base, adapter, peft_model = _peft_adapter(tmp_path, "BertForTokenClassification", lambda: _bert(num_labels=4),
                                              dict(task_type="TOKEN_CLS", block_size=8, target_modules=["query"]), {})
    _cli("merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--no-progress")
    merged = transformers.BertForTokenClassification.from_pretrained(tmp_path / "merged").eval()
    _close(_logits(merged), _logits(peft_model), "merge")
    result = CliRunner().invoke(main, ["export", "--model", str(base), "--adapter", str(adapter),
                                       "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 2, result.output
    assert "PEFT task_type 'TOKEN_CLS', which bca-deploy does not export or serve" in result.output, result.output
    assert "`bca-deploy merge` writes the adapted model" in result.output
    assert not (tmp_path / "onnx").exists()


def test_a_peft_classifier_from_a_pretraining_checkpoint_converts_checked_on_the_classifier(tmp_path):
    """PEFT's SEQ_CLS recipe on a checkpoint that also holds pre-training heads (BERT's ``cls.predictions``,
    RoBERTa's ``lm_head``) with ``target_modules`` naming ``dense``: ``convert --to bca`` checked the config's rules
    against the checkpoint's own architecture (``BertForPreTraining``), whose ``cls.predictions.transform.dense``
    the classifier PEFT trained has not, and refused the adapter as missing that kernel (helper-81). It is now
    checked against the model its task loads, and the converted adapter gives PEFT's numbers."""
    torch.manual_seed(0)
    transformers.BertForPreTraining(_bert()).save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2),
        C3AConfig(task_type="SEQ_CLS", block_size=8, target_modules=["query", "value", "dense"]))
    _draw(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), "--to", "bca",
                                       "--out", str(tmp_path / "bca"), "--model", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    assert "checked against the layers of" in result.output
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).eval()
    _close(_logits(bd.load_adapter(model, tmp_path / "bca")), _logits(peft_model), "convert --to bca, loaded")


def test_a_peft_modernbert_classifier_saving_its_head_whole_gives_pefts_numbers(tmp_path):
    """ModernBERT's classifier is ``head`` (dense, activation, LayerNorm) then ``classifier``; PEFT users save both
    (``modules_to_save=["classifier", "head"]``). The saved label layer was looked for with the bank's rule (Linear
    layers only), so the LayerNorm hid it: the adapter was taken for a head-less one: merge refused it and load_model
    built 2 labels instead of 3 (helper-81). The label layer is now the last Linear saved, whatever else is."""
    config = transformers.ModernBertConfig(hidden_size=32, vocab_size=100, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2, sep_token_id=2, cls_token_id=1,
                                           reference_compile=False)
    torch.manual_seed(0)
    transformers.ModernBertModel(config).save_pretrained(tmp_path / "base")
    cls = transformers.ModernBertForSequenceClassification
    peft_model = get_peft_model(cls.from_pretrained(tmp_path / "base", num_labels=3),
                                C3AConfig(task_type="SEQ_CLS", block_size=8, target_modules=["Wqkv"],
                                          modules_to_save=["classifier", "head"]))
    _draw(peft_model)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model)
    assert expected.shape[-1] == 3
    _close(_logits(load_model(tmp_path / "base", [tmp_path / "peft"])), expected, "load_model")
    _cli("merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"),
         "--out", str(tmp_path / "merged"), "--no-progress", "--no-fsync")
    _close(_logits(cls.from_pretrained(tmp_path / "merged").eval()), expected, "bca-deploy merge")
