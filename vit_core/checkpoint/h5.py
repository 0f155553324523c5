"""``tf_model.h5``: Keras' h5 weights layout as TF transformers models save it (read with h5py).

Layout: the root attribute ``layer_names`` lists the layers (split into ``layer_names0``,
``layer_names1``, ... when the list would pass HDF5's 64 KiB object-header limit); each layer is a
group whose attribute ``weight_names`` lists its weights by full name
(``tf_vi_t_model/vit/encoder/layer_._0/attention/attention/query/kernel:0``), and each weight is
the dataset at that path inside the group. transformers' *sharded* TF files instead list, in
``layer_names``, paths from the root that are datasets themselves (one weight each).

An HDF5 file can make the library read other local files (external storage, virtual datasets,
external links) and can claim far more data than it holds (filters, unallocated chunks). Before
any data is read, every name is therefore walked one link at a time and must be a *hard* link
(soft and external links are refused: Keras writes neither), and every dataset must be a plain
numeric dataset stored in this file with at most built-in filters, whose uncompressed size (and
the sum over all weights) fits in the file's size. Loads re-open the file and repeat those checks.

Every low-level failure (h5py's OSError / RuntimeError / KeyError, non-UTF-8 names) becomes a
CheckpointError naming the file; messages quote names cut short, never other file contents.
h5py is imported only by the functions that need it.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from . import dtypes
from .errors import CheckpointError, reading, writing
from .lazy import Lazy, LazyState, materialize

Progress = Callable[[int], None]  # called with the number of bytes just written

SIGNATURE = b"\x89HDF\r\n\x1a\n"
USER_BLOCK_OFFSETS = (512, 1024, 2048)  # HDF5 allows a user block before the superblock

HEADER_LIMIT = 64512  # Keras' HDF5_OBJECT_HEADER_LIMIT: the most bytes one attribute list may take
KERAS_VERSION = "2.21.0"  # written as the ``keras_version`` attribute, as vitx's writers always have
MAX_NAMES = 1 << 20  # names in one attribute list (a ViT has ~200 weights)

# HDF5's built-in filters (and h5py's LZF); any other filter id would make HDF5 look for a plugin.
BUILTIN_FILTERS: dict[int, str] = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit",
                                   6: "scaleoffset", 32000: "lzf"}
# h5py.h5l link type codes -> what a message calls them (TYPE_HARD = 0 is the only one followed).
_LINK_KINDS: dict[int, str] = {1: "a soft link", 64: "an external link (to another file)"}


def sniff(head: bytes, f: BinaryIO) -> bool:
    """True if the HDF5 signature is at offset 0 (``head``, the first bytes) or after a user
    block of 512, 1024 or 2048 bytes in the open binary file ``f`` (whose position is kept)."""
    if head[:8] == SIGNATURE:
        return True
    here = f.tell()
    try:
        for offset in USER_BLOCK_OFFSETS:
            f.seek(offset)
            if f.read(8) == SIGNATURE:
                return True
    finally:
        f.seek(here)
    return False


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weight:
    """Where one weight is (the names walked from the root) and what it announced at scan time."""

    parts: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype  # native byte order


def read_lazy(path: pathlib.Path) -> LazyState:
    """Every weight by its name as stored (Keras: the full ``weight_names`` entry; sharded TF: the
    ``layer_names`` entry), each read from the file when asked for (the file is re-opened).

    All names, links and datasets are checked here, before any tensor data is read.
    """
    import h5py

    path = pathlib.Path(path)
    with reading(path, "HDF5 file"):
        size = path.stat().st_size
        with h5py.File(path, "r") as f:
            weights = _scan(f, path, size)
    return {name: Lazy(w.shape, w.dtype, _loader(path, name, w), f"{path}:{name}") for name, w in weights.items()}


def read(path: pathlib.Path | str) -> dict[str, np.ndarray]:
    """Every weight of the file, in memory the caller owns."""
    return materialize(read_lazy(pathlib.Path(path)))


def _scan(f: Any, path: pathlib.Path, size: int) -> dict[str, _Weight]:
    import h5py

    layer_names = _attr_list(f, "layer_names", path, size, "the root")
    if layer_names is None:
        raise CheckpointError(f"{path}: HDF5 file without a 'layer_names' attribute: not a Keras/transformers "
                              "TF checkpoint")
    weights: dict[str, _Weight] = {}
    total = 0

    def add(name: str, parts: tuple[str, ...], dataset: Any) -> None:
        nonlocal total
        if name in weights:
            raise CheckpointError(f"{path}: weight {_quote(name)} is listed twice")
        weight = _check_dataset(dataset, parts, path, size, name)
        total += math.prod(weight.shape) * weight.dtype.itemsize
        if total > size:
            raise CheckpointError(f"{path}: the weights claim more bytes than the file's {size} (refused: an HDF5 bomb)")
        weights[name] = weight

    for layer in layer_names:
        layer_parts = _split(layer, path, "layer")
        obj = _walk(f, layer_parts, path, layer)
        if isinstance(obj, h5py.Dataset):  # transformers' sharded TF layout: the entry is the weight
            add(layer, layer_parts, obj)
            continue
        if not isinstance(obj, h5py.Group):
            raise CheckpointError(f"{path}: layer {_quote(layer)} is neither a group nor a dataset")
        for weight in _attr_list(obj, "weight_names", path, size, f"layer {_quote(layer)}") or []:
            weight_parts = _split(weight, path, "weight")
            dataset = _walk(obj, weight_parts, path, weight)
            add(weight, layer_parts + weight_parts, dataset)
    return weights


def _attr_list(obj: Any, name: str, path: pathlib.Path, size: int, owner: str) -> list[str] | None:
    """A Keras string-list attribute (also split as name0, name1, ...), or None if absent.

    Each attribute must be a list of (fixed- or variable-length) strings no larger than the
    file; names must be UTF-8.
    """
    if name in obj.attrs:
        keys = [name]
    elif f"{name}0" in obj.attrs:
        keys = []
        while f"{name}{len(keys)}" in obj.attrs:
            keys.append(f"{name}{len(keys)}")
    else:
        return None
    values: list[str] = []
    for key in keys:
        values.extend(_strings(obj, key, path, size, owner))
        if len(values) > MAX_NAMES:
            raise CheckpointError(f"{path}: attribute {key!r} of {owner} lists more than {MAX_NAMES} names (refused)")
    return values


def _strings(obj: Any, key: str, path: pathlib.Path, size: int, owner: str) -> list[str]:
    import h5py

    attr = obj.attrs.get_id(key)
    dtype, shape = attr.dtype, attr.shape
    is_text = dtype.kind == "S" or h5py.check_string_dtype(dtype) is not None
    if not is_text or shape is None or len(shape) > 1:
        raise CheckpointError(f"{path}: attribute {key!r} of {owner} is not a list of names")
    if math.prod(shape) * dtype.itemsize > size:
        raise CheckpointError(f"{path}: attribute {key!r} of {owner} claims more bytes than the file has (refused)")
    values = np.atleast_1d(np.asarray(obj.attrs[key], dtype=object))
    return [v.decode("utf-8") if isinstance(v, bytes) else _text(v, key, path, owner) for v in values]


def _text(value: object, key: str, path: pathlib.Path, owner: str) -> str:
    if not isinstance(value, str):
        raise CheckpointError(f"{path}: attribute {key!r} of {owner} holds a non-string")
    return value


def _split(name: str, path: pathlib.Path, what: str) -> tuple[str, ...]:
    """The link names of a path inside a group; absolute paths, empty parts and '.' are refused
    (they would leave the group or alias it)."""
    parts = tuple(name.split("/"))
    if not name or "" in parts or "." in parts:
        raise CheckpointError(f"{path}: {what} name {_quote(name)} is not a relative path inside its group (refused)")
    return parts


def _walk(root: Any, parts: Iterable[str], path: pathlib.Path, name: str) -> Any:
    """The object at ``parts`` below ``root``, following hard links only (nothing is read through
    a soft or external link, so nothing outside the file and nothing outside the group)."""
    import h5py

    node = root
    for part in parts:
        if not isinstance(node, h5py.Group):
            raise CheckpointError(f"{path}: {_quote(name)} passes through a dataset")
        key = part.encode("utf-8")
        if not node.id.links.exists(key):
            raise CheckpointError(f"{path}: {_quote(name)} is listed but missing")
        kind = node.id.links.get_info(key).type
        if kind != h5py.h5l.TYPE_HARD:
            what = _LINK_KINDS.get(kind, f"a link of type {kind}")
            raise CheckpointError(f"{path}: {_quote(name)} is {what} (refused: a weight must be stored in the file)")
        node = node[part]
    return node


def _check_dataset(dataset: Any, parts: tuple[str, ...], path: pathlib.Path, size: int, name: str) -> _Weight:
    """A plain numeric dataset stored in this file (no external storage, not virtual, built-in
    filters only) whose uncompressed size fits in the file; CheckpointError otherwise."""
    import h5py

    if not isinstance(dataset, h5py.Dataset):
        raise CheckpointError(f"{path}: weight {_quote(name)} is not a dataset")
    if dataset.is_virtual:
        raise CheckpointError(f"{path}: weight {_quote(name)} is a virtual dataset (refused: it reads other files)")
    if dataset.external:
        raise CheckpointError(f"{path}: weight {_quote(name)} has external storage (refused: it reads other files)")
    plist = dataset.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in BUILTIN_FILTERS:
            raise CheckpointError(f"{path}: weight {_quote(name)} uses HDF5 filter {code}, not a built-in one (refused)")
    if dataset.shape is None:
        raise CheckpointError(f"{path}: weight {_quote(name)} holds no data (empty dataspace)")
    dtype = dtypes.numeric(dataset.dtype, f"{path}: weight {_quote(name)}")
    shape = tuple(int(s) for s in dataset.shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > size:
        raise CheckpointError(f"{path}: weight {_quote(name)} of shape {shape} claims {nbytes} bytes, more than the "
                              f"file's {size} (refused: an HDF5 bomb)")
    return _Weight(parts, shape, dtype.newbyteorder("="))


def _loader(path: pathlib.Path, name: str, weight: _Weight) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import h5py

        with reading(path, f"weight {_quote(name)}"):
            size = path.stat().st_size
            with h5py.File(path, "r") as f:
                dataset = _walk(f, weight.parts, path, name)
                again = _check_dataset(dataset, weight.parts, path, size, name)
                if (again.shape, again.dtype) != (weight.shape, weight.dtype):
                    raise CheckpointError(f"{path}: weight {_quote(name)} changed since the file was opened")
                out = np.zeros(weight.shape, dtype=weight.dtype)
                if out.size:
                    dataset.read_direct(out)
                return out
    return load


def _quote(name: str, limit: int = 80) -> str:
    """A name for a message: cut to ``limit`` characters, repr-quoted."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


# --- writing -----------------------------------------------------------------------------------


def write(path: pathlib.Path, state: LazyState, progress: Progress | None = None) -> None:
    """Stream ``state`` into a Keras h5 weights file, one tensor at a time.

    Keys are full weight names ``model_name/layer/.../leaf:0``; the layer (group) is the second
    component. Root attributes ``backend`` = "tensorflow", ``keras_version``, ``layer_names`` (in
    order of first appearance); per layer ``weight_names`` and the datasets under those names.
    ``progress(nbytes)`` is called after each tensor. Not atomic: the caller stages the file.
    """
    import h5py

    path = pathlib.Path(path)
    layers = _layers(state, path)
    with writing(path):
        _reserve(path, sum(lazy.nbytes for lazy in state.values()) + _OVERHEAD * (len(state) + 16))
    with writing(path), h5py.File(path, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = KERAS_VERSION
        _write_attr_list(f, "layer_names", list(layers), path)
        for layer, weights in layers.items():
            group = f.create_group(layer)
            _write_attr_list(group, "weight_names", [name for name, _ in weights], path)
            for name, lazy in weights:
                group.create_dataset(name, data=dtypes.native(np.asarray(lazy.materialize())))
                if progress:
                    progress(lazy.nbytes)


_OVERHEAD = 4096  # HDF5 bytes per object (headers, B-tree nodes, attributes), generously


def _reserve(path: pathlib.Path, nbytes: int) -> None:
    """Make sure the file system will take ``nbytes`` before HDF5 writes anything.

    HDF5 does not survive a failing write well (a full disk or a file-size limit can end in a
    crash while h5py closes the file), so the space is claimed first with ``posix_fallocate``,
    which fails cleanly with ENOSPC / EFBIG, and released again for HDF5 (which truncates the
    file when it creates it). A race with another writer for the same space remains possible.
    """
    import os

    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, max(1, nbytes))
        except OSError as e:
            import errno

            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # the file system cannot reserve space; HDF5 writes as usual
            raise
        except AttributeError:  # pragma: no cover - not on this platform
            return


def _layers(state: Mapping[str, Lazy], path: pathlib.Path) -> dict[str, list[tuple[str, Lazy]]]:
    """Weights grouped by layer (second name component), checked before the file is created:
    names ``model/layer/.../leaf``, HDF5-storable dtypes, no weight where another one's group is."""
    layers: dict[str, list[tuple[str, Lazy]]] = {}
    for name, lazy in state.items():
        parts = name.split("/")
        if len(parts) < 3 or "" in parts or "." in parts:
            raise CheckpointError(f"{path}: cannot write weight {_quote(name)}: not a name model/layer/.../leaf")
        dtype = dtypes.numeric(lazy.dtype, f"{path}: weight {_quote(name)}")
        if dtype.name in dtypes.ML_NAMES:
            raise CheckpointError(f"{path}: cannot write weight {_quote(name)}: HDF5 has no {dtype.name} type "
                                  "(convert it to float32 first)")
        layers.setdefault(parts[1], []).append((name, lazy))
    for layer, weights in layers.items():
        names = {name for name, _ in weights}
        groups = {name.rsplit("/", k)[0] for name in names for k in range(1, name.count("/"))}
        clash = sorted(names & groups)
        if clash:
            raise CheckpointError(f"{path}: cannot write weight {_quote(clash[0])}: other weights nest under it")
    return layers


def _write_attr_list(obj: Any, name: str, values: list[str], path: pathlib.Path) -> None:
    """Keras' save_attributes_to_hdf5_group: fixed-length byte strings, split into name0, name1, ...
    (the fewest parts each at most :data:`HEADER_LIMIT` bytes) when one attribute would be too big."""
    encoded = [v.encode("utf-8") for v in values]
    too_long = [v for v in encoded if len(v) > HEADER_LIMIT]
    if too_long:
        raise CheckpointError(f"{path}: a name in {name} is longer than {HEADER_LIMIT} bytes")
    data = np.array(encoded) if encoded else np.array([], dtype="S1")
    parts = [data]
    while any(part.nbytes > HEADER_LIMIT for part in parts):
        parts = np.array_split(data, len(parts) + 1)
    if len(parts) == 1:
        obj.attrs[name] = data
    else:
        for i, part in enumerate(parts):
            obj.attrs[f"{name}{i}"] = part
