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

from .checkpoint import files, staging
from .checkpoint.fit import LoadReport, check_config_fits, drop_unused_qkv_bias, match_state_to_model
from .checkpoint.hub import resolve_pretrained
from .checkpoint.lazy import materialize
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
    lazy = files.read_lazy_state(location)
    check_config_fits(lazy, config, str(location))  # before a table is built from the config
    state = drop_unused_qkv_bias(lazy, config.qkv_bias)
    table: list[WeightSpec] = table_fn(config)
    expected = {spec.name: spec.shape for spec in table}
    state, report = match_state_to_model(
        state, expected, prefix="vit", allowed_missing=HEAD_KEYS[task],
        allowed_unexpected_patterns=FOREIGN_HEAD_PATTERNS, ignore_mismatched_sizes=ignore_mismatched_sizes,
        source=str(location),
    )
    with files.reading(location, "checkpoint"):
        return config, materialize(state), report


def save_pretrained(
    config: ViTConfig,
    state: dict[str, np.ndarray],
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
) -> pathlib.Path:
    """Write config.json + model.safetensors (canonical names, PyTorch layouts) as one atomic step.

    Everything is written into a staging directory beside ``save_directory`` and swapped in at
    once (``staging.staged_dir``): a reader, or a crash at any moment, sees the complete old
    checkpoint or the complete new one, never new weights with an old config. Other files of an
    existing directory (a README, training checkpoints) are carried over; weight files of the other
    layout (a single file vs shards) are not. Where the directory cannot be swapped (it is the
    working directory or a mount point) each file is replaced atomically on its own, weights first.
    Write failures (disk full, read-only) raise CheckpointError naming the directory.
    """
    directory = pathlib.Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
    size = _parse_size(max_shard_size)
    if directory.is_dir() and not staging.swappable(directory):
        return _save_file_by_file(config, state, directory, size)

    def keep(name: str) -> bool:  # what the new version carries over from the old
        return name != CONFIG_NAME and not files.is_safetensors_weights(name)

    with staging.staged_dir(directory, force=True, replace_anything=True, keep=keep) as temp:
        with files.writing(directory):
            files.write_shards(temp, state, max_shard_size=size)
            (temp / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
    return directory


def _save_file_by_file(config: ViTConfig, state: dict[str, np.ndarray], directory: pathlib.Path,
                       max_shard_size: int | None) -> pathlib.Path:
    """The fallback of :func:`save_pretrained` for a directory that cannot be swapped: each file
    replaced atomically, weights first, then the config."""
    files.save_state_dict(state, directory, max_shard_size=max_shard_size)
    staging.write_text(directory / CONFIG_NAME, config.to_json_string())
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
