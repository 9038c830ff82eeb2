"""The streaming merge's write path: positional safetensors writes, the worker threads, the block math.

Checkpoints and adapters are built here directly as files (no model), so shapes, dtypes, block sizes and
the number of worker threads can be varied freely; every merged tensor is compared bit for bit with the
dense reference ``round(W.float() + Σ dense_delta)`` (``dense_delta`` gathers with ``materialize``,
independently of the strided views the streaming path adds).
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch
from safetensors import safe_open

import bca_deploy.merge as merge_mod
from bca_deploy.adapter_io import write_adapter_dir
from bca_deploy.config import KERNEL_SUFFIX, AdapterConfig, ModuleSpec
from bca_deploy.errors import AdapterMismatchError
from bca_deploy.merge import SafetensorsWriter, TensorInfo, dense_delta, merge_checkpoint, read_safetensors_header

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def write_checkpoint(directory, tensors: dict[str, torch.Tensor], model_type: str = "bca-writer-test") -> None:
    """A checkpoint of the given tensors; its model type is unknown to transformers, so the merge matches
    adapters to tensors by name and shape alone."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    entries = [TensorInfo.new(name, t.dtype, t.shape) for name, t in tensors.items()]
    with SafetensorsWriter(directory / "model.safetensors", entries, {"format": "pt"}) as writer:
        for name, t in tensors.items():
            writer.write(name, t)


def write_adapter(directory, modules: dict[str, tuple[ModuleSpec, torch.Tensor]]) -> None:
    config = AdapterConfig(
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        block_size=next(iter(modules.values()))[0].block_size,
        init="normal",
        modules={m: spec for m, (spec, _) in modules.items()},
        base_model_type="bca-writer-test",
    )
    write_adapter_dir(directory, config.to_dict(), {m + KERNEL_SUFFIX: k for m, (_, k) in modules.items()})


def read_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---- SafetensorsWriter: positional writes ---------------------------------------------------------


def test_positional_writes_from_threads_in_any_order_read_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(64, 48, generator=gen).to(torch.bfloat16),
        "b": torch.randn(5, generator=gen),
        "empty": torch.zeros(0, 3),
        "c": torch.randint(0, 100, (33, 7), generator=gen, dtype=torch.int64),
    }
    entries = [TensorInfo.new(n, t.dtype, t.shape) for n, t in tensors.items()]
    pieces = []  # (name, start, bytes): every tensor cut into uneven pieces
    for name, t in tensors.items():
        raw = bytes(t.contiguous().view(torch.uint8).reshape(-1).numpy()) if t.numel() else b""
        cuts = sorted({0, len(raw), *random.Random(name).sample(range(len(raw) + 1), min(4, len(raw) + 1))})
        pieces += [(name, lo, raw[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    random.Random(1).shuffle(pieces)

    writer = SafetensorsWriter(tmp_path / "x.safetensors", entries, {"format": "pt"})
    threads = [threading.Thread(target=lambda part: [writer.write_at(*piece) for piece in part], args=(pieces[k::3],))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert [t.name for t in read_safetensors_header(tmp_path / "x.safetensors").tensors] == list(tensors)  # file order
    back = read_all(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name


def test_copy_at_copies_byte_ranges_from_another_file(tmp_path):
    source = tmp_path / "src.bin"
    payload = bytes(range(256)) * 40
    source.write_bytes(b"junk" + payload)
    entries = [TensorInfo.new("w", "U8", (len(payload),))]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", entries)
    with open(source, "rb") as f:
        writer.copy_at("w", 4000, f.fileno(), 4 + 4000, len(payload) - 4000)
        writer.copy_at("w", 0, f.fileno(), 4, 4000)
    writer.close()
    assert bytes(read_all(tmp_path / "x.safetensors")["w"].numpy()) == payload


def test_writer_refuses_bad_ranges_names_and_incomplete_files(tmp_path):
    entries = [TensorInfo.new("a", "F32", (4,)), TensorInfo.new("b", "F32", (2,))]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match=r"tensor a: bytes \[12, 20\) given, the header says 16 bytes"):
        writer.write_at("a", 12, b"\0" * 8)
    with pytest.raises(ValueError, match="no tensor z"):
        writer.write_at("z", 0, b"\0" * 4)
    writer.write_at("a", 0, b"\0" * 16)
    writer.write_at("b", 0, b"\0" * 4)  # half of b
    with pytest.raises(ValueError, match=r"1 tensor\(s\) not written exactly once: b \(4 of 8 bytes\)"):
        writer.close()

    writer = SafetensorsWriter(tmp_path / "y.safetensors", entries)
    writer.write_at("a", 0, b"\0" * 16)
    writer.write_at("a", 0, b"\0" * 16)  # twice
    writer.write_at("b", 0, b"\0" * 8)
    with pytest.raises(ValueError, match=r"a \(32 of 16 bytes\)"):
        writer.close()


# ---- streaming merge: workers, block sizes, dtypes ----------------------------------------------


def _specs(gen):
    """Two adapters: different block sizes (lcm 12), one Conv1D-style module, weights and scalings."""
    a = {
        "model.q_proj": (ModuleSpec(block_size=4, scaling=0.5, in_features=48, out_features=24), None),
        "model.down_proj": (ModuleSpec(block_size=4, scaling=1.0, in_features=24, out_features=48), None),
        "model.c_attn": (ModuleSpec(block_size=4, scaling=1.0, in_features=24, out_features=36, layer_type="conv1d"), None),
    }
    b = {"model.q_proj": (ModuleSpec(block_size=6, scaling=2.0, in_features=48, out_features=24), None)}
    for group in (a, b):
        for m, (spec, _) in group.items():
            group[m] = (spec, torch.randn(spec.kernel_shape, generator=gen) * 0.1)
    return a, b


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_merge_is_bit_identical_to_dense_reference(tmp_path, monkeypatch, dtype, workers):
    monkeypatch.setattr(merge_mod, "_WORKERS", workers)
    if workers == 1:  # work items of whole block-rows (12 | 576 / 48 ...), each merged in one chunk
        monkeypatch.setattr(merge_mod, "_BLOCK_ELEMENTS", 576)
    else:  # many small items and chunks of 1-2 rows: block-rows of p = 4 and 6 split between them
        monkeypatch.setattr(merge_mod, "_BLOCK_ELEMENTS", 100)
        monkeypatch.setattr(merge_mod, "_CHUNK_ELEMENTS", 50)
    monkeypatch.setattr(merge_mod, "_COPY_CHUNK_BYTES", 24)  # untouched tensors in many pieces
    gen = torch.Generator().manual_seed(0)
    torch_dtype = DTYPES[dtype]
    base = {
        "model.embed.weight": torch.randn(10, 24, generator=gen).to(torch_dtype),
        "model.q_proj.weight": torch.randn(24, 48, generator=gen).to(torch_dtype),
        "model.norm.weight": torch.randn(24, generator=gen).to(torch_dtype),
        "model.down_proj.weight": torch.randn(48, 24, generator=gen).to(torch_dtype),
        "model.c_attn.weight": torch.randn(24, 36, generator=gen).to(torch_dtype),  # Conv1D: stored (in, out)
        "model.step": torch.arange(7),
    }
    write_checkpoint(tmp_path / "base", base)
    a, b = _specs(gen)
    write_adapter(tmp_path / "a", a)
    write_adapter(tmp_path / "b", b)
    weights = {"a": 0.7, "b": -1.3}
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "a", weights["a"]), (tmp_path / "b", weights["b"])],
                           tmp_path / "out", progress=False)
    assert [t.name for t in read_safetensors_header(out / "model.safetensors").tensors] == list(base)
    merged = read_all(out / "model.safetensors")

    for name, value in base.items():
        module = name.removesuffix(".weight")
        terms = [(spec, k, weights[n]) for n, group in (("a", a), ("b", b)) if module in group
                 for spec, k in [group[module]]]
        if not terms:
            assert torch.equal(merged[name], value), name
            continue
        expected = value.float()
        for spec, kernel, weight in terms:  # adapter by adapter, in fp32, as the in-memory merge does
            expected = expected + dense_delta(kernel, spec, weight)
        assert torch.equal(merged[name], expected.to(torch_dtype)), name


def test_merge_finds_non_finite_base_values_and_keeps_huge_finite_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(merge_mod, "_BLOCK_ELEMENTS", 64)
    spec = ModuleSpec(block_size=4, scaling=1.0, in_features=16, out_features=16)
    kernel = torch.full(spec.kernel_shape, 1e-3)
    write_adapter(tmp_path / "adapter", {"model.q_proj": (spec, kernel)})

    # Huge but finite values (their sum would overflow fp32): finite after the merge, so no error.
    huge = torch.full((16, 16), 3.0e38).to(torch.bfloat16)
    write_checkpoint(tmp_path / "huge", {"model.q_proj.weight": huge})
    out = merge_checkpoint(tmp_path / "huge", [(tmp_path / "adapter", 1.0)], tmp_path / "out-huge", progress=False)
    expected = (huge.float() + dense_delta(kernel, spec)).to(torch.bfloat16)
    assert torch.equal(read_all(out / "model.safetensors")["model.q_proj.weight"], expected)

    weight = torch.zeros(16, 16, dtype=torch.bfloat16)
    weight[13, 2] = float("nan")
    write_checkpoint(tmp_path / "nan", {"model.q_proj.weight": weight})
    with pytest.raises(AdapterMismatchError, match=r"merged tensor model\.q_proj\.weight .* NaN/Inf values in rows 12-15"):
        merge_checkpoint(tmp_path / "nan", [(tmp_path / "adapter", 1.0)], tmp_path / "out-nan", progress=False)
    assert not (tmp_path / "out-nan").exists()


@pytest.mark.parametrize("map_source", [True, False])
def test_mapped_and_read_rows_give_the_dense_reference_aligned_or_not(tmp_path, monkeypatch, map_source):
    """Adapted rows come from a mapping of the checkpoint where their bytes are aligned for their dtype, and
    are read into a buffer otherwise (here: after a 2-byte tensor, the F32 weight starts at byte 2, the BF16
    and F16 ones at even bytes) or when mapping is off; every path gives the dense reference bit for bit."""
    monkeypatch.setattr(merge_mod, "_MAP_SOURCE", map_source)
    monkeypatch.setattr(merge_mod, "_BLOCK_ELEMENTS", 100)
    calls = {"mapped": 0, "read": 0}
    real_map_rows = merge_mod._map_rows

    def counting_map_rows(*args):
        mapped = real_map_rows(*args)
        calls["read" if mapped is None else "mapped"] += 1
        return mapped

    monkeypatch.setattr(merge_mod, "_map_rows", counting_map_rows)
    gen = torch.Generator().manual_seed(3)
    base = {
        "model.flags": torch.tensor([1, 0], dtype=torch.uint8),  # 2 bytes: what follows is 2 bytes off 4
        "model.q_proj.weight": torch.randn(24, 48, generator=gen),  # F32 at data offset 2: not aligned
        "model.k_proj.weight": torch.randn(24, 48, generator=gen).to(torch.bfloat16),
        "model.v_proj.weight": torch.randn(24, 48, generator=gen).to(torch.float16),
    }
    write_checkpoint(tmp_path / "base", base)
    modules = {}
    for name in ("model.q_proj", "model.k_proj", "model.v_proj"):
        spec = ModuleSpec(block_size=4, scaling=0.5, in_features=48, out_features=24)
        modules[name] = (spec, torch.randn(spec.kernel_shape, generator=gen) * 0.1)
    write_adapter(tmp_path / "a", modules)
    out = merge_checkpoint(tmp_path / "base", [(tmp_path / "a", 1.5)], tmp_path / "out", progress=False)
    merged = read_all(out / "model.safetensors")
    assert torch.equal(merged["model.flags"], base["model.flags"])
    for module, (spec, kernel) in modules.items():
        value = base[module + ".weight"]
        expected = (value.float() + dense_delta(kernel, spec, 1.5)).to(value.dtype)
        assert torch.equal(merged[module + ".weight"], expected), module
    # 48 columns, <= 100 values per work item: 2-row items, 12 per weight.
    if map_source:
        assert calls == {"mapped": 24, "read": 12}  # BF16 and F16 mapped; F32, not aligned for 4 bytes, read
    else:
        assert calls == {"mapped": 0, "read": 36}


@pytest.mark.parametrize("fsync", [True, False])
def test_merge_fsyncs_its_output_unless_told_not_to_and_writes_the_same_bytes(tmp_path, monkeypatch, fsync):
    """``fsync=False`` (CLI ``--no-fsync``) skips every fsync of the output; the files are the same either way."""
    import os

    from click.testing import CliRunner

    import bca_deploy.atomic as atomic_mod
    from bca_deploy.cli import main

    gen = torch.Generator().manual_seed(3)
    base = {"model.q_proj.weight": torch.randn(24, 48, generator=gen), "model.norm.weight": torch.randn(24, generator=gen)}
    write_checkpoint(tmp_path / "base", base)
    a, _ = _specs(gen)
    write_adapter(tmp_path / "a", {"model.q_proj": a["model.q_proj"]})
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "out"),
            "--no-progress"]
    result = CliRunner().invoke(main, args + ([] if fsync else ["--no-fsync"]))
    assert result.exit_code == 0, result.output
    assert bool(synced) == fsync  # the files and directories of the output, then its parent
    reference = merge_checkpoint(tmp_path / "base", [(tmp_path / "a", 1.0)], tmp_path / "reference", progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name
    expected = base["model.q_proj.weight"] + dense_delta(a["model.q_proj"][1], a["model.q_proj"][0], 1.0)
    assert torch.equal(read_all(tmp_path / "out" / "model.safetensors")["model.q_proj.weight"], expected)
