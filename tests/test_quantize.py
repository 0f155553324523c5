"""int8 quantization (docs/int8.md): vit_torch's native int8 and ONNX Runtime / OpenVINO (NNCF),
dynamic and static, measured against float32 on a fine-tuned model over held-out images:
top-1 agreement >= 99% and logit cosine similarity >= 0.999 (docs/NUMERICS.md), on every image.

The model: ``vitx finetune`` of the learning test (tests/test_finetune.py) on crops of the committed
photos; held-out images: other crops of the same photos (another seed), never seen in training or
calibration.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from conversion.cli import main  # noqa: E402
from tests.test_finetune import LEARN, crop_task, seeded_checkpoint  # noqa: E402
from vit_core.image_processing import ViTImageProcessor  # noqa: E402
from vit_core.quantization import agreement, calibration_pixels, layer_roles, resolve_skip  # noqa: E402

TOP1_AGREEMENT = 0.99  # docs/NUMERICS.md: int8 against float32 on a trained model, held-out images
LOGIT_COSINE = 0.999


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("int8")
    photos = crop_task(root / "photos")
    held_out = crop_task(root / "held_out", seed=1)
    backbone = seeded_checkpoint(root / "backbone")
    assert main(["finetune", str(photos), "--model", str(backbone), "--output", str(root / "trained"),
                 "--framework", "torch", "--quiet", *LEARN]) == 0
    return {"checkpoint": root / "trained", "photos": photos, "held_out": held_out, "root": root}


@pytest.fixture(scope="module")
def held_out(trained: dict[str, pathlib.Path]) -> np.ndarray:
    return calibration_pixels(trained["held_out"], ViTImageProcessor.from_pretrained(trained["checkpoint"]))


@pytest.fixture(scope="module")
def float_model(trained: dict[str, pathlib.Path]):
    from vit_torch import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(trained["checkpoint"]).eval()


@pytest.fixture(scope="module")
def onnx_model(trained: dict[str, pathlib.Path], float_model) -> pathlib.Path:
    """float32 ONNX of the fine-tuned model (vitx's exporter, its default opset), preprocessor beside it."""
    pytest.importorskip("onnxscript")
    from conversion.export import export_onnx

    out = trained["root"] / "onnx"
    out.mkdir()
    path = export_onnx(float_model, out / "model.onnx", framework="torch")
    (out / "preprocessor_config.json").write_text((trained["checkpoint"] / "preprocessor_config.json").read_text())
    return path


def model_bytes(path: pathlib.Path) -> int:
    """The model file and its weights: an ONNX file's external data, an IR's .bin."""
    extra = [path.with_name(path.name + ".data"), path.with_suffix(".bin")] if path.suffix in (".onnx", ".xml") else []
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.exists())


def check(name: str, reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    result = agreement(reference, logits)
    print(f"{name}: top-1 agreement {result['top1_agreement']:.4f}, logit cosine mean {result['cosine_mean']:.6f} "
          f"min {result['cosine_min']:.6f}, max |diff| {result['max_abs_diff']:.3f} ({result['images']} images)")
    assert result["top1_agreement"] >= TOP1_AGREEMENT, (name, result)
    assert result["cosine_min"] >= LOGIT_COSINE, (name, result)
    return result


# ------------------------------------------------------------------------------ native vit_torch
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_native_int8_agrees_with_float32(mode: str, trained, float_model, held_out: np.ndarray) -> None:
    from vit_core.outputs import ImageClassifierOutput
    from vit_torch.layers import Linear
    from vit_torch.quantization import QuantizedLinear, quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantized = quantize_dynamic(float_model)
    else:
        quantized = quantize_static(float_model, trained["photos"], preprocessor=trained["checkpoint"])
    layers = dict(quantized.named_modules())
    assert isinstance(layers["vit.encoder.layer.0.attention.attention.query"], QuantizedLinear)
    assert isinstance(layers["vit.encoder.layer.1.output.dense"], QuantizedLinear)
    assert type(layers["classifier"]) is Linear  # the default skip keeps the head in float32
    assert sum(isinstance(m, QuantizedLinear) for m in layers.values()) == 12
    assert type(float_model.vit.encoder.layer[0].attention.attention.query) is Linear  # the original is untouched
    x = torch.from_numpy(held_out)
    with torch.inference_mode():
        reference = float_model(x).logits.numpy()
        out = quantized(x, output_hidden_states=True)
    assert isinstance(out, ImageClassifierOutput) and len(out.hidden_states) == 3
    check(f"vit_torch int8-{mode}", reference, out.logits.numpy())
    # int8 really ran: not the float path
    assert float(np.max(np.abs(out.logits.numpy() - reference))) > 1e-4


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_native_int8_gemm_is_exact_integer_arithmetic_on_this_cpu(shift: float) -> None:
    """The int8 GEMM equals the integer sum of the quantized operands (float32 rounding aside) on
    whatever CPU runs it: on x86 without VNNI the weights' range is chosen so that no pair of
    u8 x s8 products overflows the kernel's saturating int16 (vit_core.cpu.int8_dot_saturates)."""
    from vit_core import cpu
    from vit_torch.layers import Linear
    from vit_torch.quantization import QuantizedLinear

    torch.manual_seed(0)
    linear = Linear(256, 64).requires_grad_(False)
    layer = QuantizedLinear(linear)
    assert layer.weight_max == cpu.int8_weight_max() and int(layer.weight_int8.abs().max()) == layer.weight_max
    x = torch.randn(100, 256) + shift  # shifted: the uint8 codes sit near 255, the worst case for the pairs
    with torch.inference_mode():
        out = layer(x).double()
    qx, scale, zero_point = layer._quantize_input(x)
    exact = ((qx.double() - zero_point) * scale) @ (layer.weight_int8.double() * layer.weight_scale.double()[:, None]).T
    exact += layer.bias.double()
    assert float((out - exact).abs().max()) < 1e-5
    assert float((out - linear(x).double()).abs().max()) < 0.1  # and int8 is close to the float layer


def test_native_int8_every_layer_and_errors(trained, float_model, held_out: np.ndarray,
                                            tmp_path: pathlib.Path) -> None:
    from vit_torch import ViTForImageClassification
    from vit_torch.quantization import QuantizedLinear, quantize_dynamic, quantize_static

    everything = quantize_dynamic(float_model, skip=())
    assert isinstance(everything.classifier, QuantizedLinear)
    with torch.inference_mode():
        check("vit_torch int8-dynamic, every Linear", float_model(torch.from_numpy(held_out)).logits.numpy(),
              everything(torch.from_numpy(held_out)).logits.numpy())
    with pytest.raises(ValueError, match="unknown layer role.*patch"):
        quantize_dynamic(float_model, skip=["patch"])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_dynamic(everything)
    with pytest.raises(FileNotFoundError, match="calibration directory .*missing does not exist"):
        quantize_static(float_model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="calibration directory .*empty holds no images"):
        quantize_static(float_model, tmp_path / "empty")
    with pytest.raises(ValueError, match="float32 CPU model"):
        quantize_dynamic(ViTForImageClassification.from_pretrained(trained["checkpoint"], torch_dtype=torch.bfloat16))


# ------------------------------------------------------------------------------ engines
ENGINE_CASES = [("onnxruntime", "int8-dynamic"), ("onnxruntime", "int8-static"), ("openvino", "int8-dynamic"),
                ("openvino", "int8-static")]


@pytest.mark.parametrize("engine,mode", ENGINE_CASES)
def test_engine_int8_agrees_with_float32(engine: str, mode: str, trained, onnx_model: pathlib.Path,
                                         held_out: np.ndarray, tmp_path: pathlib.Path) -> None:
    pytest.importorskip(engine)
    if engine == "openvino":
        pytest.importorskip("nncf")
    from conversion.quantize import quantize_exported, run_exported

    out = tmp_path / ("model.onnx" if engine == "onnxruntime" else "model.xml")
    # calibration: the training crops through the preprocessor found beside the ONNX file
    written = quantize_exported(onnx_model, out, mode=mode, engine=engine,
                                calibration=trained["photos"] if mode == "int8-static" else None)
    assert written == out and out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name] + (["model.bin"] if engine == "openvino" else []))
    reference = run_exported(onnx_model, held_out)
    result = check(f"{engine} {mode}", reference, run_exported(out, held_out))
    assert result["max_abs_diff"] > 1e-4  # quantized, not a copy of the float model
    size, fp32 = model_bytes(out), model_bytes(onnx_model)
    print(f"{engine} {mode}: {size} bytes vs float32 {fp32} ({size / fp32:.0%})")
    assert size < 0.85 * fp32
    with pytest.raises(FileExistsError, match="exists"):
        quantize_exported(onnx_model, out, mode=mode, engine=engine, calibration=trained["photos"])


def test_engine_quantizes_the_linear_layers_only(onnx_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from conversion.quantize import onnx_linear_nodes, quantize_exported

    source = onnx.load(str(onnx_model))
    roles = [role for _, role in onnx_linear_nodes(source)]
    assert roles == layer_roles(13) == ["qkv"] * 3 + ["attention_output", "fc1", "fc2"] + \
        ["qkv"] * 3 + ["attention_output", "fc1", "fc2", "classifier"]
    before = [n.op_type for n in source.graph.node]
    out = quantize_exported(onnx_model, tmp_path / "q.onnx", mode="int8-dynamic")
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == 12  # 6 per layer
    # float: the patch embedding, LayerNorm, the attention's own matmuls, the classifier (its Gemm
    # becomes MatMul + Add)
    assert ops.count("Conv") == 1 and ops.count("LayerNormalization") == before.count("LayerNormalization") == 5
    assert ops.count("MatMul") + ops.count("Gemm") == before.count("MatMul") + before.count("Gemm") - 12


def test_openvino_static_quantizes_the_inputs_of_the_linear_layers_only(trained, onnx_model: pathlib.Path,
                                                                        tmp_path: pathlib.Path) -> None:
    """Every activation FakeQuantize of the calibrated IR feeds a quantized Linear's MatMul: none on
    the fused attention's query / key (NNCF quantizes ScaledDotProductAttention's inputs unless told
    not to; on an AVX2 host that cost cosine min 0.9965 against 0.9997 with the attention float)."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from conversion.quantize import quantize_exported

    out = quantize_exported(onnx_model, tmp_path / "q.xml", mode="int8-static", engine="openvino",
                            calibration=trained["photos"])
    fed = []
    for op in ov.Core().read_model(str(out)).get_ordered_ops():
        if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() != "Constant":
            fed += [t.get_node().get_type_name() for t in op.output(0).get_target_inputs()]
    # per layer: q / k / v share one, then attention_output (through the heads' Transpose), fc1, fc2
    assert fed.count("MatMul") == 2 * 5 and set(fed) <= {"MatMul", "Transpose"}, fed


def test_engine_errors(onnx_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    pytest.importorskip("onnxruntime")
    from conversion.quantize import quantize_exported

    with pytest.raises(FileNotFoundError, match="calibration directory .*nowhere does not exist"):
        quantize_exported(onnx_model, tmp_path / "a.onnx", mode="int8-static", calibration=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        quantize_exported(onnx_model, tmp_path / "a.onnx", mode="int8-static", calibration=tmp_path / "empty")
    with pytest.raises(ValueError, match="needs calibration images"):
        quantize_exported(onnx_model, tmp_path / "a.onnx", mode="int8-static")
    with pytest.raises(ValueError, match="unknown quantization mode 'int4'"):
        quantize_exported(onnx_model, tmp_path / "a.onnx", mode="int4")
    with pytest.raises(ValueError, match="unknown quantization engine"):
        quantize_exported(onnx_model, tmp_path / "a.onnx", engine="tensorrt")
    with pytest.raises(ValueError, match="must be a .onnx file"):
        quantize_exported(onnx_model, tmp_path / "a.xml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_exported(tmp_path / "none.onnx", tmp_path / "a.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing half-written


def test_skip_roles_and_layer_roles() -> None:
    assert resolve_skip(None) == {"classifier"} and resolve_skip("fc2, classifier") == {"fc2", "classifier"}
    assert resolve_skip(()) == frozenset()
    assert layer_roles(14)[-2:] == ["pooler", "classifier"] and layer_roles(12)[-1] == "fc2"
    for count in (5, 9):  # not 6 per layer plus at most two heads
        with pytest.raises(ValueError, match=f"{count} matrix multiplications"):
            layer_roles(count)


def test_cli_refuses_a_missing_calibration_directory(trained, tmp_path: pathlib.Path, capsys) -> None:
    code = main(["export", str(trained["checkpoint"]), str(tmp_path / "out"), "--format", "onnx",
                 "--quantize", "int8-static", "--calibration", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("vitx: error:") and "missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,mode", [("onnx", "int8-static"), ("openvino", "int8-dynamic")])
def test_cli_export_quantize_writes_an_int8_model_beside_the_float_one(fmt: str, mode: str, trained, held_out: np.ndarray,
                                                                      tmp_path: pathlib.Path) -> None:
    """``vitx export --quantize``: OUT_DIR keeps the validated float32 model and adds
    ``model.<mode>.<suffix>``, calibrated through the checkpoint's image processor, which agrees with
    the float32 model on the held-out images as the engine tests require."""
    pytest.importorskip("onnxscript")
    if fmt == "openvino":
        pytest.importorskip("nncf")
    from conversion.quantize import run_exported

    out = tmp_path / "out"
    extra = ["--calibration", str(trained["photos"])] if mode == "int8-static" else []
    assert main(["export", str(trained["checkpoint"]), str(out), "--format", fmt, "--quantize", mode, "--quiet",
                 *extra]) == 0
    suffix = ".onnx" if fmt == "onnx" else ".xml"
    float_file, int8_file = out / f"model{suffix}", out / f"model.{mode}{suffix}"
    assert float_file.is_file() and int8_file.is_file()
    assert {"config.json", "preprocessor_config.json", "export.json"} <= {p.name for p in out.iterdir()}
    result = check(f"vitx export --format {fmt} --quantize {mode}", run_exported(float_file, held_out),
                   run_exported(int8_file, held_out))
    assert result["max_abs_diff"] > 1e-4
