"""Inference engines as benchmark peers (issue #13): ONNX Runtime and OpenVINO on the same checkpoint.

The models each entry runs are built once per fixture directory under ``<fixture>/engines/`` and
reused by later cells (each cell is a fresh process): ``vitx.onnx`` (vitx's own export,
``conversion.export.export_onnx`` from vit_torch at its default opset: 23, attention as one ONNX
Attention node), ``vitx.optimized.onnx`` (ONNX
Runtime's transformer optimizer, model_type "vit"), ``hf4.onnx`` (transformers 4.57's
ViTForImageClassification through ``torch.onnx.export(dynamo=True)`` at opset 17: the baseline
for vitx's export), and the int8 models of :mod:`conversion.quantize` (static ones
calibrated on images 16-31 of the fixture's 32 inputs; image 0 is the one checked).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import numpy as np

HF4_OPSET = 17  # the transformers-export baseline
CALIBRATION = slice(16, 32)  # fixture images used to calibrate the static int8 models


def _threads() -> int | None:
    value = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    return value or None


def _cached(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """``path``, written by ``write(temp)`` and renamed into place the first time."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    try:
        write(temp)
        if path.suffix == ".xml":
            os.replace(temp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(temp, path)
    finally:
        for leftover in (temp, temp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return path


def vitx_onnx(directory: pathlib.Path) -> pathlib.Path:
    def write(temp: pathlib.Path) -> None:
        from conversion.export import export_onnx
        from vit_torch import ViTForImageClassification

        export_onnx(ViTForImageClassification.from_pretrained(directory).eval(), temp, framework="torch")

    return _cached(directory / "engines" / "vitx.onnx", write)


def hf4_onnx(directory: pathlib.Path) -> pathlib.Path:
    def write(temp: pathlib.Path) -> None:
        import torch
        from transformers import ViTForImageClassification

        model = ViTForImageClassification.from_pretrained(directory, attn_implementation="sdpa").eval()

        class Logits(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return self.model(pixel_values=pixel_values).logits

        size = model.config.image_size
        with torch.no_grad():
            program = torch.onnx.export(Logits(), (torch.zeros(2, 3, size, size),), dynamo=True, opset_version=HF4_OPSET,
                                        input_names=["pixel_values"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                                        verbose=False)
        program.save(str(temp))

    return _cached(directory / "engines" / "hf4.onnx", write)


def optimized_onnx(directory: pathlib.Path) -> pathlib.Path:
    def write(temp: pathlib.Path) -> None:
        import json

        from onnxruntime.transformers import optimizer

        config = json.loads((directory / "config.json").read_text())
        optimized = optimizer.optimize_model(str(vitx_onnx(directory)), model_type="vit",
                                             num_heads=config["num_attention_heads"], hidden_size=config["hidden_size"])
        optimized.save_model_to_file(str(temp))

    return _cached(directory / "engines" / "vitx.optimized.onnx", write)


def int8_model(directory: pathlib.Path, engine: str, mode: str) -> pathlib.Path:
    suffix = ".onnx" if engine == "onnxruntime" else ".xml"

    def write(temp: pathlib.Path) -> None:
        from conversion.quantize import quantize_exported

        pixels = np.load(directory / "pixels.npy")[CALIBRATION]
        quantize_exported(vitx_onnx(directory), temp, mode=mode, engine=engine,
                          calibration=pixels if mode == "int8-static" else None, force=True)

    return _cached(directory / "engines" / f"vitx.{engine}.{mode}{suffix}", write)


def ort_call(path: pathlib.Path, pixels: np.ndarray) -> Callable[[], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if _threads():
        options.intra_op_num_threads, options.inter_op_num_threads = _threads(), 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(pixels, dtype=np.float32)}
    return lambda: session.run(None, feed)[0]


def ov_call(path: pathlib.Path, pixels: np.ndarray, precision: str) -> Callable[[], np.ndarray]:
    import openvino as ov

    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if _threads():
        config["INFERENCE_NUM_THREADS"] = _threads()
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    return lambda: np.array(request.infer({0: x})[0], copy=True)


def _only(dtype: str, wanted: str, what: str) -> None:
    if dtype != wanted:
        raise NotImplementedError(f"{what} runs in {wanted} only")


Builder = Callable[[pathlib.Path, str, str, np.ndarray], Callable[[], np.ndarray]]


def ort(kind: str) -> Builder:
    """ONNX Runtime on vitx's export ("fp32"), its optimized graph ("optimized"), the int8 models
    ("int8-dynamic" / "int8-static") or transformers' export ("hf4")."""
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        _only(dtype, "int8" if kind.startswith("int8") else "float32", f"ONNX Runtime {kind}")
        path = {"fp32": vitx_onnx, "optimized": optimized_onnx, "hf4": hf4_onnx}.get(kind)
        return ort_call(path(directory) if path else int8_model(directory, "onnxruntime", kind), pixels)

    return build


def openvino(kind: str) -> Builder:
    """OpenVINO on vitx's export: "fp32" (f32 precision hint), "bf16" (bf16 hint, float32 in and
    out), "int8-static" (NNCF quantize) / "int8-dynamic" (NNCF weight compression)."""
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        if kind.startswith("int8"):
            _only(dtype, "int8", f"OpenVINO {kind}")
            return ov_call(int8_model(directory, "openvino", kind), pixels, "f32")
        _only(dtype, {"fp32": "float32", "bf16": "bfloat16"}[kind], f"OpenVINO {kind}")
        return ov_call(vitx_onnx(directory), pixels, {"fp32": "f32", "bf16": "bf16"}[kind])

    return build


def vitx_int8(mode: str) -> Builder:
    """vit_torch's native int8 (vit_torch.quantization), under torch.inference_mode."""
    def build(directory: pathlib.Path, model: str, dtype: str, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        import torch

        from vit_torch import ViTForImageClassification
        from vit_torch.quantization import quantize_dynamic, quantize_static

        _only(dtype, "int8", "vit_torch int8")
        module = ViTForImageClassification.from_pretrained(directory).eval()
        if mode == "int8-static":
            module = quantize_static(module, np.load(directory / "pixels.npy")[CALIBRATION])
        else:
            module = quantize_dynamic(module)
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))

        def call() -> np.ndarray:
            with torch.inference_mode():
                return module(x).logits.numpy()

        return call

    return build
