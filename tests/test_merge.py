"""Merging: in memory (merge / unmerge / merge_and_unload) and streaming over safetensors checkpoints.

Tiny random models (conftest) with non-zero kernels; merged checkpoints are reloaded with plain
transformers and compared with the unmerged adapted model.

Tolerances: fp32 results must match to 1e-5 (relative to the largest output); the only difference is
fp32 summation order (Σ_j ΔW x vs (W + ΔW) x). For bf16 the merged weight is W + ΔW rounded once to
bf16, while the unmerged model rounds W x and ΔW x separately, so outputs differ by bf16 rounding
(2^-8 relative per value) accumulated over two layers: measured ~0.8% of the largest logit on these
models, the same size as either bf16 path's own error against fp32. The bound used is 4e-2. Where
two merges compute the same fp32 values (streaming vs in-memory), bit-identity is demanded.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

import bca_deploy as bd
import bca_deploy.merge as merge_mod
from bca_deploy.adapter_io import adapter_state, write_adapter_dir
from bca_deploy.config import ModuleSpec
from bca_deploy.errors import AdapterMismatchError, NonFiniteError, OutputExistsError
from bca_deploy.merge import (
    SafetensorsWriter,
    TensorInfo,
    dense_delta,
    merge,
    merge_and_unload,
    merge_checkpoint,
    read_safetensors_header,
    unmerge,
)
from conftest import TINY_MODELS, model_output, tiny_bert, tiny_gpt2, tiny_llama

FP32_TOL = 1e-5
BF16_TOL = 4e-2
LOADERS = {"bert": AutoModel, "llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM}


# ---- helpers --------------------------------------------------------------------------------------


def circulant_reference(kernel: torch.Tensor) -> torch.Tensor:
    """Dense ΔW from the definition, with torch.roll (no materialize): block(i, j)[:, s] = roll(w_ij, s)."""
    o, q, p = kernel.shape
    rows = []
    for i in range(o):
        blocks = [torch.stack([torch.roll(kernel[i, j], s) for s in range(p)], dim=1) for j in range(q)]
        rows.append(torch.cat(blocks, dim=1))  # (p, q*p)
    return torch.cat(rows, dim=0)  # (o*p, q*p)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def adapted(arch: str, dtype=torch.float32, seed: int = 0, block_size: int | None = None, init_std: float = 0.05):
    factory, targets, p = TINY_MODELS[arch]
    base = factory().to(dtype)
    model = bd.inject(copy.deepcopy(base), targets, block_size=block_size or p, init="normal",
                      init_std=init_std, seed=seed)
    return base, model.eval()


def save_base(base, directory: Path, sharded: bool) -> Path:
    base.save_pretrained(directory, max_shard_size="20KB" if sharded else "10GB")
    return directory


def no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture
def llama_setup(tmp_path):
    base, model = adapted("llama")
    save_base(base, tmp_path / "base", sharded=True)
    bd.save_adapter(model, tmp_path / "adapter")
    return tmp_path, base, model


# ---- the math -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_dense_delta_matches_circulant_definition(layer_type):
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 5, dtype=torch.float64)
    spec = ModuleSpec(block_size=5, scaling=0.5, in_features=10, out_features=15, layer_type=layer_type)
    expected = circulant_reference(kernel) * 0.5 * -2.0
    expected = expected.T if layer_type == "conv1d" else expected
    got = dense_delta(kernel, spec, weight=-2.0)
    assert got.shape == spec.weight_shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)


def test_dense_delta_equals_layer_delta_weight():
    _, model = adapted("gpt2")
    for _, layer in bd.bca_layers(model):
        spec = layer.spec("default")
        assert torch.equal(dense_delta(layer.bca_kernels["default"], spec), layer.delta_weight("default"))


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_streaming_view_is_bit_identical_to_dense_delta(layer_type):
    torch.manual_seed(0)
    kernel = torch.randn(4, 3, 8)
    spec = ModuleSpec(block_size=8, scaling=0.3, in_features=24, out_features=32, layer_type=layer_type)
    view = merge_mod._storage_delta_view(kernel, spec, factor=0.7 * 0.3)
    rows, cols = spec.weight_shape
    dense = torch.from_numpy(view.reshape(rows, cols).copy())
    assert torch.equal(dense, dense_delta(kernel, spec, weight=0.7))


# ---- in-memory merge ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_in_memory_merge_unmerge_fp32(arch, input_ids):
    base, model = adapted(arch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model_output(model, input_ids)
        assert rel_err(unmerged, model_output(base, input_ids)) > 1e-3  # the adapter does something
        merge(model)
        assert all(layer.merged_adapters == ["default"] for _, layer in bd.bca_layers(model))
        merged = model_output(model, input_ids)
        assert rel_err(merged, unmerged) <= FP32_TOL
        unmerge(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, original[key]), key  # bit-exact restore
        assert torch.equal(model_output(model, input_ids), unmerged)


def test_in_memory_merge_and_unload_gives_plain_model(input_ids):
    base, model = adapted("llama")
    with torch.no_grad():
        expected = model_output(model, input_ids)
        plain = merge_and_unload(model)
        assert not list(bd.bca_layers(plain))
        assert set(plain.state_dict()) == set(base.state_dict())
        assert rel_err(model_output(plain, input_ids), expected) <= FP32_TOL
        assert not bd.adapter_configs(plain)


def test_in_memory_merge_bf16_error_is_bf16_rounding(input_ids):
    base, model = adapted("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        unmerged = model_output(model, input_ids)
        reference = model_output(bd.inject(copy.deepcopy(base).float(), TINY_MODELS["llama"][1], block_size=8,
                                           init="normal", init_std=0.05, seed=0), input_ids)
        merge(model)
        merged = model_output(model, input_ids)
        # Each merged weight is exactly round_bf16(W + ΔW computed in fp32).
        for _, layer in bd.bca_layers(model):
            exact = layer._weight_before_merge.float() + layer.delta_weight("default")
            assert torch.equal(layer.base_layer.weight, exact.to(torch.bfloat16))
    err = rel_err(merged, unmerged)
    print(f"bf16 merged vs unmerged: {err:.3g} of max |logit|; unmerged vs fp32 "
          f"{rel_err(unmerged, reference):.3g}, merged vs fp32 {rel_err(merged, reference):.3g}")
    assert 0 < err <= BF16_TOL
    assert rel_err(merged, reference) <= BF16_TOL


def test_in_memory_merge_selected_adapter_and_refusals(input_ids):
    _, model = adapted("bert")
    bd.inject(model, ["query"], block_size=4, init="normal", adapter_name="other", seed=5)
    with pytest.raises(ValueError, match="unknown adapter"):
        merge(model, "nope")
    merge(model, "other")
    assert {tuple(layer.merged_adapters) for _, layer in bd.bca_layers(model)} == {("other",), ()}
    unmerge(model)
    with torch.no_grad():
        next(layer for _, layer in bd.bca_layers(model)).bca_kernels["default"][0, 0, 0] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="NaN"):  # the same error as merging one layer (layers.py)
        merge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, equal_nan=True)
    assert not any(layer.merged_adapters for _, layer in bd.bca_layers(model))


# ---- streaming merge: round trips ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_merge_checkpoint_round_trip(arch, sharded, dtype, tmp_path, input_ids):
    base, model = adapted(arch, dtype=dtype)
    save_base(base, tmp_path / "base", sharded)
    bd.save_adapter(model, tmp_path / "adapter")
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert out == (tmp_path / "out").resolve()

    # Same files, same split, same names; nothing of bca-deploy.
    names_in = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names_in
    assert (out / "config.json").read_bytes() == (tmp_path / "base" / "config.json").read_bytes()
    if sharded:
        assert len([n for n in names_in if n.endswith(".safetensors")]) > 1
        index_in = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
        index_out = json.loads((out / "model.safetensors.index.json").read_text())
        assert index_out["weight_map"] == index_in["weight_map"]
        assert index_out["metadata"]["total_size"] == index_in["metadata"]["total_size"]
    for shard in (n for n in names_in if n.endswith(".safetensors")):
        with safe_open(str(tmp_path / "base" / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert list(a.keys()) == list(b.keys())
            assert a.metadata() == b.metadata()

    # Plain transformers loads it and computes what the unmerged adapted model computes.
    merged = LOADERS[arch].from_pretrained(out, torch_dtype=dtype).eval()
    assert not any("bca" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        expected = model_output(model, input_ids)
        got = model_output(merged, input_ids)
    assert rel_err(got, expected) <= (FP32_TOL if dtype == torch.float32 else BF16_TOL)

    # Bit-identical to the in-memory merge (same fp32 values, same single rounding).
    in_memory = merge_and_unload(model).state_dict()
    for key, value in merged.state_dict().items():
        assert torch.equal(value, in_memory[key]), key


def test_weighted_two_adapter_merge_equals_independent_dense_math(tmp_path):
    base = tiny_llama()
    save_base(base, tmp_path / "base", sharded=True)
    a = bd.inject(copy.deepcopy(base), ["q_proj", "down_proj"], block_size=8, init="normal", init_std=0.1,
                  seed=1, scaling=0.5)
    b = bd.inject(copy.deepcopy(base), ["q_proj", "v_proj"], block_size=4, init="normal", init_std=0.1, seed=2)
    bd.save_adapter(a, tmp_path / "a")
    bd.save_adapter(b, tmp_path / "b")
    w1, w2 = 0.7, -1.3
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "a", w1), (tmp_path / "b", w2)], tmp_path / "out",
                           progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()

    deltas: dict[str, list[torch.Tensor]] = {}
    for weight, model in ((w1, a), (w2, b)):
        for name, layer in bd.bca_layers(model):
            kernel = layer.bca_kernels["default"].detach().double()
            dense = circulant_reference(kernel) * layer.scalings["default"] * weight  # float64, by definition
            deltas.setdefault(name + ".weight", []).append(dense)
    checked = 0
    for key, value in base.state_dict().items():
        if key not in deltas:
            assert torch.equal(merged[key], value), key
            continue
        expected = value.double() + sum(deltas[key])
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
        checked += 1
    assert checked == 2 * 3  # q (both adapters), v, down in each of 2 layers


def test_peft_c3a_adapter_merge_matches_peft_model(tmp_path, input_ids):
    from peft import C3AConfig, get_peft_model

    base = tiny_llama()
    save_base(base, tmp_path / "base", sharded=True)
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(base), C3AConfig(
        block_size=8, target_modules=["q_proj", "v_proj", "up_proj"], init_weights="xavier_uniform"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "c3a_kernel" in name:
                param.mul_(30.0)  # PEFT scales ΔW by 1/in_features: make the delta clearly visible
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "peft", 1.0)], tmp_path / "out", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model_output(peft_model, input_ids)
        assert rel_err(model_output(base, input_ids), expected) > 1e-3
        assert rel_err(model_output(merged, input_ids), expected) <= FP32_TOL


def test_prefix_differences_between_adapter_and_checkpoint(tmp_path, input_ids):
    # Adapter trained on BertForSequenceClassification ("bert.encoder..."), checkpoint saved from
    # BertModel ("encoder..."), and the reverse.
    cls = bd.inject(tiny_bert(num_labels=2), ["query", "value"], block_size=8, init="normal", seed=1)
    bd.save_adapter(cls, tmp_path / "cls-adapter")
    bare = tiny_bert()
    bare.save_pretrained(tmp_path / "bare")
    out = merge_checkpoint(tmp_path / "bare", [(tmp_path / "cls-adapter", 1.0)], tmp_path / "out1", progress=False)
    merged = AutoModel.from_pretrained(out).state_dict()
    ref = merge_and_unload(copy.deepcopy(cls)).bert.state_dict()
    assert all(torch.equal(merged[k], ref[k]) for k in merged)

    bare_adapted = bd.inject(tiny_bert(), ["query"], block_size=8, init="normal", seed=2)
    bd.save_adapter(bare_adapted, tmp_path / "bare-adapter")
    tiny_bert(num_labels=2).save_pretrained(tmp_path / "cls")
    out = merge_checkpoint(tmp_path / "cls", [(tmp_path / "bare-adapter", 1.0)], tmp_path / "out2", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight")
    assert torch.equal(got, merge_and_unload(bare_adapted).encoder.layer[0].attention.self.query.weight)


def test_modules_to_save_replace_checkpoint_tensors(tmp_path, input_ids):
    base = tiny_bert(num_labels=3)
    base.save_pretrained(tmp_path / "base")
    model = bd.inject(copy.deepcopy(base), ["query"], block_size=8, init="normal", seed=0,
                      modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.weight.normal_()
    bd.save_adapter(model, tmp_path / "adapter")
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert rel_err(model_output(merged, input_ids), model_output(model, input_ids)) <= FP32_TOL


def test_other_files_copied_and_other_weight_files_left_out(llama_setup):
    tmp_path, _, _ = llama_setup
    base = tmp_path / "base"
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "special_tokens_map.json").write_text("{}")
    (base / "extra").mkdir()
    (base / "extra" / "notes.txt").write_text("hello")
    (base / "pytorch_model.bin").write_bytes(b"stale")
    with pytest.warns(UserWarning, match="pytorch_model.bin"):
        out = merge_checkpoint(base, [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json", "extra/notes.txt"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert not (out / "pytorch_model.bin").exists()


def test_a_folder_that_is_a_link_is_named_not_dropped_silently(llama_setup):
    """A linked folder (a sentence-transformers 1_Pooling kept elsewhere) is not followed (it could lead to / or back
    to an ancestor) and was left out of the merged model without a word; it is named in a warning now."""
    tmp_path, _, _ = llama_setup
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    (tmp_path / "base" / "1_Pooling").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "base" / "loop").symlink_to(tmp_path / "base", target_is_directory=True)
    with pytest.warns(UserWarning, match="not copying folders that are links .*: 1_Pooling, loop;"):
        out = merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert not (out / "1_Pooling").exists() and not (out / "loop").exists()
    assert (out / "model.safetensors.index.json").is_file()


def test_overwrite_replaces_an_earlier_merge_and_refuses_a_users_folder(llama_setup):
    """--overwrite replaced any non-empty --out: a project folder, ~ or a data folder was moved aside and deleted.
    It replaces an earlier merged checkpoint (and an empty folder); anything else is refused, nothing touched."""
    tmp_path, _, _ = llama_setup
    out = tmp_path / "out"
    merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], out, progress=False)
    (out / "old.txt").write_text("old")
    merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 0.5)], out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists()
    assert (out / "model.safetensors.index.json").is_file()
    assert no_leftovers(tmp_path, "out")
    for name, extra in [("mine", "notes.txt"), ("repo", ".git")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        if extra == ".git":
            (folder / extra).mkdir()
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(OutputExistsError, match=f"{folder}: .*not an output of bca-deploy|{folder}: .*holds .git"):
            merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], folder, overwrite=True, progress=False)
        assert sorted(p.name for p in folder.iterdir()) == before and (folder / "notes.txt").read_text() == "mine"
        assert no_leftovers(tmp_path, name)


# ---- refusals: nothing written ------------------------------------------------------------------


def test_refuses_existing_output_without_overwrite(llama_setup):
    tmp_path, _, _ = llama_setup
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert no_leftovers(tmp_path, "out")


def test_refuses_output_equal_to_or_inside_model_dir(llama_setup):
    tmp_path, _, _ = llama_setup
    before = sorted(p.name for p in (tmp_path / "base").iterdir())
    for out in (tmp_path / "base", tmp_path / "base" / "merged", tmp_path):
        with pytest.raises(OutputExistsError):
            merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], out, overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == before


def test_an_output_in_the_model_directory_is_refused_naming_the_option_the_user_typed(llama_setup):
    """``bca-deploy merge --model base --out base/x`` said "out_dir ... is inside the model directory": the CLI user
    never typed out_dir. The refusal names ``--out`` (and ``out_dir`` for Python callers), as --overwrite's does."""
    from click.testing import CliRunner

    from bca_deploy.cli import main

    tmp_path, _, _ = llama_setup
    for out, words in ((tmp_path / "base", "is the model directory"), (tmp_path / "base" / "x", "is inside the model")):
        result = CliRunner().invoke(main, ["merge", "--model", str(tmp_path / "base"), "--adapter",
                                           str(tmp_path / "adapter"), "--out", str(out), "--overwrite"])
        assert result.exit_code == 2, result.output
        assert "--out (out_dir in Python)" in result.output and words in result.output, result.output
    assert not (tmp_path / "base" / "x").exists()


def test_refuses_mismatched_adapter_listing_every_problem(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    bd.inject(other, ["q_proj", "up_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(other, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError) as info:
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    message = str(info.value)
    assert "module model.layers.2.self_attn.q_proj: not found in checkpoint" in message  # missing module
    assert ("module model.layers.0.mlp.up_proj: weight (64, 32) (in=32, out=64) but the adapter was trained on "
            "in=32, out=96") in message
    assert message.count("up_proj") >= 3  # all problems, not the first one only
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_refuses_model_type_mismatch(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    model = bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0)
    bd.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="base model_type is 'llama' but checkpoint .* is 'gpt2'"):
        merge_checkpoint(tmp_path / "gpt2", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_a_classifier_adapter_of_another_model_type_is_that_error_first(tmp_path):
    """A bert SEQ_CLS adapter given a llama checkpoint: the model types differ, said first and alone, by merge and
    by the task resolution export and bank start with. It was a classification checkpoint transformers could not
    build (merge) and a task llama cannot be exported for (export), which sent the user after the wrong fix."""
    from bca_deploy.config import task_spec_from_config
    from bca_deploy.inject import adapter_configs
    from bca_deploy.models import resolve_task

    tiny_llama().save_pretrained(tmp_path / "llama")
    model = bd.inject(tiny_bert(num_labels=2), ["query"], block_size=8, init="normal", seed=0,
                      modules_to_save=["classifier"])
    adapter_configs(model)["default"].task = task_spec_from_config("seq-cls", model.config, ["classifier"])
    bd.save_adapter(model, tmp_path / "adapter")
    assert bd.read_adapter(tmp_path / "adapter")[0].task.type == "seq-cls"
    expected = "base model_type is 'bert' but checkpoint .*llama is 'llama'"
    with pytest.raises(AdapterMismatchError, match=expected) as info:
        merge_checkpoint(tmp_path / "llama", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert "classification" not in str(info.value)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")
    for one_head in (True, False):  # export (one head) and export --bank / serve
        with pytest.raises(AdapterMismatchError, match=expected):
            resolve_task(tmp_path / "llama", [tmp_path / "adapter"], one_head=one_head)
    # the checkpoint it was trained on still resolves (and an adapter without a recorded type is not refused here)
    tiny_bert().save_pretrained(tmp_path / "bert")
    assert resolve_task(tmp_path / "bert", [tmp_path / "adapter"]).type == "seq-cls"


def test_refuses_nan_kernel(llama_setup):
    tmp_path, _, model = llama_setup
    state = adapter_state(model)
    key = "model.layers.1.mlp.down_proj.bca_kernel"
    state[key][0, 0, 3] = float("nan")
    write_adapter_dir(tmp_path / "nan-adapter", bd.adapter_configs(model)["default"].to_dict(), state)
    with pytest.raises(AdapterMismatchError, match=f"tensor {key}: has NaN/Inf"):
        merge_checkpoint(tmp_path / "base", [(tmp_path / "nan-adapter", 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_refuses_overflowing_merged_weight(tmp_path):
    base = tiny_llama().half()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = bd.inject(copy.deepcopy(base), ["v_proj"], block_size=8, init="normal", seed=0)
    with torch.no_grad():
        for name, layer in bd.bca_layers(model):
            if name.startswith("model.layers.1."):
                layer.bca_kernels["default"].fill_(1e6)  # finite in fp32, overflows float16
    bd.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match=r"merged tensor model\.layers\.1\.self_attn\.v_proj\.weight .*NaN/Inf"):
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_a_shard_tensor_the_index_does_not_list_is_refused(tmp_path):
    """helper-67: transformers loads what model.safetensors.index.json lists; a tensor in a shard it does not list
    was merged and written, and the output loaded with that weight initialized at random (merge exited 0)."""
    from bca_deploy.errors import CheckpointFormatError

    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    index_path = tmp_path / "base" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    del index["weight_map"][key]
    index_path.write_text(json.dumps(index))
    bd.save_adapter(bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0), tmp_path / "adapter")
    with pytest.raises(CheckpointFormatError, match=rf"tensor {re.escape(key)}: in model-\d+-of-\d+\.safetensors, but "
                                                    r"model\.safetensors\.index\.json does not list it"):
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")


def test_a_config_transformers_cannot_build_is_the_checkpoints_error(tmp_path):
    """helper-67: a negative vocab_size, a size written as text, an unknown activation made export, evaluate and train
    exit 70 ("a bug in bca-deploy") with transformers' raw exception; now one error naming the directory."""
    from bca_deploy.errors import CheckpointFormatError
    from bca_deploy.models import load_base

    for name, change in [("vocab", {"vocab_size": -1}), ("hidden", {"hidden_size": "32"}),
                         ("act", {"hidden_act": "nonesuch"})]:
        directory = tmp_path / name
        tiny_bert().save_pretrained(directory)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointFormatError, match=r"transformers cannot build the model from its config\.json"):
            load_base(directory, "feature-extraction")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_failure_mid_write_leaves_no_partial_output(llama_setup, monkeypatch, existing):
    tmp_path, _, _ = llama_setup
    out = tmp_path / "out"
    if existing:
        out.mkdir()  # an earlier merge's output (a transformers checkpoint), which --overwrite replaces
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("previous")
    calls = {"n": 0}
    real_write = SafetensorsWriter.write_at

    def failing_write(self, name, start, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device (simulated)")
        return real_write(self, name, start, data)

    monkeypatch.setattr(SafetensorsWriter, "write_at", failing_write)
    with pytest.raises(OSError, match="simulated"):
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], out, overwrite=existing, progress=False)
    assert calls["n"] >= 5  # other worker threads may finish the block they hold after the failure
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert (out / "model.safetensors").read_text() == "previous"
    else:
        assert not out.exists()
    assert no_leftovers(tmp_path, "out")


def test_refuses_checkpoint_without_safetensors(tmp_path, llama_setup):
    tmp_path, _, _ = llama_setup
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(merge_mod.CheckpointFormatError, match="convert the checkpoint to safetensors"):
        merge_checkpoint(tmp_path / "pt", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)


# ---- the safetensors reader and writer ----------------------------------------------------------


def test_writer_output_reads_back_with_safe_open(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5),
        "b.bf16": torch.randn(7).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 3).half(),
        "d.i64": torch.arange(5),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
    }
    entries = [TensorInfo.new(name, t.dtype, t.shape) for name, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", entries, {"format": "pt"}) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    raw = (tmp_path / "x.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    header = read_safetensors_header(tmp_path / "x.safetensors")
    assert [t.name for t in header.tensors] == list(tensors)


def test_reader_accepts_safetensors_files_and_writer_enforces_order(tmp_path):
    tensors = {"z": torch.ones(4, dtype=torch.bfloat16), "a": torch.zeros(2, 3), "m": torch.arange(3, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    header = read_safetensors_header(tmp_path / "ref.safetensors")
    assert header.metadata == {"k": "v"}
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {
        "z": ("BF16", (4,)), "a": ("F32", (2, 3)), "m": ("I32", (3,))}
    with SafetensorsWriter(tmp_path / "o.safetensors", header.tensors, header.metadata) as writer:
        with pytest.raises(ValueError, match="out of order"):
            writer.write(header.tensors[1].name, b"")
        with pytest.raises(ValueError, match="bytes given"):
            writer.write(header.tensors[0].name, b"\x00")
        import os

        fd = os.open(tmp_path / "ref.safetensors", os.O_RDONLY)
        try:
            for t in header.tensors:
                writer.copy_range(t.name, fd, header.data_start + t.offset)
        finally:
            os.close(fd)
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())

    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "ref.safetensors").read_bytes()[:-2])
    with pytest.raises(merge_mod.CheckpointFormatError, match="truncated"):
        read_safetensors_header(tmp_path / "bad.safetensors")


# ---- a tied lm_head (Llama with tie_word_embeddings=True, an adapter on lm_head) -----------------------


def _tied_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tied_setup(tmp_path):
    """A tied Llama checkpoint, a PEFT C3A adapter on lm_head and q_proj, and PEFT's own forward (the reference)."""
    from peft import C3AConfig, get_peft_model

    base = _tied_llama()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(_tied_llama(), C3AConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "lm_head"],
                                                         block_size=8, init_weights="gaussian"))
    with torch.no_grad():  # kernels large enough that a wrong embedding shows
        for seed, (name, param) in enumerate(peft_model.named_parameters()):
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(seed))
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = peft_model.eval()(input_ids=ids).logits
    return tmp_path, ids, reference


def _close(got: torch.Tensor, reference: torch.Tensor) -> None:
    scale = reference.abs().max()
    assert float((got - reference).abs().max() / scale) < FP32_TOL, float((got - reference).abs().max() / scale)


def test_in_memory_merge_of_a_tied_lm_head_unties_it(tied_setup):
    root, ids, reference = tied_setup
    model = bd.load_adapter(_tied_llama(), root / "peft")
    embedding = model.model.embed_tokens.weight
    original = embedding.detach().clone()
    with torch.no_grad():
        _close(model(input_ids=ids).logits, reference)  # unmerged: PEFT's numbers
        merge(model)
        _close(model(input_ids=ids).logits, reference)
    assert torch.equal(model.model.embed_tokens.weight, original)  # the input embedding kept W
    assert model.lm_head.base_layer.weight is not embedding
    assert model.config.tie_word_embeddings is False
    unmerge(model)  # tied again, exactly
    assert model.lm_head.base_layer.weight is embedding and torch.equal(embedding, original)
    assert model.config.tie_word_embeddings is True
    with torch.no_grad():
        _close(model(input_ids=ids).logits, reference)


@pytest.mark.parametrize("how", ["merge_and_unload", "remove_adapters"])
def test_merge_and_unload_of_a_tied_lm_head_saves_and_reloads(tied_setup, how):
    root, ids, reference = tied_setup
    model = bd.load_adapter(_tied_llama(), root / "peft")
    plain = merge_and_unload(model) if how == "merge_and_unload" else bd.remove_adapters(model, merge=True)
    assert not list(bd.bca_layers(plain))
    with torch.no_grad():
        _close(plain(input_ids=ids).logits, reference)
    plain.save_pretrained(root / "plain")
    again = AutoModelForCausalLM.from_pretrained(root / "plain").eval()
    assert again.lm_head.weight is not again.model.embed_tokens.weight
    with torch.no_grad():
        _close(again(input_ids=ids).logits, reference)


def test_streaming_merge_of_a_tied_lm_head(tied_setup):
    root, ids, reference = tied_setup
    with safe_open(str(root / "base" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: transformers stores the embedding only
        embedding = f.get_tensor("model.embed_tokens.weight")
    out = merge_checkpoint(root / "base", [(root / "peft", 1.0)], root / "merged", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), embedding)
        head = f.get_tensor("lm_head.weight")
    # the same sum and rounding as the in-memory merge
    plain = merge_and_unload(bd.load_adapter(_tied_llama(), root / "peft"))
    assert torch.equal(head, plain.lm_head.weight)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        _close(merged(input_ids=ids).logits, reference)


# ---- a config.json that does not describe the checkpoint's weights --------------------------------------------------
# The base checkpoint is a real save_pretrained directory; only its config.json is edited afterwards. Before, the
# merge copied the edited config beside the weights: transformers then refused the output (a size mismatch) or, for a
# layer count, loaded it with a layer dropped or initialized at random. Now the merge refuses before writing anything.


def _set_config(**changes):
    def edit(directory: Path) -> None:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _llama_config(directory: Path) -> None:
    tiny_llama().config.to_json_file(directory / "config.json")  # another architecture's config


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# name -> (base model factory, sharded, adapter targets, config.json edit, what the refusal must say)
MISFIT_CONFIGS = {
    "bert-intermediate-size": (tiny_bert, False, ["query"], _set_config(intermediate_size=128), [
        "tensor encoder.layer.0.intermediate.dense.weight (model.safetensors): stored [64, 32], config.json gives "
        "[128, 32]", "tensor encoder.layer.1.output.dense.weight (model.safetensors): stored [32, 64], config.json "
        "gives [32, 128]"]),
    "bert-hidden-size": (tiny_bert, False, ["query"], _set_config(hidden_size=64), [
        "tensor encoder.layer.0.attention.self.query.weight (model.safetensors): stored [32, 32], config.json gives "
        "[64, 64]"]),
    "bert-vocab-size": (tiny_bert, False, ["query"], _set_config(vocab_size=200), [
        "tensor embeddings.word_embeddings.weight (model.safetensors): stored [100, 32], config.json gives [200, 32]"]),
    "bert-more-layers": (tiny_bert, False, ["query"], _set_config(num_hidden_layers=3), [
        "encoder.layer: config.json builds 3 entries", "no tensor of encoder.layer.2", "at random"]),
    # keys with the architecture's prefix (saved from BertForSequenceClassification: "bert.encoder...")
    "bert-prefixed-vocab-size": (lambda: tiny_bert(num_labels=2), False, ["query"], _set_config(vocab_size=200), [
        "tensor bert.embeddings.word_embeddings.weight (model.safetensors): stored [100, 32], config.json gives "
        "[200, 32]"]),
    "llama-sharded-intermediate-size": (tiny_llama, True, ["q_proj"], _set_config(intermediate_size=128), [
        "tensor model.layers.0.mlp.up_proj.weight (model-0000", "stored [64, 32], config.json gives [128, 32]"]),
    # saved tied (no lm_head.weight stored), config edited to untie: transformers would make up an lm_head
    "llama-untied-config-tied-weights": (lambda: _tied_llama(), False, ["q_proj"],
                                         _set_config(tie_word_embeddings=False), [
        "lm_head.weight: config.json gives it a weight of its own (tie_word_embeddings false), the checkpoint stores "
        "none: it was saved tied to model.embed_tokens.weight"]),
    "bert-weights-llama-config": (tiny_bert, False, ["query"], _llama_config, [
        "none of the checkpoint's 39 tensors", "model_type 'llama', built as LlamaModel"]),
}


@pytest.mark.parametrize("name", sorted(MISFIT_CONFIGS))
def test_refuses_config_that_does_not_describe_the_weights(name, tmp_path):
    from click.testing import CliRunner

    from bca_deploy.cli import main
    from bca_deploy.errors import CheckpointFormatError

    factory, sharded, targets, edit, needles = MISFIT_CONFIGS[name]
    base = factory()
    save_base(base, tmp_path / "base", sharded)
    bd.save_adapter(bd.inject(copy.deepcopy(base), targets, block_size=8, init="normal", seed=0), tmp_path / "adapter")
    edit(tmp_path / "base")
    inputs = {d: _files(d) for d in (tmp_path / "base", tmp_path / "adapter")}
    with pytest.raises(CheckpointFormatError) as refused:
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    message = str(refused.value)
    assert f"its weights do not fit its config.json ({tmp_path / 'base' / 'config.json'}" in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")

    result = CliRunner().invoke(main, ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                                       "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2 and "config.json" in result.output and needles[0] in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path, "out")
    assert {d: _files(d) for d in inputs} == inputs


def _expected_merge(base_state: dict[str, torch.Tensor], model, key_of) -> dict[str, torch.Tensor]:
    """W + ΔW per adapted weight, from the definition (torch.roll circulants, float64): checkpoint key -> value."""
    expected = {}
    for name, layer in bd.bca_layers(model):
        kernel = layer.bca_kernels["default"].detach().double()
        key = key_of(name)
        expected[key] = base_state[key].double() + circulant_reference(kernel) * layer.scalings["default"]
    return expected


@pytest.mark.parametrize("case", ["tied-llama", "bert-without-pooler", "prefixed-bert", "layer-past-the-config"])
def test_config_check_accepts_checkpoints_that_fit(case, tmp_path):
    """What the config check must not refuse: a tied lm_head stored as the embedding only (adapted: written as
    embedding + ΔW), a model with buffers and no pooler (saved with add_pooling_layer=False), keys carrying the
    architecture's prefix while the adapter has none, a layer stored past the config's num_hidden_layers (as
    checkpoints with multi-token-prediction layers store them; copied unchanged). Merged weights are checked
    against W + ΔW computed here."""
    from transformers import BertConfig, BertModel

    if case == "tied-llama":
        base = _tied_llama()
        model = bd.inject(_tied_llama(), ["q_proj", "lm_head"], block_size=8, init="normal", init_std=0.1, seed=3)
        state = {**base.state_dict(), "lm_head.weight": base.model.embed_tokens.weight}
        key_of = lambda name: f"{name}.weight"  # noqa: E731
    elif case == "bert-without-pooler":
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=64)
        base = BertModel(cfg, add_pooling_layer=False).eval()
        model = bd.inject(copy.deepcopy(base), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=3)
        state, key_of = base.state_dict(), lambda name: f"{name}.weight"
    elif case == "prefixed-bert":
        base = tiny_bert(num_labels=2)
        model = bd.inject(tiny_bert(), ["query", "value"], block_size=8, init="normal", init_std=0.1, seed=3)
        state, key_of = base.state_dict(), lambda name: f"bert.{name}.weight"
    else:
        base = tiny_bert()
        model = bd.inject(copy.deepcopy(base), ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention."
                                                "self.value"], block_size=8, init="normal", init_std=0.1, seed=3)
        state, key_of = base.state_dict(), lambda name: f"{name}.weight"
    base.save_pretrained(tmp_path / "base")
    if case == "layer-past-the-config":  # encoder.layer.1 stays stored, the config builds layer 0 only
        _set_config(num_hidden_layers=1)(tmp_path / "base")
    bd.save_adapter(model, tmp_path / "adapter")
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    expected = _expected_merge(state, model, key_of)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key, value in expected.items():
            torch.testing.assert_close(f.get_tensor(key).double(), value, rtol=0, atol=1e-6)
        for key in set(f.keys()) - set(expected):
            assert torch.equal(f.get_tensor(key), base.state_dict()[key]), key
    assert len(expected) == {"tied-llama": 3, "layer-past-the-config": 2}.get(case, 4)  # q_proj x 2 + lm_head; ...


def test_a_checkpoint_without_config_json_is_merged_with_a_warning(tmp_path):
    """helper-67: merge wrote weights with no config.json (exit 0, silently) that no AutoModel loads as they are; it
    still merges them (by shapes: tests/test_fit.py), and says so."""
    tiny_llama().save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "config.json").unlink()
    bd.save_adapter(bd.inject(tiny_llama(), ["q_proj"], block_size=8, init="normal", seed=0), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="no config.json, so the merged weights have none either"):
        merge_checkpoint(tmp_path / "base", [(tmp_path / "adapter", 1.0)], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "config.json").exists()
