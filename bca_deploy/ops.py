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


def _stacked_spectrum(blocks: torch.Tensor) -> torch.Tensor:
    """(N, c, p) real blocks -> (F, N, 2c) spectra, real parts then imaginary parts on the last dim.

    The result is a strided view of an (N, F, 2c) buffer: only a per-row (c, F) transpose is copied,
    which stays in cache, and the batched GEMMs take the (F, N, 2c) view without another copy.
    """
    n, c, _ = blocks.shape
    spectrum = torch.view_as_real(torch.fft.rfft(blocks, dim=-1))  # (N, c, F, 2)
    f = spectrum.shape[2]
    rows = spectrum.permute(0, 2, 3, 1).reshape(n, f, 2 * c)  # (N, F, 2c), contiguous
    return rows.transpose(0, 1)  # (F, N, 2c) view


def _spectral_bmm(stacked: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """(F, N, a) @ (F, a, b) -> (F, N, b), written straight into an (N, F, b) buffer (returned as a view)."""
    f, n, _ = stacked.shape
    out = torch.empty(n, f, mix.shape[2], dtype=stacked.dtype, device=stacked.device)
    torch.bmm(stacked, mix, out=out.transpose(0, 1))
    return out.transpose(0, 1)


def _from_stacked_spectrum(stacked: torch.Tensor, p: int) -> torch.Tensor:
    """(F, N, 2c) stacked spectra (a view of an (N, F, 2c) buffer) -> (N, c, p) real blocks by irfft."""
    f, n, two_c = stacked.shape
    c = two_c // 2
    rows = stacked.transpose(0, 1).reshape(n, f, 2, c)  # (N, F, 2, c): no copy for our own buffers
    spectrum = rows.permute(0, 3, 1, 2).contiguous()  # (N, c, F, 2)
    return torch.fft.irfft(torch.view_as_complex(spectrum), n=p, dim=-1)  # (N, c, p)


class _BlockCirculantMatmul(torch.autograd.Function):
    """y = ΔW x with an exact FFT backward that saves only the input and the kernels.

    Saving ``x`` itself (not its spectrum) means an adapted ``Linear`` stores no extra activation:
    the base layer already keeps a reference to the same tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        o, q, p = w.shape
        lead = x.shape[:-1]
        dtype = _compute_dtype(x, w)
        with torch.autocast(device_type=x.device.type, enabled=False):
            mix = spectral_mix_matrix(w.to(dtype))  # (F, 2q, 2o)
            xs = _stacked_spectrum(x.reshape(-1, q, p).to(dtype))  # (F, N, 2q)
            ys = _spectral_bmm(xs, mix)  # (F, N, 2o)
            y = _from_stacked_spectrum(ys, p)  # (N, o, p)
        ctx.save_for_backward(x, w)
        return y.reshape(*lead, o * p).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        o, q, p = w.shape
        dtype = _compute_dtype(x, w)
        grad_x = grad_w = None
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            gs = _stacked_spectrum(grad_y.reshape(-1, o, p).to(dtype))  # (F, N, 2o)
            if ctx.needs_input_grad[0]:
                mix = spectral_mix_matrix(w.to(dtype))  # (F, 2q, 2o)
                # ΔWᵀ is block-circulant with conjugated spectra: M[f]ᵀ (see spectral_mix_matrix).
                gxs = _spectral_bmm(gs, mix.transpose(1, 2))  # (F, N, 2q)
                grad_x = _from_stacked_spectrum(gxs, p).reshape(x.shape).to(x.dtype)
            if ctx.needs_input_grad[1]:
                xs = _stacked_spectrum(x.reshape(-1, q, p).to(dtype))  # (F, N, 2q)
                # Σ_n conj(X[n, i]) G[n, o]: one GEMM gives all four real products.
                a = torch.bmm(xs.transpose(1, 2), gs)  # (F, 2q, 2o)
                re = a[:, :q, :o] + a[:, q:, o:]  # (F, q, o)
                im = a[:, :q, o:] - a[:, q:, :o]  # (F, q, o)
                spectrum = torch.complex(re, im).permute(2, 1, 0)  # (o, q, F)
                grad_w = torch.fft.irfft(spectrum, n=p, dim=-1).to(w.dtype)  # (o, q, p)
        return grad_x, grad_w


def block_circulant_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Apply the block-circulant matrix given by ``w`` to ``x``: ``y = x @ materialize(w).T``.

    Computed with rfft/irfft over each block and the frequency-domain mix as real GEMMs; the
    backward is FFT-based and exact, and autograd saves only ``x`` and ``w`` (no dense matrix, no
    spectra). Math runs in fp32 (fp64 if either operand is fp64) whatever the input dtype, with
    autocast disabled inside.

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
