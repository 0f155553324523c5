"""torch checkpoints (``pytorch_model.bin``): torch's zip format and its legacy pre-1.6 pickle
format, read without torch and without running anything the file holds; and a writer of the zip
format that needs no torch either.

Both formats are a pickle of the state dict whose tensors refer to *storages* by persistent id:

- zip (torch >= 1.6): ``<archive>/data.pkl`` plus one member ``<archive>/data/<key>`` per storage
  (``<archive>/byteorder`` says how the storages are stored, little-endian when absent);
- legacy (``torch.save(..., _use_new_zipfile_serialization=False)``): five pickles in a row (magic
  number, protocol version, sys_info, the object with its persistent ids, the sorted list of
  storage keys), then per storage in that order a little-endian int64 element count and the raw
  little-endian bytes.

Every pickle goes through one restricted unpickler (``torch_pickle``), a subclass of the pure-Python
``pickle._Unpickler`` with its own opcode table (the C unpickler cannot intercept BUILD):

- globals: only what a state dict needs (the tensor rebuild functions, the storage types,
  ``collections.OrderedDict``, ``torch.device``), each mapped to a local stand-in; torch is never
  imported and any other global refuses the file before it could be called;
- opcodes: only those a pickled state dict uses; INST, OBJ, NEWOBJ, extension codes and
  out-of-band buffers refuse the file;
- REDUCE calls only the allowed functions, with a tuple of arguments;
- BUILD applies only to an OrderedDict this load created (torch gives the state dict its
  ``_metadata`` so), never to a class, function or storage type: a file cannot alter vitx's code;
- dict keys and set members must be scalars, so nothing from the file is hashed recursively, and
  nothing walks the loaded object recursively: a deeply nested pickle ends in a CheckpointError.

Tensors are checked against their storage before anything is allocated: a tensor may not claim
more elements than its storage holds, reach past its end or overlap itself (a stride-0 view of one
element that claims gigabytes), and a storage may not claim more bytes than its member (or its
part of a legacy file) holds. A compressed member is refused when its declared size is beyond its
pickle bound, its storage's size or deflate's maximum ratio, so nothing is decompressed past what
the file declares. Stored members and legacy storages are memory-mapped; the zip CRC of a member
is checked the first time one of its tensors is loaded.
"""

from __future__ import annotations

import functools
import io
import math
import pathlib
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from . import dtypes, zips
from .errors import CheckpointError, reading, writing
from .lazy import LazyState, materialize
from .torch_pickle import (  # the restricted unpickler and its records
    MAX_PICKLE_BYTES,
    _Storage,
    _as_state,
    _brief,
    _storage_record,
    _unpickle,
)

Progress = Callable[[int], None]

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
_PICKLE_PROTOCOLS = range(2, 6)  # what torch.save writes (2) up to the newest pickle protocol

_DEFLATE_SLACK = 1024  # block headers of a tiny member

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_LEGACY_COUNT = struct.Struct("<q")  # the element count before each legacy storage


def sniff(head: bytes) -> str | None:
    """``"torch"`` for a zip archive, ``"torch_legacy"`` for a bare pickle (protocol 2 to 5), else None."""
    if head[:4] in _ZIP_MAGICS:
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "torch_legacy"
    return None


def read_lazy(path: pathlib.Path) -> LazyState:
    """The state dict of a torch checkpoint (zip or legacy, told apart by its first bytes), one Lazy
    per tensor in the pickle's order, in native byte order; nothing is executed, nothing but the
    pickles is read until a tensor is loaded."""
    path = pathlib.Path(path)
    with reading(path, "torch checkpoint"):
        with open(path, "rb") as f:
            head = f.read(8)
        kind = sniff(head)
        if kind is None:
            raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
        return _READERS[kind](path)


def read(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a torch checkpoint in memory (see :func:`read_lazy`)."""
    state = read_lazy(path)
    with reading(path, "torch checkpoint"):
        return materialize(state)




# --- zip format ----------------------------------------------------------------------------------


def _read_zip(path: pathlib.Path) -> LazyState:
    file_size = path.stat().st_size
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: zip archive without exactly one <archive>/data.pkl: not a torch "
                                  "checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = _byteorder(path, archive, prefix)
        info = archive.getinfo(pickles[0])
        _check_member(path, info, MAX_PICKLE_BYTES, file_size)
        data = archive.read(info)

        storages: dict[str, _Storage] = {}

        def storage_for(pid: object) -> _Storage:
            storage_type, key, numel, _ = _storage_record(pid, 5)
            if key not in storages:
                storage = _Storage(storage_type, numel, key, big_endian)
                storage.source = _member_source(path, archive, raw, f"{prefix}data/{key}", storage, file_size)
                storages[key] = storage
            storage = storages[key]
            if storage.type is not storage_type or storage.numel != numel:
                raise CheckpointError(f"{path}: storage {_brief(key)} is recorded twice, differently")
            return storage

        obj = _unpickle(io.BytesIO(data), path, storage_for)
    return _as_state(obj, path)


def _byteorder(path: pathlib.Path, archive: zipfile.ZipFile, prefix: str) -> bool:
    """True when the archive says its storages are big-endian."""
    name = f"{prefix}byteorder"
    if name not in archive.NameToInfo:
        return False
    info = archive.getinfo(name)
    _check_member(path, info, 16, None)
    value = archive.read(info).strip()
    if value not in (b"little", b"big"):
        raise CheckpointError(f"{path}: {name} is neither 'little' nor 'big'")
    return value == b"big"


def _check_member(path: pathlib.Path, info: zipfile.ZipInfo, limit: int, file_size: int | None) -> None:
    """Refuse a member whose declared size is past ``limit``, that a stored member's bytes could not
    fit in the file, or that a deflated one could not expand to (a zip bomb); refused before any
    byte of it is read."""
    what = f"{path}: archive member {_brief(info.filename, 80)}"
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{what} is encrypted")
    if info.file_size > limit:
        raise CheckpointError(f"{what} declares {info.file_size} bytes, more than the {limit} it may hold (refused)")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise CheckpointError(f"{what} is stored with {info.compress_size} bytes but declares {info.file_size}")
        if file_size is not None and info.header_offset + info.compress_size > file_size:
            raise CheckpointError(f"{what} runs past the end of the file (truncated)")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > info.compress_size * zips.DEFLATE_MAX_RATIO + _DEFLATE_SLACK:
            raise CheckpointError(f"{what} declares {info.file_size} bytes from {info.compress_size} compressed: "
                                  "more than deflate can produce (a zip bomb; refused)")
    else:
        raise CheckpointError(f"{what} uses compression method {info.compress_type} (only stored or deflated)")


def _member_source(path: pathlib.Path, archive: zipfile.ZipFile, raw: BinaryIO, name: str, storage: _Storage,
                   file_size: int) -> Callable[[], np.ndarray]:
    """Where a storage's elements come from: its archive member, checked against its numel now."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: storage {_brief(name, 80)} is missing from the archive") from None
    dtype = storage.type.stored_dtype(storage.big_endian)
    stored = info.compress_type == zipfile.ZIP_STORED
    if info.file_size < storage.nbytes or (not stored and info.file_size != storage.nbytes):
        raise CheckpointError(f"{path}: storage {_brief(name, 80)} has {info.file_size} bytes, its record claims "
                              f"{storage.nbytes} ({storage.numel} x {storage.type.name}; refused)")
    _check_member(path, info, info.file_size if stored else storage.nbytes, file_size)
    if stored:
        offset = zips.data_offset(path, raw, info)
        if offset + info.file_size > file_size:
            raise CheckpointError(f"{path}: storage {_brief(name, 80)} runs past the end of the file (truncated)")
        return _MappedMember(path, offset, info, dtype, storage.numel)
    return functools.partial(_inflate, path, info, dtype, storage.numel)




class _MappedMember:
    """A stored member's elements, memory-mapped; its CRC is checked on the first load."""

    def __init__(self, path: pathlib.Path, offset: int, info: zipfile.ZipInfo, dtype: np.dtype, numel: int) -> None:
        self._path, self._offset, self._info, self._dtype, self._numel = path, offset, info, dtype, numel
        self._verified = False

    def __call__(self) -> np.ndarray:
        if self._info.file_size == 0:
            return np.zeros(0, dtype=self._dtype)
        data = np.memmap(self._path, dtype=np.uint8, mode="r", offset=self._offset, shape=(self._info.file_size,))
        if not self._verified:
            if zlib.crc32(data) != self._info.CRC:
                raise CheckpointError(f"{self._path}: storage {_brief(self._info.filename, 80)} fails its CRC check "
                                      "(corrupt)")
            self._verified = True
        return data[: self._numel * self._dtype.itemsize].view(self._dtype)


def _inflate(path: pathlib.Path, info: zipfile.ZipInfo, dtype: np.dtype, numel: int) -> np.ndarray:
    """A deflated member's elements: never more than its declared size is decompressed (zipfile
    stops there and checks the CRC)."""
    with zipfile.ZipFile(path) as archive, archive.open(info) as member:
        data = member.read()
    return np.frombuffer(data, dtype=dtype, count=numel)


# --- legacy format (torch < 1.6) ---------------------------------------------------------------


class _Budget:
    """A file read through a byte budget shared by all the pickles in it: a size field in a pickle
    can never make one read ask for more than the budget left."""

    def __init__(self, file: BinaryIO, budget: int) -> None:
        self._file, self._left = file, budget

    def _take(self, n: int) -> None:
        if n > self._left:
            raise CheckpointError(f"the pickles run past {MAX_PICKLE_BYTES} bytes (refused)")
        self._left -= n

    def read(self, n: int = -1) -> bytes:
        self._take(n if n >= 0 else self._left + 1)  # refused before reading: a pickle asks only for what it holds
        return self._file.read(n)

    def readline(self) -> bytes:
        data = self._file.readline(self._left + 1)
        self._take(len(data))
        return data


def _read_legacy(path: pathlib.Path) -> LazyState:
    file_size = path.stat().st_size
    storages: dict[str, _Storage] = {}

    def storage_for(pid: object) -> _Storage:
        storage_type, key, numel, (view,) = _storage_record(pid, 6)
        if view is not None:
            raise CheckpointError(f"{path}: storage views (torch before 0.4) are not read")
        storage = storages.setdefault(key, _Storage(storage_type, numel, key))
        if storage.type is not storage_type or storage.numel != numel:
            raise CheckpointError(f"{path}: storage {_brief(key)} is recorded twice, differently")
        return storage

    with open(path, "rb") as f:
        stream = _Budget(f, MAX_PICKLE_BYTES)
        _check_legacy_header(path, stream)
        obj = _unpickle(stream, path, storage_for)
        keys = _unpickle(stream, path)
        if type(keys) is not list or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
            raise CheckpointError(f"{path}: the storage key list is not a list of distinct names")
        offset = f.tell()
        for key in keys:
            if key not in storages:
                raise CheckpointError(f"{path}: storage {_brief(key)} has data but no record")
            storage = storages[key]
            offset = _locate_legacy(path, f, offset, storage, file_size)
    missing = [key for key, storage in storages.items() if storage.source is None]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} storage record(s) without data, e.g. {_brief(missing[0])}")
    return _as_state(obj, path)


def _check_legacy_header(path: pathlib.Path, stream: _Budget) -> None:
    """The three pickles before the object: magic number, protocol version, sys_info."""
    magic = _unpickle(stream, path)
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: a pickle without torch's magic number: not a torch checkpoint")
    protocol = _unpickle(stream, path)
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported torch legacy protocol (a {type(protocol).__name__})")
    if type(_unpickle(stream, path)) is not dict:
        raise CheckpointError(f"{path}: torch legacy sys_info is not a dict")
    # sys_info's byte order is not needed: torch writes legacy storages little-endian on every host.


def _locate_legacy(path: pathlib.Path, f: BinaryIO, offset: int, storage: _Storage, file_size: int) -> int:
    """Point ``storage`` at its bytes (after its element count at ``offset``); the next offset."""
    f.seek(offset)
    head = f.read(_LEGACY_COUNT.size)
    if len(head) < _LEGACY_COUNT.size:
        raise CheckpointError(f"{path}: storage {_brief(storage.key)} is missing (truncated file)")
    (count,) = _LEGACY_COUNT.unpack(head)
    if count != storage.numel:
        raise CheckpointError(f"{path}: storage {_brief(storage.key)} holds {count} elements, its record "
                              f"claims {storage.numel} (refused)")
    start = offset + _LEGACY_COUNT.size
    if start + storage.nbytes > file_size:
        raise CheckpointError(f"{path}: storage {_brief(storage.key)} claims {storage.nbytes} bytes, the file "
                              f"holds {max(file_size - start, 0)} after its count (truncated or hostile; refused)")
    storage.source = functools.partial(_mapped, path, start, storage.type.stored_dtype(False), storage.numel)
    return start + storage.nbytes


def _mapped(path: pathlib.Path, offset: int, dtype: np.dtype, numel: int) -> np.ndarray:
    if numel == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(numel,))


_READERS: dict[str, Callable[[pathlib.Path], LazyState]] = {"torch": _read_zip, "torch_legacy": _read_legacy}


# --- writer ----------------------------------------------------------------------------------

# dtype name -> the storage type torch.load (weights_only=True too) rebuilds it from.
_WRITE_STORAGE: dict[str, str] = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage", "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage",
}


class _PickleWriter:
    """Just enough pickle protocol 2 to write a torch state dict without importing torch.

    torch.load (weights_only=True included) rebuilds each entry from
    ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` with
    ``storage`` a persistent id ``("storage", torch.FloatStorage, key, "cpu", numel)``.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def mark(self) -> None:
        self.out += b"("

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str_(self, s: str) -> None:
        data = s.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def int_(self, n: int) -> None:
        if 0 <= n < 256:
            self.out += b"K" + bytes([n])
        elif 0 <= n < 65536:
            self.out += b"M" + struct.pack("<H", n)
        elif -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def tuple_of_ints(self, values: tuple[int, ...]) -> None:
        self.mark()
        for v in values:
            self.int_(v)
        self.out += b"t"

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE

    def tensor(self, storage_name: str, key: str, shape: tuple[int, ...]) -> None:
        """A contiguous tensor over the whole storage ``key``."""
        strides = tuple(int(math.prod(shape[i + 1:])) for i in range(len(shape)))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.mark()
        self.mark()  # the persistent id tuple
        self.str_("storage")
        self.global_("torch", storage_name)
        self.str_(key)
        self.str_("cpu")
        self.int_(math.prod(shape))
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int_(0)  # storage offset
        self.tuple_of_ints(shape)
        self.tuple_of_ints(strides)
        self.out += b"\x89"  # requires_grad False
        self.ordered_dict()  # backward hooks
        self.out += b"tR"  # args tuple, REDUCE


def _state_pickle(state: LazyState) -> bytes:
    """data.pkl: an OrderedDict of one contiguous tensor per storage, storage keys "0", "1", ..."""
    pickler = _PickleWriter()
    pickler.ordered_dict()
    pickler.mark()
    for index, (key, lazy) in enumerate(state.items()):
        storage = _WRITE_STORAGE.get(lazy.dtype.name)
        if storage is None:
            raise CheckpointError(f"{key}: dtype {lazy.dtype} has no torch storage type")
        pickler.str_(key)
        pickler.tensor(storage, str(index), lazy.shape)
    pickler.out += b"u."  # SETITEMS, STOP
    return bytes(pickler.out)


def write(path: pathlib.Path, state: LazyState, progress: Progress | None = None) -> None:
    """A ``pytorch_model.bin`` in torch's zip format, written without torch, one tensor in memory at
    a time: one storage per tensor, little-endian, each record 64-byte aligned as torch writes
    them (so ``torch.load(mmap=True)`` works too). Not atomic: the caller stages the path.
    ``progress(nbytes)`` follows each tensor."""
    path = pathlib.Path(path)
    data_pkl = _state_pickle(state)
    root = "archive"
    with writing(path), _AlignedZip(path) as archive:
        archive.write(f"{root}/data.pkl", data_pkl)
        archive.write(f"{root}/byteorder", b"little")
        for index, lazy in enumerate(state.values()):
            array = np.ascontiguousarray(dtypes.little_endian(lazy.materialize()))
            archive.write(f"{root}/data/{index}", memoryview(array.reshape(-1).view(np.uint8)) if array.size else b"")
            if progress:
                progress(lazy.nbytes)
        archive.write(f"{root}/version", b"3\n")
        archive.write(f"{root}/.data/serialization_id", b"0" * 40)


class _AlignedZip:
    """A stored (uncompressed) zip whose member data starts on 64-byte boundaries, like torch's
    PyTorchStreamWriter (the padding goes into the local header's extra field, id 'FB')."""

    def __init__(self, path: pathlib.Path) -> None:
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def __enter__(self) -> _AlignedZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    def write(self, name: str, data: bytes | memoryview) -> None:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        offset = self._zip.fp.tell() if self._zip.fp is not None else 0
        base = offset + 30 + len(name.encode())
        pad = (-(base + 4)) % 64
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        with self._zip.open(info, "w", force_zip64=len(data) > 2**31) as member:
            member.write(data)


__all__ = ["sniff", "read_lazy", "read", "write", "MAX_PICKLE_BYTES"]
