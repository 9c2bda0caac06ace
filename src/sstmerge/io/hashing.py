"""SHA-256 of input files, for provenance (cached per (path, size, mtime) within a process)."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def sha256_files(paths: list[Path]) -> dict[str, str]:
    """``{file name: sha256}`` for each file."""
    return {Path(p).name: sha256_file(p) for p in paths}


def model_files(folder: Path) -> list[Path]:
    """The files that define a HF model folder's weights and config."""
    names = ["config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"]
    files = [folder / n for n in names if (folder / n).is_file()]
    # every weights file transformers may load (safetensors, or a legacy pickled checkpoint), so a cache key
    # over these files changes whenever the weights do
    return files + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))
