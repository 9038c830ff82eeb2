"""The unmerged BCA subgraph: frequency-domain constants, the exportable op, and the export context."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bca_deploy import BCALinear, block_circulant_matmul, inject, materialize
from bca_deploy.exporters import FFT_MODES, bca_delta, dft_bases, exportable_adapters, frequency_kernels
from bca_deploy.exporters.graph import folded_kernels


@pytest.mark.parametrize("p", [1, 2, 3, 4, 7, 8, 16])
def test_frequency_domain_math_equals_the_op(p):
    g = torch.Generator().manual_seed(p)
    w = torch.randn(3, 2, p, generator=g, dtype=torch.float64)
    x = torch.randn(4, 5, 2 * p, generator=g)
    cf, ci = dft_bases(p)
    got = bca_delta(x, frequency_kernels(w), cf, ci)
    want = x.double() @ materialize(w).T
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert got.shape == (4, 5, 3 * p) and got.dtype == torch.float32


def test_bases_invert_each_other():
    for p in (5, 8):
        cf, ci = dft_bases(p)  # (2F, p) each
        x = torch.randn(7, p, dtype=torch.float64)
        spectrum = x @ cf.double().T  # (7, 2F): re then im
        f = p // 2 + 1
        torch.testing.assert_close(torch.complex(spectrum[:, :f], spectrum[:, f:]), torch.fft.rfft(x))
        torch.testing.assert_close(spectrum @ ci.double(), x, atol=1e-6, rtol=1e-6)


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


def test_matmul_variant_has_no_activation_transpose_after_ort_optimization(tmp_path):
    """onnxruntime folds the two 2-D transposes into its GEMMs (FusedMatMul transA/transB)."""
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
        forward = [n for n in graph.node if any(".bca_rdft_p" in i for i in n.input)]
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
