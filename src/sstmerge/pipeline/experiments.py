"""The experiment grid: train the adapters, merge them every way, evaluate everything, tabulate and plot.

``sst-merge experiments`` / ``sst-merge demo``. The parts: :mod:`.config` (the YAML model and grid expansion),
:mod:`.stages` (training, merging, evaluation; resumable), :mod:`.results` (table, Pareto front, plot).
"""

from __future__ import annotations

from .config import (
    CONFIG_DIR,
    AdapterRecipe,
    EvalConfig,
    Experiment,
    ExperimentConfig,
    GridEntry,
    expand_grid,
    load_experiment_config,
)
from .results import (
    headline,
    merge_facts,
    pareto_front,
    plot_tradeoff,
    results_markdown,
    summary_scores,
    summary_table,
    table_columns,
    write_results,
)
from .stages import claim_run_folder, reusable_stage, run_experiments

__all__ = [
    "CONFIG_DIR", "AdapterRecipe", "EvalConfig", "Experiment", "ExperimentConfig", "GridEntry", "claim_run_folder",
    "expand_grid", "headline", "load_experiment_config", "merge_facts", "pareto_front", "plot_tradeoff",
    "results_markdown", "reusable_stage", "run_experiments", "summary_scores", "summary_table", "table_columns",
    "write_results",
]
