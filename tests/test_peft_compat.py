"""PEFT C3A interop both ways, against real PEFT, on tiny random Llama and BERT with non-zero kernels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import C3AConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import bca_deploy as bd
from bca_deploy.cli import main
from bca_deploy.errors import AdapterFormatError, AdapterMismatchError
from conftest import model_output, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "gate_proj"], {"gate_proj": 16}),
    "bert": (lambda: tiny_bert(num_labels=3), ["query", "value"], {"layer.1.attention.self.query": 4}),
}


def peft_model_with_random_kernels(factory, targets, pattern, **extra):
    torch.manual_seed(11)
    model = get_peft_model(factory(), C3AConfig(block_size=8, target_modules=targets,
                                                block_size_pattern=pattern, **extra))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0)  # PEFT scales ΔW by 1/in_features: make the delta visible
    return model.eval()


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_adapter_loads_with_identical_outputs(arch, tmp_path, input_ids):
    factory, targets, pattern = CASES[arch]
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    peft_model = peft_model_with_random_kernels(factory, targets, pattern, **extra)
    if arch == "bert":
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    expected = model_output(peft_model, input_ids)
    assert (expected - model_output(factory(), input_ids)).abs().max() > 1e-2
    peft_model.save_pretrained(tmp_path / "peft")

    ours = bd.load_adapter(factory(), tmp_path / "peft")
    torch.testing.assert_close(model_output(ours, input_ids), expected, rtol=1e-5, atol=1e-5)
    p = {n: l.block_sizes["default"] for n, l in bd.bca_layers(ours)}
    assert 16 in p.values() or 4 in p.values()  # the per-module override came through


@pytest.mark.parametrize("arch", sorted(CASES))
def test_bca_adapter_saved_for_peft_loads_with_identical_outputs(arch, tmp_path, input_ids):
    factory, targets, pattern = CASES[arch]
    ours = bd.inject(factory(), targets, block_size=8, block_size_pattern=pattern, init="normal",
                     init_std=0.1, seed=0, scaling=0.5,
                     modules_to_save=["classifier"] if arch == "bert" else ())
    expected = model_output(ours, input_ids)
    bd.save_adapter(ours, tmp_path / "for-peft", format="peft", task_type="SEQ_CLS" if arch == "bert" else None)
    config = json.loads((tmp_path / "for-peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "C3A"

    peft_model = PeftModel.from_pretrained(factory(), tmp_path / "for-peft").eval()
    torch.testing.assert_close(model_output(peft_model, input_ids), expected, rtol=1e-5, atol=1e-5)
    for name, layer in bd.bca_layers(ours):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert peft_layer.block_size["default"] == layer.block_sizes["default"], name


def test_peft_round_trip_is_bit_exact(tmp_path):
    peft_model = peft_model_with_random_kernels(tiny_llama, ["q_proj", "down_proj"], {"down_proj": 16})
    peft_model.save_pretrained(tmp_path / "peft")
    ours = bd.load_adapter(tiny_llama(), tmp_path / "peft")
    bd.save_adapter(ours, tmp_path / "back", format="peft")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_peft_import_then_bca_save_reloads(tmp_path, input_ids):
    peft_model = peft_model_with_random_kernels(tiny_llama, ["v_proj"], {})
    peft_model.save_pretrained(tmp_path / "peft")
    ours = bd.load_adapter(tiny_llama(), tmp_path / "peft")
    bd.save_adapter(ours, tmp_path / "bca")
    again = bd.load_adapter(tiny_llama(), tmp_path / "bca")
    assert torch.equal(model_output(again, input_ids), model_output(ours, input_ids))


def test_conv1d_cannot_be_written_for_peft(tmp_path):
    model = bd.inject(tiny_gpt2(), ["c_attn"], block_size=8)
    with pytest.raises(AdapterFormatError, match="PEFT's C3A supports torch.nn.Linear only.*c_attn"):
        bd.save_adapter(model, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


# ---- PEFT-shaped artifacts: AutoPeftModelFor* loads a converted adapter by itself ------------------


def _saved(model, path):
    model.save_pretrained(path)
    return path


def _from_disk(cls, path, **kwargs):
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return cls.from_pretrained(str(path), **kwargs).eval()
    finally:
        transformers.logging.set_verbosity_warning()


def test_converted_classifier_loads_with_auto_peft_model(tmp_path, input_ids):
    """A seq-cls adapter (recorded task, head with 3 labels) on a bare BertModel checkpoint → convert --to peft →
    ``AutoPeftModelForSequenceClassification.from_pretrained(dir, num_labels=3)`` gives our logits."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import BertForSequenceClassification

    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs

    base = _saved(tiny_bert(), tmp_path / "bert")  # a BertModel checkpoint, like all-MiniLM-L6-v2
    ours = _from_disk(BertForSequenceClassification, base, num_labels=3)
    bd.inject(ours, ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=0, modules_to_save=["classifier"])
    with torch.no_grad():
        ours.classifier.weight.normal_()
    adapter_configs(ours)["default"].task = task_spec_from_config("seq-cls", ours.config, ["classifier"])
    bd.save_adapter(ours, tmp_path / "native")
    expected = model_output(ours, input_ids)

    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "native"), "--to", "peft",
                                       "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(base)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "peft"), num_labels=3).eval()
    torch.testing.assert_close(model_output(loaded, input_ids), expected, rtol=1e-5, atol=1e-5)
    # and back: the task record (head modules, labels) survives the PEFT copy, in its safetensors metadata
    back = bd.read_adapter(tmp_path / "peft")[0].task
    assert back == adapter_configs(ours)["default"].task and back.head.num_labels == 3
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), "--to", "bca",
                                       "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())["task"]
    assert again == adapter_configs(ours)["default"].task.to_dict()


def _tiny_roberta_classifier():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(3)
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=80, num_labels=3)
    return RobertaForSequenceClassification(cfg).eval()


def test_a_nested_head_stays_one_saved_module_both_ways(tmp_path, input_ids):
    """RoBERTa's head is ``classifier.dense`` + ``classifier.out_proj``: PEFT saves it as the one module
    ``classifier`` (SEQ_CLS's modules_to_save). Read back, its tensors became two modules: a trained adapter's
    own PEFT copy was refused ("task.head.modules ['classifier'] are not in modules_to_save ['classifier.dense',
    'classifier.out_proj']"), and PEFT → bca → PEFT wrote a copy PEFT could not load (KeyError)."""
    from peft import AutoPeftModelForSequenceClassification

    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs

    ids = input_ids.clamp(max=90) + 3  # RoBERTa's positions start after its padding id 1: keep ids off it
    base = _saved(_tiny_roberta_classifier(), tmp_path / "base")
    # PEFT → bca → PEFT, each copy with PEFT's outputs
    peft_model = get_peft_model(_from_disk(type(_tiny_roberta_classifier()), base),
                                C3AConfig(task_type="SEQ_CLS", target_modules=["query", "value"], block_size=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name or "modules_to_save" in name:
                param.normal_(0.0, 2.0 if "c3a_kernel" in name else 0.5)
    peft_model.eval()
    expected = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    for command in (["--adapter", str(tmp_path / "peft"), "--to", "bca", "--out", str(tmp_path / "bca")],
                    ["--adapter", str(tmp_path / "bca"), "--to", "peft", "--out", str(tmp_path / "peft2")]):
        result = CliRunner().invoke(main, ["convert", *command])
        assert result.exit_code == 0, result.output
    assert bd.read_adapter(tmp_path / "bca")[0].modules_to_save == ["classifier"]
    assert json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    again = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "peft2")).eval()
    torch.testing.assert_close(model_output(again, ids), expected, rtol=1e-5, atol=1e-5)
    ours = bd.load_adapter(_from_disk(type(_tiny_roberta_classifier()), base), tmp_path / "bca")
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=1e-5, atol=1e-5)
    # a bca-deploy adapter with a recorded task → PEFT copy → read again: the task record and the head fit
    ours.config.id2label = {0: "a", 1: "b", 2: "c"}
    ours.config.label2id = {"a": 0, "b": 1, "c": 2}
    adapter_configs(ours)["default"].task = task_spec_from_config("seq-cls", ours.config, ["classifier"])
    bd.save_adapter(ours, tmp_path / "native")
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "native"), "--to", "peft",
                                       "--out", str(tmp_path / "peft3")])
    assert result.exit_code == 0, result.output
    config, _ = bd.read_adapter(tmp_path / "peft3")
    assert config.modules_to_save == ["classifier"] and config.task == adapter_configs(ours)["default"].task
    reloaded = bd.load_adapter(_from_disk(type(_tiny_roberta_classifier()), base), tmp_path / "peft3")
    torch.testing.assert_close(model_output(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_peft_copies_of_base_layers_are_left_to_the_model(tmp_path, input_ids):
    """A C3A adapter on lm_head: PEFT's save_embedding_layers (its default then) also saves the wrapped layer's frozen
    weight as ``lm_head.base_layer.weight``, which every reader refused ("no such parameter"). It is a base weight,
    which PEFT loads into the base layer (tests/test_saved_base_weights.py: a base that differs from it), checked for
    shape and kept by a conversion; the outputs are PEFT's."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    peft_model = get_peft_model(tiny_llama(), C3AConfig(target_modules=["q_proj", "lm_head"], block_size=4))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0)
    peft_model.eval()
    expected = model_output(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    assert "base_model.model.lm_head.base_layer.weight" in load_file(weights)  # what PEFT saved
    ours = bd.load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(model_output(ours, input_ids), expected, rtol=1e-5, atol=1e-5)
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), "--to", "bca",
                                       "--out", str(tmp_path / "bca")])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(tmp_path / "bca" / "adapter_model.safetensors")["lm_head.base_layer.weight"],
                       load_file(weights)["base_model.model.lm_head.base_layer.weight"])
    # a copy of another shape, or of a layer the adapter does not adapt, is not the base model's: refused by name
    state = load_file(weights)
    for key, value in (("base_model.model.lm_head.base_layer.weight", torch.zeros(3, 3)),
                       ("base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight", torch.zeros(16, 32))):
        save_file({**state, key: value}, str(weights))
        with pytest.raises(AdapterFormatError, match=key.rsplit(".", 2)[0].split("model.", 2)[-1]):
            bd.read_adapter(tmp_path / "peft")


def test_the_folder_peft_saves_a_named_adapter_in_is_pointed_to(tmp_path):
    """PEFT writes an adapter named "foo" to <dir>/foo/: given <dir>, inspect said "neither an adapter directory nor
    an ONNX export" and merge "no such adapter config", neither naming the folder holding it."""
    peft_model = get_peft_model(tiny_bert(), C3AConfig(target_modules=["query"], block_size=8), adapter_name="foo")
    peft_model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "foo" / "adapter_config.json").is_file()
    hint = f"it holds the adapter directory foo/ (PEFT saves an adapter not named 'default' in a folder of its name): " \
           f"pass {tmp_path / 'peft' / 'foo'}"
    with pytest.raises(AdapterFormatError, match=re.escape(hint)):
        bd.load_adapter(tiny_bert(), tmp_path / "peft")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "peft")])
    assert result.exit_code == 2 and hint in result.output, result.output
    assert bd.read_adapter(tmp_path / "peft" / "foo")[0].modules  # the folder it names reads


def test_a_trainer_output_dir_points_to_its_last_and_best_checkpoints(tmp_path):
    """A transformers Trainer training a PeftModel saves adapters to <output_dir>/checkpoint-<step>/. Given the
    output_dir, the hint named its first checkpoint by name as if PEFT had saved named adapters there ("PEFT saves an
    adapter not named 'default' in a folder of its name: pass .../checkpoint-10" of steps 5, 10 and 15: neither the
    last nor the best); it now names the last by step, and the best one trainer_state.json records."""
    import transformers

    peft_model = get_peft_model(tiny_llama(), C3AConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], block_size=8))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(5, 90, (8, 6), generator=torch.Generator()
                                                                         .manual_seed(0))]
    evaluations = iter(range(100))  # the first evaluation (step 5) scores best: best_model_checkpoint is checkpoint-5

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=15, save_steps=5, eval_steps=5, eval_strategy="steps",
        metric_for_best_model="order", greater_is_better=False, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, save_only_model=True)
    transformers.Trainer(model=peft_model, args=args, train_dataset=rows, eval_dataset=rows[:2],
                         compute_metrics=lambda _: {"order": next(evaluations)}).train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]
    expected = (f"it holds the checkpoints checkpoint-5/, checkpoint-10/, checkpoint-15/ of a transformers Trainer run "
                f"(its output_dir; each checkpoint is an adapter saved during training): pass one, such as the best, "
                f"{run / 'checkpoint-5'} (trainer_state.json's best_model_checkpoint), or the last, "
                f"{run / 'checkpoint-15'}")
    with pytest.raises(AdapterFormatError, match=re.escape(expected)):
        bd.load_adapter(tiny_llama(), run)
    tiny_llama().save_pretrained(tmp_path / "base")
    for args in (["inspect", str(run)], ["merge", "--model", str(tmp_path / "base"), "--adapter", str(run),
                                         "--out", str(tmp_path / "merged"), "--no-progress"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and expected in result.output, result.output
    # without a recorded best (no metric_for_best_model): the last by step
    for name in ("checkpoint-5", "checkpoint-10", "checkpoint-15"):
        (run / name / "trainer_state.json").unlink()
    with pytest.raises(AdapterFormatError, match=re.escape(f"pass one, such as the last, {run / 'checkpoint-15'}")):
        bd.load_adapter(tiny_llama(), run)
    assert bd.read_adapter(run / "checkpoint-15")[0].modules  # the folder it names reads


def test_a_peft_adapter_given_as_the_base_model_is_named_as_an_adapter(tmp_path):
    """``--model`` and ``--adapter`` swapped (a PEFT adapter folder as the base model): merge took PEFT's
    adapter_model.safetensors for a checkpoint in another format ("it has adapter_model.safetensors: convert the
    checkpoint to safetensors first (load it with transformers and save_pretrained)"), and export, convert and evaluate
    said only "no config.json". Each now says it is an adapter, where each goes, and the base model it records."""
    tiny_llama().save_pretrained(tmp_path / "base")
    import transformers

    base_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base_model, C3AConfig(target_modules=["q_proj"], block_size=8))
    peft_model.save_pretrained(tmp_path / "peft")
    adapter, base = str(tmp_path / "peft"), str(tmp_path / "base")
    said = (f"it is a PEFT C3A adapter, not a base model: give it as the adapter (--adapter), and as the model "
            f"(--model) the base model it was trained on; it records {base!r}")
    for args in (["merge", "--model", adapter, "--adapter", base, "--out", str(tmp_path / "out"), "--no-progress"],
                 ["export", "--model", adapter, "--adapter", adapter, "--out", str(tmp_path / "out")],
                 ["convert", "--adapter", adapter, "--to", "bca", "--out", str(tmp_path / "out"), "--model", adapter]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and said in result.output, (args[0], result.output)
        assert "convert the checkpoint" not in result.output
        assert not (tmp_path / "out").exists()
    # a checkpoint in another format still gets its own hint
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    result = CliRunner().invoke(main, ["merge", "--model", str(tmp_path / "bin"), "--adapter", adapter,
                                       "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2 and "convert the checkpoint to safetensors first" in result.output, result.output


def _peft_copy_with_task_metadata(tmp_path, value):
    """A PEFT copy of a seq-cls adapter whose safetensors task record is replaced by ``value``."""
    from safetensors.torch import save_file

    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs
    from bca_deploy.peft_compat import TASK_METADATA_KEY

    model = bd.inject(tiny_bert(num_labels=2), ["query"], block_size=8, init="normal", seed=0,
                      modules_to_save=["classifier"])
    adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
    bd.save_adapter(model, tmp_path / "peft", format="peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "pt", TASK_METADATA_KEY: value})
    return tmp_path / "peft"


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"type": "seq-cls", "architecture": NaN, "head": null}', "NaN is not valid JSON"),
    ('{"type": "seq-cls", "head": {"modules": ["elsewhere"], "num_labels": 2, "id2label": {"0": "a", "1": "b"}, '
     '"label2id": {"a": 0, "b": 1}}}', "elsewhere"),
    ('{"type": "seq-cls", "head": {"modules": ["classifier"], "num_labels": 99999999}}', "num_labels"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_a_hostile_task_record_in_a_peft_copy_is_refused_by_name(tmp_path, value, message):
    directory = _peft_copy_with_task_metadata(tmp_path, value)
    with pytest.raises(AdapterFormatError, match="bca_deploy.task") as err:
        bd.read_adapter(directory)
    assert message in str(err.value)


def test_a_task_record_for_another_task_than_peft_task_type_is_not_used(tmp_path):
    directory = _peft_copy_with_task_metadata(tmp_path, '{"type": "seq-cls", "architecture": null, "head": null}')
    config_path = directory / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "task_type": "FEATURE_EXTRACTION"}))
    assert bd.read_adapter(directory)[0].task.type == "feature-extraction"  # the edited task_type wins


def test_converted_causal_lm_loads_with_auto_peft_model(tmp_path, input_ids):
    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaForCausalLM

    from bca_deploy.adapter_io import convert_adapter
    from bca_deploy.config import TaskSpec
    from bca_deploy.inject import adapter_configs

    base = _saved(tiny_llama(), tmp_path / "llama")
    ours = bd.inject(_from_disk(LlamaForCausalLM, base), ["q_proj", "v_proj"], block_size=8, init="normal",
                     init_std=0.1, seed=0)
    adapter_configs(ours)["default"].task = TaskSpec(type="causal-lm", architecture="LlamaForCausalLM")
    bd.save_adapter(ours, tmp_path / "native")
    convert_adapter(tmp_path / "native", tmp_path / "peft", to="peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft")).eval()
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(ours, input_ids), rtol=1e-5, atol=1e-5)
    # and back: the PEFT task type becomes the adapter's task again
    assert bd.read_adapter(tmp_path / "peft")[0].task.type == "causal-lm"


def test_explicit_task_type_and_base_model(tmp_path):
    ours = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(ours, tmp_path / "native")
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "native"), "--to", "peft", "--out",
                                       str(tmp_path / "peft"), "--task-type", "CAUSAL_LM", "--base-model", "/models/x"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["task_type"], config["base_model_name_or_path"]) == ("CAUSAL_LM", "/models/x")
    bd.save_adapter(ours, tmp_path / "bare")
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "bare"), "--to", "peft", "--out",
                                       str(tmp_path / "peft2")])
    assert "pass --task-type" in result.output and "pass --base-model" in result.output


def test_a_task_type_contradicting_the_adapters_task_is_refused(tmp_path):
    """convert --task-type SEQ_CLS on a causal-LM adapter wrote a PEFT copy labelled for another head."""
    from bca_deploy.config import TaskSpec
    from bca_deploy.inject import adapter_configs

    ours = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    adapter_configs(ours)["default"].task = TaskSpec(type="causal-lm", architecture="LlamaForCausalLM")
    bd.save_adapter(ours, tmp_path / "lm")
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "lm"), "--to", "peft", "--out",
                                       str(tmp_path / "peft"), "--task-type", "SEQ_CLS"])
    assert result.exit_code == 2 and "task_type 'SEQ_CLS' contradicts the adapter, which was trained for causal-lm" \
        in result.output, result.output
    assert not (tmp_path / "peft").exists()


def test_inspect_names_the_format_and_the_conversion(tmp_path):
    """PEFT fails on bca-deploy's own format with its own error; inspect says which format and what to run."""
    ours = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(ours, tmp_path / "native")
    bd.save_adapter(ours, tmp_path / "peft", format="peft")
    native = CliRunner().invoke(main, ["inspect", str(tmp_path / "native")])
    assert native.exit_code == 0, native.output
    assert "format:       bca-deploy adapter (format version 1)" in native.output
    assert f"PEFT cannot read it: bca-deploy convert --adapter {tmp_path / 'native'} --to peft" in native.output
    peft = CliRunner().invoke(main, ["inspect", str(tmp_path / "peft")])
    assert "format:       PEFT C3A adapter" in peft.output and "--to bca" in peft.output
    with pytest.raises(KeyError, match="peft_type"):  # what a user sees when PEFT meets the native format
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "native"))


def test_load_errors_name_the_format(tmp_path):
    from bca_deploy.errors import AdapterMismatchError

    ours = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(ours, tmp_path / "native")
    bd.save_adapter(ours, tmp_path / "peft", format="peft")
    with pytest.raises(AdapterMismatchError, match=rf"^bca-deploy adapter {tmp_path / 'native'} does not fit"):
        bd.load_adapter(tiny_bert(), tmp_path / "native")
    with pytest.raises(AdapterMismatchError, match=rf"^PEFT C3A adapter {tmp_path / 'peft'} does not fit"):
        bd.load_adapter(tiny_bert(), tmp_path / "peft")


def test_convert_records_label_names_for_a_peft_classifier(tmp_path, input_ids):
    """PEFT saves no label names: a classifier trained on a bare encoder (three labels) came out of merge, export and
    serve as LABEL_0..2 with no way to name them. ``convert --label-names`` records them (the head found from the
    base checkpoint's config, ``--model``), in either format; merge's checkpoint and the task every stage resolves
    carry them, and the outputs stay PEFT's."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from bca_deploy.models import resolve_task

    base = _saved(tiny_bert(), tmp_path / "base")  # a bare encoder: its config names no three labels
    classifier = _from_disk(AutoModelForSequenceClassification, base, num_labels=3)
    peft_model = get_peft_model(classifier, C3AConfig(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                      block_size=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name or "modules_to_save" in name:
                param.normal_(0.0, 2.0 if "c3a_kernel" in name else 0.5)
    expected = model_output(peft_model.eval(), input_ids)
    peft_model.save_pretrained(tmp_path / "peft")
    assert resolve_task(base, [tmp_path / "peft"]).head.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(AdapterMismatchError, match=r"the adapter's classifier has 3 labels: build the model with "
                                                   r"num_labels=3"):  # the hint, without a recorded head too
        bd.load_adapter(_from_disk(BertForSequenceClassification, base), tmp_path / "peft")

    # without --model, the base checkpoint PEFT recorded (base_model_name_or_path, a local directory here) locates it
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), "--to", "bca", "--out",
                                       str(tmp_path / "recorded-base"), "--label-names", "neg,neu,pos"])
    assert result.exit_code == 0, result.output
    assert resolve_task(base, [tmp_path / "recorded-base"]).head.id2label == {0: "neg", 1: "neu", 2: "pos"}
    # a recorded hub name is not looked up (nothing is downloaded): --model is asked for
    hub = tmp_path / "hub-named"
    hub.mkdir()
    (hub / "adapter_model.safetensors").write_bytes((tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps({**peft_config, "base_model_name_or_path": "org/some-bert"}))
    result = CliRunner().invoke(main, ["convert", "--adapter", str(hub), "--to", "bca", "--out",
                                       str(tmp_path / "no-model"), "--label-names", "neg,neu,pos"])
    assert result.exit_code == 2 and "--model" in result.output and not (tmp_path / "no-model").exists(), \
        result.output

    def convert(*args):
        return CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), *args])

    refusals = {  # each refused before anything is written, naming what to change
        ("--to", "bca", "--out", str(tmp_path / "two"), "--label-names", "neg,pos", "--model", str(base)):
            "2 names given, but the adapter's classifier has 3 outputs",
        ("--to", "bca", "--out", str(tmp_path / "twice"), "--label-names", "neg,neg,pos", "--model", str(base)):
            "repeated: 'neg'",
        ("--to", "bca", "--out", str(tmp_path / "empty"), "--label-names", "neg,,pos", "--model", str(base)):
            "no empty item",
    }
    for args, message in refusals.items():
        result = convert(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not any(p.name == Path(args[3]).name for p in tmp_path.iterdir()), args

    alone = convert("--to", "bca", "--out", str(tmp_path / "model-alone"), "--model", str(base))  # checks the config
    assert alone.exit_code == 0 and f"checked against the layers of {base}" in alone.output, alone.output
    for to in ("bca", "peft"):
        out = tmp_path / f"named-{to}"
        result = convert("--to", to, "--out", str(out), "--label-names", "neg, neu ,pos", "--model", str(base))
        assert result.exit_code == 0 and "labels: neg, neu, pos" in result.output, result.output
        head = resolve_task(base, [out]).head
        assert head.id2label == {0: "neg", 1: "neu", 2: "pos"} and head.label2id == {"neg": 0, "neu": 1, "pos": 2}
        ours = bd.load_adapter(_from_disk(BertForSequenceClassification, base, num_labels=3), out)
        torch.testing.assert_close(model_output(ours, input_ids), expected, rtol=1e-5, atol=1e-5)
    # names holding commas go as a JSON array
    out = tmp_path / "json-names"
    result = convert("--to", "bca", "--out", str(out), "--label-names", '["bad, very", "neutral", "good, very"]',
                     "--model", str(base))
    assert result.exit_code == 0 and 'labels: ["bad, very", "neutral", "good, very"]' in result.output, result.output
    assert resolve_task(base, [out]).head.id2label == {0: "bad, very", 1: "neutral", 2: "good, very"}
    # a --model of another architecture is refused naming it (it said the adapter saved no classifier): the adapter's
    # recorded base (a local BERT directory) is of another type; nothing of it is recorded
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                                   "vocab_size": 100}))
    result = convert("--to", "bca", "--out", str(tmp_path / "other-out"), "--label-names", "a,b,c", "--model",
                     str(other))
    assert result.exit_code == 2 and f"base model_type is 'bert' (the type of the base model it records, {base}, " \
        "read from its config.json: PEFT records no type) but the given base model is 'gpt2'" in result.output, \
        result.output
    assert bd.read_adapter(tmp_path / "named-bca")[0].base_model_type is None
    from bca_deploy.merge import merge_checkpoint

    merged = merge_checkpoint(base, [(tmp_path / "named-bca", 1.0)], tmp_path / "merged", progress=False, fsync=False)
    again = _from_disk(AutoModelForSequenceClassification, merged)
    assert again.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    torch.testing.assert_close(model_output(again, input_ids), expected, rtol=1e-4, atol=1e-4)


def test_label_names_are_refused_where_there_is_no_head_to_name(tmp_path):
    """A causal-LM adapter has no classes; a seq-cls adapter that saves no classifier uses the checkpoint's head,
    whose names are the checkpoint's to give."""
    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs

    llm = bd.inject(tiny_llama(), ["q_proj"], block_size=8, seed=0)
    adapter_configs(llm)["default"].task = task_spec_from_config("causal-lm", llm.config, None)
    bd.save_adapter(llm, tmp_path / "llm")
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "llm"), "--to", "bca", "--out",
                                       str(tmp_path / "out"), "--label-names", "a,b"])
    assert result.exit_code == 2 and "seq-cls" in result.output and "causal-lm" in result.output, result.output
    headless = bd.inject(tiny_bert(num_labels=2), ["query"], block_size=8, seed=0)
    adapter_configs(headless)["default"].task = task_spec_from_config("seq-cls", headless.config, None)
    bd.save_adapter(headless, tmp_path / "headless")
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "headless"), "--to", "bca", "--out",
                                       str(tmp_path / "out"), "--label-names", "a,b"])
    assert result.exit_code == 2 and "base checkpoint's head" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_peft_copy_keeps_the_base_model_type(tmp_path):
    """PEFT's config has no model_type field: the copy carries it in its safetensors metadata, so the copy refuses a
    model of another architecture as the original does (it was lost: the copy fitted any model with those paths)."""
    from safetensors.torch import save_file

    from bca_deploy.peft_compat import BASE_MODEL_TYPE_METADATA_KEY

    bd.save_adapter(bd.inject(tiny_bert(), ["query"], block_size=8, init="normal", seed=0), tmp_path / "peft",
                    format="peft")
    assert bd.read_adapter(tmp_path / "peft")[0].base_model_type == "bert"
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), "--to", "bca",
                                       "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["base_model"]["model_type"] == "bert"
    other = tiny_bert()
    other.config.model_type = "roberta"
    with pytest.raises(AdapterMismatchError, match="base model_type is 'bert'"):
        bd.load_adapter(other, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "pt", BASE_MODEL_TYPE_METADATA_KEY: "x\n" * 300})
    with pytest.raises(AdapterFormatError, match=re.escape(BASE_MODEL_TYPE_METADATA_KEY)):
        bd.read_adapter(tmp_path / "peft")


def test_a_peft_classifier_saved_without_task_type_gets_its_task_recorded_by_convert(tmp_path, input_ids):
    """helper-63: task_type is optional in PEFT; a classifier saved without it was taken for its bare base model's
    task by every stage (evaluate, export, merge each refused with a Python-only hint, convert --label-names said
    "not recorded"). ``convert --task-type SEQ_CLS`` records it (with the names), and the stages read the head."""
    from transformers import AutoModelForSequenceClassification

    from bca_deploy.models import load_model, resolve_task

    base = _saved(tiny_bert(), tmp_path / "base")
    peft_model = get_peft_model(_from_disk(AutoModelForSequenceClassification, base, num_labels=3),
                                C3AConfig(target_modules=["query", "value"], modules_to_save=["classifier"],
                                          block_size=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name or "modules_to_save" in name:
                param.normal_(0.0, 1.0)
    expected = model_output(peft_model.eval(), input_ids)
    peft_model.save_pretrained(tmp_path / "peft")
    assert bd.read_adapter(tmp_path / "peft")[0].task is None
    with pytest.raises(AdapterMismatchError, match=r"--task-type SEQ_CLS"):  # the hint names the command-line route
        bd.load_adapter(_from_disk(AutoModelForSequenceClassification, base), tmp_path / "peft")

    def convert(*args):
        return CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "peft"), *args])

    result = convert("--to", "bca", "--out", str(tmp_path / "no-task"), "--label-names", "a,b,c")
    assert result.exit_code == 2 and "add --task-type SEQ_CLS" in result.output, result.output
    result = convert("--to", "bca", "--out", str(tmp_path / "named"), "--task-type", "SEQ_CLS", "--label-names", "a,b,c")
    assert result.exit_code == 0, result.output
    head = resolve_task(base, [tmp_path / "named"]).head
    assert head is not None and head.id2label == {0: "a", 1: "b", 2: "c"}
    torch.testing.assert_close(model_output(load_model(base, [tmp_path / "named"]).eval(), input_ids), expected,
                               rtol=1e-5, atol=1e-5)
    result = CliRunner().invoke(main, ["convert", "--adapter", str(tmp_path / "named"), "--to", "bca", "--out",
                                       str(tmp_path / "contradicted"), "--task-type", "CAUSAL_LM"])
    assert result.exit_code == 2 and "contradicts the adapter, which was trained for seq-cls" in result.output
    assert not (tmp_path / "contradicted").exists()


def test_a_non_finite_peft_kernel_is_named_by_the_files_own_key(tmp_path):
    """A NaN or Inf in a PEFT C3A kernel was reported under bca-deploy's converted name (``<module>.bca_kernel``),
    a key in no file the user has; now under the file's own key (``base_model.model.<module>.c3a_kernel``) and its
    module, by every reader (read, load, convert, merge, inspect)."""
    from safetensors.torch import save_file

    model = peft_model_with_random_kernels(tiny_llama, ["q_proj", "v_proj"], {})
    model.save_pretrained(tmp_path / "peft")
    tiny_llama().save_pretrained(tmp_path / "base")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    state = load_file(str(weights))
    nan_key, inf_key = (k for k in sorted(state) if k.endswith(".c3a_kernel") and ".layers.0." in k)
    state[nan_key][0, 1, 2] = float("nan")
    state[inf_key][1, 0, 3] = float("-inf")
    save_file(state, str(weights))
    wanted = [f"tensor {key!r} (module {key.removeprefix('base_model.model.').removesuffix('.c3a_kernel')}): "
              "has NaN/Inf values" for key in (nan_key, inf_key)]

    with pytest.raises(AdapterFormatError) as caught:
        bd.read_adapter(tmp_path / "peft")
    assert all(w in str(caught.value) for w in wanted) and "bca_kernel" not in str(caught.value), str(caught.value)
    with pytest.raises(AdapterFormatError) as caught:
        bd.load_adapter(tiny_llama(), tmp_path / "peft")
    assert all(w in str(caught.value) for w in wanted), str(caught.value)
    for args in (["inspect", str(tmp_path / "peft")],
                 ["convert", "--adapter", str(tmp_path / "peft"), "--to", "bca", "--out", str(tmp_path / "c")],
                 ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"), "--out",
                  str(tmp_path / "m"), "--no-progress"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and all(w in result.output for w in wanted), (args, result.output)
        assert "bca_kernel" not in result.output, (args, result.output)
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()


def test_a_bad_saved_module_tensor_in_a_peft_file_is_named_by_the_files_own_key(tmp_path):
    """A NaN (or a dtype no adapter tensor may have) in a tensor PEFT saved for ``modules_to_save`` (the classifier
    of a real ``C3AConfig(modules_to_save=["classifier"])`` save) was reported under bca-deploy's converted name
    (``classifier.weight``), a key in no file the user has; now under the file's own key and its module, as a kernel's,
    by every reader (read, load, convert, merge, inspect; a dtype by the header read too). Base weights keep their own
    naming (see ``test_saved_base_weights.py``)."""
    import shutil

    from safetensors.torch import save_file

    from bca_deploy.adapter_io import read_adapter_header

    torch.manual_seed(3)
    model = get_peft_model(tiny_bert(num_labels=2), C3AConfig(block_size=8, target_modules=["query", "value"],
                                                              modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "peft")
    tiny_bert(num_labels=2).save_pretrained(tmp_path / "base")
    state = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    saved = sorted(k for k in state if ".classifier." in k)
    assert saved, sorted(state)  # PEFT saved the trained classifier
    weight = next(k for k in saved if k.endswith("weight"))
    bias = next(k for k in saved if k.endswith("bias"))
    cases = []
    for name, key, change, wanted in (
            ("nan", weight, lambda t: t.index_fill(1, torch.tensor([3]), float("nan")), "has NaN/Inf values"),
            ("int", bias, lambda t: t.to(torch.int32), "dtype int32")):
        shutil.copytree(tmp_path / "peft", tmp_path / name)
        broken = dict(state)
        broken[key] = change(state[key])
        save_file(broken, str(tmp_path / name / "adapter_model.safetensors"))
        cases.append((tmp_path / name, f"tensor {key!r} (module classifier): {wanted}"))

    def named_as_in_file(message: str, wanted: str) -> bool:
        return wanted in message and "tensor classifier." not in message

    for directory, wanted in cases:
        readers = [lambda: bd.read_adapter(directory),
                   lambda: bd.load_adapter(tiny_bert(num_labels=2), directory)]
        if "dtype" in wanted:
            readers.append(lambda: read_adapter_header(directory))  # a header read: dtypes only
        for read in readers:
            with pytest.raises(AdapterFormatError) as caught:
                read()
            assert named_as_in_file(str(caught.value), wanted), str(caught.value)
        for args in (["inspect", str(directory)],
                     ["convert", "--adapter", str(directory), "--to", "bca", "--out", str(tmp_path / "c")],
                     ["merge", "--model", str(tmp_path / "base"), "--adapter", str(directory), "--out",
                      str(tmp_path / "m"), "--no-progress"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 2 and named_as_in_file(result.output, wanted), (args, result.output)
        assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()
