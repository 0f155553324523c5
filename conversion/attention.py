"""Attention maps of a model, computed keeping only what the map needs, and ``vitx attention``.

:func:`attention_map` runs a vitx model (torch, TF or Flax) the way its forward does (embeddings,
then the encoder layers in order; the final layernorm and heads do not change the attentions) but
one layer at a time, so it never holds more than one layer's attention probabilities:

- ``method="rollout"``: every layer takes the eager attention kernel and its probabilities are folded
  into vit_core.attention_maps.AttentionRollout's running (batch, tokens, tokens) product at once,
  then dropped;
- ``method="last-layer"``: the layers before the last take the fused kernel (no probabilities are
  ever formed); only the last layer's are read.

In Flax each layer call goes through one ``jax.jit`` (compiled once, shared by every layer).

``model(pixel_values, output_attentions=True)`` gives the same numbers (tests/test_attention_maps.py)
but keeps every layer's (batch, heads, tokens, tokens) array until it returns: 24 of them for ViT-L.

:func:`run_attention` is ``vitx attention``: per image a PNG of the photo at its original size with the
map over it (bilinear upsampling, a colormap written here in numpy, blended), and the raw map as
``.npy``. See docs/attention.md and docs/cli.md.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vit_core import ViTConfig, validation
from vit_core.attention_maps import AttentionRollout, check_head, cls_attention
from vit_core.checkpoint.staging import staged_file

from .compare import open_image
from .detect import open_checkpoint
from .formats.base import task_of
from .frameworks import FRAMEWORKS, build_model, framework_input, pinned_precision, unavailable

METHODS = ("rollout", "last-layer")
_PACKAGE_FRAMEWORK = {"vit_torch": "torch", "vit_tf": "tf", "vit_flax": "flax"}

# The colormap: inferno's colours at 0, 1/8, ..., 1 (sRGB, 0-255), interpolated linearly between.
_INFERNO = np.array([
    [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
    [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
], dtype=np.float64)


def framework_of(model: Any) -> str:
    """"torch", "tf" or "flax": which vitx package ``model`` belongs to.

    Args:
        model: a vit_torch / vit_tf / vit_flax model instance.
    """
    package = type(model).__module__.split(".")[0]
    if package not in _PACKAGE_FRAMEWORK:
        raise ValueError(f"{type(model).__name__} is not a vitx model (vit_torch, vit_tf or vit_flax); "
                         "for another model, pass its output_attentions=True attentions to "
                         "vit_core.attention_maps.attention_rollout")
    return _PACKAGE_FRAMEWORK[package]


def attention_map(model: Any, pixel_values: Any, method: str = "rollout", *, head: str | int = "mean",
                  discard_ratio: float = 0.0, head_fusion: str = "mean",
                  interpolate_pos_encoding: bool = False) -> np.ndarray:
    """The attention map of ``pixel_values`` under ``model``, holding at most one layer's attentions.

    Args:
        model: a vitx model of any task (ViTModel, ...ForImageClassification, ...ForMaskedImageModeling)
            in torch, TF or Flax; its backbone is run in inference mode (no dropout).
        pixel_values: (batch, channels, height, width) float32, numpy or the framework's tensor.
        method: "rollout" (vit_core.attention_maps.attention_rollout) or "last-layer"
            (vit_core.attention_maps.last_layer_attention).
        head: for "last-layer": "mean" over the heads or a head index.
        discard_ratio: for "rollout": fraction of each layer's fused weights discarded, in [0, 1).
        head_fusion: for "rollout": "mean", "max" or "min" over the heads.
        interpolate_pos_encoding: as the model's forward: run images of another size than the
            config's (the position table is resampled).

    Returns:
        (batch, gh, gw) float64, gh x gw the patch grid of the input (non-square grids included).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {METHODS}")
    framework = framework_of(model)
    backbone = getattr(model, getattr(model, "base_model_prefix", "vit"), model)
    config: ViTConfig = model.config
    array = pixel_values if isinstance(pixel_values, np.ndarray) else None
    shape = tuple(int(d) for d in (array.shape if array is not None else pixel_values.shape))
    floating = array.dtype.kind == "f" if array is not None else "float" in str(pixel_values.dtype)
    gh, gw = validation.check_pixel_values(shape, floating, config, bool(interpolate_pos_encoding))
    rollout = AttentionRollout(discard_ratio, head_fusion) if method == "rollout" else None
    if rollout is None:
        check_head(head, config.num_attention_heads)
    layers = list(backbone.encoder.layer)
    run_layer = _layer_runner(framework)
    with pinned_precision(framework), _inference_mode(model, framework):
        inputs = framework_input(framework, array.astype(np.float32)) if array is not None else pixel_values
        if framework == "torch":
            inputs = inputs.to(model.dtype)  # as the forward: inputs follow the weights' dtype
        hidden = backbone.embeddings(inputs, None, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        for i, layer in enumerate(layers):
            wanted = rollout is not None or i == len(layers) - 1
            hidden, probs = run_layer(layer, hidden, wanted)
            if rollout is not None:
                rollout.add(probs)
            elif wanted:
                return cls_attention(probs, head, (gh, gw), what=f"attentions[{i}]")
            del probs
    assert rollout is not None
    return rollout.cls_map((gh, gw))


@contextlib.contextmanager
def _inference_mode(model: Any, framework: str) -> Iterator[None]:
    """No dropout while the map is computed: a torch model in training mode is put in eval mode
    and back (TF layers run with training=False, Flax ones without a dropout key)."""
    training = framework == "torch" and model.training
    if training:
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()


def _run_layer(layer: Any, hidden: Any, eager: bool) -> Any:
    """One encoder layer without a head mask: (hidden, attention probabilities or None)."""
    return layer(hidden, None, eager=eager)


_JIT_LAYER: list[Any] = []


def _layer_runner(framework: str) -> Any:
    """How one layer runs: called directly in torch and TF; in Flax through jax.jit (the layer a pytree,
    ``eager`` static), compiled once and shared by every layer of the same shape, as the models'
    own calls are (vit_flax.modeling)."""
    if framework != "flax":
        return _run_layer
    if not _JIT_LAYER:
        import jax

        _JIT_LAYER.append(jax.jit(_run_layer, static_argnames="eager"))
    return _JIT_LAYER[0]


# ------------------------------------------------------------------------------------- pictures
def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 through the inferno colormap (9 stops, linear between them).

    Args:
        values: float array of any shape; clipped to [0, 1].

    Returns:
        uint8 array of shape values.shape + (3,).
    """
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.minimum(v.astype(np.int64), len(_INFERNO) - 2)
    t = (v - low)[..., None]
    rgb = _INFERNO[low] * (1.0 - t) + _INFERNO[low + 1] * t
    return np.rint(rgb).astype(np.uint8)


def overlay(image: Any, attention: np.ndarray, alpha: float = 0.5) -> Any:
    """The photo at its own size with the map over it: the (gh, gw) map upsampled bilinearly to the
    photo's size, rescaled to [0, 1] (min to max), coloured, then blended with weight ``alpha``.

    Args:
        image: a PIL image (any mode; shown as RGB).
        attention: (gh, gw) map.
        alpha: weight of the coloured map in the blend, in [0, 1].

    Returns:
        an RGB PIL image of the photo's size.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 2:
        raise ValueError(f"expected one (gh, gw) map, got shape {attention.shape}")
    photo = image.convert("RGB")
    up = np.asarray(Image.fromarray(attention, mode="F").resize(photo.size, Image.Resampling.BILINEAR),
                    dtype=np.float64)
    span = up.max() - up.min()
    scaled = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    blended = (1.0 - alpha) * np.asarray(photo, dtype=np.float64) + alpha * colormap(scaled).astype(np.float64)
    return Image.fromarray(np.rint(blended).clip(0, 255).astype(np.uint8), mode="RGB")


# ------------------------------------------------------------------------------------- vitx attention
@dataclass
class AttentionResult:
    """One image's outputs: the source, the PNG and .npy paths, and the map's grid."""

    image: str
    png: pathlib.Path
    npy: pathlib.Path
    grid: tuple[int, int]


def output_paths(images: Sequence[str | os.PathLike], output: str | os.PathLike,
                 method: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(png, npy) per image: ``OUTPUT/<image stem>.<method>.png`` and ``.npy``.

    Args:
        images: the image paths.
        output: the output directory.
        method: "rollout" or "last-layer" (part of the file names).

    Returns:
        one (png, npy) pair per image; two images with the same stem are a ValueError naming both.
    """
    directory = pathlib.Path(output)
    seen: dict[str, str] = {}
    paths = []
    for image in images:
        stem = pathlib.Path(image).stem
        if stem in seen:
            raise ValueError(f"images {seen[stem]} and {image} would both write {directory / stem}.{method}.png: "
                             "rename one or run them into different --output directories")
        seen[stem] = str(image)
        paths.append((directory / f"{stem}.{method}.png", directory / f"{stem}.{method}.npy"))
    return paths


def _processor(checkpoint: str | os.PathLike, loaded: Any) -> Any:
    """The checkpoint's own preprocessor_config.json (in its directory, or beside its weights file,
    e.g. in the hub cache) when it has one, else the config's image size with the default mean / std."""
    from vit_core import ViTImageProcessor

    source = pathlib.Path(checkpoint)
    candidates = [source] if source.is_dir() else []
    if loaded.path:
        candidates.append(pathlib.Path(loaded.path).parent)
    for directory in candidates:
        if (directory / "preprocessor_config.json").is_file():
            return ViTImageProcessor.from_pretrained(directory)
    h, w = loaded.config.image_hw
    return ViTImageProcessor(size={"height": h, "width": w})


def _check_image(image: str | os.PathLike) -> None:
    """FileNotFoundError for a missing image, ValueError naming a file Pillow cannot identify (the
    header only: nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None


def run_attention(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                  method: str = "rollout", head: str | int = "mean", discard_ratio: float = 0.0,
                  head_fusion: str = "mean", framework: str = "torch", overwrite: bool = False,
                  timm_model_name: str | None = None, progress: bool = True) -> list[AttentionResult]:
    """``vitx attention``: the attention map of each image, as an overlay PNG and a raw ``.npy``.

    Every input is checked before anything is written: the checkpoint, every image, the options,
    and that no output file exists (unless ``overwrite``). Each file is written atomically.

    Args:
        checkpoint: any checkpoint vitx reads (directory, weights file, hub id, timm / JAX npz).
        images: image files; each is preprocessed with the checkpoint's image processor (when its size
            is not the config's, the model runs with interpolate_pos_encoding=True).
        output: directory for ``<stem>.<method>.png`` and ``<stem>.<method>.npy`` (created if needed).
        method: "rollout" or "last-layer".
        head: for "last-layer": "mean" or a head index.
        discard_ratio: for "rollout": fraction in [0, 1) of the lowest weights discarded per layer.
        head_fusion: for "rollout": "mean", "max" or "min".
        framework: "torch", "tf" or "flax".
        overwrite: replace existing output files instead of refusing them.
        timm_model_name: timm model name fixing a timm state dict's config.
        progress: print one line per image.

    Returns:
        one AttentionResult per image, in order.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "rollout" and head != "mean":
        raise ValueError("--head picks a head of the last layer (--method last-layer); rollout fuses the heads "
                         "(--head-fusion mean|max|min)")
    if method == "last-layer" and (discard_ratio or head_fusion != "mean"):
        raise ValueError("--discard-ratio and --head-fusion apply to --method rollout only")
    AttentionRollout(discard_ratio, head_fusion)  # checks both before any work
    if not images:
        raise ValueError("give at least one image")
    why = unavailable(framework)
    if why is not None:
        raise ImportError(f"framework {framework!r} cannot run: {why}")
    if pathlib.Path(output).exists() and not pathlib.Path(output).is_dir():
        raise NotADirectoryError(f"--output {output} is a file, not a directory")
    paths = output_paths(images, output, method)
    if not overwrite:
        for png, npy in paths:
            for path in (png, npy):
                if os.path.lexists(path):
                    raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)")
    for image in images:  # every image exists and is an image before any work (decoded one at a time below)
        _check_image(image)
    loaded = open_checkpoint(checkpoint, timm_model_name=timm_model_name)
    from vit_core.checkpoint.lazy import materialize

    with pinned_precision(framework):
        model = build_model(framework, loaded.config, materialize(loaded.state), task_of(loaded.state), str(checkpoint))
    check_head(head, loaded.config.num_attention_heads)
    processor = _processor(checkpoint, loaded)
    pathlib.Path(output).mkdir(parents=True, exist_ok=True)
    results = []
    for index, (image, (png, npy)) in enumerate(zip(images, paths)):
        photo = open_image(image)
        pixel_values = np.asarray(processor(photo, return_tensors="np")["pixel_values"], dtype=np.float32)
        # a processor of another size than the config's (preprocessor_config.json): resample the positions
        interpolate = tuple(pixel_values.shape[-2:]) != tuple(loaded.config.image_hw)
        grid = attention_map(model, pixel_values, method, head=head, discard_ratio=discard_ratio,
                             head_fusion=head_fusion, interpolate_pos_encoding=interpolate)[0]
        with staged_file(npy, force=overwrite) as temp:
            with open(temp, "wb") as f:
                np.save(f, grid.astype(np.float32))
        with staged_file(png, force=overwrite) as temp:
            with open(temp, "wb") as f:
                overlay(photo, grid).save(f, format="PNG")
        results.append(AttentionResult(str(image), png, npy, (int(grid.shape[0]), int(grid.shape[1]))))
        if progress:
            print(f"[{index + 1}/{len(images)}] {image}: {method} map {grid.shape[0]}x{grid.shape[1]} -> {png}, {npy}",
                  flush=True)
    return results
