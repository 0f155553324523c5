"""``flax_model.msgpack``: flax.serialization's msgpack encoding of a parameter tree.

Layout (flax/serialization.py): the top level is a msgpack map of nested maps (string keys); each
array is msgpack extension type 1 holding a msgpack array ``(shape, dtype name, C-order bytes)``;
numpy scalars are the same record under extension type 3; arrays over 1 GiB are split into
``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat chunk, ...}}``
(msgpack caps one object at 2**31 - 1 bytes).

:func:`read_lazy` never decodes the file with ``msgpack.unpackb``: a scanner walks the file's
bytes (memory-mapped) and records where each array's bytes are, so nothing is copied until a
tensor is asked for, and every field that comes from the file is checked before it is used:

- every length or count must fit in the bytes that are left (a header claiming 2**32 entries is
  refused before anything is allocated), maps nest at most :data:`MAX_DEPTH` levels (no
  RecursionError), and at most :data:`MAX_ENTRIES` map entries are read;
- every record's dtype goes through :func:`dtypes.by_name` (an ``"O"`` record is refused: it was
  once memory-mapped as an object array, a segfault downstream) and its byte count must equal
  ``prod(shape) * itemsize``;
- chunked arrays must agree with their shape (1-D chunks of one dtype whose lengths add up);
- nothing may follow the tree.

Choices: numpy scalars (ext type 3) are read as 0-d arrays (same record as an array); native
Python complex numbers (ext type 2) and plain msgpack values as leaves (ints, floats, strings,
lists) are refused: a parameter tree holds arrays only. Data is read in the byte order of the
machine, as flax does (flax writes native order; every platform it runs on is little-endian).

:func:`write` streams a :data:`LazyState` one tensor at a time into bytes identical to
``flax.serialization.to_bytes`` of the same nested dict; nothing in this module imports flax.
Error messages name the file and the parameter path (cut short), never other file contents.
"""

from __future__ import annotations

import math
import mmap
import os
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np

from . import dtypes
from .errors import CheckpointError, reading, writing
from .lazy import Lazy, LazyState, materialize

Progress = Callable[[int], None]  # called with the number of bytes just written

# flax.serialization._MsgpackExtType
EXT_NDARRAY, EXT_NATIVE_COMPLEX, EXT_NPSCALAR = 1, 2, 3
CHUNKED_FLAG = "__msgpack_chunked_array__"
MAX_CHUNK_SIZE = 2**30  # flax.serialization.MAX_CHUNK_SIZE: arrays with more bytes are chunked

MAX_DEPTH = 64  # nesting of maps (a ViT tree is ~7 deep); deeper is refused, never recursed into
MAX_ENTRIES = 1 << 20  # map entries in one file (a ViT has ~200 tensors)
MAX_RANK = 64  # numpy's own limit on dimensions
MAX_DTYPE_NAME = 32  # bytes; as dtypes.by_name


# --- msgpack lead bytes as data ----------------------------------------------------------------
# Each lead byte decodes to (kind, how): for "fix" kinds ``how`` is the value or length carried in
# the byte itself, for sized kinds the width in bytes of the big-endian field that follows
# (a length for str / bin / array / map / ext, the value for ints, the payload for floats).

_FIX_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x00, 0x7F, "uint"), (0x80, 0x8F, "map"), (0x90, 0x9F, "array"), (0xA0, 0xBF, "str"), (0xE0, 0xFF, "negfix"),
)
_CONSTANTS: dict[int, str] = {0xC0: "nil", 0xC2: "false", 0xC3: "true"}
_SIZED: dict[int, tuple[str, int]] = {
    0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
    0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4),
    0xCA: ("float", 4), 0xCB: ("float", 8),
    0xCC: ("uint", 1), 0xCD: ("uint", 2), 0xCE: ("uint", 4), 0xCF: ("uint", 8),
    0xD0: ("int", 1), 0xD1: ("int", 2), 0xD2: ("int", 4), 0xD3: ("int", 8),
    0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
}
_FIXEXT: dict[int, int] = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}  # lead byte -> payload length

# Bytes each announced entry takes at least, so a count can be checked against the bytes left.
_MIN_ENTRY_BYTES = {"map": 2, "array": 1, "str": 1, "bin": 1, "ext": 1}


def _lead_table() -> list[tuple[str, int] | None]:
    table: list[tuple[str, int] | None] = [None] * 256  # None: 0xC1, never used by msgpack
    for low, high, kind in _FIX_RANGES:
        for byte in range(low, high + 1):
            table[byte] = ("fix", byte)
    for byte in _CONSTANTS:
        table[byte] = ("fix", byte)
    for byte, sized in _SIZED.items():
        table[byte] = sized
    for byte in _FIXEXT:
        table[byte] = ("fixext", byte)
    return table


_LEAD = _lead_table()
_FIX_KIND = {byte: kind for low, high, kind in _FIX_RANGES for byte in range(low, high + 1)} | _CONSTANTS


# --- what the scanner finds --------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One array record: its bytes are ``nbytes`` at ``offset`` in the file."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    bf16_bits: bool  # bfloat16 read as uint16 bits (ml_dtypes missing)


@dataclass(frozen=True)
class _Plain:
    """A plain msgpack int, bool or nil: legal only inside a chunked-array map."""

    value: int | bool | None


_Node = Union[dict, _Record, _Plain]


def sniff(head: bytes) -> bool:
    """True if ``head`` (the file's first bytes) starts a msgpack map, flax's top level."""
    return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


# --- reading -----------------------------------------------------------------------------------


def read_lazy(path: pathlib.Path) -> LazyState:
    """Every array of a flax msgpack file by its '/'-joined parameter path as stored (a top-level
    ``params`` level stays ``params/...``), memory-mapped on demand.

    The whole file is checked here (structure, dtypes, byte counts, chunk shapes, trailing bytes),
    so a Lazy that is returned reads exactly the bytes it announces.
    """
    path = pathlib.Path(path)
    with reading(path, "flax msgpack file"):
        tree = _scan_file(path)
        state: LazyState = {}
        _collect(tree, (), state, path)
    return state


def read(path: pathlib.Path | str) -> dict[str, np.ndarray]:
    """Every array of the file, in memory the caller owns."""
    return materialize(read_lazy(pathlib.Path(path)))


def _scan_file(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty file, not a flax msgpack file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            scanner = _Scanner(buf, path)
            if not sniff(buf[:1]):
                raise CheckpointError(f"{path}: top level is not a msgpack map (not a flax parameter tree)")
            tree, end = scanner.node(0, (), 0)
            if end != size:
                raise CheckpointError(f"{path}: {size - end} trailing bytes after the parameter tree")
    assert isinstance(tree, dict)
    return tree


def _fixed(lead: int, body: int) -> tuple[str, int, int]:
    """(kind, value or length, body) of a lead byte that carries its value or length itself."""
    kind = _FIX_KIND[lead]
    if kind == "uint":
        return "int", lead, body
    if kind == "negfix":
        return "int", lead - 256, body
    if kind in ("map", "array"):
        return kind, lead & 0x0F, body
    if kind == "str":
        return kind, lead & 0x1F, body
    return kind, 0, body  # nil, false, true


class _Scanner:
    """Walks msgpack bytes in place; every length is checked against the bytes that are left."""

    def __init__(self, buf: mmap.mmap, path: pathlib.Path, end: int | None = None) -> None:
        self.buf = buf
        self.end = len(buf) if end is None else end  # nothing at or past ``end`` is read
        self.path = path
        self.entries = 0

    def fail(self, where: tuple[str, ...], problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {_quote(where)}: {problem}")

    def need(self, pos: int, count: int, where: tuple[str, ...], what: str) -> None:
        if count > self.end - pos:
            raise self.fail(where, f"{what} at offset {pos} claims {count} bytes, {max(self.end - pos, 0)} are left "
                                   "(truncated or corrupt)")

    def header(self, pos: int, where: tuple[str, ...]) -> tuple[str, int, int]:
        """(kind, value or length, position after the header) of the msgpack object at ``pos``.

        Kinds: int (the value), float, nil, true, false, and str / bin / array / map / ext (the
        length, checked against the bytes left: at least one byte per item, two per map entry;
        for ext the position returned is that of the type byte).
        """
        self.need(pos, 1, where, "value")
        lead = self.buf[pos]
        entry = _LEAD[lead]
        if entry is None:
            raise self.fail(where, f"invalid msgpack byte 0x{lead:02x} at offset {pos}")
        how, width = entry
        if how == "fix":
            kind, length, body = _fixed(lead, pos + 1)
        elif how == "fixext":
            kind, length, body = "ext", _FIXEXT[lead], pos + 1
        else:
            kind, body = how, pos + 1 + width
            self.need(pos + 1, width, where, kind)
            length = int.from_bytes(self.buf[pos + 1: body], "big", signed=kind == "int")
            if kind in ("uint", "int"):
                return "int", length, body
            if kind == "float":
                return kind, 0, body
        if kind in _MIN_ENTRY_BYTES:
            self.need(body, length * _MIN_ENTRY_BYTES[kind] + (kind == "ext"), where, kind)
        return kind, length, body

    def text(self, pos: int, where: tuple[str, ...], what: str) -> tuple[str, int]:
        kind, length, body = self.header(pos, where)
        if kind != "str":
            raise self.fail(where, f"{what} is a msgpack {kind}, not a string")
        return self.buf[body: body + length].decode("utf-8"), body + length

    def node(self, pos: int, where: tuple[str, ...], depth: int) -> tuple[_Node, int]:
        """The subtree at ``pos``: a dict of subtrees, an array record or a plain int / bool / nil."""
        kind, length, body = self.header(pos, where)
        if kind == "map":
            return self.map(body, length, where, depth + 1)
        if kind == "ext":
            return self.ext(body, length, where)
        if kind == "int":
            return _Plain(length), body
        if kind in ("true", "false", "nil"):
            return _Plain({"true": True, "false": False, "nil": None}[kind]), body
        raise self.fail(where, f"is a msgpack {kind}, not an array or a map of arrays")

    def map(self, pos: int, count: int, where: tuple[str, ...], depth: int) -> tuple[dict, int]:
        if depth > MAX_DEPTH:
            raise self.fail(where, f"maps nested deeper than {MAX_DEPTH} levels (refused)")
        self.entries += count
        if self.entries > MAX_ENTRIES:
            raise self.fail(where, f"more than {MAX_ENTRIES} map entries (refused)")
        out: dict[str, _Node] = {}
        for _ in range(count):
            key, pos = self.text(pos, where, "map key")
            if key in out:
                raise self.fail(where + (key,), "appears twice")
            out[key], pos = self.node(pos, where + (key,), depth)
        return out, pos

    def ext(self, pos: int, length: int, where: tuple[str, ...]) -> tuple[_Record, int]:
        code = self.buf[pos]
        start, end = pos + 1, pos + 1 + length
        if code not in (EXT_NDARRAY, EXT_NPSCALAR):
            reason = ("a Python complex number" if code == EXT_NATIVE_COMPLEX else f"msgpack extension type {code}")
            raise self.fail(where, f"is {reason}, not an array (refused: a parameter tree holds arrays only)")
        record = self.record(start, end, where)
        if code == EXT_NPSCALAR and record.shape != ():
            raise self.fail(where, f"numpy scalar record has shape {record.shape}")
        return record, end

    def record(self, pos: int, end: int, where: tuple[str, ...]) -> _Record:
        """flax's ndarray record ``(shape, dtype name, C bytes)``, which must fill ``[pos, end)`` exactly."""
        inner = _Scanner(self.buf, self.path, end)  # lengths inside the record may not run past it
        kind, items, pos = inner.header(pos, where)
        if kind != "array" or items != 3:
            raise self.fail(where, "array record is not (shape, dtype, bytes)")
        shape, pos = inner.shape(pos, where)
        name, pos = inner.text(pos, where, "dtype name")
        dtype = dtypes.by_name(name, f"{self.path}: {_quote(where)}")
        bf16_bits = name == "bfloat16" and dtypes.is_bf16_bits(dtype)
        kind, nbytes, pos = inner.header(pos, where)
        if kind != "bin":
            raise self.fail(where, f"array data is a msgpack {kind}, not bytes")
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise self.fail(where, f"array of shape {shape} {dtype.name} needs {expected} bytes, the record has {nbytes}")
        if pos + nbytes != end:
            raise self.fail(where, f"{end - pos - nbytes} stray bytes inside the array record")
        return _Record(pos, shape, dtype, bf16_bits)

    def shape(self, pos: int, where: tuple[str, ...]) -> tuple[tuple[int, ...], int]:
        kind, rank, pos = self.header(pos, where)
        if kind != "array" or rank > MAX_RANK:
            raise self.fail(where, f"array shape is not a list of at most {MAX_RANK} sizes")
        dims = []
        for _ in range(rank):
            kind, size, pos = self.header(pos, where)
            if kind != "int" or size < 0:
                raise self.fail(where, "array shape holds something other than a size")
            dims.append(size)
        return tuple(dims), pos


def _collect(node: dict, where: tuple[str, ...], out: LazyState, path: pathlib.Path) -> None:
    """Flatten the scanned tree into ``out`` ('/'-joined keys), turning chunked maps into one tensor."""
    for key, child in node.items():
        here = where + (key,)
        if isinstance(child, dict) and CHUNKED_FLAG in child:
            lazy = _chunked(child, here, path)
        elif isinstance(child, dict):
            _collect(child, here, out, path)
            continue
        elif isinstance(child, _Record):
            lazy = Lazy(child.shape, _public_dtype(child), _record_loader(path, child, here), _source(path, here))
        else:
            raise CheckpointError(f"{path}: {_quote(here)}: is a plain msgpack value, not an array")
        name = "/".join(here)
        if name in out:
            raise CheckpointError(f"{path}: {_quote(here)}: appears twice (a key holding '/')")
        out[name] = lazy


def _chunked(node: dict, where: tuple[str, ...], path: pathlib.Path) -> Lazy:
    """flax's chunked array: 1-D chunks of one dtype whose lengths add up to the product of its shape."""
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {_quote(where)}: chunked array {problem}")

    flag = node.get(CHUNKED_FLAG)
    if set(node) != {CHUNKED_FLAG, "shape", "chunks"} or not (isinstance(flag, _Plain) and flag.value is True):
        raise fail("is not {__msgpack_chunked_array__: true, shape, chunks}")
    dims = _numbered(node["shape"], fail, "shape")
    if len(dims) > MAX_RANK or not all(isinstance(d, _Plain) and type(d.value) is int and d.value >= 0 for d in dims):
        raise fail("shape is not a list of sizes")
    shape = tuple(d.value for d in dims)
    chunks = _numbered(node["chunks"], fail, "chunks")
    if not chunks or not all(isinstance(c, _Record) and len(c.shape) == 1 for c in chunks):
        raise fail("chunks are not 1-D arrays")
    if len({(c.dtype, c.bf16_bits) for c in chunks}) != 1:
        raise fail("chunks have different dtypes")
    total = sum(c.shape[0] for c in chunks)
    if total != math.prod(shape):
        raise fail(f"of shape {shape} has {total} elements in its chunks")
    first = chunks[0]
    return Lazy(shape, _public_dtype(first), _chunks_loader(path, tuple(chunks), shape, where), _source(path, where))


def _numbered(node: _Node, fail: Callable[[str], CheckpointError], what: str) -> list[_Node]:
    """flax's tuple-as-dict ``{"0": a, "1": b, ...}`` as a list; any other keys are refused."""
    if not isinstance(node, dict) or list(node) != [str(i) for i in range(len(node))]:
        raise fail(f"{what} is not a map numbered 0, 1, ...")
    return list(node.values())


def _public_dtype(record: _Record) -> np.dtype:
    return np.dtype(np.float32) if record.bf16_bits else record.dtype


def _map_record(path: pathlib.Path, record: _Record) -> np.ndarray:
    """The record's bytes as a read-only array mapped from the file (zeros when it is empty)."""
    if math.prod(record.shape) == 0:
        array = np.zeros(record.shape, dtype=record.dtype)
    else:
        array = np.memmap(path, dtype=record.dtype, mode="r", offset=record.offset, shape=record.shape)
    return dtypes.bf16_bits_to_float32(array) if record.bf16_bits else array


def _record_loader(path: pathlib.Path, record: _Record, where: tuple[str, ...]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        with reading(path, f"array {_quote(where)}"):
            return _map_record(path, record)
    return load


def _chunks_loader(path: pathlib.Path, chunks: tuple[_Record, ...], shape: tuple[int, ...],
                   where: tuple[str, ...]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        with reading(path, f"chunked array {_quote(where)}"):
            return np.concatenate([_map_record(path, c) for c in chunks]).reshape(shape)
    return load


def _source(path: pathlib.Path, where: tuple[str, ...]) -> str:
    return f"{path}:{'/'.join(where)}"


def _quote(where: tuple[str, ...], limit: int = 80) -> str:
    """A parameter path for a message: '/'-joined, cut to ``limit`` characters, repr-quoted."""
    name = "/".join(where) or "top level"
    return repr(name if len(name) <= limit else name[:limit] + "...")


# --- writing -----------------------------------------------------------------------------------


def write(path: pathlib.Path, state: LazyState, progress: Progress | None = None) -> None:
    """Stream ``state`` ('/'-joined keys -> nested maps) into a flax msgpack file, one tensor at a time.

    The bytes equal ``flax.serialization.to_bytes`` of the same nested dict (keys in the order
    they first appear; arrays in native byte order; arrays over :data:`MAX_CHUNK_SIZE` bytes
    chunked as flax does). ``progress(nbytes)`` is called after each tensor. Not atomic: the
    caller stages the file.
    """
    path = pathlib.Path(path)
    tree = _nest(state, path)
    with writing(path), open(path, "wb") as f:
        _write_map(f, tree, path, progress)


def _nest(state: Mapping[str, Lazy], path: pathlib.Path) -> dict:
    """'/'-joined keys as nested dicts; a key under a tensor, or a tensor where a map is, is refused."""
    tree: dict = {}
    for key, lazy in state.items():
        parts = key.split("/")
        if not key or "" in parts or len(parts) > MAX_DEPTH:
            raise CheckpointError(f"{path}: cannot write key {_quote((key,))}: empty parts or deeper than {MAX_DEPTH}")
        dtypes.numeric(lazy.dtype, f"{path}: {_quote((key,))}")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{path}: key {_quote((key,))} nests under a tensor")
        if parts[-1] in node:
            raise CheckpointError(f"{path}: key {_quote((key,))} is both a tensor and a map")
        node[parts[-1]] = lazy
    return tree


def _packer():
    import msgpack  # the msgpack package encodes headers, names and shapes exactly as flax's packb

    return msgpack.Packer(use_bin_type=True)


def _write_map(f: BinaryIO, tree: dict, path: pathlib.Path, progress: Progress | None) -> None:
    packer = _packer()
    f.write(packer.pack_map_header(len(tree)))
    for key, value in tree.items():
        f.write(packer.pack(key))
        if isinstance(value, dict):
            _write_map(f, value, path, progress)
        else:
            _write_tensor(f, value, path, progress)


def _write_tensor(f: BinaryIO, lazy: Lazy, path: pathlib.Path, progress: Progress | None) -> None:
    array = np.require(dtypes.native(lazy.materialize()), requirements="C")  # (ascontiguousarray would make 0-d 1-d)
    if array.nbytes > MAX_CHUNK_SIZE:
        _write_chunked(f, array)
    else:
        _write_record(f, array)
    if progress:
        progress(lazy.nbytes)


def _write_chunked(f: BinaryIO, array: np.ndarray) -> None:
    """flax's _chunk: {flag: True, shape: {"0": d0, ...}, chunks: {"0": flat[0:step], ...}}."""
    packer = _packer()
    step = max(1, int(MAX_CHUNK_SIZE / array.dtype.itemsize))
    flat = array.reshape(-1)
    starts = range(0, flat.size, step)
    f.write(packer.pack_map_header(3) + packer.pack(CHUNKED_FLAG) + packer.pack(True) + packer.pack("shape"))
    f.write(packer.pack({str(i): int(d) for i, d in enumerate(array.shape)}))
    f.write(packer.pack("chunks") + packer.pack_map_header(len(starts)))
    for i, start in enumerate(starts):
        f.write(packer.pack(str(i)))
        _write_record(f, flat[start: start + step])


def _write_record(f: BinaryIO, array: np.ndarray) -> None:
    """Extension type 1 of msgpack ``(shape, dtype name, bytes)``; the bytes go straight from the array."""
    packer = _packer()
    body = (packer.pack_array_header(3) + packer.pack([int(d) for d in array.shape]) + packer.pack(array.dtype.name)
            + _bin_header(array.nbytes))
    f.write(_ext_header(len(body) + array.nbytes, EXT_NDARRAY) + body)
    f.write(memoryview(array.reshape(-1).view(np.uint8)))


def _bin_header(length: int) -> bytes:
    for lead, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        if length < 1 << (8 * width):
            return bytes([lead]) + length.to_bytes(width, "big")
    raise CheckpointError(f"a msgpack bin holds at most 2**32 - 1 bytes, not {length}")


def _ext_header(length: int, code: int) -> bytes:
    fixext = {size: lead for lead, size in _FIXEXT.items()}
    if length in fixext:
        return bytes([fixext[length], code])
    for lead, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        if length < 1 << (8 * width):
            return bytes([lead]) + length.to_bytes(width, "big") + bytes([code])
    raise CheckpointError(f"a msgpack ext holds at most 2**32 - 1 bytes, not {length}")
