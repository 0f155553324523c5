"""Find out what a checkpoint is from its contents (never its name) and read it into canonical form.

Sources: a transformers directory, file or hub id in any of its formats; a timm ViT state dict
(``.pth`` / ``.bin`` through the restricted unpickler, ``.safetensors``); an original Google JAX
``.npz``; a big_vision ``.npz``. npz files are read with ``allow_pickle=False`` semantics (object
arrays refused), torch files with vit_core's restricted unpickler: loading a checkpoint never runs
code from it.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from vit_core import ViTConfig
from vit_core.checkpoint_io import (
    WEIGHT_FILES,
    CheckpointError,
    CheckpointNotFoundError,
    resolve_pretrained,
    to_legacy_names,
)

from . import io
from .formats import big_vision, jax_npz, timm
from .formats import transformers as hf
from .formats.base import Loaded
from .rules import materialize

# Weight files of other tools looked for in a directory when it has no transformers weights file.
_OTHER_WEIGHTS = ("*.safetensors", "*.npz", "*.pth", "*.pt", "*.bin")


def _weights_in(directory: pathlib.Path) -> pathlib.Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted({p for pattern in _OTHER_WEIGHTS for p in directory.glob(pattern) if p.is_file()})
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointNotFoundError(f"{directory}: no weights file found (looked for {', '.join(WEIGHT_FILES)}, "
                                      f"{', '.join(_OTHER_WEIGHTS)})")
    raise CheckpointError(f"{directory}: several weight files ({', '.join(p.name for p in candidates)}); name one")


def _file_kind(path: pathlib.Path) -> str:
    """npz, safetensors, torch, h5, msgpack or index, from the first bytes."""
    if io.is_npz(path):
        return "npz"
    from vit_core.checkpoint_io import detect_kind

    return detect_kind(path)


def _config_beside(weights: pathlib.Path) -> tuple[pathlib.Path | None, dict[str, Any] | None]:
    """(transformers config.json, timm hub config) next to a weights file; at most one is set."""
    path = weights.parent / "config.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and "architecture" in data:
        return None, data
    if isinstance(data, dict) and data.get("model_type", "vit") == "vit":
        return path, None
    return None, None


def open_checkpoint(src: str | os.PathLike, *, timm_model_name: str | None = None, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                    local_files_only: bool = False) -> Loaded:
    """Read any supported checkpoint into canonical names, lazily (memory-mapped where possible).

    ``src``: a directory, a weights file, or a hub id (fetched with huggingface_hub into its cache).
    Returns a :class:`~conversion.formats.base.Loaded` with the lazy canonical state, the derived
    config and notes on every decision taken. Raises ``CheckpointError`` (a ValueError) naming the
    file and the problem for unknown, truncated or unsupported checkpoints.
    """
    path = pathlib.Path(src).expanduser()
    if not path.exists():
        path = resolve_pretrained(str(src), revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only)
    weights = _weights_in(path) if path.is_dir() else path
    where = str(weights)
    kind = _file_kind(weights)
    config_path, timm_config = _config_beside(weights)

    if kind == "npz":
        raw = io.read_npz_lazy(weights)
        keys = set(raw)
        layout = big_vision.detect(keys)
        if layout is not None:
            return big_vision.read(raw, layout, where)
        layout = jax_npz.detect(keys)
        if layout is not None:
            return jax_npz.read(raw, layout, where)
        raise CheckpointError(f"{where}: an npz file, but neither an original JAX ViT nor a big_vision ViT "
                              f"(no embedding/kernel with Transformer/posembed_input or pos_embedding); "
                              f"first keys: {', '.join(sorted(keys)[:8])}")

    if kind == "safetensors":
        header, _, _ = io.read_safetensors_header(weights)
        keys = set(header)
        if timm.detect(keys) is not None:
            raw, _ = io.read_safetensors_lazy(weights)
            return _read_timm(raw, weights, where, timm_model_name, timm_config, config_path)
    elif kind == "torch":
        from vit_core.checkpoint_io import read_raw_state_dict

        raw_arrays, _ = read_raw_state_dict(weights)
        keys = set(raw_arrays)
        if timm.detect(keys) is not None:
            from .rules import lazify

            return _read_timm(lazify(raw_arrays), weights, where, timm_model_name, timm_config, config_path)
        if not hf.looks_canonical(set(to_legacy_names(dict.fromkeys(keys)))):
            raise CheckpointError(f"{where}: a torch state dict, but neither timm nor transformers ViT names; "
                                  f"first keys: {', '.join(sorted(keys)[:8])}")
    elif kind == "torch_legacy":
        from vit_core.checkpoint_io import read_state_dict

        read_state_dict(weights)  # raises checkpoint_io's explanation
    if kind in ("safetensors", "torch", "h5", "msgpack", "index"):
        if kind == "safetensors" and not hf.looks_canonical(set(header)):
            raise CheckpointError(f"{where}: a safetensors file with neither timm nor transformers ViT names "
                                  f"(unknown format); first keys: {', '.join(sorted(header)[:8])}")
        return hf.read(weights, config_path, where)
    raise CheckpointError(f"{where}: unrecognised checkpoint format ({kind})")


def _read_timm(raw: Any, weights: pathlib.Path, where: str, timm_model_name: str | None,
               timm_config: dict[str, Any] | None, config_path: pathlib.Path | None) -> Loaded:
    layout = timm.detect(set(raw))
    assert layout is not None
    heads_hint = None
    if config_path is not None:
        try:
            heads_hint = ViTConfig.from_json_file(config_path).num_attention_heads
        except ValueError:
            heads_hint = None
    return timm.read(raw, layout, where, timm_model_name=timm_model_name, timm_config=timm_config,
                     heads_hint=heads_hint)


def load_checkpoint(src: str | os.PathLike, *, timm_model_name: str | None = None,
                    **hub_options: Any) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """Any supported checkpoint -> (canonical state as numpy arrays, ViTConfig).

    The state has transformers 4.x PyTorch names and layouts (``vit.``-prefixed for task models);
    the config is read from a config.json or derived from the weights, with layer_norm_eps and
    hidden_act set for the source (timm: 1e-6 / exact GELU; JAX and big_vision: 1e-6 / tanh GELU).
    """
    loaded = open_checkpoint(src, timm_model_name=timm_model_name, **hub_options)
    return materialize(loaded.state), loaded.config
