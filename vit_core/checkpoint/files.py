"""transformers checkpoint files in any container, read into and written from canonical names.

A checkpoint file's container is detected from its first bytes (never its name) and read by its
container module (one lazy reader each); its names are then mapped to canonical ones by the
declared rules of ``names.py``: PyTorch names as they are (5.9+ renamed), TF names and layouts
(``tf_model.h5``, or safetensors with metadata format "tf"), Flax paths and layouts
(``flax_model.msgpack``, or safetensors with format "flax"). Sharded checkpoints are an
``*.index.json`` and its shards. An eager read is the lazy one materialised.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from . import h5, index, msgpack, names, npz, safetensors, staging, torch_zip
from .errors import CheckpointError, CheckpointNotFoundError, PathLike, reading, writing  # noqa: F401
from .lazy import Lazy, LazyState, lazy_from_array, materialize

Progress = Callable[[int], None]

# Search order of weight files inside a checkpoint directory (transformers 4.x file names).
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "tf_model.h5.index.json",
    "flax_model.msgpack",
    "flax_model.msgpack.index.json",
)
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# Container kind -> its module (h5py and msgpack are imported only by the functions that use them).
CONTAINERS: dict[str, ModuleType] = {
    "safetensors": safetensors, "torch": torch_zip, "torch_legacy": torch_zip, "h5": h5, "msgpack": msgpack, "npz": npz,
}
# The names a container's keys are in, when the container alone decides it.
_FLAVOURS = {"torch": "pt", "torch_legacy": "pt", "h5": "tf", "msgpack": "flax"}
_SUFFIX_KINDS = (
    (".index.json", "index"), (".safetensors", "safetensors"), (".bin", "torch"), (".pt", "torch"),
    (".pth", "torch"), (".h5", "h5"), (".hdf5", "h5"), (".msgpack", "msgpack"), (".npz", "npz"),
)


def container(kind: str) -> ModuleType:
    return CONTAINERS[kind]


def detect_kind(path: pathlib.Path) -> str:
    """The file's container from its first bytes: safetensors, npz, torch (zip), torch_legacy,
    h5, msgpack or index."""
    with reading(path, "checkpoint file"):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
            if h5.sniff(head, f):
                return "h5"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") and npz.sniff(path):
        return "npz"
    if safetensors.sniff(head, size):  # before the pickle check: a header size can start with 0x80 0x02
        return "safetensors"
    kind = torch_zip.sniff(head)
    if kind is not None:
        return kind
    if index.sniff(head):
        return "index"
    if msgpack.sniff(head):
        return "msgpack"
    expected = next((kind for suffix, kind in _SUFFIX_KINDS if path.name.lower().endswith(suffix)), None)
    if expected is not None:
        raise CheckpointError(f"{path}: not a valid {expected} file (truncated or corrupt)")
    raise CheckpointError(f"{path}: unrecognised checkpoint format; expected safetensors, a torch checkpoint "
                          "(pytorch_model.bin), HDF5 (tf_model.h5), flax msgpack, npz or a sharded *.index.json")


def find_weights_file(directory: PathLike) -> pathlib.Path:
    """The first of ``WEIGHT_FILES`` present in ``directory`` (CheckpointNotFoundError listing them if none)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: not a directory")
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointNotFoundError(f"{directory}: no weights file found; looked for {', '.join(WEIGHT_FILES)}")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def safetensors_flavour(keys: Any, metadata: Mapping[str, str]) -> str:
    """pt, tf or flax: from the metadata "format", else from the shape of the key names."""
    fmt = metadata.get("format", "").lower()
    if fmt in ("tf", "flax"):
        return fmt
    keys = list(keys)
    if fmt in ("pt", "np", "mlx"):
        return "pt"
    if any(re.search(r":\d+$", k) for k in keys):
        return "tf"
    if any(re.search(r"[./](kernel|scale)$", k) for k in keys):
        return "flax"
    return "pt"


def read_raw(path: pathlib.Path, kind: str | None = None) -> tuple[LazyState, str]:
    """One file, or an index and its shards -> (lazy state in the file's own names, flavour pt|tf|flax).
    ``kind``: the container when the caller has detected it already."""
    kind = kind or detect_kind(path)
    if kind == "index":
        return _read_index(path)
    if kind == "npz":
        raise CheckpointError(f"{path}: an npz file is not a transformers checkpoint (read it with conversion.load_checkpoint)")
    if kind == "safetensors":
        state, metadata = safetensors.read_lazy(path)
        flavour = safetensors_flavour(state, metadata)
        if flavour == "flax":  # Flax safetensors join the parameter path with "."
            state = {k.replace(".", "/"): v for k, v in state.items()}
        return state, flavour
    return CONTAINERS[kind].read_lazy(path), _FLAVOURS[kind]


def _read_index(path: pathlib.Path) -> tuple[LazyState, str]:
    weight_map = index.load(path)
    state: LazyState = {}
    flavours: set[str] = set()
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = index.shard_path(path, shard)
        if detect_kind(shard_path) == "index":
            raise CheckpointError(f"{path}: shard {shard!r} is itself an index")
        part, flavour = read_raw(shard_path)
        flavours.add(flavour)
        for key, value in part.items():
            if key in state:
                raise CheckpointError(f"{path}: weight {key!r} appears in more than one shard")
            state[key] = value
    if len(flavours) > 1:
        raise CheckpointError(f"{path}: shards mix formats {sorted(flavours)}")
    flavour = flavours.pop() if flavours else "pt"
    if flavour == "tf":  # the index names weights with the Keras model name, shards may not
        listed = {names.strip_tf_model_name(k): v for k, v in weight_map.items()}
        index.check_complete(path, listed, {names.strip_tf_model_name(k) for k in state})
    else:
        index.check_complete(path, weight_map, set(state))
    return state, flavour


def read_lazy_state(path: PathLike) -> LazyState:
    """A checkpoint directory or file -> lazy canonical state (see :func:`read_state_dict`)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = find_weights_file(path)
    elif not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    raw, flavour = read_raw(path)
    try:
        return names.to_canonical(raw, flavour)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint into canonical numpy arrays.

    ``path`` is a directory (its weights file is chosen by ``find_weights_file``) or a single file
    of any supported kind, detected from its contents. Keys come back in canonical (transformers
    4.x PyTorch) names and layouts with whatever model prefix the file had: ``vit.`` +
    ``classifier.*`` / ``decoder.0.*`` for task models, no prefix for a base ``ViTModel``. TF files
    keep their q/k/v biases (see ``fit.drop_unused_qkv_bias``). bfloat16 tensors come back as
    ``ml_dtypes.bfloat16`` arrays when ml_dtypes is installed, as float32 (the same values) otherwise.

    Raises CheckpointError naming the file and the problem for truncated, corrupt or unsafe files.
    """
    state = read_lazy_state(path)
    with reading(path, "checkpoint"):
        return materialize(state)


# ---------------------------------------------------------------------------------------------
# Writing (streaming; each writer runs inside a staged file or directory)
# ---------------------------------------------------------------------------------------------


def check_state(state: Mapping[str, Any]) -> LazyState:
    """A mapping of str -> numeric array (or Lazy), as a lazy state; CheckpointError naming the key otherwise."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a state dict must be a mapping, got {type(state).__name__}")
    out: LazyState = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"state dict key {key!r} is not a string")
        if isinstance(value, Lazy):
            out[key] = value
            continue
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise CheckpointError(f"state dict entry {key!r} is not a numeric array ({type(value).__name__})")
        out[key] = lazy_from_array(array, key)
    return out


def write_weights(path: pathlib.Path, state: Mapping[str, Any], flavour: str, progress: Progress | None = None,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write a canonical state as one transformers weights file of ``flavour``:
    "safetensors" (model.safetensors), "pytorch" (pytorch_model.bin), "tf" (tf_model.h5) or "flax"
    (flax_model.msgpack), in the names and layouts transformers 4.57 loads."""
    state = names.to_legacy_names(check_state(state))
    if flavour == "safetensors":
        safetensors.write(path, state, {"format": "pt", **(metadata or {})}, progress)
    elif flavour == "pytorch":
        torch_zip.write(path, state, progress)
    elif flavour == "tf":
        h5.write(path, names.from_canonical(state, "tf"), progress)
    elif flavour == "flax":
        msgpack.write(path, names.from_canonical(state, "flax"), progress)
    else:
        raise ValueError(f"unknown weights flavour {flavour!r}")


def write_shards(directory: pathlib.Path, state: Mapping[str, Any], *, max_shard_size: int | None = None,
                 metadata: Mapping[str, str] | None = None) -> list[pathlib.Path]:
    """Write ``state`` into ``directory`` (a staging directory) as ``model.safetensors``, or above
    ``max_shard_size`` bytes as ``model-0000i-of-0000N.safetensors`` shards + the index, filled
    greedily in key order (a tensor larger than the limit gets a shard of its own), as transformers does."""
    lazy = names.to_legacy_names(check_state(state))
    if max_shard_size is not None and max_shard_size <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size}")
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    shards: list[LazyState] = [{}]
    size = 0
    for key, value in lazy.items():
        if max_shard_size is not None and shards[-1] and size + value.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        safetensors.write(directory / SAFE_WEIGHTS_NAME, shards[0], meta)
        return [directory / SAFE_WEIGHTS_NAME]
    n = len(shards)
    written = [directory / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for shard, path in zip(shards, written):
        safetensors.write(path, shard, meta)
    weight_map = {key: written[i].name for i, shard in enumerate(shards) for key in shard}
    body = {"metadata": {"total_size": int(sum(v.nbytes for v in lazy.values()))}, "weight_map": weight_map}
    (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written + [directory / SAFE_WEIGHTS_INDEX_NAME]




def is_safetensors_weights(name: str) -> bool:
    """model.safetensors, its index or one of its shards (what ``write_shards`` writes)."""
    return name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or bool(_SHARD_NAME.match(name))


def save_state_dict(state: Mapping[str, Any], directory: PathLike, *, max_shard_size: int | None = None,
                    metadata: Mapping[str, str] | None = None) -> list[pathlib.Path]:
    """Write ``state`` into ``directory`` as ``model.safetensors`` (or shards + index), each file
    replaced atomically; safetensors weight files of the other layout left by an earlier save are
    removed afterwards. (``save_pretrained`` swaps in the whole directory instead.)"""
    directory = pathlib.Path(directory)
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".vitx-save-") as tmp:
            written = write_shards(pathlib.Path(tmp), state, max_shard_size=max_shard_size, metadata=metadata)
            for path in written:
                staging.fsync_path(path)
                os.chmod(path, 0o666 & ~staging.umask())
                os.replace(path, directory / path.name)
        staging.fsync_path(directory)
        final = [directory / p.name for p in written]
        for stale in directory.iterdir():
            if stale.name not in {p.name for p in final} and is_safetensors_weights(stale.name):
                stale.unlink(missing_ok=True)
    return final


def save_weights_file(state: Mapping[str, Any], path: PathLike, flavour: str) -> pathlib.Path:
    """One weights file of ``flavour`` (see :func:`write_weights`), written atomically."""
    path = pathlib.Path(path)
    with staging.staged_file(path, force=True) as temp, writing(path):
        write_weights(temp, state, flavour)
    return path


def write_tf_h5(state: Mapping[str, Any], path: PathLike) -> pathlib.Path:
    """A ``tf_model.h5`` that transformers 4.x TFViT classes load (atomic)."""
    return save_weights_file(state, path, "tf")


def write_flax_msgpack(state: Mapping[str, Any], path: PathLike) -> pathlib.Path:
    """A ``flax_model.msgpack`` that transformers 4.x FlaxViT classes load (atomic)."""
    return save_weights_file(state, path, "flax")
