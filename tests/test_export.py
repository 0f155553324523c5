"""vitx export: vit_torch outputs trace and export; every format is run by its own runtime and matches
the source framework (docs/NUMERICS.md: 1e-4 in float32); the exported files run without vitx;
failures leave nothing behind; vitx parity runs onnx / openvino."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tests.cases import TINY, seeded_state
from tests.backends import import_blocker
from vit_core import ViTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUND = 1e-4

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnxscript", "torch")),
                                reason="vitx[onnx] / torch not installed")
needs_tf = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("tensorflow", "tf2onnx", "onnxruntime")),
                              reason="tensorflow / tf2onnx not installed")
needs_flax = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("jax", "flax", "jax2onnx", "onnxruntime")),
                                reason="flax / jax2onnx not installed")
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")

# Runs in a subprocess: vitx's packages cannot be imported there (a meta-path finder refuses them,
# whatever sys.path holds), so the exported file is all that runs.
NO_VITX = import_blocker("vit_core", "vit_torch", "vit_tf", "vit_flax", "conversion", "tests")


def _config(**overrides: object) -> ViTConfig:
    return ViTConfig(**(TINY | overrides))


def _checkpoint(tmp_path: pathlib.Path, task: str, name: str) -> pathlib.Path:
    from conversion.frameworks import build_model

    config = _config()
    model = build_model("torch", config, seeded_state(config, task), task)
    directory = tmp_path / name
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("export-ckpt")
    return {task: _checkpoint(root, task, task) for task in ("classification", "base")}


def _run_cli(*argv: str) -> int:
    from conversion.cli import main

    return main(list(argv))


# ------------------------------------------------------------------------ torch tracing / pytrees
@needs_onnx
@pytest.mark.parametrize("task", ["classification", "base"])
def test_torch_outputs_trace_export_and_onnx_export(task: str, tmp_path: pathlib.Path) -> None:
    import onnxruntime as ort
    import torch

    from conversion.frameworks import build_model

    config = _config()
    model = build_model("torch", config, seeded_state(config, task), task)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    x5 = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        eager2, eager5 = model(x).to_tuple(), model(x5).to_tuple()
    names = ["logits"] if task == "classification" else ["last_hidden_state", "pooler_output"]
    assert len(eager2) == len(names)

    def close(got: tuple, want: tuple, what: str) -> None:
        assert len(got) == len(want), what
        for g, w in zip(got, want):
            diff = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - w.double().numpy())))
            assert diff <= 1e-5, f"{what}: {diff}"

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
        close(traced(x5), eager5, "torch.jit.trace")
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        out = program.module()(x5)
        assert type(out).__name__ == type(model(x)).__name__  # the output class survives the pytree round trip
        close(out.to_tuple(), eager5, "torch.export")
    for dynamo in (True, False):
        path = tmp_path / f"model-{dynamo}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["pixel_values"], output_names=names,
                                  dynamic_shapes=({0: "batch"},))
            else:
                torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["pixel_values"], output_names=names,
                                  dynamic_axes={"pixel_values": {0: "batch"}})
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == names
        close(tuple(session.run(None, {"pixel_values": x5.numpy()})), eager5, f"torch.onnx.export(dynamo={dynamo})")


# ------------------------------------------------------------------------------ ONNX from torch
@needs_onnx
def test_export_onnx_torch_dynamic_size_validated_fused_and_runs_without_vitx(
        checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "onnx"
    assert _run_cli("--quiet", "export", str(checkpoints["classification"]), str(out), "--format", "onnx",
                    "--dynamic-size", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.onnx", "model.optimized.onnx",
                                                     "preprocessor_config.json"]
    # batch 1, batch 5 and two other resolutions, plain and optimized, all within the float32 bound
    assert set(result["parity"]) == {"batch 1", "batch 5", "48x40 batch 2", "24x48 batch 2"}
    assert set(result["optimized_parity"]) == set(result["parity"])
    assert max(result["parity"].values()) <= BOUND and max(result["optimized_parity"].values()) <= BOUND
    # every attention block is one Attention node (opset 23), the LayerNorms and GELUs fused
    assert result["opset"] == 23
    assert result["fused"]["Attention"] == TINY["num_hidden_layers"]
    assert result["fused"]["LayerNormalization"] == 2 * TINY["num_hidden_layers"] + 1
    assert result["fused"]["BiasGelu"] == TINY["num_hidden_layers"]

    from conversion.compare import open_image, sample_images
    from conversion.frameworks import build_model
    from vit_core import AutoImageProcessor

    import torch

    processor = AutoImageProcessor.from_pretrained(out)
    images = [open_image(p) for p in sample_images()]
    config = _config()
    model = build_model("torch", config, seeded_state(config, "classification"), "classification")
    inputs = {}
    for size in ((32, 32), (40, 56)):  # 40x56: a size the validation did not use
        pv = np.asarray(processor(images, return_tensors="np", size={"height": size[0], "width": size[1]})["pixel_values"],
                        dtype=np.float32)
        with torch.no_grad():
            inputs[f"{size[0]}x{size[1]}"] = (pv, model(torch.from_numpy(pv), interpolate_pos_encoding=True).logits.numpy())
    np.savez(tmp_path / "io.npz", **{f"x{k}": v[0] for k, v in inputs.items()}, **{f"y{k}": v[1] for k, v in inputs.items()})
    script = NO_VITX + f"""
import numpy as np, onnxruntime as ort
data = np.load({str(tmp_path / 'io.npz')!r})
for name in ("model.onnx", "model.optimized.onnx"):
    session = ort.InferenceSession({str(out)!r} + "/" + name, providers=["CPUExecutionProvider"])
    for size in ("32x32", "40x56"):
        (logits,) = session.run(["logits"], {{"pixel_values": data["x" + size]}})
        print(name, size, float(np.max(np.abs(logits.astype(np.float64) - data["y" + size]))))
try:
    import vit_core
except ImportError:
    print("vitx not importable")
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert "vitx not importable" in lines
    diffs = [float(line.split()[-1]) for line in lines if line.startswith("model.")]
    assert len(diffs) == 4 and max(diffs) <= BOUND, done.stdout


@needs_onnx
def test_export_onnx_float16_checked_and_bfloat16_refused(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from conversion.export import export

    result = export(checkpoints["base"], tmp_path / "fp16", format="onnx", dtype="float16", progress=False)
    assert result.bound == 1e-1
    assert 0 < max(result.parity.values()) <= 1e-2  # against torch's own float16 forward (measured 1.7e-3)
    assert set(result.parity) == {"batch 1", "batch 5"}
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    assert session.get_inputs()[0].type == "tensor(float)"
    # ONNX Runtime's CPU provider has no bfloat16 convolution: refused, nothing written
    assert _run_cli("--quiet", "export", str(checkpoints["base"]), str(tmp_path / "bf16"), "--format", "onnx",
                    "--dtype", "bfloat16") == 2
    err = capsys.readouterr().err
    assert err.startswith("vitx: error: ") and "bfloat16" in err and "Conv" in err
    assert not (tmp_path / "bf16").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "fp16"]  # no staging directory left either


@needs_onnx
def test_export_failure_removes_everything_and_exits_1(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from conversion import export as export_module

    real = export_module.source_runner

    def off_by_a_bit(*args: object, **kwargs: object) -> object:
        run = real(*args, **kwargs)
        return lambda x: {k: v + np.float32(2e-4) for k, v in run(x).items()}

    monkeypatch.setattr(export_module, "source_runner", off_by_a_bit)
    out = tmp_path / "bad"
    assert _run_cli("--quiet", "export", str(checkpoints["classification"]), str(out), "--format", "onnx") == 1
    err = capsys.readouterr().err
    assert "differs from the source by 2.0" in err or "differs from the source by 1.9" in err, err
    assert "> 1e-04" in err and "nothing was written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_bad_input_exits_2(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(checkpoints["classification"])
    cases = [
        (["--format", "saved_model", "--framework", "torch"], "written from --framework tf"),
        (["--format", "onnx", "--framework", "tf", "--dynamic-size"], "--framework torch only"),
        (["--format", "jax", "--opset", "18"], "--opset applies to"),
        (["--format", "onnx", "--opset", "12"], "from 17 to 23"),
        (["--format", "openvino", "--dtype", "float16"], "export float32"),
        (["--format", "onnx", "--quantize", "int8-static"], "--calibration IMAGE_DIR"),
        (["--format", "onnx", "--calibration", str(tmp_path)], "--quantize int8-static only"),
    ]
    for options, message in cases:
        assert _run_cli("--quiet", "export", ckpt, str(tmp_path / "out"), *options) == 2, options
        err = capsys.readouterr().err
        assert err.startswith("vitx: error: ") and message in err and "Traceback" not in err, (options, err)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert _run_cli("--quiet", "export", ckpt, str(tmp_path / "taken"), "--format", "onnx") == 2
    assert "already exists" in capsys.readouterr().err
    assert _run_cli("--quiet", "export", ckpt, str(tmp_path / "taken"), "--format", "onnx", "--force") == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- TF: ONNX, SavedModel
@needs_tf
def test_export_tf_onnx_and_saved_model_serving_without_vitx(checkpoints: dict[str, pathlib.Path],
                                                              tmp_path: pathlib.Path) -> None:
    from conversion.export import export

    onnx_result = export(checkpoints["base"], tmp_path / "onnx", format="onnx", framework="tf", progress=False)
    assert onnx_result.opset == 18 and max(onnx_result.parity.values()) <= BOUND
    assert set(onnx_result.parity) == {"batch 1", "batch 5"}
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert session.get_inputs()[0].shape[0] != 1 and not isinstance(session.get_inputs()[0].shape[0], int)
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]

    result = export(checkpoints["classification"], tmp_path / "sm", format="saved_model", progress=False)
    assert result.framework == "tf" and result.path == tmp_path / "sm" / "saved_model"
    assert max(result.parity.values()) <= BOUND
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    from conversion.frameworks import build_model
    from vit_core.options import flag  # noqa: F401  (vitx is importable here, not in the subprocess)

    config = _config()
    model = build_model("tf", config, seeded_state(config, "classification"), "classification")
    np.savez(tmp_path / "io.npz", x=x, y=model(x, training=False).logits.numpy())
    script = NO_VITX + f"""
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf
data = np.load({str(tmp_path / 'io.npz')!r})
serving = tf.saved_model.load({str(result.path)!r}).signatures["serving_default"]
out = serving(pixel_values=tf.constant(data["x"]))
print(sorted(out), float(np.max(np.abs(out["logits"].numpy().astype(np.float64) - data["y"]))))
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    names, diff = done.stdout.strip().rsplit(" ", 1)
    assert names == "['logits']" and float(diff) <= BOUND


@needs_tf
def test_export_saved_model_bfloat16_replaces_an_export_with_force(checkpoints: dict[str, pathlib.Path],
                                                                    tmp_path: pathlib.Path) -> None:
    from conversion.export import export, saved_model_runner

    out = tmp_path / "sm"
    out.mkdir()
    (out / "saved_model").mkdir()  # an earlier export
    (out / "config.json").write_text("{}")
    result = export(checkpoints["classification"], out, format="saved_model", dtype="bfloat16", force=True,
                    progress=False)
    assert result.bound == 1e-1 and set(result.parity) == {"batch 1", "batch 5"}
    assert 0 < max(result.parity.values()) <= 1e-1
    logits = saved_model_runner(result.path)(np.zeros((2, 3, 32, 32), np.float32))["logits"]
    assert logits.shape == (2, 5) and logits.dtype == np.float32
    assert json.loads((out / "export.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------- Flax: ONNX, jax
@needs_flax
def test_export_flax_onnx(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    from conversion.export import export

    result = export(checkpoints["classification"], tmp_path / "onnx", format="onnx", framework="flax", progress=False)
    assert result.opset == 23 and max(result.parity.values()) <= BOUND
    assert set(result.parity) == {"batch 1", "batch 5"}


@needs_flax
def test_export_flax_jax(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    from conversion.export import export, jax_runner

    jax_result = export(checkpoints["base"], tmp_path / "jax", format="jax", progress=False)
    assert jax_result.framework == "flax" and max(jax_result.parity.values()) <= BOUND
    out = jax_runner(jax_result.path)(np.zeros((4, 3, 32, 32), np.float32))  # any batch size
    assert sorted(out) == ["last_hidden_state", "pooler_output"]
    assert out["last_hidden_state"].shape == (4, 17, 32) and out["pooler_output"].shape == (4, 32)


# ------------------------------------------------------------------------------------- OpenVINO
@needs_onnx
@needs_openvino
def test_export_openvino_and_parity_of_onnx_and_openvino(checkpoints: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ov"
    assert _run_cli("export", str(checkpoints["classification"]), str(out), "--format", "openvino") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"openvino <- torch (float32, opset 23): wrote {out / 'model.xml'}", printed
    assert printed[1].startswith("  max |diff| vs torch: batch 1 ") and printed[1].endswith("(bound 1e-04)")
    result = json.loads((out / "export.json").read_text())
    assert {"model.xml", "model.bin", "config.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    assert max(result["parity"].values()) <= BOUND and set(result["parity"]) == {"batch 1", "batch 5"}
    assert f"batch 5 {result['parity']['batch 5']:.2e}" in printed[1]
    assert result["source"] == str(checkpoints["classification"].resolve())
    # vitx parity: the export directory's own model against its source checkpoint, and a fresh ONNX export
    assert _run_cli("--quiet", "parity", str(out), "--frameworks", "torch,openvino,onnx", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frameworks"] == ["torch", "openvino", "onnx"] and report["ok"]
    pairs = {r["pair"]: r["max_abs_diff"] for r in report["results"] if r["output"] == "logits"}
    assert set(pairs) == {"torch vs openvino", "torch vs onnx", "openvino vs onnx"}
    assert max(pairs.values()) <= 1e-5 and max(pairs.values()) > 0
    assert any("runs" in note and str(out) in note for note in report["notes"])
