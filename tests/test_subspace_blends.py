"""Linear blends of the Fisher-subspace modes (issue #13, item 1): the residual and layerwise modes blend
weight updates, ``ΔW'_S = (1 − σ)·ΔW_S + σ·ΔW_PS``, exactly by rank concatenation; the factor blend of the
original research code (``blend: factors``) stays available and shrinks ΔW by about (1 − σ)²."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sstmerge import merge_utility_safety
from sstmerge.merge.methods import linear_blend

from .conftest import TINY_TARGETS


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tiny_base):
    from .conftest import make_adapter

    root = tmp_path_factory.mktemp("blends")
    u = make_adapter(tiny_base, root / "u", seed=21, targets=("q_proj", "v_proj", "up_proj"))
    s = make_adapter(tiny_base, root / "s", seed=22, targets=TINY_TARGETS)
    return u, s, root / "cache"


def merged(tiny_base, trio, out, **options):
    u, s, cache = trio
    fisher = {"max_samples": 4, "fisher_batch_size": 4} if options.get("mode", "direct") != "direct" else {}
    return merge_utility_safety(tiny_base, [u], s, out, cache_dir=cache, stream=False, **fisher, **options)


def deltas(result) -> dict[str, torch.Tensor]:
    return {m: lm.delta(torch.float64) for m, lm in result.adapter.modules.items()}


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.0, 1.0), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_linear_blend_is_the_weighted_sum_of_the_two_updates(sigma, r, seed):
    gen = torch.Generator().manual_seed(seed)
    A, B, A_P, B_P = (torch.randn(shape, generator=gen) for shape in ((r, 6), (5, r), (r, 6), (5, r)))
    A2, B2 = linear_blend(A, B, A_P, B_P, sigma)
    expected = (1 - sigma) * (B.double() @ A.double()) + sigma * (B_P.double() @ A_P.double())
    torch.testing.assert_close(B2.double() @ A2.double(), expected, atol=1e-5, rtol=1e-5)
    assert A2.shape[0] == B2.shape[1] <= 2 * r
    if sigma == 0.0:
        assert A2 is A and B2 is B  # the original factors, untouched
    with pytest.raises(ValueError):
        linear_blend(A, B, A_P, B_P, 1.5)


def test_residual_at_r_1_is_direct_byte_for_byte(tiny_base, trio, tmp_path):
    merge_utility_safety(tiny_base, [trio[0]], trio[1], tmp_path / "direct")
    merge_utility_safety(tiny_base, [trio[0]], trio[1], tmp_path / "r1", mode="residual", residual_ratio=1.0, k=2,
                         max_samples=4, fisher_batch_size=4, cache_dir=trio[2])
    assert (tmp_path / "r1" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "direct" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("mode, key", [("residual", "residual_ratio"), ("fisher_mask", "residual_ratio")])
def test_the_merged_update_is_affine_in_r(tiny_base, trio, tmp_path, mode, key):
    at = {r: deltas(merged(tiny_base, trio, None, mode=mode, k=2 if mode == "residual" else 40, **{key: r}))
          for r in (0.0, 0.3, 1.0)}
    for m in at[1.0]:
        torch.testing.assert_close(at[0.3][m], 0.3 * at[1.0][m] + 0.7 * at[0.0][m], atol=1e-6, rtol=1e-5)


def test_function_level_share_kept_is_reported_and_linear(tiny_base, trio, tmp_path):
    lin = merged(tiny_base, trio, None, mode="residual", residual_ratio=0.7, k=2)
    fac = merged(tiny_base, trio, None, mode="residual", residual_ratio=0.7, k=2, blend="factors")
    per_lin, per_fac = lin.report["method"]["per_module"], fac.report["method"]["per_module"]
    assert lin.report["method"]["blend"] == "linear" and fac.report["method"]["blend"] == "factors"
    for m, e in per_lin.items():
        # ‖0.7 ΔW_S + 0.3 ΔW_PS‖ / ‖ΔW_S‖ lies within 0.3·‖ΔW_PS‖/‖ΔW_S‖ of 0.7 (triangle inequality)
        assert abs(e["delta_norm_kept"] - 0.7) <= 0.3 * e["projected_delta_norm_kept"] + 1e-6
        # the factor blend multiplies both factors by about 0.7: about 0.49 of ΔW when P φ is small
        if e["projected_delta_norm_kept"] < 0.05:
            assert per_fac[m]["delta_norm_kept"] < 0.6
    assert "delta_norm_kept_median" in lin.report["method"]


def test_layerwise_linear_uses_each_module_types_strength(tiny_base, trio, tmp_path):
    table = tmp_path / "preset.yaml"
    table.write_text("q_proj: 0.0\ndefault: 1.0\n")
    result = merged(tiny_base, trio, None, mode="layerwise", preset=str(table), k=2)
    direct = deltas(merge_utility_safety(tiny_base, [trio[0]], trio[1], None))
    got = deltas(result)
    for m in got:
        if m.endswith("q_proj"):  # σ = 0: the safety update unchanged, so the module equals direct's
            torch.testing.assert_close(got[m], direct[m], atol=1e-7, rtol=1e-6)
    assert {e["strength"] for m, e in result.report["method"]["per_module"].items() if m.endswith("q_proj")} == {0.0}


def test_blend_is_a_parameter_of_the_subspace_modes_only(tiny_base, trio, tmp_path):
    from sstmerge import ConfigError

    with pytest.raises(ConfigError, match="'blend' belongs to method"):
        merge_utility_safety(tiny_base, [trio[0]], trio[1], None, mode="ties", blend="linear")
    with pytest.raises(ConfigError, match="blend"):
        merge_utility_safety(tiny_base, [trio[0]], trio[1], None, mode="residual", blend="quadratic")
