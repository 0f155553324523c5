"""ViTImageProcessor / ViTImageProcessorFast against transformers 4.57's slow ViTImageProcessor.

The oracle is transformers' processor with do_convert_rgb=True (its default fails on grayscale,
RGBA, palette and 16-bit images; for RGB images the flag changes nothing). Inputs it cannot read
(2-D arrays, RGBA arrays) are compared with the oracle on the RGB array that Pillow's
convert("RGB") would give. Bound: max |diff| <= 1e-6 (docs/NUMERICS.md); the fast processor:
max |diff| <= 0.1 and mean |diff| <= 5e-3 against the slow one.
"""

from __future__ import annotations

import copy
import json
import pathlib
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import pytest
from PIL import Image

from vit_core.image_processing import (
    PREPROCESSOR_CONFIG_NAME,
    BatchFeature,
    ViTFeatureExtractor,
    ViTImageProcessor,
    infer_channel_dimension_format,
)
from vit_core.image_processing_fast import ViTImageProcessorFast
from vit_core.tolerances import TOLERANCES

IMAGES_DIR = pathlib.Path(__file__).parent / "fixtures" / "images"
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "camera.png", "rocket.jpg")
ATOL = TOLERANCES["image_processor"]  # against transformers' slow processor (docs/NUMERICS.md)
FAST_MAX, FAST_MEAN = TOLERANCES["fast_image_processor_max"], TOLERANCES["fast_image_processor_mean"]


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    result = {}
    for name in PHOTOS:
        with Image.open(IMAGES_DIR / name) as image:
            image.load()
            result[name] = image.copy()
    return result


@pytest.fixture(scope="module")
def oracle_cls() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.ViTImageProcessor


def run_oracle(oracle_cls: Any, images: Any, options: dict[str, Any], **call: Any) -> np.ndarray:
    processor = oracle_cls(**{"do_convert_rgb": True, **options})
    pixel_values = processor(images, **call)["pixel_values"]
    return np.asarray(np.stack(pixel_values), dtype=np.float32)


def max_abs(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------- input kinds
def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))


def _rgba(image: Image.Image) -> Image.Image:
    rgba = _rgb(image).convert("RGBA")
    width, height = rgba.size
    # A varying alpha: convert("RGB") must drop it, never composite or premultiply.
    alpha = (np.arange(width)[None, :] * 255 // max(width - 1, 1) + np.zeros((height, 1), int)).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _stack3(gray: np.ndarray) -> np.ndarray:
    return np.stack([gray] * 3, axis=-1)


@dataclass(frozen=True)
class InputCase:
    """One way of handing a photo to the processor, and what the oracle gets for it."""

    name: str
    ours: Callable[[Image.Image], Any]
    oracle: Callable[[Image.Image], Any]
    options: dict[str, Any] = field(default_factory=dict)  # for both processors
    warns: bool = False  # our processor warns (double rescale of [0, 1] images, clipped 16-bit)


def _same(make: Callable[[Image.Image], Any], name: str, **kw: Any) -> InputCase:
    return InputCase(name, make, make, **kw)


INPUT_CASES = [
    _same(lambda im: im, "pil_as_loaded"),
    _same(lambda im: _rgb(im).convert("L"), "pil_grayscale_L"),
    _same(_rgba, "pil_rgba"),
    _same(lambda im: _rgb(im).convert("LA"), "pil_LA"),
    _same(lambda im: _rgb(im).convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "pil_palette_P"),
    _same(lambda im: _rgb(im).convert("1"), "pil_1bit"),
    _same(lambda im: _rgb(im).convert("CMYK"), "pil_CMYK"),
    _same(lambda im: Image.fromarray(_gray(im).astype(np.uint16)), "pil_16bit_I;16"),
    _same(lambda im: Image.fromarray(_gray(im).astype(np.int32)), "pil_32bit_I"),
    # Real 16-bit range: Pillow's convert("RGB") clips at 255 in both processors; ours warns.
    _same(lambda im: Image.fromarray(_gray(im).astype(np.uint16) * 257), "pil_16bit_full_range", warns=True),
    _same(lambda im: np.asarray(_rgb(im)), "numpy_hwc_uint8"),
    _same(lambda im: np.asarray(_rgb(im)).transpose(2, 0, 1), "numpy_chw_uint8"),
    _same(lambda im: np.asarray(_rgb(im)).astype(np.uint16), "numpy_hwc_uint16_8bit_values"),
    _same(lambda im: np.asarray(_rgb(im)).astype(np.float32), "numpy_hwc_float_whole_0_255"),
    # [0, 1] floats are scaled by 255 and truncated to uint8 before the resize, back after it,
    # and then (as in transformers) rescaled again by do_rescale=True: ours warns about that.
    _same(lambda im: (np.asarray(_rgb(im)) / 255).astype(np.float32), "numpy_hwc_float01", warns=True),
    _same(lambda im: (np.asarray(_rgb(im)) / 255).astype(np.float32), "numpy_hwc_float01_no_rescale",
          options={"do_rescale": False}),
    _same(lambda im: (np.asarray(_rgb(im)) / 255).transpose(2, 0, 1), "numpy_chw_float64_01_no_rescale",
          options={"do_rescale": False}),
    _same(lambda im: np.random.default_rng(0).random((im.height, im.width, 3), dtype=np.float32),
          "numpy_hwc_float01_noise_no_rescale", options={"do_rescale": False}),
    InputCase("numpy_hw_grayscale", _gray, lambda im: _stack3(_gray(im))),
    InputCase("numpy_hw1_grayscale", lambda im: _gray(im)[:, :, None], lambda im: _stack3(_gray(im))),
    InputCase("numpy_1hw_grayscale", lambda im: _gray(im)[None], lambda im: _stack3(_gray(im))),
    InputCase("numpy_hwc_rgba", lambda im: np.asarray(_rgba(im)), lambda im: np.asarray(_rgb(im))),
    InputCase("numpy_chw_rgba", lambda im: np.asarray(_rgba(im)).transpose(2, 0, 1), lambda im: np.asarray(_rgb(im))),
    _same(lambda im: np.stack([np.asarray(_rgb(im)), np.asarray(_rgb(im))[::-1]]), "numpy_batch_nhwc"),
    _same(lambda im: [_rgb(im), _rgb(im).transpose(Image.Transpose.FLIP_LEFT_RIGHT), im.convert("L")], "list_of_pil"),
]


def _call(processor: Any, image: Any, case_warns: bool, **kw: Any) -> Any:
    if case_warns:
        with pytest.warns(UserWarning):
            return processor(image, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning where none is due
        return processor(image, **kw)


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("case", INPUT_CASES, ids=lambda c: c.name)
def test_matches_transformers_per_input_kind(photos, oracle_cls, photo: str, case: InputCase) -> None:
    image = photos[photo]
    ours = _call(ViTImageProcessor(**case.options), case.ours(image), case.warns)["pixel_values"]
    expected = run_oracle(oracle_cls, case.oracle(image), case.options)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    assert ours.shape == expected.shape and ours.shape[1:] == (3, 224, 224)
    assert max_abs(ours, expected) <= ATOL


@pytest.mark.parametrize("photo", PHOTOS)
def test_bitwise_equal_to_transformers_on_photos(photos, oracle_cls, photo: str) -> None:
    # Stricter than the 1e-6 bound on purpose: a float32 product in the rescale (instead of
    # float32(float64(x) / 255)) changes 126 of the 256 levels by 6e-8, which the bound misses.
    ours = ViTImageProcessor()(photos[photo])["pixel_values"]
    assert np.array_equal(ours, run_oracle(oracle_cls, photos[photo], {}))


# ------------------------------------------------------------------------------------- options
OPTION_CASES: list[tuple[str, dict[str, Any]]] = [
    ("size_nonsquare", {"size": {"height": 160, "width": 96}}),
    ("size_legacy_int_upsample", {"size": 384}),
    ("size_pair", {"size": (100, 300)}),
    ("imagenet_default_mean_std", {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
    ("scalar_mean_std", {"image_mean": 0.25, "image_std": 0.3}),
    ("no_normalize", {"do_normalize": False}),
    ("no_resize", {"do_resize": False}),
    ("no_rescale", {"do_rescale": False}),
    ("no_rescale_no_normalize", {"do_rescale": False, "do_normalize": False}),
    ("rescale_factor", {"rescale_factor": 1 / 127.5, "image_mean": 1.0, "image_std": 1.0}),
    ("resample_nearest", {"resample": 0}),
    ("resample_lanczos", {"resample": 1}),
    ("resample_bicubic", {"resample": 3}),
    ("resample_box", {"resample": 4}),
    ("resample_hamming", {"resample": 5}),
]


@pytest.mark.parametrize("where", ["constructor", "call"])
@pytest.mark.parametrize("name,options", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
@pytest.mark.parametrize("photo", ["chelsea.png", "camera.png"])
def test_matches_transformers_with_options(photos, oracle_cls, photo: str, name: str, options: dict, where: str) -> None:
    image = photos[photo]
    processor = ViTImageProcessor(**options) if where == "constructor" else ViTImageProcessor()
    ours = processor(image, **(options if where == "call" else {}))["pixel_values"]
    expected = run_oracle(oracle_cls, image, options)
    assert ours.dtype == np.float32
    assert max_abs(ours, expected) <= ATOL


def test_keep_own_channels_with_do_convert_rgb_false(photos, oracle_cls) -> None:
    gray = photos["camera.png"]  # mode "L"
    ours = ViTImageProcessor(do_convert_rgb=False, image_mean=[0.5], image_std=[0.5])(gray)["pixel_values"]
    assert ours.shape == (1, 1, 224, 224)
    expected = run_oracle(oracle_cls, np.asarray(gray)[:, :, None], {"image_mean": [0.5], "image_std": [0.5]})
    assert max_abs(ours, expected) <= ATOL

    # RGBA kept as 4 channels: resized by Pillow as RGBA (premultiplied alpha), like transformers.
    rgba = _rgba(photos["chelsea.png"])
    four = {"image_mean": [0.5] * 4, "image_std": [0.5] * 4}
    ours = ViTImageProcessor(do_convert_rgb=False, **four)(rgba)["pixel_values"]
    assert ours.shape == (1, 4, 224, 224)
    expected = run_oracle(oracle_cls, np.asarray(rgba), four, input_data_format="channels_last")
    assert max_abs(ours, expected) <= ATOL
    with pytest.raises(ValueError, match="image_mean has 3 values but the images have 4 channels"):
        ViTImageProcessor(do_convert_rgb=False)(rgba)


def test_channel_inference_follows_transformers() -> None:
    transformers_image_utils = pytest.importorskip("transformers.image_utils")
    for shape in [(3, 10, 12), (10, 12, 3), (1, 10, 12), (10, 12, 1), (3, 10, 3), (1, 5, 1), (3, 4, 1), (1, 4, 3)]:
        theirs = transformers_image_utils.infer_channel_dimension_format(np.zeros(shape)).value
        assert infer_channel_dimension_format(np.zeros(shape)) == theirs, shape
    # RGBA arrays, which transformers cannot place, are found after its own rule.
    assert infer_channel_dimension_format(np.zeros((4, 10, 12))) == "channels_first"
    assert infer_channel_dimension_format(np.zeros((10, 12, 4))) == "channels_last"
    assert infer_channel_dimension_format(np.zeros((4, 10, 3))) == "channels_last"


def test_input_data_format_overrides_inference(photos) -> None:
    rgb = np.asarray(photos["chelsea.png"])[:3, :3]  # (3, 3, 3): read as channels first by default
    processor = ViTImageProcessor(do_resize=False)
    last = processor(rgb, input_data_format="channels_last")["pixel_values"]
    first = processor(rgb)["pixel_values"]
    assert np.array_equal(last[0], processor(rgb.transpose(2, 0, 1))["pixel_values"][0])
    assert np.array_equal(first[0], processor(rgb.transpose(1, 2, 0), input_data_format="channels_last")["pixel_values"][0])


def test_channels_last_output(photos) -> None:
    processor = ViTImageProcessor()
    first = processor(photos["chelsea.png"])["pixel_values"]
    last = processor(photos["chelsea.png"], data_format="channels_last")["pixel_values"]
    assert last.shape == (1, 224, 224, 3)
    assert np.array_equal(last, first.transpose(0, 2, 3, 1))


def test_float_within_0_255_not_whole_is_rounded() -> None:
    # transformers refuses non-whole floats above 1; this processor rounds them to 8-bit values.
    processor = ViTImageProcessor(size=8)
    floats = np.full((16, 16, 3), 100.4, dtype=np.float32)
    assert np.array_equal(processor(floats)["pixel_values"], processor(np.full((16, 16, 3), 100, np.uint8))["pixel_values"])


# ------------------------------------------------------------------------------------- frameworks in
def _framework_arrays(name: str, hwc: np.ndarray) -> tuple[Any, np.ndarray]:
    """(framework array, the numpy array it holds) for each supported framework."""
    if name == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(hwc.transpose(2, 0, 1).copy()), hwc.transpose(2, 0, 1)
    if name == "torch_batch_float01":
        torch = pytest.importorskip("torch")
        batch = np.stack([hwc, hwc[::-1]]).transpose(0, 3, 1, 2) / 255
        return torch.from_numpy(batch.astype(np.float32)), batch.astype(np.float32)
    if name == "tf":
        tf = pytest.importorskip("tensorflow")
        return tf.constant(hwc), hwc
    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return jnp.asarray(hwc), hwc
    raise AssertionError(name)


@pytest.mark.parametrize("framework", ["torch", "torch_batch_float01", "tf", "jax"])
def test_framework_arrays_as_input(photos, oracle_cls, framework: str) -> None:
    hwc = np.asarray(photos["coffee.png"])
    array, as_numpy = _framework_arrays(framework, hwc)
    options = {"do_rescale": False} if "float01" in framework else {}
    ours = ViTImageProcessor(**options)(array)["pixel_values"]
    expected = run_oracle(oracle_cls, as_numpy, options)
    assert max_abs(ours, expected) <= ATOL


# ------------------------------------------------------------------------------------- outputs
def _framework_type(kind: str) -> type:
    if kind == "np":
        return np.ndarray
    if kind == "pt":
        return pytest.importorskip("torch").Tensor
    if kind == "tf":
        return pytest.importorskip("tensorflow").Tensor
    return pytest.importorskip("jax").Array


@pytest.mark.parametrize("return_tensors", ["np", "pt", "tf", "jax"])
def test_return_tensors(photos, return_tensors: str) -> None:
    expected_type = _framework_type(return_tensors)
    images = [photos["chelsea.png"], photos["camera.png"]]
    reference = ViTImageProcessor()(images)["pixel_values"]
    batch = ViTImageProcessor()(images, return_tensors=return_tensors)
    assert isinstance(batch, BatchFeature) and list(batch) == ["pixel_values"]
    assert batch.pixel_values is batch["pixel_values"]
    assert isinstance(batch.pixel_values, expected_type)
    values = np.asarray(batch.pixel_values)
    assert values.shape == (2, 3, 224, 224) and values.dtype == np.float32
    assert np.array_equal(values, reference)


def test_batch_feature_to_and_lists(photos) -> None:
    torch = pytest.importorskip("torch")
    batch = ViTImageProcessor()(photos["chelsea.png"], return_tensors="pt").to(torch.float16)
    assert batch.pixel_values.dtype == torch.float16
    assert ViTImageProcessor()(photos["chelsea.png"]).to("cpu")["pixel_values"].dtype == np.float32  # numpy: unchanged
    with pytest.raises(AttributeError, match="no entry 'labels'"):
        batch.labels
    # Different sizes without a resize: a list of (C, H, W) arrays, no batch tensor.
    images = [photos["chelsea.png"], photos["camera.png"]]
    listed = ViTImageProcessor(do_resize=False)(images)["pixel_values"]
    assert [p.shape for p in listed] == [(3, 300, 451), (3, 512, 512)]
    with pytest.raises(ValueError, match="different shapes"):
        ViTImageProcessor(do_resize=False)(images, return_tensors="np")


# ------------------------------------------------------------------------------------- bad inputs
BAD_INPUTS: list[tuple[str, Callable[[], Any], dict[str, Any], type, str]] = [
    ("rank_1", lambda: np.zeros(10, np.uint8), {}, ValueError, r"got 1 dimensions"),
    ("rank_5", lambda: np.zeros((1, 2, 8, 8, 3), np.uint8), {}, ValueError, r"got 5 dimensions"),
    ("five_channels", lambda: np.zeros((8, 9, 5), np.uint8), {}, ValueError, r"channel axis of an image of shape \(8, 9, 5\)"),
    ("five_channels_given_format", lambda: np.zeros((8, 9, 5), np.uint8), {"input_data_format": "channels_last"},
     ValueError, r"5 channels cannot be converted to RGB"),
    ("float_out_of_range", lambda: np.linspace(-1, 2, 192, dtype=np.float32).reshape(8, 8, 3), {}, ValueError,
     r"range \[-1\.0, 2\.0\]"),
    ("float_above_255", lambda: np.full((8, 8, 3), 300.5, np.float32), {}, ValueError, r"range \[300\.5, 300\.5\]"),
    ("float_nan", lambda: np.full((8, 8, 3), np.nan, np.float32), {}, ValueError, r"NaN"),
    ("int16_negative", lambda: np.full((8, 8, 3), -3, np.int16), {}, ValueError, r"range \[-3, -3\]"),
    ("uint16_16bit_range", lambda: np.full((8, 8, 3), 4000, np.uint16), {}, ValueError, r"\[0, 255\].*16-bit"),
    ("bool", lambda: np.zeros((8, 8, 3), bool), {}, ValueError, r"boolean images"),
    ("complex", lambda: np.zeros((8, 8, 3), np.complex64), {}, ValueError, r"complex images"),
    ("strings", lambda: np.full((8, 8, 3), "a"), {}, ValueError, r"unsupported image dtype"),
    ("empty_list", lambda: [], {}, ValueError, r"no images given"),
    ("empty_batch", lambda: np.zeros((0, 8, 8, 3), np.uint8), {}, ValueError, r"no images given"),
    ("zero_height", lambda: np.zeros((0, 8, 3), np.uint8), {}, ValueError, r"zero height or width"),
    ("none", lambda: None, {}, ValueError, r"None"),
    ("wrong_type", lambda: "photo.png", {}, ValueError, r"unsupported image type builtins.str"),
    ("mean_length", lambda: np.zeros((8, 8, 3), np.uint8), {"image_mean": [0.5, 0.5]}, ValueError,
     r"image_mean has 2 values but the images have 3 channels"),
    ("std_zero", lambda: np.zeros((8, 8, 3), np.uint8), {"image_std": [0.5, 0.0, 0.5]}, ValueError, r"image_std must not contain 0"),
    ("size_shortest_edge", lambda: np.zeros((8, 8, 3), np.uint8), {"size": {"shortest_edge": 224}}, ValueError,
     r"'height' and 'width'"),
    ("resample_unknown", lambda: np.zeros((8, 8, 3), np.uint8), {"resample": 9}, ValueError, r"resample must be"),
    ("return_tensors_unknown", lambda: np.zeros((8, 8, 3), np.uint8), {"return_tensors": "mx"}, ValueError, r"return_tensors"),
    ("data_format_unknown", lambda: np.zeros((8, 8, 3), np.uint8), {"data_format": "NCHW"}, ValueError, r"data format"),
    ("unknown_option", lambda: np.zeros((8, 8, 3), np.uint8), {"do_normalise": False}, TypeError, r"do_normalise"),
]


@pytest.mark.parametrize("processor_cls", [ViTImageProcessor, ViTImageProcessorFast], ids=["slow", "fast"])
@pytest.mark.parametrize("name,make,kwargs,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(processor_cls, name: str, make, kwargs: dict, error: type, match: str) -> None:
    if processor_cls is ViTImageProcessorFast:
        pytest.importorskip("torch")
    with pytest.raises(error, match=match):
        processor_cls()(make(), **kwargs)


# ------------------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path) -> None:
    processor = ViTImageProcessor(
        size={"height": 160, "width": 96}, resample=3, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], do_convert_rgb=True, crop_pct=0.875, processor_class="ViTProcessor",
    )
    path = processor.save_pretrained(tmp_path / "out")
    assert path.name == PREPROCESSOR_CONFIG_NAME
    assert sorted(p.name for p in path.parent.iterdir()) == [PREPROCESSOR_CONFIG_NAME]  # no temporary left
    written = json.loads(path.read_text())
    assert written["image_processor_type"] == "ViTImageProcessor"
    assert written["size"] == {"height": 160, "width": 96} and written["resample"] == 3
    assert written["crop_pct"] == 0.875 and written["processor_class"] == "ViTProcessor"  # unknown keys kept
    loaded = ViTImageProcessor.from_pretrained(tmp_path / "out")
    assert loaded == processor and loaded.to_dict() == processor.to_dict() and loaded.crop_pct == 0.875
    assert json.loads(loaded.to_json_string()) == written
    assert copy.deepcopy(loaded) == processor and pickle.loads(pickle.dumps(loaded)) == processor
    assert ViTImageProcessor.from_pretrained(path) == processor  # the json file itself
    assert ViTImageProcessor.from_pretrained(tmp_path / "out", do_normalize=False).do_normalize is False
    # Saving again replaces the file.
    ViTImageProcessor(size=32).save_pretrained(tmp_path / "out")
    assert ViTImageProcessor.from_pretrained(tmp_path / "out").size == {"height": 32, "width": 32}


def test_transformers_reads_our_file_and_we_read_theirs(tmp_path, photos, oracle_cls) -> None:
    options = {"size": {"height": 128, "width": 200}, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
               "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}
    image = photos["rocket.jpg"]
    ViTImageProcessor(**options).save_pretrained(tmp_path / "ours")
    theirs = oracle_cls.from_pretrained(tmp_path / "ours")
    for key, value in options.items():
        assert getattr(theirs, key) == value, key
    expected = np.stack(theirs(image)["pixel_values"])
    assert max_abs(ViTImageProcessor.from_pretrained(tmp_path / "ours")(image)["pixel_values"], expected) <= ATOL

    oracle_cls(**options).save_pretrained(tmp_path / "theirs")
    ours = ViTImageProcessor.from_pretrained(tmp_path / "theirs")
    assert ours == ViTImageProcessor(**options)
    assert max_abs(ours(image)["pixel_values"], expected) <= ATOL


@pytest.mark.parametrize("size", [224, 384])
def test_legacy_feature_extractor_file(tmp_path, photos, oracle_cls, size: int) -> None:
    legacy = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": size}
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(legacy))
    ours = ViTImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"height": size, "width": size} and ours.resample == 2
    rewritten = json.loads(ours.to_json_string())
    assert "feature_extractor_type" not in rewritten and rewritten["image_processor_type"] == "ViTImageProcessor"
    image = photos["astronaut.png"]
    expected = np.stack(oracle_cls.from_pretrained(tmp_path)(image)["pixel_values"])
    assert expected.shape == (1, 3, size, size)
    assert max_abs(ours(image)["pixel_values"], expected) <= ATOL


def _hub_cache(tmp_path: pathlib.Path, config: dict[str, Any]) -> tuple[pathlib.Path, str]:
    """A huggingface_hub cache holding org/name at a fake commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(config))
    return tmp_path / "hub", commit


def test_from_hub_cache_offline(tmp_path, monkeypatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once, at import time
    cache_dir, commit = _hub_cache(tmp_path, {"size": 256, "feature_extractor_type": "ViTFeatureExtractor"})
    processor = ViTImageProcessor.from_pretrained("org/name", cache_dir=cache_dir)
    assert processor.size == {"height": 256, "width": 256}
    assert ViTImageProcessor.from_pretrained("org/name", cache_dir=cache_dir, revision=commit) == processor
    fast = ViTImageProcessorFast.from_pretrained("org/name", cache_dir=cache_dir, device="cpu")
    assert fast.to_dict() == processor.to_dict()
    with pytest.raises(OSError, match="org/missing"):
        ViTImageProcessor.from_pretrained("org/missing", cache_dir=cache_dir)


def test_missing_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=PREPROCESSOR_CONFIG_NAME):
        ViTImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="not a local directory or file"):
        ViTImageProcessor.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ViTImageProcessor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------- deprecation
def test_feature_extractor_warns_once(monkeypatch, photos) -> None:
    monkeypatch.setattr(ViTFeatureExtractor, "_deprecation_warned", False)
    with pytest.warns(FutureWarning, match="ViTImageProcessor"):
        extractor = ViTFeatureExtractor(size=96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ViTFeatureExtractor()
    assert isinstance(extractor, ViTImageProcessor)
    image = photos["chelsea.png"]
    assert np.array_equal(extractor(image)["pixel_values"], ViTImageProcessor(size=96)(image)["pixel_values"])


# ------------------------------------------------------------------------------------- fast
def _fast_vs_slow(images: Any, **options: Any) -> tuple[float, float]:
    pytest.importorskip("torch")
    slow = ViTImageProcessor(**options)(images)["pixel_values"]
    fast = ViTImageProcessorFast(**options)(images)["pixel_values"]
    diff = np.abs(fast.numpy().astype(np.float64) - slow)
    return float(diff.max()), float(diff.mean())


FAST_CASES: list[tuple[str, Callable[[Image.Image], Any], dict[str, Any]]] = [
    ("photo", lambda im: im, {}),
    ("grayscale_2d", _gray, {}),
    ("chw_float01_no_rescale", lambda im: (np.asarray(_rgb(im)) / 255).transpose(2, 0, 1), {"do_rescale": False}),
    ("float01_double_rescale", lambda im: (np.asarray(_rgb(im)) / 255).astype(np.float32), {}),
    ("size_nonsquare_upsample", lambda im: im, {"size": {"height": 400, "width": 640}}),
    ("bicubic", lambda im: im, {"resample": 3}),
    ("nearest", lambda im: im, {"resample": 0}),
    ("no_resize", lambda im: im, {"do_resize": False}),
]


@pytest.mark.filterwarnings("ignore:the images look already rescaled")
@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("name,make,options", FAST_CASES, ids=[c[0] for c in FAST_CASES])
def test_fast_close_to_slow(photos, photo: str, name: str, make, options: dict) -> None:
    worst, mean = _fast_vs_slow(make(photos[photo]), **options)
    assert worst <= FAST_MAX and mean <= FAST_MEAN, (worst, mean)


def test_fast_batches_mixed_sizes_and_device(photos) -> None:
    torch = pytest.importorskip("torch")
    images = [photos[name] for name in PHOTOS]
    batch = ViTImageProcessorFast(device="cpu")(images)["pixel_values"]
    assert isinstance(batch, torch.Tensor) and batch.shape == (5, 3, 224, 224) and batch.dtype == torch.float32
    assert batch.device == torch.device("cpu")
    for index, image in enumerate(images):  # batching does not change an image's values
        assert torch.equal(batch[index], ViTImageProcessorFast()(image, device="cpu")["pixel_values"][0])
    as_numpy = ViTImageProcessorFast()(images, return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, batch.numpy())
    listed = ViTImageProcessorFast(do_resize=False)(images[:2])["pixel_values"]
    assert [tuple(p.shape) for p in listed] == [(3, 300, 451), (3, 400, 600)]
    with pytest.raises(ValueError, match="needs ViTImageProcessor"):
        ViTImageProcessorFast(resample=1)(images[0])


def test_fast_without_torch(monkeypatch, photos) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"pip install vitx\[torch\]"):
        ViTImageProcessorFast()(photos["chelsea.png"])


def test_import_pulls_in_no_framework() -> None:
    code = (
        "import sys, vit_core, vit_core.image_processing, vit_core.image_processing_fast\n"
        "assert vit_core.ViTImageProcessor is vit_core.image_processing.ViTImageProcessor\n"
        "assert vit_core.ViTImageProcessorFast is vit_core.image_processing_fast.ViTImageProcessorFast\n"
        "assert vit_core.ViTFeatureExtractor is vit_core.image_processing.ViTFeatureExtractor\n"
        "loaded = [m for m in ('torch', 'tensorflow', 'jax', 'flax', 'transformers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


@pytest.mark.parametrize("shape,mean,std", [((224, 224, 3), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]),
                                            ((7, 13, 3), 0.5, 0.5), ((9, 5, 1), [0.1], [0.7])])
@pytest.mark.parametrize("channels_first", [True, False])
def test_fused_rescale_normalize_is_bit_identical_to_the_two_steps(shape, mean, std, channels_first) -> None:
    """The processors' uint8 fast path (one float32 buffer) equals rescale() then normalize() (then the
    transpose) bit for bit, so the pixels stay transformers' exactly."""
    from vit_core.image_transforms import normalize, rescale, rescale_normalize_uint8

    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    expected = normalize(rescale(image, 1 / 255), mean, std)
    expected = expected.transpose(2, 0, 1) if channels_first else expected
    got = rescale_normalize_uint8(image, 1 / 255, mean, std, channels_first)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == expected.shape
    assert np.array_equal(got, expected)
    with pytest.raises(ValueError, match="uint8"):
        rescale_normalize_uint8(image.astype(np.float32), 1 / 255, mean, std, channels_first)
