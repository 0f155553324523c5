"""npz: numpy's zip of ``.npy`` members (the original JAX ViT and big_vision checkpoints).

Uncompressed members are memory-mapped, compressed ones are read when asked for. Never
unpickles: a member whose header declares an object, structured or string dtype is refused, and
so is a member whose declared size does not match its header (or, compressed, would expand past
deflate's maximum ratio: a zip bomb).
"""

from __future__ import annotations

import math
import pathlib
import zipfile
from collections.abc import Callable, Mapping

import numpy as np

from . import dtypes, zips
from .errors import CheckpointError, reading
from .lazy import Lazy, LazyState, materialize

Progress = Callable[[int], None]


def sniff(path: pathlib.Path) -> bool:
    """A zip archive whose members are all ``.npy`` arrays."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_lazy(path: pathlib.Path) -> LazyState:
    """Arrays by member name without ``.npy``, in archive order."""
    state: LazyState = {}
    with reading(path, "npz file"):
        file_size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                key, lazy = _member(path, archive, info, file_size)
                if key in state:
                    raise CheckpointError(f"{path}: member {key!r} appears twice")
                state[key] = lazy
    return state


def read(path: pathlib.Path) -> dict[str, np.ndarray]:
    state = read_lazy(path)
    with reading(path, "npz file"):
        return materialize(state)


def _member(path: pathlib.Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int) -> tuple[str, Lazy]:
    if not info.filename.endswith(".npy"):
        raise CheckpointError(f"{path}: member {info.filename[:80]!r} is not a .npy array: not an npz checkpoint")
    key = info.filename[: -len(".npy")]
    where = f"{path}: member {key[:80]!r}"
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(1, info.compress_size) * zips.DEFLATE_MAX_RATIO:
        raise CheckpointError(f"{where}: declares {info.file_size} bytes from {info.compress_size} compressed (a zip bomb)")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise CheckpointError(f"{where}: unsupported .npy version {version}")
        header_len = member.tell()
    dtype = dtypes.numeric(dtype, where)
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != header_len + nbytes:
        raise CheckpointError(f"{where}: holds {info.file_size - header_len} data bytes, its header needs {nbytes}")
    offset = None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as raw:
            offset = zips.data_offset(path, raw, info) + header_len
        if offset + nbytes > file_size:
            raise CheckpointError(f"{where}: runs past the end of the file (truncated)")
    return key, Lazy(shape, dtype.newbyteorder("=") if dtype.byteorder != "|" else dtype,
                     _loader(path, info.filename, shape, dtype, fortran, offset), f"{path}:{key}")




def _loader(path: pathlib.Path, name: str, shape: tuple[int, ...], dtype: np.dtype, fortran: bool,
            offset: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if offset is not None and math.prod(shape) > 0:
            array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        else:
            with zipfile.ZipFile(path) as archive, archive.open(name) as member:
                array = np.lib.format.read_array(member, allow_pickle=False)
        return dtypes.native(array)
    return load


def write(path: pathlib.Path, state: Mapping[str, Lazy], progress: Progress | None = None) -> None:
    """Stream ``state`` into an uncompressed npz (what ``np.savez`` writes), one member at a time.
    Not atomic by itself: call inside ``staging.staged_file``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, lazy in state.items():
            array = np.ascontiguousarray(lazy.materialize())
            with archive.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            if progress:
                progress(lazy.nbytes)
