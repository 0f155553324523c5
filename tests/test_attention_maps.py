"""Attention maps: vit_core.attention_maps against plain numpy loops, the same maps from the attentions
of all three frameworks on a real photo (training size, 1.5x, non-square), attentions returned on the
default fused path, conversion.attention's layer-at-a-time helper, and ``vitx attention``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conversion.frameworks import FRAMEWORKS, build_model, framework_input, pinned_precision, to_numpy, unavailable
from vit_core import ViTConfig
from vit_core.attention_maps import AttentionRollout, attention_rollout, last_layer_attention
from vit_core.image_processing import ViTImageProcessor
from vit_core.reference import forward as reference_forward

from .cases import seeded_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "fixtures" / "images" / "chelsea.png"
AVAILABLE = [f for f in FRAMEWORKS if unavailable(f) is None]
# image 32, patch 8: a 4 x 4 grid at the training size; 3 layers so the rollout multiplies through
CONFIG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, image_size=32,
              patch_size=8, num_labels=5)
# (height, width) the photo is preprocessed to: the training size, 1.5x, and a non-square grid (6 x 8)
SIZES = [(32, 32), (48, 48), (48, 64)]


# ------------------------------------------------------------------------------ the numpy reference
def reference_rollout(attentions: list[np.ndarray], discard_ratio: float, head_fusion: str) -> np.ndarray:
    """Attention rollout written out with loops in float64: (batch, tokens - 1) CLS rows."""
    batch, heads, tokens, _ = attentions[0].shape
    out = np.zeros((batch, tokens - 1))
    for b in range(batch):
        product = [[1.0 if i == j else 0.0 for j in range(tokens)] for i in range(tokens)]
        for layer in attentions:
            fused = [[0.0] * tokens for _ in range(tokens)]
            for i in range(tokens):
                for j in range(tokens):
                    values = [float(layer[b, h, i, j]) for h in range(heads)]
                    fused[i][j] = {"mean": sum(values) / heads, "max": max(values), "min": min(values)}[head_fusion]
            count = int(tokens * tokens * discard_ratio)
            ranked = sorted(((fused[k // tokens][k % tokens], k) for k in range(1, tokens * tokens)))
            for _, k in ranked[:count]:
                fused[k // tokens][k % tokens] = 0.0
            a = [[fused[i][j] + (1.0 if i == j else 0.0) for j in range(tokens)] for i in range(tokens)]
            a = [[v / sum(row) for v in row] for row in a]
            product = [[sum(a[i][k] * product[k][j] for k in range(tokens)) for j in range(tokens)]
                       for i in range(tokens)]
        out[b] = product[0][1:]
    return out


def random_attentions(layers: int, batch: int, heads: int, tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(layers):
        scores = 2.0 * rng.standard_normal((batch, heads, tokens, tokens))
        e = np.exp(scores - scores.max(-1, keepdims=True))
        result.append(e / e.sum(-1, keepdims=True))
    return result


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3, 0.9])
def test_rollout_matches_the_loops(discard_ratio: float, head_fusion: str) -> None:
    attentions = random_attentions(layers=3, batch=2, heads=3, tokens=7)  # a 2 x 3 grid
    got = attention_rollout(attentions, discard_ratio=discard_ratio, head_fusion=head_fusion, grid_hw=(2, 3))
    expected = reference_rollout(attentions, discard_ratio, head_fusion).reshape(2, 2, 3)
    assert got.shape == (2, 2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    if discard_ratio == 0.0 and head_fusion == "mean":
        # without discarding every row of the product stays a distribution: CLS + patches sum to 1
        rollout = AttentionRollout()
        for a in attentions:
            rollout.add(a)
        np.testing.assert_allclose(rollout.product.sum(-1), 1.0, atol=1e-12)


def test_discarding_changes_the_map_and_keeps_cls() -> None:
    attentions = random_attentions(layers=2, batch=1, heads=2, tokens=5)
    plain = attention_rollout(attentions)
    discarded = attention_rollout(attentions, discard_ratio=0.9)
    assert np.abs(plain - discarded).max() > 1e-3
    # at 0.9 nearly every weight goes; the CLS-to-CLS weight of each layer is never a candidate
    rollout = AttentionRollout(discard_ratio=0.9)
    rollout.add(attentions[0])
    assert rollout.product[0, 0, 0] > 0.5


def test_last_layer_attention_reads_only_the_last_layer() -> None:
    attentions = random_attentions(layers=3, batch=2, heads=4, tokens=10)  # 3 x 3 grid
    np.testing.assert_array_equal(last_layer_attention(attentions), attentions[-1][:, :, 0, 1:].mean(1).reshape(2, 3, 3))
    np.testing.assert_array_equal(last_layer_attention(attentions, head=2), attentions[-1][:, 2, 0, 1:].reshape(2, 3, 3))
    np.testing.assert_array_equal(last_layer_attention(attentions[-1:], head=0, grid_hw=(1, 9)),
                                  attentions[-1][:, 0, 0, 1:].reshape(2, 1, 9))


@pytest.mark.parametrize("call, message", [
    (lambda a: attention_rollout(a[:1] + [a[1][:, :, :5, :5]]), r"attentions\[1\]: shape .* does not match"),
    (lambda a: attention_rollout([a[0][0]]), r"attentions\[0\]: expected shape \(batch, heads, tokens, tokens\)"),
    (lambda a: attention_rollout(a, grid_hw=(2, 4)), r"grid_hw=\(2, 4\) has 8 patches but the attentions have 9"),
    (lambda a: attention_rollout(a, discard_ratio=1.0), r"discard_ratio must be in \[0, 1\)"),
    (lambda a: attention_rollout(a, head_fusion="sum"), "head_fusion='sum' is not supported"),
    (lambda a: attention_rollout([]), "at least one layer"),
    (lambda a: attention_rollout([None]), "output_attentions=True"),
    (lambda a: last_layer_attention(a, head=4), r"head=4 is out of range: the model has 4 heads"),
    (lambda a: last_layer_attention(a, head="max"), "head must be 'mean' or a head index"),
    (lambda a: last_layer_attention(()), "at least one layer"),
    (lambda a: last_layer_attention([a[0][:, :, :9, :9]]), "8 patches do not form a square grid: pass grid_hw"),
])
def test_bad_input_is_named(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(random_attentions(layers=2, batch=1, heads=4, tokens=10))


# ------------------------------------------------------------------------------ three frameworks
@pytest.fixture(scope="module")
def tiny() -> tuple[ViTConfig, dict[str, np.ndarray]]:
    config = ViTConfig(**CONFIG)
    return config, seeded_state(config, "classification", seed=3)


def photo_pixels(height: int, width: int) -> np.ndarray:
    processor = ViTImageProcessor(size={"height": height, "width": width})
    return np.asarray(processor(Image.open(PHOTO), return_tensors="np")["pixel_values"], dtype=np.float32)


def framework_attentions(framework: str, config: ViTConfig, state: dict[str, np.ndarray], pixel_values: np.ndarray,
                         interpolate: bool) -> tuple[Any, list[np.ndarray]]:
    """The model (default attention implementation: the fused sdpa path) and its output_attentions=True attentions."""
    with pinned_precision(framework):
        model = build_model(framework, config, state, "classification")
        assert model.attn_implementation == "sdpa"
        out = model(framework_input(framework, pixel_values), output_attentions=True,
                    interpolate_pos_encoding=interpolate)
        return model, [to_numpy(a).astype(np.float64) for a in out.attentions]


@pytest.mark.skipif(len(AVAILABLE) < 3, reason="needs torch, tf and flax")
@pytest.mark.parametrize("size", SIZES, ids=["train-size", "1.5x", "non-square"])
def test_same_maps_from_all_three_frameworks_on_a_photo(size: tuple[int, int], tiny: Any) -> None:
    config, state = tiny
    pixel_values = photo_pixels(*size)
    interpolate = size != (32, 32)
    grid = (size[0] // 8, size[1] // 8)
    expected = reference_forward(dict(state), config, pixel_values.astype(np.float64), "classification",
                                 interpolate_pos_encoding=interpolate)["attentions"]
    rollouts, lasts = {}, {}
    for framework in FRAMEWORKS:
        _, attentions = framework_attentions(framework, config, state, pixel_values, interpolate)
        # attentions on the default (fused) path: one per layer, (batch, heads, tokens, tokens), rows sum to 1
        assert len(attentions) == config.num_hidden_layers
        assert all(a.shape == (1, 4, grid[0] * grid[1] + 1, grid[0] * grid[1] + 1) for a in attentions)
        np.testing.assert_allclose(attentions[-1].sum(-1), 1.0, atol=1e-5)
        rollouts[framework] = attention_rollout(attentions, discard_ratio=0.2, grid_hw=grid)
        lasts[framework] = last_layer_attention(attentions, head=1, grid_hw=grid)
    reference = attention_rollout(expected, discard_ratio=0.2, grid_hw=grid)
    assert reference.shape == (1, *grid) and np.abs(reference).max() > 1e-3
    for framework in FRAMEWORKS:
        assert np.abs(rollouts[framework] - reference).max() <= 1e-5, framework
        assert np.abs(lasts[framework] - last_layer_attention(expected, head=1, grid_hw=grid)).max() <= 1e-5
    for a, b in (("torch", "tf"), ("torch", "flax"), ("tf", "flax")):
        assert np.abs(rollouts[a] - rollouts[b]).max() <= 1e-5, (a, b)


@pytest.mark.skipif("torch" not in AVAILABLE, reason="needs torch")
def test_attentions_match_transformers_sdpa_model(tiny: Any) -> None:
    """transformers 4.57.6's ViT with attn_implementation="sdpa" also returns the eager probabilities
    when asked for them; ours (default sdpa) returns the same ones."""
    import torch
    transformers = pytest.importorskip("transformers")

    config, state = tiny
    pixel_values = photo_pixels(48, 64)
    hf_config = transformers.ViTConfig(**config.to_dict())
    hf_config._attn_implementation = "eager"
    hf = transformers.ViTForImageClassification(hf_config)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    hf.eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(pixel_values), output_attentions=True, interpolate_pos_encoding=True).attentions
    _, ours = framework_attentions("torch", config, state, pixel_values, True)
    assert len(theirs) == len(ours) == 3
    for t, o in zip(theirs, ours):
        assert np.abs(t.double().numpy() - o).max() <= 1e-5
    np.testing.assert_allclose(attention_rollout(ours, grid_hw=(6, 8)), attention_rollout(theirs, grid_hw=(6, 8)),
                               atol=1e-5)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_attentions_from_config_flag_and_tuple_output(framework: str, tiny: Any) -> None:
    """config.output_attentions=True asks for them too (transformers' config field), and
    return_dict=False puts them last in the tuple."""
    if framework not in AVAILABLE:
        pytest.skip(f"{framework} not installed")
    config, state = tiny
    flagged = ViTConfig(**CONFIG, output_attentions=True)
    pixel_values = photo_pixels(32, 32)
    with pinned_precision(framework):
        model = build_model(framework, flagged, state, "classification")
        out = model(framework_input(framework, pixel_values))
        as_tuple = model(framework_input(framework, pixel_values), return_dict=False)
        plain = build_model(framework, config, state, "classification")(framework_input(framework, pixel_values))
    assert out.attentions is not None and len(out.attentions) == 3
    assert plain.attentions is None
    np.testing.assert_array_equal(to_numpy(as_tuple[-1][-1]), to_numpy(out.attentions[-1]))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_maps_take_the_framework_arrays_as_they_come(framework: str, tiny: Any) -> None:
    """out.attentions straight from the model (torch tensors, tf.Tensors, jax Arrays; bfloat16 too)."""
    if framework not in AVAILABLE:
        pytest.skip(f"{framework} not installed")
    config, state = tiny
    pixel_values = photo_pixels(48, 64)
    with pinned_precision(framework):
        model = build_model(framework, config, state, "classification")
        raw = model(framework_input(framework, pixel_values), output_attentions=True,
                    interpolate_pos_encoding=True).attentions
    assert type(raw[0]).__module__.split(".")[0] in {"torch": ("torch",), "tf": ("tensorflow",),
                                                     "flax": ("jax", "jaxlib")}[framework]
    as_numpy = [to_numpy(a).astype(np.float64) for a in raw]
    np.testing.assert_array_equal(attention_rollout(raw, 0.3, "min", (6, 8)), attention_rollout(as_numpy, 0.3, "min", (6, 8)))
    np.testing.assert_array_equal(last_layer_attention(raw, 1, (6, 8)), last_layer_attention(as_numpy, 1, (6, 8)))
    if framework == "torch":
        import torch

        halved = [a.to(torch.bfloat16) for a in raw]
    elif framework == "tf":
        import tensorflow as tf

        halved = [tf.cast(a, tf.bfloat16) for a in raw]
    else:
        import jax.numpy as jnp

        halved = [a.astype(jnp.bfloat16) for a in raw]
    assert np.abs(attention_rollout(halved, grid_hw=(6, 8)) - attention_rollout(as_numpy, grid_hw=(6, 8))).max() < 1e-2


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_attentions_on_the_large_batch_and_compiled_paths(framework: str, tiny: Any) -> None:
    """A batch large enough for the CPU sub-batching speed path (128 images x 17 tokens) still returns
    every image's attentions (the speed path is skipped when they are asked for); so does TF's call
    traced by tf.function and Flax's jit-compiled call."""
    if framework not in AVAILABLE:
        pytest.skip(f"{framework} not installed")
    config, state = tiny
    rng = np.random.default_rng(1)
    pixel_values = np.concatenate([photo_pixels(32, 32), rng.standard_normal((127, 3, 32, 32)).astype(np.float32)])
    with pinned_precision(framework):
        model = build_model(framework, config, state, "classification")
        if framework == "tf":
            import tensorflow as tf

            call = tf.function(lambda x: model(x, output_attentions=True).attentions)
            attentions = [to_numpy(a) for a in call(tf.constant(pixel_values))]
        else:
            out = model(framework_input(framework, pixel_values), output_attentions=True)
            attentions = [to_numpy(a) for a in out.attentions]
        single = [to_numpy(a) for a in model(framework_input(framework, pixel_values[:1]), output_attentions=True).attentions]
    assert len(attentions) == 3 and all(a.shape == (128, 4, 17, 17) for a in attentions)
    np.testing.assert_allclose(attention_rollout(attentions)[:1], attention_rollout(single), atol=1e-6)
    expected = reference_forward(dict(state), config, pixel_values[-2:].astype(np.float64), "classification")["attentions"]
    assert np.abs(attention_rollout(attentions)[-2:] - attention_rollout(expected)).max() <= 1e-5


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("size", [(32, 32), (48, 64)], ids=["train-size", "non-square"])
def test_layer_at_a_time_helper_gives_the_same_maps(framework: str, size: tuple[int, int], tiny: Any) -> None:
    from conversion.attention import attention_map

    if framework not in AVAILABLE:
        pytest.skip(f"{framework} not installed")
    config, state = tiny
    pixel_values = photo_pixels(*size)
    interpolate = size != (32, 32)
    grid = (size[0] // 8, size[1] // 8)
    model, attentions = framework_attentions(framework, config, state, pixel_values, interpolate)
    rollout = attention_map(model, pixel_values, "rollout", discard_ratio=0.1, head_fusion="max",
                            interpolate_pos_encoding=interpolate)
    assert rollout.shape == (1, *grid)
    assert np.abs(rollout - attention_rollout(attentions, 0.1, "max", grid)).max() <= 1e-6
    for head in ("mean", 3):
        last = attention_map(model, pixel_values, "last-layer", head=head, interpolate_pos_encoding=interpolate)
        assert np.abs(last - last_layer_attention(attentions, head, grid)).max() <= 1e-5
    with pytest.raises(ValueError, match="head=4 is out of range"):
        attention_map(model, pixel_values, "last-layer", head=4, interpolate_pos_encoding=interpolate)
    with pytest.raises(ValueError, match=r"doesn't match model \(32\*32\)"):
        attention_map(model, photo_pixels(48, 48), "rollout")
    with pytest.raises(ValueError, match="floating-point"):
        attention_map(model, (pixel_values * 10).astype(np.uint8), "rollout", interpolate_pos_encoding=interpolate)
    with pytest.raises(ValueError, match="method='attention' is not supported"):
        attention_map(model, pixel_values, "attention", interpolate_pos_encoding=interpolate)



@pytest.mark.skipif("torch" not in AVAILABLE, reason="needs torch")
def test_helper_never_applies_dropout(tiny: Any) -> None:
    """A torch model left in training mode, with dropout in the config: the map is the eval-mode one
    (no dropout), and the model is left in training mode."""
    import torch

    from conversion.attention import attention_map

    _, state = tiny
    config = ViTConfig(**CONFIG, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = build_model("torch", config, state, "classification")
    pixel_values = photo_pixels(32, 32)
    expected = attention_map(model, pixel_values, "rollout")
    model.train()
    with torch.no_grad():
        dropped = model(torch.from_numpy(pixel_values), output_attentions=True).attentions
    assert np.abs(attention_rollout(dropped) - expected).max() > 1e-3  # training mode does drop
    torch.manual_seed(0)
    assert np.abs(attention_map(model, torch.from_numpy(pixel_values), "rollout") - expected).max() == 0.0
    assert model.training


# ------------------------------------------------------------------------------ vitx attention
def vitx(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "conversion.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny: Any) -> pathlib.Path:
    from vit_core.checkpoint.files import save_state_dict

    config, state = tiny
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-vit"
    config.save_pretrained(directory)
    save_state_dict(state, directory)
    return directory


@pytest.mark.skipif("torch" not in AVAILABLE, reason="needs torch")
def test_vitx_attention_writes_png_and_npy(checkpoint: pathlib.Path, tiny: Any, tmp_path: pathlib.Path) -> None:
    config, state = tiny
    out = tmp_path / "maps"
    done = vitx("attention", str(checkpoint), str(PHOTO), "--output", str(out), "--discard-ratio", "0.2")
    assert done.returncode == 0, done.stderr
    png, npy = out / "chelsea.rollout.png", out / "chelsea.rollout.npy"
    assert f"[1/1] {PHOTO}: rollout map 4x4 -> {png}" in done.stdout
    with Image.open(png) as picture, Image.open(PHOTO) as photo:
        assert picture.format == "PNG" and picture.mode == "RGB" and picture.size == photo.size
        blended = np.asarray(picture, dtype=np.float64)
        assert np.abs(blended - np.asarray(photo.convert("RGB"), dtype=np.float64)).mean() > 5  # the map is drawn
    raw = np.load(npy)
    _, attentions = framework_attentions("torch", config, state, photo_pixels(32, 32), False)
    expected = attention_rollout(attentions, discard_ratio=0.2)[0]
    assert raw.shape == (4, 4) and raw.dtype == np.float32
    assert np.abs(raw - expected).max() <= 1e-6
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    again = vitx("attention", str(checkpoint), str(PHOTO), "--output", str(out))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"{png} already exists (pass --overwrite to replace it)" in again.stderr
    assert np.array_equal(np.load(npy), raw)  # untouched
    replaced = vitx("-q", "attention", str(checkpoint), str(PHOTO), "--output", str(out), "--overwrite")
    assert replaced.returncode == 0 and replaced.stdout == "", replaced.stderr
    assert np.abs(np.load(npy) - attention_rollout(attentions)[0]).max() <= 1e-6  # now without discarding


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_vitx_attention_last_layer_other_frameworks(framework: str, checkpoint: pathlib.Path, tiny: Any,
                                                    tmp_path: pathlib.Path) -> None:
    if framework not in AVAILABLE:
        pytest.skip(f"{framework} not installed")
    config, state = tiny
    rocket = ROOT / "tests" / "fixtures" / "images" / "rocket.jpg"
    camera = ROOT / "tests" / "fixtures" / "images" / "camera.png"  # grayscale
    done = vitx("attention", str(checkpoint), str(PHOTO), str(rocket), str(camera), "--output", str(tmp_path),
                "--method", "last-layer", "--head", "2", "--framework", framework)
    assert done.returncode == 0, done.stderr
    assert "[3/3]" in done.stdout
    for image in (PHOTO, rocket, camera):
        with Image.open(tmp_path / f"{image.stem}.last-layer.png") as picture, Image.open(image) as photo:
            assert picture.size == photo.size
        processor = ViTImageProcessor(size={"height": 32, "width": 32})
        pixel_values = np.asarray(processor(Image.open(image), return_tensors="np")["pixel_values"], dtype=np.float32)
        _, attentions = framework_attentions(framework, config, state, pixel_values, False)
        raw = np.load(tmp_path / f"{image.stem}.last-layer.npy")
        assert np.abs(raw - last_layer_attention(attentions, head=2)[0]).max() <= 1e-5


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "{tmp}/nope.png"], "image {tmp}/nope.png does not exist"),
    (["{tmp}/missing-ckpt", "{photo}"], "missing-ckpt"),
    (["{ckpt}", "{photo}", "--method", "last-layer", "--head", "9"], "head=9 is out of range: the model has 4 heads"),
    (["{ckpt}", "{photo}", "--discard-ratio", "1.5"], r"discard_ratio must be in \[0, 1\)"),
    (["{ckpt}", "{photo}", "--head", "1"], "--head picks a head of the last layer"),
    (["{ckpt}", "{photo}", "{photo}"], "would both write"),
    (["{ckpt}", "{photo}", "{ckpt}/config.json"], "config.json: not an image Pillow can read"),
])
def test_vitx_attention_user_errors_exit_2(args: list[str], message: str, checkpoint: pathlib.Path,
                                           tmp_path: pathlib.Path) -> None:
    fill = dict(ckpt=checkpoint, tmp=tmp_path, photo=PHOTO)
    done = vitx("attention", *[a.format(**fill) for a in args], "--output", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("vitx: error: ")
    import re

    assert re.search(message.format(**fill), done.stderr), done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.skipif("torch" not in AVAILABLE, reason="needs torch")
def test_vitx_attention_reads_the_checkpoint_processor(checkpoint: pathlib.Path, tiny: Any, tmp_path: pathlib.Path) -> None:
    """A preprocessor_config.json beside the weights decides the input (here 48 x 64 with ImageNet mean / std)."""
    import shutil

    config, state = tiny
    directory = tmp_path / "with-processor"
    shutil.copytree(checkpoint, directory)
    processor = ViTImageProcessor(size={"height": 48, "width": 64}, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    processor.save_pretrained(directory)
    done = vitx("attention", str(directory / "model.safetensors"), str(PHOTO), "--output", str(tmp_path / "o"),
                "--method", "last-layer")
    assert done.returncode == 0, done.stderr
    raw = np.load(tmp_path / "o" / "chelsea.last-layer.npy")
    pixel_values = np.asarray(processor(Image.open(PHOTO), return_tensors="np")["pixel_values"], dtype=np.float32)
    _, attentions = framework_attentions("torch", config, state, pixel_values, True)
    assert raw.shape == (6, 8)
    assert np.abs(raw - last_layer_attention(attentions, grid_hw=(6, 8))[0]).max() <= 1e-6


def test_importing_the_attention_code_imports_no_framework() -> None:
    code = ("import sys, vit_core.attention_maps, conversion.attention, conversion.cli; conversion.cli._parser(); "
            "print([m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras', 'matplotlib') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_output_that_is_a_file_is_refused(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (tmp_path / "out").write_text("x")
    done = vitx("attention", str(checkpoint), str(PHOTO), "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and f"--output {tmp_path / 'out'} is a file, not a directory" in done.stderr


def test_head_argument_is_parsed() -> None:
    done = vitx("attention", "x", "y.png", "--output", "o", "--head", "first")
    assert done.returncode == 2 and "expected 'mean' or a head index, got 'first'" in done.stderr


def test_colormap_and_overlay() -> None:
    from conversion.attention import colormap, overlay

    rgb = colormap(np.array([0.0, 0.5, 1.0, -1.0, 2.0]))
    assert rgb.dtype == np.uint8 and rgb.tolist() == [[0, 0, 4], [186, 54, 85], [252, 255, 164], [0, 0, 4],
                                                       [252, 255, 164]]
    photo = Image.new("RGB", (30, 20), (100, 100, 100))
    grid = np.zeros((2, 3))
    grid[1, 2] = 1.0  # bottom right hot
    picture = np.asarray(overlay(photo, grid, alpha=0.5))
    assert picture.shape == (20, 30, 3)
    np.testing.assert_array_equal(picture[0, 0], [50, 50, 52])      # (100 + inferno(0)) / 2
    np.testing.assert_array_equal(picture[19, 29], [176, 178, 132])  # (100 + inferno(1)) / 2
