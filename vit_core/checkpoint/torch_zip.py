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

Every pickle goes through one restricted unpickler, a subclass of the pure-Python
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

import contextlib
import functools
import io
import math
import pathlib
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from . import dtypes
from .errors import CheckpointError, reading, writing
from .lazy import Lazy, LazyState, materialize

Progress = Callable[[int], None]

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
_PICKLE_PROTOCOLS = range(2, 6)  # what torch.save writes (2) up to the newest pickle protocol

MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl, or all pickles of a legacy file together
_DEFLATE_MAX_RATIO = 1032  # the most one compressed byte can expand to under deflate
_DEFLATE_SLACK = 1024  # block headers of a tiny member
_MAX_NDIM = 64  # numpy's limit

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
    with _reading(path, "torch checkpoint"):
        with open(path, "rb") as f:
            head = f.read(8)
        kind = sniff(head)
        if kind is None:
            raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
        return _READERS[kind](path)


def read(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a torch checkpoint in memory (see :func:`read_lazy`)."""
    state = read_lazy(path)
    with _reading(path, "torch checkpoint"):
        return materialize(state)


@contextlib.contextmanager
def _reading(path: pathlib.Path, what: str) -> Iterator[None]:
    """:func:`errors.reading`, plus zlib's errors (a corrupt deflated member)."""
    with reading(path, what):
        try:
            yield
        except zlib.error as e:
            raise CheckpointError(f"{path}: cannot decompress {what} (corrupt): {e}") from None


def _brief(value: object, limit: int = 40) -> str:
    """A short, safe description of a value from the file: a clipped repr of a string, else its type."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    return type(value).__name__


# --- storages and tensors: what the pickle's records become -----------------------------------


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a ``torch.*Storage`` class inside the pickle: the element type of a storage."""

    name: str
    code: str  # numpy code of one element as stored little-endian; bfloat16 as its uint16 bits
    bf16: bool = False

    def stored_dtype(self, big_endian: bool) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype

    def result_dtype(self) -> np.dtype:
        """The dtype a caller gets: native order; bfloat16 through ml_dtypes, or float32 without it."""
        if self.bf16:
            return dtypes.bfloat16() or np.dtype(np.float32)
        return np.dtype(self.code).newbyteorder("=")

    def finish(self, stored: np.ndarray) -> np.ndarray:
        """Elements as read from the file -> elements of :meth:`result_dtype` (a view when possible)."""
        if self.bf16:
            bf16 = dtypes.bfloat16()
            bits = dtypes.native(stored)
            return bits.view(bf16) if bf16 is not None else dtypes.bf16_bits_to_float32(bits)
        return dtypes.native(stored)


_STORAGE_TYPES: dict[str, _StorageType] = {
    name: _StorageType(name, code, bf16=name == "BFloat16Storage")
    for name, code in {
        "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
        "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
        "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16",
        "UntypedStorage": "u1",
    }.items()
}


@dataclass(eq=False)
class _Storage:
    """One storage record: element type and count; ``source`` (set by the container reader once it
    knows where the bytes lie) returns its elements as a flat array of ``numel`` stored elements."""

    type: _StorageType
    numel: int
    key: str
    big_endian: bool = False
    source: Callable[[], np.ndarray] | None = field(default=None, repr=False)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.type.code).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True, eq=False)
class _Tensor:
    """A tensor record, already checked against its storage: a strided view of ``numel`` elements."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _TensorType:
    """Stands in for torch.Tensor / torch.nn.Parameter in ``_rebuild_from_type_v2``."""


def _ints(values: object, what: str) -> tuple[int, ...]:
    if type(values) is not tuple or len(values) > _MAX_NDIM or any(type(v) is not int for v in values):
        raise CheckpointError(f"tensor record with an invalid {what} (a tuple of at most {_MAX_NDIM} ints expected)")
    return values


def _check_layout(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    """Refuse a view that is not one torch writes for a state dict: negative or mismatched fields,
    more elements than its storage holds, reaching past its end, or overlapping itself.

    Overlap is tested by nesting: ordered by stride, each dimension (of size > 1) must step past
    everything the smaller-stride dimensions span; contiguous tensors, slices, transposes and
    permutes of them always do, a stride-0 (expanded) dimension never does.
    """
    where = f"tensor record (size {size}, stride {stride}, offset {offset})"
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"invalid {where}")
    numel = math.prod(size)
    if numel == 0:
        return
    if numel > storage.numel:
        raise CheckpointError(f"{where} claims {numel} elements, its storage {_brief(storage.key)} holds "
                              f"{storage.numel} (refused)")
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
        raise CheckpointError(f"{where} reads past the end of its storage {_brief(storage.key)} "
                              f"({storage.numel} elements)")
    span = 0
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if s <= span:
            raise CheckpointError(f"{where} overlaps itself (a state dict tensor never does; refused)")
        span += (n - 1) * s


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                       requires_grad: object = False, backward_hooks: object = None,
                       metadata: object = None) -> _Tensor:
    """torch._utils._rebuild_tensor_v2, checked: the record of a strided view of a storage."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor record refers to {type(storage).__name__}, not a storage")
    if type(storage_offset) is not int:
        raise CheckpointError(f"tensor record with a {type(storage_offset).__name__} storage offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    _check_layout(storage, storage_offset, size, stride)
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...]) -> _Tensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: _Tensor, requires_grad: object = False, backward_hooks: object = None,
                       state: object = None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise CheckpointError(f"parameter record holds a {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> _Tensor:
    if not any(func is f for f in _TENSOR_REBUILDS) or new_type is not _TensorType or type(args) is not tuple:
        raise CheckpointError("tensor-subclass record with an unsupported rebuild function or type")
    return func(*args)  # type: ignore[operator]


def _torch_device(*args: object) -> str:
    if not all(type(a) in (str, int) for a in args):
        raise CheckpointError("torch.device record with arguments that are not names or indices")
    return ":".join(str(a) for a in args)


_TENSOR_REBUILDS = (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter)

# Every global a pickle may name, as (module, name) -> its stand-in.
_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}

# The globals REDUCE may call (OrderedDict only with no arguments).
_CALLABLES = (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter, _rebuild_from_type_v2, _torch_device,
              OrderedDict)


# --- the restricted unpickler ------------------------------------------------------------------

# Opcodes run as the pure-Python unpickler runs them: constants, memo, tuples, lists, dicts, sets,
# globals (through find_class) and binary persistent ids (through persistent_load).
_PLAIN_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
    "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "EMPTY_DICT", "EMPTY_SET",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "BINPERSID",
})

# What a dict key or set member may be: hashing one never recurses.
_SCALARS = (str, int, float, bool, type(None), bytes)


def _scalars(items: list[Any], what: str) -> list[Any]:
    for item in items:
        if type(item) not in _SCALARS:
            raise CheckpointError(f"pickle uses a {type(item).__name__} as a {what} (only scalars allowed; refused)")
    return items


def _target(unpickler: _Unpickler, types: tuple[type, ...], opcode: str) -> Any:
    target = unpickler.stack[-1]
    if type(target) not in types:
        raise CheckpointError(f"pickle opcode {opcode} applied to a {type(target).__name__} (refused)")
    return target


def _load_reduce(self: _Unpickler) -> None:
    args = self.stack.pop()
    func = self.stack[-1]
    if not any(func is allowed for allowed in _CALLABLES):
        raise CheckpointError(f"refused to call a {type(func).__name__} from the pickle: a weights file may only "
                              "call tensor rebuild functions")
    if type(args) is not tuple:
        raise CheckpointError(f"pickle calls a function with a {type(args).__name__} of arguments (refused)")
    if func is OrderedDict:
        if args:
            raise CheckpointError("pickle calls OrderedDict with arguments (refused)")
        result: Any = OrderedDict()
        self.created[id(result)] = result
    else:
        result = func(*args)  # type: ignore[operator]
    self.stack[-1] = result


def _load_build(self: _Unpickler) -> None:
    """BUILD (set an object's attributes): only onto an OrderedDict this load created, only plain
    attribute names; torch uses it for a state dict's ``_metadata``."""
    state = self.stack.pop()
    target = self.stack[-1]
    if self.created.get(id(target)) is not target:
        raise CheckpointError(f"refused pickle BUILD onto a {type(target).__name__}: only a state dict the "
                              "file itself created may get attributes")
    if type(state) is not dict or not all(type(k) is str and not k.startswith("__") for k in state):
        raise CheckpointError(f"refused pickle BUILD with a {type(state).__name__} state (plain attribute names "
                              "only)")
    target.__dict__.update(state)


def _load_append(self: _Unpickler) -> None:
    value = self.stack.pop()
    _target(self, (list,), "APPEND").append(value)


def _load_appends(self: _Unpickler) -> None:
    items = self.pop_mark()
    _target(self, (list,), "APPENDS").extend(items)


def _load_setitem(self: _Unpickler) -> None:
    value = self.stack.pop()
    key = self.stack.pop()
    _target(self, (dict, OrderedDict), "SETITEM")[_scalars([key], "dict key")[0]] = value


def _load_setitems(self: _Unpickler) -> None:
    items = self.pop_mark()
    target = _target(self, (dict, OrderedDict), "SETITEMS")
    keys = _scalars(items[0::2], "dict key")
    target.update(zip(keys, items[1::2]))


def _load_dict(self: _Unpickler) -> None:
    items = self.pop_mark()
    self.append(dict(zip(_scalars(items[0::2], "dict key"), items[1::2])))


def _load_additems(self: _Unpickler) -> None:
    items = self.pop_mark()
    _target(self, (set,), "ADDITEMS").update(_scalars(items, "set member"))


def _load_frozenset(self: _Unpickler) -> None:
    self.append(frozenset(_scalars(self.pop_mark(), "set member")))


_OVERRIDES: dict[str, Callable[[Any], None]] = {
    "REDUCE": _load_reduce, "BUILD": _load_build, "APPEND": _load_append, "APPENDS": _load_appends,
    "SETITEM": _load_setitem, "SETITEMS": _load_setitems, "DICT": _load_dict, "ADDITEMS": _load_additems,
    "FROZENSET": _load_frozenset,
}


def _refuser(name: str) -> Callable[[Any], None]:
    def refuse(self: _Unpickler) -> None:
        raise CheckpointError(f"pickle opcode {name} is not allowed in a weights file (refused)")
    return refuse


def _restricted_dispatch() -> dict[int, Callable[[Any], None]]:
    """The opcode table: a copy of the pure-Python unpickler's, with the overrides above and every
    other opcode (and every unknown byte) refusing the file."""
    base = pickle._Unpickler.dispatch  # type: ignore[attr-defined]
    table: dict[int, Callable[[Any], None]] = {code: _refuser(f"0x{code:02x}") for code in range(256)}
    for op in pickletools.opcodes:
        code = op.code.encode("latin-1")[0]
        if op.name in _OVERRIDES:
            table[code] = _OVERRIDES[op.name]
        elif op.name in _PLAIN_OPCODES:
            table[code] = base[code]
        else:
            table[code] = _refuser(op.name)
    return table


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Unpickles a torch state dict and nothing else (see the module docstring); storage records
    (persistent ids) become whatever ``storage_for`` makes of them."""

    dispatch = _restricted_dispatch()

    def __init__(self, file: Any, path: pathlib.Path, storage_for: Callable[[object], _Storage]) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._storage_for = storage_for
        self.created: dict[int, object] = {}  # id -> object this load made (kept alive while it runs)

    def find_class(self, module: str, name: str) -> object:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
            raise CheckpointError(
                f"{self._path}: refused to unpickle global {module[:60]}.{name[:60]}: a weights file may only "
                "hold tensors (this file would run code when loaded with torch.load(weights_only=False))"
            ) from None

    def persistent_load(self, pid: object) -> _Storage:
        return self._storage_for(pid)


def _unpickle(file: Any, path: pathlib.Path, storage_for: Callable[[object], _Storage] | None = None) -> object:
    return _Unpickler(file, path, storage_for or _no_storages).load()


def _no_storages(pid: object) -> _Storage:
    raise CheckpointError("storage record in a pickle that holds none (refused)")


def _storage_record(pid: object, fields: int) -> tuple[_StorageType, str, int, tuple]:
    """A persistent id ``("storage", storage type, key, location, numel, ...)``, checked."""
    if type(pid) is not tuple or len(pid) != fields or type(pid[0]) is not str or pid[0] != "storage":
        raise CheckpointError(f"unsupported persistent record (a {type(pid).__name__}; only {fields}-field "
                              "storage records are read)")
    _, storage_type, key, location, numel, *rest = pid
    if not isinstance(storage_type, _StorageType):
        raise CheckpointError(f"storage record with a {type(storage_type).__name__}, not a storage type")
    if type(key) is not str or type(location) is not str:
        raise CheckpointError(f"storage record with a {type(key).__name__} key / {type(location).__name__} location")
    if type(numel) is not int or numel < 0:
        raise CheckpointError(f"storage record {_brief(key)} with an invalid element count")
    return storage_type, key, numel, tuple(rest)


# --- the state dict -----------------------------------------------------------------------------

_WRAPPERS = ("state_dict", "model")  # where training checkpoints keep the weights
_MAX_UNWRAP = 3


def _as_state(obj: object, path: pathlib.Path) -> LazyState:
    """The loaded object as a state dict (unwrapping a training checkpoint), one Lazy per tensor."""
    for _ in range(_MAX_UNWRAP):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
        if any(isinstance(v, _Tensor) for v in obj.values()):
            break
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    state: LazyState = {}
    for key, value in obj.items():  # type: ignore[union-attr]
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            raise CheckpointError(f"{path}: entry {_brief(key)} is a {type(value).__name__}, not a tensor")
        state[key] = _lazy(value, key, path)
    return state


def _lazy(tensor: _Tensor, key: str, path: pathlib.Path) -> Lazy:
    return Lazy(tensor.size, tensor.storage.type.result_dtype(), functools.partial(_load, tensor, key, path),
                f"{path}:{key}")


def _load(tensor: _Tensor, key: str, path: pathlib.Path) -> np.ndarray:
    """A tensor's data: a read-only strided view of its storage (memory-mapped where it can be)."""
    storage = tensor.storage
    with _reading(path, f"tensor {_brief(key)}"):
        if math.prod(tensor.size) == 0:
            return np.zeros(tensor.size, dtype=storage.type.result_dtype())
        if storage.source is None:
            raise CheckpointError(f"{path}: storage {_brief(storage.key)} has no data")
        flat = storage.source()
        if flat.size < storage.numel:
            raise CheckpointError(f"{path}: storage {_brief(storage.key)} holds {flat.size} of its "
                                  f"{storage.numel} elements (truncated)")
        view = np.lib.stride_tricks.as_strided(flat[tensor.offset:], shape=tensor.size,
                                               strides=tuple(s * flat.itemsize for s in tensor.stride),
                                               writeable=False)
        return storage.type.finish(view)


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
        if info.file_size > info.compress_size * _DEFLATE_MAX_RATIO + _DEFLATE_SLACK:
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
        offset = _data_offset(path, raw, info)
        if offset + info.file_size > file_size:
            raise CheckpointError(f"{path}: storage {_brief(name, 80)} runs past the end of the file (truncated)")
        return _MappedMember(path, offset, info, dtype, storage.numel)
    return functools.partial(_inflate, path, info, dtype, storage.numel)


def _data_offset(path: pathlib.Path, raw: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's bytes: after its local header, whose extra field (torch's
    alignment padding) may differ from the central directory's."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip local header for {_brief(info.filename, 80)}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


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
