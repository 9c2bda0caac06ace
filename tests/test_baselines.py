"""Baseline modes: TIES, DARE, magnitude (PEFT's merge_utils on dense ΔW), Safe LoRA, SafeMERGE, diagonal-Fisher mask."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft.utils import merge_utils

from sstmerge import ConfigError, UnsupportedAdapterError, merge_utility_safety, read_adapter
from sstmerge.cli.main import cli, expand_greedy
from sstmerge.linalg import task_vectors as tv

from .conftest import TINY_TARGETS
from .test_merge_direct import base_weights, peft_weights
from .test_validation import assert_nothing_written

W = [0.7, 1.0, 0.4]


def tensors(n=3, shape=(6, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


def lowrank(d_out, d_in, r, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, r, generator=gen, dtype=torch.float64) @ torch.randn(r, d_in, generator=gen, dtype=torch.float64)


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def projector(V):
    return V @ torch.linalg.pinv(V)  # P_V = V V⁺, independent of column_space_basis


# ----------------------------------------------------------------------------------------- pure tensor math
def top_share(d, density):
    k = int(density * d.numel())
    return d * (d.abs() >= d.abs().flatten().sort(descending=True).values[k - 1])


def test_ties_keeps_the_elected_sign_and_averages_the_agreeing():
    ds = tensors()
    out = tv.ties_merge(ds, W, density=0.5)
    trimmed = [top_share(d, 0.5) for d in ds]
    elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0).double()
    nonzero = out != 0
    assert nonzero.float().mean() > 0.5
    assert (torch.sign(out[nonzero]) == elected[nonzero]).all()
    agree = [torch.sign(t) == elected for t in trimmed]
    expected = sum(w * t * a for w, t, a in zip(W, trimmed, agree)) / torch.clamp(sum(a.double() for a in agree), min=1)
    close(out, expected)


def test_density_one_is_task_arithmetic_for_dare_linear_and_magnitude():
    ds = tensors()
    ta = sum(w * d for w, d in zip(W, ds))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PEFT warning: density 1 is a legitimate setting here
        outs = [tv.dare_merge(ds, W, 1.0, seed=3), tv.magnitude_merge(ds, W, 1.0), tv.task_arithmetic(ds, W)]
    for out in outs:
        close(out, ta)


def test_ties_at_density_one_is_the_disjoint_mean_not_the_sum():
    d = tensors(1)[0]
    close(tv.ties_merge([d], [0.7], 1.0), 0.7 * d)
    positive = [t.abs() for t in tensors()]  # all signs agree: TIES (PEFT) averages the weighted tensors
    mean = sum(w * t for w, t in zip(W, positive)) / 3
    close(tv.ties_merge(positive, W, 1.0), mean)
    close(tv.dare_merge(positive, W, 1.0, seed=0, use_ties=True), mean)


def test_dare_is_reproducible_rescaled_and_leaves_the_global_rng_alone():
    ds = tensors()
    state = torch.get_rng_state()
    a, b, c = (tv.dare_merge(ds, W, 0.3, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    single = tv.dare_merge(ds[:1], [1.0], 0.3, seed=1)
    kept = single != 0
    close(single[kept], ds[0][kept] / 0.3)  # survivors are rescaled by 1/density
    assert 0.1 < kept.double().mean() < 0.5
    assert tv.module_seed(0, "a.q_proj") != tv.module_seed(0, "a.v_proj")
    assert tv.module_seed(1, "a.q_proj") == tv.module_seed(0, "a.q_proj") + 1


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.9])
def test_magnitude_keeps_exactly_the_top_share_of_each_task_tensor(density):
    ds = tensors()
    k = int(density * ds[0].numel())
    for d in ds:
        out = tv.magnitude_merge([d], [1.0], density)
        kept = out != 0
        assert int(kept.sum()) == k
        assert out[kept].abs().min() > d[~kept].abs().max()
        assert torch.equal(out[kept], d[kept])
    each = sum(w * tv.magnitude_merge([d], [1.0], density) for w, d in zip(W, ds))
    close(tv.magnitude_merge(ds, W, density), each)  # pruned per task tensor, then summed


def test_calls_are_peft_merge_utils():
    ds, w = tensors(), torch.tensor(W, dtype=torch.float64)
    assert torch.equal(tv.ties_merge(ds, W, 0.4, "frequency"), merge_utils.ties(ds, w, 0.4, "frequency"))
    assert torch.equal(tv.magnitude_merge(ds, W, 0.4), merge_utils.magnitude_prune(ds, w, 0.4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        expected = merge_utils.dare_ties(ds, w, 0.4, "total")
    assert torch.equal(tv.dare_merge(ds, W, 0.4, seed=5, use_ties=True), expected)


def test_safety_projection_is_idempotent():
    V = lowrank(12, 10, 3, seed=0)
    Q = tv.column_space_basis(V)
    assert Q.shape == (12, 3)
    X = tensors(1, (12, 10))[0]
    PX = tv.project_columns(X, Q)
    close(tv.project_columns(PX, Q), PX)
    close(tv.project_columns(V, Q), V)
    close(PX, projector(V) @ X, atol=1e-10)
    assert tv.frobenius_cosine(X, PX) == pytest.approx(float(PX.norm() / X.norm()))
    assert tv.column_space_basis(torch.zeros(4, 5, dtype=torch.float64)).shape == (4, 0)


def test_safe_lora_threshold_zero_projects_nothing_and_above_one_everything():
    us, S, c, w = [lowrank(12, 10, 2, seed=s) for s in (1, 2)], lowrank(12, 10, 3, seed=3), [1.0, 0.5], 0.8
    out, sims, projected = tv.safe_lora_merge(us, c, S, w, threshold=0.0)
    assert projected == [False, False] and all(0 < s < 1 for s in sims)
    close(out, us[0] + 0.5 * us[1] + 0.8 * S)
    out, _, projected = tv.safe_lora_merge(us, c, S, w, threshold=1.01)
    P = projector(S)
    assert projected == [True, True]
    close(out, P @ us[0] + 0.5 * P @ us[1] + 0.8 * S, atol=1e-10)
    out, sims, projected = tv.safe_lora_merge(us, c, None, w, threshold=1.01)  # no safety direction here
    assert sims == [None, None] and projected == [False, False]
    close(out, us[0] + 0.5 * us[1])


def test_safemerge_alpha_and_flags():
    us, S, c, w = [lowrank(12, 10, 2, seed=s) for s in (1, 2)], lowrank(12, 10, 3, seed=3), [1.0, 0.5], 0.8
    utility = us[0] + 0.5 * us[1]
    out, _, flagged = tv.safemerge_merge(us, c, S, w, threshold=1.01, alpha=1.0)
    assert flagged
    close(out, utility)  # α = 1: utility only on flagged modules
    out, _, _ = tv.safemerge_merge(us, c, S, w, threshold=1.01, alpha=0.25)
    close(out, 0.25 * utility + 0.75 * 0.8 * S)
    out, _, flagged = tv.safemerge_merge(us, c, S, w, threshold=0.0, alpha=0.25)
    assert not flagged
    close(out, utility)  # unflagged: no safety update at all


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture
def trio(adapter_factory):
    u1 = adapter_factory(targets=("q_proj", "v_proj"), r=4, alpha=8)
    u2 = adapter_factory(targets=("q_proj", "k_proj", "up_proj"), r=2, alpha=4, use_rslora=True)
    s = adapter_factory(targets=TINY_TARGETS, r=4, alpha=16)
    return u1, u2, s


def dense_inputs(utility, safety, module, coefficients, safety_weight):
    """Task tensors and weights of one module, from the adapters as read (float64)."""
    ds, ws = [], []
    for adapter, c in zip(utility, coefficients):
        if module in adapter.modules:
            ds.append(adapter.modules[module].delta())
            ws.append(c)
    if module in safety.modules:
        ds.append(safety.modules[module].delta())
        ws.append(safety_weight)
    return ds, torch.tensor(ws, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["ties", "dare_linear", "dare_ties", "magnitude"])
def test_full_rank_merge_loaded_by_peft_equals_peft_merge_utils(tiny_base, tmp_path, trio, mode):
    u1, u2, s = trio
    out = tmp_path / "merged"
    result = merge_utility_safety(tiny_base, [u1, u2], s, out, mode=mode, density=0.4, safety_weight=0.8,
                                  recompress_rank=32, seed=7)  # 32 = min(d_out, d_in) of every tiny module
    utility, safety = [read_adapter(u1), read_adapter(u2)], read_adapter(s)
    W0, W = base_weights(tiny_base), peft_weights(tiny_base, out)
    assert set(result.adapter.modules) == set(safety.modules)
    for module in safety.modules:
        ds, w = dense_inputs(utility, safety, module, [1.0, 1.0], 0.8)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tv.module_seed(7, module))
            expected = {"ties": lambda: merge_utils.ties(ds, w, 0.4), "magnitude": lambda: merge_utils.magnitude_prune(ds, w, 0.4),
                        "dare_linear": lambda: merge_utils.dare_linear(ds, w, 0.4),
                        "dare_ties": lambda: merge_utils.dare_ties(ds, w, 0.4)}[mode]()
        key = module + ".weight"
        torch.testing.assert_close(W[key] - W0[key], expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
        assert expected.abs().max() > 1e-3
    untouched = [k for k in W0 if k.removesuffix(".weight") not in safety.modules]
    assert untouched and all(torch.equal(W[k], W0[k]) for k in untouched)
    assert result.report["output"]["max_recompression_rel_error"] < 1e-10
    assert result.report["method"]["density"] == 0.4


def test_default_rank_reports_the_real_truncation_error(tiny_base, tmp_path, trio):
    u1, u2, s = trio
    result = merge_utility_safety(tiny_base, [u1, u2], s, None, mode="ties", density=0.3)
    utility, safety = [read_adapter(u1), read_adapter(u2)], read_adapter(s)
    module = "model.layers.0.self_attn.q_proj"  # in all three adapters: rank 4 + 2 + 4
    entry = result.report["modules"][module]
    assert entry["rank_inputs"] == 10 and entry["rank"] == 10
    ds, w = dense_inputs(utility, safety, module, [1.0, 1.0], 1.0)
    dense = merge_utils.ties(ds, w, 0.3)
    S = torch.linalg.svdvals(dense)
    tail = float(torch.sqrt((S[10:] ** 2).sum() / (S**2).sum()))
    actual = float((result.adapter.modules[module].delta() - dense).norm() / dense.norm())
    assert tail > 1e-3 and entry["recompression_rel_error"] == pytest.approx(tail, rel=1e-9)
    assert actual == pytest.approx(tail, rel=1e-4)
    assert result.report["output"]["max_recompression_rel_error"] >= tail
    assert result.report["output"]["rank"] == max(e["rank"] for e in result.report["modules"].values())


@pytest.mark.parametrize("mode", ["safe_lora", "safemerge"])
def test_safety_direction_modes_match_a_hand_computation(tiny_base, tmp_path, trio, mode):
    u1, u2, s = trio
    utility, safety = [read_adapter(u1), read_adapter(u2)], read_adapter(s)
    coefs, w, alpha = [1.0, 0.5], 0.8, 0.3
    sims = {}
    for module, lm in safety.modules.items():
        P = projector(lm.delta())
        sims[module] = [float((P @ u.modules[module].delta()).norm() / u.modules[module].delta().norm())
                        if module in u.modules else None for u in utility]
    ordered = sorted(x for v in sims.values() for x in v if x is not None)
    tau = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two values: no ties at τ
    out = tmp_path / "merged"
    result = merge_utility_safety(tiny_base, [u1, u2], s, out, mode=mode, similarity_threshold=tau, stream=False,
                                  safety_weight=w, utility_weights=[1.0, 0.5],
                                  **({"safemerge_alpha": alpha} if mode == "safemerge" else {}))
    W0, W = base_weights(tiny_base), peft_weights(tiny_base, out)
    n_changed = 0
    for module, lm in safety.modules.items():
        P, dS = projector(lm.delta()), lm.delta()
        below = [x is not None and x < tau for x in sims[module]]
        parts = [(c, u.modules[module].delta(), b) for u, c, b in zip(utility, coefs, below) if module in u.modules]
        if mode == "safe_lora":
            expected = sum((c * (P @ d if b else d) for c, d, b in parts), w * dS)
            n_changed += any(below)
            assert result.report["modules"][module]["projected"] == [b for _, _, b in parts]
        else:
            util = sum((c * d for c, d, _ in parts), torch.zeros_like(dS))
            expected = alpha * util + (1 - alpha) * w * dS if any(below) else util
            n_changed += any(below)
            assert result.report["modules"][module]["flagged"] == any(below)
        got = result.report["modules"][module]["similarity"]
        assert got == pytest.approx([x for x in sims[module] if x is not None], rel=1e-9)
        close(result.adapter.modules[module].delta(), expected, atol=1e-10)  # rank ≤ Σ r: exact
        key = module + ".weight"
        torch.testing.assert_close(W[key] - W0[key], expected, atol=1e-5, rtol=1e-5)
    assert 0 < n_changed < len(safety.modules)  # τ really splits the modules
    assert result.report["output"]["max_recompression_rel_error"] < 1e-10
    summary = result.report["method"]
    assert (summary["n_modules_projected"] if mode == "safe_lora" else summary["n_modules_flagged"]) == n_changed


def test_fisher_mask_is_the_residual_mode_with_the_diagonal_estimator(tiny_base, tmp_path, adapter_factory):
    u = adapter_factory(targets=("q_proj", "v_proj"))
    s = adapter_factory(targets=("q_proj", "v_proj", "up_proj"))
    common = dict(k=40, residual_ratio=0.25, max_samples=4, cache_dir=tmp_path / "cache")
    mask = merge_utility_safety(tiny_base, [u], s, tmp_path / "mask", mode="fisher_mask", **common)
    ref = merge_utility_safety(tiny_base, [u], s, tmp_path / "ref", mode="residual", fisher="diagonal", **common)
    m = mask.report["method"]
    assert m["name"] == "fisher_mask" and m["estimator"] == "diagonal" and m["residual_ratio"] == 0.25
    assert all(e["strength"] == 0.75 for e in m["per_module"].values())
    for name, lm in ref.adapter.modules.items():
        assert torch.equal(mask.adapter.modules[name].A, lm.A) and torch.equal(mask.adapter.modules[name].B, lm.B)
    saved = json.loads((tmp_path / "mask" / "merge_report.json").read_text())
    assert saved["method"]["estimator"] == "diagonal"


# ----------------------------------------------------------------------------------------- CLI and errors
def run(args):
    return CliRunner().invoke(cli, expand_greedy(list(map(str, args))), catch_exceptions=False)


def test_cli_ties_writes_adapter_and_report(tiny_base, tmp_path, adapter_factory):
    u, s = adapter_factory(), adapter_factory(targets=("q_proj", "k_proj"))
    out = tmp_path / "merged"
    res = run(["-q", "merge", "--base", tiny_base, "--utility", u, "--safety", s, "--mode", "ties",
               "--density", "0.3", "--out", out])
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["config"]["mode"] == "ties" and report["method"]["density"] == 0.3
    assert report["method"]["majority_sign_method"] == "total"
    modules = report["modules"]
    assert len(modules) == 6 and all(e["recompression_rel_error"] > 0 for e in modules.values())
    assert report["output"]["max_recompression_rel_error"] == max(e["recompression_rel_error"] for e in modules.values())
    assert "density: 0.3" in (out / "merge_report.txt").read_text()
    assert len(read_adapter(out).modules) == 6


def test_methods_command_lists_the_baselines():
    res = run(["methods"])
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    for name in ("ties", "dare_linear", "dare_ties", "magnitude", "safe_lora", "safemerge", "fisher_mask"):
        assert len(lines[name].split()) > 3, lines[name]
    # each method's own parameters are listed under it
    assert "--density" in res.stdout and "--safemerge-alpha" in res.stdout and "--residual-ratio" in res.stdout


@pytest.mark.parametrize("mode,key,value", [("ties", "density", "0"), ("magnitude", "density", "1.5"),
                                            ("safemerge", "safemerge-alpha", "2"),
                                            ("safe_lora", "similarity-threshold", "-0.1")])
def test_out_of_range_options_are_rejected(tiny_base, tmp_path, adapter_factory, mode, key, value):
    out = tmp_path / "merged"
    res = run(["merge", "--base", tiny_base, "--utility", adapter_factory(), "--mode", mode, f"--{key}", value,
               "--out", out])
    assert res.exit_code == 2 and key.replace("-", "_") in res.stderr, res.stderr
    assert_nothing_written(out)
    with pytest.raises(ConfigError, match=key.replace("-", "_")):
        merge_utility_safety(tiny_base, [], None, None, mode=mode, **{key.replace("-", "_"): float(value)})


@pytest.mark.parametrize("mode", ["safe_lora", "safemerge", "fisher_mask"])
def test_safety_modes_without_safety_fail_before_any_work(tiny_base, tmp_path, adapter_factory, mode):
    u = adapter_factory()
    out = tmp_path / "merged"
    res = run(["merge", "--base", tiny_base, "--utility", u, "--mode", mode, "--out", out])
    assert res.exit_code == 2 and mode in res.stderr and "--safety" in res.stderr, res.stderr
    assert_nothing_written(out)


def test_dense_modes_refuse_modules_to_save(tiny_base, tmp_path, adapter_factory):
    u = adapter_factory(targets=("q_proj",), modules_to_save=["embed_tokens"])
    out = tmp_path / "merged"
    with pytest.raises(UnsupportedAdapterError, match="modules_to_save.*mode 'direct'"):
        merge_utility_safety(tiny_base, [u], adapter_factory(), out, mode="magnitude")
    assert_nothing_written(out)


@pytest.mark.parametrize("mode", ["ties", "dare_ties", "magnitude"])
def test_full_recompression_keeps_the_exact_dense_update(tiny_base, tmp_path, trio, mode):
    """recompress_rank='full': the written adapter is the method's dense ΔW itself (identity factor), so the
    evaluation of the exact dense baseline folds exactly that ΔW into the base weights."""
    from sstmerge.eval.fold import FoldedAdapter

    from .conftest import load_tiny

    u1, u2, s = trio
    out = tmp_path / "dense"
    result = merge_utility_safety(tiny_base, [u1, u2], s, out, mode=mode, density=0.4, recompress_rank="full", seed=3)
    utility, safety = [read_adapter(u1), read_adapter(u2)], read_adapter(s)
    assert result.report["output"]["max_recompression_rel_error"] == 0.0
    written = read_adapter(out)
    model = load_tiny(tiny_base)
    W0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with FoldedAdapter(model, written):
        for module in safety.modules:
            ds, w = dense_inputs(utility, safety, module, [1.0, 1.0], 1.0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tv.module_seed(3, module))
                dense = {"ties": lambda: merge_utils.ties(ds, w, 0.4), "magnitude": lambda: merge_utils.magnitude_prune(ds, w, 0.4),
                         "dare_ties": lambda: merge_utils.dare_ties(ds, w, 0.4)}[mode]()
            assert torch.equal(written.modules[module].delta(torch.float32), dense.to(torch.float32)), module
            key = module + ".weight"
            assert torch.equal(model.state_dict()[key], (W0[key].float() + dense.to(torch.float32)).to(W0[key].dtype))
    # the truncated adapter a user would deploy differs, by the reported truncation error
    truncated = merge_utility_safety(tiny_base, [u1, u2], s, None, mode=mode, density=0.4, seed=3)
    assert truncated.report["output"]["max_recompression_rel_error"] > 1e-3


def test_full_recompression_leaves_exact_compositions_alone(tiny_base, trio):
    u1, u2, s = trio
    a = merge_utility_safety(tiny_base, [u1, u2], s, None, mode="direct")
    b = merge_utility_safety(tiny_base, [u1, u2], s, None, mode="direct", recompress_rank="full")
    for m in a.adapter.modules:
        assert torch.equal(a.adapter.modules[m].delta(), b.adapter.modules[m].delta())
