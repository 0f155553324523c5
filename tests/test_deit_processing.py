"""DeiTImageProcessor and AutoImageProcessor against transformers 4.57.6, and DeiT / DINO checkpoints.

The oracle is transformers' slow DeiTImageProcessor (what its AutoImageProcessor returns here:
torchvision, which its fast classes need, is not installed). Bound: max |diff| <= 1e-6 on the
real photos of tests/fixtures (docs/NUMERICS.md). transformers' slow DeiT class refuses
``{"shortest_edge": s}``; that form is checked against transformers' BitImageProcessor, which
runs the same steps (shortest-edge resize, center crop, rescale, normalize).

DeiT and DINO checkpoints are model_type "vit" (transformers' ViT page): tiny seeded ones are
written by transformers with the facebook/deit-* preprocessor file, and vitx's logits / hidden
states in each framework must equal transformers' through the whole preprocessing path.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Any

import numpy as np
import pytest
from PIL import Image

import vit_core
from vit_core.image_processing import (
    PREPROCESSOR_CONFIG_NAME,
    AutoImageProcessor,
    DeiTFeatureExtractor,
    DeiTImageProcessor,
    ViTImageProcessor,
)
from vit_core.image_transforms import center_crop, resize_output_size
from vit_core.tolerances import TOLERANCES

IMAGES_DIR = pathlib.Path(__file__).parent / "fixtures" / "images"
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "camera.png", "rocket.jpg")
ATOL = TOLERANCES["image_processor"]
SMALL = TOLERANCES["small"]

# facebook/deit-base-patch16-224's preprocessor_config.json (the DeiTFeatureExtractor form).
DEIT_LEGACY = {
    "feature_extractor_type": "DeiTFeatureExtractor", "size": 256, "crop_size": 224, "do_center_crop": True,
    "do_resize": True, "do_normalize": True, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}
# The form transformers >= 4.26 writes.
DEIT_NEW = {
    "image_processor_type": "DeiTImageProcessor", "size": {"height": 160, "width": 200},
    "crop_size": {"height": 128, "width": 96}, "do_center_crop": True, "do_resize": True, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    result = {}
    for name in PHOTOS:
        with Image.open(IMAGES_DIR / name) as image:
            image.load()
            result[name] = image.convert("RGB")  # camera.png is grayscale; transformers' DeiT has no convert_rgb
    return result


def write_config(directory: pathlib.Path, config: dict[str, Any]) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(config))
    return directory


def max_abs(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


def oracle_pixels(processor: Any, images: Any, **call: Any) -> np.ndarray:
    return np.asarray(np.stack(processor(images, **call)["pixel_values"]), dtype=np.float32)


# ------------------------------------------------------------------------------------- the photos
@pytest.mark.parametrize("form", ["legacy", "new"])
@pytest.mark.parametrize("name", PHOTOS)
def test_deit_file_matches_transformers(tmp_path, transformers, photos, form: str, name: str) -> None:
    config = DEIT_LEGACY if form == "legacy" else DEIT_NEW
    write_config(tmp_path, config)
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "DeiTImageProcessor"
    ours = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(ours) is DeiTImageProcessor
    assert ours.size == theirs.size and ours.crop_size == theirs.crop_size and ours.resample == int(theirs.resample)
    image = photos[name]
    expected = oracle_pixels(theirs, image)
    crop = theirs.crop_size
    assert expected.shape == (1, 3, crop["height"], crop["width"])
    assert max_abs(ours(image)["pixel_values"], expected) <= ATOL
    # numpy inputs: (H, W, C) uint8, (C, H, W) uint8, float in [0, 1] (do_rescale=False, as transformers asks)
    array = np.asarray(image)
    assert max_abs(ours(array)["pixel_values"], oracle_pixels(theirs, array)) <= ATOL
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    assert max_abs(ours(chw)["pixel_values"], oracle_pixels(theirs, chw)) <= ATOL
    unit = array.astype(np.float32) / 255
    assert max_abs(ours(unit, do_rescale=False)["pixel_values"], oracle_pixels(theirs, unit, do_rescale=False)) <= ATOL


def test_batch_of_photos_and_return_tensors(tmp_path, transformers, photos) -> None:
    write_config(tmp_path, DEIT_LEGACY)
    theirs = transformers.DeiTImageProcessor.from_pretrained(tmp_path)
    ours = DeiTImageProcessor.from_pretrained(tmp_path)
    batch = [photos[n] for n in PHOTOS]  # different sizes: one (5, 3, 224, 224) batch after the crop
    expected = oracle_pixels(theirs, batch)
    got = ours(batch, return_tensors="np")["pixel_values"]
    assert got.shape == (5, 3, 224, 224) and got.dtype == np.float32
    assert max_abs(got, expected) <= ATOL
    torch = pytest.importorskip("torch")
    pt = ours(batch, return_tensors="pt")["pixel_values"]
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32
    assert np.array_equal(pt.numpy(), got)
    assert np.array_equal(theirs(batch, return_tensors="pt")["pixel_values"].numpy(), expected)
    tf = pytest.importorskip("tensorflow")
    out = ours(batch, return_tensors="tf")["pixel_values"]
    assert isinstance(out, tf.Tensor) and np.array_equal(out.numpy(), got)
    jnp = pytest.importorskip("jax.numpy")
    out = ours(batch, return_tensors="jax")["pixel_values"]
    assert out.dtype == jnp.float32 and np.array_equal(np.asarray(out), got)
    # framework tensors are read as their numpy values
    as_tensor = ours([torch.from_numpy(np.array(photos[n])) for n in PHOTOS[:2]])["pixel_values"]
    assert np.array_equal(as_tensor, got[:2])
    # without resize and crop, images of different sizes come back as a list
    listed = ours(batch[:2], do_resize=False, do_center_crop=False)["pixel_values"]
    assert isinstance(listed, list) and [p.shape[1:] for p in listed] == [np.asarray(b).shape[:2] for b in batch[:2]]
    for a, b in zip(listed, theirs(batch[:2], do_resize=False, do_center_crop=False)["pixel_values"]):
        assert max_abs(a, b) <= ATOL
    # channels last
    last = ours(batch, data_format="channels_last")["pixel_values"]
    assert max_abs(last, oracle_pixels(theirs, batch, data_format="channels_last")) <= ATOL


@pytest.mark.parametrize("size,crop", [({"height": 100, "width": 120}, {"height": 128, "width": 111}),
                                       ({"height": 90, "width": 300}, {"height": 64, "width": 301}),
                                       ({"height": 57, "width": 81}, {"height": 32, "width": 47})])
def test_crop_larger_than_image_pads_like_transformers(transformers, photos, size, crop) -> None:
    options = dict(size=size, crop_size=crop, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    theirs = transformers.DeiTImageProcessor(**options)
    ours = DeiTImageProcessor(**options)
    for name in ("chelsea.png", "rocket.jpg"):
        expected = oracle_pixels(theirs, photos[name])
        assert expected.shape == (1, 3, crop["height"], crop["width"])
        assert max_abs(ours(photos[name])["pixel_values"], expected) <= ATOL
    # without the resize the crop runs on the uint8 photo itself, padded with zeros
    image = np.asarray(photos["coffee.png"])[:50, :70]
    expected = oracle_pixels(theirs, image, do_resize=False)
    assert max_abs(ours(image, do_resize=False)["pixel_values"], expected) <= ATOL


def test_center_crop_helper_against_transformers(transformers) -> None:
    from transformers.image_transforms import center_crop as their_center_crop

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(7, 10, 3), dtype=np.uint8)
    for h, w in [(3, 4), (7, 10), (8, 10), (9, 13), (2, 15), (1, 1)]:
        expected = their_center_crop(image, (h, w), input_data_format="channels_last")
        got = center_crop(image, h, w)
        assert got.dtype == image.dtype and np.array_equal(got, expected), (h, w)
    with pytest.raises(ValueError, match="crop_size must be positive"):
        center_crop(image, 0, 3)


def test_shortest_edge_matches_transformers_rule(transformers, photos) -> None:
    from transformers.image_transforms import get_resize_output_image_size

    options = dict(size={"shortest_edge": 160}, crop_size={"height": 144, "width": 128}, resample=3,
                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    ours = DeiTImageProcessor(**options)
    # transformers' slow DeiT refuses this form; BitImageProcessor runs the same four steps with it.
    with pytest.raises(ValueError, match="height"):
        transformers.DeiTImageProcessor(**options)(photos["chelsea.png"])
    bit = transformers.BitImageProcessor(do_convert_rgb=False, **options)
    for name in PHOTOS:
        image = photos[name]
        array = np.asarray(image)
        assert resize_output_size(array.shape[0], array.shape[1], {"shortest_edge": 160}) == tuple(
            get_resize_output_image_size(array, 160, default_to_square=False, input_data_format="channels_last"))
        assert max_abs(ours(image)["pixel_values"], oracle_pixels(bit, image)) <= ATOL
    # without the crop the aspect ratio is kept: rocket.jpg is 427 x 640 -> 160 x 239
    h, w = np.asarray(photos["rocket.jpg"]).shape[:2]
    got = ours(photos["rocket.jpg"], do_center_crop=False)["pixel_values"]
    assert got.shape == (1, 3) + tuple(get_resize_output_image_size(
        np.asarray(photos["rocket.jpg"]), 160, default_to_square=False, input_data_format="channels_last"))
    assert got.shape[2] == 160 and got.shape[3] == int(160 * w / h)


def test_call_overrides_match_transformers(transformers, photos) -> None:
    theirs = transformers.DeiTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    ours = DeiTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    image = photos["astronaut.png"]
    for call in [dict(do_center_crop=False), dict(crop_size={"height": 100, "width": 64}), dict(resample=2),
                 dict(size={"height": 240, "width": 320}), dict(do_normalize=False), dict(do_resize=False)]:
        assert max_abs(ours(image, **call)["pixel_values"], oracle_pixels(theirs, image, **call)) <= ATOL, call
    # transformers' defaults: 256 -> 224, bicubic, mean = std = 0.5
    default_theirs, default_ours = transformers.DeiTImageProcessor(), DeiTImageProcessor()
    assert default_ours.size == default_theirs.size and default_ours.crop_size == default_theirs.crop_size
    assert default_ours.image_mean == list(default_theirs.image_mean) and default_ours.resample == 3
    assert max_abs(default_ours(image)["pixel_values"], oracle_pixels(default_theirs, image)) <= ATOL


# ------------------------------------------------------------------------------------- files
def test_save_load_round_trip_with_transformers(tmp_path, transformers, photos) -> None:
    ours = DeiTImageProcessor(size={"height": 200, "width": 180}, crop_size=160, image_mean=[0.4, 0.5, 0.6],
                              processor_class="DeiTProcessor")
    path = ours.save_pretrained(tmp_path / "ours")
    written = json.loads(path.read_text())
    assert written["image_processor_type"] == "DeiTImageProcessor"
    assert written["crop_size"] == {"height": 160, "width": 160} and written["do_center_crop"] is True
    assert written["processor_class"] == "DeiTProcessor"
    assert DeiTImageProcessor.from_pretrained(tmp_path / "ours") == ours
    assert AutoImageProcessor.from_pretrained(tmp_path / "ours") == ours
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path / "ours")
    assert type(theirs).__name__ == "DeiTImageProcessor" and theirs.crop_size == {"height": 160, "width": 160}
    image = photos["coffee.png"]
    assert max_abs(ours(image)["pixel_values"], oracle_pixels(theirs, image)) <= ATOL
    theirs.save_pretrained(tmp_path / "theirs")
    back = AutoImageProcessor.from_pretrained(tmp_path / "theirs")
    assert type(back) is DeiTImageProcessor and back.size == ours.size and back.crop_size == ours.crop_size
    assert max_abs(back(image)["pixel_values"], oracle_pixels(theirs, image)) <= ATOL


def test_legacy_feature_extractor_name_warns(monkeypatch, photos) -> None:
    monkeypatch.setattr(DeiTFeatureExtractor, "_deprecation_warned", False)
    with pytest.warns(FutureWarning, match="DeiTImageProcessor"):
        extractor = DeiTFeatureExtractor(crop_size=96)
    image = photos["chelsea.png"]
    assert np.array_equal(extractor(image)["pixel_values"], DeiTImageProcessor(crop_size=96)(image)["pixel_values"])


def test_bad_sizes_name_the_argument() -> None:
    with pytest.raises(ValueError, match="crop_size must have the keys 'height' and 'width'"):
        DeiTImageProcessor(crop_size={"shortest_edge": 224})
    with pytest.raises(ValueError, match="size must have the keys 'height' and 'width', or only 'shortest_edge'"):
        DeiTImageProcessor(size={"longest_edge": 224})
    with pytest.raises(ValueError, match=r"size\['shortest_edge'\] must be a positive int"):
        DeiTImageProcessor(size={"shortest_edge": 0})
    with pytest.raises(ValueError, match="crop_size must be positive"):
        DeiTImageProcessor(crop_size=0)
    with pytest.raises(ValueError, match="crop_size must have the keys"):
        DeiTImageProcessor()(np.zeros((8, 8, 3), np.uint8), crop_size={"width": 4})


# ------------------------------------------------------------------------------------- auto
@pytest.mark.parametrize("config,expected", [
    ({"feature_extractor_type": "ViTFeatureExtractor", "size": 224}, "ViTImageProcessor"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"height": 96, "width": 96}}, "ViTImageProcessor"),
    ({"image_processor_type": "DeiTImageProcessor"}, "DeiTImageProcessor"),
    (DEIT_LEGACY, "DeiTImageProcessor"),
])
def test_auto_dispatches_like_transformers(tmp_path, transformers, photos, config, expected: str) -> None:
    write_config(tmp_path, config)
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    ours = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(ours).__name__ == type(theirs).__name__ == expected
    image = photos["rocket.jpg"]
    assert max_abs(ours(image)["pixel_values"], oracle_pixels(theirs, image)) <= ATOL
    assert AutoImageProcessor.from_pretrained(tmp_path / PREPROCESSOR_CONFIG_NAME) == ours  # the file itself


def test_auto_without_a_type_is_vit(tmp_path) -> None:
    write_config(tmp_path, {"size": 96, "resample": 3})
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is ViTImageProcessor and processor.size == {"height": 96, "width": 96}
    assert AutoImageProcessor.from_pretrained(tmp_path, do_normalize=False).do_normalize is False


def test_auto_fast_and_unsupported(tmp_path) -> None:
    pytest.importorskip("torch")
    from vit_core.image_processing_fast import ViTImageProcessorFast

    write_config(tmp_path / "fast", {"image_processor_type": "ViTImageProcessorFast", "size": {"height": 32, "width": 32}})
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "fast")) is ViTImageProcessorFast
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "fast", use_fast=False)) is ViTImageProcessor
    write_config(tmp_path / "vit", {"image_processor_type": "ViTImageProcessor"})
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "vit", use_fast=True)) is ViTImageProcessorFast
    write_config(tmp_path / "deit", {"image_processor_type": "DeiTImageProcessorFast"})
    with pytest.warns(UserWarning, match="no fast DeiT image processor"):
        assert type(AutoImageProcessor.from_pretrained(tmp_path / "deit")) is DeiTImageProcessor
    write_config(tmp_path / "beit", {"image_processor_type": "BeitImageProcessor"})
    with pytest.raises(ValueError, match=r"beit.*unsupported image processor type 'BeitImageProcessor'"):
        AutoImageProcessor.from_pretrained(tmp_path / "beit")
    write_config(tmp_path / "clip", {"feature_extractor_type": "CLIPFeatureExtractor"})
    with pytest.raises(ValueError, match="'CLIPImageProcessor'"):
        AutoImageProcessor.from_pretrained(tmp_path / "clip")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / PREPROCESSOR_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        AutoImageProcessor.from_pretrained(tmp_path / "list")
    with pytest.raises(FileNotFoundError, match=PREPROCESSOR_CONFIG_NAME):
        AutoImageProcessor.from_pretrained(tmp_path / "beit" / "..")  # a directory without the file
    write_config(tmp_path / "bad", {**DEIT_LEGACY, "crop_size": {"top": 3}})
    with pytest.raises(ValueError, match=r"bad.*crop_size must have the keys"):
        AutoImageProcessor.from_pretrained(tmp_path / "bad")
    with pytest.raises(OSError, match="AutoImageProcessor.from_pretrained"):
        AutoImageProcessor()


def test_auto_from_the_hub_with_the_download_replaced(tmp_path, monkeypatch, transformers, photos) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    write_config(tmp_path / "snapshot", DEIT_LEGACY)
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        calls.append((repo_id, filename, kwargs.get("revision")))
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    processor = AutoImageProcessor.from_pretrained("facebook/deit-base-patch16-224", revision="main")
    assert calls == [("facebook/deit-base-patch16-224", PREPROCESSOR_CONFIG_NAME, "main")]
    assert type(processor) is DeiTImageProcessor and processor.crop_size == {"height": 224, "width": 224}
    theirs = transformers.DeiTImageProcessor.from_pretrained(tmp_path / "snapshot")
    assert max_abs(processor(photos["chelsea.png"])["pixel_values"], oracle_pixels(theirs, photos["chelsea.png"])) <= ATOL


def test_exported_from_vit_core() -> None:
    assert vit_core.DeiTImageProcessor is DeiTImageProcessor and vit_core.AutoImageProcessor is AutoImageProcessor
    assert {"DeiTImageProcessor", "AutoImageProcessor"} <= set(vit_core.__all__)


# ------------------------------------------------------------------------------------- ViT on a DeiT file
def test_vit_processor_on_a_deit_file_warns_naming_the_keys(tmp_path, transformers, photos) -> None:
    write_config(tmp_path, DEIT_LEGACY)
    with pytest.warns(UserWarning) as record:
        ours = ViTImageProcessor.from_pretrained(tmp_path)
    messages = [str(w.message) for w in record if "ignores" in str(w.message)]
    assert len(messages) == 1
    assert "do_center_crop" in messages[0] and "crop_size" in messages[0] and "AutoImageProcessor" in messages[0]
    assert messages[0].startswith(f"{tmp_path / PREPROCESSOR_CONFIG_NAME} (a DeiTImageProcessor file): ViTImageProcessor ignores")
    with pytest.warns(UserWarning, match=r"^ViTImageProcessor ignores the option\(s\) crop_size, crop_pct"):
        ViTImageProcessor(crop_pct=0.9, crop_size=200)
    # transformers' ViTImageProcessor ignores them too: 256 x 256, no crop. The numbers are its.
    theirs = transformers.ViTImageProcessor.from_pretrained(tmp_path)
    image = photos["astronaut.png"]
    expected = oracle_pixels(theirs, image)
    assert expected.shape == (1, 3, 256, 256)
    assert max_abs(ours(image)["pixel_values"], expected) <= ATOL
    # a ViT file of its own keys does not warn
    write_config(tmp_path / "vit", {"image_processor_type": "ViTImageProcessor", "processor_class": "ViTProcessor"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ViTImageProcessor.from_pretrained(tmp_path / "vit")
        DeiTImageProcessor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------- DeiT / DINO checkpoints
DEIT_TINY = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48, image_size=32,
                 patch_size=8, num_labels=7, layer_norm_eps=1e-12)


def _seed_weights(model: Any, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def make_transformers_checkpoint(directory: pathlib.Path, transformers: Any, task: str, seed: int = 0,
                                 preprocessor: dict[str, Any] | None = None, add_pooling_layer: bool = True) -> Any:
    """A tiny seeded checkpoint written by transformers with a DeiT preprocessor file (crop 32)."""
    config = transformers.ViTConfig(**DEIT_TINY, id2label={i: f"class {i}" for i in range(7)},
                                    label2id={f"class {i}": i for i in range(7)})
    if task == "classification":
        model = transformers.ViTForImageClassification(config)
    else:
        model = transformers.ViTModel(config, add_pooling_layer=add_pooling_layer)
    _seed_weights(model, seed)
    model.eval().save_pretrained(directory)
    write_config(directory, preprocessor or {**DEIT_LEGACY, "size": 36, "crop_size": 32})
    return model


def _pixels_of_transformers(directory: pathlib.Path, transformers: Any, images: list[Image.Image]) -> np.ndarray:
    return oracle_pixels(transformers.AutoImageProcessor.from_pretrained(directory), images)


@pytest.mark.parametrize("framework", ["torch", "tf", "flax"])
def test_deit_checkpoint_logits_match_transformers(tmp_path, transformers, photos, framework: str) -> None:
    torch = pytest.importorskip("torch")
    theirs = make_transformers_checkpoint(tmp_path, transformers, "classification", seed=1)
    images = [photos[n] for n in PHOTOS]
    with torch.no_grad():
        expected = theirs(torch.from_numpy(_pixels_of_transformers(tmp_path, transformers, images))).logits.numpy()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is DeiTImageProcessor
    if framework == "torch":
        import vit_torch

        model = vit_torch.ViTForImageClassification.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            logits = model(**processor(images, return_tensors="pt")).logits.numpy()
    elif framework == "tf":
        vit_tf = pytest.importorskip("vit_tf")
        model = vit_tf.TFViTForImageClassification.from_pretrained(tmp_path)
        logits = model(**processor(images, return_tensors="tf")).logits.numpy()
    else:
        vit_flax = pytest.importorskip("vit_flax")
        model = vit_flax.FlaxViTForImageClassification.from_pretrained(tmp_path)
        logits = np.asarray(model(**processor(images, return_tensors="jax")).logits)
    assert logits.shape == (5, 7)
    assert max_abs(logits, expected) <= SMALL
    assert model.config.id2label[int(np.argmax(logits[0]))] == theirs.config.id2label[int(np.argmax(expected[0]))]


@pytest.mark.parametrize("framework", ["torch", "tf", "flax"])
def test_dino_checkpoint_without_a_classifier_matches_transformers(tmp_path, transformers, photos, framework) -> None:
    torch = pytest.importorskip("torch")
    # facebook/dino-vits16: ViTModel, no classifier; its file is the DeiT-style ImageNet crop
    dino_file = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                 "feature_extractor_type": "ViTFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 32}
    theirs = make_transformers_checkpoint(tmp_path, transformers, "base", seed=2, preprocessor=dino_file)
    images = [photos["chelsea.png"], photos["camera.png"]]
    their_processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(oracle_pixels(their_processor, images)))
    with pytest.warns(UserWarning, match="do_center_crop, crop_size"):
        processor = AutoImageProcessor.from_pretrained(tmp_path)  # a ViT file, as transformers reads it
    assert type(processor) is ViTImageProcessor and type(their_processor).__name__ == "ViTImageProcessor"
    if framework == "torch":
        import vit_torch

        model = vit_torch.ViTModel.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            out = model(**processor(images, return_tensors="pt"))
        hidden, pooled = out.last_hidden_state.numpy(), out.pooler_output.numpy()
    elif framework == "tf":
        vit_tf = pytest.importorskip("vit_tf")
        out = vit_tf.TFViTModel.from_pretrained(tmp_path)(**processor(images, return_tensors="tf"))
        hidden, pooled = out.last_hidden_state.numpy(), out.pooler_output.numpy()
    else:
        vit_flax = pytest.importorskip("vit_flax")
        out = vit_flax.FlaxViTModel.from_pretrained(tmp_path)(**processor(images, return_tensors="jax"))
        hidden, pooled = np.asarray(out.last_hidden_state), np.asarray(out.pooler_output)
    assert hidden.shape == (2, 17, 24)
    assert max_abs(hidden, expected.last_hidden_state.numpy()) <= SMALL
    assert max_abs(pooled, expected.pooler_output.numpy()) <= SMALL


def test_parity_report_runs_a_deit_checkpoint(tmp_path, transformers, photos) -> None:
    """conversion.compare (vitx parity) preprocesses a DeiT directory with its own processor."""
    from conversion import compare
    from conversion.compare import _pixel_values

    make_transformers_checkpoint(tmp_path, transformers, "classification", seed=3)
    images = [photos["coffee.png"], photos["rocket.jpg"]]
    pixel_values = _pixel_values(images, vit_core.ViTConfig(**DEIT_TINY), tmp_path)
    assert max_abs(pixel_values, _pixels_of_transformers(tmp_path, transformers, images)) <= ATOL
    report = compare(tmp_path, images=[str(IMAGES_DIR / "coffee.png")], frameworks=("reference", "torch"))
    assert report.ok and report.frameworks == ["reference", "torch"]
