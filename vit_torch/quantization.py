"""Native int8 inference for vit_torch: the Linear layers run oneDNN's int8 GEMM (docs/int8.md).

``quantize_dynamic(model)`` and ``quantize_static(model, calibration)`` return a copy of a float32
vit_torch model whose Linear layers (the roles of :mod:`vit_core.quantization`, less ``skip``)
are :class:`QuantizedLinear`: weights int8, symmetric, one scale per output channel; inputs
uint8, asymmetric, one scale per tensor — computed from each input's min / max at every call
(dynamic) or fixed from the min / max seen over the calibration images (static). The GEMM
(``torch.ops.onednn.qlinear_pointwise``) accumulates in int32 and writes float32 with the bias
added, so every other operation (patch embedding, LayerNorm, Softmax, GELU, the attention
matmuls, the residual adds) stays float32 and the model returns the same output classes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from vit_core import cpu
from vit_core.quantization import calibration_pixels, resolve_skip

from .layers import _ONEDNN_POST_OPS, Linear

# module name -> role (vit_core.quantization.ROLES)
_ROLE_PATTERNS = [
    (re.compile(r"(^|\.)attention\.attention\.(query|key|value)$"), "qkv"),
    (re.compile(r"(^|\.)attention\.output\.dense$"), "attention_output"),
    (re.compile(r"(^|\.)intermediate\.dense$"), "fc1"),
    (re.compile(r"(^|\.)layer\.\d+\.output\.dense$"), "fc2"),
    (re.compile(r"(^|\.)pooler\.dense$"), "pooler"),
    (re.compile(r"^classifier$"), "classifier"),
]
_QMIN, _QMAX = 0, 255  # uint8 activations


def linear_role(name: str) -> str | None:
    """The quantization role of the vit_torch module called ``name`` (None: not a ViT Linear)."""
    for pattern, role in _ROLE_PATTERNS:
        if pattern.search(name):
            return role
    return None


def _uint8_params(low: float, high: float) -> tuple[float, int]:
    """Asymmetric uint8 scale and zero point covering [low, high] and 0 (ONNX Runtime's MinMax rule)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (_QMAX - _QMIN)
    if scale == 0.0:  # an all-zero input: any scale represents it exactly
        return 1.0, 0
    return scale, int(np.clip(round(_QMIN - low / scale), _QMIN, _QMAX))


class QuantizedLinear(nn.Module):
    """An int8 Linear with vit_torch Linear's call interface (``post_op``, ``residual``).

    Weight (out_features, in_features) int8 with per-output-channel scales ``weight_scale``, in
    [-127, 127], or [-63, 63] (``weight_max``) on a CPU without VNNI, whose int8 GEMM would
    saturate (vit_core.cpu.int8_dot_saturates); the
    bias stays float32. ``input_scale`` / ``input_zero_point``: the static uint8 quantization of
    the input, or None to compute it from every input (dynamic).
    """

    def __init__(self, linear: nn.Linear, input_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # [-127, 127], or [-63, 63] on a CPU whose int8 GEMM adds product pairs in saturating int16
        self.weight_max = cpu.int8_weight_max()
        scale = weight.abs().amax(dim=1) / float(self.weight_max)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.register_buffer("weight_int8", torch.clamp(torch.round(weight / scale[:, None]), -self.weight_max,
                                                        self.weight_max).to(torch.int8))
        self.register_buffer("weight_scale", scale.contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.input_scale: float | None = None
        self.input_zero_point: int | None = None
        if input_range is not None:
            self.input_scale, self.input_zero_point = _uint8_params(*input_range)
        self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        self._packed: torch.Tensor | None = None

    def extra_repr(self) -> str:
        mode = "dynamic" if self.input_scale is None else f"static, input scale {self.input_scale:.3g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 ({mode}, weights in "
                f"[-{self.weight_max}, {self.weight_max}])")

    def packed_weight(self) -> torch.Tensor:
        """The int8 weight in oneDNN's layout, packed on first use."""
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
        return self._packed

    def onednn_ready(self, x: torch.Tensor) -> bool:
        """Whether the residual add can run inside the GEMM (float32 input on CPU, dropout inactive)."""
        return not self.training and x.dtype == torch.float32 and x.device.type == "cpu"

    def fuses(self, x: torch.Tensor, activation: str) -> bool:
        """Whether ``forward(x, post_op=activation)`` applies ``activation`` inside the GEMM."""
        return activation in _ONEDNN_POST_OPS and self.onednn_ready(x)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"int8 Linear layers take float32 CPU inputs; got {x.dtype} on {x.device}")
        if self.input_scale is None:
            low, high = torch.aminmax(x)
            scale, zero_point = _uint8_params(float(low), float(high))
        else:
            scale, zero_point = self.input_scale, self.input_zero_point
        qx = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, _QMIN, _QMAX).to(torch.uint8)
        return qx, scale, zero_point

    def forward(self, x: torch.Tensor, post_op: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(..., in_features) float32 -> (..., out_features) float32; ``post_op`` an activation name
        applied inside the GEMM (where :meth:`fuses` says so), ``residual`` added to the result."""
        # oneDNN's int8 GEMM on the 2-D (rows, in_features) view of the activation
        shape = (*x.shape[:-1], self.out_features)
        qx, scale, zero_point = self._quantize_input(x.reshape(-1, self.in_features).contiguous())
        if residual is not None:
            out = torch.ops.onednn.qlinear_pointwise.binary(
                qx, scale, zero_point, self.packed_weight(), self.weight_scale, self._zero_points,
                residual.reshape(-1, self.out_features).contiguous(), self.bias, 1.0, 0, torch.float32, 1.0, 0,
                "add", 1.0, "none", [], "")
            return out.reshape(shape)
        attr, algorithm = ("none", "")
        if post_op is not None:
            if not self.fuses(x, post_op):
                raise ValueError(f"activation {post_op!r} cannot be fused here; check QuantizedLinear.fuses first")
            attr, algorithm = _ONEDNN_POST_OPS[post_op]
        out = torch.ops.onednn.qlinear_pointwise(
            qx, scale, zero_point, self.packed_weight(), self.weight_scale, self._zero_points, self.bias,
            1.0, 0, torch.float32, attr, [], algorithm)
        return out.reshape(shape)


def _targets(model: nn.Module, skip: Iterable[str] | str | None) -> dict[str, nn.Linear]:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"expected a vit_torch model, got {type(model).__name__}")
    skipped = resolve_skip(skip)
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        role = linear_role(name)
        if isinstance(module, Linear) and role is not None and role not in skipped:
            if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
                raise ValueError(f"int8 quantization takes a float32 CPU model; {name}.weight is "
                                 f"{module.weight.dtype} on {module.weight.device}")
            targets[name] = module
    return targets


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (the layers' prepacked oneDNN weights, a cache, stay behind: see
    vit_torch.layers._PackedWeightCache)."""
    return copy.deepcopy(model)


def _replace(model: nn.Module, layers: dict[str, QuantizedLinear]) -> nn.Module:
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model.eval()


def quantize_dynamic(model: nn.Module, *, skip: Iterable[str] | str | None = None) -> nn.Module:
    """A copy of a float32 vit_torch model with int8 Linear layers, inputs quantized per call.

    Args:
        model: a float32 vit_torch model on CPU (ViTModel, ViTForImageClassification, ...).
        skip: the roles kept in float32 (vit_core.quantization.ROLES); None: the default
            (``vit_core.quantization.DEFAULT_SKIP``), ``()``: quantize every Linear layer.

    Returns:
        The quantized copy, in eval mode; ``model`` is not changed. Its forward takes the same
        arguments and returns the same output classes.
    """
    targets = _targets(model, skip)
    quantized = _copy(model)
    return _replace(quantized, {name: QuantizedLinear(module) for name, module in targets.items()})


def quantize_static(model: nn.Module, calibration: Any, *, skip: Iterable[str] | str | None = None,
                    preprocessor: Any = None, batch_size: int = 32, limit: int | None = None) -> nn.Module:
    """A copy of a float32 vit_torch model with int8 Linear layers whose input scales are fixed by
    calibration: the min / max of each layer's input over the calibration images.

    Args:
        model: a float32 vit_torch model on CPU.
        calibration: a directory of images (run through ``preprocessor``) or pixel_values arrays
            (N, channels, height, width); see vit_core.quantization.calibration_pixels.
        skip: the roles kept in float32; None: the default.
        preprocessor: the checkpoint's image processor (object or directory) for an image directory.
        batch_size: images per calibration forward.
        limit: calibrate on at most this many images.

    Returns:
        The quantized copy, in eval mode; ``model`` is not changed.
    """
    targets = _targets(model, skip)
    pixels = calibration_pixels(calibration, preprocessor, limit=limit)
    ranges: dict[str, list[float]] = {}

    def observer(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            low, high = torch.aminmax(args[0].detach())
            seen = ranges.setdefault(name, [float(low), float(high)])
            seen[0], seen[1] = min(seen[0], float(low)), max(seen[1], float(high))
        return hook

    handles = [module.register_forward_pre_hook(observer(name)) for name, module in targets.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(pixels), batch_size):
                model(torch.from_numpy(pixels[start:start + batch_size]))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    quantized = _copy(model)
    return _replace(quantized, {name: QuantizedLinear(module, tuple(ranges[name])) for name, module in targets.items()})
