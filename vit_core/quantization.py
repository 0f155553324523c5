"""int8 quantization, the framework-neutral part: which Linear layers are quantized, calibration
images, and the int8-vs-float32 agreement measure (docs/int8.md).

Every ViT Linear layer has a *role*; quantizers (ONNX Runtime, OpenVINO / NNCF, vit_torch's native
int8) take the same role names in ``skip``:

============== =====================================================================
role           layers
============== =====================================================================
qkv            ``attention.attention.query`` / ``key`` / ``value`` of every encoder layer
attention_output ``attention.output.dense``: the projection after the attention
fc1            ``intermediate.dense``: the first MLP projection (before the activation)
fc2            ``output.dense``: the second MLP projection (its input is the GELU output)
classifier     the classification head
pooler         the pooler's dense layer (ViTModel with a pooler)
============== =====================================================================

Only these GEMMs with weights are quantized: the patch embedding (a convolution), LayerNorm,
Softmax, GELU and the two activation-by-activation attention matmuls always stay in floating
point.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

ROLES = ("qkv", "attention_output", "fc1", "fc2", "classifier", "pooler")
LAYER_ROLES = ("qkv", "qkv", "qkv", "attention_output", "fc1", "fc2")  # one encoder layer, forward order
MODES = ("int8-dynamic", "int8-static")

# Layers left in float32 unless asked otherwise (measurements in docs/int8.md): the classifier
# head writes the logits directly, so its int8 error is not averaged by any later layer, and it
# costs a negligible share of the FLOPs.
DEFAULT_SKIP: tuple[str, ...] = ("classifier",)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`; a ValueError naming the choices otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def resolve_skip(skip: Iterable[str] | str | None) -> frozenset[str]:
    """The set of roles kept in floating point: ``None`` means :data:`DEFAULT_SKIP`, ``()`` none,
    a comma-separated string or an iterable of role names (:data:`ROLES`)."""
    if skip is None:
        return frozenset(DEFAULT_SKIP)
    names = [s.strip() for s in skip.split(",")] if isinstance(skip, str) else [str(s) for s in skip]
    names = [n for n in names if n]
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown layer role(s) in skip: {', '.join(unknown)}; choose from {', '.join(ROLES)}")
    return frozenset(names)


def layer_roles(count: int, where: str = "the model") -> list[str]:
    """The roles of ``count`` weighted GEMMs of a ViT in forward (topological) order.

    Each encoder layer holds six, in this order in any topological sort of the graph: query, key
    and value (all read the same LayerNorm output), the attention output projection (it reads all
    three), fc1, fc2; the layers follow one another (layer i + 1 reads layer i's fc2). After the
    last layer come the heads: the classifier, or the pooler (a base model with a pooler), or
    both (pooler first).
    """
    layers, heads = divmod(count, len(LAYER_ROLES))
    if layers == 0 or heads > 2:
        raise ValueError(f"{where} has {count} matrix multiplications with constant weights; a ViT has 6 per "
                         "encoder layer plus at most a pooler and a classifier")
    tail = {0: [], 1: ["classifier"], 2: ["pooler", "classifier"]}[heads]
    return list(LAYER_ROLES) * layers + tail


def _image_files(root: pathlib.Path) -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for directory, subdirs, names in os.walk(root):  # symlinked folders are not followed
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [pathlib.Path(directory) / n for n in sorted(names)
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def load_processor(preprocessor: Any) -> Any:
    """An image processor object as given, or read from a directory / ``preprocessor_config.json``."""
    if preprocessor is None or hasattr(preprocessor, "preprocess"):
        return preprocessor
    from .image_processing import AutoImageProcessor, resolve_preprocessor_config

    path = pathlib.Path(preprocessor)
    if not path.exists() or not resolve_preprocessor_config(path).is_file():
        raise FileNotFoundError(f"preprocessor {path}: no preprocessor_config.json there")
    return AutoImageProcessor.from_pretrained(path)


def calibration_pixels(calibration: Any, preprocessor: Any = None, *, limit: int | None = None) -> np.ndarray:
    """Calibration inputs as one float32 ``pixel_values`` array (N, channels, height, width).

    Args:
        calibration: a directory of images (searched recursively, sorted by path), a float array
            (N, C, H, W) of pixel values already processed, or a sequence of such arrays (batches).
        preprocessor: the checkpoint's image processor (an object, or a directory holding
            ``preprocessor_config.json``); needed for a directory of images.
        limit: use at most this many images (the first ones).

    Raises:
        FileNotFoundError: the directory does not exist. ValueError: it holds no images, or the
        arrays are not (N, C, H, W).
    """
    if calibration is None:
        raise ValueError("int8-static quantization needs calibration images: a directory of images or "
                         "pixel_values arrays")
    if isinstance(calibration, (str, os.PathLike)):
        root = pathlib.Path(calibration)
        if not root.exists():
            raise FileNotFoundError(f"calibration directory {root} does not exist")
        if not root.is_dir():
            raise ValueError(f"calibration {root} is not a directory of images")
        files = _image_files(root)
        if not files:
            raise ValueError(f"calibration directory {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        processor = load_processor(preprocessor)
        if processor is None:
            raise ValueError("calibration images need the checkpoint's image processor (preprocessor=)")
        from PIL import Image

        files = files[:limit] if limit else files
        batches = []
        for start in range(0, len(files), 32):
            images = []
            for path in files[start:start + 32]:
                try:
                    with Image.open(path) as image:
                        images.append(image.convert("RGB"))
                except OSError as exc:
                    raise ValueError(f"calibration image {path} cannot be read: {exc}") from exc
            batches.append(processor(images, return_tensors="np")["pixel_values"])
        return np.concatenate(batches).astype(np.float32)
    arrays = [calibration] if isinstance(calibration, np.ndarray) else list(calibration)
    if not arrays:
        raise ValueError("calibration holds no arrays")
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    for a in arrays:
        if a.ndim != 4:
            raise ValueError(f"calibration arrays must be pixel_values (N, channels, height, width); got shape {a.shape}")
    pixels = np.concatenate(arrays)
    if len(pixels) == 0:
        raise ValueError("calibration holds no images")
    return pixels[:limit] if limit else pixels


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """How an int8 model's logits (N, classes) agree with the float32 model's on the same images.

    Returns top1_agreement (fraction of images with the same argmax), cosine_mean and cosine_min
    (per-image cosine similarity of the two logit vectors) and max_abs_diff.
    """
    reference = np.asarray(reference, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    if reference.shape != logits.shape or reference.ndim != 2:
        raise ValueError(f"logits shapes differ or are not (N, classes): {reference.shape} vs {logits.shape}")
    cosine = np.sum(reference * logits, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(logits, axis=1))
    return {"images": int(len(reference)),
            "top1_agreement": float(np.mean(np.argmax(reference, 1) == np.argmax(logits, 1))),
            "cosine_mean": float(np.mean(cosine)), "cosine_min": float(np.min(cosine)),
            "max_abs_diff": float(np.max(np.abs(reference - logits)))}
