"""safetensors: an 8-byte little-endian header size, a JSON header, then the raw little-endian data.

The reader memory-maps each tensor (nothing is read until asked for) and checks the header the
way the safetensors library does, so a hostile or damaged file is refused instead of loading as
garbage: the header is a JSON object of string keys, ``__metadata__`` a map of strings, every
entry a known dtype, a shape of non-negative ints and byte offsets that match it; the tensors'
byte ranges, sorted, start at 0, touch without gaps or overlaps, and end exactly at the end of
the file (a header size one byte off, trailing bytes, or one weight aliasing another are errors).
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes
from .errors import CheckpointError, reading
from .lazy import Lazy, LazyState, materialize

Progress = Callable[[int], None]

# The safetensors library's own limit on the header (100 MB); a ViT header is a few KiB.
MAX_HEADER_BYTES = 100_000_000


def sniff(head: bytes, size: int) -> bool:
    """Whether the first bytes look like safetensors (a plausible header size, then '{')."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: pathlib.Path) -> tuple[list[Entry], dict[str, str], int]:
    """(entries in file order, metadata, offset of the data section), every entry checked."""
    with reading(path, "safetensors file"), open(path, "rb") as f:
        size = path.stat().st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file: header says {n} bytes, "
                                  f"file has {size - 8} after the size field")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is over the {MAX_HEADER_BYTES} byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {type(e).__name__} at byte "
                              f"{getattr(e, 'pos', getattr(e, 'start', '?'))}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    data_start = 8 + n
    entries = sorted((_entry(path, key, value) for key, value in header.items()), key=lambda e: (e.begin, e.end))
    _check_layout(path, entries, size - data_start)
    return entries, dict(metadata), data_start


def _entry(path: pathlib.Path, key: Any, value: Any) -> Entry:
    where = f"{path}: safetensors entry {str(key)[:80]!r}"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: must be an object with exactly dtype, shape and data_offsets")
    dtype = dtypes.from_safetensors(value["dtype"], where)
    shape, offsets = value["shape"], value["data_offsets"]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 16:
        raise CheckpointError(f"{where}: shape must be a list of at most 16 non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] non-negative ints")
    begin, end = offsets
    shape_t = tuple(shape)
    if end < begin or end - begin != math.prod(shape_t) * dtype.itemsize:
        raise CheckpointError(f"{where}: shape {shape_t} {dtype} does not fit byte range [{begin}, {end})")
    return Entry(key, dtype, shape_t, begin, end)


def _check_layout(path: pathlib.Path, entries: list[Entry], data_size: int) -> None:
    """Byte ranges start at 0, follow each other exactly, and end at the end of the file."""
    position = 0
    for entry in entries:
        if entry.begin != position:
            what = "overlaps the previous tensor" if entry.begin < position else f"leaves a gap at byte {position}"
            raise CheckpointError(f"{path}: safetensors entry {entry.key[:80]!r} (bytes [{entry.begin}, {entry.end})) "
                                  f"{what}: the header does not describe the data")
        position = entry.end
    if position > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file: the tensors need {position} data bytes, "
                              f"the file has {data_size}")
    if position < data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor: the header size or "
                              "offsets are wrong (or the file was appended to)")


def read_lazy(path: pathlib.Path) -> tuple[LazyState, dict[str, str]]:
    """Memory-mapped tensors by key (in file order) and the metadata."""
    entries, metadata, data_start = read_header(path)
    state: LazyState = {}
    for e in entries:
        state[e.key] = _lazy(path, data_start + e.begin, e.shape, e.dtype, f"{path}:{e.key}")
    return state, metadata


def read(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    state, metadata = read_lazy(path)
    with reading(path, "safetensors file"):
        return materialize(state), metadata


def _lazy(path: pathlib.Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, source: str) -> Lazy:
    """A read-only memory map of one tensor (mapped when asked for, unmapped with the array)."""
    bf16_bits = dtypes.is_bf16_bits(dtype)

    def load() -> np.ndarray:
        if math.prod(shape) == 0:
            array = np.zeros(shape, dtype=dtype)
        else:
            array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return dtypes.bf16_bits_to_float32(array) if bf16_bits else dtypes.native(array)

    return Lazy(shape, np.dtype(np.float32) if bf16_bits else dtype.newbyteorder("="), load, source)


def write(path: pathlib.Path, state: Mapping[str, Lazy], metadata: Mapping[str, str] | None = None,
          progress: Progress | None = None) -> None:
    """Stream ``state`` into a safetensors file: the header first (from the known shapes), then each
    tensor as it is produced. Not atomic by itself: call inside ``staging.staged_file``."""
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for key, lazy in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {key!r} is not a string")
        header[key] = {"dtype": dtypes.to_safetensors(lazy.dtype, f"{path}: {key}"), "shape": list(lazy.shape),
                       "data_offsets": [offset, offset + lazy.nbytes]}
        offset += lazy.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for lazy in state.values():
            array = np.ascontiguousarray(dtypes.little_endian(lazy.materialize()))
            if array.size:
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
            if progress:
                progress(lazy.nbytes)
