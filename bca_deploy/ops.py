"""The block-circulant operator: forward, exact FFT backward, dense materialization.

Convention (used everywhere in bca-deploy; other layouts are converted at the file boundary):

    ΔW is a (d_out/p) × (d_in/p) grid of p × p circulant blocks given by kernels ``w`` of shape
    ``(d_out/p, d_in/p, p)`` in **first-column** layout:

        block(i, j)[r, s] = w[i, j, (r - s) mod p]

    so that, with x split into blocks x_j of length p,

        y_i = Σ_j  w_ij ⊛ x_j = Σ_j irfft(rfft(w_ij) ⊙ rfft(x_j))     (circular convolution)

PEFT's C3A uses the first-row layout (block[r, s] = k[(s - r) mod p]); :func:`flip_circulant_layout`
converts between the two (it is its own inverse).

Everything here is a pure function of tensors: the adapter layers, the merger and the exporters all
call these, so the math is defined once.
"""

from __future__ import annotations

import torch

__all__ = [
    "block_circulant_matmul",
    "materialize",
    "spectral_mix_matrix",
    "flip_circulant_layout",
    "circulant_index",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # FFTs in half precision are inaccurate (and bf16 has no FFT at all): compute in fp32 at least,
    # in fp64 when a caller (gradcheck, reference tests) hands us fp64.
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_operands(x: torch.Tensor, w: torch.Tensor) -> None:
    if w.ndim != 3:
        raise ValueError(
            f"block-circulant kernels must have shape (d_out/p, d_in/p, p); got a {w.ndim}-d tensor of shape "
            f"{tuple(w.shape)}"
        )
    d_in = w.shape[1] * w.shape[2]
    if x.shape[-1] != d_in:
        raise ValueError(
            f"input's last dimension is {x.shape[-1]} but kernels of shape {tuple(w.shape)} expect "
            f"d_in = {w.shape[1]} * {w.shape[2]} = {d_in}"
        )
    if x.is_complex() or w.is_complex():
        raise TypeError("block_circulant_matmul takes real tensors; complex input is not supported")


def spectral_mix_matrix(w: torch.Tensor) -> torch.Tensor:
    """The frequency-domain mixing weights as one real block matrix per frequency bin.

    With ``W = rfft(w)`` of shape (o, q, F), F = p // 2 + 1, returns ``M`` of shape (F, 2q, 2o)::

        M[f] = [[ Re W[:, :, f]ᵀ,  Im W[:, :, f]ᵀ ],
                [-Im W[:, :, f]ᵀ,  Re W[:, :, f]ᵀ ]]

    so that for a row vector of spectra ``[Xr, Xi]`` (length 2q), ``[Xr, Xi] @ M[f] = [Yr, Yi]`` is the
    complex product ``Y = X · Wᵀ`` done as one real GEMM. ``M[f]ᵀ`` is the same construction for
    ``conj(W)``, i.e. the transposed (correlation) operator, which the backward uses.

    Args:
        w: kernels, shape (o, q, p), first-column layout.

    Returns:
        Tensor of shape (F, 2q, 2o) in w's dtype (fp32 or fp64).
    """
    spectrum = torch.fft.rfft(w, dim=-1)  # (o, q, F) complex
    re = spectrum.real.permute(2, 1, 0)  # (F, q, o)
    im = spectrum.imag.permute(2, 1, 0)  # (F, q, o)
    top = torch.cat([re, im], dim=2)  # (F, q, 2o)
    bottom = torch.cat([-im, re], dim=2)  # (F, q, 2o)
    return torch.cat([top, bottom], dim=1).contiguous()  # (F, 2q, 2o)


# Token chunking (CPU). The op runs over the rows of x in chunks whose spectra take about this many
# bytes, so that a chunk's spectra stay in cache between the FFT, the layout change, the GEMM and the
# inverse FFT, and so that the temporaries are small heap blocks reused from chunk to chunk. Whole-batch
# temporaries (tens of MB at d=4096) are fresh mmap'd buffers that page-fault on every call and do each
# pass at DRAM speed. On a 2-core EPYC (2048 tokens, d = 768..4096) chunking made forward+backward
# 1.4-3x faster than whole-batch and halved peak memory; 1-2 MiB chunks beat 0.25, 4, 8 and 16 MiB.
# On CUDA (caching allocator, large kernels preferred) the whole batch is one chunk.
_CPU_CHUNK_BYTES = 2 << 20


def _rows_per_chunk(n_rows: int, bytes_per_row: int, device: torch.device) -> int:
    if device.type != "cpu":
        return max(n_rows, 1)
    return max(1, min(n_rows, _CPU_CHUNK_BYTES // max(bytes_per_row, 1)))


def _spectrum_bytes_per_row(q: int, o: int, p: int, dtype: torch.dtype = torch.float32) -> int:
    # input and output spectra of one row: (q + o) channels × (p//2 + 1) complex bins of 2 reals each
    return (q + o) * (p // 2 + 1) * 2 * torch.finfo(dtype).bits // 8


def _interleaved_mix(w: torch.Tensor) -> torch.Tensor:
    """:func:`spectral_mix_matrix` with rows ordered (j, re/im) and columns (i, re/im): shape (F, 2q, 2o).

    That is the element order of a complex tensor seen as real (``view_as_real``), so spectra enter
    and leave the GEMM without splitting real and imaginary parts into separate planes.
    """
    o, q, _ = w.shape
    mix = spectral_mix_matrix(w)  # (F, 2q, 2o): rows (re/im, j), columns (re/im, i)
    f = mix.shape[0]
    return mix.view(f, 2, q, 2, o).permute(0, 2, 1, 4, 3).reshape(f, 2 * q, 2 * o)  # rows (j, re/im)


def _spectra(blocks: torch.Tensor) -> torch.Tensor:
    """(n, c, p) real blocks -> (F, n, 2c) spectra, (re, im) of each channel adjacent on the last dim.

    The FFT leaves the bins innermost, (n, c, F); the GEMM needs one matrix per bin. The transpose is
    done on complex64 elements (8 bytes), which is several times faster than moving float32 planes.
    """
    n, c, _ = blocks.shape
    spectrum = torch.fft.rfft(blocks, dim=-1)  # (n, c, F) complex
    f = spectrum.shape[-1]
    spectrum = spectrum.permute(2, 0, 1).contiguous()  # (F, n, c) complex
    return torch.view_as_real(spectrum).view(f, n, 2 * c)  # (F, n, 2c)


def _from_spectra(stacked: torch.Tensor, p: int) -> torch.Tensor:
    """(F, n, 2c) contiguous spectra, (re, im) interleaved -> (n, c, p) real blocks by irfft."""
    f, n, two_c = stacked.shape
    spectrum = torch.view_as_complex(stacked.view(f, n, two_c // 2, 2))  # (F, n, c) complex
    return torch.fft.irfft(spectrum.permute(1, 2, 0).contiguous(), n=p, dim=-1)  # (n, c, p)


# Tiny block grids (q and o at most this many blocks, e.g. d=384 at p=128: 3 x 3) mix their spectra by
# complex broadcasting in the FFT's own (rows, blocks, bins) layout instead of one batched GEMM per frequency
# bin: with inner dimensions of 2q <= 8 reals, MKL's batched GEMM costs ~0.65 ms per call at 320 rows on a
# 2-core EPYC, the broadcast 0.15-0.33 ms, and no layout changes are needed; from 6 x 6 blocks on, the GEMM
# is faster (measured at 320 and 2,048 rows, thread CPU time). Same math, same exactness.
_TINY_GRID = 4


def _is_tiny(q: int, o: int) -> bool:
    return q <= _TINY_GRID and o <= _TINY_GRID


def _tiny_bytes_per_row(q: int, o: int, p: int, dtype: torch.dtype = torch.float32) -> int:
    # the (o, q) products of one row in the weight gradient: o · q · (p//2 + 1) complex numbers
    return max(q + o, q * o) * (p // 2 + 1) * 2 * torch.finfo(dtype).bits // 8


def _irfft_into(out: torch.Tensor, spectrum: torch.Tensor, p: int) -> None:
    """``out[...] = irfft(spectrum)`` (last dim, length p), written in place when the dtypes agree (no copy)."""
    if out.dtype == spectrum.real.dtype and out.is_contiguous():
        torch.fft.irfft(spectrum, n=p, dim=-1, out=out)
    else:
        out.copy_(torch.fft.irfft(spectrum, n=p, dim=-1))


def _mix_tiny(xs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Y[n, i, f] = Σ_j X[n, j, f] · W[i, j, f] for spectra X (n, q, F) and W (o, q, F); returns (n, o, F)."""
    y = xs[:, None, 0, :] * ws[None, :, 0, :]  # (n, o, F)
    for j in range(1, xs.shape[1]):
        y.addcmul_(xs[:, None, j, :], ws[None, :, j, :])  # fused: no temporary product
    return y


class _BlockCirculantMatmul(torch.autograd.Function):
    """y = ΔW x with an exact FFT backward that saves only the input and the kernels.

    Saving ``x`` itself (not its spectrum) means an adapted ``Linear`` stores no extra activation:
    the base layer already keeps a reference to the same tensor. The backward recomputes the
    spectrum of x chunk by chunk.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        o, q, p = w.shape
        dtype = _compute_dtype(x, w)
        xb = x.reshape(-1, q, p)  # (N, q, p)
        n_rows = xb.shape[0]
        tiny = _is_tiny(q, o)
        per_row = _tiny_bytes_per_row(q, o, p, dtype) if tiny else _spectrum_bytes_per_row(q, o, p, dtype)
        rows = _rows_per_chunk(n_rows, per_row, x.device)
        y = torch.empty(n_rows, o, p, dtype=x.dtype, device=x.device)  # (N, o, p)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if tiny:
                ws = torch.fft.rfft(w.to(dtype), dim=-1)  # (o, q, F)
                for n0 in range(0, n_rows, rows):
                    xs = torch.fft.rfft(xb[n0 : n0 + rows].to(dtype), dim=-1)  # (n, q, F)
                    _irfft_into(y[n0 : n0 + rows], _mix_tiny(xs, ws), p)  # (n, o, p)
            else:
                mix = _interleaved_mix(w.to(dtype))  # (F, 2q, 2o)
                for n0 in range(0, n_rows, rows):
                    xs = _spectra(xb[n0 : n0 + rows].to(dtype))  # (F, n, 2q)
                    y[n0 : n0 + rows] = _from_spectra(torch.bmm(xs, mix), p)  # (n, o, p), cast to x.dtype
        ctx.save_for_backward(x, w)
        return y.view(*x.shape[:-1], o * p)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        o, q, p = w.shape
        if _is_tiny(q, o):
            return _backward_tiny(ctx, x, w, grad_y)
        dtype = _compute_dtype(x, w)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gb = grad_y.reshape(-1, o, p)  # (N, o, p)
        xb = x.reshape(-1, q, p)  # (N, q, p)
        n_rows = gb.shape[0]
        rows = _rows_per_chunk(n_rows, _spectrum_bytes_per_row(q, o, p, dtype), grad_y.device)
        grad_x = grad_w = mix_t = acc = None
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            if need_x:
                grad_x = torch.empty(n_rows, q, p, dtype=x.dtype, device=x.device)  # (N, q, p)
                # ΔWᵀ is block-circulant with conjugated spectra: the transposed mix (see spectral_mix_matrix).
                mix_t = _interleaved_mix(w.to(dtype)).transpose(1, 2).contiguous()  # (F, 2o, 2q)
            if need_w:
                acc = torch.zeros(p // 2 + 1, 2 * q, 2 * o, dtype=dtype, device=x.device)  # (F, 2q, 2o)
            for n0 in range(0, n_rows, rows):
                gs = _spectra(gb[n0 : n0 + rows].to(dtype))  # (F, n, 2o)
                if need_x:
                    grad_x[n0 : n0 + rows] = _from_spectra(torch.bmm(gs, mix_t), p)  # (n, q, p)
                if need_w:
                    xs = _spectra(xb[n0 : n0 + rows].to(dtype))  # (F, n, 2q)
                    acc.baddbmm_(xs.transpose(1, 2), gs)  # += Σ_n xs[f, n]ᵀ gs[f, n]
            if need_w:
                # acc holds the four real products of Σ_n X[n, j] and G[n, i]; grad_w's spectrum is
                # Σ_n conj(X[n, j]) G[n, i] (circular correlation of g_i with x_j).
                a = acc.view(-1, q, 2, o, 2)  # [f, j, re/im of X, i, re/im of G]
                re = a[:, :, 0, :, 0] + a[:, :, 1, :, 1]  # (F, q, o)
                im = a[:, :, 0, :, 1] - a[:, :, 1, :, 0]  # (F, q, o)
                spectrum = torch.complex(re, im).permute(2, 1, 0)  # (o, q, F)
                grad_w = torch.fft.irfft(spectrum, n=p, dim=-1).to(w.dtype)  # (o, q, p)
        if need_x:
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_w


def _backward_tiny(ctx, x: torch.Tensor, w: torch.Tensor, grad_y: torch.Tensor):
    """The backward of a tiny block grid, in the FFT's (rows, blocks, bins) layout (see :data:`_TINY_GRID`).

    grad_x spectrum: Σ_i G[n, i] · conj(W[i, j]) (ΔWᵀ has conjugated spectra); grad_w spectrum:
    Σ_n conj(X[n, j]) · G[n, i] (circular correlation of g_i with x_j).
    """
    o, q, p = w.shape
    dtype = _compute_dtype(x, w)
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gb = grad_y.reshape(-1, o, p)  # (N, o, p)
    xb = x.reshape(-1, q, p)  # (N, q, p)
    n_rows = gb.shape[0]
    rows = _rows_per_chunk(n_rows, _tiny_bytes_per_row(q, o, p, dtype), grad_y.device)
    grad_x = grad_w = None
    with torch.autocast(device_type=grad_y.device.type, enabled=False):
        ws_t = torch.fft.rfft(w.to(dtype), dim=-1).conj().transpose(0, 1)  # (q, o, F): conj(W[i, j]) at [j, i]
        if need_x:
            grad_x = torch.empty(n_rows, q, p, dtype=x.dtype, device=x.device)  # (N, q, p)
        acc = torch.zeros(o, q, p // 2 + 1, dtype=ws_t.dtype, device=x.device) if need_w else None  # (o, q, F)
        for n0 in range(0, n_rows, rows):
            gs = torch.fft.rfft(gb[n0 : n0 + rows].to(dtype), dim=-1)  # (n, o, F)
            if need_x:
                _irfft_into(grad_x[n0 : n0 + rows], _mix_tiny(gs, ws_t), p)  # (n, q, p)
            if need_w:
                xs = torch.fft.rfft(xb[n0 : n0 + rows].to(dtype), dim=-1)  # (n, q, F)
                acc += (xs.conj()[:, None, :, :] * gs[:, :, None, :]).sum(dim=0)  # (o, q, F)
        if need_w:
            grad_w = torch.fft.irfft(acc, n=p, dim=-1).to(w.dtype)  # (o, q, p)
    if need_x:
        grad_x = grad_x.view(x.shape)
    return grad_x, grad_w


def block_circulant_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Apply the block-circulant matrix given by ``w`` to ``x``: ``y = x @ materialize(w).T``.

    Computed with rfft/irfft over each block and the frequency-domain mix as real GEMMs (one per
    frequency bin); the backward is FFT-based and exact, and autograd saves only ``x`` and ``w`` (no
    dense matrix, no spectra). Math runs in fp32 (fp64 if either operand is fp64) whatever the input
    dtype, with autocast disabled inside. On CPU the tokens are processed in cache-sized chunks.

    Args:
        x: input of shape (..., d_in), any leading batch dims; any float dtype.
        w: kernels of shape (d_out/p, d_in/p, p), first-column layout.

    Returns:
        Tensor of shape (..., d_out) in ``x``'s dtype.
    """
    _check_operands(x, w)
    return _BlockCirculantMatmul.apply(x, w)


def circulant_index(p: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(p, p) long tensor ``idx[r, s] = (r - s) mod p``: block[r, s] = w[idx[r, s]] (first-column)."""
    r = torch.arange(p, device=device)
    return (r[:, None] - r[None, :]) % p


def materialize(w: torch.Tensor) -> torch.Tensor:
    """The dense (d_out, d_in) matrix of the block-circulant kernels ``w``, by index gather.

    No FFT and no identity matmul: each entry is copied from ``w``, so the result is exact in w's
    dtype. ``block_circulant_matmul(x, w)`` equals ``x @ materialize(w).T``.

    Args:
        w: kernels of shape (o, q, p), first-column layout.

    Returns:
        Tensor of shape (o * p, q * p), same dtype and device as ``w``.
    """
    if w.ndim != 3:
        raise ValueError(f"kernels must have shape (d_out/p, d_in/p, p); got shape {tuple(w.shape)}")
    o, q, p = w.shape
    blocks = w[:, :, circulant_index(p, w.device)]  # (o, q, p, p): [i, j, r, s]
    return blocks.permute(0, 2, 1, 3).reshape(o * p, q * p)  # [(i, r), (j, s)]


def flip_circulant_layout(w: torch.Tensor) -> torch.Tensor:
    """Convert kernels between first-row and first-column layouts (the map is its own inverse).

    first-row ``k`` (block[r, s] = k[(s - r) mod p]) and first-column ``w`` (block[r, s] =
    w[(r - s) mod p]) describe the same block when ``w[m] = k[(-m) mod p]``.

    Args:
        w: kernels of shape (..., p).

    Returns:
        Kernels of the same shape in the other layout (a new tensor; exact).
    """
    return torch.roll(torch.flip(w, dims=[-1]), shifts=1, dims=-1)
