"""Write a safetensors file tensor by tensor, so the whole state dict is never held in memory.

The format (https://github.com/huggingface/safetensors, "Format")::

    bytes [0, 8)          N: unsigned 64-bit little-endian integer, the length of the header
    bytes [8, 8 + N)      the header: UTF-8 JSON, one object
                              {"__metadata__": {str: str, ...},                      (optional)
                               "<name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]},
                               ...}
                          padded at the end with spaces (0x20) so that N is a multiple of 8 (the data then
                          starts 8-byte aligned)
    bytes [8 + N, ...)    the byte buffer: each tensor's elements, row-major (C order), little-endian, at
                          ``[begin, end)`` relative to the start of the buffer; the tensors tile the buffer
                          without gaps or overlaps, so ``end - begin = numel · itemsize``

Because every name, dtype and shape is known up front, the header (hence every offset) can be written first
and each tensor's bytes afterwards, one tensor in memory at a time. The layout matches
``safetensors.torch.save_file``: tensors are ordered by dtype (descending in safetensors' ``Dtype`` order, see
:data:`DTYPE_ORDER`) then by name, the header JSON is compact (no spaces) with ``__metadata__`` first and the
tensors in buffer order. So the same tensors and metadata give a byte-identical file, as long as the metadata
has at most one key (``save_file`` keeps several keys in a Rust ``HashMap`` order, which is not reproducible;
here they keep the given order). Readers (``safe_open``, PEFT, vLLM) do not depend on any of this ordering.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: safetensors' ``Dtype`` enum (ascending order; ``save_file`` puts the highest first) and the torch dtype of each
_DTYPE_ENUM: tuple[tuple[str, str], ...] = (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"),
    ("I16", "int16"), ("U16", "uint16"), ("F16", "float16"), ("BF16", "bfloat16"), ("I32", "int32"),
    ("U32", "uint32"), ("F32", "float32"), ("C64", "complex64"), ("F64", "float64"), ("I64", "int64"),
    ("U64", "uint64"),
)

#: safetensors dtype name of each torch dtype this writer accepts (those this torch version has)
DTYPE_NAMES: dict[torch.dtype, str] = {
    getattr(torch, attr): name for name, attr in _DTYPE_ENUM if isinstance(getattr(torch, attr, None), torch.dtype)
}

#: safetensors' ``Dtype`` enum order (ascending)
DTYPE_ORDER: tuple[str, ...] = tuple(name for name, _ in _DTYPE_ENUM)

_ALIGNMENT = 8


def tensor_layout(
    specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """Buffer layout of ``{name: (dtype, shape)}`` as ``save_file`` lays it out.

    Returns ``[(name, dtype name, shape, begin, end), ...]`` in buffer order: dtype descending in
    :data:`DTYPE_ORDER`, then name ascending; offsets are contiguous from 0.
    """
    rows = []
    for name, (dtype, shape) in specs.items():
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors by this writer")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name!r}: negative dimension in shape {shape}")
        rows.append((name, DTYPE_NAMES[dtype], shape, dtype))
    rows.sort(key=lambda r: (-DTYPE_ORDER.index(r[1]), r[0]))
    out, offset = [], 0
    for name, dname, shape, dtype in rows:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append((name, dname, shape, offset, offset + nbytes))
        offset += nbytes
    return out


def header_bytes(layout: Sequence[tuple[str, str, tuple[int, ...], int, int]], metadata: Mapping[str, str] | None) -> bytes:
    """``N`` (8 bytes, little-endian) + the JSON header padded with spaces to a multiple of 8 bytes."""
    header: dict = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map str to str, got {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    for name, dname, shape, begin, end in layout:
        header[name] = {"dtype": dname, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGNMENT)
    return len(text).to_bytes(8, "little") + text


class SafetensorsStreamWriter:
    """Write ``path`` as a safetensors file whose tensors (names, dtypes, shapes) are declared up front.

    >>> specs = {"a": (torch.float32, (2, 3)), "b": (torch.bfloat16, (4,))}
    >>> with SafetensorsStreamWriter("/tmp/x.safetensors", specs, metadata={"format": "pt"}) as w:  # doctest: +SKIP
    ...     w.write("b", torch.ones(4, dtype=torch.bfloat16))
    ...     w.write("a", torch.zeros(2, 3))

    The header is written when the file is opened; :meth:`write` puts one tensor's bytes at its offset (any
    order; each declared tensor exactly once, with exactly the declared dtype and shape). :meth:`close` checks
    that every tensor was written and fails otherwise; leaving the ``with`` block on an exception closes the
    file without that check. An interrupted write leaves an incomplete file, so write into a temporary folder
    (:func:`sstmerge.io.atomic.atomic_output_dir`).
    """

    def __init__(
        self,
        path: str | Path,
        specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # safetensors is little-endian; torch tensors are native-endian
            raise RuntimeError("SafetensorsStreamWriter needs a little-endian machine")
        self.path = Path(path)
        layout = tensor_layout(specs)
        self._slots = {name: (dname, shape, begin, end) for name, dname, shape, begin, end in layout}
        self._dtypes = {name: dtype for name, (dtype, _) in specs.items()}
        self._pending = set(self._slots)
        head = header_bytes(layout, metadata)
        self._data_start = len(head)
        self.nbytes = len(head) + (layout[-1][4] if layout else 0)  # final file size
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._fh.write(head)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one declared tensor (copied to CPU and made contiguous if needed)."""
        if name not in self._slots:
            raise KeyError(f"{self.path}: tensor {name!r} was not declared in the header")
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} was already written")
        _, shape, begin, end = self._slots[name]
        if tensor.dtype != self._dtypes[name] or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the header declares "
                f"{self._dtypes[name]} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        if data.numel() != end - begin:  # cannot happen for the dtypes above; guards the offsets
            raise RuntimeError(f"{self.path}: tensor {name!r} has {data.numel()} bytes, expected {end - begin}")
        if data.numel():
            self._fh.seek(self._data_start + begin)
            self._fh.write(memoryview(data.numpy()))
        self._pending.discard(name)

    def close(self) -> None:
        """Close the file; raise if a declared tensor was never written (the file would be incomplete)."""
        if self._fh.closed:
            return
        self._fh.close()
        if self._pending:
            missing = sorted(self._pending)
            raise ValueError(
                f"{self.path}: {len(missing)} declared tensors were never written (first: {missing[:3]}); "
                "the file is incomplete"
            )
        log.debug("wrote %s (%d bytes, %d tensors)", self.path, self.nbytes, len(self._slots))

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()
