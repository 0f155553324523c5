"""``pipeline("image-classification", model=..., framework=...)``: transformers' image-classification
pipeline for any checkpoint vitx reads, in any of the three frameworks.

```python
classify = pipeline("image-classification", model="google/vit-base-patch16-224", framework="flax")
classify("cat.jpg")            # [{"label": "tabby, tabby cat", "score": 0.93}, ...] (top 5)
classify(["a.jpg", "b.png"])   # one list per image
```
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_core import ViTConfig

from .compare import open_image
from .detect import open_checkpoint
from .formats.base import task_of
from .frameworks import FRAMEWORKS, build_model, framework_input, pinned_precision, to_numpy, unavailable
from vit_core.checkpoint.lazy import materialize

SUPPORTED_TASKS = ("image-classification",)


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    if isinstance(images, (list, tuple)):
        return False
    return True  # a PIL image or a framework tensor of one image


class ImageClassificationPipeline:
    """Callable: images -> top-k ``{"label", "score"}`` dicts sorted by score (a list per image
    for a batch). Scores are softmax probabilities, or sigmoids for multi-label / single-output
    models (as transformers' ``function_to_apply`` default)."""

    def __init__(self, model: str | os.PathLike, framework: str = "torch", top_k: int = 5,
                 timm_model_name: str | None = None) -> None:
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
        why = unavailable(framework)
        if why is not None:
            raise ImportError(f"framework {framework!r} cannot run: {why}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        self.framework = framework
        self.top_k = top_k
        loaded = open_checkpoint(model, timm_model_name=timm_model_name)
        task = task_of(loaded.state)
        if task != "classification":
            raise ValueError(f"{model}: not an image-classification checkpoint (it is a {loaded.config.extra.get('architectures', [task])[0]} "
                             "without a classifier head)")
        self.config: ViTConfig = loaded.config
        source = pathlib.Path(model)
        self._directory = source if source.is_dir() else source.parent if source.exists() else None
        with pinned_precision(framework):
            self.model = build_model(framework, self.config, materialize(loaded.state), "classification", str(model))
        self.processor = self._make_processor()

    def _make_processor(self) -> Any:
        from vit_core import ViTImageProcessor

        if self._directory is not None and (self._directory / "preprocessor_config.json").is_file():
            return ViTImageProcessor.from_pretrained(self._directory)
        h, w = self.config.image_hw
        return ViTImageProcessor(size={"height": h, "width": w})

    def __call__(self, images: Any, top_k: int | None = None) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        single = _is_single(images)
        batch: Sequence[Any] = [images] if single else list(images)
        if not batch:
            return []
        k = min(self.top_k if top_k is None else top_k, self.config.num_labels)
        pixel_values = np.asarray(self.processor([open_image(i) for i in batch], return_tensors="np")["pixel_values"],
                                  dtype=np.float32)
        with pinned_precision(self.framework):
            logits = to_numpy(self.model(framework_input(self.framework, pixel_values)).logits).astype(np.float64)
        if self.config.problem_type == "multi_label_classification" or self.config.num_labels == 1:
            scores = 1.0 / (1.0 + np.exp(-logits))
        else:
            shifted = logits - logits.max(axis=-1, keepdims=True)
            scores = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
        results = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            results.append([{"label": self.config.id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(row[i])}
                            for i in order])
        return results[0] if single else results


def pipeline(task: str, model: str | os.PathLike | None = None, framework: str = "torch", top_k: int = 5,
             timm_model_name: str | None = None) -> ImageClassificationPipeline:
    """transformers-style factory. ``task`` must be "image-classification"; ``model`` any checkpoint
    vitx reads (directory, file, hub id, timm state dict, JAX / big_vision npz)."""
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"unsupported pipeline task {task!r}; vitx provides {', '.join(SUPPORTED_TASKS)}")
    if model is None:
        raise ValueError("pipeline needs model=<checkpoint path or hub id> (vitx has no default model)")
    return ImageClassificationPipeline(model, framework=framework, top_k=top_k, timm_model_name=timm_model_name)
