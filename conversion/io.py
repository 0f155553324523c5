"""Streaming readers and writers for the container formats a conversion touches.

Readers return :class:`~conversion.rules.Lazy` tensors: safetensors and uncompressed npz members
are memory-mapped (nothing is read until a tensor is asked for); torch zip, HDF5 and msgpack files
are read by ``vit_core.checkpoint_io`` (the restricted unpickler for torch files: nothing in a
weights file is ever executed). Writers take lazy states and materialise one tensor at a time, so
a conversion holds at most the source (memory-mapped) plus one tensor in flight.

Every writer writes to a temporary file beside its target and renames it into place; on any
failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vit_core.checkpoint_io import CheckpointError

from .rules import Lazy, LazyState

Progress = Callable[[int], None]  # called with the number of bytes just written

# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

_ST_TO_NUMPY = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_ST_ML = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _numpy_dtype(code: str, where: str) -> np.dtype:
    if code in _ST_TO_NUMPY:
        return np.dtype(_ST_TO_NUMPY[code])
    if code in _ST_ML:
        try:
            import ml_dtypes
        except ImportError:
            raise CheckpointError(f"{where}: dtype {code} needs the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(getattr(ml_dtypes, _ST_ML[code]))
    raise CheckpointError(f"{where}: unknown safetensors dtype {code!r}")


def _safetensors_code(dtype: np.dtype, where: str) -> str:
    for code, name in _ST_ML.items():
        if dtype.name == name:
            return code
    for code, name in _ST_TO_NUMPY.items():
        if dtype == np.dtype(name) or dtype.newbyteorder("<") == np.dtype(name):
            return code
    raise CheckpointError(f"{where}: dtype {dtype} cannot be stored in safetensors")


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def read_safetensors_header(path: pathlib.Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(entries by key, metadata, offset of the data section). Checks every entry fits the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file: header says {n} bytes, file has {size - 8}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    for key, entry in header.items():
        try:
            dtype = _numpy_dtype(entry["dtype"], str(path))
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors entry {key!r}: {e}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: corrupt safetensors entry {key!r}: shape {shape} does not fit [{begin}, {end})")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file: {key!r} needs bytes up to "
                                  f"{data_start + end}, the file has {size}")
    return header, {str(k): str(v) for k, v in metadata.items()}, data_start


def read_safetensors_lazy(path: pathlib.Path) -> tuple[LazyState, dict[str, str]]:
    """Memory-mapped safetensors: each Lazy maps just its tensor's bytes (a read-only view, no
    copy) and the mapping goes away with the array, so a conversion's resident memory stays near
    one tensor rather than growing to the whole file."""
    header, metadata, data_start = read_safetensors_header(path)
    state: LazyState = {}
    for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _numpy_dtype(entry["dtype"], str(path))
        shape = tuple(int(s) for s in entry["shape"])
        begin = int(entry["data_offsets"][0])
        state[key] = Lazy(shape, dtype, _mapped(path, data_start + begin, shape, dtype), f"{path}:{key}")
    return state, metadata


def _mapped(path: pathlib.Path, offset: int, shape: tuple[int, ...], dtype: np.dtype,
            order: str = "C") -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    return load


def write_safetensors(path: pathlib.Path, state: LazyState, metadata: Mapping[str, str] | None = None,
                      progress: Progress | None = None) -> None:
    """Stream ``state`` into a safetensors file (header first, from the known shapes; then each
    tensor as it is produced). Not atomic by itself: call inside :func:`staged`."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, lazy in state.items():
        header[key] = {"dtype": _safetensors_code(lazy.dtype, key), "shape": list(lazy.shape),
                       "data_offsets": [offset, offset + lazy.nbytes]}
        offset += lazy.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, lazy in state.items():
            array = _little_endian(lazy.materialize())
            if array.size:
                f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            if progress:
                progress(lazy.nbytes)


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        return array.astype(array.dtype.newbyteorder("<"))
    return array


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


def is_npz(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_npz_lazy(path: pathlib.Path) -> LazyState:
    """An npz file (numpy's zip of .npy members). Uncompressed members are memory-mapped; compressed
    ones are read when asked for. Never unpickles (object arrays are refused)."""
    state: LazyState = {}
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: not a valid npz (zip) file, truncated or corrupt: {e}") from None
    file_size = path.stat().st_size
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{path}: member {info.filename!r} is not a .npy array: not an npz checkpoint")
            key = info.filename[: -len(".npy")]
            try:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                    header_len = member.tell() if hasattr(member, "tell") else None
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
                raise CheckpointError(f"{path}: cannot read member {key!r} (truncated or corrupt?): {e}") from None
            if dtype.hasobject:
                raise CheckpointError(f"{path}: member {key!r} holds Python objects (pickles): refused")
            shape = tuple(int(s) for s in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            if info.file_size - (header_len or 0) < nbytes:
                raise CheckpointError(f"{path}: member {key!r} is truncated")
            data_offset = None
            if info.compress_type == zipfile.ZIP_STORED and header_len is not None:
                data_offset = _member_data_offset(path, info) + header_len
                if data_offset + nbytes > file_size:
                    raise CheckpointError(f"{path}: truncated npz file: member {key!r} runs past the end")
            state[key] = Lazy(shape, dtype, _npz_loader(path, info.filename, shape, dtype, fortran, data_offset),
                              f"{path}:{key}")
    return state


def _member_data_offset(path: pathlib.Path, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's bytes: after its local file header (whose extra field may differ
    from the central directory's)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{path}: corrupt zip local header for {info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _npz_loader(path: pathlib.Path, name: str, shape: tuple[int, ...], dtype: np.dtype, fortran: bool,
                data_offset: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        order = "F" if fortran else "C"
        if data_offset is not None:
            if not shape or math.prod(shape) == 0:
                with np.load(path, allow_pickle=False) as npz:
                    return npz[name[: -len(".npy")]]
            return np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order=order)
        with np.load(path, allow_pickle=False) as npz:
            return npz[name[: -len(".npy")]]
    return load


def write_npz(path: pathlib.Path, state: LazyState, progress: Progress | None = None) -> None:
    """Stream ``state`` into an uncompressed npz (what ``np.savez`` writes), one member at a time."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, lazy in state.items():
            array = np.ascontiguousarray(lazy.materialize())
            with archive.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            if progress:
                progress(lazy.nbytes)


# ---------------------------------------------------------------------------------------------
# torch zip (pytorch_model.bin)
# ---------------------------------------------------------------------------------------------

_TORCH_STORAGE = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage",
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

    def tensor(self, storage_name: str, key: str, shape: tuple[int, ...]) -> None:
        numel = math.prod(shape)
        strides = tuple(int(math.prod(shape[i + 1:])) for i in range(len(shape)))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.mark()
        # persistent id tuple
        self.mark()
        self.str_("storage")
        self.global_("torch", storage_name)
        self.str_(key)
        self.str_("cpu")
        self.int_(numel)
        self.out += b"t" + b"Q"  # TUPLE, BINPERSID
        self.int_(0)  # storage offset
        self.tuple_of_ints(shape)
        self.tuple_of_ints(strides)
        self.out += b"\x89"  # requires_grad False
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # OrderedDict() backward hooks
        self.out += b"tR"  # args tuple, REDUCE


def write_torch_zip(path: pathlib.Path, state: LazyState, progress: Progress | None = None) -> None:
    """A ``pytorch_model.bin`` in torch's zip format, written without torch (one storage per tensor,
    records 64-byte aligned as torch writes them, so ``torch.load(mmap=True)`` works too)."""
    pickler = _PickleWriter()
    pickler.global_("collections", "OrderedDict")
    pickler.out += b")R"
    pickler.mark()
    names = list(state)
    for index, key in enumerate(names):
        lazy = state[key]
        storage = _TORCH_STORAGE.get(lazy.dtype.name)
        if storage is None:
            raise CheckpointError(f"{key}: dtype {lazy.dtype} has no torch storage type")
        pickler.str_(key)
        pickler.tensor(storage, str(index), lazy.shape)
    pickler.out += b"u."  # SETITEMS, STOP
    root = "archive"
    with _AlignedZip(path) as archive:
        archive.write(f"{root}/data.pkl", bytes(pickler.out))
        archive.write(f"{root}/byteorder", b"little")
        for index, key in enumerate(names):
            lazy = state[key]
            array = np.ascontiguousarray(_little_endian(lazy.materialize()))
            archive.write(f"{root}/data/{index}", memoryview(array.reshape(-1).view(np.uint8)) if array.size else b"")
            if progress:
                progress(lazy.nbytes)
        archive.write(f"{root}/version", b"3\n")
        archive.write(f"{root}/.data/serialization_id", b"0" * 40)


class _AlignedZip:
    """A stored (uncompressed) zip whose member data starts on 64-byte boundaries, like torch's
    PyTorchStreamWriter (padding goes into the local header's extra field)."""

    def __init__(self, path: pathlib.Path) -> None:
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def __enter__(self) -> "_AlignedZip":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._zip.close()

    def write(self, name: str, data: bytes | memoryview) -> None:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        offset = self._zip.fp.tell() if self._zip.fp is not None else 0
        base = offset + 30 + len(name.encode())
        pad = (-(base + 4)) % 64
        # extra field: id 'FB' (torch uses it), length, padding bytes
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        with self._zip.open(info, "w", force_zip64=len(data) > 2**31) as member:
            member.write(data)


# ---------------------------------------------------------------------------------------------
# Atomic outputs
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_file(target: pathlib.Path, *, force: bool) -> Iterator[pathlib.Path]:
    """A temporary path beside ``target``, renamed over it when the block succeeds, removed if not."""
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists (pass force=True / --force to overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    temp = pathlib.Path(name)
    os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
    try:
        yield temp
        _fsync(temp)
        if target.is_dir():
            raise FileExistsError(f"{target} is a directory; cannot replace it with a file")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(target: pathlib.Path, *, force: bool) -> Iterator[pathlib.Path]:
    """A temporary directory beside ``target`` that becomes ``target`` when the block succeeds.

    With ``force`` an existing ``target`` is replaced only after the new one is complete. On any
    failure the temporary directory is removed and ``target`` is left as it was.
    """
    import shutil

    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists (pass force=True / --force to overwrite)")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield temp
        for child in temp.iterdir():
            _fsync(child)
        os.chmod(temp, 0o777 & ~_umask())
        if target.exists():
            backup = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            backup.rmdir()
            os.replace(target, backup)
            try:
                os.replace(temp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: pathlib.Path) -> None:
    if path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Lazy HDF5 (transformers' tf_model.h5) and msgpack (flax_model.msgpack)
# ---------------------------------------------------------------------------------------------


def read_h5_lazy(path: pathlib.Path) -> LazyState | None:
    """TF weights of a Keras h5 file by weight name without the model name component
    (``vit/encoder/layer_._0/.../kernel:0``), each read from disk when asked for.

    Returns None for layouts this reader does not cover (transformers' sharded TF files, where
    each layer entry is a dataset); the caller then uses vit_core.checkpoint_io's reader.
    """
    import h5py

    state: LazyState = {}
    try:
        with h5py.File(path, "r") as f:
            raw_names = f.attrs.get("layer_names")
            if raw_names is None:
                return None
            for layer in [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in raw_names]:
                group = f.get(layer)
                if not isinstance(group, h5py.Group) or "weight_names" not in group.attrs:
                    return None
                for weight in group.attrs["weight_names"]:
                    weight = weight.decode("utf8") if isinstance(weight, bytes) else str(weight)
                    dataset = group.get(weight)
                    if not isinstance(dataset, h5py.Dataset):
                        return None
                    name = weight.partition("/")[2] or weight
                    state[name] = Lazy(tuple(int(s) for s in dataset.shape), dataset.dtype,
                                       _h5_loader(path, f"{layer}/{weight}"), f"{path}:{weight}")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read HDF5 file (truncated or corrupt?): {e}") from None
    return state


def _h5_loader(path: pathlib.Path, name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import h5py

        with h5py.File(path, "r") as f:
            return np.asarray(f[name][()])
    return load


class _MsgpackScanner:
    """Walks a flax.serialization msgpack file in place (memory-mapped) and records, for every
    array, where its bytes are: no array is copied until it is asked for."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.view = memoryview(self.buf)

    def _uint(self, pos: int, size: int) -> int:
        return int.from_bytes(self.view[pos: pos + size], "big")

    def header(self, pos: int) -> tuple[str, int, int]:
        """(kind, length or value, position after the header) of the object at ``pos``."""
        b = int(self.buf[pos])
        if b <= 0x7F:
            return "int", int(b), pos + 1
        if 0x80 <= b <= 0x8F:
            return "map", int(b) & 0x0F, pos + 1
        if 0x90 <= b <= 0x9F:
            return "array", int(b) & 0x0F, pos + 1
        if 0xA0 <= b <= 0xBF:
            return "str", int(b) & 0x1F, pos + 1
        if b >= 0xE0:
            return "int", int(b) - 256, pos + 1
        fixed = {0xC0: ("nil", 0, 0), 0xC2: ("false", 0, 0), 0xC3: ("true", 0, 0)}
        if b in fixed:
            kind, value, _ = fixed[b]
            return kind, value, pos + 1
        sized = {0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4), 0xD9: ("str", 1), 0xDA: ("str", 2),
                 0xDB: ("str", 4), 0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
                 0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4)}
        if b in sized:
            kind, size = sized[b]
            return kind, self._uint(pos + 1, size), pos + 1 + size
        if 0xD4 <= b <= 0xD8:
            return "ext", 1 << (b - 0xD4), pos + 1
        if 0xCC <= b <= 0xCF:
            size = 1 << (b - 0xCC)
            return "int", self._uint(pos + 1, size), pos + 1 + size
        if 0xD0 <= b <= 0xD3:
            size = 1 << (b - 0xD0)
            return "int", int.from_bytes(self.view[pos + 1: pos + 1 + size], "big", signed=True), pos + 1 + size
        if b in (0xCA, 0xCB):
            return "float", 0, pos + 1 + (4 if b == 0xCA else 8)
        raise ValueError(f"unsupported msgpack byte 0x{int(b):02x} at offset {pos}")

    def value(self, pos: int) -> tuple[Any, int]:
        """A small value (str, int, list of ints) and the position after it."""
        kind, n, pos = self.header(pos)
        if kind == "str":
            return bytes(self.view[pos: pos + n]).decode("utf-8"), pos + n
        if kind == "int":
            return n, pos
        if kind == "array":
            items = []
            for _ in range(n):
                item, pos = self.value(pos)
                items.append(item)
            return items, pos
        if kind in ("nil", "true", "false"):
            return {"nil": None, "true": True, "false": False}[kind], pos
        raise ValueError(f"unexpected msgpack {kind} at offset {pos}")

    def tree(self, pos: int, prefix: str, out: LazyState) -> int:
        kind, n, pos = self.header(pos)
        if kind == "map":
            for _ in range(n):
                key, pos = self.value(pos)
                pos = self.tree(pos, f"{prefix}{key}/", out)
            return pos
        if kind == "ext":
            code = int(self.buf[pos])
            start = pos + 1
            if code != 1:  # flax's ndarray extension; scalars and complex numbers are no ViT weight
                raise ValueError(f"msgpack extension type {code} at {prefix.rstrip('/')!r} is not an array")
            akind, items, p = self.header(start)  # the record is a msgpack array (shape, dtype name, bytes)
            if akind != "array" or items != 3:
                raise ValueError(f"array record {prefix.rstrip('/')!r} is malformed")
            shape, p = self.value(p)
            dtype_name, p = self.value(p)
            bkind, nbytes, p = self.header(p)
            dtype = np.dtype(dtype_name)
            shape = tuple(int(s) for s in shape)
            if bkind != "bin" or nbytes != math.prod(shape) * dtype.itemsize or p + nbytes > start + n:
                raise ValueError(f"array record {prefix.rstrip('/')!r} is malformed")
            out[prefix.rstrip("/")] = Lazy(shape, dtype, _mapped(self.path, p, shape, dtype), f"{self.path}:{prefix}")
            return start + n
        raise ValueError(f"unexpected msgpack {kind} at {prefix.rstrip('/')!r}")


def read_msgpack_lazy(path: pathlib.Path) -> LazyState | None:
    """Arrays of a ``flax_model.msgpack`` by '/'-joined parameter path, memory-mapped.

    Returns None for what this reader does not cover (arrays chunked above 1 GiB, dtypes numpy
    does not know); the caller then uses vit_core.checkpoint_io's reader.
    """
    state: LazyState = {}
    try:
        scanner = _MsgpackScanner(path)
        end = scanner.tree(0, "", state)
    except (ValueError, TypeError, IndexError) as e:
        if "__msgpack_chunked_array__" in str(e) or "data type" in str(e):
            return None
        raise CheckpointError(f"{path}: cannot read flax msgpack file (truncated or corrupt?): {e}") from None
    if end != len(scanner.buf):
        raise CheckpointError(f"{path}: {len(scanner.buf) - end} trailing bytes after the parameter tree")
    if any("__msgpack_chunked_array__" in k for k in state):
        return None
    if state and all(k.startswith("params/") for k in state):
        state = {k[len("params/"):]: v for k, v in state.items()}
    return state
