"""The unmerged BCA subgraph: frequency-domain constants and the ONNX nodes that apply them.

An unmerged adapted layer exports as ``y = base(x) + Δ(x)`` where ``Δ`` is this subgraph. Kernels are
turned into frequency-domain constants **at export time** (nothing is transformed at run time).

**Spectral rows.** A real block of length p has p real degrees of freedom in its spectrum: the rfft
bins 1 … ⌈p/2⌉−1 are complex, bin 0 (and bin p/2 for even p) are real. They are kept as
``S = ⌈p/2⌉`` *slots* (a complex bin, or the two real bins packed together), and each slot becomes
three *spectral rows* so that the complex product of the mix takes three real GEMMs instead of four
(Gauss's trick) and needs no sum afterwards::

    complex bin k:     rows (Xr + Xi, Xi, Xr)     weights (Wr, Wr + Wi, Wi − Wr)
                       Yr = P₀ − P₁,  Yi = P₀ + P₂                     (P_j = row j · weight j)
    real pair (0, p/2): rows (X₀, X_p/2, 0)        weights (W₀, W_p/2, 0);  Y₀ = P₀, Y_p/2 = P₁

so ``X`` (R rows, R = 3S) times one q×o matrix per row gives the R product rows ``P``, and the inverse
transform takes ``P`` itself (the ± combinations are folded into its constants). The mixing constant
of a layer is ``W`` of shape (1, R, q, o), q = d_in/p, o = d_out/p (the leading 1 keeps the row axis
where :mod:`~bca_deploy.exporters.bank` inserts its slot axis). The slot order is the
:class:`SpectralPlan` of p, shared by every variant, so the same ``W`` serves all of them.

**The transforms as MatMuls** (``fft="matmul"``), N = number of tokens::

    x (..., q·p) → (N·q, p)
    X = Cf @ xᵀ                          (R, N·q)    one MatMul; onnxruntime packs xᵀ (no copy)
    P = X.view(1, R, N, q) @ W           (1, R, N, o) R batched q×o GEMMs
    y = Pᵀ @ Ci + base                   (N·o, p)    one Gemm: the transpose and the residual add are free

with Cf, Ci of shape (R, p): a block costs 1.5·p multiply-adds per element each way. For larger p
(divisible by 4) the transforms are **two-stage** (Cooley–Tukey with p = A·C, written as MatMuls):
block position t = a·C + c; a length-A real DFT over a, then per group of residues k mod A a twiddled
length-C DFT over c that emits the group's spectral rows directly::

    Z  = T₁ @ x.view(N·q, A, C)          (N·q, A, C) T₁ (A, A): rows (group, re/im); one A×A by A×C product
                                                     per block (a batched MatMul: x is read in place)
    X  = T₂ @ Z.view(N·q, A/2, 2C).permute(1, 2, 0)
                                         (A/2, 3C, N·q) = (R, N·q): T₂ (A/2, 3C, 2C), per group; onnxruntime
                                         reads the permuted Z inside its GEMM (FusedMatMul transB, transBatchB)
    P  = X.view(1, R, N, q) @ W          as above
    U  = T₂ⁱ @ P.view(A/2, 3C, N·o)      (A/2, 2C, N·o)  T₂ⁱ (A/2, 2C, 3C)
    yt = T₁ⁱ @ U.view(A, C·N·o)          (p, N·o)     T₁ⁱ (A, A)
    y  = base + Transpose(yt)            (N·o, p)    the one activation copy: a 2-D transpose

(A + 3C multiply-adds per element each way instead of 1.5·p: 28 instead of 96 at p = 64). At p = 64 the
forward transform is still the one MatMul, ``Cf @ xᵀ``, which packs xᵀ inside the GEMM: the two-stage
forward's batched A×A by A×C products are too small there (C = 4) to pay (see ``_ONE_STAGE_FORWARD_MAX_P``).

**The transforms as DFT-20 nodes** (``fft="dft"``). onnxruntime's CPU DFT runs its transforms one
after another on one thread, and a real input costs it a full complex transform; so when a layer has
an even number of blocks, two real blocks a, b travel as one complex signal a + i·b (half the
transforms; the blocks' spectra are separated from bins k and p − k)::

    xt = Transpose(x (N·q, p)).view(p, N·q/2, 2)          adjacent blocks as (re, im)
    Z  = DFT(xt, axis 0)                                    (p, N·q/2, 2)
    re = (Z[k] + Z[p−k]) / 2,  im = swap(Z[k] − Z[p−k]) · (½, −½)   per bin k < F, for a and b at once
    X  = Gather([re; im; re + im], rows)                    (R, N·q)
    ...mix...
    [Yre; Yim] = P[pick_a] + sign · P[pick_b]               (2F, N·o)
    V  = Y_a + i·Y_b over all p bins (bins > p/2 from their conjugates)
    y  = base + Transpose(DFT⁻¹(V, axis 0))                 (N·o, p)

With an odd number of blocks each block gets a one-sided DFT (and the inverse a one-sided inverse
DFT with ``dft_length`` = p), with the same rows picked by the same Gathers.

The forward transform of an input is shared by all the layers that read it (q, k and v; gate and
up): one ``X`` feeds several mixes.

Several active adapters with the same block size are folded into one kernel (ΔW is linear in w);
adapters with different block sizes get one subgraph each. The math runs in float32 whatever the
model's dtype (as :func:`bca_deploy.ops.block_circulant_matmul` does), with Casts at the boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

from bca_deploy.inject import bca_layers
from bca_deploy.layers import BCALinear
from bca_deploy.ops import spectral_mix_matrix

__all__ = [
    "FFT_MODES",
    "DFT_MIN_OPSET",
    "MATMUL_MIN_OPSET",
    "SpectralPlan",
    "spectral_plan",
    "frequency_shape",
    "frequency_kernels",
    "transform_constants",
    "bca_delta",
    "exportable_adapters",
    "folded_kernels",
]

FFT_MODES = ("dft", "matmul")
#: DFT with a one-sided inverse needs opset 20 (and onnxruntime >= 1.27 to run correctly).
DFT_MIN_OPSET = 20
#: Reshape/Transpose/Gemm/MatMul as used here; 13 is the lowest opset the exporter path was checked with.
MATMUL_MIN_OPSET = 13

_FREQ_PREFIX = "bca_freq_p"
# How one transform is emitted (the keys of _FORWARD_ROLES/_INVERSE_ROLES):
_MATMUL_ONE = "matmul-1"  # one MatMul (Gemm for the inverse)
_MATMUL_TWO = "matmul-2"  # two-stage MatMuls
_DFT_PAIRED = "dft-paired"  # DFT-20, two real blocks per complex transform ("dft": one real block each)
_CONST_PREFIX = "bca_dft_p"  # + f"{p}_{role}" for the shared transform constants of block size p

# Two-stage transforms cut the transform work from 1.5·p to A + 3C multiply-adds per element, for the
# output's 2-D transpose (and, when this was measured, one of the input too). Measured on the 2-core EPYC
# (one layer, 512 tokens, BCA part alone, paired CPU time, Gauss rows + two-stage vs the earlier single-stage
# four-product graph): 0.85x at 4096x4096, p = 64; 0.59x at p = 256; 0.94x at 384x384, p = 64 (1024 tokens).
_TWO_STAGE_MIN_P = 64
# The forward transform stays one MatMul up to this p, even in a two-stage plan: Cf @ xᵀ reads xᵀ through the
# GEMM's own packing (a FusedMatMul with transB, no copy). Above it the two-stage forward reads x in place too:
# its first stage is one A×A by A×C product per block (a batched MatMul over x viewed (N·q, A, C)) and its second
# reads that result permuted inside a FusedMatMul (transB, transBatchB), where it used to start with the
# tall-thin input transpose (N·q, p) -> (p, N·q) (9.0 ms for the (88064, 64) one of a Llama-7B down_proj at 512
# tokens). With C = 4 (p = 64) those products are too small: the forward alone, 512 tokens, 2 threads, wall
# time, 2-core Xeon under load (bench/results/transform_layouts.md has the 1-thread CPU times): one MatMul 0.53x
# the transposing two-stage form and the no-copy one 1.31x at q_proj, p = 64; at p = 256 the no-copy one
# 0.71x (gate/up input) and 0.86x (q/k/v input), one MatMul 0.73x and 0.92x. The whole Llama-7B layer at
# p = 256, 512 tokens, old and new graphs interleaved: new / old 0.958, 0.965, 0.974 (medians of 24, 30, 18
# paired rounds, load 1.3-6.5), though the BCA nodes' kernel time stayed 245-246 ms in a profile (the input
# transposes' 37 ms went to the batched first stage). The inverse keeps its output transpose: one Gemm (Pᵀ @ Ci + base) in its place measured 0.58-1.06x
# at p = 64 in the same kind of run but 1.03x (0.96-1.10) on the whole layer, and 1.5-1.8x at p = 256.
_ONE_STAGE_FORWARD_MAX_P = 64


# ---- the spectral plan: which bins, in which order, and how the transforms are factored -----------


@dataclasses.dataclass(frozen=True)
class SpectralPlan:
    """The spectral layout for block size ``p``: the slots (in row order) and how the transforms are split.

    ``slots[s] = (k, k2)``: a complex rfft bin ``k`` when ``k2 == -1``; the real bins ``k`` and ``k2``
    packed together when ``k2 >= 0`` (0 and p/2 for even p); the real bin ``k`` alone when ``k2 == -2``
    (bin 0 for odd p). Slot s owns spectral rows 3s, 3s+1, 3s+2 (see the module docstring).
    ``outer`` is A of the two-stage transform (p = A·C), or 1 when the transforms are single MatMuls.
    """

    p: int
    outer: int
    slots: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        """R = 3 · number of slots: the spectral rows of ``X`` and the mixing constant's row axis."""
        return 3 * len(self.slots)

    @property
    def inner(self) -> int:
        """C = p / A (the length of the second stage); p for single-stage plans."""
        return self.p // self.outer

    @property
    def groups(self) -> int:
        """A / 2: the batch of the second stage (two-stage plans)."""
        return self.outer // 2

    @property
    def two_stage(self) -> bool:
        return self.outer > 1


def _outer_length(p: int) -> int:
    """A for a two-stage plan (1: single-stage): both factors even, minimizing A + 3C (the work per element)."""
    if p < _TWO_STAGE_MIN_P or p % 4:
        return 1
    candidates = [a for a in range(2, p // 2 + 1, 2) if p % a == 0 and (p // a) % 2 == 0]
    return min(candidates, key=lambda a: (a + 3 * (p // a), -a))


@functools.lru_cache(maxsize=None)
def spectral_plan(p: int) -> SpectralPlan:
    """The :class:`SpectralPlan` every exported graph with block size ``p`` uses (one per p)."""
    if p < 1:
        raise ValueError(f"block size must be >= 1; got {p}")
    outer = _outer_length(p)
    if outer == 1:
        first = (0, p // 2) if p % 2 == 0 and p > 1 else (0, -2)
        return SpectralPlan(p, 1, (first, *((k, -1) for k in range(1, (p + 1) // 2))))
    c = p // outer
    slots: list[tuple[int, int]] = []
    for g in range(outer // 2):
        if g == 0:
            # residues 0 and A/2: bins A·j (0 and p/2 are real, packed) and A/2 + A·j, each up to p/2
            slots.append((0, p // 2))
            slots += [(outer * j, -1) for j in range(1, c // 2)]
            slots += [(outer // 2 + outer * j, -1) for j in range(c // 2)]
        else:
            # residue g: bins g + A·j; those above p/2 are kept as their conjugate p − k (residue A − g)
            slots += [(min(k, p - k), -1) for k in (g + outer * j for j in range(c))]
    return SpectralPlan(p, outer, tuple(slots))


def frequency_shape(p: int, in_features: int, out_features: int) -> tuple[int, int, int, int]:
    """Shape of a layer's mixing constant ``W``: (1, R, q, o) (see the module docstring)."""
    return (1, spectral_plan(p).rows, in_features // p, out_features // p)


def frequency_kernels(w: torch.Tensor) -> torch.Tensor:
    """Kernels (o, q, p) → the mixing constant ``W`` (1, R, q, o), fp32, for :func:`spectral_plan` (p).

    Built from :func:`bca_deploy.ops.spectral_mix_matrix` (``M``, shape (F, 2q, 2o), whose blocks are
    ``Wr = Re rfft(w)ᵀ`` and ``Wi = Im rfft(w)ᵀ`` per bin), in float64: per slot the rows
    (Wr, Wr + Wi, Wi − Wr) of a complex bin, (W_k, W_k2, 0) of a real pair.
    """
    o, q, p = w.shape
    mix = spectral_mix_matrix(w.detach().to(torch.float64))  # (F, 2q, 2o)
    wr, wi = mix[:, :q, :o], mix[:, :q, o:]  # (F, q, o) each
    zero = torch.zeros_like(wr[0])
    rows = []
    for k, k2 in spectral_plan(p).slots:
        if k2 == -1:
            rows += [wr[k], wr[k] + wi[k], wi[k] - wr[k]]
        else:
            rows += [wr[k], wr[k2] if k2 >= 0 else zero, zero]
    return torch.stack(rows)[None].to(torch.float32).contiguous()  # (1, R, q, o)


# ---- transform constants (float64 construction, fp32 storage) ---------------------------------------


def _gauss_rows(xr: torch.Tensor, xi: torch.Tensor) -> list[torch.Tensor]:
    """Spectral rows (Xr + Xi, Xi, Xr) of a complex bin, each a linear functional (same shape as xr)."""
    return [xr + xi, xi, xr]


def _bin_functional(k: int, t: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(re, im) of X[k] = Σ_t x[t] e^{−2πi k t / p} as functionals of x: (cos, −sin) rows."""
    angle = 2.0 * math.pi * ((k * t) % p) / p  # exact phase reduction before the trig
    return torch.cos(angle), -torch.sin(angle)


def _single_stage(plan: SpectralPlan) -> dict[str, torch.Tensor]:
    """Cf (R, p): X = Cf @ x per block; Ci (R, p): y = Pᵀ @ Ci per block."""
    p = plan.p
    t = torch.arange(p, dtype=torch.float64)
    forward, inverse = [], []
    for k, k2 in plan.slots:
        re, im = _bin_functional(k, t, p)
        if k2 == -1:
            forward += _gauss_rows(re, im)
            # y[t] gets (2/p)·(Yr cos − Yi sin) from the bin and its conjugate; Yr = P₀ − P₁, Yi = P₀ + P₂
            cos, sin = 2.0 * re / p, 2.0 * im / p  # im = −sin(angle)
            inverse += [cos + sin, -cos, sin]
        else:
            re2 = _bin_functional(k2, t, p)[0] if k2 >= 0 else torch.zeros_like(t)
            forward += [re, re2, torch.zeros_like(t)]
            inverse += [re / p, re2 / p, torch.zeros_like(t)]
    return {"fwd": torch.stack(forward), "inv": torch.stack(inverse)}


def _two_stage(plan: SpectralPlan) -> dict[str, torch.Tensor]:
    """T₁ (A, A), T₂ (A/2, 3C, 2C), T₂ⁱ (A/2, 2C, 3C), T₁ⁱ (A, A) of the module docstring.

    With t = a·C + c and a bin k of residue r = k mod A: X[k] = Σ_c e^{−2πi k c/p} V[r, c], where
    V[r, c] = Σ_a x[a, c] e^{−2πi r a/A} (stage one; rows per group g: (Re V[g], Im V[g]) for
    0 < g < A/2, (V[0], V[A/2]) for group 0, both real). The inverse runs the same way backwards:
    U[r, c] = Σ_{k ≡ r} e^{2πi k c/p} Y[k] over all p bins (conjugates of the kept ones included),
    then y[a, c] = (1/p) Σ_r e^{2πi r a/A} U[r, c].
    """
    p, a_len, c_len, groups = plan.p, plan.outer, plan.inner, plan.groups
    a = torch.arange(a_len, dtype=torch.float64)
    c = torch.arange(c_len, dtype=torch.float64)
    t1 = torch.zeros(a_len, a_len, dtype=torch.float64)
    t1i = torch.zeros(a_len, a_len, dtype=torch.float64)
    t1[0], t1[1] = 1.0, torch.cos(math.pi * a)
    t1i[:, 0], t1i[:, 1] = 1.0 / p, torch.cos(math.pi * a) / p
    for g in range(1, groups):
        re, im = _bin_functional(g, a, a_len)
        t1[2 * g], t1[2 * g + 1] = re, im
        t1i[:, 2 * g], t1i[:, 2 * g + 1] = 2.0 * re / p, 2.0 * im / p  # 2·Re(e^{+iθ}U) = 2(Ur cos − Ui sin)
    t2 = torch.zeros(groups, 3 * c_len, 2 * c_len, dtype=torch.float64)
    t2i = torch.zeros(groups, 2 * c_len, 3 * c_len, dtype=torch.float64)
    for g in range(groups):
        slots = plan.slots[g * c_len:(g + 1) * c_len]
        # The group's stage-one sequences as complex functionals of its 2C inputs (rows (h, c)):
        # V[r] = input[:C] + i·input[C:] for g > 0; V[0] = input[:C], V[A/2] = input[C:] (real) for g = 0.
        def v_of(r: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(re, im) of the stage-one sequence V[r, ·] as functionals of the group's 2C inputs."""
            vr = torch.zeros(c_len, 2 * c_len, dtype=torch.float64)
            vi = torch.zeros_like(vr)
            offset = c_len if (g == 0 and r == a_len // 2) else 0
            vr[torch.arange(c_len), offset + torch.arange(c_len)] = 1.0
            if g > 0:
                vi[torch.arange(c_len), c_len + torch.arange(c_len)] = 1.0
            return vr, vi

        def x_of(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(re, im) of X[k] as functionals of the group's inputs (k ≤ p/2, kept or conjugated)."""
            r = k % a_len
            conj = g > 0 and r != g  # the bin p − k has residue g; X[k] = conj(X[p − k])
            kk = p - k if conj else k
            vr, vi = v_of(g if conj else r)
            cos, msin = _bin_functional(kk, c, p)  # e^{−2πi kk c/p} = cos + i·msin
            xr = cos @ vr - msin @ vi
            xi = cos @ vi + msin @ vr
            return (xr, -xi) if conj else (xr, xi)

        rows = []
        for k, k2 in slots:
            if k2 == -1:
                rows += _gauss_rows(*x_of(k))
            else:
                rows += [x_of(k)[0], x_of(k2)[0], torch.zeros(2 * c_len, dtype=torch.float64)]
        t2[g] = torch.stack(rows)
        # Inverse: U rows (Re U[g], Im U[g]) (g > 0) or (U[0], U[A/2]) (g = 0) as functionals of the
        # group's 3C product rows. Y of a kept bin: complex Yr = P₀ − P₁, Yi = P₀ + P₂; real Y = P₀ / P₁.
        u_re = torch.zeros(2, c_len, 3 * c_len, dtype=torch.float64)
        u_im = torch.zeros_like(u_re)
        for s, (k, k2) in enumerate(slots):
            yr = torch.zeros(3 * c_len, dtype=torch.float64)
            yi = torch.zeros_like(yr)
            if k2 == -1:
                yr[3 * s], yr[3 * s + 1], yi[3 * s], yi[3 * s + 2] = 1.0, -1.0, 1.0, 1.0
                pairs = [(k, yr, yi), (p - k, yr, -yi)]  # the bin and its conjugate
            else:
                yr2 = torch.zeros_like(yr)
                yr[3 * s], yr2[3 * s + 1] = 1.0, 1.0
                pairs = [(k, yr, yi), (k2, yr2, yi)]
            for kk, fr, fi in pairs:
                r = kk % a_len
                if g > 0 and r != g:
                    continue  # the conjugate half belongs to residue A − g, folded into Re below
                h = 1 if (g == 0 and r == a_len // 2) else 0
                cos, msin = _bin_functional(kk, c, p)  # e^{+2πi kk c/p} = cos − i·msin
                u_re[h] += cos[:, None] * fr[None] + msin[:, None] * fi[None]
                u_im[h] += cos[:, None] * fi[None] - msin[:, None] * fr[None]
        t2i[g] = torch.cat([u_re[0], u_re[1]]) if g == 0 else torch.cat([u_re[0], u_im[0]])
    return {"fwd_outer": t1, "fwd_inner": t2, "inv_inner": t2i, "inv_outer": t1i}


@functools.lru_cache(maxsize=None)
def _dft_indices(p: int) -> dict[str, torch.Tensor]:
    """Constants of the DFT variant's glue (int64 indices, float32 signs), planar: bins 0 … F−1, F = p//2 + 1.

    ``rows`` (R,): X = Gather(table, rows), table (3F, ·) = [re of every bin; im; re + im].
    ``pick_a``/``pick_b``/``sign`` (2F,): [Yre; Yim] = P[pick_a] + sign · P[pick_b] (P: the product rows).
    Two real blocks a, b travel as one complex signal a + i·b (half the transforms); then
    ``mirror`` (F,) = p − k, ``swap`` = [1, 0], ``sign_t`` = [½, −½], ``half`` = ½ separate their
    spectra, and ``sign_w`` = [−1, 1], ``high`` (p − F,) = p − k for k ≥ F build Ya + i·Yb over all bins.
    """
    plan = spectral_plan(p)
    f = p // 2 + 1
    rows, pick_a, pick_b, sign = [], [0] * (2 * f), [0] * (2 * f), [0.0] * (2 * f)
    for s, (k, k2) in enumerate(plan.slots):
        if k2 == -1:
            rows += [2 * f + k, f + k, k]
            pick_a[k], pick_b[k], sign[k] = 3 * s, 3 * s + 1, -1.0
            pick_a[f + k], pick_b[f + k], sign[f + k] = 3 * s, 3 * s + 2, 1.0
        else:
            rows += [k, k2 if k2 >= 0 else f + k, f + k]  # f + k: the imaginary part of real bin k, zero
            for kk, row in [(k, 3 * s), (k2, 3 * s + 1)]:
                if kk >= 0:
                    pick_a[kk], pick_b[kk] = row, row
                    pick_a[f + kk], pick_b[f + kk] = 3 * s + 2, 3 * s + 2  # a zero row: Im of a real bin
    return {
        "rows": torch.tensor(rows, dtype=torch.int64),
        "pick_a": torch.tensor(pick_a, dtype=torch.int64),
        "pick_b": torch.tensor(pick_b, dtype=torch.int64),
        "sign": torch.tensor(sign, dtype=torch.float32)[:, None],
        "mirror": torch.tensor([(p - k) % p for k in range(f)], dtype=torch.int64),
        "swap": torch.tensor([1, 0], dtype=torch.int64),
        "sign_t": torch.tensor([0.5, -0.5], dtype=torch.float32),
        "half": torch.tensor(0.5, dtype=torch.float32),
        "sign_w": torch.tensor([-1.0, 1.0], dtype=torch.float32),
        "high": torch.tensor([p - k for k in range(f, p)], dtype=torch.int64),
    }


@functools.lru_cache(maxsize=None)
def _constants64(p: int) -> dict[str, torch.Tensor]:
    plan = spectral_plan(p)
    if not plan.two_stage:
        return _single_stage(plan)
    two = _two_stage(plan)
    if p <= _ONE_STAGE_FORWARD_MAX_P:  # a one-MatMul forward over the same slots, a two-stage inverse
        return {"fwd": _single_stage(plan)["fwd"], "inv_inner": two["inv_inner"], "inv_outer": two["inv_outer"]}
    return two


def transform_constants(p: int, fft: str = "matmul") -> dict[str, torch.Tensor]:
    """The constants the ``fft`` variant's graph needs for block size ``p`` (shared by all layers), fp32/int64.

    ``"matmul"``: ``fwd``/``inv`` (R, p) (single-stage plan) or ``fwd_outer`` (A, A), ``fwd_inner``
    (A/2, 3C, 2C), ``inv_inner`` (A/2, 2C, 3C), ``inv_outer`` (A, A) (two-stage plan; ``fwd`` instead of
    ``fwd_outer``/``fwd_inner`` up to p = ``_ONE_STAGE_FORWARD_MAX_P``, where the forward stays one MatMul).
    ``"dft"``: the index constants of the DFT glue (see :func:`_dft_indices`).
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {FFT_MODES}; got {fft!r}")
    if fft == "dft":
        return {k: v.clone() for k, v in _dft_indices(p).items()}
    return {k: v.to(torch.float32) for k, v in _constants64(p).items()}


# ---- the math in PyTorch: what the graph computes, op for op (values for the tracer, and bca_delta) --


def _spectrum_math(x: torch.Tensor, p: int, mode: str, consts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x (..., q·p) → X (R, N·q) fp32: the spectral rows of every block, as the graph of ``mode`` computes them.

    ``consts``: the forward constants of :func:`transform_constants` (passed in, not looked up, so the
    tracer sees them as inputs).
    """
    plan = spectral_plan(p)
    blocks = x.reshape(-1, p).float()  # (N·q, p)
    if mode == _DFT_PAIRED:
        rows, mirror, swap, sign_t, half = consts
        pairs = torch.view_as_complex(blocks.T.reshape(p, -1, 2).contiguous())  # (p, N·q/2): block a + i·block b
        z = torch.view_as_real(torch.fft.fft(pairs, dim=0))  # (p, N·q/2, 2)
        za, zb = z[: p // 2 + 1], z[mirror]  # (F, N·q/2, 2): bins k and p − k
        re = (za + zb) * half  # (F, ·, (a, b)): Re X_a, Re X_b
        im = (za - zb)[..., swap] * sign_t  # Im X_a, Im X_b
        return torch.cat([re, im, re + im])[rows].reshape(plan.rows, -1)  # (R, N·q)
    if mode == "dft":
        (rows,) = consts
        spec = torch.view_as_real(torch.fft.rfft(blocks, dim=-1)).flatten(1).T  # (2F, N·q): (bin, re/im)
        spec = spec.reshape(-1, 2, spec.shape[1]).transpose(0, 1)  # (2, F, N·q): re; im
        return torch.cat([spec.flatten(0, 1), spec.sum(dim=0)])[rows]  # (R, N·q)
    if mode == _MATMUL_ONE:
        (fwd,) = consts
        return fwd @ blocks.T  # (R, N·q)
    outer, inner = consts
    z = outer @ blocks.reshape(-1, plan.outer, plan.inner)  # (N·q, A, C)
    z = z.reshape(-1, plan.groups, 2 * plan.inner).permute(1, 2, 0)  # (A/2, 2C, N·q): a view, as onnxruntime reads it
    return (inner @ z).reshape(plan.rows, -1)  # (R, N·q)


def _synthesis_math(spec: torch.Tensor, base: torch.Tensor, w_freq: torch.Tensor, p: int, mode: str,
                    consts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """base (..., o·p) + Δ from the spectral rows X (R, N·q): the mix, then the inverse transform (as the graph)."""
    plan = spectral_plan(p)
    _, rows, q, o = w_freq.shape
    prod = (spec.reshape(1, rows, -1, q) @ w_freq).reshape(rows, -1)  # (R, N·o)
    if mode in ("dft", _DFT_PAIRED):
        pick_a, pick_b, sign = consts[:3]
        y = (prod[pick_a] + sign * prod[pick_b]).reshape(2, p // 2 + 1, -1)  # (2, F, N·o): Yre; Yim
        if mode == "dft":
            y = y.permute(2, 1, 0).contiguous()  # (N·o, F, 2)
            out = torch.fft.irfft(torch.view_as_complex(y), n=p, dim=-1)  # (N·o, p)
        else:
            swap, sign_w, high = consts[3:]
            y = y.reshape(2, p // 2 + 1, -1, 2)  # (2, F, N·o/2, (a, b))
            w = y[1][..., swap] * sign_w  # (F, ·, 2): (−Im Y_b, Im Y_a)
            spec = torch.cat([y[0] + w, (y[0] - w)[high]])  # (p, ·, 2): Y_a + i·Y_b over all bins
            out = torch.view_as_real(torch.fft.ifft(torch.view_as_complex(spec.contiguous()), dim=0))  # (p, ·, 2)
            out = out.reshape(p, -1).T  # (N·o, p): the real blocks a, b back in place
    elif mode == _MATMUL_ONE:
        (inv,) = consts
        out = prod.T @ inv  # (N·o, p)
    else:
        inner, outer = consts
        u = (inner @ prod.reshape(plan.groups, 3 * plan.inner, -1)).reshape(plan.outer, -1)  # (A, C·N·o)
        out = (outer @ u).reshape(p, -1).T  # (N·o, p)
    return base + out.reshape(base.shape).to(base.dtype)


# ---- ONNX emission ----------------------------------------------------------------------------------


def _const(g, values: list[int]):
    return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))


def _scalar_type(value) -> str | None:
    try:
        return value.type().scalarType()
    except RuntimeError:  # type not known to the tracer
        return None


def _transpose2d(g, x):
    return g.op("Transpose", x, perm_i=[1, 0])


class _Spectrum(torch.autograd.Function):
    """X = the spectral rows of every block of x: (R, N·q) fp32.

    ``forward`` computes it in PyTorch (the tracer needs values); ``symbolic`` emits the ONNX nodes.
    ``consts`` are :func:`transform_constants` (p, fft) in their documented order. Export only: not
    differentiable.
    """

    @staticmethod
    def forward(ctx, x, p: int, mode: str, *consts):  # type: ignore[override]
        return _spectrum_math(x, p, mode, consts)

    @staticmethod
    def symbolic(g, x, p: int, mode: str, *consts):  # pragma: no cover - run by the ONNX exporter
        plan = spectral_plan(p)
        if _scalar_type(x) not in (None, "Float"):
            x = g.op("Cast", x, to_i=torch.onnx.TensorProtoDataType.FLOAT)
        f = p // 2 + 1
        if mode == _DFT_PAIRED:
            rows, mirror, swap, sign_t, half = consts
            xt = _transpose2d(g, g.op("Reshape", x, _const(g, [-1, p])))  # (p, N·q)
            pairs = g.op("Reshape", xt, _const(g, [p, -1, 2]))  # (p, N·q/2, 2): block a + i·block b
            z = _dft(g, pairs, inverse=False, length=p, axis=0, onesided=False)  # (p, N·q/2, 2)
            za = g.op("Slice", z, _const(g, [0]), _const(g, [f]), _const(g, [0]))  # bins k < F
            zb = g.op("Gather", z, mirror, axis_i=0)  # bins p − k
            re = g.op("Mul", g.op("Add", za, zb), half)  # (F, N·q/2, 2): Re X_a, Re X_b
            im = g.op("Mul", g.op("Gather", g.op("Sub", za, zb), swap, axis_i=2), sign_t)  # Im X_a, Im X_b
            table = g.op("Concat", re, im, g.op("Add", re, im), axis_i=0)  # (3F, N·q/2, 2)
            return g.op("Reshape", g.op("Gather", table, rows, axis_i=0), _const(g, [plan.rows, -1]))  # (R, N·q)
        if mode == "dft":
            (rows,) = consts
            xb = g.op("Reshape", x, _const(g, [-1, p, 1]))  # (N·q, p, 1)
            spec = _dft(g, xb, inverse=False, length=p)  # (N·q, F, 2)
            spec = _transpose2d(g, g.op("Reshape", spec, _const(g, [-1, 2 * f])))  # (2F, N·q): (bin, re/im)
            spec = g.op("Transpose", g.op("Reshape", spec, _const(g, [f, 2, -1])), perm_i=[1, 0, 2])  # (2, F, N·q)
            total = g.op("ReduceSum", spec, _const(g, [0]), keepdims_i=0)  # (F, N·q): re + im
            table = g.op("Concat", g.op("Reshape", spec, _const(g, [2 * f, -1])), total, axis_i=0)  # (3F, N·q)
            return g.op("Gather", table, rows, axis_i=0)  # (R, N·q)
        if mode == _MATMUL_ONE:
            (fwd,) = consts
            xb = g.op("Reshape", x, _const(g, [-1, p]))  # (N·q, p)
            return g.op("MatMul", fwd, _transpose2d(g, xb))  # (R, N·q); onnxruntime fuses the transpose
        outer, inner = consts
        xb = g.op("Reshape", x, _const(g, [-1, plan.outer, plan.inner]))  # (N·q, A, C)
        z = g.op("MatMul", outer, xb)  # (N·q, A, C): rows (group, re/im), one A×A by A×C product per block
        z = g.op("Reshape", z, _const(g, [-1, plan.groups, 2 * plan.inner]))  # (N·q, A/2, 2C)
        # (A/2, 2C, N·q): onnxruntime fuses this Transpose into the MatMul below (a FusedMatMul with transB and
        # transBatchB reads z in place), so the forward copies no activation.
        z = g.op("Transpose", z, perm_i=[1, 2, 0])
        spec = g.op("MatMul", inner, z)  # (A/2, 3C, N·q)
        return g.op("Reshape", spec, _const(g, [plan.rows, -1]))  # (R, N·q)


class _AddSynthesis(torch.autograd.Function):
    """base + Δ from the spectral rows X of the input: the mix by ``w_freq``, then the inverse transform."""

    @staticmethod
    def forward(ctx, spec, base, w_freq, p: int, mode: str, *consts):  # type: ignore[override]
        return _synthesis_math(spec, base, w_freq, p, mode, consts)

    @staticmethod
    def symbolic(g, spec, base, w_freq, p: int, mode: str, *consts):  # pragma: no cover - run by the ONNX exporter
        plan = spectral_plan(p)
        _, rows, q, _ = _sizes(w_freq)
        base_type = _scalar_type(base)
        spec = g.op("Reshape", spec, _const(g, [1, rows, -1, q]))  # (1, R, N, q)
        prod = g.op("MatMul", spec, w_freq)  # (1, R, N, o): R real q×o products
        shape = g.op("Shape", base)
        fused = False
        if mode in ("dft", _DFT_PAIRED):
            pick_a, pick_b, sign = consts[:3]
            f = p // 2 + 1
            prod = g.op("Reshape", prod, _const(g, [rows, -1]))  # (R, N·o)
            ys = g.op("Add", g.op("Gather", prod, pick_a, axis_i=0),
                      g.op("Mul", g.op("Gather", prod, pick_b, axis_i=0), sign))  # (2F, N·o): Yre; Yim
            if mode == "dft":
                ys = g.op("Transpose", g.op("Reshape", ys, _const(g, [2, f, -1])), perm_i=[2, 1, 0])  # (N·o, F, 2)
                y = _dft(g, ys, inverse=True, length=p)  # (N·o, p, 1)
            else:
                swap, sign_w, high = consts[3:]
                ys = g.op("Reshape", ys, _const(g, [2, f, -1, 2]))  # (2, F, N·o/2, (a, b))
                yre = g.op("Squeeze", g.op("Slice", ys, _const(g, [0]), _const(g, [1]), _const(g, [0])), _const(g, [0]))
                yim = g.op("Squeeze", g.op("Slice", ys, _const(g, [1]), _const(g, [2]), _const(g, [0])), _const(g, [0]))
                w = g.op("Mul", g.op("Gather", yim, swap, axis_i=2), sign_w)  # (F, N·o/2, 2)
                spec = g.op("Concat", g.op("Add", yre, w), g.op("Gather", g.op("Sub", yre, w), high, axis_i=0),
                            axis_i=0)  # (p, N·o/2, 2): Y_a + i·Y_b over all bins
                y = _dft(g, spec, inverse=True, length=p, axis=0, onesided=False)  # (p, N·o/2, 2) = (p, N·o)
                y = _transpose2d(g, g.op("Reshape", y, _const(g, [p, -1])))  # (N·o, p)
        elif mode == _MATMUL_ONE:
            (inv,) = consts
            prod = g.op("Reshape", prod, _const(g, [rows, -1]))  # (R, N·o)
            if base_type in (None, "Float"):
                # y = Pᵀ @ Ci + base in one Gemm: the transpose and the residual add are free.
                flat = g.op("Reshape", base, _const(g, [-1, p]))  # (N·o, p)
                y = g.op("Gemm", prod, inv, flat, transA_i=1)  # (N·o, p)
                fused = True
            else:
                y = g.op("MatMul", _transpose2d(g, prod), inv)  # (N·o, p)
        else:
            inner, outer = consts
            prod = g.op("Reshape", prod, _const(g, [plan.groups, 3 * plan.inner, -1]))  # (A/2, 3C, N·o)
            u = g.op("MatMul", inner, prod)  # (A/2, 2C, N·o)
            u = g.op("Reshape", u, _const(g, [plan.outer, -1]))  # (A, C·N·o)
            yt = g.op("Reshape", g.op("MatMul", outer, u), _const(g, [p, -1]))  # (p, N·o)
            y = _transpose2d(g, yt)  # (N·o, p)
        y = g.op("Reshape", y, shape)  # (..., o·p)
        if fused:
            return y
        if base_type not in (None, "Float"):
            from torch.onnx import symbolic_helper as sym

            y = g.op("Cast", y, to_i=sym.cast_pytorch_to_onnx[base_type])
        return g.op("Add", base, y)


def _sizes(value) -> list[int]:
    from torch.onnx import symbolic_helper as sym

    return sym._get_tensor_sizes(value)


def _dft(g, x, inverse: bool, length: int, axis: int = 1, onesided: bool = True):
    """DFT-20 of length ``length`` along ``axis``: one-sided (rfft; irfft) or a complex transform."""
    n = g.op("Constant", value_t=torch.tensor(length, dtype=torch.int64))
    axis_t = g.op("Constant", value_t=torch.tensor(axis, dtype=torch.int64))
    return g.op("DFT", x, n, axis_t, onesided_i=int(onesided), inverse_i=int(inverse))


_FORWARD_ROLES = {
    _MATMUL_ONE: ("fwd",),
    _MATMUL_TWO: ("fwd_outer", "fwd_inner"),
    "dft": ("rows",),
    _DFT_PAIRED: ("rows", "mirror", "swap", "sign_t", "half"),
}
_INVERSE_ROLES = {
    _MATMUL_ONE: ("inv",),
    _MATMUL_TWO: ("inv_inner", "inv_outer"),
    "dft": ("pick_a", "pick_b", "sign"),
    _DFT_PAIRED: ("pick_a", "pick_b", "sign", "swap", "sign_w", "high"),
}


def _mode(p: int, fft: str, blocks: int, inverse: bool) -> str:
    """How a transform over ``blocks`` blocks per token is emitted: the key of the role tables above.

    DFT: two real blocks per complex transform when ``blocks`` is even (so every token count pairs up).
    MatMul: two-stage transforms for a two-stage plan, except a forward one up to ``_ONE_STAGE_FORWARD_MAX_P``.
    """
    if fft == "dft":
        return _DFT_PAIRED if blocks % 2 == 0 else "dft"
    if not spectral_plan(p).two_stage or (not inverse and p <= _ONE_STAGE_FORWARD_MAX_P):
        return _MATMUL_ONE
    return _MATMUL_TWO


def bca_delta(
    x: torch.Tensor,
    w_freq: torch.Tensor,
    p: int,
    fft: str = "matmul",
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + Δ(x)`` through the exportable ops (``Δ(x)`` alone if ``base`` is None).

    x (..., q·p) → (..., o·p), in ``base``'s dtype (x's without a base); the BCA math runs in fp32.
    ``w_freq`` is :func:`frequency_kernels` of the kernels (block size ``p``). Under
    ``torch.onnx.export(dynamo=False)`` this becomes the subgraph of the module docstring.
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {FFT_MODES}; got {fft!r}")
    if tuple(w_freq.shape[:2]) != (1, spectral_plan(p).rows):
        raise ValueError(f"w_freq of shape {tuple(w_freq.shape)} is not a mixing constant for p={p} "
                         f"(expected (1, {spectral_plan(p).rows}, q, o))")
    if base is None:
        base = x.new_zeros(*x.shape[:-1], w_freq.shape[3] * p)
    consts = transform_constants(p, fft)
    _, _, q, o = w_freq.shape
    forward, inverse = _mode(p, fft, q, inverse=False), _mode(p, fft, o, inverse=True)
    spec = _Spectrum.apply(x, p, forward, *(consts[r] for r in _FORWARD_ROLES[forward]))
    return _AddSynthesis.apply(spec, base, w_freq, p, inverse, *(consts[r] for r in _INVERSE_ROLES[inverse]))


def folded_kernels(layer: BCALinear) -> dict[int, torch.Tensor]:
    """Active, unmerged adapters of ``layer`` summed per block size: ``{p: scaling-folded kernel (o, q, p)}``.

    ΔW is linear in the kernel, so adapters sharing a block size add up to one kernel exactly as
    :meth:`BCALinear.forward` sums their outputs.
    """
    if layer.adapters_disabled:
        return {}
    kernels: dict[int, torch.Tensor] = {}
    for name in layer.active_adapters:
        if name in layer.merged_adapters:
            continue
        p = layer.block_sizes[name]
        k = layer.scaled_kernel(name).detach().to(torch.float64)
        kernels[p] = k if p not in kernels else kernels[p] + k
    return kernels


def _export_forward(self: BCALinear, x: torch.Tensor) -> torch.Tensor:
    """BCALinear.forward while exporting: base layer + one exportable Δ subgraph per block size.

    The spectra of an input are computed once per block size and shared by every layer that reads
    the same tensor (q/k/v projections, gate/up): the traced graph then has one forward transform
    feeding several mixes.
    """
    result = self.base_layer(x)
    cache = self._bca_export_spectra
    fft = self._bca_export_fft
    for p in self._bca_export_block_sizes:
        forward = _mode(p, fft, self.in_features // p, inverse=False)
        inverse = _mode(p, fft, self.out_features // p, inverse=True)
        key = (id(x), x._version, p)  # (an in-place change of x would bump its version)
        if key not in cache:
            consts = [getattr(self, f"{_CONST_PREFIX}{p}_{r}") for r in _FORWARD_ROLES[forward]]
            cache[key] = (x, _Spectrum.apply(x, p, forward, *consts))  # keeps x alive: ids stay unique
        spec = cache[key][1]
        w_freq = getattr(self, f"{_FREQ_PREFIX}{p}")
        consts = [getattr(self, f"{_CONST_PREFIX}{p}_{r}") for r in _INVERSE_ROLES[inverse]]
        result = _AddSynthesis.apply(spec, result, w_freq, p, inverse, *consts)
    return result


@contextlib.contextmanager
def exportable_adapters(
    model: nn.Module,
    fft: str = "matmul",
    kernels: Callable[[str, BCALinear], dict[int, torch.Tensor]] | None = None,
) -> Iterator[nn.Module]:
    """Make every :class:`BCALinear` of ``model`` exportable by the TorchScript ONNX exporter (in place).

    Inside the context each adapted layer holds its frequency-domain constant as a buffer named
    ``bca_freq_p{p}`` (so the ONNX initializer is ``<module path>.bca_freq_p{p}``, one tensor per
    layer and block size: the place to swap adapters in a deployed graph) and its forward computes
    ``base(x) + Δ(x)`` through exportable ops (see the module docstring); the transform constants
    are buffers shared by all layers with the same ``p`` (``bca_dft_p{p}_<role>``, stored once).
    Everything is restored on exit. Layers whose adapters are all merged or disabled export as
    their base layer alone. Use it around ``torch.onnx.export(..., dynamo=False)`` or optimum-onnx.

    Args:
        model: a model carrying BCA adapters (e.g. after :func:`bca_deploy.load_adapter`).
        fft: ``"dft"`` (DFT-20 nodes; opset >= 20) or ``"matmul"`` (the transforms as MatMuls).
        kernels: ``kernels(path, layer) -> {p: kernel (o, q, p)}``, the kernels to export per layer;
            default :func:`folded_kernels` (the active adapters). The adapter-bank export passes
            placeholders here and replaces them with graph inputs afterwards.
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {FFT_MODES}; got {fft!r}")
    shared: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}
    spectra: dict = {}
    patched: list[tuple[BCALinear, list[str]]] = []
    try:
        for path, layer in bca_layers(model):
            device = layer.base_layer.weight.device
            names: list[str] = []
            sizes: list[int] = []
            patched.append((layer, names))  # before any change, so a failure part-way is undone too
            layer_kernels = folded_kernels(layer) if kernels is None else kernels(path, layer)
            for p, kernel in sorted(layer_kernels.items()):
                if (p, device) not in shared:
                    shared[(p, device)] = {k: v.to(device) for k, v in transform_constants(p, fft).items()}
                # Persistent buffers, so the exporter makes them named initializers (it collects the
                # state dict, deduplicated by identity: the shared constants are stored once).
                tensors = {f"{_FREQ_PREFIX}{p}": frequency_kernels(kernel).to(device)}
                tensors.update({f"{_CONST_PREFIX}{p}_{k}": v for k, v in shared[(p, device)].items()})
                for name, tensor in tensors.items():
                    layer.register_buffer(name, tensor, persistent=True)
                    names.append(name)
                sizes.append(p)
            layer._bca_export_block_sizes = sizes
            layer._bca_export_fft = fft
            layer._bca_export_spectra = spectra
            layer.forward = types.MethodType(_export_forward, layer)
        yield model
    finally:
        spectra.clear()
        for layer, names in patched:
            for name in names:
                delattr(layer, name)
            for attr in ("forward", "_bca_export_block_sizes", "_bca_export_fft", "_bca_export_spectra"):
                layer.__dict__.pop(attr, None)
