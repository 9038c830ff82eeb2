"""Base weights in adapter-bank graphs: ``export --bank`` and ``MultiAdapterSession.register`` (the server's
``POST /v1/adapters``).

An adapter's base weights (``<module>.base_layer.<param>``: PEFT's ``save_embedding_layers``, an adapted
``lm_head``'s frozen weight, a resized vocabulary's embeddings) are the base model's own values as the adapter was
trained with them. Every row of a bank shares one base model, so a bank takes them only when they equal its own (they
then change nothing) and refuses any other value, naming the tensor. ``export --bank`` compares with the model in
memory; a served bank compares digests the export recorded (``bank.base_weights``); a bank exported before the
digests were recorded registers as bca-deploy did then.

Before: ``register`` refused every PEFT adapter targeting ``lm_head`` (PEFT always saves its base weight), and
``export --bank`` dropped base weights silently (a resized vocabulary's adapter gave slot logits 0.99 relative off
PEFT's while its validation, which dropped them too, passed). References: PEFT 0.21.2's own forward on the same base,
and digests computed here with ``hashlib`` over transformers' own parameters. Tiny random Llama (untied) and GPT-2
(tied ``lm_head``) built from configs; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import C3AConfig, get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exporters_helpers import graph_feeds  # noqa: E402

from bca_deploy.cli import main  # noqa: E402
from bca_deploy.errors import AdapterMismatchError
from bca_deploy.exporters.metadata import METADATA_FILE, read_export_metadata
from bca_deploy.serving.session import MultiAdapterSession

ort = pytest.importorskip("onnxruntime")

VOCAB, RESIZED = 96, 104
IDS = torch.tensor([[1, 5, 60, 93, 7, 40], [3, 90, 2, 9, 12, 44]])  # tokens of the unresized vocabulary
P = "base_model.model."
RTOL = 1e-5  # fp32: summation order only


def _llama():
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                    tie_word_embeddings=False)


def _gpt2():
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)


# name: (class, config, C3A targets); lm_head is adapted, so PEFT saves its base weight (tied to wte in GPT-2)
MODELS = {"llama": ("LlamaForCausalLM", _llama, ["q_proj", "lm_head"]),
          "gpt2": ("GPT2LMHeadModel", _gpt2, ["lm_head"])}


def _load(base, arch, resize=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch).from_pretrained(base)
        if resize:  # as a user rebuilds a resized base: the new rows drawn again
            torch.manual_seed(5)
            model.resize_token_embeddings(RESIZED)
    return model.eval()


def _peft(base, arch, targets, out, resize=False, **save):
    """PEFT's model with drawn kernels (and, resized, the new rows as this run drew them), saved as PEFT saves it."""
    model = get_peft_model(_load(base, arch, resize), C3AConfig(block_size=8, task_type="CAUSAL_LM",
                                                              target_modules=targets))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c3a_kernel" in name:
                param.normal_(0.0, 2.0)
        if resize:
            head = model.get_output_embeddings()
            getattr(head, "base_layer", head).weight[VOCAB:] = torch.randn(RESIZED - VOCAB, 32)
            model.get_input_embeddings().weight[VOCAB:] = torch.randn(RESIZED - VOCAB, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out, **save)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _close(got, want, what):
    got = torch.as_tensor(np.asarray(got, dtype=np.float32))
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float((got - want).abs().max() / want.abs().max())
    assert err < RTOL, f"{what}: max relative error {err:.3g} against PEFT"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _feeds(session, slot: int | None = None) -> dict[str, np.ndarray]:
    return graph_feeds(session, IDS.numpy(), slot)


def _ort(directory):
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def _served(bank, name):
    """Logits of a served bank: row 0 with adapter ``name``, row 1 the base model."""
    session = MultiAdapterSession(bank, load_exported=False)
    session.register("live", name)
    return session.run(_feeds(_ort(bank)), ["live", None])["logits"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank_base_weights")
    out = {}
    for key, (arch, config, targets) in MODELS.items():
        torch.manual_seed(0)
        getattr(transformers, arch)(config()).save_pretrained(root / key / "base")
        peft = _peft(root / key / "base", arch, targets, root / key / "adapter")
        out[key] = dict(arch=arch, base=root / key / "base", adapter=root / key / "adapter", peft=_logits(peft),
                        plain=_logits(_load(root / key / "base", arch)), bank=root / key / "bank")
        result = _cli("export", "--model", root / key / "base", "--adapter", root / key / "adapter", "--bank",
                      "--out", root / key / "bank", "--cases", "1x5")
        out[key]["export"] = result
    llama = out["llama"]
    # trained on a resized vocabulary: lm_head adapted (PEFT saves its base weight) ...
    _peft(llama["base"], "LlamaForCausalLM", ["q_proj", "lm_head"], root / "resized-lm_head", resize=True)
    # ... and lm_head not adapted: only the embeddings are base weights
    _peft(llama["base"], "LlamaForCausalLM", ["q_proj"], root / "resized-embeddings", resize=True,
          save_embedding_layers=True)
    _load(llama["base"], "LlamaForCausalLM", resize=True).save_pretrained(root / "resized-base")
    out["resized"] = dict(lm_head=root / "resized-lm_head", embeddings=root / "resized-embeddings",
                          base=root / "resized-base", root=root)
    return out


@pytest.mark.parametrize("key", sorted(MODELS))
def test_a_bank_takes_base_weights_equal_to_its_own_at_export_and_registration(made, key):
    """PEFT saves ``lm_head.base_layer.weight`` whenever ``lm_head`` is adapted: on a base never resized it is the
    base model's own value, so the bank takes it. ``register`` refused it (the server's POST /v1/adapters too)."""
    case = made[key]
    assert case["export"].exit_code == 0, case["export"].output
    assert "lm_head.base_layer.weight" in load_file(case["adapter"] / "adapter_model.safetensors").keys() \
        or P + "lm_head.base_layer.weight" in load_file(case["adapter"] / "adapter_model.safetensors")
    slot = _ort(case["bank"]).run(["logits"], _feeds(_ort(case["bank"]), slot=1))[0]
    _close(slot, case["peft"], "export --bank, slot 1")
    got = _served(case["bank"], case["adapter"])
    _close(got[:1], case["peft"][:1], "registered live")
    _close(got[1:], case["plain"][1:], "a base row beside it")


@pytest.mark.parametrize("key", sorted(MODELS))
def test_the_export_records_digests_of_the_base_models_own_values(made, key):
    """``bank.base_weights``: sha256 of the embeddings' and the adapted modules' parameters, as the graph holds them
    (fp32 here), the embeddings marked; a tied Parameter under each of its names. Compared with hashlib over
    transformers' own weights."""
    from bca_deploy.exporters.bank import BaseDigest

    case = made[key]
    record = read_export_metadata(case["bank"]).bank.base_weights
    model = _load(case["base"], case["arch"])
    names = {"llama": ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                       "model.layers.1.self_attn.q_proj.weight"],
             "gpt2": ["lm_head.weight", "transformer.wte.weight"]}[key]
    assert sorted(record) == sorted(names)
    for name in names:
        own = model.get_parameter(name).detach()
        embedding = name in ("lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight")
        digest = hashlib.sha256(own.numpy().tobytes()).hexdigest()
        assert record[name] == BaseDigest("float32", tuple(own.shape), digest, embedding)
    size = len(json.dumps(json.loads((case["bank"] / METADATA_FILE).read_text())["bank"]["base_weights"]))
    assert size < 200 * len(names)  # digests, not values
    result = _cli("inspect", case["bank"])
    assert f"base values:  digests of {len(names)} parameters (2 of the embeddings); adapters' base weights must " \
        "equal them" in result.output.splitlines(), result.output


def test_export_bank_refuses_base_weights_other_than_the_models_and_writes_nothing(made):
    """An adapter trained on a resized vocabulary carries the rows that run drew; a base resized again has other rows.
    The bank (every row shares the base model) cannot take them: refused, naming each, before anything is written.
    Before, they were dropped: slot 1 was 0.99 relative off PEFT, and the validation (which dropped them too) passed."""
    resized = made["resized"]
    for adapter, tensors in ((resized["lm_head"], ["lm_head.base_layer.weight"]),  # PEFT saves the adapted one only
                             (resized["embeddings"], ["lm_head.base_layer.weight",
                                                      "model.embed_tokens.base_layer.weight"])):
        out = resized["root"] / f"bank-{adapter.name}"
        result = _cli("export", "--model", resized["base"], "--adapter", adapter, "--bank", "--out", out,
                      "--cases", "1x5")
        assert result.exit_code == 2, result.output
        for tensor in tensors:
            assert f"tensor {tensor}: the base model's own" in result.output, result.output
        assert "is not the bank graph's own value of lm_head.weight" in result.output
        assert "a resized vocabulary" in result.output and "not into a bank" in result.output
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    # the same adapter exported on its own (unmerged) gives PEFT's numbers: the refusal is about banks only
    peft = _peft(made["llama"]["base"], "LlamaForCausalLM", ["q_proj", "lm_head"], resized["root"] / "again",
                 resize=True)
    result = _cli("export", "--model", resized["base"], "--adapter", resized["root"] / "again", "--out",
                  resized["root"] / "alone", "--cases", "1x5")
    assert result.exit_code == 0, result.output
    _close(_ort(resized["root"] / "alone").run(["logits"], _feeds(_ort(resized["root"] / "alone")))[0],
           _logits(peft), "export (unmerged) of the resized adapter")


def test_register_refuses_base_weights_other_than_the_banks_and_nothing_changes(made, tmp_path):
    """On a bank exported from the base never resized: a resized vocabulary's embeddings (another shape), and an
    ``lm_head`` base weight one float step off the bank's own (same shape: only the digest tells), are refused,
    naming each tensor; the bank keeps serving as before."""
    case = made["llama"]
    session = MultiAdapterSession(case["bank"])
    before = session.adapters()
    with pytest.raises(AdapterMismatchError) as err:
        session.register("resized", made["resized"]["embeddings"])
    message = str(err.value)
    for tensor, shape in (("model.embed_tokens.base_layer.weight", "model.embed_tokens.weight is (96, 32)"),
                          ("lm_head.base_layer.weight", "lm_head.weight is (96, 32)")):
        assert f"tensor {tensor}: the base model's own" in message, message
        assert f"shape (104, 32), the bank graph's {shape}" in message, message
    nudged = tmp_path / "nudged"
    shutil.copytree(case["adapter"], nudged)
    state = load_file(nudged / "adapter_model.safetensors")
    weight = state[P + "lm_head.base_layer.weight"]
    weight[3, 7] = torch.nextafter(weight[3, 7], torch.tensor(np.inf))
    save_file(state, nudged / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"tensor lm_head\.base_layer\.weight: the base model's own "
                                                   r"lm_head\.weight the adapter was trained with; the bank graph "
                                                   r"cannot take it: it is not the bank graph's own value of "
                                                   r"lm_head\.weight"):
        session.register("nudged", nudged)
    assert session.adapters() == before
    got = session.run(_feeds(_ort(case["bank"])), [session.adapters()[0].name, None])["logits"]
    _close(got[:1], case["peft"][:1], "the exported adapter, after the refusals")


def test_a_bank_exported_before_the_digests_registers_as_bca_deploy_did(made, tmp_path):
    """An export without ``bank.base_weights`` cannot tell the base model's values: it takes base weights of modules
    it adapts at their layer's shape (the values left to the model, as bca-deploy did) and refuses the others,
    saying to re-export."""
    old = tmp_path / "old-bank"
    shutil.copytree(made["llama"]["bank"], old)
    data = json.loads((old / METADATA_FILE).read_text())
    data["bank"].pop("base_weights", None)
    (old / METADATA_FILE).write_text(json.dumps(data))
    assert getattr(read_export_metadata(old).bank, "base_weights", None) is None
    got = _served(old, made["llama"]["adapter"])
    _close(got[:1], made["llama"]["peft"][:1], "registered live on an old bank")
    assert "base values:  not recorded (an older bca-deploy's export)" in _cli("inspect", old).output
    session = MultiAdapterSession(old, load_exported=False)
    with pytest.raises(AdapterMismatchError, match=r"tensor model\.embed_tokens\.base_layer\.weight: .* exported "
                                                   r"before bca-deploy recorded the base model's values .* re-export"):
        session.register("resized", made["resized"]["embeddings"])


def test_an_lm_head_adapter_of_a_large_vocabulary_registers_its_base_weight_larger_than_its_kernels(tmp_path):
    """A real vocabulary's ``lm_head.base_layer.weight`` is far larger than the adapter's kernels: registration reads
    files up to the size of the base weights the bank can compare (embeddings, biases), not only its kernels', so
    the adapter registers with PEFT's numbers. Before, it was refused unread as larger than any adapter of the graph.
    200,000 tokens x 32: a 25.6 MB base weight beside 3.2 MB of kernels."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=200_000, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    peft = _peft(tmp_path / "base", "LlamaForCausalLM", ["lm_head"], tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 28_000_000
    result = _cli("export", "--model", tmp_path / "base", "--adapter", tmp_path / "adapter", "--bank", "--out",
                  tmp_path / "bank", "--cases", "1x3")
    assert result.exit_code == 0, result.output
    got = _served(tmp_path / "bank", tmp_path / "adapter")
    _close(got[:1], _logits(peft)[:1], "registered live")


def test_without_digests_only_an_adapted_layers_weight_at_its_shape_is_taken():
    """The rule for banks exported before the digests: what bca-deploy took then (PEFT's copy of an adapted layer's
    frozen weight, checked against the layer's shape), nothing else (a bias may be trained: bias='c3a_only')."""
    from types import SimpleNamespace

    from bca_deploy.exporters.bank import bank_base_matches

    layout = {"x": SimpleNamespace(module="lm_head", layer_type="linear", in_features=32, out_features=96)}
    matches = bank_base_matches(None, layout)
    assert matches("lm_head.weight", torch.zeros(96, 32)) is True
    assert "shape (104, 32), the bank graph's lm_head.weight is (96, 32)" in matches("lm_head.weight",
                                                                                      torch.zeros(104, 32))
    for name, shape in (("lm_head.bias", (96,)), ("model.embed_tokens.weight", (96, 32))):
        assert "re-export the bank" in matches(name, torch.zeros(shape))


def test_digests_are_taken_in_the_dtype_the_graph_holds(made):
    """An fp16 bank records fp16 digests: the adapter's fp32 value, cast, matches; a value fp16 tells apart does not."""
    from bca_deploy.exporters.bank import bank_base_matches, model_base_digests

    model = _load(made["llama"]["base"], "LlamaForCausalLM").half()
    digests = model_base_digests(model, ["model.layers.0.self_attn.q_proj"])
    assert digests["lm_head.weight"].dtype == "float16"
    matches = bank_base_matches(digests, {})
    own = _load(made["llama"]["base"], "LlamaForCausalLM").lm_head.weight.detach()  # fp32
    assert matches("lm_head.weight", own) is True
    other = own.clone()
    other[0, 0] += 0.01
    assert matches("lm_head.weight", other) is False
    assert "recorded no value of model.norm.weight" in matches("model.norm.weight", model.model.norm.weight.float())


def test_a_malformed_digest_record_is_refused_naming_the_field(made):
    from bca_deploy.exporters.bank import BankRecord

    data = json.loads((made["llama"]["bank"] / METADATA_FILE).read_text())["bank"]
    data["base_weights"]["lm_head.weight"]["sha256"] = "not hex"
    with pytest.raises(ValueError, match=r"bank\.base_weights\['lm_head\.weight'\]: expected .*64 hex digits"):
        BankRecord.from_dict(data)
    data["base_weights"] = [1]
    with pytest.raises(ValueError, match=r"bank\.base_weights must be an object"):
        BankRecord.from_dict(data)


@pytest.mark.parametrize("read", [True, False])
def test_inspect_names_an_adapters_base_weights(made, monkeypatch, read):
    """``inspect`` says which tensors are base weights, from the tensors read or, for a file too large to read, from
    its header's names (PEFT's names for the embeddings of a resized vocabulary included)."""
    if not read:
        monkeypatch.setattr("bca_deploy.adapter_io.INSPECT_MAX_BYTES", 0)
    for adapter, line in ((made["llama"]["adapter"], "base weights: lm_head.base_layer.weight (written into the "
                                                     "base model)"),
                          (made["resized"]["embeddings"], "base weights: lm_head.base_layer.weight, "
                                                          "model.embed_tokens.base_layer.weight (written into the base "
                                                          "model)")):
        result = _cli("inspect", adapter)
        assert result.exit_code == 0, result.output
        assert line in result.output.splitlines(), result.output


def test_a_resized_vocabulary_adapter_banks_on_the_base_it_was_trained_on(made):
    """The refusal's remedy, as it says: on a base resized as the user resized it for training (its new rows drawn
    again), ``merge --weight 0`` writes the base the adapter was trained on (the adapter's base weights, its resized
    embeddings, replace the checkpoint's; no ΔW), and a bank exported on that base takes the adapter, with PEFT's
    numbers, and serves its base rows as that base model."""
    resized = made["resized"]
    root = resized["root"]
    peft = _peft(made["llama"]["base"], "LlamaForCausalLM", ["q_proj", "lm_head"], root / "trained", resize=True)
    result = _cli("export", "--model", resized["base"], "--adapter", root / "trained", "--bank", "--out",
                  root / "refused", "--cases", "1x5")
    assert result.exit_code == 2 and "merge --model" in result.output and "--weight 0" in result.output, result.output
    result = _cli("merge", "--model", resized["base"], "--adapter", root / "trained", "--weight", "0",
                  "--out", root / "trained-base")
    assert result.exit_code == 0, result.output
    base = _load(root / "trained-base", "LlamaForCausalLM")
    assert base.get_input_embeddings().weight.shape[0] == RESIZED
    result = _cli("export", "--model", root / "trained-base", "--adapter", root / "trained", "--bank", "--out",
                  root / "trained-bank", "--cases", "1x5")
    assert result.exit_code == 0, result.output
    got = _served(root / "trained-bank", root / "trained")
    _close(got[:1], _logits(peft)[:1], "the resized adapter in a bank on its own base")
    _close(got[1:], _logits(base)[1:], "a base row beside it")
