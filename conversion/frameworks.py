"""Run one canonical checkpoint in vit_torch, vit_tf, vit_flax (or the float64 numpy reference).

Each framework is imported only here, inside the call that needs it, with its precision pinned
as docs/NUMERICS.md asks (TF32 off in torch and TF; JAX matmuls at "highest").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vit_core import ViTConfig

FRAMEWORKS: tuple[str, ...] = ("torch", "tf", "flax")
# Exported runtimes a parity report also runs: the torch model exported (conversion/export.py) and
# run by ONNX Runtime / OpenVINO (or, for an export directory, the model it holds).
EXPORTED: tuple[str, ...] = ("onnx", "openvino")
ALL_BACKENDS: tuple[str, ...] = FRAMEWORKS + ("reference",) + EXPORTED

_PACKAGES = {"torch": ("vit_torch", "torch", "vitx[torch]"), "tf": ("vit_tf", "tensorflow", "vitx[tf]"),
             "flax": ("vit_flax", "jax", "vitx[flax]")}
_CLASS_NAMES = {
    "torch": {"base": "ViTModel", "classification": "ViTForImageClassification", "mim": "ViTForMaskedImageModeling"},
    "tf": {"base": "TFViTModel", "classification": "TFViTForImageClassification", "mim": "TFViTForMaskedImageModeling"},
    "flax": {"base": "FlaxViTModel", "classification": "FlaxViTForImageClassification",
             "mim": "FlaxViTForMaskedImageModeling"},
}


def unavailable(framework: str) -> str | None:
    """Why ``framework`` cannot run here (None when it can)."""
    if framework == "reference":
        return None
    if framework in EXPORTED:
        needed = [("onnxruntime", "vitx[onnx]"), ("onnxscript", "vitx[onnx]"), ("torch", "vitx[torch]")]
        if framework == "openvino":
            needed.append(("openvino", "vitx[openvino]"))
        for dependency, extra in needed:
            if importlib.util.find_spec(dependency) is None:
                return f"{dependency} is not installed (pip install {extra})"
        return None
    if framework not in _PACKAGES:
        return f"unknown framework {framework!r}; choose from {', '.join(ALL_BACKENDS)}"
    package, dependency, extra = _PACKAGES[framework]
    if importlib.util.find_spec(dependency) is None:
        return f"{dependency} is not installed (pip install {extra})"
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install {extra})"
    return None


@dataclass
class Run:
    """One framework's outputs (numpy float32 arrays by output name) and its timings."""

    outputs: dict[str, np.ndarray]
    load_seconds: float
    forward_seconds: float


@contextlib.contextmanager
def pinned_precision(framework: str) -> Iterator[None]:
    if framework == "torch":
        import torch

        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    elif framework == "tf":
        import tensorflow as tf

        old = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(old)
    elif framework == "flax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


def build_model(framework: str, config: ViTConfig, state: Mapping[str, np.ndarray], task: str,
                source: str = "checkpoint", dtype: str = "float32") -> Any:
    """The framework's model class for ``task`` built in memory from a canonical state (strict:
    every weight of the model from ``state``), in inference mode. ``dtype`` ("float32", "bfloat16",
    "float16"): the model's dtype (torch: parameters cast; TF: the layers' dtype; Flax: the compute
    and parameter dtype)."""
    package = importlib.import_module(_PACKAGES[framework][0])
    cls = getattr(package, _CLASS_NAMES[framework][task])
    kwargs: dict[str, Any] = {}
    if task == "base":
        kwargs = {"add_pooling_layer": "pooler.dense.weight" in state, "use_mask_token": "embeddings.mask_token" in state}
    if dtype != "float32" and framework == "tf":
        kwargs["dtype"] = dtype
    elif dtype != "float32" and framework == "flax":
        kwargs.update(dtype=dtype, param_dtype=dtype)
    model = cls(config, **kwargs)
    weights = importlib.import_module(f"{_PACKAGES[framework][0]}.weights")
    weights.load_canonical_state(model, state, source=source)
    if dtype != "float32" and framework == "torch":
        import torch

        model = model.to(getattr(torch, dtype))
    if hasattr(model, "eval"):
        model.eval()
    return model


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        return np.asarray(value.numpy())
    return np.asarray(value)


def framework_input(framework: str, array: np.ndarray) -> Any:
    if framework == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(array))
    if framework == "tf":
        import tensorflow as tf

        return tf.convert_to_tensor(array)
    if framework == "flax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    return array


def run_framework(framework: str, state: Mapping[str, np.ndarray], task: str, pixel_values: np.ndarray,
                  *, hidden_states: bool, config: ViTConfig) -> Run:
    """Build the model of ``framework`` from the canonical ``state`` and run ``pixel_values`` (batch, C, H, W) float32.

    Outputs: ``logits`` / ``last_hidden_state`` (+ ``pooler_output``) / ``reconstruction``, and
    with ``hidden_states`` each ``hidden_states[i]`` (embeddings output and every layer's output).
    ``reference`` runs vit_core's float64 numpy forward on ``state``.
    """
    if framework == "reference":
        from vit_core.reference import forward

        start = time.perf_counter()
        out = forward(dict(state), config, pixel_values, task, add_pooling_layer="pooler.dense.weight" in state)
        elapsed = time.perf_counter() - start
        return Run(_collect(out, hidden_states), 0.0, elapsed)
    if framework in EXPORTED:
        from .export import run_exported

        start = time.perf_counter()
        run = run_exported(framework, state, task, config)
        loaded = time.perf_counter()
        outputs = {name: value.astype(np.float64) for name, value in run(pixel_values).items()}
        return Run(outputs, loaded - start, time.perf_counter() - loaded)
    with pinned_precision(framework):
        start = time.perf_counter()
        model = build_model(framework, config, state, task)
        loaded = time.perf_counter()
        out = model(framework_input(framework, pixel_values), output_hidden_states=hidden_states)
        outputs = _collect(out, hidden_states)
        done = time.perf_counter()
    del model
    return Run(outputs, loaded - start, done - loaded)


def _collect(out: Any, hidden_states: bool) -> dict[str, np.ndarray]:
    get = (lambda k: out.get(k)) if hasattr(out, "get") else (lambda k: getattr(out, k, None))
    outputs: dict[str, np.ndarray] = {}
    for name in ("logits", "last_hidden_state", "pooler_output", "reconstruction"):
        value = get(name)
        if value is not None:
            outputs[name] = to_numpy(value).astype(np.float64)
    if hidden_states:
        for i, h in enumerate(get("hidden_states") or ()):
            outputs[f"hidden_states[{i}]"] = to_numpy(h).astype(np.float64)
    return outputs
