"""The unmerged BCA subgraph: frequency-domain constants, the exportable op, and the export context."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bca_deploy import BCALinear, block_circulant_matmul, inject, materialize
from bca_deploy.exporters import (
    FFT_MODES,
    bca_delta,
    exportable_adapters,
    frequency_kernels,
    frequency_shape,
    spectral_plan,
)
from bca_deploy.exporters.graph import _constants64, folded_kernels

#: block sizes covering every plan shape: odd, even, single-stage, two-stage with several factorizations
BLOCK_SIZES = [1, 2, 3, 4, 7, 8, 16, 48, 64, 100, 128, 256]


@pytest.mark.parametrize("fft", FFT_MODES)
@pytest.mark.parametrize("p", BLOCK_SIZES)
def test_frequency_domain_math_equals_the_op(p, fft):
    """bca_delta (the graph's ops in PyTorch) against the dense matrix; odd and even block counts both
    ways (the DFT variant pairs two real blocks per complex transform when the count is even)."""
    g = torch.Generator().manual_seed(p)
    for o, q in [(3, 2), (2, 3)]:
        w = torch.randn(o, q, p, generator=g, dtype=torch.float64)
        x = torch.randn(4, 5, q * p, generator=g)
        w_freq = frequency_kernels(w)
        assert tuple(w_freq.shape) == frequency_shape(p, q * p, o * p)
        got = bca_delta(x, w_freq, p, fft=fft)
        want = x.double() @ materialize(w).T
        torch.testing.assert_close(got.double(), want, atol=2e-5 * max(1.0, p / 16) ** 0.5, rtol=1e-5)
        assert got.shape == (4, 5, o * p) and got.dtype == torch.float32


def _slot_rows(x: torch.Tensor, p: int) -> torch.Tensor:
    """The spectral rows of the blocks x (n, p) from numpy-free first principles (torch.fft.fft), (R, n)."""
    spec = torch.fft.fft(x, dim=-1)
    rows = []
    for k, k2 in spectral_plan(p).slots:
        if k2 == -1:
            rows += [spec[:, k].real + spec[:, k].imag, spec[:, k].imag, spec[:, k].real]
        else:
            rows += [spec[:, k].real, spec[:, k2].real if k2 >= 0 else torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0])]
    return torch.stack(rows)


@pytest.mark.parametrize("p", BLOCK_SIZES)
def test_transform_constants_compute_the_slot_rows_and_invert_them(p):
    """The MatMul transforms (single- or two-stage) against torch.fft, both ways, in float64."""
    plan = spectral_plan(p)
    kept = sorted(k for slot in plan.slots for k in slot if k >= 0)
    assert kept == list(range(p // 2 + 1))  # every rfft bin exactly once
    consts = _constants64(p)
    x = torch.randn(7, p, dtype=torch.float64)
    if plan.two_stage:
        a, c = plan.outer, plan.inner
        assert a * c == p and a % 2 == 0 and c % 2 == 0
    if "fwd" in consts:  # single-stage plans, and the one-MatMul forward of small two-stage ones
        rows = consts["fwd"] @ x.T
    else:
        z = consts["fwd_outer"] @ x.T.reshape(a, -1)  # (A, C·n)
        rows = (consts["fwd_inner"] @ z.reshape(plan.groups, 2 * c, -1)).reshape(plan.rows, -1)
    torch.testing.assert_close(rows, _slot_rows(x, p), atol=1e-10, rtol=1e-10)
    # The inverse takes the product rows P of a mix. With the identity kernel (δ at t = 0, so W = 1 in
    # every bin) P is X times the identity's row weights, and the inverse must give x back.
    delta = torch.zeros(1, 1, p, dtype=torch.float64)
    delta[0, 0, 0] = 1.0
    prod = rows * frequency_kernels(delta)[0, :, 0, 0].double()[:, None]  # (R, n)
    if plan.two_stage:
        u = consts["inv_inner"] @ prod.reshape(plan.groups, 3 * plan.inner, -1)  # (A/2, 2C, n)
        back = (consts["inv_outer"] @ u.reshape(plan.outer, -1)).reshape(p, -1).T  # (n, p)
    else:
        back = prod.T @ consts["inv"]
    torch.testing.assert_close(back, x, atol=1e-10, rtol=1e-10)


class _Two(nn.Module):
    """A Linear and a transformers Conv1D, to be adapted."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(32, 48)
        self.conv = Conv1D(16, 48)  # (nf=16 outputs, nx=48 inputs)

    def forward(self, x):
        return self.conv(torch.tanh(self.lin(x)))


def _adapted() -> nn.Module:
    torch.manual_seed(0)
    model = _Two()
    inject(model, ["lin", "conv"], block_size=8, init="normal", init_std=0.1, seed=0)
    inject(model, ["lin"], block_size=8, scaling=0.5, init="normal", init_std=0.1, seed=1, adapter_name="same_p")
    inject(model, ["lin"], block_size=16, init="normal", init_std=0.1, seed=2, adapter_name="other_p")
    return model.eval()


def _export(model, path, fft, opset=20, example=None):
    example = torch.randn(2, 3, 32) if example is None else example
    with exportable_adapters(model, fft):
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}}, opset_version=opset, dynamo=False)


@pytest.mark.parametrize("fft", FFT_MODES)
def test_torch_onnx_export_of_custom_module(tmp_path, fft):
    model = _adapted()
    path = tmp_path / f"m_{fft}.onnx"
    _export(model, path, fft)
    graph = onnx.load(str(path)).graph
    names = {i.name for i in graph.initializer}
    # same-p adapters fold into one constant; another p gets its own subgraph
    assert {n for n in names if "bca_freq" in n} == {"lin.bca_freq_p8", "lin.bca_freq_p16", "conv.bca_freq_p8"}
    assert not any("bca_kernels" in n for n in names)
    assert ("DFT" in {n.op_type for n in graph.node}) == (fft == "dft")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 32), (2, 3, 32), (3, 17, 32)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fft", FFT_MODES)
@pytest.mark.parametrize(("d_in", "d_out", "p"), [(64, 128, 64), (192, 64, 64), (100, 300, 100), (24, 40, 8)])
def test_every_plan_exports_exactly(tmp_path, fft, d_in, d_out, p):
    """Two-stage plans (p = 64: A = 16, C = 4; p = 100: A = 10, C = 10), a single-stage one, and block
    counts q, o odd and even (paired and unpaired DFTs), under onnxruntime against PyTorch."""
    torch.manual_seed(p)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, d_in))
    inject(model, ["0", "2"], block_size=p, init="normal", init_std=0.1, seed=0)
    path = tmp_path / "m.onnx"
    _export(model.eval(), path, fft, example=torch.randn(2, 3, d_in))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # onnxruntime's DFT for lengths that are not powers of 2 sums with float32 angles (error ~4e-5 at
    # p = 100): the export tolerance (fp32: 1e-4) there, tighter elsewhere.
    atol = 1e-4 if fft == "dft" and p & (p - 1) else 2e-5
    for shape in [(1, 1, d_in), (3, 7, d_in)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, atol=atol, rtol=0)


def test_paired_dft_halves_the_transforms(tmp_path):
    """With an even number of blocks two real blocks share one complex DFT (onesided=0, half the batch);
    with an odd number each block gets a one-sided real DFT."""
    model = nn.Sequential(nn.Linear(32, 24))  # p = 8: q = 4 (even) in, o = 3 (odd) out
    inject(model, ["0"], block_size=8, init="normal", init_std=0.1, seed=0)
    _export(model.eval(), tmp_path / "m.onnx", "dft", example=torch.randn(2, 3, 32))
    dfts = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "DFT"]
    onesided = sorted(next(a.i for a in n.attribute if a.name == "onesided") for n in dfts)
    inverse = sorted(next(a.i for a in n.attribute if a.name == "inverse") for n in dfts)
    assert onesided == [0, 1] and inverse == [0, 1]
    forward = next(n for n in dfts if next(a.i for a in n.attribute if a.name == "inverse") == 0)
    assert next(a.i for a in forward.attribute if a.name == "onesided") == 0  # the paired one is the forward


@pytest.mark.parametrize("p", [64, 128, 256])
def test_two_stage_plans_copy_only_the_output(tmp_path, p):
    """After onnxruntime's optimizer a two-stage plan copies one activation, by a 2-D transpose: the output's.
    The forward reads its input in place: at p = 64 one MatMul reading xᵀ through the GEMM's packing (a
    FusedMatMul with transB); above, the two-stage forward's second stage reads the permuted first-stage result
    the same way (a FusedMatMul with transB and transBatchB) instead of transposing the input first."""
    model = nn.Sequential(nn.Linear(2 * p, 2 * p))
    inject(model, ["0"], block_size=p, init="normal", seed=0)
    assert spectral_plan(p).two_stage
    _export(model.eval(), tmp_path / "m.onnx", "matmul", example=torch.randn(2, 3, 2 * p))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    transposes = [n for n in nodes if n.op_type == "Transpose"]
    assert [list(next(a.ints for a in n.attribute if a.name == "perm")) for n in transposes] == [[1, 0]]
    fused = [n for n in nodes if n.op_type == "FusedMatMul"]
    assert len(fused) == 1
    flags = {a.name: a.i for a in fused[0].attribute if a.name.startswith("trans")}
    assert flags.get("transB") == 1 and flags.get("transBatchB", 0) == (p > 64), flags


def test_matmul_variant_has_no_activation_transpose_after_ort_optimization(tmp_path):
    """Single-stage plan: onnxruntime folds the two 2-D transposes into its GEMMs (FusedMatMul transB, Gemm transA)."""
    model = nn.Sequential(nn.Linear(64, 64))
    inject(model, ["0"], block_size=16, init="normal", seed=0)
    _export(model.eval(), tmp_path / "m.onnx", "matmul", example=torch.randn(2, 3, 64))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "Transpose" not in ops
    assert ops.count("FusedMatMul") == 1 and ops.count("Gemm") == 1  # rfft; irfft + residual add


class _Shared(nn.Module):
    """Three projections of one input, like q/k/v."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 32)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


@pytest.mark.parametrize("fft", FFT_MODES)
def test_layers_reading_one_input_share_its_forward_transform(tmp_path, fft):
    model = _Shared()
    inject(model, ["q", "k", "v"], block_size=8, block_size_pattern={"v": 16}, init="normal", init_std=0.1, seed=0)
    _export(model.eval(), tmp_path / "s.onnx", fft)
    graph = onnx.load(str(tmp_path / "s.onnx")).graph
    ops = [n.op_type for n in graph.node]
    if fft == "dft":
        assert ops.count("DFT") == 2 + 3  # one rfft per block size (8: q and k; 16: v), one irfft per layer
    else:
        forward = [n for n in graph.node if any(re.search(r"\.bca_dft_p\d+_fwd(_outer)?$", i) for i in n.input)]
        assert len(forward) == 2
    x = torch.randn(2, 3, 32)
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], model(x).numpy(), atol=1e-5, rtol=0)


def test_fp16_model_runs_bca_in_fp32_between_casts(tmp_path):
    model = _adapted().half()
    for _, layer in [("lin", model.lin), ("conv", model.conv)]:  # kernels stay fp32 (as the layer keeps them)
        for k in layer.bca_kernels.values():
            k.data = k.data.float()
    x = torch.randn(2, 5, 32).half()
    _export(model, tmp_path / "h.onnx", "matmul", example=x)
    graph = onnx.load(str(tmp_path / "h.onnx")).graph
    freq = [i for i in graph.initializer if "bca_freq" in i.name]
    assert freq and all(i.data_type == onnx.TensorProto.FLOAT for i in freq)
    session = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    assert got.dtype == np.float16
    with torch.no_grad():
        want = model.float()(x.float()).numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-2, rtol=2e-2)


def test_context_restores_the_model_and_skips_disabled_and_merged():
    model = _adapted()
    before = set(model.state_dict())
    x = torch.randn(2, 32)
    with torch.no_grad():
        want = model(x)
    model.conv.merge()
    with exportable_adapters(model, "matmul"):
        assert "conv.bca_freq_p8" not in model.state_dict()  # merged: the base weight carries it
        assert "lin.bca_freq_p8" in model.state_dict()
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    model.conv.unmerge()
    assert set(model.state_dict()) == before
    assert "forward" not in model.lin.__dict__
    model.lin.adapters_disabled = True
    assert folded_kernels(model.lin) == {}
    folded = folded_kernels(model.conv)
    torch.testing.assert_close(folded[8].float(), model.conv.bca_kernels["default"].detach())


def test_folded_kernels_sum_scaled_adapters_per_block_size():
    model = _adapted()
    lin: BCALinear = model.lin
    folded = folded_kernels(lin)
    assert sorted(folded) == [8, 16]
    want = lin.bca_kernels["default"].double() + 0.5 * lin.bca_kernels["same_p"].double()
    torch.testing.assert_close(folded[8], want.detach())
    x = torch.randn(3, 32)
    with torch.no_grad():
        total = block_circulant_matmul(x, folded[8].float()) + block_circulant_matmul(x, folded[16].float())
        torch.testing.assert_close(lin(x) - lin.base_layer(x), total, atol=1e-5, rtol=1e-5)
