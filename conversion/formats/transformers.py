"""transformers 4.x checkpoints in all their files (FORMATS.md sections 1-4), by way of
``vit_core.checkpoint_io``.

Reading: PyTorch safetensors (single or sharded, 4.x or 5.9+ names) are memory-mapped and renamed
lazily with checkpoint_io's ``to_legacy_names`` rules; every other file (pytorch_model.bin, TF
h5 / safetensors, Flax msgpack / safetensors, sharded or not) is read by
``checkpoint_io.read_state_dict``. The config is the ``config.json`` beside the weights.

Writing streams one tensor at a time: canonical safetensors, ``pytorch_model.bin`` (torch's zip
format; through torch when it is installed, else vitx's own writer), ``tf_model.h5`` and
``flax_model.msgpack`` in the names and layouts of checkpoint_io's writers (``CANONICAL_TO_TF_RULES``,
Flax ``kernel``/``scale`` leaves), which transformers 4.57's TFViT / FlaxViT classes load. The
layout of each tensor follows its ``kind`` in the canonical weight table.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any

import numpy as np

from vit_core import ViTConfig
from vit_core.checkpoint_io import (
    CANONICAL_TO_TF_RULES,
    FLAX_TO_CANONICAL_RULES,
    TF_TO_CANONICAL_RULES,
    CheckpointError,
    read_state_dict,
    to_legacy_names,
)

from .. import io
from ..rules import Lazy, LazyState, lazify, lazy_from_array
from .base import Loaded, check_against_table, derive_config, table_for

NAME = "transformers"

_CANONICAL = re.compile(
    r"^(vit\.)?(embeddings\.|encoder\.layer\.\d+\.|layers\.\d+\.|layernorm\.|pooler\.)|^classifier\.|^decoder\.0\."
)
_TF_NAME = re.compile(r":\d+$")
_FLAX_LEAF = re.compile(r"[./](kernel|scale)$")


def looks_canonical(keys: set[str]) -> bool:
    """transformers PyTorch names (4.x or 5.9+), or TF / Flax names of the same modules."""
    if not keys:
        return False
    plain = {_TF_NAME.sub("", k).replace("/", ".").replace("_._", ".") for k in keys}
    plain = {re.sub(r"^[a-z_]+_vi_t_[a-z_]+\.|^tf_vi_t_model\.", "", k) for k in plain}
    return all(_CANONICAL.match(k) for k in plain)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_lazy(weights: pathlib.Path) -> LazyState:
    """Canonical lazy state of a transformers weights file (or index)."""
    if weights.name.endswith(".index.json"):
        try:
            index = json.loads(weights.read_text(encoding="utf-8"))
            shards = list(dict.fromkeys(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{weights}: not a sharded-checkpoint index: {e}") from None
        if shards and all(s.endswith(".safetensors") for s in shards) and _pt_safetensors(weights.parent / shards[0]):
            state: LazyState = {}
            for shard in shards:
                path = weights.parent / shard
                if "/" in shard or "\\" in shard or not path.is_file():
                    raise CheckpointError(f"{weights}: shard {shard!r} is missing or outside the directory")
                part, _ = io.read_safetensors_lazy(path)
                state.update(part)
            return to_legacy_names(state)
    elif weights.suffix == ".safetensors" and _pt_safetensors(weights):
        state, _ = io.read_safetensors_lazy(weights)
        return to_legacy_names(state)
    else:
        from vit_core.checkpoint_io import detect_kind

        kind = detect_kind(weights)
        if kind == "safetensors" and _pt_safetensors(weights):
            state, _ = io.read_safetensors_lazy(weights)
            return to_legacy_names(state)
        raw = io.read_h5_lazy(weights) if kind == "h5" else io.read_msgpack_lazy(weights) if kind == "msgpack" else None
        if raw is not None:
            return _canonical_from_framework(raw, "tf" if kind == "h5" else "flax", weights)
    return lazify(read_state_dict(weights))


def _canonical_from_framework(raw: LazyState, flavour: str, path: pathlib.Path) -> LazyState:
    """TF / Flax names and layouts -> canonical, lazily (the rules and layouts of
    vit_core.checkpoint_io's reader: kernels (in, out) transposed, HWIO -> OIHW)."""
    rules = TF_TO_CANONICAL_RULES if flavour == "tf" else FLAX_TO_CANONICAL_RULES
    state: LazyState = {}
    for name, lazy in raw.items():
        leaf = re.sub(r":\d+$", "", name).rsplit("/", 1)[-1]
        if leaf == "kernel":
            if len(lazy.shape) == 2:
                lazy = Lazy(lazy.shape[::-1], lazy.dtype, lambda lz=lazy: np.ascontiguousarray(lz.materialize().T), name)
            elif len(lazy.shape) == 4:
                h, w, i, o = lazy.shape
                lazy = Lazy((o, i, h, w), lazy.dtype,
                            lambda lz=lazy: np.ascontiguousarray(lz.materialize().transpose(3, 2, 0, 1)), name)
            else:
                raise CheckpointError(f"{path}: kernel {name!r} has rank {len(lazy.shape)}; expected 2 or 4")
        key = name
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if key in state:
            raise CheckpointError(f"{path}: two weights map to the key {key!r} (second: {name!r})")
        state[key] = lazy
    if flavour == "tf" and state and all(k.startswith("vit.") for k in state):
        # TFViTModel keeps its whole backbone (pooler included) under "vit"; PyTorch's ViTModel has no prefix
        state = {k[len("vit."):]: v for k, v in state.items()}
    return to_legacy_names(state)


def _pt_safetensors(path: pathlib.Path) -> bool:
    if not path.is_file():
        return False
    header, metadata, _ = io.read_safetensors_header(path)
    fmt = metadata.get("format", "pt").lower()
    if fmt in ("tf", "flax"):
        return False
    return not any(_TF_NAME.search(k) or _FLAX_LEAF.search(k) for k in header)


def read(weights: pathlib.Path, config_path: pathlib.Path | None, where: str) -> Loaded:
    state = read_lazy(weights)
    notes: list[str] = []
    if config_path is not None and config_path.is_file():
        try:
            config = ViTConfig.from_json_file(config_path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    else:
        from .base import STANDARD_HEADS

        p = "vit." if any(k.startswith("vit.") for k in state) else ""
        hidden = state[f"{p}embeddings.cls_token"].shape[-1] if f"{p}embeddings.cls_token" in state else 0
        heads = STANDARD_HEADS.get(hidden)
        if heads is None:
            raise CheckpointError(f"{where}: no config.json beside the weights, and hidden size {hidden} is not a "
                                  "standard ViT size: the number of heads is unknown")
        config = derive_config(state, heads=heads, where=where)
        notes.append(f"no config.json: config derived from the weights ({heads} heads from the standard size table; "
                     "transformers' defaults layer_norm_eps=1e-12, hidden_act='gelu')")
    if not config.qkv_bias:
        dropped = [k for k in state if re.search(r"attention\.attention\.(query|key|value)\.bias$", k)]
        if dropped:
            notes.append(f"config.qkv_bias is False: dropped {len(dropped)} q/k/v biases (TF checkpoints carry them)")
            state = {k: v for k, v in state.items() if k not in dropped}
    check_against_table(state, config, where)
    return Loaded(NAME, state, config, notes, where)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _kinds(state: LazyState, config: ViTConfig) -> dict[str, str]:
    return {s.name: s.kind for s in table_for(config, state)}


def _tf_name(module: str, leaf: str) -> str:
    name = f"{module}.{leaf}"
    for pattern, replacement in CANONICAL_TO_TF_RULES:
        name = re.sub(pattern, replacement, name)
    return name + ":0"


def _framework_entries(state: LazyState, config: ViTConfig, norm_leaves: tuple[str, str]) -> list[tuple[str, str, Lazy]]:
    """(module path, leaf name, lazy tensor in TF/Flax layout) for every canonical tensor, by kind."""
    kinds = _kinds(state, config)
    entries = []
    for key, lazy in state.items():
        module, _, leaf = key.rpartition(".")
        kind = kinds.get(key)
        if kind is None:
            raise CheckpointError(f"{key}: not in the canonical table of this model")
        if kind == "norm":
            leaf = norm_leaves[0]
        elif leaf == "bias" and f"{module}.weight" in kinds and kinds[f"{module}.weight"] == "norm":
            leaf = norm_leaves[1]
        elif kind == "linear":  # (out, in) -> Dense kernel (in, out)
            leaf = "kernel"
            lazy = Lazy(lazy.shape[::-1], lazy.dtype, lambda lz=lazy: np.ascontiguousarray(lz.materialize().T), key)
        elif kind == "conv":  # OIHW -> HWIO
            leaf = "kernel"
            o, i, kh, kw = lazy.shape
            lazy = Lazy((kh, kw, i, o), lazy.dtype,
                        lambda lz=lazy: np.ascontiguousarray(lz.materialize().transpose(2, 3, 1, 0)), key)
        entries.append((module, leaf, lazy))
    return entries


def write_tf_h5(path: pathlib.Path, state: LazyState, config: ViTConfig, progress: io.Progress | None = None) -> None:
    """A ``tf_model.h5`` as transformers' TFViTModel / TFViTForImageClassification save it (Keras h5
    weights: root attribute ``layer_names``, one group per layer with ``weight_names``)."""
    import h5py

    state = dict(state)
    is_base = not any(k.startswith("vit.") for k in state)
    if is_base:  # TFViTModel keeps the whole backbone, pooler included, under its main layer "vit"
        state = {f"vit.{k}": v for k, v in state.items()}
    # transformers' TF self-attention always has q/k/v biases; zeros change no output.
    for key in list(state):
        m = re.search(r"\.attention\.attention\.(query|key|value)\.weight$", key)
        bias = key[: -len("weight")] + "bias"
        if m and bias not in state:
            state[bias] = lazy_from_array(np.zeros(state[key].shape[0], dtype=state[key].dtype), bias)
    model_name = ("tf_vi_t_model" if is_base else "tf_vi_t_for_masked_image_modeling"
                  if any(k.startswith("decoder.") for k in state) else "tf_vi_t_for_image_classification")
    table_config = config
    table_state = {k[len("vit."):]: v for k, v in state.items()} if is_base else state
    entries = _framework_entries(table_state, table_config, ("gamma", "beta"))
    layers: dict[str, list[tuple[str, Lazy]]] = {}
    for module, leaf, lazy in entries:
        if is_base:
            module = f"vit.{module}" if module else "vit"
        tf_name = _tf_name(module, leaf)
        layers.setdefault(tf_name.split("/", 1)[0], []).append((f"{model_name}/{tf_name}", lazy))
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = "2.21.0"
        _h5_attr_list(f, "layer_names", list(layers))
        for layer, weights in layers.items():
            group = f.create_group(layer)
            _h5_attr_list(group, "weight_names", [name for name, _ in weights])
            for name, lazy in weights:
                group.create_dataset(name, data=lazy.materialize())
                if progress:
                    progress(lazy.nbytes)


def _h5_attr_list(obj: Any, name: str, values: list[str]) -> None:
    """Keras' save_attributes_to_hdf5_group: byte strings, split below HDF5's 64 KiB header limit."""
    data = np.array([v.encode("utf8") for v in values]) if values else np.array([], dtype="S1")
    chunks = max(1, math.ceil(data.nbytes / 64512))
    if chunks == 1:
        obj.attrs[name] = data
    else:
        for i, chunk in enumerate(np.array_split(data, chunks)):
            obj.attrs[f"{name}{i}"] = chunk


_MSGPACK_NDARRAY = 1
_MSGPACK_MAX_CHUNK = 2**30  # flax.serialization chunks arrays larger than 1 GiB


def write_flax_msgpack(path: pathlib.Path, state: LazyState, config: ViTConfig,
                       progress: io.Progress | None = None) -> None:
    """A ``flax_model.msgpack`` as ``flax.serialization.to_bytes`` encodes a params tree (nested maps,
    arrays as msgpack ext type 1 of (shape, dtype name, C bytes)), streamed tensor by tensor."""
    import msgpack

    tree: dict[str, Any] = {}
    for module, leaf, lazy in _framework_entries(state, config, ("scale", "bias")):
        node = tree
        for part in module.split(".") if module else []:
            node = node.setdefault(part, {})
        node[leaf] = lazy
    packer = msgpack.Packer(use_bin_type=True)

    def write_node(f: Any, node: Any) -> None:
        if isinstance(node, Lazy):
            array = np.ascontiguousarray(node.materialize())
            if array.nbytes > _MSGPACK_MAX_CHUNK:
                flat = array.reshape(-1)
                step = max(1, _MSGPACK_MAX_CHUNK // array.dtype.itemsize)
                chunks = {str(i): lazy_from_array(flat[j: j + step]) for i, j in enumerate(range(0, flat.size, step))}
                write_node(f, {"__msgpack_chunked_array__": True,
                               "shape": {str(i): s for i, s in enumerate(array.shape)}, "chunks": chunks})
            else:
                record = msgpack.packb((list(array.shape), array.dtype.name, array.tobytes("C")), use_bin_type=True)
                f.write(packer.pack(msgpack.ExtType(_MSGPACK_NDARRAY, record)))
            if progress:
                progress(node.nbytes)
            return
        if not isinstance(node, dict):
            f.write(packer.pack(node))
            return
        f.write(packer.pack_map_header(len(node)))
        for key, value in node.items():
            f.write(packer.pack(key))
            write_node(f, value)

    with open(path, "wb") as f:
        write_node(f, tree)


def write_pytorch_bin(path: pathlib.Path, state: LazyState, progress: io.Progress | None = None,
                      *, use_torch: bool | None = None) -> None:
    """``pytorch_model.bin``: with torch installed, ``torch.save`` of the tensors (one at a time into
    the archive); otherwise vitx's own writer of the same zip format."""
    if use_torch is None:
        try:
            import torch  # noqa: F401
            use_torch = True
        except ImportError:
            use_torch = False
    if not use_torch:
        io.write_torch_zip(path, state, progress)
        return
    import collections

    import torch

    tensors: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for key, lazy in state.items():
        array = np.array(lazy.materialize())  # own, writable copy: torch.from_numpy shares it
        if array.dtype.name == "bfloat16":
            tensors[key] = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(array)
        if progress:
            progress(lazy.nbytes)
    torch.save(tensors, path)


def save_config(config: ViTConfig, directory: pathlib.Path, state_keys: set[str]) -> None:
    """config.json with ``architectures`` matching the weights' task."""
    from .base import architecture_of, task_of

    data = config.to_dict()
    data["architectures"] = [architecture_of(task_of(state_keys))]
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
