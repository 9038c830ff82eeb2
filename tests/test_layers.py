"""BCALinear on nn.Linear and transformers Conv1D against dense matrices."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from bca_deploy.errors import BlockSizeError
from bca_deploy.layers import BCALinear
from bca_deploy.ops import materialize


def dense_circulant(w: torch.Tensor) -> torch.Tensor:
    """ΔW by the definition block(i, j)[r, s] = w[i, j, (r - s) mod p], built with Python loops."""
    o, q, p = w.shape
    dense = torch.zeros(o * p, q * p, dtype=w.dtype)
    for i in range(o):
        for j in range(q):
            for r in range(p):
                for s in range(p):
                    dense[i * p + r, j * p + s] = w[i, j, (r - s) % p]
    return dense


def linear_layer(d_in=12, d_out=8, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Linear(d_in, d_out).to(dtype)


def conv1d_layer(d_in=12, d_out=8):
    torch.manual_seed(0)
    layer = Conv1D(d_out, d_in)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_equals_dense(kind):
    base = linear_layer() if kind == "linear" else conv1d_layer()
    layer = BCALinear(base, name="m")
    layer.add_adapter("a", block_size=4, scaling=0.5, init="normal", init_std=0.3,
                      generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, 12)
    w0 = base.weight.detach() if kind == "linear" else base.weight.detach().T  # (d_out, d_in)
    dense = w0 + 0.5 * dense_circulant(layer.bca_kernels["a"].detach())
    expected = x @ dense.T + base.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.delta_weight("a"),
                       (0.5 * materialize(layer.bca_kernels["a"].detach())).T if kind == "conv1d"
                       else 0.5 * materialize(layer.bca_kernels["a"].detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_is_bit_exact(dtype):
    base = linear_layer(dtype=dtype)
    original = base.weight.detach().clone()
    layer = BCALinear(base, name="m")
    layer.add_adapter("a", block_size=4, init="normal", init_std=0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 12, dtype=dtype)
    unmerged = layer(x)
    layer.merge()
    expected_weight = (original.float() + layer.delta_weight("a")).to(dtype)  # fp32 sum, one rounding
    assert torch.equal(base.weight, expected_weight)
    merged = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
    layer.unmerge()
    assert torch.equal(base.weight, original)
    assert torch.equal(layer(x), unmerged)


def test_disabled_while_merged_is_an_error():
    layer = BCALinear(linear_layer(), name="enc.q")
    layer.add_adapter("a", block_size=4, init="normal")
    layer.merge()
    layer.adapters_disabled = True
    with pytest.raises(RuntimeError, match="enc.q: adapters are disabled but \\['a'\\] are merged"):
        layer(torch.randn(2, 12))


def test_block_size_refused_with_module_name_and_choices():
    layer = BCALinear(linear_layer(12, 8), name="enc.q")
    with pytest.raises(BlockSizeError, match=r"block size 3 does not divide module enc.q \(in_features=12, "
                                             r"out_features=8\); valid block sizes for it: 1, 2, 4"):
        layer.add_adapter("a", block_size=3)


def test_delete_adapter():
    layer = BCALinear(linear_layer(), name="m")
    layer.add_adapter("a", block_size=4, init="normal")
    layer.delete_adapter("a")
    assert not layer.bca_kernels and not layer.active_adapters
    x = torch.randn(2, 12)
    assert torch.equal(layer(x), layer.base_layer(x))
