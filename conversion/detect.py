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

from vit_core.checkpoint import CheckpointError, CheckpointNotFoundError, files, resolve_pretrained
from vit_core.checkpoint.files import WEIGHT_FILES
from vit_core.checkpoint.lazy import LazyState, materialize
from vit_core.config import ViTConfig

from .formats import FORMATS, Source, identify
from .formats.base import Loaded

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
    kind = files.detect_kind(weights)
    config_path, timm_config = _config_beside(weights)
    raw, flavour = _raw_state(weights, kind)
    source = Source(weights, kind, raw, flavour, config_path, timm_config, timm_model_name)
    loaded = identify(source)
    if loaded is not None:
        return loaded
    first = ", ".join(sorted(source.raw or ())[:8])
    candidates = " nor ".join(f.name for f in FORMATS if kind in f.containers)
    raise CheckpointError(f"{source.where}: a {kind} file, but neither {candidates} names (unknown format); "
                          f"first keys: {first}")


def _raw_state(weights: pathlib.Path, kind: str) -> tuple[LazyState | None, str | None]:
    """(the file's tensors in its own names, the transformers flavour of those names) for the
    containers foreign formats come in, read once for detection and reading alike."""
    if kind == "npz":
        return files.container(kind).read_lazy(weights), None
    if kind in ("safetensors", "torch", "torch_legacy"):
        return files.read_raw(weights, kind)
    return None, None


def load_checkpoint(src: str | os.PathLike, *, timm_model_name: str | None = None,
                    **hub_options: Any) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """Any supported checkpoint -> (canonical state as numpy arrays, ViTConfig).

    The state has transformers 4.x PyTorch names and layouts (``vit.``-prefixed for task models);
    the config is read from a config.json or derived from the weights, with layer_norm_eps and
    hidden_act set for the source (timm: 1e-6 / exact GELU; JAX and big_vision: 1e-6 / tanh GELU).
    """
    loaded = open_checkpoint(src, timm_model_name=timm_model_name, **hub_options)
    return materialize(loaded.state), loaded.config
