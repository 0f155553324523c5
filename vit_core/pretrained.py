"""from_pretrained / save_pretrained logic shared by the three frameworks.

A framework only turns the canonical numpy state returned here into its parameters (by kind, see
each framework's weights.py), and hands its parameters back as canonical numpy arrays to save.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import numpy as np

from .checkpoint_io import (
    LoadReport,
    drop_unused_qkv_bias,
    match_state_to_model,
    read_state_dict,
    resolve_pretrained,
    save_state_dict,
)
from .config import CONFIG_NAME, ViTConfig
from .weights import FOREIGN_HEAD_PATTERNS, HEAD_KEYS, Task, WeightSpec

logger = logging.getLogger("vitx")


def load_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    task: Task,
    table_fn: Any,
    *,
    config: ViTConfig | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    ignore_mismatched_sizes: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> tuple[ViTConfig, dict[str, np.ndarray], LoadReport]:
    """Resolve a directory, file or hub id; read its config and weights; fit them to the model.

    ``table_fn(config) -> list[WeightSpec]`` gives the model's canonical table once the config is
    known (so ``num_labels=...`` overrides shape the head). Returns (config, state, report): the
    state holds only keys of the table with matching shapes; keys the model must initialise itself
    (heads absent from the checkpoint, mismatched heads with ignore_mismatched_sizes) are in
    ``report.missing`` / ``report.mismatched``.
    """
    location = resolve_pretrained(
        pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
        local_files_only=local_files_only,
    )
    directory = location if location.is_dir() else location.parent
    if config is None:
        config = ViTConfig.from_json_file(directory / CONFIG_NAME, **(config_overrides or {}))
    elif config_overrides:
        config = ViTConfig.from_dict(config.to_dict(), **config_overrides)
    state = read_state_dict(location)
    state = drop_unused_qkv_bias(state, config.qkv_bias)
    table: list[WeightSpec] = table_fn(config)
    expected = {spec.name: spec.shape for spec in table}
    state, report = match_state_to_model(
        state, expected, prefix="vit", allowed_missing=HEAD_KEYS[task],
        allowed_unexpected_patterns=FOREIGN_HEAD_PATTERNS, ignore_mismatched_sizes=ignore_mismatched_sizes,
        source=str(location),
    )
    return config, state, report


def save_pretrained(
    config: ViTConfig,
    state: dict[str, np.ndarray],
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
) -> pathlib.Path:
    """Write config.json + model.safetensors (canonical names, PyTorch layouts) atomically."""
    directory = pathlib.Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(state, directory, max_shard_size=_parse_size(max_shard_size))
    config.save_pretrained(directory)
    return directory


def _parse_size(size: int | str | None) -> int | None:
    """'5GB', '200MB', 10_000 -> bytes (transformers' max_shard_size spelling)."""
    if size is None or isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or a number of bytes")
