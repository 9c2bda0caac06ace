"""Count sketches of per-sample gradients (linalg.sketch, issue #16's building block): exact when m ≥ D,
converging as m grows on random low-rank gradients, blocks adding up to a sketch of the concatenation, and an
error estimate from two sketches that tracks the true error."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sstmerge.linalg.sketch import (
    count_sketch,
    gram,
    gram_error_estimate,
    relative_error,
    gram_error_from_halves,
    module_sketch_width,
    sketch_blocks,
    sketch_halves,
    sketch_hash,
    sketch_module,
    sketch_module_chunks,
)
from sstmerge.linalg.task_vectors import module_seed


def low_rank_gradients(n: int, d: int, rank: int, seed: int) -> torch.Tensor:
    """(n, d) rows in a random rank-``rank`` subspace (per-sample gradients are strongly correlated)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)


@pytest.mark.parametrize("m", [300, 301, 1000])
def test_a_sketch_at_least_as_wide_as_the_gradients_is_exact(m):
    G = low_rank_gradients(6, 300, 4, seed=1)
    bucket, sign = sketch_hash(300, m, seed=7)
    assert len(set(bucket.tolist())) == 300  # distinct buckets
    torch.testing.assert_close(gram(count_sketch(G, bucket, sign, m)), (G.double() @ G.double().T), rtol=1e-5, atol=1e-6)


def test_the_sketched_gram_converges_as_m_grows():
    G = low_rank_gradients(8, 4000, 3, seed=2)
    exact = G.double() @ G.double().T
    errors = {}
    for m in (32, 128, 512, 2048):
        errors[m] = statistics.mean(relative_error(gram(count_sketch(G, *sketch_hash(4000, m, seed), m)), exact)
                                    for seed in range(12))
    assert errors[32] > errors[128] > errors[512] > errors[2048]
    assert errors[2048] < 0.5 * errors[128]  # O(1/√m): 16x the buckets, about 1/4 of the error
    assert errors[2048] < 0.1


def test_blocks_sketch_the_concatenation_and_do_not_depend_on_order():
    blocks = {"q": low_rank_gradients(5, 40, 2, 3), "v": low_rank_gradients(5, 70, 2, 4)}
    m = 32
    S = sketch_blocks(blocks, m, seed=11)
    torch.testing.assert_close(S, sketch_blocks(dict(reversed(list(blocks.items()))), m, seed=11))  # up to rounding
    # the same as one count sketch of [G_q, G_v] with the blocks' hashes side by side
    hashes = [sketch_hash(G.shape[1], m, module_seed(11, name)) for name, G in blocks.items()]
    bucket = torch.cat([h[0] for h in hashes])
    sign = torch.cat([h[1] for h in hashes])
    torch.testing.assert_close(S, count_sketch(torch.cat(list(blocks.values()), dim=1), bucket, sign, m))
    # blocks sketched separately (another process, another batch) add up
    torch.testing.assert_close(S, sketch_blocks({"q": blocks["q"]}, m, 11) + sketch_blocks({"v": blocks["v"]}, m, 11))


def test_two_sketches_estimate_the_error_of_one():
    G = low_rank_gradients(10, 3000, 4, seed=5)
    exact = G.double() @ G.double().T
    for m in (64, 512):
        true, est = [], []
        for seed in range(10):
            S1 = count_sketch(G, *sketch_hash(3000, m, 2 * seed), m)
            S2 = count_sketch(G, *sketch_hash(3000, m, 2 * seed + 1), m)
            true.append(relative_error(gram(S1), exact))
            est.append(gram_error_estimate(S1, S2))
        assert 0.5 < statistics.mean(est) / statistics.mean(true) < 2.0, (m, true, est)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60), st.integers(1, 80), st.integers(0, 2**31), st.floats(-3, 3), st.floats(-3, 3))
def test_sketching_is_linear_and_well_formed(d, m, seed, a, b):
    bucket, sign = sketch_hash(d, m, seed)
    assert bucket.shape == sign.shape == (d,) and int(bucket.min()) >= 0 and int(bucket.max()) < m
    assert set(sign.tolist()) <= {-1.0, 1.0}
    G, H = low_rank_gradients(3, d, 2, seed % 1000), low_rank_gradients(3, d, 2, seed % 1000 + 1)
    torch.testing.assert_close(count_sketch(a * G + b * H, bucket, sign, m),
                               a * count_sketch(G, bucket, sign, m) + b * count_sketch(H, bucket, sign, m),
                               rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_named():
    bucket, sign = sketch_hash(10, 4, 0)
    with pytest.raises(ValueError, match=r"G \(3, 9\) needs \(n, 10\) columns"):
        count_sketch(torch.zeros(3, 9), bucket, sign, 4)
    with pytest.raises(ValueError, match=r"out is \(3, 5\), expected \(3, 4\)"):
        count_sketch(torch.zeros(3, 10), bucket, sign, 4, out=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="need d >= 0 and m >= 1"):
        sketch_hash(10, 0, 0)
    with pytest.raises(ValueError, match="no blocks"):
        sketch_blocks({}, 4, 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(2, 128), st.integers(0, 2**31), st.data())
def test_module_sketch_chunks_add_up_and_small_modules_are_exact(d, m, seed, data):
    """A module sketched in column chunks (any split, any order) equals the whole-block sketch; a module with
    d ≤ m is kept exactly (inner products unchanged); the width is d or m rounded down to even."""
    G = low_rank_gradients(4, d, 2, seed % 1000)
    whole = sketch_module(G, "layer.q_proj", m, seed)
    assert whole.shape == (4, module_sketch_width(d, m)) and whole.shape[1] == (d if d <= m else m - m % 2)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(d - 1, 1)), max_size=4)))) if d > 1 else []
    bounds = [0, *[c for c in cuts if 0 < c < d], d]
    chunks = [(lo, hi, G[:, lo:hi]) for lo, hi in zip(bounds, bounds[1:])][::-1]
    torch.testing.assert_close(sketch_module_chunks(chunks, "layer.q_proj", d, m, seed), whole, rtol=1e-5, atol=1e-5)
    if d <= m:
        torch.testing.assert_close(gram(whole), (G.double() @ G.double().T), rtol=1e-5, atol=1e-5)
        assert sketch_halves(whole, d, m) is None


def test_module_sketch_halves_are_independent_unbiased_estimates():
    """The two halves of a sketched module each estimate G Gᵀ; their mean is the stored sketch's Gram, and the
    error estimate from them tracks the true error of that mean (within 2× over seeds)."""
    G = low_rank_gradients(20, 4000, 6, 0)
    exact = G.double() @ G.double().T
    true, est = [], []
    for seed in range(12):
        SG = sketch_module(G, "m", 256, seed)
        K1, K2 = (h.double() @ h.double().T for h in sketch_halves(SG, 4000, 256))
        torch.testing.assert_close(gram(SG), (K1 + K2) / 2, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))
        true.append(relative_error(gram(SG), exact))
        est.append(gram_error_from_halves(K1, K2))
    assert 0.5 < statistics.mean(est) / statistics.mean(true) < 2.0, (true, est)
    with pytest.raises(ValueError, match="m >= 2"):
        module_sketch_width(10, 1)
