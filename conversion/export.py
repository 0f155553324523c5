"""``vitx export``: a checkpoint -> a deployable model (ONNX, SavedModel, jax.export, OpenVINO IR), validated.

    result = export("ckpt/", "out/", format="onnx", framework="torch")
    result.path          # out/model.onnx  (plus out/model.optimized.onnx, config.json, preprocessor_config.json)
    result.parity        # {"batch 1": 3e-7, "batch 5": 4e-7, ...}: max |diff| against the source framework

Every export is written into a temporary directory beside ``out_dir``, run by its own runtime (ONNX
Runtime for ONNX, TensorFlow for the SavedModel, jax for the jax.export blob, OpenVINO for the IR)
on the bundled photos at batch 1 and 5 (and, with ``dynamic_size``, at two other resolutions),
compared with the source framework's model in the same dtype, and renamed into place only when
every max |diff| is within the bound (docs/NUMERICS.md: 1e-4 in float32). Otherwise nothing is
left behind and :class:`ExportParityError` names the check that failed.

ONNX routes (docs/deploy.md says why these): PyTorch through ``torch.onnx.export(dynamo=True)``
(the torch.export-based exporter, onnxscript), TensorFlow through tf2onnx (``from_function`` with
an explicit input signature), Flax through jax2onnx (``to_onnx`` on the jitted forward). Each
graph takes ``pixel_values`` (batch, channels, height, width) float32 with a symbolic batch and
returns ``logits`` (classification), ``last_hidden_state`` + ``pooler_output`` (ViTModel) or
``reconstruction`` (masked image modeling) in float32. ONNX Runtime's transformer optimizer then
fuses the graph (``model.optimized.onnx``, also validated) and :attr:`ExportResult.fused` counts
the fused nodes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vit_core import ViTConfig
from vit_core.checkpoint import staging
from vit_core.checkpoint.errors import writing
from vit_core.checkpoint.lazy import materialize
from vit_core.tolerances import TOLERANCES

from .detect import open_checkpoint
from .formats import transformers as hf
from .formats.base import task_of
from .frameworks import build_model, pinned_precision, unavailable

logger = logging.getLogger("vitx.conversion")

FORMATS: tuple[str, ...] = ("onnx", "saved_model", "jax", "openvino")
EXPORT_FRAMEWORKS: tuple[str, ...] = ("torch", "tf", "flax")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
QUANTIZE_METHODS: tuple[str, ...] = ("int8-dynamic", "int8-static")
# The default opset of each route: torch's dynamo exporter writes scaled_dot_product_attention as one
# opset-23 Attention node (ONNX Runtime runs it fused); tf2onnx 1.17 writes opsets up to 18; jax2onnx
# defaults to 23. ONNX Runtime 1.32 runs all of them.
DEFAULT_OPSETS: dict[str, int] = {"torch": 23, "tf": 18, "flax": 23}

# The model file of each format inside OUT_DIR.
MODEL_FILES: dict[str, str] = {"onnx": "model.onnx", "saved_model": "saved_model", "jax": "model.jax",
                               "openvino": "model.xml"}
OPTIMIZED_ONNX = "model.optimized.onnx"
# What an export directory holds: --force replaces a directory holding only these.
EXPORT_FILE_PATTERNS: tuple[str, ...] = ("config.json", "preprocessor_config.json", "model.onnx", "model.onnx.data",
                                         OPTIMIZED_ONNX, "model.optimized.onnx.data", "saved_model", "model.jax",
                                         "model.xml", "model.bin", "model.int8*.onnx", "model.int8*", "export.json")
EXPORT_INFO = "export.json"

# Node types counted in the optimized ONNX graph (ExportResult.fused).
FUSED_OPS: tuple[str, ...] = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization",
                              "Gelu", "BiasGelu", "FastGelu")

# The framework a format is written from.
_FORMAT_OF_FRAMEWORK = {"saved_model": "tf", "jax": "flax"}


class ExportParityError(Exception):
    """An export's runtime disagrees with its source framework beyond the bound (nothing was written)."""


@dataclass
class ExportResult:
    """What :func:`export` wrote and measured.

    path: the model (``model.onnx``, ``saved_model/``, ``model.jax``, ``model.xml``) inside out_dir;
    optimized_path: ``model.optimized.onnx`` (ONNX only); fused: node counts of FUSED_OPS in the
    optimized graph; parity / optimized_parity: max |diff| against the source framework per check
    ("batch 1", "batch 5", "HxW batch 2"); bound: the bound they were held to."""

    path: pathlib.Path
    out_dir: pathlib.Path
    format: str
    framework: str
    dtype: str
    opset: int | None
    dynamic_size: bool
    bound: float
    parity: dict[str, float] = field(default_factory=dict)
    optimized_path: pathlib.Path | None = None
    optimized_parity: dict[str, float] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)
    quantized_path: pathlib.Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        values = list(self.parity.values()) + list(self.optimized_parity.values())
        return max(values) if values else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "framework": self.framework, "dtype": self.dtype,
                "opset": self.opset, "dynamic_size": self.dynamic_size, "bound": self.bound, "parity": self.parity,
                "optimized_path": str(self.optimized_path) if self.optimized_path else None,
                "optimized_parity": self.optimized_parity, "fused": self.fused,
                "quantized_path": str(self.quantized_path) if self.quantized_path else None, "notes": self.notes}


def export_bound(dtype: str) -> float:
    """docs/NUMERICS.md: an export against its source, float32: 1e-4; in bfloat16 / float16 (against the
    source in the same dtype) the project's bound of reduced-precision outputs, 1e-1: a graph compiler
    fuses and orders the reduced-precision ops differently from eager mode, and outputs of magnitude
    1 to 2 already differ by a bfloat16 step (2**-7) per rounding that differs."""
    return TOLERANCES["export_float32"] if dtype == "float32" else TOLERANCES["export_reduced_precision"]


OUTPUTS: tuple[str, ...] = ("logits", "last_hidden_state", "pooler_output", "reconstruction")


def output_names(task: str, keys: Any) -> list[str]:
    """The graph outputs of a model of ``task`` whose canonical weights are ``keys``."""
    if task == "classification":
        return ["logits"]
    if task == "mim":
        return ["reconstruction"]
    return ["last_hidden_state", "pooler_output"] if "pooler.dense.weight" in set(keys) else ["last_hidden_state"]


# ---------------------------------------------------------------------------------------------
# Writers: a loaded vitx model -> a file
# ---------------------------------------------------------------------------------------------


def export_onnx(model: Any, path: str | os.PathLike, *, framework: str, opset: int | None = None,
                dynamic_size: bool = False) -> pathlib.Path:
    """Write ``model`` (a loaded vit_torch / vit_tf / vit_flax model) as an ONNX file at ``path``.

    Input ``pixel_values`` (batch, channels, height, width) float32 with a symbolic batch (and with
    ``dynamic_size`` symbolic height and width: the position table is resampled in the graph by the
    bicubic matrices of docs/NUMERICS.md); outputs named as :func:`output_names`, float32. Routes:
    torch ``torch.onnx.export(dynamo=True)``, tf tf2onnx ``from_function``, flax jax2onnx ``to_onnx``.
    Returns ``path``. Not validated here: :func:`export` runs and compares what it writes.
    """
    path = pathlib.Path(path)
    if framework not in EXPORT_FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(EXPORT_FRAMEWORKS)}")
    opset = DEFAULT_OPSETS[framework] if opset is None else int(opset)
    writer = {"torch": _onnx_from_torch, "tf": _onnx_from_tf, "flax": _onnx_from_flax}[framework]
    names = _outputs_of(model, framework)
    writer(model, path, opset, dynamic_size, names)
    return path


def _outputs_of(model: Any, framework: str) -> list[str]:
    """The main outputs the model returns (:func:`output_names`), read from one forward of a zero image."""
    config = model.config
    height, width = config.image_hw
    out = source_runner(framework, model, OUTPUTS, False)(np.zeros((1, config.num_channels, height, width), np.float32))
    return [name for name in OUTPUTS if name in out]


def _onnx_from_torch(model: Any, path: pathlib.Path, opset: int, dynamic_size: bool, names: list[str]) -> None:
    import torch

    serving = _TorchServing(model, names, dynamic_size)
    config = model.config
    height, width = config.image_hw
    example = torch.zeros(2, config.num_channels, height, width, dtype=torch.float32)
    shapes = {0: torch.export.Dim("batch")}
    if dynamic_size:
        ph, pw = config.patch_hw
        # any size of at least two patches a side (a remainder the patch convolution drops)
        shapes.update({2: torch.export.Dim("height", min=2 * ph), 3: torch.export.Dim("width", min=2 * pw)})
    with _quiet_torch_onnx(), torch.no_grad():
        program = torch.onnx.export(serving, (example,), dynamo=True, opset_version=opset,
                                    input_names=["pixel_values"], output_names=names,
                                    dynamic_shapes=({k: v for k, v in shapes.items()},), verbose=False,
                                    optimize=True, external_data=False)
    program.save(str(path))


def _torch_serving_class() -> type:
    import torch

    class TorchServing(torch.nn.Module):
        """model(pixel_values) -> the named outputs in float32, as a tuple (what an ONNX graph returns)."""

        def __init__(self, model: Any, names: Sequence[str], interpolate: bool) -> None:
            super().__init__()
            self.model = model
            self.names = list(names)
            self.interpolate = interpolate

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            output = self.model(pixel_values, interpolate_pos_encoding=self.interpolate or None)
            return tuple(getattr(output, name).float() for name in self.names)

    return TorchServing


def _TorchServing(model: Any, names: Sequence[str], interpolate: bool) -> Any:  # noqa: N802 (a class factory)
    return _torch_serving_class()(model, names, interpolate).eval()


@contextlib.contextmanager
def _quieted(logger_names: Sequence[str], *, stdout: bool = False) -> Iterator[None]:
    """The named loggers at ERROR (restored after); with ``stdout`` also printed lines and warnings dropped."""
    import io
    import warnings

    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        if stdout:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                yield
        else:
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quiet_torch_onnx() -> contextlib.AbstractContextManager[None]:
    """torch.onnx's dynamo exporter prints progress lines and warns about torchvision ops it skips."""
    return _quieted(("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._export"),
                    stdout=True)


def _onnx_from_tf(model: Any, path: pathlib.Path, opset: int, dynamic_size: bool, names: list[str]) -> None:
    import tensorflow as tf
    import tf2onnx

    if dynamic_size:
        raise ValueError("--dynamic-size is not available with --framework tf: vit_tf fixes the patch grid "
                         "(and the resampled position table) when it is traced; export with --framework torch")
    config = model.config
    height, width = config.image_hw
    spec = tf.TensorSpec([None, config.num_channels, height, width], tf.float32, name="pixel_values")

    @tf.function(input_signature=[spec])
    def serve(pixel_values: tf.Tensor) -> dict[str, tf.Tensor]:
        output = model(pixel_values, training=False)
        return {name: tf.cast(getattr(output, name), tf.float32) for name in names}

    with _quieted(("tf2onnx",)):
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=opset)
    _finish_onnx(proto, path, names)


def _onnx_from_flax(model: Any, path: pathlib.Path, opset: int, dynamic_size: bool, names: list[str]) -> None:
    import jax
    import jax.numpy as jnp
    import jax2onnx
    from flax import nnx

    if dynamic_size:
        raise ValueError("--dynamic-size is not available with --framework flax: vit_flax fixes the patch grid "
                         "(and the resampled position table) when it is traced; export with --framework torch")
    config = model.config
    height, width = config.image_hw
    graphdef, state = nnx.split(model)

    def forward(pixel_values: jax.Array) -> tuple[jax.Array, ...]:
        output = nnx.merge(graphdef, state)(pixel_values)
        return tuple(getattr(output, name).astype(jnp.float32) for name in names)

    with jax.default_matmul_precision("highest"):
        proto = jax2onnx.to_onnx(forward, inputs=[("batch", config.num_channels, height, width)], opset=opset,
                                 model_name="vitx", input_names=["pixel_values"], output_names=names)
    _finish_onnx(proto, path, names)


def _finish_onnx(proto: Any, path: pathlib.Path, names: list[str]) -> None:
    """Name the graph's input ``pixel_values`` and its outputs ``names`` (renaming every use), check
    it and save it as one file."""
    import onnx

    graph = proto.graph
    renames = {graph.input[0].name: "pixel_values"}
    renames.update({out.name: name for out, name in zip(graph.output, names)})
    renames = {old: new for old, new in renames.items() if old != new}
    if renames:
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.name = renames.get(value.name, value.name)
        for node in _all_nodes(graph):
            node.input[:] = [renames.get(n, n) for n in node.input]
            node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def _all_nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.node:
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


def _write_saved_model(model: Any, path: pathlib.Path, dynamic_size: bool) -> None:
    if dynamic_size:
        raise ValueError("--dynamic-size is not available with --format saved_model: vit_tf fixes the patch "
                         "grid when it is traced; export --format onnx --framework torch for dynamic sizes")
    model.export_saved_model(path)


def _write_jax(model: Any, path: pathlib.Path, names: list[str], dynamic_size: bool) -> None:
    from vit_flax.export import export_forward

    if dynamic_size:
        raise ValueError("--dynamic-size is not available with --format jax: vit_flax fixes the patch grid when "
                         "it is traced; export --format onnx --framework torch for dynamic sizes")
    path.write_bytes(export_forward(model, names))


def _write_openvino(onnx_path: pathlib.Path, xml_path: pathlib.Path) -> None:
    import openvino as ov

    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(xml_path), compress_to_fp16=False)


# ---------------------------------------------------------------------------------------------
# Runners: an exported model -> a function of numpy pixel_values, without vitx
# ---------------------------------------------------------------------------------------------

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


def onnx_runner(path: str | os.PathLike, *, threads: int | None = None) -> Runner:
    """ONNX Runtime (CPU) on ``path``: pixel_values -> {output name: array}."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # the file is validated as written: ONNX Runtime's own graph rewrites stay on (the default)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})))

    return run


def saved_model_runner(path: str | os.PathLike) -> Runner:
    """``tf.saved_model.load(path).signatures["serving_default"]``: pixel_values -> {output name: array}."""
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serving_default"]

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        out = serving(pixel_values=tf.constant(pixel_values, tf.float32))
        return {k: np.asarray(tf.cast(v, tf.float32).numpy()) for k, v in out.items()}

    return run


def jax_runner(path: str | os.PathLike) -> Runner:
    """The jax.export blob at ``path``, deserialised and called: pixel_values -> {output name: array}."""
    import jax

    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        out = exported.call(np.asarray(pixel_values, np.float32))
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}

    return run


def openvino_runner(path: str | os.PathLike, *, precision: str = "f32") -> Runner:
    """OpenVINO's CPU plugin on the IR at ``path`` with inference precision ``precision`` (f32 by default:
    on CPUs with bfloat16 units OpenVINO would otherwise compute in bf16)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    outputs = [(o, o.get_any_name()) for o in compiled.outputs]

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        result = compiled({"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})
        return {name: np.asarray(result[o], dtype=np.float32) for o, name in outputs}

    return run


def load_runner(directory: str | os.PathLike, *, optimized: bool = True) -> tuple[str, Runner]:
    """The runtime of an export directory: ("onnx", runner) for model.onnx (model.optimized.onnx where
    present and ``optimized``), ("openvino", runner), ("saved_model", runner) or ("jax", runner)."""
    directory = pathlib.Path(directory)
    if (directory / "model.onnx").is_file():
        chosen = directory / OPTIMIZED_ONNX if optimized and (directory / OPTIMIZED_ONNX).is_file() else \
            directory / "model.onnx"
        return "onnx", onnx_runner(chosen)
    if (directory / "model.xml").is_file():
        return "openvino", openvino_runner(directory / "model.xml")
    if (directory / "saved_model").is_dir():
        return "saved_model", saved_model_runner(directory / "saved_model")
    if (directory / "model.jax").is_file():
        return "jax", jax_runner(directory / "model.jax")
    raise FileNotFoundError(f"{directory} holds no exported model (model.onnx, model.xml, saved_model/ or model.jax)")


def run_exported(runtime: str, state: Mapping[str, np.ndarray], task: str, config: ViTConfig) -> Runner:
    """``runtime`` ("onnx" or "openvino") running the vit_torch model of ``state`` exported to a
    temporary directory (float32, the default opset): the runner of a parity report."""
    import torch

    model = build_model("torch", config, state, task)
    with tempfile.TemporaryDirectory(prefix="vitx-export-") as scratch:
        onnx_path = pathlib.Path(scratch) / "model.onnx"
        with torch.no_grad():
            export_onnx(model, onnx_path, framework="torch")
        if runtime == "onnx":
            return onnx_runner(onnx_path)  # the session holds the graph in memory
        xml_path = pathlib.Path(scratch) / "model.xml"
        _write_openvino(onnx_path, xml_path)
        return openvino_runner(xml_path)  # compiled in memory


def is_export_dir(path: str | os.PathLike) -> bool:
    directory = pathlib.Path(path)
    return directory.is_dir() and any((directory / name).exists() for name in MODEL_FILES.values())


def export_source(directory: str | os.PathLike) -> str | None:
    """The checkpoint an export directory was written from (its export.json), None when unknown or gone."""
    info = pathlib.Path(directory) / EXPORT_INFO
    if not info.is_file():
        return None
    source = json.loads(info.read_text(encoding="utf-8")).get("source")
    if not source or not (pathlib.Path(source).exists() or "/" in source and not source.startswith(("/", "."))):
        return None
    return str(source)


def optimize_onnx(path: str | os.PathLike, out_path: str | os.PathLike, config: ViTConfig) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (``model_type="vit"``) on ``path`` -> ``out_path``; returns
    the node counts of FUSED_OPS in the optimized graph (Attention: one per encoder layer when every
    attention block fused)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_ort_optimizer():
        optimized = optimize_model(str(path), model_type="vit", num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size, opt_level=0)
        optimized.save_model_to_file(str(out_path), use_external_data_format=False)
    return fused_counts(out_path)


def fused_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each FUSED_OPS type the ONNX graph at ``path`` holds."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts = {op: 0 for op in FUSED_OPS}
    for node in _all_nodes(graph):
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts


@contextlib.contextmanager
def _quiet_ort_optimizer() -> Iterator[None]:
    import io

    # it logs (through loggers named after its modules) and prints shape-inference failures it recovers from
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


# ---------------------------------------------------------------------------------------------
# Inputs of the validation
# ---------------------------------------------------------------------------------------------


def validation_inputs(config: ViTConfig, processor: Any, dynamic_size: bool) -> list[tuple[str, np.ndarray]]:
    """(name, pixel_values) pairs every export is checked on: the bundled photos at batch 1 and 5 (the
    second to fifth images are the photos and their flips), and with ``dynamic_size`` two more
    resolutions (up and down, non-square) at batch 2. Models that do not take 3-channel images get
    seeded random inputs."""
    height, width = config.image_hw
    ph, pw = config.patch_hw
    sizes = [(height, width)]
    if dynamic_size:
        sizes += [(height + 2 * ph, width + pw), (max(ph, height - ph), width + 2 * pw)]
    checks: list[tuple[str, np.ndarray]] = []
    for i, (h, w) in enumerate(sizes):
        pixel_values = _pixel_values_at(config, processor, h, w)
        batch5 = np.stack([pixel_values[0], pixel_values[1], pixel_values[0][..., ::-1], pixel_values[1][..., ::-1],
                           pixel_values[0][:, ::-1, :]]).astype(np.float32)
        if i == 0:
            checks.append(("batch 1", np.ascontiguousarray(pixel_values[:1])))
            checks.append(("batch 5", np.ascontiguousarray(batch5)))
        else:
            checks.append((f"{h}x{w} batch 2", np.ascontiguousarray(pixel_values[:2])))
    return checks


def _pixel_values_at(config: ViTConfig, processor: Any, height: int, width: int) -> np.ndarray:
    if config.num_channels != 3:
        rng = np.random.default_rng(0)
        return rng.standard_normal((2, config.num_channels, height, width)).astype(np.float32)
    from .compare import open_image, sample_images

    images = [open_image(p) for p in sample_images()[:2]]
    out = processor(images, return_tensors="np", size={"height": height, "width": width})
    return np.asarray(out["pixel_values"], dtype=np.float32)


def _processor_for(checkpoint: str | os.PathLike, config: ViTConfig) -> Any:
    from vit_core import AutoImageProcessor, ViTImageProcessor

    path = pathlib.Path(checkpoint).expanduser()
    directory = path if path.is_dir() else path.parent if path.exists() else None
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(directory)
    h, w = config.image_hw
    return ViTImageProcessor(size={"height": h, "width": w})


# ---------------------------------------------------------------------------------------------
# The source framework's forward
# ---------------------------------------------------------------------------------------------


def source_runner(framework: str, model: Any, names: Sequence[str], interpolate: bool) -> Runner:
    """The loaded vitx model's own forward: pixel_values -> {output name: float32 array}."""
    from .frameworks import framework_input, to_numpy

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        with pinned_precision(framework):
            kwargs: dict[str, Any] = {"interpolate_pos_encoding": True} if interpolate else {}
            if framework == "tf":
                kwargs["training"] = False
            out = model(framework_input(framework, pixel_values), **kwargs)
            return {name: to_numpy(getattr(out, name)).astype(np.float32) for name in names
                    if getattr(out, name, None) is not None}

    return run


def max_diffs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], what: str) -> float:
    """max |diff| over every output (float64); a missing output or another shape is a ValueError."""
    worst = 0.0
    for name, ref in expected.items():
        if name not in actual:
            raise ValueError(f"{what}: the exported model has no output {name!r} (it has {sorted(actual)})")
        got = np.asarray(actual[name], dtype=np.float64)
        if got.shape != ref.shape:
            raise ValueError(f"{what}: output {name} has shape {got.shape}, the source {ref.shape}")
        if not np.all(np.isfinite(got)):
            return float("inf")
        worst = max(worst, float(np.max(np.abs(got - np.asarray(ref, dtype=np.float64)))) if ref.size else 0.0)
    return worst


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "onnx",  # noqa: A002 (the CLI's --format)
    framework: str | None = None,
    opset: int | None = None,
    dynamic_size: bool = False,
    dtype: str = "float32",
    quantize: str | None = None,
    calibration: str | os.PathLike | None = None,
    timm_model_name: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Export ``checkpoint`` (any format vitx reads) to ``out_dir`` and validate it.

    ``format``: "onnx" (``model.onnx`` + ``model.optimized.onnx``), "saved_model" (``saved_model/``
    with a ``serving_default`` signature; framework tf), "jax" (``model.jax``, a serialised
    jax.export of the forward; framework flax) or "openvino" (``model.xml`` + ``model.bin``, converted
    from the framework's ONNX export). ``framework``: the source model ("torch", "tf", "flax"; None:
    torch, or tf for saved_model, flax for jax). ``dynamic_size``: symbolic height and width too
    (ONNX / OpenVINO from torch). ``dtype``: the model's dtype ("float32", "bfloat16", "float16");
    the input stays float32 and the outputs are float32; a combination the runtime cannot run on
    this machine is refused with a ValueError. ``quantize`` ("int8-dynamic" / "int8-static", with
    ``calibration`` an image folder for static): the int8 model beside the float one
    (conversion.quantize). ``out_dir`` exists: FileExistsError unless ``force`` (then it must hold
    only export files). Raises :class:`ExportParityError` (nothing written) when a check exceeds
    the bound.
    """
    start = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    framework = framework or _FORMAT_OF_FRAMEWORK.get(format, "torch")
    if framework not in EXPORT_FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(EXPORT_FRAMEWORKS)}")
    if format in _FORMAT_OF_FRAMEWORK and framework != _FORMAT_OF_FRAMEWORK[format]:
        raise ValueError(f"--format {format} is written from --framework {_FORMAT_OF_FRAMEWORK[format]}, "
                         f"not {framework}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if opset is not None and format not in ("onnx", "openvino"):
        raise ValueError(f"--opset applies to --format onnx / openvino, not {format}")
    if opset is not None and not 17 <= int(opset) <= 23:
        raise ValueError(f"--opset {opset}: choose an ONNX opset from 17 to 23")
    if format == "openvino" and dtype != "float32":
        raise ValueError(f"--format openvino --dtype {dtype}: an OpenVINO IR is exported in float32; OpenVINO "
                         "chooses the precision it computes in when the IR is compiled (INFERENCE_PRECISION_HINT "
                         "bf16 / f16 on CPUs that have them): export float32")
    if dynamic_size and framework != "torch":
        raise ValueError(f"--dynamic-size is available with --framework torch only (vit_{framework} fixes the "
                         "patch grid, and the resampled position table, when it is traced)")
    _check_quantize(quantize, calibration, format)
    for needed in _requirements(format, framework):
        why = unavailable(needed) if needed in EXPORT_FRAMEWORKS else _missing_package(needed)
        if why is not None:
            raise ImportError(f"vitx export --format {format} --framework {framework}: {why}")
    out_dir = pathlib.Path(out_dir).expanduser()
    if os.path.lexists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} already exists (pass force=True / --force to overwrite)")
    if out_dir.is_dir():
        foreign = [e for e in staging.foreign_entries(out_dir, EXPORT_FILE_PATTERNS) if e != "saved_model/"]
        if foreign:
            raise FileExistsError(f"{out_dir} holds files that are not an export ({', '.join(foreign[:5])}); "
                                  "refusing to replace it")

    loaded = open_checkpoint(checkpoint, timm_model_name=timm_model_name)
    config, state = loaded.config, materialize(loaded.state)
    keys = set(state)
    task = task_of(keys)
    names = output_names(task, keys)
    processor = _processor_for(checkpoint, config)
    bound = export_bound(dtype)
    notes = list(loaded.notes)
    steps = 4 + (1 if format == "onnx" else 0)
    bar = _progress_bar(steps, f"export {format} <- {framework}", progress)
    try:
        model = build_model(framework, config, state, task, dtype=dtype)
        del state
        checks = validation_inputs(config, processor, dynamic_size)
        source = source_runner(framework, model, names, dynamic_size)
        expected = {name: source(pixel_values) for name, pixel_values in checks}
        bar.update(1)
        result = ExportResult(out_dir / MODEL_FILES[format], out_dir, format, framework, dtype,
                              (DEFAULT_OPSETS[framework] if opset is None else int(opset)) if format in ("onnx", "openvino") else None,
                              dynamic_size, bound, notes=notes)
        with staging.staged_dir(out_dir, force=force, replace_anything=True) as temp, writing(out_dir):
            model_path = temp / MODEL_FILES[format]
            _write(format, framework, model, model_path, opset, dynamic_size, names, temp)
            bar.update(1)
            runner = _runner_for(format, model_path, dtype)
            result.parity = _validate(runner, checks, expected, bound, what=f"{format} from {framework}")
            bar.update(1)
            if format == "onnx":
                try:
                    result.fused = optimize_onnx(model_path, temp / OPTIMIZED_ONNX, config)
                except Exception as e:  # the optimizer's pattern matchers assert on graphs they do not expect
                    result.fused = fused_counts(model_path)
                    notes.append(f"ONNX Runtime's transformer optimizer failed on the {framework} graph "
                                 f"({type(e).__name__}: {_first_line(e)}); no {OPTIMIZED_ONNX} written, the counts "
                                 "are model.onnx's own nodes")
                else:
                    result.optimized_parity = _validate(onnx_runner(temp / OPTIMIZED_ONNX), checks, expected,
                                                        bound, what=f"{OPTIMIZED_ONNX} from {framework}")
                    result.optimized_path = out_dir / OPTIMIZED_ONNX
                attention = result.fused["Attention"] + result.fused["MultiHeadAttention"]
                if attention != config.num_hidden_layers:
                    notes.append(f"ONNX Runtime's optimizer fused {attention} of {config.num_hidden_layers} "
                                 "attention blocks")
                bar.update(1)
            hf.save_config(config, temp, keys)
            processor.save_pretrained(temp)
            if quantize is not None:
                result.quantized_path = _quantize(temp, model_path, quantize, calibration, config, out_dir)
            info = result.to_dict() | {"path": MODEL_FILES[format], "source": _source_name(checkpoint)}
            (temp / EXPORT_INFO).write_text(json.dumps(info, indent=2)
                                            + "\n", encoding="utf-8")
            bar.update(1)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    for note in notes:
        logger.warning("%s: %s", out_dir, note)
    return result


def _source_name(checkpoint: str | os.PathLike) -> str:
    """A local checkpoint as an absolute path, a hub id as it is."""
    path = pathlib.Path(checkpoint).expanduser()
    return str(path.resolve()) if path.exists() else str(checkpoint)


def _requirements(format: str, framework: str) -> list[str]:  # noqa: A002
    needs = [framework]
    if format in ("onnx", "openvino"):
        needs += ["onnx", "onnxruntime"]
        needs += {"torch": ["onnxscript"], "tf": ["tf2onnx"], "flax": ["jax2onnx"]}[framework]
    if format == "openvino":
        needs.append("openvino")
    return needs


_EXTRAS = {"onnx": "vitx[onnx]", "onnxruntime": "vitx[onnx]", "onnxscript": "vitx[onnx]", "tf2onnx": "vitx[onnx]",
           "jax2onnx": "vitx[onnx]", "openvino": "vitx[openvino]"}


def _missing_package(name: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed (pip install {_EXTRAS.get(name, name)})"
    return None


def _check_quantize(quantize: str | None, calibration: Any, format: str) -> None:  # noqa: A002
    if quantize is None:
        if calibration is not None:
            raise ValueError("--calibration applies to --quantize int8-static only")
        return
    if quantize not in QUANTIZE_METHODS:
        raise ValueError(f"unknown --quantize {quantize!r}; choose from {', '.join(QUANTIZE_METHODS)}")
    if format not in ("onnx", "openvino"):
        raise ValueError(f"--quantize applies to --format onnx / openvino, not {format}")
    if quantize == "int8-static" and calibration is None:
        raise ValueError("--quantize int8-static needs --calibration IMAGE_DIR (images that look like the inputs)")
    if quantize == "int8-dynamic" and calibration is not None:
        raise ValueError("--calibration applies to --quantize int8-static only")
    if calibration is not None and not pathlib.Path(calibration).is_dir():
        raise FileNotFoundError(f"--calibration {calibration}: no such directory")
    import importlib.util

    if importlib.util.find_spec("conversion.quantize") is None:
        raise ValueError("--quantize needs vitx's int8 quantizer (conversion.quantize), which this installation lacks")


def _quantize(temp: pathlib.Path, model_path: pathlib.Path, quantize: str, calibration: Any, config: ViTConfig,
              out_dir: pathlib.Path) -> pathlib.Path:
    from . import quantize as quantizer

    engine = "openvino" if model_path.suffix == ".xml" else "onnxruntime"
    target = model_path.with_name(f"model.{quantize}{model_path.suffix}")
    quantizer.quantize_exported(model_path, target, mode=quantize, engine=engine, calibration=calibration,
                                preprocessor=temp)
    return out_dir / target.relative_to(temp)


def _write(format: str, framework: str, model: Any, model_path: pathlib.Path, opset: int | None,  # noqa: A002
           dynamic_size: bool, names: list[str], temp: pathlib.Path) -> None:
    if format == "onnx":
        export_onnx(model, model_path, framework=framework, opset=opset, dynamic_size=dynamic_size)
    elif format == "saved_model":
        _write_saved_model(model, model_path, dynamic_size)
    elif format == "jax":
        _write_jax(model, model_path, names, dynamic_size)
    else:
        with tempfile.TemporaryDirectory(dir=temp) as scratch:
            onnx_path = pathlib.Path(scratch) / "model.onnx"
            export_onnx(model, onnx_path, framework=framework, opset=opset, dynamic_size=dynamic_size)
            _write_openvino(onnx_path, model_path)


def _runner_for(format: str, model_path: pathlib.Path, dtype: str) -> Runner:  # noqa: A002
    try:
        if format == "onnx":
            return onnx_runner(model_path)
        if format == "openvino":
            return openvino_runner(model_path)
        if format == "saved_model":
            return saved_model_runner(model_path)
        return jax_runner(model_path)
    except ValueError:
        raise
    except Exception as e:  # the runtime refuses the graph (a kernel it lacks in this dtype, ...)
        raise ValueError(f"the {format} runtime cannot load the {dtype} export here: {_first_line(e)}; "
                         "export float32 (or another dtype)") from None


def _validate(runner: Runner, checks: Sequence[tuple[str, np.ndarray]], expected: Mapping[str, Mapping[str, np.ndarray]],
              bound: float, *, what: str) -> dict[str, float]:
    """Run every check, return its max |diff| against ``expected``; ExportParityError over the bound."""
    diffs: dict[str, float] = {}
    for name, pixel_values in checks:
        try:
            got = runner(pixel_values)
        except Exception as e:
            raise ValueError(f"{what}: the runtime failed on {name} {tuple(pixel_values.shape)}: {_first_line(e)}") from None
        diffs[name] = max_diffs(expected[name], got, f"{what}, {name}")
    worst = max(diffs, key=lambda k: diffs[k])
    if not diffs[worst] <= bound:
        raise ExportParityError(f"{what}: {worst} differs from the source by {diffs[worst]:.3e} > {bound:.0e} "
                                f"(all: {', '.join(f'{k} {v:.2e}' for k, v in diffs.items())}); nothing was written")
    return diffs


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, description: str, progress: bool) -> Any:
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False)
