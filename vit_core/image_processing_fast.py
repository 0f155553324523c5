"""ViTImageProcessorFast: the ViT image processor as batched torch operations.

Same options, interface and preprocessor_config.json as ViTImageProcessor, and the same input
preparation (channel inference, RGB conversion, the uint8 rule for float images); the resize,
rescale and normalize run on torch tensors, batched over images of the same size, on ``device``.

Resize: Pillow's separable algorithm on float pixels: the width pass, stored as 8-bit values,
then the height pass, stored again; each pass is ``torch.nn.functional.interpolate(...,
antialias=True)``, whose antialiased bilinear / bicubic kernels are Pillow's (support scaled by
the shrink factor, cubic a = -0.5). NEAREST gathers exactly the pixels Pillow picks. What remains
is one 8-bit level at some pixels (float32 vs Pillow's fixed-point weights, and the pass order
Pillow >= 12 picks for some shapes); the bound promised is max |diff| 0.1 and mean |diff| 5e-3
after normalisation. Pillow's premultiplied-alpha resize of RGBA images (only reachable with
do_convert_rgb=False) is not reproduced. torchvision is not used.

torch is imported inside the methods only: ``import vit_core`` never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .image_processing import (
    CHANNELS_FIRST,
    RESAMPLE_NAMES,
    BaseViTImageProcessor,
    BatchFeature,
    ImageInput,
    ProcessingOptions,
    _per_channel,
    to_uint8_for_resize,
)

# Pillow filter -> torch interpolate mode (antialiased). NEAREST is not interpolated: it gathers
# the source pixels Pillow picks (see _pillow_nearest_indices).
_TORCH_MODES: dict[int, str] = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _pillow_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel in Pillow's NEAREST resize, exactly.

    Pillow (ImagingScaleAffine) starts at 0.5 * scale and adds scale once per output pixel in
    float64, truncating each sum; the running sum reaches integers a hair above or below where
    torch's "nearest-exact" (floor((i + 0.5) * scale)) does, which moves whole rows and columns.
    ``np.add.accumulate`` adds sequentially, so it reproduces Pillow's sums bit for bit.
    """
    scale = size_in / size_out
    steps = np.full(size_out, scale)
    steps[0] = scale * 0.5
    return np.minimum(np.add.accumulate(steps).astype(np.int64), size_in - 1)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError("ViTImageProcessorFast needs PyTorch, which is not installed: pip install vitx[torch]") from e
    return torch


def _to_8bit(pixels: Any) -> Any:
    """Pillow's 8-bit store: round half up (its fixed-point ``+ 0.5`` then shift), clip to [0, 255]."""
    return pixels.add_(0.5).floor_().clamp_(0, 255)


def _resize_two_pass(functional: Any, pixels: Any, height: int, width: int, mode: str) -> Any:
    """(n, C, H, W) float pixels -> (n, C, height, width) as Pillow's separable resize.

    Pillow resizes the width first, stores that pass as 8-bit pixels, then resizes the height
    (ImagingResampleInner); each axis is one antialiased torch interpolation here, with the same
    8-bit store after each. (Pillow >= 12 runs the height pass first when the height shrinks much
    more than the width; this keeps the classic order, which moves a few pixels by one level.)
    """
    if pixels.shape[3] != width:
        pixels = _to_8bit(functional.interpolate(
            pixels, size=(pixels.shape[2], width), mode=mode, align_corners=False, antialias=True
        ))
    if pixels.shape[2] != height:
        pixels = _to_8bit(functional.interpolate(
            pixels, size=(height, width), mode=mode, align_corners=False, antialias=True
        ))
    return pixels


class ViTImageProcessorFast(BaseViTImageProcessor):
    """ViTImageProcessor with torch batched operations; ``device`` picks where they run.

    ``device`` (constructor or call argument, e.g. "cuda"): where the tensors are processed and
    where ``pixel_values`` is returned for ``return_tensors=None`` / "pt". It is not an option of
    preprocessor_config.json and is not saved.
    """

    def __init__(self, *args: Any, device: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = device

    def preprocess(
        self,
        images: ImageInput,
        *,
        do_resize: bool | None = None,
        size: Any = None,
        resample: Any = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        return_tensors: Any = None,
        data_format: Any = CHANNELS_FIRST,
        input_data_format: Any = None,
        device: Any = None,
    ) -> BatchFeature:
        """Images -> ``BatchFeature(pixel_values=...)``, as ``ViTImageProcessor.preprocess``.

        ``pixel_values``: (batch, channels, height, width) float32; a torch tensor on ``device``
        for ``return_tensors=None`` or "pt", otherwise numpy / tf / jax as asked. With
        ``do_resize=False`` and images of different sizes, ``return_tensors=None`` gives a list
        of (channels, height, width) tensors.
        """
        torch = _import_torch()
        options = self._resolve_options(
            do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
            do_convert_rgb, data_format, input_data_format,
        )
        target = torch.device(device if device is not None else self.device if self.device is not None else "cpu")
        arrays = self._prepare(images, options)

        # Group images of the same (H, W, C) so each group is one batched tensor operation.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault(array.shape, []).append(index)
        outputs: list[Any] = [None] * len(arrays)
        for indices in groups.values():
            batch = self._process_group(torch, [arrays[i] for i in indices], options, target)  # (n, C, H, W)
            if options.data_format != CHANNELS_FIRST:
                batch = batch.permute(0, 2, 3, 1)
            for i, image in zip(indices, batch):
                outputs[i] = image

        if len({tuple(image.shape) for image in outputs}) == 1:
            pixel_values: Any = torch.stack(outputs).contiguous()
        else:
            pixel_values = outputs
        return BatchFeature(pixel_values=self._convert(pixel_values, return_tensors))

    @staticmethod
    def _process_group(torch: Any, arrays: list[np.ndarray], options: ProcessingOptions, device: Any) -> Any:
        """n images of one (H, W, C) shape -> (n, C, height, width) float32 on ``device``."""
        channels = arrays[0].shape[-1]
        if options.do_resize:
            if options.resample not in _TORCH_MODES:
                raise ValueError(
                    f"ViTImageProcessorFast resizes with NEAREST (0), BILINEAR (2) or BICUBIC (3); resample="
                    f"{options.resample} ({RESAMPLE_NAMES[options.resample]}) needs ViTImageProcessor"
                )
            converted = [to_uint8_for_resize(array) for array in arrays]
            # Move uint8 to the device (a quarter of the float32 bytes), then compute in float32.
            pixels = torch.from_numpy(np.stack([c[0] for c in converted])).to(device)
            pixels = pixels.permute(0, 3, 1, 2).float()  # (n, C, H, W)
            mode = _TORCH_MODES[options.resample]
            height, width = options.size["height"], options.size["width"]
            if mode == "nearest":
                rows = torch.from_numpy(_pillow_nearest_indices(pixels.shape[2], height)).to(device)
                cols = torch.from_numpy(_pillow_nearest_indices(pixels.shape[3], width)).to(device)
                batch = pixels.index_select(2, rows).index_select(3, cols)
            else:
                batch = _resize_two_pass(torch.nn.functional, pixels, height, width, mode)
            # Images that came as floats in [0, 1] go back to that range (see to_uint8_for_resize).
            scaled_up = torch.tensor([c[1] for c in converted], device=device)
            if bool(scaled_up.any()):
                batch = torch.where(scaled_up[:, None, None, None], batch * (1 / 255), batch)
        else:
            stacked = np.stack(arrays)
            if not np.issubdtype(stacked.dtype, np.floating):
                stacked = stacked.astype(np.float32)
            batch = torch.from_numpy(stacked).to(device).permute(0, 3, 1, 2).float()
        if options.do_rescale:
            batch = batch * options.rescale_factor
        if options.do_normalize:
            mean = torch.tensor(_per_channel(options.image_mean, channels, "image_mean"), dtype=torch.float32, device=device)
            std = torch.tensor(_per_channel(options.image_std, channels, "image_std"), dtype=torch.float32, device=device)
            batch = (batch - mean[:, None, None]) / std[:, None, None]
        return batch

    @staticmethod
    def _convert(pixel_values: Any, return_tensors: Any) -> Any:
        kind = getattr(return_tensors, "value", return_tensors)
        if kind in (None, "pt"):
            if kind == "pt" and isinstance(pixel_values, list):
                shapes = sorted({tuple(p.shape) for p in pixel_values})
                raise ValueError(
                    f"the processed images have different shapes {shapes} and cannot form one batch for "
                    "return_tensors='pt'; resize them (do_resize=True) or use return_tensors=None for a list"
                )
            return pixel_values
        from .image_processing import convert_to_tensors

        if isinstance(pixel_values, list):
            return convert_to_tensors([p.cpu().numpy() for p in pixel_values], kind)
        return convert_to_tensors(pixel_values.cpu().numpy(), kind)


__all__ = ["ViTImageProcessorFast"]
