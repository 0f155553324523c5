"""Framework-neutral checkpoint I/O: read and write every ViT weight format with numpy only.

Everything here returns or takes a flat ``dict[str, np.ndarray]`` keyed by the *canonical* names:
transformers 4.x PyTorch names and layouts (spec FORMATS.md section 1), e.g.
``vit.encoder.layer.0.attention.attention.query.weight`` with shape (out, in), the patch
convolution (D, C, P, P). The three frameworks and the ``conversion`` package build on it.

Formats read (detected from the file contents, not only the suffix):

- safetensors written by transformers' PyTorch, TensorFlow (metadata ``{"format": "tf"}``) and
  Flax (``{"format": "flax"}``) classes, single or sharded (``*.index.json``);
- ``pytorch_model.bin`` (torch's zip serialization) through a restricted unpickler that rebuilds
  tensors as numpy arrays and refuses every other global: torch is never imported;
- ``tf_model.h5`` (h5py; Keras' ``layer_names`` / ``weight_names`` layout), single or sharded;
- ``flax_model.msgpack`` (flax.serialization's msgpack encoding, decoded with ``msgpack`` alone),
  single or sharded;
- keys in transformers 5.9+ names (FORMATS.md section 2) are renamed to the 4.x names.

Name and layout mappings are declared as ordered lists of regex rules (data), applied by one
generic function; only the tensor layout (transpose of kernels) depends on the leaf's kind.

``import vit_core.checkpoint_io`` imports no deep-learning framework; ``huggingface_hub``, ``h5py``
and ``msgpack`` are imported only by the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pathlib
import pickle
import re
import struct
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "WEIGHT_FILES",
    "NEW_NAME_RULES",
    "LEGACY_NAME_RULES",
    "TF_TO_CANONICAL_RULES",
    "CANONICAL_TO_TF_RULES",
    "FLAX_TO_CANONICAL_RULES",
    "LoadReport",
    "resolve_pretrained",
    "find_weights_file",
    "read_state_dict",
    "save_state_dict",
    "write_tf_h5",
    "write_flax_msgpack",
    "to_new_names",
    "to_legacy_names",
    "drop_unused_qkv_bias",
    "match_state_to_model",
]

logger = logging.getLogger("vitx.checkpoint_io")

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or fitted to a model.

    The message always names the file (or hub id) and the key or problem.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No weights (or no requested file) at a path or hub id; also an ``OSError``, as in transformers."""


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

# ---------------------------------------------------------------------------------------------
# Rename rules (data). Each is an ordered tuple of (regex, replacement) applied with re.sub.
# ---------------------------------------------------------------------------------------------

# FORMATS.md section 2: transformers 5.9+ PyTorch names, "applied in that order". attention.output
# is renamed before the bare output.dense so that the latter only ever meets the MLP's fc2.
NEW_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)encoder\.layer\.(\d+)\.", r"\1layers.\2."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)

# The inverse, in reverse order. Every pattern only matches 5.9+ names, so applying these rules to
# 4.x names changes nothing (read_state_dict applies them to every checkpoint).
LEGACY_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"\.mlp\.fc2\.", ".output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
)

# FORMATS.md section 3: a transformers TF weight name without its model-name component, e.g.
# "vit/encoder/layer_._0/attention/attention/query/kernel:0" -> canonical key. Layouts: a 2-D
# "kernel" is (in, out) and is transposed; a 4-D one is HWIO and goes to OIHW with axes (3, 2, 0, 1).
TF_TO_CANONICAL_RULES: tuple[tuple[str, str], ...] = (
    (r":\d+$", ""),
    (r"_\._", "."),
    (r"/", "."),
    (r"\.(kernel|gamma)$", ".weight"),
    (r"\.beta$", ".bias"),
)

# The inverse (module path part only; the leaf name is chosen by kind, see _canonical_leaf): Keras
# list layers are named "layer_._{i}" by transformers' TF models.
CANONICAL_TO_TF_RULES: tuple[tuple[str, str], ...] = (
    (r"\.", "/"),
    (r"/(\d+)(?=/|$)", r"_._\1"),
)

# FORMATS.md section 4: a '/'-joined Flax parameter path -> canonical key. "kernel" layouts as TF.
FLAX_TO_CANONICAL_RULES: tuple[tuple[str, str], ...] = (
    (r"/", "."),
    (r"\.(kernel|scale)$", ".weight"),
)

# First components a transformers TF weight name can have once the model name is gone: anything
# else in first position is the Keras model name ("tf_vi_t_model", ...) and is dropped.
_CANONICAL_ROOTS = frozenset({"vit", "classifier", "decoder", "embeddings", "encoder", "layernorm", "pooler"})

_QKV_BIAS = re.compile(r"(^|\.)attention\.attention\.(query|key|value)\.bias$")


def _apply_rules(name: str, rules: Iterable[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def to_new_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename canonical 4.x keys to transformers 5.9+ names (``NEW_NAME_RULES``); values untouched."""
    return {_apply_rules(key, NEW_NAME_RULES): value for key, value in state.items()}


def to_legacy_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename transformers 5.9+ keys to the canonical 4.x names (``LEGACY_NAME_RULES``).

    Keys already in 4.x names are left as they are. Raises CheckpointError if two keys collide
    (a file that mixes both spellings of one weight).
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = _apply_rules(key, LEGACY_NAME_RULES)
        if new in out:
            raise CheckpointError(f"key {key!r} and another key both map to {new!r} (4.x and 5.9+ names mixed)")
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


def _ml_dtype(name: str) -> np.dtype | None:
    """An ml_dtypes dtype (bfloat16, float8_*) if ml_dtypes is installed, else None."""
    try:
        import ml_dtypes  # small numpy extension (a jax dependency); optional here
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return np.dtype(getattr(ml_dtypes, name))


def _bfloat16() -> np.dtype | None:
    return _ml_dtype("bfloat16")


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32, exactly (bfloat16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Bf16Bits:
    """Marker: the data is bfloat16 but ml_dtypes is missing, so it is read as uint16 bits."""


# safetensors dtype codes -> numpy (little-endian). bfloat16 / float8 need ml_dtypes.
_SAFETENSORS_NUMPY: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?", "C64": "<c8",
}
_SAFETENSORS_ML: dict[str, str] = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _safetensors_dtype(code: str) -> np.dtype | type[_Bf16Bits]:
    if code in _SAFETENSORS_NUMPY:
        return np.dtype(_SAFETENSORS_NUMPY[code])
    if code in _SAFETENSORS_ML:
        dtype = _ml_dtype(_SAFETENSORS_ML[code])
        if dtype is not None:
            return dtype
        if code == "BF16":
            return _Bf16Bits
        raise KeyError(f"{code} needs the ml_dtypes package")
    raise KeyError(f"unknown dtype {code!r}")


def _safetensors_code(dtype: np.dtype) -> str:
    for code, name in _SAFETENSORS_ML.items():
        if dtype.name == name:
            return code
    if dtype.isbuiltin or not dtype.isnative:
        for code, np_name in _SAFETENSORS_NUMPY.items():
            if dtype.newbyteorder("<") == np.dtype(np_name).newbyteorder("<"):
                return code
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")


def _itemsize(dtype: np.dtype | type[_Bf16Bits]) -> int:
    return 2 if dtype is _Bf16Bits else dtype.itemsize  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Locating files
# ---------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def find_weights_file(directory: PathLike) -> pathlib.Path:
    """The first of ``WEIGHT_FILES`` present in ``directory``.

    Raises CheckpointNotFoundError (a CheckpointError and FileNotFoundError) listing what was looked for.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: not a directory")
    for name in WEIGHT_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise CheckpointNotFoundError(f"{directory}: no weights file found; looked for {', '.join(WEIGHT_FILES)}")


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_pretrained(
    path_or_id: PathLike,
    *,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    filenames: Iterable[str] = ("config.json",) + WEIGHT_FILES,
) -> pathlib.Path:
    """Turn a local path or a hub id into a local path.

    A local directory or file is returned as is. Anything else must be a hub id ("org/name"): each
    of ``filenames`` is fetched with ``huggingface_hub.hf_hub_download`` into its usual cache
    (honouring ``HF_HUB_OFFLINE``, ``revision``, ``cache_dir``, ``token``, ``local_files_only``)
    and the snapshot directory is returned. Names that are not weight files (``config.json``) are
    fetched when the repo has them; of the names in ``WEIGHT_FILES`` only the first one the repo
    has is fetched (with its shards when it is an ``.index.json``), so a repo holding weights in
    four formats costs one download. Files the repo lacks are skipped.

    Raises CheckpointNotFoundError naming the id and the files looked for when none was found (or
    when weight files were asked for and none exists), CheckpointError for an unknown repo or revision.
    """
    path = pathlib.Path(path_or_id).expanduser()
    if path.exists():
        return path
    repo_id = os.fspath(path_or_id)
    if not _HUB_ID.match(repo_id) or repo_id.startswith((".", "~")):
        raise CheckpointNotFoundError(f"{repo_id}: no such file or directory (and not a hub id like 'org/name')")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # hf_hub_download reads HF_HUB_OFFLINE once, when huggingface_hub is imported; re-read it.
    offline = local_files_only or _env_offline()
    names = list(filenames)
    weight_names = [n for n in names if n in WEIGHT_FILES]
    other_names = [n for n in names if n not in WEIGHT_FILES]

    def where() -> str:
        return repo_id + (f" (revision {revision})" if revision else "") + (" [offline: cache only]" if offline else "")

    def fetch(filename: str) -> pathlib.Path | None:
        nonlocal offline
        try:
            return pathlib.Path(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline,
            ))
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError in huggingface_hub 0.x)
            if not offline:
                # Online, this means the hub could not be reached (after huggingface_hub's retries):
                # look at the cache only for the remaining candidates instead of retrying each one.
                logger.warning("%s: the hub cannot be reached; using only files already in the cache", repo_id)
                offline = True
            return None
        except EntryNotFoundError:  # the repo has no such file
            return None
        except RevisionNotFoundError as e:
            raise CheckpointError(f"{repo_id}: revision {revision!r} not found on the hub ({e})") from e
        except RepositoryNotFoundError as e:
            raise CheckpointNotFoundError(
                f"{repo_id}: repository not found on the hub (or gated/private: pass token=...) ({e})"
            ) from e

    found: list[pathlib.Path] = [p for p in map(fetch, other_names) if p is not None]
    weights_found = False
    for name in weight_names:
        file = fetch(name)
        if file is None:
            continue
        found.append(file)
        if name.endswith(".index.json"):
            for shard in _index_shards(file):
                if fetch(shard) is None:
                    raise CheckpointNotFoundError(f"{where()}: {name} lists shard {shard!r}, which is not available")
        weights_found = True
        break
    if not found or (weight_names and not weights_found):
        looked = ", ".join(weight_names or other_names)
        raise CheckpointNotFoundError(f"{where()}: none of {looked} could be found in the hub repo or its cache")
    return found[0].parent


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SUFFIX_KINDS = (
    (".index.json", "index"), (".safetensors", "safetensors"), (".bin", "torch"), (".pt", "torch"),
    (".pth", "torch"), (".h5", "h5"), (".hdf5", "h5"), (".msgpack", "msgpack"),
)


def detect_kind(path: pathlib.Path) -> str:
    """The file's format from its first bytes: safetensors, torch (zip), torch_legacy, h5, msgpack, index."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return "torch"
        if head[:8] == _HDF5_SIGNATURE:
            return "h5"
        for offset in (512, 1024, 2048):  # HDF5 allows a user block before the signature
            f.seek(offset)
            if f.read(8) == _HDF5_SIGNATURE:
                return "h5"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "index"
    if head[:1] == b"\x80" and len(head) > 1 and 1 <= head[1] <= 5:
        return "torch_legacy"  # a bare pickle: torch.save before the zip format (or another pickle)
    if head and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"  # a msgpack map: flax.serialization's top level
    name = path.name.lower()
    expected = next((kind for suffix, kind in _SUFFIX_KINDS if name.endswith(suffix)), None)
    if expected is not None:
        raise CheckpointError(f"{path}: not a valid {expected} file (truncated or corrupt; first bytes {head[:8]!r})")
    raise CheckpointError(
        f"{path}: unrecognised checkpoint format (first bytes {head[:8]!r}); expected safetensors, a torch zip "
        "archive (pytorch_model.bin), HDF5 (tf_model.h5), flax msgpack or a sharded *.index.json"
    )


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint into canonical numpy arrays.

    ``path`` is a directory (its weights file is chosen by ``find_weights_file``) or a single file
    of any supported kind, detected from its contents: safetensors (PyTorch, or TF / Flax names
    when the metadata says ``format`` "tf" / "flax" or the key names show it), a sharded
    ``*.index.json``, ``pytorch_model.bin`` (zip format; read without torch through a restricted
    unpickler), ``tf_model.h5`` or ``flax_model.msgpack``.

    Keys come back in canonical (transformers 4.x PyTorch) names and layouts with whatever model
    prefix the file had: ``vit.`` + ``classifier.*`` / ``decoder.0.*`` for task models, no prefix
    for a base ``ViTModel``. TF and Flax base models give exactly the keys transformers' PyTorch
    ``ViTModel`` has (TF's ``vit/`` level is dropped), TF and Flax task models the PyTorch task
    model's keys. TF files keep their q/k/v biases (see ``drop_unused_qkv_bias``).

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays when ml_dtypes is installed, as
    float32 (exactly the same values) otherwise.

    Raises CheckpointError naming the file and the problem for truncated, corrupt or unsafe files.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = find_weights_file(path)
    elif not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    raw, flavour = read_raw_state_dict(path)
    state = _canonicalize(raw, flavour, path)
    try:
        return to_legacy_names(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def read_raw_state_dict(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    """One file (or one index and its shards) -> (keys in the file's own naming, flavour pt|tf|flax).

    TF keys lose their model-name component here; Flax keys are '/'-joined paths.
    """
    kind = detect_kind(path)
    if kind == "index":
        return _read_index(path)
    readers: dict[str, Callable[[pathlib.Path], tuple[dict[str, np.ndarray], str]]] = {
        "safetensors": _read_safetensors_file,
        "torch": _read_torch_zip,
        "torch_legacy": _refuse_legacy_torch,
        "h5": _read_h5,
        "msgpack": _read_msgpack,
    }
    return readers[kind](path)


def _canonicalize(raw: dict[str, np.ndarray], flavour: str, path: pathlib.Path) -> dict[str, np.ndarray]:
    if flavour == "pt":
        return raw
    rules = TF_TO_CANONICAL_RULES if flavour == "tf" else FLAX_TO_CANONICAL_RULES
    state: dict[str, np.ndarray] = {}
    for name, array in raw.items():
        leaf = re.sub(r":\d+$", "", name).rsplit("/", 1)[-1]
        if leaf == "kernel":
            if array.ndim == 2:  # Dense kernel (in, out) -> Linear weight (out, in)
                array = array.T
            elif array.ndim == 4:  # Conv kernel HWIO -> OIHW
                array = array.transpose(3, 2, 0, 1)
            else:
                raise CheckpointError(f"{path}: kernel {name!r} has rank {array.ndim}; expected 2 or 4")
            array = np.ascontiguousarray(array)
        key = _apply_rules(name, rules)
        if key in state:
            raise CheckpointError(f"{path}: two weights map to the key {key!r} (second: {name!r})")
        state[key] = array
    if flavour == "tf" and state and all(k.startswith("vit.") for k in state):
        # transformers' TFViTModel keeps its backbone (pooler included) under the main layer "vit";
        # PyTorch's ViTModel has no prefix. A file with nothing outside vit/ is a base model.
        state = {k[len("vit."):]: v for k, v in state.items()}
    return state


@contextlib.contextmanager
def _wrap_errors(path: pathlib.Path, what: str) -> Iterator[None]:
    """Turn low-level parse errors into a CheckpointError naming the file; CheckpointErrors pass through."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, struct.error,
            zipfile.BadZipFile, pickle.UnpicklingError, RecursionError, OverflowError) as e:
        raise CheckpointError(f"{path}: cannot read {what} (truncated or corrupt?): {type(e).__name__}: {e}") from e


# --- safetensors -----------------------------------------------------------------------------


def _read_safetensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors file (8-byte little-endian header size, JSON header, raw little-endian data)."""
    with _wrap_errors(path, "safetensors file"), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file: header says {header_size} bytes, "
                                  f"file has {size - 8} after the size field")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ is not an object")
        data_start = 8 + header_size
        data_size = size - data_start
        state: dict[str, np.ndarray] = {}
        for key, entry in sorted(header.items(), key=lambda kv: _offsets(kv[1])[0]):
            try:
                dtype = _safetensors_dtype(entry["dtype"])
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = _offsets(entry)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors entry for {key!r}: {e}") from e
            count = math.prod(shape)
            if any(s < 0 for s in shape) or not 0 <= begin <= end or end - begin != count * _itemsize(dtype):
                raise CheckpointError(f"{path}: corrupt safetensors entry for {key!r}: shape {shape} does not "
                                      f"fit byte range [{begin}, {end})")
            if end > data_size:
                raise CheckpointError(f"{path}: truncated safetensors file: {key!r} needs bytes up to "
                                      f"{data_start + end}, the file has {size}")
            read_dtype = np.dtype("<u2") if dtype is _Bf16Bits else dtype
            array = np.empty(shape, dtype=read_dtype)  # type: ignore[arg-type]
            f.seek(data_start + begin)
            if count and f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                raise CheckpointError(f"{path}: truncated safetensors file while reading {key!r}")
            if dtype is _Bf16Bits:
                array = _bf16_bits_to_float32(array)
            elif not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
            state[key] = array
    return state, {str(k): str(v) for k, v in metadata.items()}


def _offsets(entry: Any) -> tuple[int, int]:
    begin, end = entry["data_offsets"]
    return int(begin), int(end)


def _safetensors_flavour(keys: Iterable[str], metadata: Mapping[str, str]) -> str:
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


def _strip_tf_model_name(name: str) -> str:
    """Drop the Keras model name ("tf_vi_t_model/...") if the name starts with one."""
    first, _, rest = name.partition("/")
    if rest and re.sub(r"_\._\d+$", "", first) not in _CANONICAL_ROOTS:
        return rest
    return name


def _read_safetensors_file(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    state, metadata = _read_safetensors(path)
    flavour = _safetensors_flavour(state, metadata)
    if flavour == "tf":  # single-file TF safetensors lack the model name, sharded ones keep it
        state = {_strip_tf_model_name(k): v for k, v in state.items()}
    elif flavour == "flax":  # Flax safetensors join the parameter path with "."
        state = {k.replace(".", "/"): v for k, v in state.items()}
    return state, flavour


# --- sharded checkpoints ---------------------------------------------------------------------


def _load_index(path: pathlib.Path) -> dict[str, str]:
    with _wrap_errors(path, "index file"):
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt index file: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: not a sharded-checkpoint index (no 'weight_map' of key -> file name)")
    for shard in set(weight_map.values()):
        parts = pathlib.PurePosixPath(shard).parts
        if pathlib.PurePath(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise CheckpointError(f"{path}: refusing shard path {shard!r} outside the checkpoint directory")
    return weight_map


def _index_shards(path: pathlib.Path) -> list[str]:
    """Shard file names listed by an index, in first-use order."""
    return list(dict.fromkeys(_load_index(path).values()))


def _read_index(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    weight_map = _load_index(path)
    state: dict[str, np.ndarray] = {}
    flavours: set[str] = set()
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise CheckpointNotFoundError(f"{path}: shard {shard!r} is missing")
        if detect_kind(shard_path) == "index":
            raise CheckpointError(f"{path}: shard {shard!r} is itself an index")
        part, flavour = read_raw_state_dict(shard_path)
        flavours.add(flavour)
        for key, value in part.items():
            if key in state:
                raise CheckpointError(f"{path}: weight {key!r} appears in more than one shard")
            state[key] = value
    if len(flavours) > 1:
        raise CheckpointError(f"{path}: shards mix formats {sorted(flavours)}")
    flavour = flavours.pop() if flavours else "pt"
    # The index names weights as the writer saw them: TF with the model name, Flax '/'-joined.
    listed = {_strip_tf_model_name(k) if flavour == "tf" else k for k in weight_map}
    missing = sorted(listed - set(state))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weights listed in the index are in no shard: "
                              f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return state, flavour


# --- torch zip (pytorch_model.bin) -------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a torch.*Storage class inside the pickle: the numpy dtype of its elements."""

    name: str
    dtype: Any  # np.dtype or _Bf16Bits


@dataclass
class _Storage:
    """A storage record rebuilt as a flat numpy array (elements, not bytes)."""

    data: np.ndarray
    bf16_bits: bool


def _torch_storage_types() -> dict[str, _StorageType]:
    table = {
        "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "LongStorage": "i8",
        "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
        "BoolStorage": "?", "ComplexFloatStorage": "c8", "ComplexDoubleStorage": "c16",
        "UntypedStorage": "u1",
    }
    types = {name: _StorageType(name, np.dtype(code)) for name, code in table.items()}
    types["BFloat16Storage"] = _StorageType("BFloat16Storage", _bfloat16() or _Bf16Bits)
    return types


class _TensorType:
    """Stands in for torch.Tensor / torch.nn.Parameter in ``_rebuild_from_type_v2``."""


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                       requires_grad: bool = False, backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """numpy version of torch._utils._rebuild_tensor_v2: a strided view of a storage, copied."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor record refers to {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    data = storage.data
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"invalid tensor record: size {size}, stride {stride}, offset {offset}")
    if 0 in size:
        array = np.zeros(size, dtype=data.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:
            raise CheckpointError(f"tensor record (size {size}, stride {stride}, offset {offset}) reads past the "
                                  f"end of its storage ({data.size} elements)")
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride), writeable=False,
        )
        array = np.array(view)  # copy: contiguous, writable, independent of the archive
    if storage.bf16_bits:
        array = _bf16_bits_to_float32(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...]) -> np.ndarray:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise CheckpointError("parameter record does not hold a tensor")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> np.ndarray:
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter) or new_type is not _TensorType:
        raise CheckpointError("tensor-subclass record with an unsupported rebuild function or type")
    return func(*args)


def _torch_device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict and nothing else.

    ``find_class`` maps the few globals a state dict needs to local numpy stand-ins (torch is never
    imported); any other global (os.system, builtins.eval, ...) raises CheckpointError before it
    could be called. Storage records are read from the archive's ``<archive>/data/<key>`` entries.
    """

    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, prefix: str, big_endian: bool,
                 path: pathlib.Path) -> None:
        super().__init__(file)
        self._archive, self._prefix, self._big_endian, self._path = archive, prefix, big_endian, path
        self._storages: dict[str, _Storage] = {}
        self._allowed: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
            ("torch", "Tensor"): _TensorType,
            ("torch.nn.parameter", "Parameter"): _TensorType,
            ("torch", "device"): _torch_device,
            ("collections", "OrderedDict"): OrderedDict,
        }
        for name, storage_type in _torch_storage_types().items():
            self._allowed[("torch", name)] = storage_type

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles spell Python 3 modules the Python 2 way; only used for the message.
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path}: refused to unpickle global {module}.{name}: a weights file may only hold "
                "tensors (this file would run code when loaded with torch.load(weights_only=False))"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent record {str(pid)[:80]!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: storage record with a non-storage type {storage_type!r}")
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        bf16_bits = storage_type.dtype is _Bf16Bits
        dtype = np.dtype("u2") if bf16_bits else np.dtype(storage_type.dtype)
        dtype = dtype.newbyteorder(">" if self._big_endian else "<") if dtype.itemsize > 1 else dtype
        entry = f"{self._prefix}data/{key}"
        try:
            raw = self._archive.read(entry)
        except KeyError:
            raise CheckpointError(f"{self._path}: storage {entry!r} is missing from the archive") from None
        numel = int(numel)
        if len(raw) < numel * dtype.itemsize:
            raise CheckpointError(f"{self._path}: storage {entry!r} has {len(raw)} bytes, needs "
                                  f"{numel * dtype.itemsize} ({numel} x {storage_type.name})")
        storage = _Storage(np.frombuffer(raw, dtype=dtype, count=numel), bf16_bits)
        self._storages[key] = storage
        return storage


def _read_torch_zip(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    with _wrap_errors(path, "torch zip archive"):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise CheckpointError(
                f"{path}: not a valid zip archive (truncated or corrupt torch checkpoint): {e}") from e
        with archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(
                    f"{path}: zip archive without exactly one <archive>/data.pkl: not a torch checkpoint")
            prefix = pickles[0][: -len("data.pkl")]
            big_endian = False
            if f"{prefix}byteorder" in archive.namelist():
                big_endian = archive.read(f"{prefix}byteorder").strip() == b"big"
            unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, big_endian, path)
            obj = unpickler.load()
    return _as_flat_state(obj, path), "pt"


def _as_flat_state(obj: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
    """A mapping of name -> array; training checkpoints that wrap it under "state_dict"/"model" are unwrapped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    if not any(isinstance(v, np.ndarray) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                return _as_flat_state(obj[wrapper], path)
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state


def _refuse_legacy_torch(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    raise CheckpointError(
        f"{path}: a bare pickle (torch's legacy pre-1.6 format, or not a torch file at all) is not read: "
        "only torch's zip format can be loaded without running code; re-save it with torch.save(state_dict, path)"
    )


# --- TF h5 -------------------------------------------------------------------------------------


def _h5_attr_list(obj: Any, name: str) -> list[str] | None:
    """A Keras string-list attribute, also when Keras split it into name0, name1, ... (64 KiB header limit)."""
    if name in obj.attrs:
        values = list(obj.attrs[name])
    elif f"{name}0" in obj.attrs:
        values, i = [], 0
        while f"{name}{i}" in obj.attrs:
            values.extend(obj.attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _read_h5(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    import h5py

    state: dict[str, np.ndarray] = {}
    with _wrap_errors(path, "HDF5 file"), h5py.File(path, "r") as f:
        layer_names = _h5_attr_list(f, "layer_names")
        if layer_names is None:
            raise CheckpointError(
                f"{path}: HDF5 file without a 'layer_names' attribute: not a Keras/transformers TF checkpoint")
        for layer in layer_names:
            if layer not in f:
                raise CheckpointError(f"{path}: layer {layer!r} listed in layer_names is missing")
            obj = f[layer]
            if isinstance(obj, h5py.Dataset):
                # transformers' sharded TF format: each entry is one weight, model name already dropped.
                state[_strip_tf_model_name(layer)] = np.asarray(obj[()])
                continue
            weight_names = _h5_attr_list(obj, "weight_names") or []
            for weight_name in weight_names:
                if weight_name not in obj:
                    raise CheckpointError(f"{path}: weight {weight_name!r} of layer {layer!r} is missing")
                # Keras weight names start with the model name ("tf_vi_t_model/vit/..."): drop it.
                _, _, name = weight_name.partition("/")
                state[name or weight_name] = np.asarray(obj[weight_name][()])
    return state, "tf"


# --- Flax msgpack ----------------------------------------------------------------------------

# flax.serialization's msgpack extension codes (flax/serialization.py, _MsgpackExtType).
_MSGPACK_NDARRAY, _MSGPACK_NATIVE_COMPLEX, _MSGPACK_NPSCALAR = 1, 2, 3
_MSGPACK_CHUNKED = "__msgpack_chunked_array__"
_MSGPACK_MAX_CHUNK = 2**30  # flax's MAX_CHUNK_SIZE: msgpack caps one object at 2**31 - 1 bytes


def _msgpack_ndarray(data: bytes) -> np.ndarray:
    """flax's ndarray encoding: msgpack of (shape, dtype name, C-order bytes)."""
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    shape = tuple(int(s) for s in shape)
    if name == "bfloat16" and _bfloat16() is None:
        bits = np.frombuffer(buffer, dtype="<u2").reshape(shape)
        return _bf16_bits_to_float32(bits)
    dtype = _ml_dtype(name) if name in _SAFETENSORS_ML.values() else np.dtype(name)
    if dtype is None:
        raise ValueError(f"dtype {name} needs the ml_dtypes package")
    if dtype.hasobject or len(buffer) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"array record of shape {shape} {name} has {len(buffer)} bytes")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()


def _msgpack_ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code == _MSGPACK_NDARRAY:
        return _msgpack_ndarray(data)
    if code == _MSGPACK_NPSCALAR:
        return _msgpack_ndarray(data)[()]
    if code == _MSGPACK_NATIVE_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    raise ValueError(f"unknown msgpack extension type {code}")


def _msgpack_unchunk(tree: Any) -> Any:
    """Undo flax's splitting of arrays larger than 1 GiB into {'__msgpack_chunked_array__', shape, chunks}."""
    if isinstance(tree, dict):
        if tree.get(_MSGPACK_CHUNKED):
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _msgpack_unchunk(v) for k, v in tree.items()}
    return tree


def _flatten(tree: Any, path: pathlib.Path, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path, name + "/"))
        elif isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, (np.generic, int, float, complex)):
            out[name] = np.asarray(value)
        else:
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not an array")
    return out


def _read_msgpack(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    import msgpack

    with _wrap_errors(path, "flax msgpack file"):
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=_msgpack_ext_hook, raw=False, strict_map_key=False)
        if not isinstance(tree, dict):
            raise CheckpointError(f"{path}: msgpack top level is a {type(tree).__name__}, not a parameter tree")
        tree = _msgpack_unchunk(tree)
        if set(tree) == {"params"} and isinstance(tree["params"], dict):
            tree = tree["params"]  # a variables dict rather than bare params
        return _flatten(tree, path), "flax"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


# mkstemp creates 0600 files; final files get the usual 0666 & ~umask like any open(..., "w").
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def _staged(targets: list[pathlib.Path]) -> Iterator[list[pathlib.Path]]:
    """Temporary files beside ``targets``; on success fsync'd and renamed over them, on failure removed."""
    temps: list[pathlib.Path] = []
    try:
        for target in targets:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            temps.append(pathlib.Path(name))
            os.chmod(name, 0o666 & ~_UMASK)
        yield temps
        for temp in temps:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for temp, target in zip(temps, targets):
            os.replace(temp, target)
        _fsync_directory({t.parent for t in targets})
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def _fsync_directory(directories: Iterable[pathlib.Path]) -> None:
    for directory in directories:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - e.g. Windows cannot open directories
            continue
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)


def _check_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a state dict must be a mapping, got {type(state).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"state dict key {key!r} is not a string")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise CheckpointError(f"state dict entry {key!r} is not a numeric array ({type(value).__name__})")
        out[key] = array
    return out


def _write_safetensors(path: pathlib.Path, state: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """safetensors layout: u64 header size, JSON header padded with spaces to 8 bytes, then the data."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays: list[np.ndarray] = []
    for key, array in state.items():
        code = _safetensors_code(array.dtype)
        if array.dtype.itemsize > 1 and array.dtype.kind in "biufc" and array.dtype != array.dtype.newbyteorder("<"):
            array = array.astype(array.dtype.newbyteorder("<"))  # safetensors is little-endian
        array = np.ascontiguousarray(array)
        header[key] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            if array.size:
                f.write(memoryview(array.reshape(-1).view(np.uint8)))


_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def save_state_dict(
    state: Mapping[str, np.ndarray],
    directory: PathLike,
    *,
    max_shard_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[pathlib.Path]:
    """Write ``state`` as ``model.safetensors`` (metadata ``{"format": "pt"}`` plus ``metadata``).

    With ``max_shard_size`` (bytes) and more data than that, writes shards
    ``model-00001-of-0000N.safetensors`` (filled greedily in key order; a tensor larger than the
    limit gets a shard of its own) and ``model.safetensors.index.json``, as transformers does.
    Every file is written to a temporary file in ``directory``, fsync'd and renamed into place
    only once all are written: on failure nothing half-written remains. Weight files of the other
    layout left by an earlier save (a stale single file or index and shards) are removed
    afterwards, so the directory never holds two versions. Returns the paths written.
    """
    state = _check_state(state)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "pt")
    if max_shard_size is not None and max_shard_size <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size}")

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in state.items():
        if max_shard_size is not None and shards[-1] and size + array.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes

    if len(shards) == 1:
        targets = [directory / SAFE_WEIGHTS_NAME]
    else:
        n = len(shards)
        targets = [directory / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        targets.append(directory / SAFE_WEIGHTS_INDEX_NAME)
    with _staged(targets) as temps:
        for shard, temp in zip(shards, temps):
            _write_safetensors(temp, shard, meta)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
                "weight_map": {key: targets[i].name for i, shard in enumerate(shards) for key in shard},
            }
            temps[-1].write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written = {t.name for t in targets}
    for stale in directory.iterdir():
        if stale.name not in written and (
            stale.name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or _SHARD_NAME.match(stale.name)
        ):
            stale.unlink(missing_ok=True)
    return targets


def _norm_modules(state: Mapping[str, np.ndarray]) -> set[str]:
    """Modules whose ``weight`` is 1-D: LayerNorms (every other weight of a ViT is 2-D or 4-D)."""
    return {k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 1}


def _to_framework_layout(key: str, array: np.ndarray, norms: set[str],
                         norm_leaf: tuple[str, str]) -> tuple[str, str, np.ndarray]:
    """Canonical key -> (module path, framework leaf name, framework-layout array) for TF / Flax."""
    module, _, leaf = key.rpartition(".")
    if leaf == "weight" and module in norms:
        return module, norm_leaf[0], array
    if leaf == "bias" and module in norms:
        return module, norm_leaf[1], array
    if leaf == "weight":
        if array.ndim == 2:  # Linear (out, in) -> Dense kernel (in, out)
            return module, "kernel", np.ascontiguousarray(array.T)
        if array.ndim == 4:  # Conv2d OIHW -> HWIO
            return module, "kernel", np.ascontiguousarray(array.transpose(2, 3, 1, 0))
        raise CheckpointError(f"weight {key!r} has rank {array.ndim}; expected 1 (norm), 2 (linear) or 4 (conv)")
    return module, leaf, array


def write_tf_h5(state: Mapping[str, np.ndarray], path: PathLike, *, model_name: str | None = None) -> pathlib.Path:
    """Write a ``tf_model.h5`` that transformers 4.x ``TFViTModel`` / ``TFViTForImageClassification`` load.

    ``state`` holds canonical keys (a base-model state without prefix, or a task-model state with
    ``vit.``). The layout is Keras' h5 weights format as transformers writes it: root attribute
    ``layer_names`` (``vit``, ``classifier``), one group per layer with attribute ``weight_names``
    (``<model_name>/vit/encoder/layer_._0/.../kernel:0``) and the datasets under those names. A base
    model's weights (pooler included) go under ``vit/`` as TFViTModel keeps them; ``read_state_dict``
    maps them back to unprefixed keys. TF's ViT always has q/k/v biases: a state without them
    (qkv_bias=False) gets zero biases, which changes no output. ``model_name`` defaults to the
    Keras name of the matching transformers class ("tf_vi_t_model", ...); loaders ignore it.
    Written atomically. ``read_state_dict`` of the file gives ``state`` back bitwise (plus the zero biases).
    """
    import h5py

    path = pathlib.Path(path)
    state = to_legacy_names(_check_state(state))
    is_base = not any(k.startswith("vit.") for k in state)
    if is_base:
        state = {f"vit.{k}": v for k, v in state.items()}
    for key in list(state):  # transformers' TFViTSelfAttention is built with use_bias=True
        match = re.search(r"\.attention\.attention\.(query|key|value)\.weight$", key)
        bias = key[: -len("weight")] + "bias"
        if match and bias not in state:
            state[bias] = np.zeros(state[key].shape[0], dtype=state[key].dtype)
    if model_name is None:
        model_name = ("tf_vi_t_model" if is_base else
                      "tf_vi_t_for_masked_image_modeling" if any(k.startswith("decoder.") for k in state) else
                      "tf_vi_t_for_image_classification")
    norms = _norm_modules(state)
    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, array in state.items():
        module, leaf, array = _to_framework_layout(key, array, norms, ("gamma", "beta"))
        tf_name = _apply_rules(f"{module}.{leaf}", CANONICAL_TO_TF_RULES) + ":0"
        layers.setdefault(tf_name.split("/", 1)[0], []).append((f"{model_name}/{tf_name}", array))

    path.parent.mkdir(parents=True, exist_ok=True)
    with _staged([path]) as (temp,):
        with h5py.File(temp, "w") as f:
            f.attrs["backend"] = "tensorflow"
            _h5_write_attr_list(f, "layer_names", list(layers))
            for layer, weights in layers.items():
                group = f.create_group(layer)
                _h5_write_attr_list(group, "weight_names", [name for name, _ in weights])
                for name, array in weights:
                    group.create_dataset(name, data=array)
    return path


def _h5_write_attr_list(obj: Any, name: str, values: list[str]) -> None:
    """Keras' save_attributes_to_hdf5_group: fixed-length byte strings, split below the 64 KiB header limit."""
    data = np.array([v.encode("utf8") for v in values]) if values else np.array([], dtype="S1")
    limit = 64512
    chunks = 1
    while data.nbytes / chunks > limit:
        chunks += 1
    if chunks == 1:
        obj.attrs[name] = data
    else:
        for i, chunk in enumerate(np.array_split(data, chunks)):
            obj.attrs[f"{name}{i}"] = chunk


def _msgpack_ext_pack(obj: Any) -> Any:
    import msgpack

    if isinstance(obj, np.ndarray):
        record = (obj.shape, obj.dtype.name, np.ascontiguousarray(obj).tobytes("C"))
        return msgpack.ExtType(_MSGPACK_NDARRAY, msgpack.packb(record, use_bin_type=True))
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_flax_msgpack(state: Mapping[str, np.ndarray], path: PathLike) -> pathlib.Path:
    """Write a ``flax_model.msgpack`` that transformers 4.x ``FlaxViTModel`` / ``FlaxViTForImageClassification`` load.

    The parameter tree is the canonical key split at '.', with Flax leaves: Dense / Conv ``kernel``
    ((in, out) / HWIO) and LayerNorm ``scale``; a base-model state (no ``vit.`` prefix) has no
    ``vit`` level, as FlaxViTModel. Encoded like ``flax.serialization.to_bytes`` (msgpack ext type 1
    per array, arrays over 1 GiB chunked) without importing flax. Written atomically;
    ``read_state_dict`` gives ``state`` back bitwise.
    """
    import msgpack

    path = pathlib.Path(path)
    state = to_legacy_names(_check_state(state))
    norms = _norm_modules(state)
    tree: dict[str, Any] = {}
    for key, array in state.items():
        module, leaf, array = _to_framework_layout(key, array, norms, ("scale", "bias"))
        node = tree
        for part in module.split(".") if module else []:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"key {key!r} nests under a weight")
        if array.nbytes > _MSGPACK_MAX_CHUNK:
            flat = array.reshape(-1)
            step = max(1, _MSGPACK_MAX_CHUNK // array.dtype.itemsize)
            chunks = [flat[i: i + step] for i in range(0, flat.size, step)]
            node[leaf] = {_MSGPACK_CHUNKED: True, "shape": {str(i): s for i, s in enumerate(array.shape)},
                          "chunks": {str(i): c for i, c in enumerate(chunks)}}
        else:
            node[leaf] = array
    blob = msgpack.packb(tree, default=_msgpack_ext_pack, strict_types=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staged([path]) as (temp,):
        temp.write_bytes(blob)
    return path


# ---------------------------------------------------------------------------------------------
# Fitting a checkpoint to a model
# ---------------------------------------------------------------------------------------------


def drop_unused_qkv_bias(state: Mapping[str, np.ndarray], qkv_bias: bool) -> dict[str, np.ndarray]:
    """Drop q/k/v biases when the config says ``qkv_bias=False``.

    transformers' TF ViT always creates them (FORMATS.md section 3), so TF checkpoints of
    qkv_bias=False models carry biases the model does not have; they are dropped with a warning
    (which says how large they were: non-zero biases mean the outputs will differ from the TF model).
    """
    state = dict(state)
    if qkv_bias:
        return state
    dropped = [k for k in state if _QKV_BIAS.search(k)]
    if dropped:
        largest = max(float(np.max(np.abs(state[k].astype(np.float64)))) if state[k].size else 0.0 for k in dropped)
        logger.warning("config.qkv_bias is False: dropping %d query/key/value biases from the checkpoint "
                       "(max |value| %.3g): %s", len(dropped), largest, ", ".join(dropped))
        for key in dropped:
            del state[key]
    return state


@dataclass
class LoadReport:
    """What happened when a checkpoint was fitted to a model (all keys are the model's names).

    missing: model keys the checkpoint does not provide (the model keeps its initialisation).
    unexpected: checkpoint keys the model has no use for (dropped).
    mismatched: (key, shape in the file, shape in the model) for keys left out because of their shape.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def _matches(key: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(p.search(key) for p in patterns)


def match_state_to_model(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    prefix: str = "vit",
    allowed_missing: Iterable[str] = (),
    allowed_unexpected_patterns: Iterable[str] = (),
    ignore_mismatched_sizes: bool = False,
    source: str = "",
) -> tuple[dict[str, np.ndarray], LoadReport]:
    """Fit a canonical checkpoint state onto a model's expected keys and shapes, as transformers does.

    - The model expects ``prefix.`` keys (a task model) and the checkpoint has none (a base
      model): every checkpoint key gets the prefix (the base model's pooler then becomes an
      unexpected ``vit.pooler.*``).
    - The checkpoint has ``prefix.`` keys and the model has none (a base model): the prefix is
      stripped and the checkpoint's head keys (everything outside the prefix) are dropped with a warning.

    ``allowed_missing`` and ``allowed_unexpected_patterns`` are regular expressions, searched in
    the key (an exact key name works too): missing keys matching ``allowed_missing`` are left to
    the model's initialisation, unexpected keys matching ``allowed_unexpected_patterns`` (another
    task's head, a pooler) are dropped; both are logged. Every other missing, unexpected or
    mis-shaped key is collected and raised together in one CheckpointError that lists each key
    with its shapes. With ``ignore_mismatched_sizes=True`` mis-shaped keys are left out of the
    returned state and reported in ``LoadReport.mismatched`` (the caller re-initialises them).

    Returns (state holding only model keys with the right shapes, report).
    """
    where = source or "checkpoint"
    dotted = prefix + "." if prefix else ""
    model_prefixed = bool(dotted) and any(k.startswith(dotted) for k in expected)
    ckpt_prefixed = bool(dotted) and any(k.startswith(dotted) for k in state)
    report = LoadReport()
    heads_dropped: list[str] = []
    renamed: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}  # model-side key -> key as in the checkpoint
    for key, value in state.items():
        new = key
        if model_prefixed and not ckpt_prefixed:
            new = dotted + key
        elif ckpt_prefixed and not model_prefixed:
            if not key.startswith(dotted):
                heads_dropped.append(key)
                continue
            new = key[len(dotted):]
        renamed[new], origin[new] = value, key

    missing_ok = [re.compile(p) for p in allowed_missing]
    unexpected_ok = [re.compile(p) for p in allowed_unexpected_patterns]
    out: dict[str, np.ndarray] = {}
    bad_missing: list[str] = []
    bad_unexpected: list[str] = []
    bad_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, shape in expected.items():
        shape = tuple(int(s) for s in shape)
        if key not in renamed:
            report.missing.append(key)
            if not _matches(key, missing_ok):
                bad_missing.append(key)
            continue
        value = renamed[key]
        if tuple(value.shape) != shape:
            report.mismatched.append((key, tuple(value.shape), shape))
            if not ignore_mismatched_sizes:
                bad_shape.append((key, tuple(value.shape), shape))
            continue
        out[key] = value
    for key in renamed:
        if key not in expected:
            report.unexpected.append(key)
            if not (_matches(key, unexpected_ok) or _matches(origin[key], unexpected_ok)):
                bad_unexpected.append(key)
    report.unexpected.extend(heads_dropped)

    if bad_missing or bad_unexpected or bad_shape:
        lines = [f"{where}: the checkpoint does not fit the model:"]
        if bad_missing:
            lines.append(f"  missing from the checkpoint ({len(bad_missing)}; model shape):")
            lines += [f"    {k} {tuple(expected[k])}" for k in bad_missing]
        if bad_unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(bad_unexpected)}; file shape):")
            lines += [f"    {k} {tuple(renamed[k].shape)}" for k in bad_unexpected]
        if bad_shape:
            lines.append(f"  wrong shape ({len(bad_shape)}; pass ignore_mismatched_sizes=True to re-initialise them):")
            lines += [f"    {k}: file {fs} vs model {ms}" for k, fs, ms in bad_shape]
        raise CheckpointError("\n".join(lines))

    if heads_dropped:
        logger.warning("%s: dropping head weights a base model does not use: %s", where, ", ".join(heads_dropped))
    if report.missing:
        logger.warning("%s: not in the checkpoint, newly initialised: %s", where, ", ".join(report.missing))
    dropped = [k for k in report.unexpected if k not in heads_dropped]
    if dropped:
        logger.warning("%s: checkpoint weights not used by this model: %s", where, ", ".join(dropped))
    if report.mismatched:
        logger.warning("%s: shapes differ, newly initialised: %s", where,
                       ", ".join(f"{k} (file {fs}, model {ms})" for k, fs, ms in report.mismatched))
    return out, report


def check_state_fits_table(
    state: Mapping[str, np.ndarray],
    table: Iterable[Any],
    *,
    allow_missing: Iterable[str] = (),
    source: str = "state dict",
    model_name: str = "the model",
) -> None:
    """Strict check before copying a canonical state into a framework model (each weights.py calls it).

    Every table entry (``WeightSpec``: name, shape) must be present, except names in
    ``allow_missing``, with the table's shape, and no other key may appear. All missing,
    unexpected and mis-shaped keys are raised together in one CheckpointError naming each with its
    shapes.
    """
    specs = {spec.name: tuple(spec.shape) for spec in table}
    allowed = set(allow_missing)
    missing = [name for name in specs if name not in state and name not in allowed]
    unexpected = [name for name in state if name not in specs]
    mismatched = [(name, tuple(np.shape(state[name])), specs[name])
                  for name in specs if name in state and tuple(np.shape(state[name])) != specs[name]]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not fit {model_name}:"]
    if missing:
        lines.append(f"  missing ({len(missing)}; model shape):")
        lines += [f"    {name} {specs[name]}" for name in missing]
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}; given shape):")
        lines += [f"    {name} {tuple(np.shape(state[name]))}" for name in unexpected]
    if mismatched:
        lines.append(f"  wrong shape ({len(mismatched)}):")
        lines += [f"    {name}: given {given} vs model {want}" for name, given, want in mismatched]
    raise CheckpointError("\n".join(lines))
