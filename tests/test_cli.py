"""The vitx command line, run as users run it: a subprocess, checking exit codes, stdout and stderr."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conversion.frameworks import FRAMEWORKS, unavailable

from .test_conversion import NPZ, TIMM

AVAILABLE = [f for f in FRAMEWORKS if unavailable(f) is None]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def vitx(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "conversion.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


def test_convert_exit_codes_and_force(tmp_path: pathlib.Path) -> None:
    dst = tmp_path / "out"
    done = vitx("convert", str(NPZ / "jax.npz"), str(dst), "--to", "flax")
    assert done.returncode == 0, done.stderr
    assert "jax -> flax" in done.stdout and (dst / "flax_model.msgpack").is_file()
    again = vitx("convert", str(NPZ / "jax.npz"), str(dst), "--to", "flax")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    forced = vitx("--quiet", "convert", str(NPZ / "jax.npz"), str(dst), "--to", "tf", "--force")
    assert forced.returncode == 0 and forced.stdout == "" and (dst / "tf_model.h5").is_file()
    timm_file = tmp_path / "timm.safetensors"
    assert vitx("convert", str(dst), str(timm_file), "--to", "timm", "-q").returncode == 0 and timm_file.is_file()


@pytest.mark.parametrize("args,message", [
    (["convert", "{tmp}/missing.npz", "{tmp}/x"], "no such file"),
    (["convert", "{tmp}/junk.dat", "{tmp}/x"], "unrecognised checkpoint format"),
    (["convert", "{tmp}/junk.bin", "{tmp}/x"], "not a valid torch file"),
    (["convert", "{tmp}/half.npz", "{tmp}/x"], "truncated|corrupt|not a valid"),
    (["info", "{tmp}/mapped.npz"], "MAP pooling"),
    (["convert", str(TIMM / "vit_tiny"), "{tmp}/x", "--timm-model", "vit_base_patch16_reg4_gap_256"], "register tokens"),
    (["parity", str(NPZ / "jax.npz"), "--frameworks", "reference", "--perturb", "nonsense"], "FRAMEWORK:KEY"),
    (["parity", str(NPZ / "jax.npz"), "--frameworks", "caffe"], "unknown framework"),
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(args: list[str], message: str, tmp_path: pathlib.Path) -> None:
    import numpy as np

    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage" * 50)
    (tmp_path / "junk.dat").write_bytes(b"\x00\x01garbage" * 50)
    data = (NPZ / "jax.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    with np.load(NPZ / "big_vision.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["params/MAPHead_0/probe"] = np.zeros((1, 1, 32), np.float32)
    np.savez(tmp_path / "mapped.npz", **arrays)
    done = vitx(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    import re

    assert re.search(message, done.stderr), done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("vitx: error:")


def test_argparse_errors_exit_2() -> None:
    done = vitx("convert", "a", "b", "--to", "onnx")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_info_text_and_json() -> None:
    done = vitx("info", str(NPZ / "jax.npz"), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["format"] == "jax" and info["model"] == "ViTForImageClassification"
    assert info["num_labels"] == 5 and len(info["labels"]) == 5
    assert info["config"]["hidden_act"] == "gelu_new" and info["config"]["layer_norm_eps"] == 1e-6
    # D=32, 2 layers, MLP 64, 16 patches of 8x8x3, 5 labels (the table's count)
    from vit_core import ViTConfig, parameter_count

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                       patch_size=8, num_labels=5)
    assert info["parameters"] == parameter_count(config, "classification")
    text = vitx("info", str(TIMM / "vit_tiny"))
    assert text.returncode == 0 and "format      timm" in text.stdout and "heads 4" in text.stdout


@pytest.mark.skipif(len(AVAILABLE) < 1, reason="needs a framework")
def test_parity_json_shape_and_corrupted_weight_fails(tmp_path: pathlib.Path) -> None:
    model = tmp_path / "model"
    assert vitx("-q", "convert", str(NPZ / "jax.npz"), str(model)).returncode == 0
    done = vitx("parity", str(model), "--frameworks", *AVAILABLE, "reference", "--json", "--layers")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["frameworks"] == AVAILABLE + ["reference"]
    assert {"checkpoint", "source_format", "model", "config", "images", "atol", "results", "first_diverging",
            "skipped", "top1", "seconds"} <= set(report)
    assert all(r["ok"] and r["max_abs_diff"] <= 1e-5 for r in report["results"])
    table = vitx("parity", str(model), "--frameworks", AVAILABLE[0], "reference")
    assert table.returncode == 0 and "| logits |" in table.stdout and "PASS" in table.stdout
    corrupted = vitx("parity", str(model), "--frameworks", AVAILABLE[0], "reference",
                     "--perturb", f"{AVAILABLE[0]}:vit.encoder.layer.0.output.dense.bias=0.01")
    assert corrupted.returncode == 1, corrupted.stderr
    assert "FAIL" in corrupted.stdout


@pytest.mark.skipif(len(AVAILABLE) < 1, reason="needs a framework")
def test_classify(tmp_path: pathlib.Path) -> None:
    from conversion.compare import sample_images

    photos = [str(p) for p in sample_images()]
    done = vitx("classify", str(NPZ / "jax.npz"), *photos, "--framework", AVAILABLE[0], "--top-k", "2", "--json")
    assert done.returncode == 0, done.stderr
    predictions = json.loads(done.stdout)
    assert list(predictions) == photos and all(len(p) == 2 for p in predictions.values())
    text = vitx("classify", str(NPZ / "jax.npz"), photos[0], "--framework", AVAILABLE[0], "--top-k", "1")
    assert text.returncode == 0 and "LABEL_" in text.stdout
    missing = vitx("classify", str(NPZ / "jax.npz"), str(tmp_path / "nope.png"), "--framework", AVAILABLE[0])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'vitx = "conversion.cli:main"' in text


@pytest.fixture(scope="module")
def transformers_bin(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """transformers' own ViTForImageClassification saved as pytorch_model.bin (not safetensors)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    image_size=32, patch_size=8, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                                    label2id={"a": 0, "b": 1, "c": 2})
    directory = tmp_path_factory.mktemp("bin") / "tiny-bin"
    transformers.ViTForImageClassification(config).save_pretrained(directory, safe_serialization=False)
    assert (directory / "pytorch_model.bin").is_file() and not (directory / "model.safetensors").exists()
    return directory


def test_every_command_reads_pytorch_model_bin(transformers_bin: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """classify, parity, info and convert read a pytorch_model.bin the way from_pretrained does
    (they failed with "dtype float32 cannot be stored in safetensors")."""
    from conversion.compare import sample_images

    image = sample_images()[0]
    for framework in AVAILABLE:
        result = vitx("classify", str(transformers_bin), str(image), "--framework", framework, "--json", "-q")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)[str(image)][0]["label"] in ("a", "b", "c")
    parity = vitx("parity", str(transformers_bin), "--frameworks", ",".join(AVAILABLE), "--json", "-q")
    assert parity.returncode == 0, parity.stderr
    assert sorted(json.loads(parity.stdout)["frameworks"]) == sorted(AVAILABLE)
    assert vitx("info", str(transformers_bin), "-q").returncode == 0
    back = vitx("convert", str(transformers_bin), str(tmp_path / "pt"), "--to", "pytorch", "-q")
    assert back.returncode == 0, back.stderr
    again = vitx("classify", str(tmp_path / "pt"), str(image), "--json", "-q")  # vitx's own --to pytorch output
    assert again.returncode == 0, again.stderr


def test_frameworks_accept_comma_and_space_lists() -> None:
    for args in (["reference,reference"], ["reference", "reference"]):
        result = vitx("parity", str(NPZ / "jax.npz"), "--frameworks", *args, "--json", "-q")
        assert result.returncode in (0, 1) and "unknown framework" not in result.stderr, result.stderr
        assert json.loads(result.stdout)["frameworks"] == ["reference", "reference"] or result.returncode == 0
    bad = vitx("parity", str(NPZ / "jax.npz"), "--frameworks", "torch,caffe", "-q")
    assert bad.returncode == 2 and "caffe" in bad.stderr and "Traceback" not in bad.stderr


def test_legacy_torch_pickle_reads_everywhere(tmp_path: pathlib.Path) -> None:
    """A pre-1.6 (non-zip) pytorch_model.bin: from_pretrained in every framework and the CLI."""
    torch = pytest.importorskip("torch")
    from vit_core import ViTConfig
    from vit_core.checkpoint import read_state_dict

    from .cases import TINY, seeded_state

    config = ViTConfig(**dict(TINY, num_labels=3))
    state = seeded_state(config, "classification")
    config.save_pretrained(tmp_path)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    assert (tmp_path / "pytorch_model.bin").read_bytes()[:2] == b"\x80\x02"
    got = read_state_dict(tmp_path)
    assert all((got[k] == v).all() for k, v in state.items())
    import importlib

    for framework in AVAILABLE:
        package = {"torch": "vit_torch", "tf": "vit_tf", "flax": "vit_flax"}[framework]
        prefix = {"torch": "", "tf": "TF", "flax": "Flax"}[framework]
        cls = getattr(importlib.import_module(package), prefix + "ViTForImageClassification")
        canonical = importlib.import_module(package + ".weights").canonical_state(cls.from_pretrained(tmp_path))
        assert set(canonical) == set(state), framework
        assert all(np.array_equal(canonical[k], v) for k, v in state.items()), framework
    assert vitx("info", str(tmp_path), "-q").returncode == 0
