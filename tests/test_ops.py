"""Tests for bca_deploy.ops: the block-circulant op, its backward, materialize and the layout flip.

References here are built independently of the code under test: dense matrices come from explicit
loops over blocks with ``torch.roll`` (the definition of a first-column circulant block), and gradients
of the reference come from autograd through that construction.
"""

from __future__ import annotations

import pytest
import torch

from bca_deploy import ops
from bca_deploy.ops import block_circulant_matmul, circulant_index, flip_circulant_layout, materialize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Relative tolerance (‖a - b‖ / ‖b‖) of the op against the float64 dense reference, by compute dtype.
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: on a shared 2-core machine OpenMP hand-offs cost more than the math.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_by_definition(w: torch.Tensor) -> torch.Tensor:
    """Dense (o·p, q·p) matrix of first-column kernels w (o, q, p), block by block from the definition.

    Column s of block (i, j) is its first column w[i, j] rotated down by s:
    block[r, s] = w[i, j, (r - s) mod p] = torch.roll(w[i, j], s)[r]. Differentiable in w.
    """
    o, q, p = w.shape
    rows = []
    for i in range(o):
        blocks = []
        for j in range(q):
            columns = [torch.roll(w[i, j], shifts=s, dims=0) for s in range(p)]
            blocks.append(torch.stack(columns, dim=1))  # (p, p): [r, s]
        rows.append(torch.cat(blocks, dim=1))  # (p, q·p)
    return torch.cat(rows, dim=0)  # (o·p, q·p)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reference(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    """y, grad_x, grad_w of y = x @ dense(w).T with upstream gradient g, in float64 by autograd."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = x64 @ dense_by_definition(w64).T
    y.backward(g.double())
    return y.detach(), x64.grad, w64.grad


def op_with_grads(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = block_circulant_matmul(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 16, 64])
@pytest.mark.parametrize("lead", [(3,), (2, 2)], ids=["N,d", "B,T,d"])
def test_gradcheck_float64(p, lead):
    o, q = 2, 3  # non-square: d_out = 2p, d_in = 3p
    x = randn(*lead, q * p, dtype=torch.float64, seed=1).requires_grad_()
    w = randn(o, q, p, dtype=torch.float64, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(block_circulant_matmul, (x, w))


@pytest.mark.parametrize("which", ["x", "w"])
def test_gradcheck_one_input(which):
    x = randn(4, 3 * 5, dtype=torch.float64, seed=1).requires_grad_(which == "x")
    w = randn(2, 3, 5, dtype=torch.float64, seed=2).requires_grad_(which == "w")
    assert torch.autograd.gradcheck(block_circulant_matmul, (x, w))


# ------------------------------------------------------------------------------ dense reference agreement

SHAPES = [
    # (leading dims, o, q, p)
    ((7,), 2, 3, 16),
    ((5,), 5, 3, 32),
    ((2, 3), 3, 2, 64),
    ((6,), 6, 9, 5),
    ((4,), 1, 1, 1),
    ((3, 2), 4, 2, 7),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,o,q,p", SHAPES)
def test_matches_dense_reference_fp32(device, lead, o, q, p):
    x = randn(*lead, q * p, seed=3, device=device)
    w = randn(o, q, p, seed=4, device=device)
    g = randn(*lead, o * p, seed=5, device=device)
    y, gx, gw = op_with_grads(x, w, g)
    y_ref, gx_ref, gw_ref = reference(x, w, g)
    assert y.dtype == gx.dtype == gw.dtype == torch.float32
    assert y.shape == (*lead, o * p) and gx.shape == x.shape and gw.shape == w.shape
    assert rel_err(y, y_ref) <= REL_TOL[torch.float32]
    assert rel_err(gx, gx_ref) <= REL_TOL[torch.float32]
    assert rel_err(gw, gw_ref) <= REL_TOL[torch.float32]


def test_matches_dense_reference_fp64():
    x, w, g = randn(5, 4 * 8, dtype=torch.float64), randn(3, 4, 8, dtype=torch.float64), randn(5, 24, dtype=torch.float64)
    for got, ref in zip(op_with_grads(x, w, g), reference(x, w, g)):
        assert got.dtype == torch.float64
        assert rel_err(got, ref) <= REL_TOL[torch.float64]


@pytest.mark.parametrize("chunk_bytes", [1, 5000])
def test_cpu_chunking_matches_single_chunk(monkeypatch, chunk_bytes):
    # The CPU path runs over the tokens in chunks; chunk sizes that leave a remainder must give the
    # same result as one chunk, in the forward and in both gradients.
    x, w, g = randn(37, 8 * 16, seed=6), randn(3, 8, 16, seed=7), randn(37, 3 * 16, seed=8)
    whole = op_with_grads(x, w, g)
    monkeypatch.setattr(ops, "_CPU_CHUNK_BYTES", chunk_bytes)
    assert ops._rows_per_chunk(37, ops._spectrum_bytes_per_row(8, 3, 16), torch.device("cpu")) < 37
    chunked = op_with_grads(x, w, g)
    for got, one_chunk, exact in zip(chunked, whole, reference(x, w, g)):
        assert rel_err(got, one_chunk) <= 1e-6  # only fp32 rounding differs (GEMM blocking)
        assert rel_err(got, exact) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("tiny_grid", [0, 100], ids=["batched-gemm", "broadcast"])
@pytest.mark.parametrize("lead,o,q,p", SHAPES)
def test_both_mixing_paths_match_the_dense_reference(monkeypatch, tiny_grid, lead, o, q, p):
    # Small block grids mix spectra by broadcasting, larger ones by one GEMM per frequency bin: force each
    # path on every shape (and a chunked run) and hold both to the same float64 dense reference.
    monkeypatch.setattr(ops, "_TINY_GRID", tiny_grid)
    x, w, g = randn(*lead, q * p, seed=3), randn(o, q, p, seed=4), randn(*lead, o * p, seed=5)
    exact = reference(x, w, g)
    for got, ref in zip(op_with_grads(x, w, g), exact):
        assert rel_err(got, ref) <= REL_TOL[torch.float32]
    monkeypatch.setattr(ops, "_CPU_CHUNK_BYTES", 1)  # one row per chunk
    for got, ref in zip(op_with_grads(x, w, g), exact):
        assert rel_err(got, ref) <= REL_TOL[torch.float32]
    x64 = randn(*lead, q * p, dtype=torch.float64, seed=1).requires_grad_()
    w64 = randn(o, q, p, dtype=torch.float64, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(block_circulant_matmul, (x64, w64))


def test_matches_materialize_and_noncontiguous_input():
    w = randn(3, 4, 8, seed=9)
    x = randn(4 * 8, 6, seed=10).T  # (6, 32), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(block_circulant_matmul(x, w), x @ materialize(w).T, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    x = torch.zeros(0, 12, requires_grad=True)
    w = randn(2, 3, 4).requires_grad_()
    y = block_circulant_matmul(x, w)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 12) and torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------------------------------------------------------- materialize and layouts


@pytest.mark.parametrize("o,q,p", [(2, 3, 1), (2, 3, 4), (3, 2, 5), (1, 1, 16)])
def test_materialize_is_exact(o, q, p):
    w = randn(o, q, p, seed=11)
    dense = materialize(w)
    assert dense.shape == (o * p, q * p) and dense.dtype == w.dtype
    assert torch.equal(dense, dense_by_definition(w))
    for i in range(o):  # entry by entry, from block(i, j)[r, s] = w[i, j, (r - s) mod p]
        for j in range(q):
            for r in range(p):
                for s in range(p):
                    assert dense[i * p + r, j * p + s].item() == w[i, j, (r - s) % p].item()


def test_circulant_index():
    idx = circulant_index(5)
    assert idx.dtype == torch.long and idx.shape == (5, 5)
    assert all(idx[r, s] == (r - s) % 5 for r in range(5) for s in range(5))


@pytest.mark.parametrize("p", [1, 2, 3, 4, 7, 16])
def test_flip_is_an_involution(p):
    k = randn(2, 3, p, seed=12)
    assert torch.equal(flip_circulant_layout(flip_circulant_layout(k)), k)


@pytest.mark.parametrize("o,q,p", [(2, 3, 1), (2, 3, 2), (3, 2, 3), (2, 2, 4), (1, 2, 5), (2, 1, 16)])
def test_flip_matches_peft_first_row_layout(o, q, p):
    from peft.tuners.c3a.utils import get_circulant_fast

    k = randn(o, q, p, dtype=torch.float64, seed=13)  # PEFT's first-row kernels
    peft_dense = get_circulant_fast(k)  # (o·p, q·p)
    torch.testing.assert_close(materialize(flip_circulant_layout(k)), peft_dense, rtol=0, atol=1e-12)
    # and the first-row definition itself: block[r, s] = k[(s - r) mod p]
    first_row = k[:, :, (-circulant_index(p)) % p].permute(0, 2, 1, 3).reshape(o * p, q * p)
    assert torch.equal(materialize(flip_circulant_layout(k)), first_row)


# ------------------------------------------------------------------------------------ dtypes and autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    x32, w, g32 = randn(6, 4 * 16, seed=14), randn(3, 4, 16, seed=15), randn(6, 3 * 16, seed=16)
    x, g = x32.to(dtype), g32.to(dtype)
    y, gx, gw = op_with_grads(x, w, g)
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == torch.float32
    # The math runs in fp32 on the upcast input: results are the fp32 results rounded once to `dtype`.
    y_ref, gx_ref, gw_ref = op_with_grads(x.float(), w, g.float())
    eps = torch.finfo(dtype).eps  # one ulp at 1.0; rounding to nearest is within half of it
    torch.testing.assert_close(y.float(), y_ref, rtol=eps, atol=1e-6)
    torch.testing.assert_close(gx.float(), gx_ref, rtol=eps, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-6)


def test_cpu_autocast_keeps_fp32_math():
    x, w, g = randn(8, 6 * 32, seed=17), randn(5, 6, 32, seed=18), randn(8, 5 * 32, seed=19)
    y_ref, gx_ref, gw_ref = reference(x, w, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = block_circulant_matmul(xr, wr)
        y.backward(g)
    assert y.dtype == torch.float32
    # bf16 math would be off by ~1e-2; fp32 math is within 1e-5.
    assert rel_err(y, y_ref) <= REL_TOL[torch.float32]
    assert rel_err(xr.grad, gx_ref) <= REL_TOL[torch.float32]
    assert rel_err(wr.grad, gw_ref) <= REL_TOL[torch.float32]


# ------------------------------------------------------------------------------------------ saved tensors


def test_autograd_saves_only_x_and_w():
    x = randn(2, 5, 8 * 16, seed=20).requires_grad_()
    w = randn(4, 8, 16, seed=21).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block_circulant_matmul(x, w)
    assert [tuple(t.shape) for t in saved] == [tuple(x.shape), tuple(w.shape)]
    assert sum(t.numel() for t in saved) == x.numel() + w.numel()
    assert saved[0].data_ptr() == x.data_ptr() and saved[1].data_ptr() == w.data_ptr()
    y.sum().backward()  # and the backward runs from those alone


# ------------------------------------------------------------------------------------------------- errors


def test_wrong_kernel_ndim():
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"\(4, 16\)"):
        block_circulant_matmul(x, w)
    with pytest.raises(ValueError, match=r"\(4, 16\)"):
        materialize(w)


def test_mismatched_d_in():
    x, w = torch.randn(2, 3, 30), torch.randn(2, 4, 8)
    with pytest.raises(ValueError) as err:
        block_circulant_matmul(x, w)
    msg = str(err.value)
    assert "30" in msg and "(2, 4, 8)" in msg and "32" in msg


def test_complex_input_rejected():
    with pytest.raises(TypeError):
        block_circulant_matmul(torch.randn(2, 8, dtype=torch.complex64), torch.randn(1, 2, 4))
