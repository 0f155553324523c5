"""The restricted unpickler of torch checkpoints: what a torch pickle may rebuild, and nothing else.

Both torch formats (``torch_zip``) are a pickle of the state dict whose tensors refer to storages
by persistent id. This module turns such a pickle into :class:`_Tensor` records (a storage, an
offset, a size and a stride) and then into lazy arrays, without importing torch and without
running anything the file holds:

- globals: only what a state dict needs (the tensor rebuild functions, the storage types,
  ``collections.OrderedDict``, ``torch.device``), each mapped to a local stand-in;
- opcodes: only those a pickled state dict uses (a subclass of the pure-Python
  ``pickle._Unpickler`` with its own opcode table: the C unpickler cannot intercept BUILD);
- REDUCE calls only the allowed functions; BUILD applies only to an OrderedDict this load created;
- dict keys and set members must be scalars, and nothing walks the loaded object recursively;
- a tensor may not claim more elements than its storage holds, reach past its end or overlap itself.
"""

from __future__ import annotations

import functools
import math
import pathlib
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import dtypes
from .errors import CheckpointError, reading
from .lazy import Lazy, LazyState

MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl, or all pickles of a legacy file together
_MAX_NDIM = 64  # numpy's limit

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
    with reading(path, f"tensor {_brief(key)}"):
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
