"""transformers 4.x checkpoints in all their files (docs/FORMATS.md sections 1-4), through vit_core's
checkpoint layer.

Reading is ``vit_core.checkpoint.files.read_lazy_state`` (every container, sharded or not, with
the declared PyTorch 5.9+ / TF / Flax name rules); the config is the ``config.json`` beside the
weights, or derived from the weights with the standard size table when there is none. Writing
is ``files.write_weights``: canonical safetensors, ``pytorch_model.bin`` (torch's zip format),
``tf_model.h5`` and ``flax_model.msgpack`` in the names and layouts transformers 4.57 loads.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

from vit_core import ViTConfig
from vit_core.checkpoint import CheckpointError, files, fit, names
from vit_core.checkpoint.lazy import LazyState

from .base import STANDARD_HEADS, Loaded, architecture_of, check_against_table, derive_config, task_of

NAME = "transformers"

_CANONICAL = re.compile(
    r"^(vit\.)?(embeddings\.|encoder\.layer\.\d+\.|layernorm\.|pooler\.)|^classifier\.|^decoder\.0\."
)
_QKV_BIAS = re.compile(r"attention\.attention\.(query|key|value)\.bias$")

# Target name -> (weights file name, flavour of files.write_weights).
TARGETS: dict[str, tuple[str, str]] = {
    "safetensors": ("model.safetensors", "safetensors"),
    "pytorch": ("pytorch_model.bin", "pytorch"),
    "tf": ("tf_model.h5", "tf"),
    "flax": ("flax_model.msgpack", "flax"),
}


def looks_canonical(keys: Any) -> bool:
    """Canonical names (4.x or 5.9+ spelling) for every key."""
    keys = list(names.to_legacy_names(dict.fromkeys(keys)))
    return bool(keys) and all(_CANONICAL.match(k) for k in keys)


def detect(kind: str, raw: LazyState | None, flavour: str | None) -> bool:
    """A transformers checkpoint: an h5 / msgpack / index file, or a file (already read, in its own
    names and ``flavour``) whose names are PyTorch / TF / Flax ones."""
    if kind in ("h5", "msgpack", "index"):
        return True
    if raw is None or flavour is None:
        return False
    try:
        return looks_canonical(names.to_canonical(raw, flavour))
    except CheckpointError:
        return False


def read(weights: pathlib.Path, config_path: pathlib.Path | None, where: str, raw: LazyState | None = None,
         flavour: str | None = None) -> Loaded:
    """The checkpoint in canonical names with its config; ``raw`` / ``flavour``: the file already read
    by detection (it is not read again)."""
    if raw is not None and flavour is not None:
        try:
            state = names.to_canonical(raw, flavour)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
    else:
        state = files.read_lazy_state(weights)
    notes: list[str] = []
    if config_path is not None and config_path.is_file():
        try:
            config = ViTConfig.from_json_file(config_path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    else:
        p = "vit." if any(k.startswith("vit.") for k in state) else ""
        hidden = state[f"{p}embeddings.cls_token"].shape[-1] if f"{p}embeddings.cls_token" in state else 0
        heads = STANDARD_HEADS.get(hidden)
        if heads is None:
            raise CheckpointError(f"{where}: no config.json beside the weights, and hidden size {hidden} is not a "
                                  "standard ViT size: the number of heads is unknown")
        config = derive_config(state, heads=heads, where=where)
        notes.append(f"no config.json: config derived from the weights ({heads} heads from the standard size table; "
                     "transformers' defaults layer_norm_eps=1e-12, hidden_act='gelu')")
    fit.check_config_fits(state, config, where)
    if not config.qkv_bias:
        dropped = [k for k in state if _QKV_BIAS.search(k)]
        if dropped:
            notes.append(f"config.qkv_bias is False: dropped {len(dropped)} q/k/v biases (TF checkpoints carry them)")
            state = {k: v for k, v in state.items() if k not in dropped}
    check_against_table(state, config, where)
    return Loaded(NAME, state, config, notes, where)


def write(path: pathlib.Path, state: LazyState, target: str, progress: Any = None) -> None:
    """One weights file of ``target`` (a key of :data:`TARGETS`) into a staging directory."""
    files.write_weights(path, state, TARGETS[target][1], progress)


def save_config(config: ViTConfig, directory: pathlib.Path, state_keys: set[str]) -> None:
    """config.json with ``architectures`` matching the weights' task."""
    data = config.to_dict()
    data["architectures"] = [architecture_of(task_of(state_keys))]
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
