"""Property tests (Hypothesis) for the pure low-rank algebra."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sstmerge.linalg.lowrank import concat_lora, pad_rank, truncate_lora

dims = st.integers(min_value=1, max_value=9)


@st.composite
def lora_terms(draw):
    d_out, d_in = draw(dims), draw(dims)
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    terms = []
    for _ in range(n):
        r = draw(st.integers(1, 5))
        c = draw(st.one_of(st.just(0.0), st.floats(1e-3, 3), st.floats(-3, -1e-3)))
        terms.append((c, torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                      torch.randn(d_out, r, generator=gen, dtype=torch.float64)))
    return terms


@settings(max_examples=60, deadline=None)
@given(lora_terms())
def test_concat_is_the_weighted_sum_of_updates(terms):
    A, B = concat_lora(terms)
    expected = sum(c * (b @ a) for c, a, b in terms)
    torch.testing.assert_close(B @ A, expected, atol=1e-10, rtol=1e-10)
    assert A.shape[0] == sum(a.shape[0] for _, a, _ in terms)


@settings(max_examples=60, deadline=None)
@given(lora_terms(), st.integers(0, 4))
def test_padding_keeps_the_update(terms, extra):
    A, B = concat_lora(terms)
    A2, B2 = pad_rank(A, B, A.shape[0] + extra)
    torch.testing.assert_close(B2 @ A2, B @ A)


@settings(max_examples=60, deadline=None)
@given(lora_terms(), st.integers(1, 12))
def test_truncation_error_is_optimal_and_exact_at_full_rank(terms, rank):
    A, B = concat_lora(terms)
    dW = B @ A
    A_k, B_k, err = truncate_lora(A, B, rank)
    S = torch.linalg.svdvals(dW)
    total = float((S**2).sum())
    tail = float(torch.sqrt((S[rank:] ** 2).sum() / total)) if total > 0 else 0.0
    actual = float((B_k @ A_k - dW).norm() / dW.norm()) if total > 0 else 0.0
    assert abs(err - tail) < 1e-6 and abs(actual - tail) < 1e-6
    assert A_k.shape[0] == rank and B_k.shape[1] == rank
    if rank >= min(dW.shape):
        torch.testing.assert_close(B_k @ A_k, dW, atol=1e-8, rtol=1e-8)


def test_factorwise_addition_would_be_wrong():
    """Documents why composition concatenates: (B1+B2)(A1+A2) != B1A1 + B2A2."""
    gen = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    B1, B2 = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    A, B = concat_lora([(1.0, A1, B1), (1.0, A2, B2)])
    torch.testing.assert_close(B @ A, B1 @ A1 + B2 @ A2)
    assert ((B1 + B2) @ (A1 + A2) - (B1 @ A1 + B2 @ A2)).abs().max() > 1e-3
