"""ViTImageProcessor, DeiTImageProcessor and AutoImageProcessor: transformers' slow ViT and DeiT
image processors, reproduced on numpy + Pillow.

The numbers are those of transformers 4.x ``ViTImageProcessor`` (the test oracle, matched to
max |diff| <= 1e-6 on real photos, see docs/NUMERICS.md). Per image, in order:

1. to an (height, width, channels) array: PIL images that are not RGB go through Pillow's
   ``convert("RGB")``; arrays (numpy, torch, tf, jax) are read as numpy, their channel axis is
   inferred (first or last), a grayscale image is repeated to three channels and an alpha channel
   is dropped (what ``convert("RGB")`` does to "L" and "RGBA" images);
2. resize: the image is made uint8 (float images in [0, 1] are scaled by 255 and truncated, as
   transformers' ``to_pil_image`` does), resized by Pillow (bilinear by default; Pillow
   antialiases when it shrinks), and scaled back by 1/255 when it was scaled up (DeiT: then the
   center crop, see DeiTImageProcessor);
3. rescale: ``float32(float64(x) * rescale_factor)``, the product taken in float64 as
   transformers' ``rescale`` does;
4. normalize: ``(x - mean) / std`` in float32 (in the image's own float dtype if it is float and
   was not rescaled, then cast to float32);
5. channels first: the batch is (batch, channels, height, width) float32.

Only numpy and Pillow are imported here; a framework is imported when ``return_tensors`` asks
for it.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .config import read_json_file, write_json_to_directory
from .hub_mixin import PushToHubMixin
from .image_transforms import (  # noqa: F401  (re-exported: the processors' public helpers)
    _flatten_images,
    _per_channel,
    CHANNELS_FIRST,
    CHANNELS_LAST,
    _channel_format,
    ImageInput,
    ImageLike,
    center_crop,
    rescale_normalize_uint8,
    infer_channel_dimension_format,
    normalize,
    prepare_image,
    rescale,
    resize_output_size,
    resize_with_pillow,
    to_numpy_image,
    to_uint8_for_resize,
)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# transformers' IMAGENET_STANDARD_MEAN / _STD (the ViT checkpoints' [-1, 1] input range).
IMAGENET_STANDARD_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# PIL.Image.Resampling values, which transformers' PILImageResampling re-exports and which
# preprocessor_config.json stores as plain ints.
RESAMPLE_NAMES: dict[int, str] = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}

# Option names read from / written to preprocessor_config.json, in transformers' spelling.
_OPTION_NAMES = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_convert_rgb",
)
# Keys of old files (or transformers' own bookkeeping) that carry no option and are not written back.
_DROPPED_KEYS = ("image_processor_type", "feature_extractor_type")
# Keys that change the pixels in other transformers image processors (DeiT, BEiT, ConvNeXt, ...).
# A processor that does not apply one of them says so when it is given one (see _warn_ignored).
_FOREIGN_OPTION_KEYS = (
    "do_center_crop", "crop_size", "crop_pct", "do_pad", "pad_size", "size_divisor", "do_reduce_labels",
)



# --------------------------------------------------------------------------------------------- options
def get_size_dict(size: int | Sequence[int] | Mapping[str, int]) -> dict[str, int]:
    """The processor's output size as {"height": h, "width": w}.

    Accepts that dict, a legacy int (square, as old feature-extractor files store ``"size": 224``)
    or a (height, width) pair. ViT resizes to a fixed size only: "shortest_edge" and the like are
    refused here rather than at the first call.
    """
    if isinstance(size, bool):
        raise ValueError(f"size must be an int, (height, width) or a dict, got {size!r}")
    if isinstance(size, (int, np.integer)):
        result = {"height": int(size), "width": int(size)}
    elif isinstance(size, Mapping):
        if set(size) != {"height", "width"}:
            raise ValueError(
                f"ViTImageProcessor resizes to a fixed size: size must have the keys 'height' and 'width', "
                f"got {dict(size)}"
            )
        result = {"height": int(size["height"]), "width": int(size["width"])}
    elif isinstance(size, Sequence) and len(size) == 2:
        result = {"height": int(size[0]), "width": int(size[1])}
    else:
        raise ValueError(f"size must be an int, (height, width) or {{'height': h, 'width': w}}, got {size!r}")
    if result["height"] <= 0 or result["width"] <= 0:
        raise ValueError(f"size must be positive, got {result}")
    return result


def get_resize_size_dict(size: int | Sequence[int] | Mapping[str, int], name: str = "size") -> dict[str, int]:
    """A resize size of a processor that also reads ``{"shortest_edge": s}`` (DeiT).

    Args:
        size: ``{"height": h, "width": w}``, ``{"shortest_edge": s}``, a legacy int (square, as
            transformers' ``get_size_dict`` reads it) or a (height, width) pair.
        name: the argument's name in error messages.

    Returns:
        ``{"height": h, "width": w}`` or ``{"shortest_edge": s}``.
    """
    if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
        edge = size["shortest_edge"]
        if isinstance(edge, bool) or not isinstance(edge, (int, np.integer)) or edge <= 0:
            raise ValueError(f"{name}['shortest_edge'] must be a positive int, got {edge!r}")
        return {"shortest_edge": int(edge)}
    if isinstance(size, Mapping) and set(size) != {"height", "width"}:
        raise ValueError(
            f"{name} must have the keys 'height' and 'width', or only 'shortest_edge'; got {dict(size)}"
        )
    try:
        return get_size_dict(size)
    except ValueError as e:
        raise ValueError(str(e).replace("size", name, 1)) from None


def get_crop_size_dict(size: int | Sequence[int] | Mapping[str, int]) -> dict[str, int]:
    """``crop_size`` as {"height": h, "width": w} (from that dict, an int or a (height, width) pair).

    Args:
        size: the crop size in any of those forms.

    Returns:
        ``{"height": h, "width": w}``.
    """
    if isinstance(size, Mapping) and set(size) != {"height", "width"}:
        raise ValueError(f"crop_size must have the keys 'height' and 'width', got {dict(size)}")
    try:
        return get_size_dict(size)
    except ValueError as e:
        raise ValueError(str(e).replace("size", "crop_size", 1)) from None


def _resample_int(resample: Any) -> int:
    value = int(getattr(resample, "value", resample))
    if value not in RESAMPLE_NAMES:
        raise ValueError(f"resample must be a Pillow filter {RESAMPLE_NAMES}, got {resample!r}")
    return value


def _mean_std_value(value: float | Sequence[float], name: str) -> float | list[float]:
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    try:
        return [float(v) for v in value]
    except TypeError:
        raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}") from None


@dataclass(frozen=True)
class ProcessingOptions:
    """The options of one call: the processor's own, with the call's overrides applied."""

    do_resize: bool
    size: dict[str, int]
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: float | list[float]
    image_std: float | list[float]
    convert_rgb: bool  # do_convert_rgb, where None (the default) means True
    data_format: str
    input_data_format: str | None
    crop_size: dict[str, int] | None = None  # the center crop (DeiT); None: no crop


# --------------------------------------------------------------------------------------------- output
class BatchFeature(dict):
    """A dict of model inputs, also readable by attribute (``batch.pixel_values``).

    ``pixel_values``: (batch, channels, height, width) float32, as the type ``return_tensors``
    asked for.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no entry {name!r}; it has {sorted(self)}") from None

    def to(self, *args: Any, **kwargs: Any) -> "BatchFeature":
        """Call ``.to(*args, **kwargs)`` on every torch tensor (device / dtype moves); others stay."""
        for key, value in self.items():
            if type(value).__module__.startswith("torch") and hasattr(value, "to"):
                self[key] = value.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {type(v).__name__}{tuple(getattr(v, 'shape', ()))}" for k, v in self.items())
        return f"BatchFeature({parts})"


def _import_framework(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"return_tensors needs {module.split('.')[0]}, which is not installed: pip install vitx[{extra}]") from e


def convert_to_tensors(pixel_values: np.ndarray | list[np.ndarray], return_tensors: Any) -> Any:
    """(batch, C, H, W) float32 numpy -> the array type named by return_tensors."""
    kind = getattr(return_tensors, "value", return_tensors)
    if kind is None:
        return pixel_values
    if kind not in ("np", "pt", "tf", "jax"):
        raise ValueError(f"return_tensors must be None, 'np', 'pt', 'tf' or 'jax', got {return_tensors!r}")
    if isinstance(pixel_values, list):
        shapes = sorted({tuple(p.shape) for p in pixel_values})
        raise ValueError(
            f"the processed images have different shapes {shapes} and cannot form one batch for "
            f"return_tensors={kind!r}; resize them (do_resize=True) or use return_tensors=None for a list"
        )
    if kind == "np":
        return pixel_values
    if kind == "pt":
        return _import_framework("torch", "torch").from_numpy(pixel_values)
    if kind == "tf":
        return _import_framework("tensorflow", "tf").convert_to_tensor(pixel_values)
    return _import_framework("jax.numpy", "flax").asarray(pixel_values)


# --------------------------------------------------------------------------------------------- processors
class BaseViTImageProcessor(PushToHubMixin):
    """Options, ``preprocessor_config.json`` I/O and input preparation shared by the slow and the
    fast processor; each subclass implements ``preprocess``."""

    _hub_commit_message = "Upload image processor"

    model_input_names: ClassVar[list[str]] = ["pixel_values"]
    # The type written to preprocessor_config.json: transformers' slow class reads every file.
    config_type: ClassVar[str] = "ViTImageProcessor"
    # The options this processor reads, applies and writes back, in transformers' spelling.
    option_names: ClassVar[tuple[str, ...]] = _OPTION_NAMES

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        resample: int = 2,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.size = self._size_dict(size if size is not None else {"height": 224, "width": 224})
        self.resample = _resample_int(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _mean_std_value(image_mean if image_mean is not None else list(IMAGENET_STANDARD_MEAN), "image_mean")
        self.image_std = _mean_std_value(image_std if image_std is not None else list(IMAGENET_STANDARD_STD), "image_std")
        self.do_convert_rgb = do_convert_rgb
        source = kwargs.pop("_config_source", None)  # set by from_json_file: named in the warning below
        for key in _DROPPED_KEYS:
            kwargs.pop(key, None)
        # Unknown keys of a preprocessor_config.json (processor_class, crop_pct, ...) are kept and
        # written back; they are readable as attributes, as in transformers.
        self.extra: dict[str, Any] = dict(kwargs)
        self._warn_ignored(source)

    @staticmethod
    def _size_dict(size: Any) -> dict[str, int]:
        """``size`` in the forms this processor resizes to (ViT: a fixed height and width)."""
        return get_size_dict(size)

    def _warn_ignored(self, source: str | None) -> None:
        """Warn, naming them, about kept keys that other processors apply to the pixels and this
        one does not (a DeiT file's do_center_crop / crop_size read by ViTImageProcessor)."""
        ignored = [key for key in _FOREIGN_OPTION_KEYS if key in self.extra]
        if ignored:
            origin = f"{source}: " if source else ""
            warnings.warn(
                f"{origin}{type(self).__name__} ignores the option(s) {', '.join(ignored)} (from another image "
                f"processor's config, e.g. DeiTImageProcessor's center crop), as transformers' "
                f"{self.config_type} does: the images are resized to {self.size} and not cropped; use "
                "AutoImageProcessor.from_pretrained (or the processor the file names) to apply them",
                UserWarning,
                stacklevel=4,
            )

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ----------------------------------------------------------------------------- options
    def _resolve_options(
        self,
        do_resize: bool | None,
        size: Any,
        resample: Any,
        do_rescale: bool | None,
        rescale_factor: float | None,
        do_normalize: bool | None,
        image_mean: Any,
        image_std: Any,
        do_convert_rgb: bool | None,
        data_format: Any,
        input_data_format: Any,
        *,
        do_center_crop: bool | None = None,
        crop_size: Any = None,
    ) -> ProcessingOptions:
        def pick(value: Any, own: Any) -> Any:
            return own if value is None else value

        convert = pick(do_convert_rgb, self.do_convert_rgb)
        crop = None
        if "do_center_crop" in self.option_names and bool(pick(do_center_crop, self.do_center_crop)):
            crop = get_crop_size_dict(pick(crop_size, self.crop_size))
        options = ProcessingOptions(
            do_resize=bool(pick(do_resize, self.do_resize)),
            size=self._size_dict(pick(size, self.size)),
            resample=_resample_int(pick(resample, self.resample)),
            do_rescale=bool(pick(do_rescale, self.do_rescale)),
            rescale_factor=float(pick(rescale_factor, self.rescale_factor)),
            do_normalize=bool(pick(do_normalize, self.do_normalize)),
            image_mean=_mean_std_value(pick(image_mean, self.image_mean), "image_mean"),
            image_std=_mean_std_value(pick(image_std, self.image_std), "image_std"),
            convert_rgb=convert is None or bool(convert),
            data_format=_channel_format(data_format) or CHANNELS_FIRST,
            input_data_format=_channel_format(input_data_format),
            crop_size=crop,
        )
        std = options.image_std if isinstance(options.image_std, list) else [options.image_std]
        if options.do_normalize and any(s == 0 for s in std):
            raise ValueError(f"image_std must not contain 0, got {options.image_std}")
        return options

    def _prepare(self, images: ImageInput, options: ProcessingOptions) -> list[np.ndarray]:
        """Flatten the input and bring every image to (H, W, C) numpy (channels per options)."""
        arrays = [prepare_image(image, options.convert_rgb, options.input_data_format) for image in _flatten_images(images)]
        if options.do_rescale and any(
            np.issubdtype(a.dtype, np.floating) and a.size and a.min() >= 0 and a.max() <= 1 for a in arrays
        ):
            warnings.warn(
                "the images look already rescaled (float values in [0, 1]) and do_rescale=True scales them "
                "by rescale_factor again, as transformers does; pass do_rescale=False for [0, 1] images",
                UserWarning,
                stacklevel=4,
            )
        return arrays

    # ----------------------------------------------------------------------------- call
    def __call__(self, images: ImageInput, return_tensors: Any = None, **overrides: Any) -> BatchFeature:
        """Preprocess one image or a batch: see ``preprocess``."""
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(self, images: ImageInput, **overrides: Any) -> BatchFeature:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------------------- dict / json
    def to_dict(self) -> dict[str, Any]:
        """The options as transformers writes them (plus the unknown keys kept on load)."""
        d: dict[str, Any] = dict(self.extra)
        for name in self.option_names:
            value = getattr(self, name)
            d[name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple)) else value
        d["image_processor_type"] = self.config_type
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        def default(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                return value.tolist()
            if isinstance(value, np.generic):
                return value.item()
            raise TypeError(f"{type(value).__name__} is not JSON serialisable")

        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=default) + "\n"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> "BaseViTImageProcessor":
        """Build from a preprocessor_config.json dict; ``overrides`` replace its values."""
        if not isinstance(config, Mapping):
            raise ValueError(f"an image processor config must be a JSON object, got {type(config).__name__}")
        fields = dict(config)
        fields.update(overrides)
        return cls(**fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BaseViTImageProcessor) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ----------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False,
                        **kwargs: Any) -> pathlib.Path:
        """Write ``preprocessor_config.json`` (atomically) into ``save_directory``; returns its path.

        Args:
            save_directory: the directory (created when absent).
            push_to_hub: upload preprocessor_config.json to the hub afterwards (transformers' spelling).
            **kwargs: with push_to_hub: ``repo_id`` (default: the directory's name), ``commit_message``,
                ``private``, ``token``, ``revision``, ``create_pr``, ``commit_description``.
        """
        from .pretrained import push_saved

        path = write_json_to_directory(save_directory, PREPROCESSOR_CONFIG_NAME, self.to_json_string())
        push_saved(save_directory, push_to_hub, kwargs, [PREPROCESSOR_CONFIG_NAME],
                   owner=f"{type(self).__name__}.save_pretrained", default_message=self._hub_commit_message)
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "BaseViTImageProcessor":
        """Build from a ``preprocessor_config.json`` file; ``overrides`` replace its values.

        Args:
            path: the json file.
            **overrides: option values that replace the file's.
        """
        path = pathlib.Path(path)
        return cls._from_file_dict(read_json_file(path, PREPROCESSOR_CONFIG_NAME), path, overrides)

    @classmethod
    def _from_file_dict(cls, config: Any, path: pathlib.Path, overrides: Mapping[str, Any]) -> "BaseViTImageProcessor":
        source = str(path)
        if isinstance(config, Mapping):
            kind = AutoImageProcessor.processor_type(config)
            if kind.removesuffix("Fast") != cls.config_type:
                source += f" (a {kind} file)"
        try:
            return cls.from_dict(config, **overrides, _config_source=source)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> "BaseViTImageProcessor":
        """Read ``preprocessor_config.json`` from a directory, the json file itself, or a hub id.

        A hub id is fetched with ``huggingface_hub.hf_hub_download`` into its usual cache (or
        ``cache_dir``), honouring ``HF_HUB_OFFLINE``, ``revision`` and ``token``. Old
        feature-extractor files (``"feature_extractor_type": "ViTFeatureExtractor"``,
        ``"size": 224``) are read too. ``overrides`` replace values of the file.
        """
        path = resolve_preprocessor_config(
            pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only,
        )
        return cls.from_json_file(path, **overrides)


def resolve_preprocessor_config(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> pathlib.Path:
    """The local path of ``preprocessor_config.json`` for a directory, the file itself or a hub id.

    Args:
        pretrained_model_name_or_path: a directory holding the file, the json file, or a hub id
            (fetched with ``huggingface_hub.hf_hub_download`` into its cache).
        revision: the hub revision (branch, tag or commit).
        cache_dir: the hub cache to use instead of the default one.
        token: the hub token.
        local_files_only: only look in the hub cache.

    Returns:
        The path of the json file (not yet read).
    """
    path = pathlib.Path(pretrained_model_name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        return path / PREPROCESSOR_CONFIG_NAME
    import huggingface_hub

    repo_id = str(pretrained_model_name_or_path)
    try:
        local = huggingface_hub.hf_hub_download(
            repo_id, PREPROCESSOR_CONFIG_NAME, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only,
        )
    # huggingface_hub's errors are OSError (HTTP / missing cache entry) or ValueError (bad id).
    except (OSError, ValueError) as e:
        raise OSError(
            f"cannot read {PREPROCESSOR_CONFIG_NAME} for {repo_id!r}: it is not a local directory or file, "
            f"and the Hugging Face Hub (revision={revision!r}) did not provide it: {e}"
        ) from e
    return pathlib.Path(local)


# --------------------------------------------------------------------------------------------- slow path
def _process_one(image: np.ndarray, options: ProcessingOptions) -> np.ndarray:
    """(H, W, C) -> float32 through resize, center crop, rescale, normalize, in ``options.data_format``
    ((C, height, width) for channels_first, else (height, width, C))."""
    channels_first = options.data_format == CHANNELS_FIRST
    if options.do_resize:
        height, width = resize_output_size(image.shape[0], image.shape[1], options.size)
        pixels, scaled_up = to_uint8_for_resize(image)
        image = resize_with_pillow(pixels, height, width, options.resample)
        if scaled_up:  # back to the [0, 1] range the image came in, as transformers' resize does
            image = rescale(image, 1 / 255)
    if options.crop_size is not None:
        image = center_crop(image, options.crop_size["height"], options.crop_size["width"])
    if options.do_rescale and options.do_normalize and image.dtype == np.uint8 and image.ndim == 3:
        return rescale_normalize_uint8(image, options.rescale_factor, options.image_mean, options.image_std,
                                       channels_first)
    if options.do_rescale:
        image = rescale(image, options.rescale_factor)
    if options.do_normalize:
        image = normalize(image, options.image_mean, options.image_std)
    image = image.astype(np.float32, copy=False)
    return image.transpose(2, 0, 1) if channels_first else image


def _preprocess_slow(
    processor: BaseViTImageProcessor, images: ImageInput, options: ProcessingOptions, return_tensors: Any
) -> BatchFeature:
    """The slow processors' common body: prepare, process each image, stack, convert."""
    processed = [_process_one(image, options) for image in processor._prepare(images, options)]
    if len({image.shape for image in processed}) == 1:
        pixel_values: np.ndarray | list[np.ndarray] = np.ascontiguousarray(np.stack(processed))
    else:
        pixel_values = processed
    return BatchFeature(pixel_values=convert_to_tensors(pixel_values, return_tensors))


class ViTImageProcessor(BaseViTImageProcessor):
    """transformers' slow ViT image processor on numpy and Pillow (see the module docstring).

    Options (defaults as transformers): do_resize=True, size={"height": 224, "width": 224},
    resample=2 (Pillow BILINEAR), do_rescale=True, rescale_factor=1/255, do_normalize=True,
    image_mean=image_std=[0.5, 0.5, 0.5], do_convert_rgb=None (= convert non-RGB images; False
    keeps an image's own channels).

    Keys of other processors' files that change the pixels there (``do_center_crop`` /
    ``crop_size`` of a DeiT file, ``crop_pct``, ...) are ignored as transformers ignores them, with
    a UserWarning naming them; ``AutoImageProcessor`` picks the processor the file was written for.
    """

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
    ) -> BatchFeature:
        """Images -> ``BatchFeature(pixel_values=...)``.

        ``images``: a PIL image, an (H, W), (H, W, C) or (C, H, W) array (numpy / torch / tf / jax,
        uint8 or float), a (batch, ...) array, or a list of these. Every other argument overrides
        the processor's option of that name for this call.

        ``pixel_values``: (batch, channels, height, width) float32 (channels last with
        ``data_format="channels_last"``), as numpy for ``return_tensors=None`` or "np", torch
        for "pt", tf for "tf", jax for "jax". With ``do_resize=False`` and images of different
        sizes, ``return_tensors=None`` gives a list of (channels, height, width) arrays.
        """
        options = self._resolve_options(
            do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
            do_convert_rgb, data_format, input_data_format,
        )
        return _preprocess_slow(self, images, options, return_tensors)


class ViTFeatureExtractor(ViTImageProcessor):
    """Deprecated name of ViTImageProcessor (as in transformers); warns once per process."""

    _deprecation_warned: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not ViTFeatureExtractor._deprecation_warned:
            ViTFeatureExtractor._deprecation_warned = True
            warnings.warn(
                "ViTFeatureExtractor is deprecated and will be removed; use ViTImageProcessor instead",
                FutureWarning,
                stacklevel=2,
            )
        super().__init__(*args, **kwargs)


class DeiTImageProcessor(BaseViTImageProcessor):
    """transformers' slow DeiT image processor: resize, center crop, rescale, normalize.

    The numbers are those of transformers 4.x ``DeiTImageProcessor`` (matched to max |diff| <=
    1e-6 on real photos): the steps of ``ViTImageProcessor`` (see the module docstring) with a
    center crop after the resize (transformers' ``center_crop``: the window at
    ``((H - h) // 2, (W - w) // 2)``, zero padding where the image is smaller than the crop).

    Options (defaults as transformers): do_resize=True, size={"height": 256, "width": 256},
    resample=3 (Pillow BICUBIC), do_center_crop=True, crop_size={"height": 224, "width": 224},
    do_rescale=True, rescale_factor=1/255, do_normalize=True, image_mean=image_std=[0.5, 0.5,
    0.5] (the facebook/deit-* files store the ImageNet [0.485, 0.456, 0.406] / [0.229, 0.224,
    0.225]), do_convert_rgb=None as ViTImageProcessor.

    ``size`` is read in every form these files use: ``{"height": h, "width": w}``, a legacy int
    (``"size": 256`` of DeiTFeatureExtractor files: 256 x 256, transformers' ``get_size_dict``
    rule) or ``{"shortest_edge": s}`` (the shorter edge to ``s``, the aspect ratio kept, as
    transformers resizes ``shortest_edge``; its slow DeiT class refuses this form, its fast one
    applies it).
    """

    config_type: ClassVar[str] = "DeiTImageProcessor"
    option_names: ClassVar[tuple[str, ...]] = _OPTION_NAMES + ("do_center_crop", "crop_size")

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        resample: int = 3,
        do_center_crop: bool = True,
        crop_size: int | Sequence[int] | Mapping[str, int] | None = None,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Args:
            do_resize: resize the images to ``size``.
            size: the resize size (see the class docstring); default 256 x 256.
            resample: the Pillow filter of the resize (an int as the files store it, 3 = BICUBIC).
            do_center_crop: crop the centre of the resized image.
            crop_size: the crop's {"height", "width"} (or an int / pair); default 224 x 224.
            rescale_factor: the factor of the rescale step (1/255).
            do_rescale: multiply the pixels by ``rescale_factor``.
            do_normalize: subtract ``image_mean`` and divide by ``image_std`` per channel.
            image_mean: a number or one per channel; default [0.5, 0.5, 0.5].
            image_std: a number or one per channel; default [0.5, 0.5, 0.5].
            do_convert_rgb: None / True: convert images to RGB; False: keep their channels.
            **kwargs: other keys of a preprocessor_config.json, kept and written back.
        """
        self.do_center_crop = bool(do_center_crop)
        self.crop_size = get_crop_size_dict(crop_size if crop_size is not None else {"height": 224, "width": 224})
        super().__init__(
            do_resize=do_resize, size=size if size is not None else {"height": 256, "width": 256}, resample=resample,
            do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean,
            image_std=image_std, do_convert_rgb=do_convert_rgb, **kwargs,
        )

    @staticmethod
    def _size_dict(size: Any) -> dict[str, int]:
        return get_resize_size_dict(size)

    def preprocess(
        self,
        images: ImageInput,
        *,
        do_resize: bool | None = None,
        size: Any = None,
        resample: Any = None,
        do_center_crop: bool | None = None,
        crop_size: Any = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        return_tensors: Any = None,
        data_format: Any = CHANNELS_FIRST,
        input_data_format: Any = None,
    ) -> BatchFeature:
        """Images -> ``BatchFeature(pixel_values=...)``, as ``ViTImageProcessor.preprocess``.

        Args:
            images: a PIL image, an (H, W), (H, W, C) or (C, H, W) array (numpy / torch / tf /
                jax, uint8 or float), a (batch, ...) array, or a list of these.
            do_resize, size, resample, do_center_crop, crop_size, do_rescale, rescale_factor,
                do_normalize, image_mean, image_std, do_convert_rgb: override the processor's
                option of that name for this call.
            return_tensors: None / "np" (numpy), "pt", "tf" or "jax".
            data_format: "channels_first" (default) or "channels_last" for the output.
            input_data_format: the channel axis of array inputs (inferred when None).

        Returns:
            ``BatchFeature`` with ``pixel_values``: (batch, channels, crop height, crop width)
            float32 (the resized size without the crop).
        """
        options = self._resolve_options(
            do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
            do_convert_rgb, data_format, input_data_format, do_center_crop=do_center_crop, crop_size=crop_size,
        )
        return _preprocess_slow(self, images, options, return_tensors)


class DeiTFeatureExtractor(DeiTImageProcessor):
    """Deprecated name of DeiTImageProcessor (as in transformers); warns once per process."""

    _deprecation_warned: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not DeiTFeatureExtractor._deprecation_warned:
            DeiTFeatureExtractor._deprecation_warned = True
            warnings.warn(
                "DeiTFeatureExtractor is deprecated and will be removed; use DeiTImageProcessor instead",
                FutureWarning,
                stacklevel=2,
            )
        super().__init__(*args, **kwargs)


# --------------------------------------------------------------------------------------------- auto
# image_processor_type (or feature_extractor_type with FeatureExtractor -> ImageProcessor) -> class.
_PROCESSOR_TYPES: dict[str, str] = {
    "ViTImageProcessor": "ViTImageProcessor",
    "ViTImageProcessorFast": "ViTImageProcessorFast",
    "DeiTImageProcessor": "DeiTImageProcessor",
    "DeiTImageProcessorFast": "DeiTImageProcessor",  # vitx has no fast DeiT processor
}


def _processor_class(name: str) -> type[BaseViTImageProcessor]:
    if name == "ViTImageProcessorFast":
        from .image_processing_fast import ViTImageProcessorFast

        return ViTImageProcessorFast
    return {"ViTImageProcessor": ViTImageProcessor, "DeiTImageProcessor": DeiTImageProcessor}[name]


class AutoImageProcessor:
    """transformers' ``AutoImageProcessor``: the processor class a ``preprocessor_config.json`` names.

    Not instantiable; use :meth:`from_pretrained`.
    """

    def __init__(self) -> None:
        raise OSError("AutoImageProcessor is designed to be instantiated with AutoImageProcessor.from_pretrained(path)")

    @staticmethod
    def processor_type(config: Mapping[str, Any]) -> str:
        """The processor type a preprocessor config dict names, in transformers' rule.

        Args:
            config: the parsed ``preprocessor_config.json``.

        Returns:
            ``image_processor_type``, else ``feature_extractor_type`` with "FeatureExtractor"
            replaced by "ImageProcessor", else "ViTImageProcessor" (the file names none).
        """
        kind = config.get("image_processor_type")
        if kind is None and config.get("feature_extractor_type") is not None:
            kind = str(config["feature_extractor_type"]).replace("FeatureExtractor", "ImageProcessor")
        return "ViTImageProcessor" if kind is None else str(kind)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        use_fast: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> BaseViTImageProcessor:
        """Read ``preprocessor_config.json`` and build the processor it was written for.

        Args:
            pretrained_model_name_or_path: a directory holding the file, the json file, or a hub id.
            use_fast: None: a fast processor only where the file names one ("...Fast");
                True: ViTImageProcessorFast for ViT files (DeiT has only the slow processor, which
                is used with a warning); False: always the slow processor.
            revision, cache_dir, token, local_files_only: as ``ViTImageProcessor.from_pretrained``.
            **overrides: option values that replace the file's.

        Returns:
            ``ViTImageProcessor`` (also when the file names no type), ``DeiTImageProcessor`` or
            ``ViTImageProcessorFast``. An unsupported type raises a ValueError naming it and the file.
        """
        path = resolve_preprocessor_config(
            pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only,
        )
        config = read_json_file(path, PREPROCESSOR_CONFIG_NAME)
        if not isinstance(config, Mapping):
            raise ValueError(f"{path}: an image processor config must be a JSON object, got {type(config).__name__}")
        kind = cls.processor_type(config)
        if kind not in _PROCESSOR_TYPES:
            raise ValueError(
                f"{path}: unsupported image processor type {kind!r}; vitx reads "
                f"{', '.join(sorted(_PROCESSOR_TYPES))} (and their *FeatureExtractor names)"
            )
        name = _PROCESSOR_TYPES[kind]
        fast = kind.endswith("Fast") if use_fast is None else bool(use_fast)
        if fast and name == "ViTImageProcessor":
            name = "ViTImageProcessorFast"
        elif not fast and name == "ViTImageProcessorFast":
            name = "ViTImageProcessor"
        elif fast and name == "DeiTImageProcessor":
            warnings.warn(
                f"{path}: vitx has no fast DeiT image processor; using DeiTImageProcessor (the slow one)",
                UserWarning,
                stacklevel=2,
            )
        return _processor_class(name)._from_file_dict(config, path, overrides)


__all__ = [
    "AutoImageProcessor",
    "BatchFeature",
    "BaseViTImageProcessor",
    "DeiTFeatureExtractor",
    "DeiTImageProcessor",
    "ViTFeatureExtractor",
    "ViTImageProcessor",
    "PREPROCESSOR_CONFIG_NAME",
    "infer_channel_dimension_format",
    "prepare_image",
    "resolve_preprocessor_config",
]
