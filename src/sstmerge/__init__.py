"""sstmerge: merge utility and safety LoRA adapters through the Fisher safety subspace (SST-Merge).

Public API::

    from sstmerge import SSTMerger, merge_utility_safety, save_merged_adapter, read_adapter
"""

from .errors import (
    AdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    CacheCorruptError,
    ConfigError,
    DataError,
    FisherError,
    ModelError,
    NonFiniteError,
    OutputBusyError,
    OutputExistsError,
    PickleRefusedError,
    SSTMergeError,
    UnsafeOutputError,
    UnsupportedAdapterError,
)
from .io.adapter import LoraAdapter, LoraModule, read_adapter, write_adapter
from .io.models import build_tiny_llama, load_base_info, resolve_base
from .merge.merger import MergeResult, SSTMerger, merge_utility_safety, save_merged_adapter
from .merge.method import DenseMethod, MergeMethod, TaskArithmeticMethod, register_method
from .merge.options import MergeConfig, MergeOptions, MethodParams

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "AdapterFormatError", "AdapterMismatchError", "CacheCorruptError", "ConfigError", "DataError", "FisherError",
    "LoraAdapter", "LoraModule", "MergeConfig", "MergeOptions", "MergeResult", "ModelError", "NonFiniteError",
    "OutputBusyError", "OutputExistsError", "PickleRefusedError", "SSTMergeError", "SSTMerger",
    "UnsafeOutputError", "UnsupportedAdapterError",
    "DenseMethod", "MergeMethod", "MethodParams", "TaskArithmeticMethod", "register_method", "build_tiny_llama", "load_base_info", "merge_utility_safety", "read_adapter", "resolve_base",
    "save_merged_adapter", "write_adapter",
]
