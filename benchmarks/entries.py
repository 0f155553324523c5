"""What each benchmark entry runs: how it loads the shared checkpoint and what one call is.

An entry's builder gets the model's fixture directory, the dtype name and the input batch (numpy)
and returns a zero-argument ``call`` that runs one forward and returns the logits as a numpy array
on the host (so a call is finished when it returns: no lazy / asynchronous result is timed short).
Builders import their framework lazily: a child process imports only the one it runs.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import engines
from .common import TIMM_NAMES, timm_kwargs

Call = Callable[[], np.ndarray]
Builder = Callable[[pathlib.Path, str, str, np.ndarray], Call]


@dataclass(frozen=True)
class Entry:
    """A benchmark entry: its framework, which venv runs it, and whether it is vitx or a peer."""

    name: str
    framework: str   # torch | tf | flax | engine (ONNX Runtime, OpenVINO)
    venv: str        # main | peers
    vitx: bool
    builder: Builder
    description: str


# ----------------------------------------------------------------------------------------- torch
def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _torch_call(module, pixels: np.ndarray, dtype: str, grad_mode: str = "inference") -> Call:
    """One forward of a torch module under inference_mode (no_grad for torch.compile, whose frozen
    graphs are built under no_grad), logits back as float32 numpy."""
    import torch

    x = torch.from_numpy(pixels).to(_torch_dtype(dtype))
    context = torch.inference_mode if grad_mode == "inference" else torch.no_grad

    def call() -> np.ndarray:
        with context():
            out = module(x)
            logits = out.logits if hasattr(out, "logits") else out
            return logits.float().numpy()

    return call


def _compile(module):
    """torch.compile with inductor freezing: weights become constants, so inductor can prepack them
    (the best torch.compile setting for CPU inference; the same for vitx and the peers)."""
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(module)


def _vitx_torch(attn_implementation: str, compiled: bool) -> Builder:
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Call:
        from vit_torch import ViTForImageClassification

        module = ViTForImageClassification.from_pretrained(
            directory, torch_dtype=_torch_dtype(dtype), attn_implementation=attn_implementation)
        module.eval()
        if compiled:
            return _torch_call(_compile(module), pixels, dtype, grad_mode="no_grad")
        return _torch_call(module, pixels, dtype)

    return build


def _hf5_torch(compiled: bool) -> Builder:
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Call:
        from transformers import ViTForImageClassification

        module = ViTForImageClassification.from_pretrained(
            directory, dtype=_torch_dtype(dtype), attn_implementation="sdpa")
        module.eval()
        if compiled:
            return _torch_call(_compile(module), pixels, dtype, grad_mode="no_grad")
        return _torch_call(module, pixels, dtype)

    return build


def _timm(compiled: bool) -> Builder:
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Call:
        import timm

        # timm's own file-loading path (pretrained=True with a local file), fused qkv + F.sdpa.
        module = timm.create_model(TIMM_NAMES[model], pretrained=True, num_classes=1000,
                                   pretrained_cfg_overlay=dict(file=str(directory / "timm.safetensors")),
                                   **timm_kwargs(model))
        module = module.eval().to(_torch_dtype(dtype))
        if compiled:
            return _torch_call(_compile(module), pixels, dtype, grad_mode="no_grad")
        return _torch_call(module, pixels, dtype)

    return build


# -------------------------------------------------------------------------------------------- tf
def _tf_call(fn, pixels: np.ndarray, dtype: str) -> Call:
    import tensorflow as tf

    x = tf.constant(pixels, dtype=tf.bfloat16 if dtype == "bfloat16" else tf.float32)

    def call() -> np.ndarray:
        return np.asarray(tf.cast(fn(x), tf.float32))

    return call


def _tf_mode(model_fn, mode: str):
    import tensorflow as tf

    if mode == "eager":
        return model_fn
    return tf.function(model_fn, jit_compile=(mode == "xla"))


def _vitx_tf(mode: str) -> Builder:
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Call:
        from vit_tf import TFViTForImageClassification

        module = TFViTForImageClassification.from_pretrained(directory, dtype=dtype)

        def forward(x):
            return module(x, training=False).logits

        return _tf_call(_tf_mode(forward, mode), pixels, dtype)

    return build


def _hf4_tf(mode: str) -> Builder:
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Call:
        if dtype == "bfloat16":
            # transformers' TF models have no dtype argument; Keras mixed precision is their bf16
            # mode (float32 variables, bfloat16 compute), set before the model is built.
            import tf_keras

            tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
        from transformers import TFViTForImageClassification

        module = TFViTForImageClassification.from_pretrained(directory, from_pt=True)

        def forward(x):
            return module(pixel_values=x, training=False).logits

        return _tf_call(_tf_mode(forward, mode), pixels, "float32" if dtype == "bfloat16" else dtype)

    return build


# ------------------------------------------------------------------------------------------ flax
def _jnp_dtype(dtype: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


def _vitx_flax(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Call:
    """vit_flax's own call: the model's ``__call__`` runs its forward through vit_flax's jit cache
    (the documented way, including its per-call overhead). bfloat16 stores and computes in bf16,
    like the peer's ``to_bf16`` params."""
    import jax

    from vit_flax import FlaxViTForImageClassification

    module = FlaxViTForImageClassification.from_pretrained(directory, dtype=_jnp_dtype(dtype),
                                                           param_dtype=_jnp_dtype(dtype))
    x = jax.device_put(pixels.astype(_jnp_dtype(dtype)))

    def call() -> np.ndarray:
        return np.asarray(module(x).logits.astype("float32"))

    return call


def _hf4_flax(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Call:
    import jax
    from transformers import FlaxViTForImageClassification

    module = FlaxViTForImageClassification.from_pretrained(directory, from_pt=True, dtype=_jnp_dtype(dtype))
    params = module.params
    if dtype == "bfloat16":
        params = module.to_bf16(params)

    @jax.jit
    def forward(params, x):
        return module(x, params=params, train=False).logits

    x = jax.device_put(pixels.astype(_jnp_dtype(dtype)))

    def call() -> np.ndarray:
        return np.asarray(forward(params, x).astype("float32"))

    return call


ENTRIES: dict[str, Entry] = {e.name: e for e in [
    Entry("vitx-torch-sdpa", "torch", "main", True, _vitx_torch("sdpa", False), "vit_torch, sdpa attention"),
    Entry("vitx-torch-eager", "torch", "main", True, _vitx_torch("eager", False), "vit_torch, eager attention"),
    Entry("vitx-torch-compile", "torch", "main", True, _vitx_torch("sdpa", True), "vit_torch, torch.compile (freezing)"),
    Entry("vitx-tf-eager", "tf", "main", True, _vitx_tf("eager"), "vit_tf, Keras eager call"),
    Entry("vitx-tf-function", "tf", "main", True, _vitx_tf("function"), "vit_tf, tf.function"),
    Entry("vitx-tf-xla", "tf", "main", True, _vitx_tf("xla"), "vit_tf, tf.function(jit_compile=True)"),
    Entry("vitx-flax-jit", "flax", "main", True, _vitx_flax, "vit_flax, the model's own jit-compiled call"),
    Entry("hf5-torch-sdpa", "torch", "peers", False, _hf5_torch(False), "transformers 5.x ViTForImageClassification, sdpa"),
    Entry("hf5-torch-compile", "torch", "peers", False, _hf5_torch(True), "transformers 5.x, sdpa, torch.compile (freezing)"),
    Entry("timm-torch", "torch", "peers", False, _timm(False), "timm vit_*_patch16_224 (fused attn)"),
    Entry("timm-torch-compile", "torch", "peers", False, _timm(True), "timm, torch.compile (freezing)"),
    Entry("hf4-tf-eager", "tf", "main", False, _hf4_tf("eager"), "transformers 4.57 TFViTForImageClassification, eager"),
    Entry("hf4-tf-function", "tf", "main", False, _hf4_tf("function"), "transformers 4.57 TF, tf.function"),
    Entry("hf4-tf-xla", "tf", "main", False, _hf4_tf("xla"), "transformers 4.57 TF, tf.function(jit_compile=True)"),
    Entry("hf4-flax-jit", "flax", "main", False, _hf4_flax, "transformers 4.57 FlaxViTForImageClassification, jax.jit"),
    # int8 (dtype "int8"): vit_torch's native int8 and the engines' (issue #13, docs/int8.md)
    Entry("vitx-torch-int8-dynamic", "torch", "main", True, engines.vitx_int8("int8-dynamic"),
          "vit_torch.quantization.quantize_dynamic (oneDNN int8 GEMMs)"),
    Entry("vitx-torch-int8-static", "torch", "main", True, engines.vitx_int8("int8-static"),
          "vit_torch.quantization.quantize_static (oneDNN int8 GEMMs, calibrated)"),
    # inference engines on vitx's ONNX export (benchmarks/engines.py)
    Entry("ort-fp32", "engine", "main", False, engines.ort("fp32"), "ONNX Runtime, vitx's ONNX export (vitx export's default, opset 23)"),
    Entry("ort-fp32-optimized", "engine", "main", False, engines.ort("optimized"),
          "ONNX Runtime, vitx's export through onnxruntime.transformers optimizer (model_type vit)"),
    Entry("ort-int8-dynamic", "engine", "main", False, engines.ort("int8-dynamic"), "ONNX Runtime quantize_dynamic"),
    Entry("ort-int8-static", "engine", "main", False, engines.ort("int8-static"), "ONNX Runtime quantize_static (QDQ)"),
    Entry("ov-fp32", "engine", "main", False, engines.openvino("fp32"), "OpenVINO CPU, INFERENCE_PRECISION_HINT f32"),
    Entry("ov-bf16", "engine", "main", False, engines.openvino("bf16"), "OpenVINO CPU, INFERENCE_PRECISION_HINT bf16"),
    Entry("ov-int8-static", "engine", "main", False, engines.openvino("int8-static"), "OpenVINO, NNCF quantize"),
    Entry("ov-int8-dynamic", "engine", "main", False, engines.openvino("int8-dynamic"),
          "OpenVINO, NNCF int8 weight compression + CPU dynamic quantization"),
    Entry("hf4-onnx-ort", "engine", "main", False, engines.ort("hf4"),
          "ONNX Runtime, transformers 4.57 ViT exported by torch.onnx (opset 17): the export baseline"),
]}
