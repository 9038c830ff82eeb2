"""Mixed-adapter batches in PyTorch: ``mixed_adapters(model, names)`` routes row b through ``names[b]`` only.

Every check compares with an **independent dense reference**: a fresh copy of the base model (same
seed, same weights) whose adapted weights get ``W0 + Σ scaling·materialize(kernel)`` added by hand
(``materialize`` is the exact index-gather ground truth of :mod:`bca_deploy.ops`), so no reference
goes through the routing code, the FFT op, ``merge`` or ``dense_delta``. Three architectures (Llama,
BERT, GPT-2 with its transposed ``Conv1D``) each carry three adapters with different targets, block
sizes (one with a per-module ``block_size_pattern``) and scalings, with non-zero kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from bca_deploy import bca_layers, inject, materialize, set_adapter
from bca_deploy.inject import adapters_disabled, mixed_adapters
from bca_deploy.layers import BASE_ADAPTER
from bca_deploy.merge import merge, unmerge

ATOL = 1e-5
VOCAB = 100  # conftest's tiny models

# arch -> (factory, {adapter: (targets, block size, block_size_pattern, scaling, seed)})
ADAPTERS = {
    "llama": (tiny_llama, {
        "a": (["q_proj", "v_proj"], 8, {}, 1.0, 1),
        "b": (["q_proj", "gate_proj", "down_proj"], 4, {"down_proj": 8}, 1.0, 2),
        "c": (["k_proj", "o_proj", "up_proj"], 16, {}, 0.5, 3),
    }),
    "bert": (tiny_bert, {
        "a": (["query", "value"], 8, {}, 1.0, 1),
        "b": (["query", "intermediate.dense"], 4, {"intermediate.dense": 16}, 1.0, 2),
        "c": (["key", "output.dense"], 16, {}, 0.5, 3),
    }),
    "gpt2": (tiny_gpt2, {  # Conv1D: weights stored (in, out)
        "a": (["c_attn"], 8, {}, 1.0, 1),
        "b": (["c_fc", "c_proj"], 4, {"c_proj": 8}, 1.0, 2),
        "c": (["c_attn", "c_fc"], 16, {}, 0.5, 3),
    }),
}
ARCHS = sorted(ADAPTERS)


def adapted(arch: str):
    """A fresh tiny model carrying adapters a, b, c (non-zero kernels), all active."""
    factory, adapters = ADAPTERS[arch]
    model = factory()
    for name, (targets, p, pattern, scaling, seed) in adapters.items():
        inject(model, targets, block_size=p, block_size_pattern=pattern, scaling=scaling, init="normal",
               init_std=0.05, seed=seed, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """``models[arch]``: one adapted model per architecture (tests that change its state use a deepcopy)."""
    return {arch: adapted(arch) for arch in ARCHS}


def dense_reference(arch: str, model, names) -> torch.nn.Module:
    """A plain copy of the base model with ``Σ_{n in names} scaling_n · materialize(kernel_n)`` added."""
    factory, _ = ADAPTERS[arch]
    ref = factory()  # seeded: the same base weights as ``model``
    touched = 0
    with torch.no_grad():
        for path, layer in bca_layers(model):
            module = ref.get_submodule(path)
            assert torch.equal(module.weight, layer.base_layer.weight), f"{path}: base weights differ"
            for name in names:
                if name in layer.bca_kernels:
                    delta = materialize(layer.bca_kernels[name].detach().double()) * layer.scalings[name]
                    module.weight += (delta.T if layer.layer_type == "conv1d" else delta).float()
                    touched += 1
    assert touched or not names
    return ref.eval()


def output(model, ids, mask=None) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def references(models):
    """``references[arch][name]``: dense references, one per adapter (None: the base model)."""
    return {arch: {name: dense_reference(arch, models[arch], [] if name is None else [name])
                   for name in ("a", "b", "c", None)} for arch in ARCHS}


# ---- per-row parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_rows_equal_each_row_alone(arch, models, references):
    model = copy.deepcopy(models[arch])  # set_adapter below changes its state
    names = ["a", None, "b", "c", BASE_ADAPTER, "a", "c", "b"]
    ids = random_ids(len(names), 9, seed=11)
    with torch.no_grad():
        with mixed_adapters(model, names):
            mixed = output(model, ids)
        alone = {}
        for b, name in enumerate(names):
            key = None if name in (None, BASE_ADAPTER) else name
            want = output(references[arch][key], ids[b:b + 1])[0]
            torch.testing.assert_close(mixed[b], want, atol=ATOL, rtol=0,
                                       msg=lambda m, b=b, name=name: f"row {b} ({name}): {m}")
            # and the same row alone through the layer's normal (non-routing) path
            if key is None:
                with adapters_disabled(model):
                    alone[b] = output(model, ids[b:b + 1])[0]
            else:
                set_adapter(model, key)
                alone[b] = output(model, ids[b:b + 1])[0]
            torch.testing.assert_close(mixed[b], alone[b], atol=ATOL, rtol=0)
    # the adapters really change the outputs (so a routing mistake could not pass unnoticed)
    outs = {n: output(references[arch][n], ids[:1])[0] for n in ("a", "b", "c", None)}
    for x, out_x in outs.items():
        for y, out_y in outs.items():
            if x != y:
                assert (out_x - out_y).abs().max() > 1e-3, (x, y)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_choice_batches(arch, models, references):
    """A batch whose rows all use one adapter (the no-gather path) and an all-base batch."""
    model = models[arch]
    ids = random_ids(3, 6, seed=12)
    with torch.no_grad():
        for name in ("c", None):
            with mixed_adapters(model, [name] * 3):
                got = output(model, ids)
            torch.testing.assert_close(got, output(references[arch][name], ids), atol=ATOL, rtol=0)


def test_mixed_batch_with_padding_llama(models, references):
    """Left-padded rows of different lengths: each row's real positions equal the row alone, unpadded."""
    model = models["llama"]
    lengths, names = [7, 3, 5, 2], ["b", "a", None, "c"]
    ids = torch.zeros(4, 7, dtype=torch.long)
    mask = torch.zeros(4, 7, dtype=torch.long)
    rows = [random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    for b, row in enumerate(rows):
        ids[b, 7 - len(row):] = row
        mask[b, 7 - len(row):] = 1
    with torch.no_grad(), mixed_adapters(model, names):
        out = model(input_ids=ids, attention_mask=mask,
                    position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    with torch.no_grad():
        for b, (row, name) in enumerate(zip(rows, names)):
            want = output(references["llama"][name], row[None])[0]
            torch.testing.assert_close(out[b, 7 - len(row):], want, atol=ATOL, rtol=0)


# ---- several active adapters sum ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_two_active_adapters_sum(arch, models):
    model = copy.deepcopy(models[arch])
    ids = random_ids(3, 8, seed=13)
    pair = ["a", "c"] if arch == "gpt2" else ["a", "b"]  # two adapters sharing a layer (c_attn, q_proj, query)
    set_adapter(model, pair)
    with torch.no_grad():
        got = output(model, ids)
        want = output(dense_reference(arch, model, pair), ids)
        only_a = output(dense_reference(arch, model, ["a"]), ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - only_a).abs().max() > 1e-3


def test_two_adapters_on_one_layer_sum_not_chain():
    """One Linear, two adapters: y = W0 x + ΔW1 x + ΔW2 x (summed, not chained as ΔW2 (ΔW1 x))."""
    from bca_deploy.layers import BCALinear

    torch.manual_seed(0)
    layer = BCALinear(torch.nn.Linear(16, 16, bias=True), name="lin")
    gen = torch.Generator().manual_seed(0)
    layer.add_adapter("x", 4, scaling=1.0, init="normal", init_std=0.3, generator=gen)
    layer.add_adapter("y", 8, scaling=2.0, init="normal", init_std=0.3, generator=gen)
    x = torch.randn(5, 16, dtype=torch.float32)
    with torch.no_grad():
        w = (layer.base_layer.weight.double() + materialize(layer.bca_kernels["x"].double())
             + 2.0 * materialize(layer.bca_kernels["y"].double()))
        want = (x.double() @ w.T + layer.base_layer.bias.double()).float()
        got = layer(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ---- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_of_a_mixed_batch(arch, models):
    """Adapter X's kernel gradient from a mixed batch equals the gradient from X's rows alone."""
    model = copy.deepcopy(models[arch])
    names = ["a", "b", None, "a", "c", "b", "a"]
    ids = random_ids(len(names), 6, seed=14)
    weights = torch.randn(*output(model, ids).shape, generator=torch.Generator().manual_seed(15))

    def kernel_grads() -> dict[tuple[str, str], torch.Tensor]:
        return {(path, n): k.grad.clone() for path, layer in bca_layers(model)
                for n, k in layer.bca_kernels.items() if k.grad is not None}

    model.zero_grad(set_to_none=True)
    with mixed_adapters(model, names):
        (output(model, ids) * weights).sum().backward()
    mixed = kernel_grads()
    assert mixed and all(g.abs().max() > 0 for g in mixed.values())
    for adapter in ("a", "b", "c"):
        rows = [b for b, n in enumerate(names) if n == adapter]
        model.zero_grad(set_to_none=True)
        set_adapter(model, adapter)
        (output(model, ids[rows]) * weights[rows]).sum().backward()
        alone = kernel_grads()
        assert alone and {k for k in alone} == {k for k in mixed if k[1] == adapter}
        for key, grad in alone.items():
            torch.testing.assert_close(mixed[key], grad, atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_an_adapter_without_rows_gets_no_gradient(models):
    model = copy.deepcopy(models["bert"])
    model.zero_grad(set_to_none=True)
    ids = random_ids(2, 5, seed=16)
    with mixed_adapters(model, ["a", None]):
        output(model, ids).sum().backward()
    for _, layer in bca_layers(model):
        for n, k in layer.bca_kernels.items():
            if n != "a":
                assert k.grad is None or not k.grad.any()


# ---- generation -----------------------------------------------------------------------------------------


def _left_pad(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, length - len(p):] = p
        mask[b, length - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generate_mixed_equals_per_row(arch, models, references):
    model = models[arch]
    pad = 0
    names = ["a", None, "c", "b", "a"]
    prompts = [random_ids(1, n, seed=30 + i)[0] for i, n in enumerate([5, 3, 7, 2, 4])]
    ids, mask = _left_pad(prompts, pad)
    new = 8
    with torch.no_grad(), mixed_adapters(model, names):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=pad)
    with torch.no_grad():
        for b, (prompt, name) in enumerate(zip(prompts, names)):
            ref = references[arch][name]
            alone = ref.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new, do_sample=False, pad_token_id=pad)[0, len(prompt):].tolist()
            got = out[b, ids.shape[1]:].tolist()
            assert got[:len(alone)] == alone, f"row {b} ({name})"
    # the adapters lead to different continuations (so a mix-up would show)
    assert len({tuple(out[b, ids.shape[1]:].tolist()) for b in range(len(names))}) > 2


def test_sampled_generate_under_mixed_adapters_runs(models):
    model = models["llama"]
    ids = random_ids(3, 4, seed=40)
    torch.manual_seed(0)
    with torch.no_grad(), mixed_adapters(model, ["a", "b", None]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=True,
                             top_k=10, pad_token_id=0)
    assert out.shape[0] == 3


# ---- errors and state -----------------------------------------------------------------------------------


def test_unknown_adapter_lists_the_models_adapters(models):
    model = models["llama"]
    with pytest.raises(ValueError) as err, mixed_adapters(model, ["a", "nope", None]):
        pytest.fail("the block must not run")
    message = str(err.value)
    assert "nope" in message and all(f"'{n}'" in message for n in ("a", "b", "c"))
    assert all(layer.row_adapters is None for _, layer in bca_layers(model))


def test_empty_list_is_refused(models):
    with pytest.raises(ValueError, match="empty"), mixed_adapters(models["bert"], []):
        pass


def test_merged_adapter_is_refused_before_running(models):
    model = copy.deepcopy(models["llama"])
    merge(model, "a")
    with pytest.raises(ValueError, match="merged"), mixed_adapters(model, ["b", None]):
        pytest.fail("the block must not run")
    unmerge(model)
    with mixed_adapters(model, ["b", None]):
        pass


def test_batch_size_mismatch_names_the_batch(models):
    model = models["bert"]
    ids = random_ids(3, 5, seed=17)
    with pytest.raises(ValueError, match="batch") as err, torch.no_grad(), mixed_adapters(model, ["a", "b"]):
        output(model, ids)
    assert "2 rows" in str(err.value)
    assert all(layer.row_adapters is None for _, layer in bca_layers(model))


def test_beam_search_gives_a_clear_error(models):
    model = models["llama"]
    ids = random_ids(2, 4, seed=18)
    with pytest.raises(ValueError, match="beam search"), torch.no_grad(), mixed_adapters(model, ["a", "b"]):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, num_beams=2,
                       do_sample=False, pad_token_id=0)


def test_modules_to_save_adapter_cannot_be_mixed():
    model = tiny_bert(num_labels=3)
    inject(model, ["query"], block_size=8, init="normal", seed=0, adapter_name="head", modules_to_save=["classifier"])
    inject(model, ["value"], block_size=8, init="normal", seed=1, adapter_name="plain")
    with pytest.raises(ValueError, match="classifier"), mixed_adapters(model, ["head", "plain"]):
        pass
    with mixed_adapters(model, ["head", "head"]):  # alone in its batch: allowed
        pass


def _state(model):
    return [(path, list(layer.active_adapters), layer.adapters_disabled, layer.row_adapters)
            for path, layer in bca_layers(model)]


def test_state_restored_after_the_block_and_after_an_exception(models, references):
    model = copy.deepcopy(models["llama"])
    set_adapter(model, "b")
    before = _state(model)
    ids = random_ids(2, 5, seed=19)
    with torch.no_grad():
        with mixed_adapters(model, ["a", None]):
            assert all(layer.row_adapters is not None for _, layer in bca_layers(model))
            output(model, ids)
        assert _state(model) == before
        torch.testing.assert_close(output(model, ids), output(references["llama"]["b"], ids), atol=ATOL, rtol=0)
        with pytest.raises(RuntimeError, match="boom"), mixed_adapters(model, ["c", "a"]):
            raise RuntimeError("boom")
        assert _state(model) == before
        # a failure inside the forward (a batch of 2 for 1 name) restores the state too
        with pytest.raises(ValueError), mixed_adapters(model, ["c"]):
            output(model, ids)
        assert _state(model) == before
        torch.testing.assert_close(output(model, ids), output(references["llama"]["b"], ids), atol=ATOL, rtol=0)
        with adapters_disabled(model):  # mixed routing overrides a disabled state, then gives it back
            with mixed_adapters(model, ["c", "c"]):
                torch.testing.assert_close(output(model, ids), output(references["llama"]["c"], ids), atol=ATOL,
                                           rtol=0)
            torch.testing.assert_close(output(model, ids), output(references["llama"][None], ids), atol=ATOL, rtol=0)


def test_nested_blocks_restore_the_outer_choice(models, references):
    model = models["bert"]
    ids = random_ids(2, 5, seed=21)
    with torch.no_grad(), mixed_adapters(model, ["a", "b"]):
        with mixed_adapters(model, ["c", None]):
            inner = output(model, ids)
        outer = output(model, ids)
    torch.testing.assert_close(inner[0], output(references["bert"]["c"], ids[:1])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(outer[1], output(references["bert"]["b"], ids[1:])[0], atol=ATOL, rtol=0)
