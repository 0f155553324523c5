"""Image inputs and the numeric steps of ViT preprocessing, on numpy + Pillow.

The functions the image processors (``image_processing``, ``image_processing_fast``) are built
from: reading any image-like input as an (height, width, channels) array, the uint8 round trip
Pillow's resize needs, Pillow resizing, rescaling and normalisation with transformers' exact
arithmetic (see the docstring of ``image_processing`` for the order of the steps).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"

# Channel counts an array may carry (grayscale, RGB, RGBA). Inference tries transformers' own
# set (1, 3) first so every shape it accepts is read the same way; 4 (RGBA) comes after.
_INFERABLE_CHANNELS: tuple[tuple[int, ...], ...] = ((1, 3), (4,))

# Modes whose values can exceed 255: Pillow's convert("RGB") clips them (16-bit, 32-bit, float).
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | tf.Tensor | jax.Array
ImageInput = Union[ImageLike, Sequence[ImageLike]]


# --------------------------------------------------------------------------------------------- inputs
def to_numpy_image(image: Any) -> np.ndarray:
    """Read one array-like image as numpy without importing any framework.

    Frameworks are recognised by the module of the array's type (duck typing), so a framework
    that is not installed is never imported here.
    """
    if isinstance(image, np.ndarray):
        return image
    module = type(image).__module__ or ""
    if module.startswith("torch"):
        tensor = image.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            tensor = tensor.float()
        return tensor.numpy()
    if module.startswith("tensorflow"):
        return image.numpy()
    if module.startswith(("jax", "jaxlib")):
        return np.asarray(image)
    raise ValueError(
        f"unsupported image type {type(image).__module__}.{type(image).__qualname__}: expected a "
        "PIL image, a numpy array, a torch / tf tensor or a jax array (or a list of them)"
    )


def _check_dtype(array: np.ndarray) -> None:
    if array.dtype == np.bool_:
        raise ValueError("boolean images are not supported (dtype bool): convert them to uint8 (0 and 255) first")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"complex images are not supported (dtype {array.dtype}): pass real uint8 or float pixels")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"unsupported image dtype {array.dtype}: expected an integer (uint8) or float dtype")


def infer_channel_dimension_format(image: np.ndarray) -> str:
    """Return "channels_first" or "channels_last" for a (C, H, W) or (H, W, C) array.

    transformers' rule: if the first axis has 1 or 3 entries the image is channels-first (also
    when the last axis does too: (3, H, 3) is read as channels-first), else if the last axis has 1
    or 3 it is channels-last. RGBA (4) is then tried the same way.
    """
    if image.ndim != 3:
        raise ValueError(f"cannot infer the channel axis of an array with {image.ndim} dimensions (shape {image.shape})")
    first, last = image.shape[0], image.shape[-1]
    for counts in _INFERABLE_CHANNELS:
        if first in counts:
            return CHANNELS_FIRST
        if last in counts:
            return CHANNELS_LAST
    raise ValueError(
        f"cannot infer the channel axis of an image of shape {tuple(image.shape)}: expected 1 (grayscale), "
        "3 (RGB) or 4 (RGBA) channels in the first or the last axis; pass input_data_format="
        "'channels_first' or 'channels_last' if the shape is ambiguous"
    )


def _flatten_images(images: ImageInput) -> list[Any]:
    """One image, a list of images, nested lists, or (batch, ...) 4-D arrays -> a flat list.

    A 2-D or 3-D array is one image; a 4-D array is a batch (as transformers reads them).
    Arrays come back as numpy, PIL images unchanged.
    """
    flat: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, Image.Image):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
        elif item is None:
            raise ValueError("got None where an image was expected")
        else:
            array = to_numpy_image(item)
            if array.ndim == 4:
                flat.extend(array)
            elif array.ndim in (2, 3):
                flat.append(array)
            else:
                raise ValueError(
                    f"an image must have 2 (height, width) or 3 (channels with height, width) dimensions, "
                    f"or 4 for a batch (batch, ...); got {array.ndim} dimensions with shape {tuple(array.shape)}"
                )

    visit(images)
    if not flat:
        raise ValueError("no images given: the input is empty (an empty list or a batch of 0 images)")
    return flat


def _warn_if_clipped(image: Image.Image) -> None:
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        high = image.getextrema()[1]  # these modes have one band: (min, max)
        if high > 255:
            warnings.warn(
                f"a {image.mode!r} image with values up to {high} is converted with Pillow's convert('RGB'), "
                "which clips values above 255 (transformers' do_convert_rgb=True does the same); scale it "
                "to 8 bits first to keep its contrast",
                UserWarning,
                stacklevel=4,
            )


def _pil_to_array(image: Image.Image, convert_rgb: bool) -> np.ndarray:
    """A PIL image -> (H, W, C). With ``convert_rgb`` every mode goes through convert("RGB")."""
    if convert_rgb:
        if image.mode != "RGB":
            _warn_if_clipped(image)
            image = image.convert("RGB")
    elif image.mode == "1":  # numpy reads 1-bit images as bool; keep one channel as 0 / 255
        image = image.convert("L")
    elif image.mode in ("P", "PA"):  # palette indices are not pixels: keep the palette's own channels
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def prepare_image(image: Any, convert_rgb: bool = True, input_data_format: str | None = None) -> np.ndarray:
    """One image (PIL or array-like) -> an (height, width, channels) numpy array, dtype unchanged.

    With ``convert_rgb`` (the default; ``do_convert_rgb=False`` turns it off) the result has three
    channels: PIL images through ``convert("RGB")``, arrays by repeating a grayscale channel and
    dropping an alpha channel, which is what ``convert("RGB")`` does for "L" and "RGBA".
    """
    if isinstance(image, Image.Image):
        array = _pil_to_array(image, convert_rgb)
    else:
        array = to_numpy_image(image)
        _check_dtype(array)
        if array.ndim == 2:  # (height, width) grayscale
            array = array[:, :, None]
        elif array.ndim == 3:
            data_format = _channel_format(input_data_format) or infer_channel_dimension_format(array)
            if data_format == CHANNELS_FIRST:
                array = array.transpose(1, 2, 0)
        else:
            raise ValueError(
                f"an image must have 2 (height, width) or 3 (channels with height, width) dimensions; "
                f"got {array.ndim} dimensions with shape {tuple(array.shape)}"
            )
        if convert_rgb:
            channels = array.shape[-1]
            if channels == 1:
                array = np.repeat(array, 3, axis=-1)
            elif channels == 4:
                array = array[:, :, :3]
            elif channels != 3:
                raise ValueError(
                    f"an image with {channels} channels cannot be converted to RGB: expected 1 (grayscale), "
                    "3 (RGB) or 4 (RGBA) channels; pass do_convert_rgb=False to keep other channel counts"
                )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"an image has zero height or width (shape {tuple(array.shape)} as height, width, channels)")
    return array


def to_uint8_for_resize(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(H, W, C) image -> (uint8 image, whether it was scaled up from [0, 1] by 255).

    transformers' rule for handing a numpy image to Pillow (``_rescale_for_pil_conversion``):
    uint8 as is; whole numbers in [0, 255] cast; floats in [0, 1] become
    ``uint8(float32(float64(x) * 255))``, a truncation, not a rounding. Anything else raises,
    naming the range found. One extension: non-whole floats within [0, 255] (which transformers
    refuses) are rounded to the nearest integer.
    """
    if image.dtype == np.uint8:
        return image, False
    _check_dtype(image)
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError("the image contains NaN or infinite values")
    low, high = image.min().item(), image.max().item()
    if np.issubdtype(image.dtype, np.integer):
        if low >= 0 and high <= 255:
            return image.astype(np.uint8), False
        raise ValueError(
            f"integer image values must lie in [0, 255] to be resized as 8-bit pixels; got the range "
            f"[{low}, {high}] (dtype {image.dtype}); scale 16-bit data to 8 bits first"
        )
    # Whole numbers first, as transformers does: a float image holding only 0.0 and 1.0 is read as
    # 8-bit values 0 and 1, not as a [0, 1] image.
    if low >= 0 and high <= 255 and np.allclose(image, image.astype(np.int64)):
        return image.astype(np.uint8), False
    if low >= 0 and high <= 1:
        return (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    if low >= 0 and high <= 255:
        return np.rint(image).astype(np.uint8), False
    raise ValueError(
        f"float image values must lie in [0, 1] or in [0, 255]; got the range [{low}, {high}] "
        f"(dtype {image.dtype})"
    )


def resize_with_pillow(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8 by Pillow's ``Image.resize``.

    One channel goes through an "L" image, two through "LA", three "RGB", four "RGBA" (Pillow
    resizes "LA" / "RGBA" with premultiplied alpha), as transformers' ``to_pil_image`` does.
    """
    channels = image.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"Pillow resizes images with 1 to 4 channels; this image has {channels}")
    pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if channels == 1 else image))
    resized = np.asarray(pil.resize((width, height), resample=resample))
    return resized[:, :, None] if resized.ndim == 2 else resized


def resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """The (height, width) an image of (height, width) is resized to, by transformers' rule.

    Args:
        height: the image's height.
        width: the image's width.
        size: ``{"height": h, "width": w}`` (that size exactly, the aspect ratio not kept) or
            ``{"shortest_edge": s}`` (the shorter edge becomes ``s``, the longer one
            ``int(s * long / short)``, truncated, as transformers' ``get_resize_output_image_size``
            with ``default_to_square=False``).

    Returns:
        ``(new_height, new_width)``.
    """
    if "shortest_edge" in size:
        new_short = int(size["shortest_edge"])
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(new_short * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return int(size["height"]), int(size["width"])


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C): the centre of the image, as transformers' ``center_crop``.

    The window starts at ``(H - height) // 2`` / ``(W - width) // 2``. An image smaller than the
    crop along an edge is first padded with zeros (in its own dtype) to the crop size along that
    edge, ``ceil(pad / 2)`` before it, the rest after it, exactly as transformers pads.

    Args:
        image: an (height, width, channels) array of any dtype.
        height: the crop's height (positive).
        width: the crop's width (positive).

    Returns:
        The (height, width, channels) crop, a view where no padding was needed.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"crop_size must be positive, got height={height}, width={width}")
    orig_h, orig_w = image.shape[0], image.shape[1]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:  # the crop fits: bottom = top + height <= orig_h follows
        return image[top:top + height, left:left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((new_h, new_w) + image.shape[2:], dtype=image.dtype)
    top_pad, left_pad = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)  # ceil
    padded[top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = image
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """``float32(float64(x) * scale)``: transformers multiplies in float64 and casts at the end."""
    return (image.astype(np.float64) * scale).astype(np.float32)


def normalize(image: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """(H, W, C) -> ``(x - mean) / std`` per channel.

    Computed in float32 for integer images and in the image's own float dtype otherwise, with
    mean and std cast to that dtype first, as transformers' ``normalize`` does.
    """
    channels = image.shape[-1]
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.dtype(np.float32)
    mean_array = np.asarray(_per_channel(mean, channels, "image_mean"), dtype=dtype)
    std_array = np.asarray(_per_channel(std, channels, "image_std"), dtype=dtype)
    return (image.astype(dtype, copy=False) - mean_array) / std_array


def rescale_normalize_uint8(image: np.ndarray, scale: float, mean: float | Sequence[float], std: float | Sequence[float],
                            channels_first: bool) -> np.ndarray:
    """``normalize(rescale(image, scale), mean, std)`` of a uint8 (H, W, C) image in one float32
    buffer, laid out (C, H, W) when ``channels_first``: the same float64 product cast to float32,
    then the same float32 subtraction and division, element for element (bit-identical to the two
    functions and a transpose), without their temporaries or the 3-wide broadcast over the last axis
    (9x faster at 224 x 224)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"rescale_normalize_uint8 takes a uint8 (H, W, C) image, got {image.dtype} {image.shape}")
    channels = image.shape[-1]
    mean_array = np.asarray(_per_channel(mean, channels, "image_mean"), dtype=np.float32)
    std_array = np.asarray(_per_channel(std, channels, "image_std"), dtype=np.float32)
    if channels_first:
        source, shape = image.transpose(2, 0, 1), (channels, image.shape[0], image.shape[1])
        mean_array, std_array = mean_array[:, None, None], std_array[:, None, None]
    else:
        source, shape = image, image.shape
    out = np.empty(shape, dtype=np.float32)
    np.multiply(source, scale, out=out, dtype=np.float64, casting="unsafe")  # float32(float64(x) * scale)
    np.subtract(out, mean_array, out=out)
    np.divide(out, std_array, out=out)
    return out


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * channels
    values = list(value)
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the images have {channels} channels")
    return values

def _channel_format(value: Any) -> str | None:
    """"channels_first" / "channels_last" (or transformers' ChannelDimension) -> the string."""
    if value is None:
        return None
    value = getattr(value, "value", value)
    if value in (CHANNELS_FIRST, CHANNELS_LAST):
        return value
    raise ValueError(f"a data format must be 'channels_first' or 'channels_last', got {value!r}")
