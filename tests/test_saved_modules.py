"""Modules saved whole (``modules_to_save``, a classifier head) beside several adapters, against real PEFT.

PEFT keeps the original module and one copy per adapter that saves it, and runs the active adapter's copy, or the
original when the active adapter saves none or adapters are disabled. bca-deploy must compute the same: with
adapters disabled, with a headless adapter selected, after switching (saving each adapter's own head), and while
training one adapter then switching away and back.
"""

from __future__ import annotations

import pytest
import torch
from peft import C3AConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import bca_deploy as bd
from bca_deploy.merge import merge_and_unload
from conftest import model_output, tiny_bert

TARGETS = ["query", "value"]
HEAD = ["classifier.weight", "classifier.bias"]


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _differ(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a - b).abs().max()) > 0.1 * float(b.abs().max())  # the cases below are told apart


def _base() -> torch.nn.Module:
    """Tiny random BERT, the same weights every call; a head large enough that every case below shows."""
    model = tiny_bert(num_labels=3)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def peft_pair(tmp_path, input_ids):
    """PEFT's C3A model with adapter ``headed`` (non-zero kernels, its own trained classifier) and ``plain``
    (non-zero kernels, no saved module), saved; and PEFT's outputs for each adapter and with adapters disabled."""
    torch.manual_seed(11)
    model = get_peft_model(_base(), C3AConfig(block_size=8, target_modules=TARGETS, modules_to_save=["classifier"]),
                           adapter_name="headed")
    model.add_adapter("plain", C3AConfig(block_size=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 10.0)  # PEFT scales ΔW by 1/in_features: make the delta show
        for param in model.base_model.model.classifier.modules_to_save["headed"].parameters():
            param.normal_()
    model.eval()
    expected = {}
    with torch.no_grad():
        for name in ("headed", "plain"):
            model.set_adapter(name)
            expected[name] = model_output(model, input_ids)
        with model.disable_adapter():
            expected[None] = model_output(model, input_ids)
    model.save_pretrained(tmp_path / "peft")
    _differ(expected["headed"], expected[None])
    _differ(expected["plain"], expected[None])
    _differ(expected["plain"], expected["headed"])
    return {"headed": tmp_path / "peft" / "headed", "plain": tmp_path / "peft" / "plain"}, expected


def _load(dirs, order=("headed", "plain")):
    model = _base()
    for name in order:
        bd.load_adapter(model, dirs[name], adapter_name=name)
    return model


def _out(model, input_ids):
    with torch.no_grad():
        return model_output(model, input_ids)


def test_disabled_adapters_run_the_base_head_as_peft(peft_pair, input_ids):
    dirs, expected = peft_pair
    model = _load(dirs, order=("headed",))
    _close(_out(model, input_ids), expected["headed"])
    with bd.adapters_disabled(model):
        _close(_out(model, input_ids), expected[None])  # was: the base kernels with the adapter's head
    _close(_out(model, input_ids), expected["headed"])
    bd.disable_adapters(model)
    _close(_out(model, input_ids), expected[None])
    with bd.adapters_disabled(model):  # already disabled: still disabled after the block
        _close(_out(model, input_ids), expected[None])
    _close(_out(model, input_ids), expected[None])
    bd.enable_adapters(model)
    _close(_out(model, input_ids), expected["headed"])


@pytest.mark.parametrize("order", [("headed", "plain"), ("plain", "headed")])
def test_set_adapter_between_a_headed_and_a_headless_adapter_as_peft(peft_pair, input_ids, order):
    dirs, expected = peft_pair
    model = _load(dirs, order)
    for name in ("plain", "headed", "plain", "headed"):
        bd.set_adapter(model, name)
        _close(_out(model, input_ids), expected[name])  # plain was run with headed's head
        with bd.adapters_disabled(model):
            _close(_out(model, input_ids), expected[None])
        _close(_out(model, input_ids), expected[name])
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference: switching trains nothing


def test_an_adapter_loaded_while_adapters_are_disabled_waits_for_enable(peft_pair, input_ids):
    dirs, expected = peft_pair
    model = _load(dirs, order=("plain",))
    bd.disable_adapters(model)
    bd.load_adapter(model, dirs["headed"], adapter_name="headed")
    _close(_out(model, input_ids), expected[None])
    bd.set_adapter(model, "headed")
    _close(_out(model, input_ids), expected[None])
    bd.enable_adapters(model)
    _close(_out(model, input_ids), expected["headed"])


def test_a_failed_load_keeps_the_saved_modules_as_they_were(peft_pair, input_ids, monkeypatch):
    import bca_deploy.adapter_io as adapter_io

    dirs, expected = peft_pair
    model = _load(dirs, order=("plain",))

    def interrupted(model):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_io, "freeze_base", interrupted)
    with pytest.raises(KeyboardInterrupt):  # after the head was put in
        bd.load_adapter(model, dirs["headed"], adapter_name="headed")
    monkeypatch.undo()
    assert adapter_io.adapter_names(model) == ["plain"]
    _close(_out(model, input_ids), expected["plain"])
    bd.load_adapter(model, dirs["headed"], adapter_name="headed")
    for name in ("headed", "plain", "headed"):
        bd.set_adapter(model, name)
        _close(_out(model, input_ids), expected[name])
        with bd.adapters_disabled(model):
            _close(_out(model, input_ids), expected[None])


def test_each_adapter_saves_its_own_values_after_switching(peft_pair, input_ids, tmp_path):
    dirs, expected = peft_pair
    model = _load(dirs)
    states = [("plain", False), ("headed", True), ("plain", True), ("headed", False)]  # (active, disabled)
    for i, (active, disabled) in enumerate(states):
        bd.set_adapter(model, active)
        (bd.disable_adapters if disabled else bd.enable_adapters)(model)
        _close(_out(model, input_ids), expected[None if disabled else active])
        for name in ("headed", "plain"):
            out = bd.save_adapter(model, tmp_path / f"{i}-{name}", adapter_name=name)
            keys = set(load_file(out / "adapter_model.safetensors"))
            assert set(HEAD) <= keys if name == "headed" else not keys & set(HEAD)
            _close(_out(bd.load_adapter(_base(), out), input_ids), expected[name])
        # PEFT reads the headed adapter saved while another (or none) is in place, and computes its own output
        out = bd.save_adapter(model, tmp_path / f"{i}-peft", adapter_name="headed", format="peft")
        _close(_out(PeftModel.from_pretrained(_base(), out).eval(), input_ids), expected["headed"])


def test_remove_adapters_puts_the_base_head_back_and_merging_keeps_the_active_one(peft_pair, input_ids):
    dirs, expected = peft_pair
    model = _load(dirs)
    bd.set_adapter(model, "headed")
    # the documented bca-deploy meaning: the base model back (PEFT's unload() keeps the active adapter's copy)
    _close(_out(bd.remove_adapters(model), input_ids), expected[None])
    assert not list(bd.bca_layers(model)) and "bca_saved_modules" not in model.__dict__
    for active in ("headed", "plain"):
        model = _load(dirs)
        bd.set_adapter(model, active)
        peft = PeftModel.from_pretrained(_base(), dirs["headed"], adapter_name="headed")
        peft.load_adapter(dirs["plain"], adapter_name="plain")
        peft.set_adapter(active)
        _close(_out(merge_and_unload(model), input_ids), _out(peft.merge_and_unload().eval(), input_ids))
        _close(_out(model, input_ids), expected[active])


def test_mixed_batches_run_the_head_of_their_one_adapter(peft_pair, input_ids):
    dirs, expected = peft_pair
    model = _load(dirs)
    bd.set_adapter(model, "plain")
    for rows, name in ((["headed", "headed"], "headed"), (["plain", "plain"], "plain"), ([None, None], None)):
        with bd.mixed_adapters(model, rows):
            _close(_out(model, input_ids), expected[name])
    with pytest.raises(ValueError, match="classifier"), bd.mixed_adapters(model, ["headed", "plain"]):
        pass
    with bd.mixed_adapters(model, ["plain", None]):  # headless rows share the base head
        got = _out(model, input_ids)
    _close(got[:1], expected["plain"][:1])
    _close(got[1:], expected[None][1:])
    _close(_out(model, input_ids), expected["plain"])  # put back after each block


def test_training_one_adapter_then_switching_keeps_and_saves_its_trained_head(input_ids, tmp_path):
    model = bd.inject(_base(), TARGETS, block_size=8, init="normal", init_std=0.5, seed=0, adapter_name="headed",
                      modules_to_save=["classifier"])
    bd.inject(model, TARGETS, block_size=8, init="normal", init_std=0.5, seed=1, adapter_name="plain")
    head_size = sum(p.numel() for p in model.classifier.parameters())
    base_head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    labels = torch.tensor([0, 2])
    assert not model.training  # tiny_bert is in eval mode: no dropout, the steps are deterministic

    def train(steps: int) -> None:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(input_ids=input_ids).logits, labels).backward()
            optimizer.step()

    bd.set_adapter(model, "headed")
    assert bd.trainable_parameters(model)[1] == head_size
    train(3)
    trained = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    assert not torch.equal(trained["weight"], base_head["weight"])

    bd.set_adapter(model, "plain")  # PEFT: the base head, frozen
    assert bd.trainable_parameters(model)[1] == 0
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, base_head[k])
    train(2)  # the plain adapter's kernels only

    with bd.adapters_disabled(model):
        for k, v in model.classifier.state_dict().items():
            assert torch.equal(v, base_head[k])
    bd.set_adapter(model, "headed")  # back: the trained head, trainable again
    assert bd.trainable_parameters(model)[1] == head_size
    for k, v in model.classifier.state_dict().items():
        assert torch.equal(v, trained[k])
    bd.set_adapter(model, "plain")
    saved = {name: bd.save_adapter(model, tmp_path / name, adapter_name=name, format="peft")
             for name in ("headed", "plain")}
    tensors = load_file(saved["headed"] / "adapter_model.safetensors")
    head_key = next(k for k in tensors if k.endswith("classifier.modules_to_save.headed.weight")
                    or k.endswith("classifier.weight"))
    assert torch.equal(tensors[head_key], trained["weight"])

    # PEFT, reading both saved adapters, computes what the model computes for each and with adapters disabled
    peft = PeftModel.from_pretrained(_base(), saved["headed"], adapter_name="headed")
    peft.load_adapter(saved["plain"], adapter_name="plain")
    peft.eval()
    for name in ("plain", "headed"):
        bd.set_adapter(model, name)
        peft.set_adapter(name)
        _close(_out(model, input_ids), _out(peft, input_ids))
    with bd.adapters_disabled(model), peft.disable_adapter():
        _close(_out(model, input_ids), _out(peft, input_ids))

    # one more step on the headed adapter, then away: it saves what it has now
    bd.set_adapter(model, "headed")
    train(1)
    now = model.classifier.weight.detach().clone()
    assert not torch.equal(now, trained["weight"])
    bd.set_adapter(model, "plain")
    out = bd.save_adapter(model, tmp_path / "headed-again", adapter_name="headed")
    assert torch.equal(load_file(out / "adapter_model.safetensors")["classifier.weight"], now)


@pytest.mark.parametrize("variant", ["as-saved", "seq-cls-without-list", "no-task-without-list"])
def test_a_head_is_a_copy_or_a_base_weight_as_peft_loads_it_and_stays_so_when_saved_again(input_ids, tmp_path,
                                                                                             variant):
    """PEFT wraps the modules of ``modules_to_save``, and for ``SEQ_CLS`` also ``classifier`` and ``score`` whatever
    the config lists, in a copy of their own (the base model's values with adapters disabled); any other tensor of
    the file it loads into the base model itself (a base weight: it stays with adapters disabled). A SEQ_CLS config
    without the list was read as a base weight (disabled: the adapter's head); one without a task type as a module
    saved whole, and every copy saved again lost the difference. Each variant, and its copies saved again in both
    formats, gives PEFT's numbers, active and disabled."""
    import json

    torch.manual_seed(11)
    model = get_peft_model(_base(), C3AConfig(task_type="SEQ_CLS", block_size=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 10.0)
        for param in model.base_model.model.classifier.modules_to_save["default"].parameters():
            param.normal_()
    model.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"]
    if variant != "as-saved":
        config.update(modules_to_save=None, task_type="SEQ_CLS" if variant.startswith("seq-cls") else None)
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    peft = PeftModel.from_pretrained(_base(), tmp_path / "peft").eval()
    active = _out(peft, input_ids)
    with peft.disable_adapter():
        disabled = _out(peft, input_ids)
    _differ(active, disabled)
    copy_kept = variant != "no-task-without-list"
    if copy_kept:  # disabled: the base model's head
        _close(disabled, _out(_base(), input_ids))
    else:  # the file's head went into the base model
        _differ(disabled, _out(_base(), input_ids))

    ours = bd.load_adapter(_base(), tmp_path / "peft")
    bd.save_adapter(ours, tmp_path / "bca")
    bd.save_adapter(ours, tmp_path / "again", format="peft")
    for directory in ("peft", "bca", "again"):
        loaded = bd.load_adapter(_base(), tmp_path / directory)
        _close(_out(loaded, input_ids), active)
        with bd.adapters_disabled(loaded):
            _close(_out(loaded, input_ids), disabled)
    again = PeftModel.from_pretrained(_base(), tmp_path / "again").eval()
    _close(_out(again, input_ids), active)
    with again.disable_adapter():
        _close(_out(again, input_ids), disabled)
    saved = set(load_file(tmp_path / "bca" / "adapter_model.safetensors"))
    assert ({"classifier.weight", "classifier.bias"} <= saved) == copy_kept
    assert ({"classifier.base_layer.weight", "classifier.base_layer.bias"} <= saved) == (not copy_kept)
