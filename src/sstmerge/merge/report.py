"""Provenance written beside every merged adapter: merge_report.json, merge_report.txt, merge_config.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def summary_text(report: dict[str, Any]) -> str:
    """A short human-readable summary of a merge report."""
    cfg = report["config"]
    lines = [
        f"sstmerge {report['versions'].get('sstmerge')} merge, {report['created']}",
        f"mode: {cfg['mode']}   safety_weight: {cfg['safety_weight']}   utility coefficients: {cfg['utility_coefficients']}",
        f"base: {report['inputs']['base']['spec']} ({report['inputs']['base']['path']})",
    ]
    for u in report["inputs"]["utility"]:
        lines.append(f"utility: {u['path']}  (c = {u['coefficient']:g}, {u['n_modules']} modules, ranks {u['ranks']})")
    s = report["inputs"].get("safety")
    if s:
        lines.append(f"safety:  {s['path']}  ({s['n_modules']} modules, ranks {s['ranks']})")
    m = report.get("method", {})
    if m.get("eigenvalues"):
        lines.append(f"Fisher: {m['estimator']}, scope {m['scope']}, k requested {m['k_requested']}, damping ε {m['damping_eps']}")
        f = m.get("fisher", {})
        lines.append(f"  samples: {f.get('n_harm')} harmful, {f.get('n_benign')} benign; cache hit: {f.get('cache_hit')}  ({f.get('folder', '')})")
        for scope, ev in list(m["eigenvalues"].items())[:8]:
            top = ", ".join(f"{x:.3g}" for x in ev[:6])
            lines.append(f"  {scope}: effective k {m['effective_k'][scope]} of {m['available_rank'][scope]} available; top λ: {top}")
        if len(m["eigenvalues"]) > 8:
            lines.append(f"  ... {len(m['eigenvalues']) - 8} more scopes in merge_report.json")
        lines.append(f"  share of ‖φ‖ kept by the projection: {m['projection_norm_kept_total']:.3f}")
        if m.get("residual_ratio") is not None:
            lines.append(f"  residual_ratio: {m['residual_ratio']}")
        if m.get("preset"):
            lines.append(f"  preset: {m['preset']} {m['strengths']}")
    if m.get("predicted_utility_cost_before") is not None:  # complement
        lines.append(f"complement: removed {sum(m['removed_directions'].values())} directions over "
                     f"{len(m['removed_directions'])} scope(s); {m['factor_norm_removed_share']:.3f} of ‖φ‖")
        lines.append(f"  predicted utility cost Σc²: {m['predicted_utility_cost_before']:.4g} → "
                     f"{m['predicted_utility_cost_after']:.4g}; predicted safety Σλc²: "
                     f"{m['predicted_safety_before']:.4g} → {m['predicted_safety_after']:.4g}")
        lines.append(f"  ‖ΔW'‖/‖ΔW‖ per module: median {m['delta_norm_kept_median']:.3f}, min {m['delta_norm_kept_min']:.3f}")
    for name, u in (m.get("utility") or {}).items() if isinstance(m.get("utility"), dict) else ():
        if "predicted_effect" in u:  # protect
            pe = u["predicted_effect"]
            lines.append(f"protect {name}: removed {sum(u['removed_directions'].values())} directions, "
                         f"‖ΔW'‖/‖ΔW‖ median {u['delta_norm_kept_median']:.3f}; first-order refusal gain "
                         f"{pe['direct']['refusal_gain']:.4g} → {pe['merge']['refusal_gain']:.4g}")
        else:
            lines.append(f"protect {name}: {u.get('skipped')}")
    pe = m.get("predicted_effect")
    if pe and "merge" in pe:
        d, g = pe["direct"], pe["merge"]
        lines.append(f"predicted effect (Fisher forms, direct → merge): refusal gain {d['refusal_gain']:.4g} → "
                     f"{g['refusal_gain']:.4g}; φᵀF_harm φ {d['harm_form']:.4g} → {g['harm_form']:.4g}; "
                     f"φᵀF_benign φ {d['benign_form']:.4g} → {g['benign_form']:.4g}")
    for key in ("density", "majority_sign_method", "seed", "similarity_threshold", "safemerge_alpha"):
        if m.get(key) is not None:
            lines.append(f"{key}: {m[key]}")
    if m.get("n_modules_tested") is not None:
        lines.append(f"safe_lora: projected {m['n_modules_projected']} of {m['n_modules_tested']} modules")
    if m.get("n_modules_flagged") is not None:
        lines.append(f"safemerge: flagged {m['n_modules_flagged']} modules")
    if m.get("layer_weights"):
        lines.append(f"layer weights: {m['layer_weights']}")
    out = report.get("output", {})
    lines.append(f"output rank: {out.get('rank')}   modules: {out.get('n_modules')}   partial modules: {out.get('n_partial_modules')}")
    if out.get("max_recompression_rel_error") is not None:
        lines.append(f"recompression (truncated SVD) to rank {out.get('rank')}: max relative Frobenius error "
                     f"{out['max_recompression_rel_error']:.3e}")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["timings"].items()))
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines) + "\n"


def write_report_files(folder: Path, report: dict[str, Any]) -> None:
    (folder / "merge_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "merge_report.txt").write_text(summary_text(report), encoding="utf-8")
    (folder / "merge_config.yaml").write_text(
        "# resolved config of this merge; re-run with: sst-merge merge --config merge_config.yaml --out NEW_DIR\n"
        + yaml.safe_dump({k: v for k, v in report["config"].items() if k not in ("out", "overwrite")}, sort_keys=False),
        encoding="utf-8",
    )


def plot_spectrum(eigenvalues: dict[str, list[float]], path: Path, title: str = "") -> None:
    """Generalized eigenvalues per scope (log scale, descending) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for scope, ev in list(eigenvalues.items())[:12]:
        ev = [x for x in ev if x > 0]
        if ev:
            ax.semilogy(range(1, len(ev) + 1), ev, marker="o", ms=3, label=scope.replace("model.layers.", "L"))
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("λ  (F_harm v = λ (F_benign + δI) v)")
    ax.set_title(title or "safety-subspace spectrum")
    if len(eigenvalues) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
