"""int8 quantization of an exported model through ONNX Runtime or OpenVINO (NNCF), docs/int8.md.

``quantize_exported(path, out_path, mode=, engine=, calibration=, preprocessor=)`` quantizes the
weighted GEMMs of a ViT exported to ONNX (or OpenVINO IR): the Linear layers of
:mod:`vit_core.quantization` (less ``skip``), found by their position in the graph (six per encoder
layer, then the heads: see :func:`vit_core.quantization.layer_roles`), never the patch
embedding, LayerNorm, Softmax, GELU or the attention's activation-by-activation matmuls.

=============== ================================================================================
engine / mode   what it writes
=============== ================================================================================
onnxruntime     ``onnxruntime.quantization.quantize_dynamic``: int8 weights (per output channel),
int8-dynamic    uint8 activations quantized at run time (DynamicQuantizeLinear + MatMulInteger)
onnxruntime     ``quantize_static``, QDQ format: int8 per-channel weights, uint8 activations with
int8-static     scales from the calibration images (MinMax)
openvino        ``nncf.compress_weights`` (INT8_SYM, per output channel); the CPU plugin
int8-dynamic    quantizes the activations at run time (DYNAMIC_QUANTIZATION_GROUP_SIZE)
openvino        ``nncf.quantize`` (model_type TRANSFORMER): int8 weights and activations with
int8-static     ranges from the calibration images (FakeQuantize in the IR)
=============== ================================================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from vit_core.cpu import int8_dot_saturates
from vit_core.quantization import calibration_pixels, check_mode, layer_roles, load_processor, resolve_skip

ENGINES = ("onnxruntime", "openvino")
# activations quantized per group of this many input channels by the OpenVINO CPU plugin at run
# time on a weight-compressed model (its dynamic quantization); 0 would turn it off
OPENVINO_DYNAMIC_GROUP = 32


def quantize_exported(onnx_or_ir_path: str | os.PathLike, out_path: str | os.PathLike, *,
                      mode: str = "int8-dynamic", engine: str = "onnxruntime", calibration: Any = None,
                      preprocessor: Any = None, skip: Iterable[str] | str | None = None,
                      limit: int | None = None, force: bool = False) -> pathlib.Path:
    """Quantize an exported ViT to int8; return the path written.

    Args:
        onnx_or_ir_path: a ``.onnx`` file (both engines) or an OpenVINO ``.xml`` IR (openvino).
        out_path: the quantized model: ``.onnx`` for onnxruntime, ``.xml`` (+ ``.bin``) for openvino.
        mode: ``int8-dynamic`` (no calibration) or ``int8-static`` (calibrated activation ranges).
        engine: ``onnxruntime`` or ``openvino``.
        calibration: int8-static: a directory of images or pixel_values arrays (N, C, H, W).
        preprocessor: the checkpoint's image processor (object or directory) for a directory of
            images; None: ``preprocessor_config.json`` beside the input model, if there is one.
        skip: the layer roles kept in float (vit_core.quantization.ROLES); None: the default.
        limit: calibrate on at most this many images.
        force: replace an existing ``out_path``.

    Raises:
        FileNotFoundError: the model or calibration directory is missing. ValueError: a bad mode,
        engine, skip or calibration (an empty directory, wrong shapes), or a graph that is not a ViT.
    """
    check_mode(mode)
    if engine not in ENGINES:
        raise ValueError(f"unknown quantization engine {engine!r}; choose from {', '.join(ENGINES)}")
    source = pathlib.Path(onnx_or_ir_path)
    if not source.is_file():
        raise FileNotFoundError(f"model file {source} does not exist")
    out = pathlib.Path(out_path)
    wanted = ".onnx" if engine == "onnxruntime" else ".xml"
    if source.suffix not in ((".onnx",) if engine == "onnxruntime" else (".onnx", ".xml")):
        raise ValueError(f"{source}: {engine} quantizes {'an .onnx file' if engine == 'onnxruntime' else 'an .onnx or .xml file'}")
    if out.suffix != wanted:
        raise ValueError(f"{out}: the {engine} output must be a {wanted} file")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    skipped = resolve_skip(skip)
    pixels = None
    if mode == "int8-static":
        if preprocessor is None and (source.parent / "preprocessor_config.json").is_file():
            preprocessor = source.parent
        pixels = calibration_pixels(calibration, load_processor(preprocessor), limit=limit)
    with _staged_outputs(out) as temp:
        if engine == "onnxruntime":
            _quantize_onnxruntime(source, temp / out.name, mode, skipped, pixels)
        else:
            _quantize_openvino(source, temp / out.name, mode, skipped, pixels)
    return out


@contextlib.contextmanager
def _staged_outputs(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary directory beside ``out``; what was written there under out's name (and, for an
    IR, its ``.bin``) is renamed into place when the block succeeds, removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield temp
        names = [out.name] + ([out.with_suffix(".bin").name] if out.suffix == ".xml" else [])
        for name in reversed(names):  # the .bin before the .xml that names it
            if (temp / name).exists():
                os.replace(temp / name, out.parent / name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------------ ONNX Runtime
def onnx_linear_nodes(model: Any) -> list[tuple[str, str]]:
    """(node name, role) of every weighted GEMM of an ONNX ViT graph, in graph order: MatMul / Gemm
    nodes whose second input is a 2-D initializer or Constant."""
    constants = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = tuple(attribute.t.dims)
    nodes = [n for n in model.graph.node
             if n.op_type in ("MatMul", "Gemm") and len(constants.get(n.input[1], ())) == 2]
    unnamed = [i for i, n in enumerate(nodes) if not n.name]
    if unnamed:
        raise ValueError(f"the ONNX graph has {len(unnamed)} unnamed MatMul/Gemm nodes; quantization selects nodes by name")
    roles = layer_roles(len(nodes), "the ONNX graph")
    return [(n.name, role) for n, role in zip(nodes, roles)]


def _batches(input_name: str, pixels: np.ndarray, batch: int = 8) -> Any:
    """An onnxruntime.quantization CalibrationDataReader over pixel_values batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{input_name: pixels[i:i + batch]} for i in range(0, len(pixels), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    return Batches()


def _quantize_onnxruntime(source: pathlib.Path, out: pathlib.Path, mode: str, skipped: frozenset[str],
                          pixels: np.ndarray | None) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    model = onnx.load(str(source), load_external_data=False)
    selected = [name for name, role in onnx_linear_nodes(model) if role not in skipped]
    if not selected:
        raise ValueError(f"skip={sorted(skipped)} leaves no layer to quantize")
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    # reduce_range: 7-bit weights where the CPU's u8 x s8 kernel adds product pairs in saturating
    # int16 (vit_core.cpu.int8_dot_saturates: x86 without VNNI)
    common = dict(op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=selected, per_channel=True,
                  weight_type=QuantType.QInt8, reduce_range=int8_dot_saturates())
    with _without_preprocessing_advice():
        if mode == "int8-dynamic":
            quantize_dynamic(str(source), str(out), **common)
            return
        reader = _batches(inputs[0], pixels)
        quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax, **common)


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in str(record.getMessage())


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """ONNX Runtime's quantizers log (on the root logger) advice to run its ``quant_pre_process``
    first. vitx does not: the exported graphs are already shape-inferred and optimized by the
    exporter, and quant_pre_process fails on them (its symbolic shape inference mistakes the
    standard ONNX Attention op for com.microsoft's; it cannot follow external data)."""
    root = logging.getLogger()
    advice = _DropPreprocessingAdvice()
    handlers = [root, *root.handlers]
    for handler in handlers:
        handler.addFilter(advice)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(advice)


# ------------------------------------------------------------------------------ OpenVINO
def openvino_linear_ops(model: Any) -> list[tuple[str, str]]:
    """(friendly name, role) of every MatMul with a constant weight of an OpenVINO ViT model, in
    topological order."""
    def constant_input(node: Any) -> bool:
        while node.get_type_name() in ("Convert", "Transpose", "Reshape") and node.get_input_size() >= 1:
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    ops = [op for op in model.get_ordered_ops()
           if op.get_type_name() == "MatMul" and constant_input(op.input_value(1).get_node())]
    roles = layer_roles(len(ops), "the OpenVINO model")
    return [(op.get_friendly_name(), role) for op, role in zip(ops, roles)]


def _quantize_openvino(source: pathlib.Path, out: pathlib.Path, mode: str, skipped: frozenset[str],
                       pixels: np.ndarray | None) -> None:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(source))
    linear = openvino_linear_ops(model)
    keep = [name for name, role in linear if role in skipped]
    if len(keep) == len(linear):
        raise ValueError(f"skip={sorted(skipped)} leaves no layer to quantize")
    if mode == "int8-dynamic":
        quantized = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                          ignored_scope=nncf.IgnoredScope(names=keep, validate=False))
        quantized.set_rt_info(str(OPENVINO_DYNAMIC_GROUP), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    else:
        targets = {name for name, role in linear if role not in skipped}
        # everything but the selected Linear layers stays float: the patch embedding convolution,
        # the attention's activation matmuls (MatMul, or the fused ScaledDotProductAttention op the
        # opset-23 Attention becomes, whose query / key NNCF would otherwise quantize) and the
        # skipped roles
        others = [op.get_friendly_name() for op in model.get_ordered_ops()
                  if op.get_type_name() in ("MatMul", "Convolution", "ScaledDotProductAttention")
                  and op.get_friendly_name() not in targets]
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
            OverflowFix,
        )
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        # activation ranges: the global min / max over the calibration images (ONNX Runtime's
        # MinMax), and no SmoothQuant. NNCF's transformer defaults (the mean of per-image min /
        # max, SmoothQuant on the MatMuls) measured far worse on the fine-tuned test model:
        # logit cosine min 0.986 against 0.99992 (docs/int8.md).
        # overflow fix on every layer where the CPU's int8 kernel saturates (x86 without VNNI:
        # vit_core.cpu.int8_dot_saturates), NNCF's default (the first layer only) elsewhere
        advanced = AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
            overflow_fix=OverflowFix.ENABLE if int8_dot_saturates() else None)
        dataset = nncf.Dataset([pixels[i:i + 1] for i in range(len(pixels))])
        quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels),
                                  ignored_scope=nncf.IgnoredScope(names=others, validate=False),
                                  advanced_parameters=advanced)
    ov.save_model(quantized, str(out), compress_to_fp16=False)


# ------------------------------------------------------------------------------ running
def run_exported(path: str | os.PathLike, pixels: np.ndarray, *, engine: str | None = None,
                 precision: str | None = None, threads: int | None = None) -> np.ndarray:
    """The first output (logits) of an exported model on ``pixels`` (N, C, H, W) float32.

    ``engine``: onnxruntime or openvino (None: onnxruntime for ``.onnx``, openvino for ``.xml``);
    ``precision``: OpenVINO's INFERENCE_PRECISION_HINT (None: f32, the exact float path).
    """
    path = pathlib.Path(path)
    engine = engine or ("openvino" if path.suffix == ".xml" else "onnxruntime")
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: pixels})[0]
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision or "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return np.asarray(compiled(pixels)[0])
