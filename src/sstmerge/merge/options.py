"""Merge options (pydantic). The CLI flags and the YAML config keys are generated from these fields."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from ..registry import did_you_mean


class MergeOptions(BaseModel):
    """How to merge (independent of which files are merged). NaN and ±Inf are rejected for every number."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    mode: str = Field("direct", description="merge method (see `sst-merge methods`): direct, residual, layerwise, fisher_mask, "
        "ties, dare_linear, dare_ties, magnitude, safe_lora, safemerge")
    safety_weight: float = Field(1.0, description="global weight w of the safety adapter; -1 negates it")
    utility_coefficients: Literal["sum", "average"] = Field(
        "sum", description="utility coefficients c_i: 'sum' (c_i = 1) or 'average' (c_i = 1/n)"
    )
    utility_weights: list[float] | None = Field(
        None, description="per-utility-adapter weights, multiplied into c_i (one per --utility, same order)"
    )
    k: int = Field(10, ge=1, description="dimension of the safety subspace (residual/layerwise/fisher_mask modes)")
    residual_ratio: float = Field(
        0.7, ge=0.0, le=1.0, description="residual and fisher_mask modes: φ' = (1-r)·Pφ + r·φ; 1 = direct, 0 = full projection"
    )
    recompress_rank: int | None = Field(
        None, ge=1, description="recompress every merged module to this rank by truncated SVD (error reported); dense "
        "modes (ties, dare_*, magnitude, safe_lora, safemerge) default to the sum of the input ranks"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the written adapter")
    preset: str = Field(
        "balanced", description="layerwise mode: projection strengths per module type (safety_first, balanced, "
        "utility_first, minimal) or a YAML file {q_proj: 0.3, ..., default: 0.5}",
    )
    layer_weights: str | None = Field(
        None, description="per-module safety weights: 'v3' (lm_head 3, attention 1, MLP 0.3) or a YAML file; "
        "multiplied by safety_weight",
    )
    fisher: Literal["empirical", "diagonal"] = Field(
        "empirical", description="Fisher estimator: empirical (exact low-rank) or diagonal (a coordinate mask)"
    )
    scope: Literal["global", "per_module"] = Field("global", description="one subspace over all modules, or one per module")
    clamp_k: bool = Field(False, description="if k exceeds the available rank, use the rank (recorded) instead of failing")
    damping: float = Field(1e-3, gt=0, description="relative damping ε: δ = ε · tr(F_benign) / D")
    harmful_data: str = Field("bundled:harmful_train", description="Fisher: JSONL of harmful prompts with refusals")
    benign_data: str = Field("bundled:benign_train", description="Fisher: JSONL of benign task examples")
    max_samples: int | None = Field(64, ge=1, description="Fisher: at most N examples per data file (seeded)")
    seed: int = Field(0, description="Fisher: sampling seed; dare_*: drop masks (per module: seed + crc32(name))")
    max_length: int = Field(256, ge=2, description="Fisher: max tokens per example")
    fisher_batch_size: int = Field(8, ge=1, description="Fisher: examples per forward/backward (per-sample gradients "
                                   "of a whole batch at once)")
    fisher_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Fisher: where the model runs")
    fisher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Fisher: model dtype during the pass (bfloat16 for 8B models on GPUs)")
    density: float = Field(
        0.5, gt=0.0, le=1.0, description="ties, dare_linear, dare_ties, magnitude: share of the entries of each "
        "ΔW that is kept (1 = no pruning)",
    )
    majority_sign_method: Literal["total", "frequency"] = Field(
        "total", description="ties, dare_ties: elect the sign of the summed values (total) or the most frequent sign"
    )
    similarity_threshold: float = Field(
        0.35, ge=0.0, le=2.0, description="safe_lora, safemerge: τ; a utility update with cos(ΔW_U, P_V ΔW_U) < τ "
        "is projected (safe_lora) or flags its module (safemerge); 0 = never, > 1 = always",
    )
    safemerge_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="safemerge: flagged modules get α·Σ c_i ΔW_Ui + (1-α)·w·ΔW_S"
    )

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        from .methods import METHODS

        METHODS.get(value)  # raises ConfigError with a did-you-mean
        return value

    def fisher_settings(self):
        from ..fisher.run import FisherSettings

        return FisherSettings(harmful_data=self.harmful_data, benign_data=self.benign_data,
                              max_samples=self.max_samples, seed=self.seed, max_length=self.max_length,
                              batch_size=self.fisher_batch_size, device=self.fisher_device,
                              dtype=self.fisher_dtype)


class MergeConfig(MergeOptions):
    """Options plus inputs/outputs: the full content of a ``--config`` YAML file."""

    base: str = Field("smollm2", description="base model: a local HF folder or the alias 'smollm2'")
    utility: list[str] = Field(default_factory=list, description="utility adapter folder(s)")
    safety: str | None = Field(None, description="safety adapter folder")
    out: str | None = Field(None, description="output adapter folder (written atomically)")
    overwrite: bool = Field(False, description="replace --out if it is an earlier sstmerge output (never an input, "
                            "the working directory or a folder sstmerge did not write)")
    allow_pickle: bool = Field(False, description="allow legacy pickled .pt/.bin adapters (read with weights_only=True)")
    cache_dir: str | None = Field(None, description="cache folder (converted models, Fisher statistics)")
    stream: bool = Field(
        True, description="write the merged adapter module by module as it is composed, reading the inputs lazily "
        "(memory bounded by a few modules); --no-stream builds it in memory first. Same files either way",
    )

    def options(self) -> MergeOptions:
        return MergeOptions(**{k: getattr(self, k) for k in MergeOptions.model_fields})


def format_validation_error(exc: ValidationError, source: str, fields: list[str] | None = None) -> str:
    """One readable line per problem; unknown keys get a did-you-mean among ``fields`` (default: the
    MergeConfig keys; pass ``[]`` for nested configs, where a flat list of keys would mislead)."""
    lines = []
    fields = list(MergeConfig.model_fields) if fields is None else fields
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            hint = f"{did_you_mean(loc, fields)} Valid keys: {', '.join(fields)}" if fields else ""
            lines.append(f"unknown key {loc!r}.{hint}" if hint else f"unknown key {loc!r}")
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(lines)


def build_config(values: dict, source: str = "options") -> MergeConfig:
    """Validate a dict of options into a :class:`MergeConfig`, raising :class:`ConfigError`."""
    try:
        return MergeConfig(**values)
    except ValidationError as exc:
        # a ConfigError raised inside a validator (unknown mode) arrives wrapped: surface its message
        for err in exc.errors():
            ctx_error = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_error, ConfigError):
                raise ConfigError(f"{source}: {ctx_error}") from None
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config_file(path: str | Path) -> dict:
    """Read a YAML merge config into a dict (validated later, merged with CLI flags)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
    if isinstance(data.get("utility"), str):
        data["utility"] = [data["utility"]]
    return data
