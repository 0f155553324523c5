"""``vitx finetune``: it learns a real-image task in every framework, the three frameworks take the
same steps, a killed run resumes to the same weights, and bad data gets a clear error.

The task: five of the committed photos, random crops of each (the class is the photo a crop comes
from), crops held out for validation.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conversion.cli import main
from conversion.finetune import FinetuneOptions, finetune
from vit_core import ViTConfig
from vit_core.checkpoint.files import read_state_dict, save_state_dict
from vit_core.training import Schedule
from vit_core.weights import weight_table

from conversion.frameworks import unavailable

PHOTOS = pathlib.Path(__file__).parent / "fixtures" / "images"
FRAMEWORKS = ["torch", "tf", "flax"]
TINY_BACKBONE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                     patch_size=8)
LEARN = ["--epochs", "16", "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "10", "--val-split", "0.25"]
PARITY_LOSS_RTOL = 1e-4   # issue target: every step's loss across the three frameworks
PARITY_WEIGHT_ATOL = 1e-4  # and the final weights (attention key biases excepted: their gradient is exactly 0)


def available(framework: str) -> bool:
    return unavailable(framework) is None


def needs(framework: str) -> Any:
    return pytest.mark.skipif(not available(framework), reason=f"{framework} is not installed")


def crop_task(root: pathlib.Path, per_class: int = 40, seed: int = 0) -> pathlib.Path:
    """root/<photo>/<i>.png: ``per_class`` random square crops (30-60% of the short side) of each photo, 48x48."""
    rng = np.random.default_rng(seed)
    for photo in sorted(PHOTOS.glob("*")):
        if photo.suffix not in (".png", ".jpg"):
            continue
        image = Image.open(photo).convert("RGB")
        width, height = image.size
        folder = root / photo.stem
        folder.mkdir(parents=True)
        for i in range(per_class):
            side = int(min(width, height) * rng.uniform(0.3, 0.6))
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            image.crop((x, y, x + side, y + side)).resize((48, 48), Image.BILINEAR).save(folder / f"{i:03d}.png")
    return root


def seeded_checkpoint(directory: pathlib.Path, seed: int = 0, task: str = "base", **fields: Any) -> pathlib.Path:
    """A checkpoint directory (config.json + model.safetensors) of a tiny ViT with seeded numpy weights."""
    config = ViTConfig(**{**TINY_BACKBONE, **fields})
    rng = np.random.default_rng(seed)
    state = {}
    for spec in weight_table(config, task):
        if spec.init == "trunc_normal":
            state[spec.name] = np.clip(rng.standard_normal(spec.shape), -2, 2).astype(np.float32) * 0.02
        else:
            state[spec.name] = (np.ones if spec.init == "ones" else np.zeros)(spec.shape, np.float32)
    save_state_dict(state, directory)
    config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return crop_task(tmp_path_factory.mktemp("data") / "photos")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return seeded_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def run_cli(*argv: str) -> int:
    return main(["finetune", *argv])


def read_log(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ it learns
@pytest.mark.parametrize("framework", [pytest.param(f, marks=needs(f)) for f in FRAMEWORKS])
def test_learns_which_photo_a_crop_comes_from(framework: str, photos: pathlib.Path, backbone: pathlib.Path,
                                              tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    assert run_cli(str(photos), "--model", str(backbone), "--output", str(out), "--framework", framework,
                   "--log", str(tmp_path / "log.jsonl"), "--quiet", *LEARN) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors",
                                                     "preprocessor_config.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    curve = [round(e["val_accuracy"], 3) for e in metrics["epochs"]]
    print(f"{framework}: validation accuracy by epoch {curve}")
    assert metrics["val_accuracy"] >= 0.90, f"{framework} reached only {metrics['val_accuracy']:.3f}: {curve}"
    assert metrics["val_images"] == 50 and metrics["train_images"] == 150 and metrics["skipped_images"] == 0
    log = read_log(tmp_path / "log.jsonl")
    assert [e["step"] for e in log] == list(range(1, 161))
    assert {e["epoch"] for e in log} == set(range(1, 17))
    schedule = Schedule(2e-3, 160, 10)
    assert [e["lr"] for e in log] == [schedule.lr(s) for s in range(1, 161)]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(sorted(p.name for p in photos.iterdir()))}


@needs("torch")
def test_output_loads_everywhere_with_the_same_logits(photos: pathlib.Path, backbone: pathlib.Path,
                                                      tmp_path: pathlib.Path) -> None:
    """What finetune writes loads in vit_torch, vit_tf, vit_flax and transformers, with one answer."""
    import torch

    out = tmp_path / "out"
    finetune(FinetuneOptions(str(photos), str(backbone), str(out), max_steps=6, batch_size=8, lr=1e-3, quiet=True))
    from vit_core.image_processing import ViTImageProcessor

    processor = ViTImageProcessor.from_pretrained(out)
    pixels = processor([Image.open(p) for p in sorted(photos.glob("*/000.png"))], return_tensors="np")["pixel_values"]
    assert pixels.shape == (5, 3, 32, 32)
    logits = {}
    from vit_torch import ViTForImageClassification

    with torch.no_grad():
        logits["vit_torch"] = ViTForImageClassification.from_pretrained(out)(torch.from_numpy(pixels)).logits.numpy()
    if available("tf"):
        from vit_tf import TFViTForImageClassification

        logits["vit_tf"] = np.asarray(TFViTForImageClassification.from_pretrained(out)(pixels).logits)
    if available("flax"):
        from vit_flax import FlaxViTForImageClassification

        logits["vit_flax"] = np.asarray(FlaxViTForImageClassification.from_pretrained(out)(pixels).logits)
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():
        theirs = transformers.ViTForImageClassification.from_pretrained(out).eval()
        logits["transformers"] = theirs(torch.from_numpy(pixels)).logits.numpy()
        assert theirs.config.id2label[0] == "astronaut"
    for name, value in logits.items():
        diff = float(np.max(np.abs(value - logits["vit_torch"])))
        assert diff <= 1e-5, f"{name} logits differ from vit_torch's by {diff:.2e}"


# ------------------------------------------------------------------------------ parity
def test_three_frameworks_take_the_same_steps(photos: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """No augmentation, no shuffle, dropout 0, the same checkpoint: 20 steps give the same loss at every
    step in torch, TF and Flax, and the same weights (qkv biases on; key biases excepted)."""
    missing = [f for f in FRAMEWORKS if not available(f)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    checkpoint = seeded_checkpoint(tmp_path / "ckpt", seed=3, qkv_bias=True)
    losses, weights = {}, {}
    for framework in FRAMEWORKS:
        out = tmp_path / framework
        finetune(FinetuneOptions(str(photos), str(checkpoint), str(out), framework=framework, max_steps=20,
                                 batch_size=8, lr=1e-3, weight_decay=0.05, warmup_steps=5, augment=False,
                                 shuffle=False, log=str(tmp_path / f"{framework}.jsonl"), quiet=True))
        losses[framework] = np.array([e["loss"] for e in read_log(tmp_path / f"{framework}.jsonl")])
        weights[framework] = read_state_dict(out / "model.safetensors")
    assert all(len(v) == 20 for v in losses.values())
    start = read_state_dict(checkpoint / "model.safetensors")
    moved = float(np.max(np.abs(weights["torch"]["vit.encoder.layer.0.output.dense.weight"]
                                - start["encoder.layer.0.output.dense.weight"])))
    assert moved > 1e-3, f"20 steps moved the weights by only {moved:.2e}"
    for framework in ("tf", "flax"):
        rel = float(np.max(np.abs(losses[framework] - losses["torch"]) / np.abs(losses["torch"])))
        compared = [k for k in weights["torch"] if not k.endswith("attention.key.bias")]
        worst = max(compared, key=lambda k: float(np.max(np.abs(weights[framework][k] - weights["torch"][k]))))
        diff = float(np.max(np.abs(weights[framework][worst] - weights["torch"][worst])))
        key_bias = max(float(np.max(np.abs(weights[framework][k] - weights["torch"][k])))
                       for k in weights["torch"] if k.endswith("attention.key.bias"))
        print(f"{framework} vs torch over 20 steps: loss max rel diff {rel:.2e}, weights max |diff| {diff:.2e} "
              f"({worst}), key biases {key_bias:.2e}")
        assert rel <= PARITY_LOSS_RTOL, f"{framework}: per-step losses differ from torch's by {rel:.2e} (relative)"
        assert diff <= PARITY_WEIGHT_ATOL, f"{framework}: {worst} differs from torch's by {diff:.2e}"


# ------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("framework", [pytest.param(f, marks=needs(f)) for f in FRAMEWORKS])
def test_interrupted_run_resumes_to_the_same_weights(framework: str, photos: pathlib.Path, backbone: pathlib.Path,
                                                     tmp_path: pathlib.Path) -> None:
    """Stopped in the middle of epoch 2 and started again with --resume, a run redoes epoch 2 from its
    start with the original schedule and ends with the weights of a run never interrupted; the log
    holds every step once."""
    common = dict(data=str(photos), model=str(backbone), framework=framework, epochs=3, batch_size=16, lr=1e-3,
                  warmup_steps=4, quiet=True)
    whole = finetune(FinetuneOptions(output=str(tmp_path / "whole"), log=str(tmp_path / "whole.jsonl"), **common))
    out = tmp_path / "stopped"
    log = tmp_path / "stopped.jsonl"
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneOptions(output=str(out), log=str(log), stop_after_steps=whole.steps // 3 + 3, **common))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and not (out / "model.safetensors").exists()
    assert max(e["step"] for e in read_log(log)) > state["step"]  # steps of the unfinished epoch were logged
    resumed = finetune(FinetuneOptions(output=str(out), log=str(log), resume=True, **common))
    assert resumed.steps == whole.steps
    assert read_log(log) == read_log(tmp_path / "whole.jsonl")
    a, b = read_state_dict(tmp_path / "whole" / "model.safetensors"), read_state_dict(out / "model.safetensors")
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst == 0.0, f"resumed run ends {worst:.2e} away from the uninterrupted one"
    assert resumed.metrics["epochs"] == whole.metrics["epochs"] or \
        [e["val_accuracy"] for e in resumed.metrics["epochs"]] == [e["val_accuracy"] for e in whole.metrics["epochs"]]
    assert not (out / "checkpoint").exists()
    # --resume on a finished run: nothing to do
    again = finetune(FinetuneOptions(output=str(out), log=str(log), resume=True, **common))
    assert again.finished and again.steps == whole.steps


@needs("torch")
def test_killed_process_resumes(photos: pathlib.Path, backbone: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """SIGKILL at a random moment after the first checkpoint: --resume finishes the run with the weights
    of an uninterrupted one."""
    args = [str(photos), "--model", str(backbone), "--epochs", "4", "--batch-size", "8", "--lr", "1e-3", "-q"]
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
    command = [sys.executable, "-m", "conversion.cli", "finetune"]
    out = tmp_path / "killed"
    process = subprocess.Popen(command + args + ["--output", str(out)], env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    time.sleep(float(np.random.default_rng().uniform(0, 0.3)))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert subprocess.run(command + args + ["--output", str(out), "--resume"], env=env, timeout=300).returncode == 0
    assert main(["finetune", *args, "--output", str(tmp_path / "whole")]) == 0
    a, b = read_state_dict(tmp_path / "whole" / "model.safetensors"), read_state_dict(out / "model.safetensors")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) == 0.0


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("framework", [pytest.param(f, marks=needs(f)) for f in FRAMEWORKS])
def test_bfloat16_gradient_checkpointing_and_another_resolution(framework: str, photos: pathlib.Path,
                                                                backbone: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    finetune(FinetuneOptions(str(photos), str(backbone), str(out), framework=framework, max_steps=3, batch_size=4,
                             lr=1e-3, dtype="bfloat16", gradient_checkpointing=True, image_size=48,
                             log=str(tmp_path / "log.jsonl"), quiet=True))
    losses = [e["loss"] for e in read_log(tmp_path / "log.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses)) and 1.0 < losses[0] < 2.5  # ~ln 5 for a new head
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 48
    assert read_state_dict(out / "model.safetensors")["vit.embeddings.position_embeddings"].shape == (1, 37, 64)
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 48}


@needs("torch")
def test_datasets_saved_to_disk(tmp_path: pathlib.Path, backbone: pathlib.Path) -> None:
    datasets = pytest.importorskip("datasets")
    images, labels = [], []
    for label, photo in enumerate(["chelsea.png", "coffee.png", "rocket.jpg"]):
        image = Image.open(PHOTOS / photo).convert("RGB").resize((40, 40))
        for i in range(6):
            images.append(image.rotate(10 * i))
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "coffee", "rocket"])})
    split = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict({"train": split, "validation": split.select(range(0, 18, 3))}).save_to_disk(tmp_path / "ds")
    out = tmp_path / "out"
    result = finetune(FinetuneOptions(str(tmp_path / "ds"), str(backbone), str(out), epochs=1, batch_size=6, quiet=True))
    assert result.metrics["classes"] == ["cat", "coffee", "rocket"]
    assert result.metrics["train_images"] == 18 and result.metrics["val_images"] == 6  # its own validation split
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "cat", "1": "coffee", "2": "rocket"}


@needs("torch")
def test_unreadable_images_are_skipped_and_counted(photos: pathlib.Path, backbone: pathlib.Path,
                                                   tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    for name in ("astronaut", "camera"):
        (data / name).mkdir(parents=True)
        for source in sorted((photos / name).glob("*.png"))[:4]:
            (data / name / source.name).write_bytes(source.read_bytes())
    (data / "camera" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "camera" / "truncated.png").write_bytes((photos / "camera" / "000.png").read_bytes()[:200])
    assert run_cli(str(data), "--model", str(backbone), "--output", str(tmp_path / "out"), "--epochs", "1") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 2
    assert sorted(pathlib.Path(s[0]).name for s in metrics["skipped"]) == ["broken.jpg", "truncated.png"]
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ errors
def _error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("vitx: error: ")
    return err


@needs("torch")
def test_bad_data_and_outputs_get_clear_errors(photos: pathlib.Path, backbone: pathlib.Path, tmp_path: pathlib.Path,
                                               capsys: pytest.CaptureFixture) -> None:
    model = ["--model", str(backbone), "--output", str(tmp_path / "out")]
    assert "training data not found" in _error(capsys, str(tmp_path / "nowhere"), *model)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes((photos / "camera" / "000.png").read_bytes())
    assert "no class folders" in _error(capsys, str(tmp_path / "flat"), *model)
    (tmp_path / "one" / "cats").mkdir(parents=True)
    (tmp_path / "one" / "cats" / "a.png").write_bytes((photos / "camera" / "000.png").read_bytes())
    assert "only one class folder ('cats')" in _error(capsys, str(tmp_path / "one"), *model)
    (tmp_path / "one" / "dogs").mkdir()
    (tmp_path / "one" / "dogs" / "notes.txt").write_text("no images here")
    err = _error(capsys, str(tmp_path / "one"), *model)
    assert str(tmp_path / "one" / "dogs") in err and "holds no images" in err
    assert "--lr must be a positive number" in _error(capsys, str(photos), *model, "--lr", "0")

    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _error(capsys, str(photos), "--model", str(backbone), "--output", str(out))
    assert "already exists and is not empty" in err and "--resume" in err
    assert (out / "notes.txt").read_text() == "mine"

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneOptions(str(photos), str(backbone), str(run), epochs=2, batch_size=16, stop_after_steps=14,
                                 quiet=True))
    err = _error(capsys, str(photos), "--model", str(backbone), "--output", str(run), "--epochs", "2", "--batch-size",
                 "16", "--lr", "1e-4", "--resume")
    assert "--lr (5e-05 there, 0.0001 now)" in err


def test_schedule_warms_up_then_decays_to_zero() -> None:
    schedule = Schedule(1e-3, total_steps=110, warmup_steps=10)
    assert schedule.lr(1) == 0.0 and schedule.lr(6) == pytest.approx(5e-4) and schedule.lr(11) == 1e-3
    assert schedule.lr(61) == pytest.approx(5e-4) and schedule.lr(111) == pytest.approx(0.0, abs=1e-18)
    assert Schedule(1e-3, 5).lr(1) == 1e-3


@needs("torch")
@needs("tf")
def test_keras_fit_with_vitx_adamw_takes_torchs_steps(photos: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``model.fit`` with ``vit_tf.training.AdamW`` (Keras' AdamW, epsilon placed as torch places it)
    takes the steps of torch.optim.AdamW on the same batches; Keras' stock AdamW does not."""
    import keras
    import tensorflow as tf

    import vit_tf.training
    import vit_torch.training
    from vit_core.training import AdamW
    from vit_tf import TFViTForImageClassification
    from vit_tf.weights import canonical_state

    checkpoint = seeded_checkpoint(tmp_path / "ckpt", seed=5, task="classification", num_labels=3, qkv_bias=False)
    config = ViTConfig.from_json_file(checkpoint / "config.json")
    state = read_state_dict(checkpoint / "model.safetensors")
    from vit_core.image_processing import ViTImageProcessor

    files = [sorted((photos / name).glob("*.png"))[i] for i in range(4) for name in ("astronaut", "camera", "coffee")]
    x = ViTImageProcessor(size=32)([Image.open(f) for f in files], return_tensors="np")["pixel_values"]
    y = np.array([0, 1, 2] * 4)
    reference = vit_torch.training.TrainStep(vit_torch.training.model_for_training(config, state), AdamW(lr=1e-3))
    for i in range(3):
        reference.step(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4], 1e-3, 0)
    expected = reference.weights()
    diffs = {}
    for name, optimizer in (("vitx", vit_tf.training.AdamW(learning_rate=1e-3, weight_decay=0.0, epsilon=1e-8)),
                            ("keras", keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.0, epsilon=1e-8))):
        model = TFViTForImageClassification.from_pretrained(checkpoint)
        model.compile(optimizer=optimizer)
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), epochs=1, shuffle=False, verbose=0)
        got = canonical_state(model)
        diffs[name] = max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected)
    print(f"Keras fit vs torch AdamW after 3 steps: vit_tf.training.AdamW {diffs['vitx']:.2e}, "
          f"keras.optimizers.AdamW {diffs['keras']:.2e}")
    # Adam's first steps move a weight by about lr whatever its gradient's size, so where a gradient is
    # at rounding level (1e-8 here) its step follows each framework's rounding: a few thousandths of lr
    assert diffs["vitx"] <= 5e-3 * 1e-3
    assert diffs["keras"] > 50 * diffs["vitx"]
