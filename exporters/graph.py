"""The unmerged BCA subgraph: frequency-domain constants and the ONNX nodes that apply them.

An unmerged adapted layer exports as ``y = base(x) + Δ(x)`` where ``Δ`` is this subgraph. Kernels are
turned into frequency-domain constants **at export time** (nothing is transformed at run time):

    W    (2, 2F, q, o)   W[c, h·F + f, i, o'] = M[f, h·q + i, c·o + o'],  M = spectral_mix_matrix(w)
    Cf   (2F, p)         forward real DFT basis: rows (h, f) = (re, f): cos(2πft/p), (im, f): −sin(2πft/p)
    Ci   (2F, p)         inverse real DFT basis: rows (c, f) = (re, f): a_f·cos(2πft/p)/p,
                         (im, f): −a_f·sin(2πft/p)/p, with a_f = 1 at f = 0 and f = p/2, else 2

with F = p // 2 + 1, q = d_in / p, o = d_out / p; ``h`` indexes the real/imaginary part of the input
spectrum X, ``c`` that of the output spectrum Y. Everything between the two transforms is laid out
**frequency-major**, so each step is one (batched) MatMul with no Transpose of activations::

    x (..., q·p) → (N·q, p)                                     N = number of tokens
    X  = Cf @ xᵀ                   (2F, N·q)   [h, f | n, i]    rfft (MatMul, or DFT + Transpose)
    P  = X.view(1, 2F, N, q) @ W   (2, 2F, N, o) [c, h, f | n, o']   all four real products at once
    Y  = ReduceSum_h P             (2F, N·o)   [c, f | n, o']   Y = X·Wᵀ per bin, as re and im rows
    y  = Yᵀ @ Ci + base            (N·o, p)                      irfft and the residual add (one Gemm)
    out = y.view(..., o·p)

The two transposes of the MatMul variant (``xᵀ`` and ``Yᵀ``) swap the axes of a 2-D operand, which
onnxruntime's GEMMs take as a flag (``FusedMatMul``/``Gemm`` with ``transA``/``transB``), so no
activation is copied to change layout, and the Gemm adds the base layer's output as its ``C``. The
DFT variant uses DFT-20 (``onesided=1``; inverse with ``dft_length=p``) with two real Transposes,
because DFT works along one axis of a trailing-(re, im) tensor.

The forward transform of an input is shared by all the layers that read it (q, k and v; gate and
up): one ``X`` feeds several mixes.

Several active adapters with the same block size are folded into one kernel (ΔW is linear in w);
adapters with different block sizes get one subgraph each. The math runs in float32 whatever the
model's dtype (as :func:`bca_deploy.ops.block_circulant_matmul` does), with Casts at the boundary.
"""

from __future__ import annotations

import contextlib
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
    "frequency_kernels",
    "dft_bases",
    "bca_delta",
    "exportable_adapters",
    "folded_kernels",
]

FFT_MODES = ("dft", "matmul")
#: DFT with a one-sided inverse needs opset 20 (and onnxruntime >= 1.27 to run correctly).
DFT_MIN_OPSET = 20
#: ReduceSum with ``axes`` as an input, used by both variants.
MATMUL_MIN_OPSET = 13

_FREQ_PREFIX = "bca_freq_p"
_FWD_PREFIX = "bca_rdft_p"
_INV_PREFIX = "bca_irdft_p"


def frequency_kernels(w: torch.Tensor) -> torch.Tensor:
    """Kernels (o, q, p) → the frequency-domain mixing constant ``W`` of shape (2, 2F, q, o), fp32.

    Built from :func:`bca_deploy.ops.spectral_mix_matrix` (``M``, shape (F, 2q, 2o)) by reindexing
    only: ``W[c, h·F + f, i, o'] = M[f, h·q + i, c·o + o']``.
    """
    o, q, p = w.shape
    f = p // 2 + 1
    mix = spectral_mix_matrix(w.detach().to(torch.float64))  # (F, 2q, 2o)
    mix = mix.reshape(f, 2, q, 2, o)  # [f, h, i, c, o']
    return mix.permute(3, 1, 0, 2, 4).reshape(2, 2 * f, q, o).to(torch.float32).contiguous()  # (2, 2F, q, o)


def dft_bases(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real-DFT bases ``(Cf, Ci)``, both (2F, p) fp32, computed in float64 (see the module docstring)."""
    f = p // 2 + 1
    freq = torch.arange(f, dtype=torch.float64)[:, None]  # (F, 1)
    t = torch.arange(p, dtype=torch.float64)[None, :]  # (1, p)
    angle = 2.0 * math.pi * ((freq * t) % p) / p  # exact phase reduction before the trig
    cos, sin = torch.cos(angle), torch.sin(angle)  # (F, p)
    forward = torch.cat([cos, -sin], dim=0)  # (2F, p)
    weight = torch.full((f, 1), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if p % 2 == 0:
        weight[-1] = 1.0
    inverse = torch.cat([weight * cos, -weight * sin], dim=0) / p  # (2F, p)
    return forward.to(torch.float32), inverse.to(torch.float32)


def _spectrum_math(x: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
    """x (..., q·p) → X (2F, N·q) fp32, rows (h, f), columns (n, i): the forward real DFT of every block."""
    p = cf.shape[1]
    return cf @ x.reshape(-1, p).float().T  # (2F, p) @ (p, N·q)


def _synthesis_math(spec: torch.Tensor, base: torch.Tensor, w_freq: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
    """base (..., o·p) + Δ, Δ from the spectra X (2F, N·q): mix, sum the real/imaginary halves, inverse DFT."""
    _, two_f, q, _ = w_freq.shape
    prod = spec.reshape(1, two_f, -1, q) @ w_freq  # (2, 2F, N, o)
    ys = prod.reshape(2, 2, two_f // 2, -1).sum(dim=1)  # (2, F, N·o)
    y = ys.reshape(two_f, -1).T @ ci  # (N·o, p)
    return base + y.reshape(base.shape).to(base.dtype)


def _const(g, values: list[int]):
    return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))


def _scalar_type(value) -> str | None:
    try:
        return value.type().scalarType()
    except RuntimeError:  # type not known to the tracer
        return None


class _Spectrum(torch.autograd.Function):
    """X = rfft of every block of x, frequency-major: (2F, N·q) fp32.

    ``forward`` computes it in PyTorch (the tracer needs values); ``symbolic`` emits the ONNX nodes.
    Export only: not differentiable.
    """

    @staticmethod
    def forward(ctx, x, cf, fft: str):  # type: ignore[override]
        return _spectrum_math(x, cf)

    @staticmethod
    def symbolic(g, x, cf, fft: str):  # pragma: no cover - run by the ONNX exporter
        from torch.onnx import symbolic_helper as sym

        two_f, p = sym._get_tensor_sizes(cf)
        if _scalar_type(x) not in (None, "Float"):
            x = g.op("Cast", x, to_i=torch.onnx.TensorProtoDataType.FLOAT)
        if fft == "matmul":
            xb = g.op("Reshape", x, _const(g, [-1, p]))  # (N·q, p)
            return g.op("MatMul", cf, g.op("Transpose", xb, perm_i=[1, 0]))  # (2F, N·q)
        xb = g.op("Reshape", x, _const(g, [-1, p, 1]))  # (N·q, p, 1)
        spec = _dft(g, xb, inverse=False, length=p)  # (N·q, F, 2)
        spec = g.op("Transpose", spec, perm_i=[2, 1, 0])  # (2, F, N·q)
        return g.op("Reshape", spec, _const(g, [two_f, -1]))  # (2F, N·q)


class _AddSynthesis(torch.autograd.Function):
    """base + Δ from the spectra X of the input: the mix by ``w_freq``, then the inverse real DFT."""

    @staticmethod
    def forward(ctx, spec, base, w_freq, ci, fft: str):  # type: ignore[override]
        return _synthesis_math(spec, base, w_freq, ci)

    @staticmethod
    def symbolic(g, spec, base, w_freq, ci, fft: str):  # pragma: no cover - run by the ONNX exporter
        _, two_f, q, _ = _sizes(w_freq)
        p = _sizes(ci)[1]
        f = two_f // 2
        base_type = _scalar_type(base)
        spec = g.op("Reshape", spec, _const(g, [1, two_f, -1, q]))  # (1, 2F, N, q)
        prod = g.op("MatMul", spec, w_freq)  # (2, 2F, N, o): all four real products per bin
        prod = g.op("Reshape", prod, _const(g, [2, 2, f, -1]))  # (2[c], 2[h], F, N·o)
        ys = g.op("ReduceSum", prod, _const(g, [1]), keepdims_i=0)  # (2, F, N·o): re, im of Y
        shape = g.op("Shape", base)
        if fft == "matmul":
            ys = g.op("Reshape", ys, _const(g, [two_f, -1]))  # (2F, N·o)
            if base_type in (None, "Float"):
                # y = Ysᵀ @ Ci + base in one Gemm: the transpose and the residual add are free.
                flat = g.op("Reshape", base, _const(g, [-1, p]))  # (N·o, p)
                y = g.op("Gemm", ys, ci, flat, transA_i=1)  # (N·o, p)
                return g.op("Reshape", y, shape)
            y = g.op("MatMul", g.op("Transpose", ys, perm_i=[1, 0]), ci)  # (N·o, p)
        else:
            ys = g.op("Transpose", ys, perm_i=[2, 1, 0])  # (N·o, F, 2)
            y = _dft(g, ys, inverse=True, length=p)  # (N·o, p, 1)
        y = g.op("Reshape", y, shape)  # (..., o·p)
        if base_type not in (None, "Float"):
            from torch.onnx import symbolic_helper as sym

            y = g.op("Cast", y, to_i=sym.cast_pytorch_to_onnx[base_type])
        return g.op("Add", base, y)


def _sizes(value) -> list[int]:
    from torch.onnx import symbolic_helper as sym

    return sym._get_tensor_sizes(value)


def _dft(g, x, inverse: bool, length: int):
    """One-sided DFT-20 along axis 1 of an (A, n, 1 or 2) tensor (rfft, or irfft with ``dft_length``)."""
    n = g.op("Constant", value_t=torch.tensor(length, dtype=torch.int64))
    axis = g.op("Constant", value_t=torch.tensor(1, dtype=torch.int64))
    return g.op("DFT", x, n, axis, onesided_i=1, inverse_i=int(inverse))


def bca_delta(
    x: torch.Tensor,
    w_freq: torch.Tensor,
    cf: torch.Tensor,
    ci: torch.Tensor,
    fft: str = "matmul",
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + Δ(x)`` through the exportable ops (``Δ(x)`` alone if ``base`` is None).

    x (..., q·p) → (..., o·p), in ``base``'s dtype (x's without a base); the BCA math runs in fp32.
    Under ``torch.onnx.export(dynamo=False)`` this becomes the subgraph of the module docstring
    (``fft="dft"``: DFT-20 nodes; ``fft="matmul"``: MatMuls by ``cf``/``ci``, the last one a Gemm
    that also adds ``base``).
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {FFT_MODES}; got {fft!r}")
    if base is None:
        o, p = w_freq.shape[3], cf.shape[1]
        base = x.new_zeros(*x.shape[:-1], o * p)
    return _AddSynthesis.apply(_Spectrum.apply(x, cf, fft), base, w_freq, ci, fft)


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
    for p in self._bca_export_block_sizes:
        key = (id(x), x._version, p)  # (an in-place change of x would bump its version)
        if key not in cache:
            cf = getattr(self, f"{_FWD_PREFIX}{p}")
            cache[key] = (x, _Spectrum.apply(x, cf, self._bca_export_fft))  # keeps x alive: ids stay unique
        spec = cache[key][1]
        w_freq = getattr(self, f"{_FREQ_PREFIX}{p}")
        ci = getattr(self, f"{_INV_PREFIX}{p}")
        result = _AddSynthesis.apply(spec, result, w_freq, ci, self._bca_export_fft)
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
    ``base(x) + Δ(x)`` through exportable ops (see the module docstring); the DFT bases are buffers
    shared by all layers with the same ``p`` (``bca_rdft_p{p}``/``bca_irdft_p{p}``, stored once).
    Everything is restored on exit. Layers whose adapters are all merged or disabled export as
    their base layer alone. Use it around ``torch.onnx.export(..., dynamo=False)`` or optimum-onnx.

    Args:
        model: a model carrying BCA adapters (e.g. after :func:`bca_deploy.load_adapter`).
        fft: ``"dft"`` (DFT-20 nodes; opset >= 20) or ``"matmul"`` (MatMuls by cos/sin bases).
        kernels: ``kernels(path, layer) -> {p: kernel (o, q, p)}``, the kernels to export per layer;
            default :func:`folded_kernels` (the active adapters). The adapter-bank export passes
            placeholders here and replaces them with graph inputs afterwards.
    """
    if fft not in FFT_MODES:
        raise ValueError(f"fft must be one of {FFT_MODES}; got {fft!r}")
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
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
                if p not in bases:
                    bases[p] = tuple(b.to(device) for b in dft_bases(p))  # type: ignore[assignment]
                # Persistent buffers, so the exporter makes them named initializers (it collects the
                # state dict, deduplicated by identity: the shared bases are stored once).
                # With fft="dft" the bases only serve the traced forward; the graph does not read them.
                tensors = {f"{_FREQ_PREFIX}{p}": frequency_kernels(kernel).to(device)}
                tensors[f"{_FWD_PREFIX}{p}"], tensors[f"{_INV_PREFIX}{p}"] = bases[p]
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
