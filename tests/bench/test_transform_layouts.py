"""bench/transform_layouts.py: every layout it times computes the same transform (checked against torch.fft), and
the layout it marks as exported is the one the exporter emits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_helpers import load_bench_script

layouts = load_bench_script("transform_layouts.py", "bench_transform_layouts")


def _spectral_rows_by_fft(x: np.ndarray, p: int) -> np.ndarray:
    """The spectral rows X (R, blocks) from torch.fft.rfft and the plan's slots (Gauss rows), independently."""
    from bca_deploy.exporters.graph import spectral_plan

    spec = torch.fft.rfft(torch.from_numpy(x).double(), dim=-1)  # (blocks, p//2 + 1)
    rows = []
    for k, k2 in spectral_plan(p).slots:
        if k2 == -1:
            re, im = spec[:, k].real, spec[:, k].imag
            rows += [re + im, im, re]
        else:
            rows += [spec[:, k].real, spec[:, k2].real if k2 >= 0 else torch.zeros_like(spec[:, 0].real),
                     torch.zeros_like(spec[:, 0].real)]
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("p", [64, 128, 256])
def test_every_forward_layout_gives_the_spectral_rows(p):
    x = np.random.default_rng(p).standard_normal((12, p)).astype(np.float32)
    expected = _spectral_rows_by_fft(x, p)
    assert np.abs(layouts.reference_forward(x, p) - expected).max() < 1e-9
    for variant in layouts.FORWARD:
        got = layouts.session(layouts.forward_graph(variant, p, 12)).run(None, {"x": x})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4 * np.abs(expected).max(), variant


@pytest.mark.parametrize("p", [64, 256])
def test_every_inverse_layout_inverts_the_forward(p):
    """The product rows of an identity kernel (W = 1: Gauss weights (Wr, Wr + Wi, Wi − Wr) = (1, 1, −1) for a complex
    bin, (1, 1, 0) for the real pair) invert to the block itself: y = base + x."""
    from bca_deploy.exporters.graph import spectral_plan

    plan = spectral_plan(p)
    x = np.random.default_rng(p).standard_normal((6, p))
    spec = torch.fft.rfft(torch.from_numpy(x), dim=-1)
    prod = []
    for k, k2 in plan.slots:
        if k2 == -1:
            prod += [spec[:, k].real + spec[:, k].imag, spec[:, k].imag, -spec[:, k].real]
        else:
            prod += [spec[:, k].real, spec[:, k2].real if k2 >= 0 else torch.zeros(6, dtype=torch.float64),
                     torch.zeros(6, dtype=torch.float64)]
    prod = torch.stack(prod).numpy().astype(np.float32)
    base = np.random.default_rng(1).standard_normal((6, p)).astype(np.float32)
    expected = base + x
    assert np.abs(layouts.reference_inverse(prod.astype(np.float64), base, p) - expected).max() < 1e-4
    for variant in layouts.INVERSE:
        got = layouts.session(layouts.inverse_graph(variant, p, 6)).run(None, {"P": prod, "base": base})[0]
        assert np.abs(got - expected).max() < 1e-4, variant


def test_the_layout_marked_exported_is_the_exporters():
    from bca_deploy.exporters.graph import _MATMUL_ONE, _mode

    for p in (64, 128, 256):
        forward = _mode(p, "matmul", 8, inverse=False)
        assert layouts.landed("forward", p) == ("one-matmul" if forward == _MATMUL_ONE else "two-stage-no-transpose")
        assert layouts.landed("inverse", p) == ("one-gemm" if _mode(p, "matmul", 8, inverse=True) == _MATMUL_ONE
                                                else "two-stage")


def test_bad_options_are_usage_errors():
    for argv in (["--repeats", "0"], ["--warmup", "-1"], ["--workloads", "nothing"]):
        with pytest.raises(SystemExit) as caught:
            layouts.main(argv)
        assert caught.value.code == 2
