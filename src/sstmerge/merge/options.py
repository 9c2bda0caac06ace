"""Merge options (pydantic models only; resolution from flat keys lives in :mod:`sstmerge.merge.config`).

A merge is configured by one frozen, resolved :class:`MergeOptions`:

- the options every method shares (``mode``, ``safety_weight``, ``utility_coefficients``, ``utility_weights``,
  ``layer_weights``, ``recompress_rank``, ``dtype``, ``seed``);
- ``fisher``: the :class:`~sstmerge.fisher.run.FisherSettings` of the Fisher pass (only methods that need it
  take these keys);
- ``params``: the chosen method's own parameter model (``MergeMethod.Params``, e.g. ``k`` and
  ``residual_ratio`` for ``residual``, ``density`` for ``ties``).

The CLI, YAML files, the Python API and the experiment grid all write options as *flat* keys
(``--residual-ratio 0.5``, ``k: 10``, ``fisher_batch_size: 8``); :func:`sstmerge.merge.config.resolve_options`
routes each key to its place and refuses keys that the chosen method does not take, naming the methods that
do. :meth:`MergeOptions.flat` writes them back as flat keys (``merge_config.yaml``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from ..fisher.run import FisherSettings


class MethodParams(BaseModel):
    """Base of every method's parameter model: frozen, unknown keys refused, NaN/Inf refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: flat key ↔ FisherSettings field (the flat names are the CLI flags and YAML keys)
FISHER_KEYS: dict[str, str] = {
    "harmful_data": "harmful_data",
    "benign_data": "benign_data",
    "max_samples": "max_samples",
    "max_length": "max_length",
    "fisher_batch_size": "batch_size",
    "fisher_device": "device",
    "fisher_dtype": "dtype",
    "fisher_store": "store",
    "sketch_dim": "sketch_dim",
    "sketch_seed": "sketch_seed",
    "fisher_store_dtype": "store_dtype",
}


class CommonOptions(BaseModel):
    """Options every merge method takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: str = Field("direct", description="merge method (`sst-merge methods` lists them and their parameters)")
    safety_weight: float = Field(1.0, description="global weight w of the safety adapter; -1 negates it")
    utility_coefficients: Literal["sum", "average"] = Field(
        "sum", description="utility coefficients c_i: 'sum' (c_i = 1) or 'average' (c_i = 1/n)")
    utility_weights: tuple[float, ...] | None = Field(
        None, description="per-utility-adapter weights, multiplied into c_i (one per --utility, same order)")
    layer_weights: str | None = Field(
        None, description="per-module safety weights: 'v3' (lm_head 3, attention 1, MLP 0.3) or a YAML file; "
        "multiplied by safety_weight")
    recompress_rank: Annotated[int, Field(ge=1)] | Literal["full"] | None = Field(
        None, description="recompress every merged module to this rank by truncated SVD (error reported); 'full': "
        "keep each merged ΔW exactly (rank min(d_out, d_in), factored as identity × ΔW; dense methods' exact "
        "result, for evaluation). Dense methods (ties, dare_*, magnitude, safe_lora, safemerge) default to the "
        "sum of the input ranks")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the written adapter")
    seed: int = Field(0, description="seed of the Fisher pass's sampling and of random methods (dare_*: drop masks)")


class MergeOptions(CommonOptions):
    """The resolved options of one merge: common options, the Fisher settings and the method's parameters."""

    fisher: FisherSettings = Field(default_factory=FisherSettings, description="the Fisher pass (Fisher methods)")
    params: SerializeAsAny[MethodParams] = Field(default_factory=MethodParams, description="the method's parameters")

    def flat(self, *, fisher: bool = True) -> dict[str, Any]:
        """Flat keys (CLI flag names with '_'), the inverse of :func:`~sstmerge.merge.config.resolve_options`;
        ``fisher=False`` leaves out the Fisher settings (methods that do not run the pass)."""
        out = self.model_dump(mode="json", include=set(CommonOptions.model_fields))
        if fisher:
            settings = self.fisher.model_dump(mode="json")
            out.update({flat: settings[field] for flat, field in FISHER_KEYS.items()})
        out.update(self.params.model_dump(mode="json"))
        return out


class MergeIO(BaseModel):
    """What a merge reads and writes (beside its options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field("smollm2", description="base model: a local HF folder or the alias 'smollm2'")
    utility: tuple[str, ...] = Field((), description="utility adapter folder(s)")
    safety: str | None = Field(None, description="safety adapter folder")
    out: str | None = Field(None, description="output adapter folder (written atomically)")
    overwrite: bool = Field(False, description="replace --out if it is an earlier sstmerge output (never an input, "
                            "the working directory or a folder sstmerge did not write)")
    allow_pickle: bool = Field(False, description="allow legacy pickled .pt/.bin adapters (read with weights_only=True)")
    cache_dir: str | None = Field(None, description="cache folder (converted models, Fisher statistics)")
    stream: bool = Field(
        True, description="write the merged adapter module by module as it is composed, reading the inputs lazily "
        "(memory bounded by a few modules); --no-stream builds it in memory first. Same files either way")


class MergeConfig(BaseModel):
    """A whole merge: inputs/outputs and resolved options (what a ``--config`` YAML file or the flags give)."""

    model_config = ConfigDict(frozen=True)

    io: MergeIO
    options: MergeOptions
