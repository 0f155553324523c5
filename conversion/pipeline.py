"""``pipeline(task, model=..., framework=...)``: transformers' image-classification and
image-feature-extraction pipelines for any checkpoint vitx reads, in any of the three frameworks.

```python
classify = pipeline("image-classification", model="facebook/deit-tiny-patch16-224", framework="flax")
classify("cat.jpg")            # [{"label": "tabby, tabby cat", "score": 0.93}, ...] (top 5)
classify(["a.jpg", "b.png"])   # one list per image
features = pipeline("image-feature-extraction", model="facebook/dino-vits16", framework="tf")
features("cat.jpg")            # [[[...], ...]]: (1, tokens, hidden) as nested lists
```

The results are those of transformers 4.57.6's pipelines: the same nesting for one image and for
a list, the same keys, labels and scores (softmax / sigmoid of the float32 logits in float32,
sorted by score, top_k clamped to the number of labels), feature-extraction's ``.tolist()`` of
the (1, tokens, hidden) ``last_hidden_state`` (or of the (1, hidden) ``pooler_output`` with
``pool=True``). Images are loaded as transformers' ``load_image`` does (EXIF orientation applied,
converted to RGB). See docs/pipeline.md.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from vit_core import ViTConfig
from vit_core.checkpoint.lazy import materialize

from .compare import open_image
from .detect import open_checkpoint
from .formats.base import task_of
from .frameworks import FRAMEWORKS, build_model, framework_input, pinned_precision, to_numpy, unavailable

SUPPORTED_TASKS = ("image-classification", "image-feature-extraction")
# transformers' spellings ("pt", "tf") and vitx's ("torch", "tf", "flax"), with "jax" for flax.
FRAMEWORK_ALIASES: dict[str, str] = {"pt": "torch", "torch": "torch", "pytorch": "torch", "tf": "tf",
                                     "tensorflow": "tf", "flax": "flax", "jax": "flax"}
# The module a vitx model class lives in -> its framework.
_MODEL_PACKAGES: dict[str, str] = {"vit_torch": "torch", "vit_tf": "tf", "vit_flax": "flax"}
_FUNCTIONS = ("default", "sigmoid", "softmax", "none")


# --------------------------------------------------------------------------------------------- arguments
def resolve_framework(framework: str | None) -> str | None:
    """"pt" / "torch" / "tf" / "tensorflow" / "flax" / "jax" -> "torch", "tf" or "flax" (None stays None).

    Args:
        framework: the name as transformers ("pt", "tf") or vitx ("torch", "tf", "flax") spells it.
    """
    if framework is None:
        return None
    name = FRAMEWORK_ALIASES.get(str(framework).lower()) if isinstance(framework, str) else None
    if name is None:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)} (or 'pt', 'jax'), got {framework!r}")
    return name


def framework_of_model(model: Any) -> str | None:
    """The framework of a vitx model object (from the package its class is defined in), or None.

    Args:
        model: a vit_torch, vit_tf or vit_flax model object.
    """
    for klass in type(model).__mro__:
        package = (klass.__module__ or "").split(".")[0]
        if package in _MODEL_PACKAGES:
            return _MODEL_PACKAGES[package]
    return None


def check_device(device: Any) -> None:
    """vitx pipelines run on the CPU: ``device`` must be None, "cpu", -1 or ``torch.device("cpu")``.

    Args:
        device: transformers' ``device`` argument.
    """
    if device is None or (isinstance(device, str) and device.lower() == "cpu"):
        return
    if isinstance(device, int) and not isinstance(device, bool) and device == -1:
        return
    if type(device).__module__.startswith("torch") and getattr(device, "type", None) == "cpu":
        return
    raise ValueError(
        f"device={device!r} is not supported: vitx pipelines run on the CPU; pass device=None, 'cpu', -1 or "
        "torch.device('cpu') (put a model on an accelerator yourself and call it directly)"
    )


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def load_image(image: Any) -> Any:
    """A path or PIL image as transformers' ``load_image`` gives it: EXIF orientation applied,
    converted to RGB. Arrays and framework tensors are returned unchanged (the image processor
    reads them).

    Args:
        image: a local path, a PIL image, or an array-like image.
    """
    from PIL import Image, ImageOps

    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise ValueError(f"image {image!r}: vitx pipelines do not download images; download the file and pass its path")
    image = open_image(image)
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    return image


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    if isinstance(images, (list, tuple)):
        return False
    shape = getattr(images, "shape", None)
    return shape is None or len(shape) in (2, 3)  # a PIL image or a framework tensor of one image


# --------------------------------------------------------------------------------------------- pipelines
class Pipeline:
    """The common part of vitx's pipelines: the model in one framework, its image processor, and
    batched calls. Subclasses define ``_model_task`` and ``_postprocess``.

    Args:
        model: a checkpoint (directory, weights file, hub id, timm state dict, JAX / big_vision
            npz) or a vitx model object (vit_torch / vit_tf / vit_flax; its framework is inferred).
        framework: "torch" / "pt", "tf" or "flax" / "jax"; None: the model object's framework, or
            "torch" for a checkpoint.
        image_processor: an image processor object, or a path / hub id read with
            ``AutoImageProcessor.from_pretrained``; None: the checkpoint's preprocessor_config.json
            (through AutoImageProcessor), else ``ViTImageProcessor`` at the config's image size.
        device: None, "cpu", -1 or ``torch.device("cpu")``.
        batch_size: images per forward call (default 1, as transformers).
        timm_model_name: the timm architecture name of a timm state dict.
        revision: the hub revision of a hub id (checkpoint and preprocessor file).
        token: the hub token for a hub id.
        use_fast: passed to ``AutoImageProcessor.from_pretrained`` when the processor is read
            from a file (True: ``ViTImageProcessorFast`` for ViT files).
    """

    task: str = ""

    def __init__(self, model: Any, *, framework: str | None = None, image_processor: Any = None, device: Any = None,
                 batch_size: int | None = None, timm_model_name: str | None = None, revision: str | None = None,
                 token: str | bool | None = None, use_fast: bool | None = None) -> None:
        self._hub = {"revision": revision, "token": token}
        self._use_fast = use_fast
        check_device(device)
        self.batch_size = 1 if batch_size is None else _check_positive_int(batch_size, "batch_size")
        requested = resolve_framework(framework)
        directory: pathlib.Path | None = None
        if isinstance(model, (str, os.PathLike)):
            self.framework = requested or "torch"
            self._check_available()
            self.model, self.config, directory = self._load(model, timm_model_name)
        elif model is None:
            raise ValueError(f"pipeline({self.task!r}) needs model=<checkpoint path, hub id or vitx model> "
                             "(vitx has no default model)")
        else:
            inferred = framework_of_model(model)
            if inferred is None:
                raise ValueError(
                    f"model must be a checkpoint path, a hub id or a vitx model (vit_torch, vit_tf, vit_flax), got "
                    f"{type(model).__module__}.{type(model).__qualname__}"
                )
            if requested is not None and requested != inferred:
                raise ValueError(f"framework={framework!r} but the model is a {inferred} model "
                                 f"({type(model).__qualname__}); drop framework= or pass framework={inferred!r}")
            self.framework = inferred
            self._check_object(model)
            self.model, self.config = model, model.config
        self.image_processor = self._make_processor(image_processor, model, directory)

    # ----------------------------------------------------------------------------- loading
    def _check_available(self) -> None:
        why = unavailable(self.framework)
        if why is not None:
            raise ImportError(f"framework {self.framework!r} cannot run: {why}")

    def _model_task(self, state_task: str, source: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state_for(self, task: str, state: Mapping[str, Any]) -> dict[str, Any]:
        return dict(state)

    def _check_object(self, model: Any) -> None:
        """Refuse a model object the task cannot use (classification needs a classifier)."""

    def _load(self, model: str | os.PathLike, timm_model_name: str | None) -> tuple[Any, ViTConfig, pathlib.Path | None]:
        loaded = open_checkpoint(model, timm_model_name=timm_model_name, **self._hub)
        task = self._model_task(task_of(loaded.state), str(model))
        config: ViTConfig = loaded.config
        source = pathlib.Path(loaded.path) if loaded.path else pathlib.Path(model)
        directory = source if source.is_dir() else source.parent if source.exists() else None
        state = self._state_for(task, materialize(loaded.state))
        with pinned_precision(self.framework):
            built = build_model(self.framework, config, state, task, str(model))
        return built, config, directory

    def _make_processor(self, image_processor: Any, model: Any, directory: pathlib.Path | None) -> Any:
        from vit_core.image_processing import PREPROCESSOR_CONFIG_NAME, AutoImageProcessor, ViTImageProcessor

        if image_processor is not None:
            if isinstance(image_processor, (str, os.PathLike)):
                return AutoImageProcessor.from_pretrained(image_processor, use_fast=self._use_fast, **self._hub)
            if not callable(image_processor):
                raise ValueError(f"image_processor must be an image processor or a path, got {type(image_processor).__name__}")
            return image_processor
        if directory is not None and (directory / PREPROCESSOR_CONFIG_NAME).is_file():
            return AutoImageProcessor.from_pretrained(directory, use_fast=self._use_fast)
        h, w = self.config.image_hw
        why = None
        if not isinstance(model, (str, os.PathLike)):
            why = "no image_processor was given with the model object"
        elif not pathlib.Path(model).exists():  # a hub id: its preprocessor_config.json from the hub
            try:
                return AutoImageProcessor.from_pretrained(str(model), use_fast=self._use_fast, **self._hub)
            except OSError as e:
                why = f"{model} has no readable {PREPROCESSOR_CONFIG_NAME} ({e})"
        if why is not None:
            warnings.warn(
                f"{why}: using ViTImageProcessor(size={h}x{w}) with its defaults (bilinear, mean = std = 0.5); pass "
                "image_processor=<processor or checkpoint path> for the checkpoint's own preprocessing",
                UserWarning,
                stacklevel=4,
            )
        return ViTImageProcessor(size={"height": h, "width": w})

    # ----------------------------------------------------------------------------- running
    def _forward(self, images: list[Any], processor_kwargs: Mapping[str, Any]) -> Any:
        pixel_values = np.asarray(self.image_processor(images, return_tensors="np", **processor_kwargs)["pixel_values"],
                                  dtype=np.float32)
        with pinned_precision(self.framework):
            return self.model(framework_input(self.framework, pixel_values))

    def _run(self, images: Any, processor_kwargs: Mapping[str, Any], **post: Any) -> Any:
        single = _is_single(images)
        if single:
            batch: list[Any] = [images]
        elif isinstance(images, (list, tuple)):
            batch = list(images)
        else:
            batch = list(np.asarray(to_numpy(images)))  # a (batch, ...) array
        if not batch:
            return []
        loaded = [load_image(image) for image in batch]
        results: list[Any] = []
        for start in range(0, len(loaded), self.batch_size):
            outputs = self._forward(loaded[start:start + self.batch_size], processor_kwargs)
            results.extend(self._postprocess(outputs, **post))
        return results[0] if single else results

    def _postprocess(self, outputs: Any, **options: Any) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class ImageClassificationPipeline(Pipeline):
    """Callable: images -> top-k ``{"label", "score"}`` dicts sorted by score (a list per image
    for a list of images), as transformers' image-classification pipeline.

    Args:
        model, framework, image_processor, device, batch_size, timm_model_name, revision, token,
            use_fast: see ``Pipeline``.
        top_k: labels per image (default 5; clamped to the number of labels).
        function_to_apply: "default" (sigmoid for multi-label or single-output models, softmax
            otherwise), "sigmoid", "softmax" or "none" (the raw logits).
    """

    task = "image-classification"

    def __init__(self, model: Any, framework: str | None = None, top_k: int | None = 5, *,
                 function_to_apply: str | None = None, **kwargs: Any) -> None:
        self.top_k = 5 if top_k is None else _check_positive_int(top_k, "top_k")
        self.function_to_apply = self._check_function(function_to_apply)
        super().__init__(model, framework=framework, **kwargs)

    @staticmethod
    def _check_function(name: Any) -> str | None:
        if name is None:
            return None
        value = str(getattr(name, "value", name)).lower()
        if value not in _FUNCTIONS:
            raise ValueError(f"function_to_apply must be one of {', '.join(_FUNCTIONS)}, got {name!r}")
        return value

    def _model_task(self, state_task: str, source: str) -> str:
        if state_task != "classification":
            raise ValueError(f"{source}: not an image-classification checkpoint (it is a "
                             f"{'ViTModel' if state_task == 'base' else 'ViTForMaskedImageModeling'} without a "
                             "classifier head); use pipeline('image-feature-extraction', ...) for its features")
        return "classification"

    def _check_object(self, model: Any) -> None:
        if "ForImageClassification" not in type(model).__name__:
            raise ValueError(f"image-classification needs a *ForImageClassification model, got {type(model).__qualname__}")

    def __call__(self, inputs: Any = None, *, images: Any = None, top_k: int | None = None,
                 function_to_apply: str | None = None, timeout: float | None = None) -> list[Any]:
        """Classify one image or a list of images.

        Args:
            inputs: a path, a PIL image, an array, or a list of them (``images=`` is the same).
            top_k: overrides the pipeline's top_k for this call.
            function_to_apply: overrides the pipeline's function for this call.
            timeout: accepted for transformers' signature; vitx reads local files only.

        Returns:
            A list of ``{"label", "score"}`` dicts for one image, a list of such lists for a list.
        """
        inputs = images if inputs is None else inputs
        if inputs is None:
            raise ValueError("Cannot call the image-classification pipeline without an inputs argument!")
        k = self.top_k if top_k is None else _check_positive_int(top_k, "top_k")
        function = self.function_to_apply if function_to_apply is None else self._check_function(function_to_apply)
        return self._run(inputs, {}, top_k=k, function_to_apply=function)

    def _postprocess(self, outputs: Any, top_k: int, function_to_apply: str | None) -> list[Any]:
        logits = to_numpy(outputs.logits).astype(np.float32)  # transformers: float32 numpy scores
        config = self.config
        function = function_to_apply or "default"
        if function == "default":
            if config.problem_type == "multi_label_classification" or config.num_labels == 1:
                function = "sigmoid"
            else:
                function = "softmax"
        if function == "sigmoid":
            scores = 1.0 / (1.0 + np.exp(-logits))
        elif function == "softmax":
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            scores = shifted / shifted.sum(axis=-1, keepdims=True)
        else:
            scores = logits
        k = min(top_k, config.num_labels)
        results = []
        for row in scores:
            entries = [{"label": config.id2label.get(i, f"LABEL_{i}"), "score": row[i].item()} for i in range(len(row))]
            entries.sort(key=lambda entry: entry["score"], reverse=True)  # stable, as transformers'
            results.append(entries[:k])
        return results


class ImageFeatureExtractionPipeline(Pipeline):
    """Callable: images -> the base model's features, as transformers' image-feature-extraction
    pipeline: ``last_hidden_state`` of shape (1, tokens, hidden) per image as nested lists (the
    model's first output for a model object, as transformers takes ``outputs[0]``), or with
    ``pool=True`` the (1, hidden) ``pooler_output``.

    A classification checkpoint gives its encoder (the classifier dropped); a checkpoint without
    a pooler has no pooled output (``pool=True`` raises, where transformers would pool with
    random weights).

    Args:
        model, framework, image_processor, device, batch_size, timm_model_name, revision, token,
            use_fast: see ``Pipeline``.
        pool: return ``pooler_output`` instead of ``last_hidden_state``.
        return_tensors: return the framework's tensor instead of nested lists.
        image_processor_kwargs: options passed to every image processor call.
    """

    task = "image-feature-extraction"

    def __init__(self, model: Any, framework: str | None = None, *, pool: bool | None = None,
                 return_tensors: bool | None = None, image_processor_kwargs: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.pool = bool(pool) if pool is not None else False
        self.return_tensors = bool(return_tensors) if return_tensors is not None else False
        self.image_processor_kwargs = dict(image_processor_kwargs or {})
        super().__init__(model, framework=framework, **kwargs)

    def _model_task(self, state_task: str, source: str) -> str:
        return "base"

    def _state_for(self, task: str, state: Mapping[str, Any]) -> dict[str, Any]:
        # A task checkpoint's encoder is under "vit." and its head beside it: keep the encoder only.
        return {k.removeprefix("vit."): v for k, v in state.items() if not k.startswith(("classifier.", "decoder."))}

    def __call__(self, inputs: Any = None, *, images: Any = None, pool: bool | None = None,
                 return_tensors: bool | None = None, image_processor_kwargs: Mapping[str, Any] | None = None,
                 timeout: float | None = None) -> Any:
        """Extract the features of one image or a list of images.

        Args:
            inputs: a path, a PIL image, an array, or a list of them (``images=`` is the same).
            pool: overrides the pipeline's ``pool`` for this call.
            return_tensors: overrides the pipeline's ``return_tensors`` for this call.
            image_processor_kwargs: overrides the pipeline's processor options for this call.
            timeout: accepted for transformers' signature; vitx reads local files only.

        Returns:
            For one image the nested list (or tensor) of shape (1, tokens, hidden) / (1, hidden);
            for a list, a list of those.
        """
        inputs = images if inputs is None else inputs
        if inputs is None:
            raise ValueError("Cannot call the image-feature-extraction pipeline without an inputs argument!")
        kwargs = {**self.image_processor_kwargs, **dict(image_processor_kwargs or {})}
        return self._run(inputs, kwargs, pool=self.pool if pool is None else bool(pool),
                         return_tensors=self.return_tensors if return_tensors is None else bool(return_tensors))

    def _postprocess(self, outputs: Any, pool: bool, return_tensors: bool) -> list[Any]:
        if pool:
            pooled = outputs.get("pooler_output") if hasattr(outputs, "get") else getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ValueError("No pooled output was returned. Make sure the model has a `pooler` layer when using "
                                 "the `pool` option (this checkpoint has no pooler weights).")
            features = to_numpy(pooled)
        else:
            features = to_numpy(outputs[0])
        per_image = [features[i:i + 1] for i in range(features.shape[0])]
        if return_tensors:
            return [framework_input(self.framework, np.ascontiguousarray(f)) for f in per_image]
        return [f.tolist() for f in per_image]


_PIPELINES: dict[str, type[Pipeline]] = {
    "image-classification": ImageClassificationPipeline,
    "image-feature-extraction": ImageFeatureExtractionPipeline,
}


def pipeline(task: str, model: Any = None, *, framework: str | None = None, image_processor: Any = None,
             device: Any = None, batch_size: int | None = None, top_k: int | None = None,
             function_to_apply: str | None = None, pool: bool | None = None, return_tensors: bool | None = None,
             image_processor_kwargs: Mapping[str, Any] | None = None,
             timm_model_name: str | None = None, revision: str | None = None, token: str | bool | None = None,
             use_fast: bool | None = None) -> Pipeline:
    """transformers-style factory for "image-classification" and "image-feature-extraction".

    Args:
        task: "image-classification" or "image-feature-extraction".
        model: a checkpoint vitx reads (directory, file, hub id, timm state dict, JAX / big_vision
            npz) or a vitx model object of any framework.
        framework: "torch" / "pt", "tf", "flax" / "jax"; None: the model object's own, or "torch".
        image_processor: an image processor object or a path / hub id (AutoImageProcessor).
        device: None, "cpu", -1 or ``torch.device("cpu")``; anything else is an error.
        batch_size: images per forward call (default 1).
        top_k: image-classification: labels per image (default 5).
        function_to_apply: image-classification: "default", "sigmoid", "softmax" or "none".
        pool: image-feature-extraction: return ``pooler_output``.
        return_tensors: image-feature-extraction: return tensors instead of nested lists.
        image_processor_kwargs: image-feature-extraction: options for the image processor calls.
        timm_model_name: the timm architecture of a timm state dict.
        revision: the hub revision of a hub id.
        token: the hub token for a hub id.
        use_fast: ``AutoImageProcessor``'s ``use_fast`` for a processor read from a file.

    Returns:
        An ``ImageClassificationPipeline`` or an ``ImageFeatureExtractionPipeline``.
    """
    if task is None:
        raise ValueError(f"pipeline needs a task, one of {', '.join(SUPPORTED_TASKS)} (vitx does not look the "
                         "task up on the hub)")
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"unsupported pipeline task {task!r}; vitx provides {', '.join(SUPPORTED_TASKS)}")
    common = dict(framework=framework, image_processor=image_processor, device=device, batch_size=batch_size,
                  timm_model_name=timm_model_name, revision=revision, token=token, use_fast=use_fast)
    if task == "image-classification":
        if pool is not None or return_tensors is not None or image_processor_kwargs is not None:
            raise ValueError("pool, return_tensors and image_processor_kwargs are options of image-feature-extraction, "
                             "not of image-classification")
        return ImageClassificationPipeline(model, top_k=top_k, function_to_apply=function_to_apply, **common)
    if top_k is not None or function_to_apply is not None:
        raise ValueError("top_k and function_to_apply are options of image-classification, not of "
                         "image-feature-extraction")
    return ImageFeatureExtractionPipeline(model, pool=pool, return_tensors=return_tensors,
                                          image_processor_kwargs=image_processor_kwargs, **common)


__all__ = [
    "FRAMEWORK_ALIASES",
    "ImageClassificationPipeline",
    "ImageFeatureExtractionPipeline",
    "Pipeline",
    "SUPPORTED_TASKS",
    "check_device",
    "framework_of_model",
    "load_image",
    "pipeline",
    "resolve_framework",
]
