"""Parity reports: one checkpoint, identical pixel_values, every installed framework, every pair.

``compare`` loads the checkpoint in each framework through its public ``from_pretrained``, feeds
the same float32 pixel_values (from vit_core's ViTImageProcessor), and reports the max |diff| of
every output for every framework pair (and, with ``layers=True``, of every hidden state, naming
the first layer that diverges). ``assert_parity`` is the pytest helper for users' CI.

With no checkpoint it uses a built-in ViT-B/16 with seeded weights (numpy ``default_rng(0)``:
weights and embeddings N(0, 0.02), biases N(0, 0.02), LayerNorm scales 1 + N(0, 0.02); 1000
labels) and the photos bundled in ``conversion/samples``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vit_core import ViTConfig
from vit_core.tolerances import TOLERANCES
from vit_core.weights import weight_table

from .detect import open_checkpoint
from .formats.base import architecture_of, task_of
from .export import export_source, is_export_dir, load_runner
from .frameworks import ALL_BACKENDS, FRAMEWORKS, Run, run_framework, unavailable
from vit_core.checkpoint.lazy import materialize

SAMPLES_DIR = pathlib.Path(__file__).resolve().parent / "samples"
BUILTIN_NAME = "built-in ViT-B/16 (seeded weights, default_rng(0))"
DEFAULT_PERTURBATION = 1e-2


@dataclass
class PairResult:
    """max |diff| of one output between two frameworks."""

    a: str
    b: str
    output: str
    max_abs_diff: float
    atol: float

    @property
    def pair(self) -> str:
        return f"{self.a} vs {self.b}"

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.atol)


@dataclass
class ParityReport:
    """The result of :func:`compare`. ``ok``: every compared output of every pair within ``atol``
    (and at least one pair compared). ``to_table()`` (markdown), ``to_json()``."""

    checkpoint: str
    source_format: str
    model: str
    config: dict[str, Any]
    images: list[str]
    frameworks: list[str]
    skipped: dict[str, str]
    atol: float
    tolerance: str
    results: list[PairResult] = field(default_factory=list)
    first_diverging: dict[str, str | None] = field(default_factory=dict)
    top1: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def worst(self) -> PairResult | None:
        return max(self.results, key=lambda r: r.max_abs_diff / r.atol) if self.results else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["results"] = [dict(asdict(r), pair=r.pair, ok=r.ok) for r in self.results]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def to_table(self, *, layers: bool = True) -> str:
        """Markdown: one row per output, one column per framework pair."""
        pairs = list(dict.fromkeys(r.pair for r in self.results))
        outputs = list(dict.fromkeys(r.output for r in self.results))
        if not layers:
            outputs = [o for o in outputs if not o.startswith("hidden_states[")]
        cell = {(r.output, r.pair): r for r in self.results}
        lines = [f"Parity of {self.checkpoint} ({self.model}, {self.source_format}) on {len(self.images)} image(s); "
                 f"max |diff|, tolerance {self.atol:.0e} ({self.tolerance})", ""]
        lines.append("| output | " + " | ".join(pairs) + " |")
        lines.append("|---|" + "---:|" * len(pairs))
        for output in outputs:
            row = []
            for pair in pairs:
                r = cell.get((output, pair))
                row.append("" if r is None else f"{r.max_abs_diff:.2e}" + ("" if r.ok else " FAIL"))
            lines.append(f"| {output} | " + " | ".join(row) + " |")
        lines.append("")
        for pair, layer in self.first_diverging.items():
            lines.append(f"- {pair}: " + (f"first diverging layer: {layer}" if layer else "no layer diverges"))
        for fw, labels in self.top1.items():
            lines.append(f"- top-1 {fw}: {', '.join(labels)}")
        for fw, why in self.skipped.items():
            lines.append(f"- skipped {fw}: {why}")
        for note in self.notes:
            lines.append(f"- note: {note}")
        lines.append(f"\n**{'PASS' if self.ok else 'FAIL'}**" + ("" if self.results else " (no framework pair ran)"))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def builtin_state(seed: int = 0) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """The built-in ViT-B/16 classifier (1000 labels) with deterministic seeded weights."""
    config = ViTConfig.from_variant("B/16", num_labels=1000, architectures=["ViTForImageClassification"])
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for spec in weight_table(config, "classification"):
        values = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(0.02)
        state[spec.name] = values + np.float32(1.0) if spec.kind == "norm" else values
    return state, config


def sample_images() -> list[pathlib.Path]:
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _pixel_values(images: Sequence[Any], config: ViTConfig, directory: pathlib.Path | None) -> np.ndarray:
    from vit_core import AutoImageProcessor, ViTImageProcessor

    if directory is not None and (directory / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(directory)
    else:
        h, w = config.image_hw
        processor = ViTImageProcessor(size={"height": h, "width": w})
    loaded = [open_image(i) for i in images]
    return np.asarray(processor(loaded, return_tensors="np")["pixel_values"], dtype=np.float32)


def open_image(image: Any) -> Any:
    """A path -> its decoded PIL image (anything else is returned as is). A missing file is a
    FileNotFoundError, an unreadable or decompression-bomb image a ValueError naming the file."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        path = pathlib.Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Image.DecompressionBombError as e:
            raise ValueError(f"{path}: refused, the image is too large to decode safely ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: not an image Pillow can read ({e})") from None
    return image


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return pathlib.Path(image).name
    shape = getattr(image, "shape", None) or getattr(image, "size", None)
    return f"{type(image).__name__}{tuple(shape) if shape is not None else ''}"


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def _parse_perturb(perturb: Mapping[str, Any] | None) -> dict[str, tuple[str, float]]:
    out: dict[str, tuple[str, float]] = {}
    for fw, spec in (perturb or {}).items():
        if isinstance(spec, str):
            key, _, delta = spec.partition("=")
            out[fw] = (key, float(delta) if delta else DEFAULT_PERTURBATION)
        else:
            key, delta = spec
            out[fw] = (str(key), float(delta))
    return out


def default_atol(config: ViTConfig, real_images: bool) -> tuple[float, str]:
    """docs/NUMERICS.md: 1e-5 for small test configs, 1e-4 for ViT-B-sized models on real images."""
    if config.hidden_size >= 384 and real_images:
        return TOLERANCES["base_real_images"], "base_real_images"
    return TOLERANCES["small"], "small"


def compare(
    checkpoint: str | os.PathLike | None = None,
    images: Iterable[Any] | None = None,
    frameworks: Sequence[str] = FRAMEWORKS,
    layers: bool = False,
    atol: float | None = None,
    *,
    timm_model_name: str | None = None,
    perturb: Mapping[str, Any] | None = None,
) -> ParityReport:
    """Load ``checkpoint`` (any supported source; None: the built-in ViT-B/16) in each of
    ``frameworks`` ("torch", "tf", "flax", "reference" for vit_core's float64 numpy forward, and "onnx"
/ "openvino": the torch model exported and run by ONNX Runtime / OpenVINO),
    run identical pixel_values, and report max |diff| per output per framework pair.

    ``images``: paths, PIL images or arrays (default: the bundled sample photos; random seeded
    inputs for models that do not take 3-channel images). ``layers=True`` also compares every
    hidden state and names the first layer that diverges. ``atol``: the bound (default from
    vit_core.tolerances: 1e-4 for models of ViT-S width and up on real photos, else 1e-5).
    ``perturb``: ``{framework: "canonical.key=delta"}`` adds ``delta`` (default 1e-2) to the first
    element of one weight in that framework's copy, to show the report catches a corrupted weight.
    Frameworks that are not installed are listed in ``report.skipped``. ``checkpoint`` may be a
    ``vitx export`` directory: its runtime ("onnx" / "openvino") runs the model it holds, the other
    frameworks load the checkpoint it was exported from (recorded in its export.json).
    """
    unknown = [f for f in frameworks if f not in ALL_BACKENDS]
    if unknown:
        raise ValueError(f"unknown framework(s) {unknown}; choose from {', '.join(ALL_BACKENDS)}")
    perturbations = _parse_perturb(perturb)
    bad = [f for f in perturbations if f not in frameworks]
    if bad:
        raise ValueError(f"perturb names framework(s) {bad} that are not compared")
    notes: list[str] = []
    exported: dict[str, Any] = {}  # runtime -> runner of an export directory's own model
    if checkpoint is not None and is_export_dir(checkpoint):
        directory = pathlib.Path(checkpoint)
        config = ViTConfig.from_json_file(directory / "config.json")
        runtime, runner = load_runner(directory)
        exported[runtime] = runner
        source = export_source(directory)
        name, source_format = str(checkpoint), f"{runtime} export"
        if source is None:
            state = None
            notes.append(f"{directory}: the export's source checkpoint is not available; only {runtime} runs")
        else:
            loaded = open_checkpoint(source, timm_model_name=timm_model_name)
            state = materialize(loaded.state)
            notes.append(f"{runtime} runs {directory}'s own model; the other frameworks load its source {source}")
        task = task_of(state) if state is not None else _task_of_config(config)
    elif checkpoint is None:
        state, config = builtin_state()
        name, source_format, directory = BUILTIN_NAME, "built-in", None
    else:
        loaded = open_checkpoint(checkpoint, timm_model_name=timm_model_name)
        state, config = materialize(loaded.state), loaded.config
        name, source_format = str(checkpoint), loaded.format
        path = pathlib.Path(checkpoint)
        directory = path if path.is_dir() else path.parent if path.exists() else None
    if not exported:
        task = task_of(state)

    image_list = list(images) if images is not None else None
    if image_list is not None and not image_list:
        raise ValueError("images is empty")
    if config.num_channels != 3:
        rng = np.random.default_rng(0)
        h, w = config.image_hw
        pixel_values = rng.standard_normal((2, config.num_channels, h, w)).astype(np.float32)
        described = ["seeded random input (2 images)"]
        real = False
        notes.append(f"num_channels={config.num_channels}: photos do not apply, seeded random pixel_values used")
    else:
        image_list = image_list if image_list is not None else sample_images()
        pixel_values = _pixel_values(image_list, config, directory)
        described = [_describe(i) for i in image_list]
        real = True
    bound, tolerance = (atol, "user") if atol is not None else default_atol(config, real)

    report = ParityReport(name, source_format, architecture_of(task), _config_summary(config), described,
                          [], {}, bound, tolerance, notes=notes)
    runs = {}
    for fw in frameworks:
        why = unavailable(fw) if fw not in exported else None
        if why is None and fw not in exported and state is None:
            why = "the export directory's source checkpoint is not available"
        if why is not None:
            report.skipped[fw] = why
            continue
        if fw in exported:
            start = time.perf_counter()
            outputs = {k: v.astype(np.float64) for k, v in exported[fw](pixel_values).items()}
            runs[fw] = Run(outputs, 0.0, time.perf_counter() - start)
            report.frameworks.append(fw)
            report.seconds[fw] = {"load": 0.0, "forward": round(runs[fw].forward_seconds, 3)}
            continue
        fw_state = state
        if fw in perturbations:
            key, delta = perturbations[fw]
            if state is None or key not in state:
                raise ValueError(f"perturb: {key!r} is not a weight of this checkpoint")
            fw_state = dict(state)
            # one element: a uniform shift of a bias feeding a LayerNorm would cancel exactly
            corrupted = np.array(state[key], copy=True)
            corrupted.reshape(-1)[0] += np.asarray(delta, dtype=corrupted.dtype)
            fw_state[key] = corrupted
            notes.append(f"{fw}: {key}[0] perturbed by {delta:g} on purpose")
        runs[fw] = run_framework(fw, fw_state, task, pixel_values, hidden_states=layers, config=config)
        report.frameworks.append(fw)
        report.seconds[fw] = {"load": round(runs[fw].load_seconds, 3), "forward": round(runs[fw].forward_seconds, 3)}
    _fill_results(report, runs, bound, layers)
    if task == "classification":
        for fw, run in runs.items():
            top = np.argmax(run.outputs["logits"], axis=-1)
            report.top1[fw] = [config.id2label.get(int(i), str(int(i))) for i in top]
    return report


def _task_of_config(config: ViTConfig) -> str:
    architectures = config.architectures or []
    if any("ImageClassification" in a for a in architectures):
        return "classification"
    if any("MaskedImageModeling" in a for a in architectures):
        return "mim"
    return "base"


def _fill_results(report: ParityReport, runs: dict[str, Any], bound: float, layers: bool) -> None:
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            first = None
            for output in runs[a].outputs:
                if output not in runs[b].outputs:
                    continue
                x, y = runs[a].outputs[output], runs[b].outputs[output]
                if x.shape != y.shape:
                    raise ValueError(f"{a} and {b} disagree on the shape of {output}: {x.shape} vs {y.shape}")
                diff = float(np.max(np.abs(x - y))) if x.size else 0.0
                result = PairResult(a, b, output, diff, bound)
                report.results.append(result)
                if layers and first is None and output.startswith("hidden_states[") and not result.ok:
                    first = _layer_name(output)
            if layers:
                report.first_diverging[f"{a} vs {b}"] = first


def _layer_name(output: str) -> str:
    i = int(re.search(r"\[(\d+)\]", output).group(1))  # type: ignore[union-attr]
    return f"{output} (embeddings output)" if i == 0 else f"{output} (output of encoder layer {i - 1})"


def _config_summary(config: ViTConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "intermediate_size", "image_size", "patch_size", "num_channels",
                                            "hidden_act", "layer_norm_eps")} | {"num_labels": config.num_labels}


def assert_parity(
    checkpoint: str | os.PathLike | None = None,
    atol: float | None = None,
    *,
    images: Iterable[Any] | None = None,
    frameworks: Sequence[str] = FRAMEWORKS,
    layers: bool = False,
    min_frameworks: int = 2,
) -> ParityReport:
    """Pytest helper: ``compare`` and raise AssertionError (with the table) unless every pair is
    within ``atol`` and at least ``min_frameworks`` frameworks ran. Returns the report."""
    report = compare(checkpoint, images=images, frameworks=frameworks, layers=layers, atol=atol)
    if len(report.frameworks) < min_frameworks:
        raise AssertionError(f"parity needs {min_frameworks} frameworks, only {report.frameworks} ran "
                             f"(skipped: {report.skipped})")
    if not report.ok:
        raise AssertionError("parity failed:\n" + report.to_table())
    return report
