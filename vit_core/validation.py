"""Input checks and small decisions shared by the three frameworks' forward passes.

Each framework calls these with plain Python values (shapes, dtype kinds), so the error
messages, and the rules behind them, are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import ViTConfig

# Single-label classification targets equal to this are skipped by the loss (torch's ignore_index).
IGNORE_INDEX = -100


def check_pixel_values(shape: Sequence[int], is_floating: bool, config: ViTConfig, interpolate_pos_encoding: bool) -> tuple[int, int]:
    """Validate a (batch, channels, height, width) input; returns its patch grid (gh, gw)."""
    if len(shape) != 4:
        raise ValueError(
            f"pixel_values must have rank 4 (batch, channels, height, width), got rank {len(shape)} with shape {tuple(shape)}"
        )
    if not is_floating:
        raise ValueError("pixel_values must be a floating-point tensor (float32, bfloat16 or float16); "
                         "convert uint8 images with ViTImageProcessor first")
    # the batch size is never read, and a height / width that is no plain integer (a symbolic size
    # while torch.export traces a dynamic-size export) stays symbolic: int() would specialise it
    _, channels, height, width = shape
    channels, height, width = int(channels), _dim(height), _dim(width)
    if channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels in dimension 1, but the configuration expects "
            f"num_channels={config.num_channels} (inputs are NCHW: batch, channels, height, width)"
        )
    ph, pw = config.patch_hw
    if not interpolate_pos_encoding and (height, width) != config.image_hw:
        h, w = config.image_hw
        raise ValueError(
            f"Input image size ({height}*{width}) doesn't match model ({h}*{w}); "
            f"pass interpolate_pos_encoding=True to run at another size"
        )
    if height < ph or width < pw:
        raise ValueError(f"pixel_values of size {height}x{width} is smaller than one {ph}x{pw} patch")
    return height // ph, width // pw


def _dim(size: object) -> object:
    return int(size) if isinstance(size, (int, np.integer)) else size


def check_bool_masked_pos(shape: Sequence[int], batch: int, num_patches: int) -> None:
    if tuple(int(s) for s in shape) != (batch, num_patches):
        raise ValueError(f"bool_masked_pos must have shape (batch, num_patches) = ({batch}, {num_patches}), got {tuple(shape)}")


def check_head_mask(shape: Sequence[int], config: ViTConfig) -> None:
    shape = tuple(int(s) for s in shape)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if shape not in ((heads,), (layers, heads)):
        raise ValueError(f"head_mask must have shape (num_heads,) = ({heads},) or (num_layers, num_heads) = "
                         f"({layers}, {heads}), got {shape}")


def check_mim(config: ViTConfig) -> None:
    """SimMIM reconstructs one patch per token only when patch_size == encoder_stride."""
    ph, pw = config.patch_hw
    if ph != pw or ph != config.encoder_stride:
        raise ValueError(
            "When `bool_masked_pos` is provided, `patch_size` must be equal to `encoder_stride` so the "
            f"reconstruction has the input's size. Got `patch_size` = {config.patch_size} and "
            f"`encoder_stride` = {config.encoder_stride}."
        )


def problem_type(config: ViTConfig, labels_are_integer: bool) -> str:
    """transformers' inference of the loss when config.problem_type is unset."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels_are_integer:
        return "single_label_classification"
    return "multi_label_classification"


def check_class_labels(labels: np.ndarray | Sequence[int], num_labels: int) -> None:
    """Single-label classification targets: each a class index in [0, num_labels), or IGNORE_INDEX
    (-100, skipped by the loss). Any other value is a ValueError naming it and num_labels."""
    flat = np.asarray(labels).reshape(-1)
    bad = flat[(flat != IGNORE_INDEX) & ((flat < 0) | (flat >= num_labels))]
    if bad.size:
        raise ValueError(f"labels must be class indices in [0, {num_labels}) for num_labels={num_labels}, "
                         f"or {IGNORE_INDEX} to ignore an example; got label {int(bad[0])}")
