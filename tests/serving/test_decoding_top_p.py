"""Top-p's partial sort (:func:`bca_deploy.serving.decoding._top_p_prefix`) and the sampler's draw, against their
definitions: the smallest prefix of a stable sort of the whole vocabulary whose mass reaches top-p (what the sampler
computed before, 2-6 ms a row at 32k tokens), and numpy's ``Generator.choice(V, p=probs)`` for the same seed.

Bit-equal, not close: a sampled row must draw the same token for the same seed as before, and as the reference
implementations used in ``test_logit_bias_min_p.py`` / ``test_engine.py`` expect.
"""

from __future__ import annotations

import numpy as np
import pytest

from bca_deploy.serving.decoding import Sampler, SamplingParams, _top_p_prefix


def _whole_sort_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The definition: a stable sort of every token by probability (ties by id), the smallest prefix whose mass
    reaches top_p kept, renormalised."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = cumulative - probs[order] < top_p
    filtered = np.zeros_like(probs)
    filtered[order[keep]] = probs[order[keep]]
    return filtered / filtered.sum()


def _distributions(seed: int, count: int):
    """Random distributions over 5..32k tokens: flat and peaked, with many ties, with most tokens at probability 0
    (top-k or min-p before top-p), and uniform (every token tied)."""
    rng = np.random.default_rng(seed)
    for trial in range(count):
        vocab = int(rng.choice([2, 5, 63, 64, 65, 511, 513, 4097, 32_000]))
        logits = rng.standard_normal(vocab) * float(rng.choice([0.05, 1.0, 3.0, 12.0]))
        kind = trial % 4
        if kind == 1:
            logits = np.round(logits, 1)
        elif kind == 2:
            logits[rng.random(vocab) < 0.8] = -np.inf
            logits[int(rng.integers(vocab))] = 0.0
        elif kind == 3:
            logits = np.zeros(vocab)
        probs = np.exp(logits - logits.max())
        yield probs / probs.sum(), float(rng.choice([1e-9, 0.3, 0.9, 0.95, 0.999, 1 - 1e-12]))


def test_top_p_keeps_exactly_the_whole_sorts_prefix():
    for probs, top_p in _distributions(0, 1200):
        order, kept = _top_p_prefix(probs, top_p)
        filtered = np.zeros_like(probs)
        filtered[order[:kept]] = probs[order[:kept]]
        assert np.array_equal(filtered / filtered.sum(), _whole_sort_top_p(probs, top_p)), (probs.size, top_p)
        assert kept >= 1 and probs[order[0]] == probs.max()


@pytest.mark.parametrize("fields", [{"temperature": 0.6, "top_p": 0.9}, {"temperature": 1.3, "top_k": 50, "top_p": 0.95},
                                    {"temperature": 1.0}, {"temperature": 0.8, "min_p": 0.05, "top_p": 0.8}])
def test_a_sampled_row_draws_what_numpys_choice_draws_for_its_seed(fields):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((12, 32_000)) * 4).astype(np.float32)
    logits[3, :31_990] = logits[3, 0]  # most of a row tied
    for seed in (0, 7, 12345):
        sampler = Sampler(SamplingParams(do_sample=True, seed=seed, **fields))
        reference = np.random.default_rng(seed)
        for row in logits:
            probs = sampler.distribution(row)
            expected = int(reference.choice(probs.size, p=probs))
            assert sampler.draw(row) == expected


def test_the_partial_sort_grows_until_the_prefix_ends_inside_it():
    # a flat distribution over 32k tokens: top-p 0.999 needs nearly all of them (k = 64, 512, 4096, 32768: the last
    # pass is the whole sort); a peaked one ends inside the first 64
    flat = np.full(32_000, 1 / 32_000)
    order, kept = _top_p_prefix(flat, 0.999)
    assert kept == int(np.ceil(0.999 * 32_000)) and np.array_equal(order[:kept], np.arange(kept))  # ties by id
    peaked = np.exp(-np.arange(32_000, dtype=np.float64))
    peaked /= peaked.sum()
    order, kept = _top_p_prefix(peaked[::-1].copy(), 0.9)
    assert kept == 3 and list(order[:3]) == [31_999, 31_998, 31_997]  # 0.632 + 0.233 < 0.9 <= + 0.086
