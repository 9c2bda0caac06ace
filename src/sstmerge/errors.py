"""Typed error hierarchy.

Every error raised on bad input is a subclass of :class:`SSTMergeError`; its message names the offending
file / key / shape and says how to fix it. The CLI turns these into a one-line message and exit code 2
(no traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SSTMergeError(Exception):
    """Base class of every expected (user-facing) error in sstmerge."""


class ConfigError(SSTMergeError, ValueError):
    """A merge/Fisher/eval option or config file is invalid (unknown key, bad value, bad combination)."""


class AdapterError(SSTMergeError):
    """An adapter could not be used."""


class AdapterFormatError(AdapterError):
    """The adapter files are missing, truncated, corrupt, or hold keys we cannot interpret."""


class UnsupportedAdapterError(AdapterError):
    """The adapter is a variant sstmerge refuses rather than merging wrongly (DoRA, non-LoRA PEFT types, ...)."""


class AdapterMismatchError(AdapterError):
    """Adapter modules or shapes do not match the base model or each other."""


class NonFiniteError(AdapterError):
    """An adapter tensor contains NaN or Inf (an input, or a merged output before it is written)."""


class PickleRefusedError(AdapterFormatError):
    """A legacy pickled checkpoint was given without the explicit ``--allow-pickle`` opt-in."""


class ModelError(SSTMergeError):
    """The base model could not be resolved or loaded."""


class DataError(SSTMergeError, ValueError):
    """A data file (JSONL/CSV) is missing, empty or malformed."""


class FisherError(SSTMergeError):
    """Fisher statistics / eigenproblem could not be computed as asked (k too large, zero adapter, ...)."""


class OutputExistsError(SSTMergeError):
    """The output folder exists and ``overwrite`` was not requested."""


class UnsafeOutputError(SSTMergeError):
    """The output path may not be written or replaced: it is (or holds) an input, the current directory, a
    folder sstmerge did not write, or it lies outside the folder it must stay in."""


class OutputBusyError(SSTMergeError):
    """Another sstmerge process is writing the same output folder or cache entry right now."""


class CacheCorruptError(SSTMergeError):
    """A cache file failed its integrity check (truncated, edited, NaN bytes); callers discard and recompute.

    ``rows``: for the Fisher gradient store, the damaged rows (recomputed alone)."""

    def __init__(self, message: str, *, rows: list[int] | None = None) -> None:
        super().__init__(message)
        self.rows = list(rows or [])
