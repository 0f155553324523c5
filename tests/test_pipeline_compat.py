"""conversion.pipeline against transformers 4.57.6's own ``pipeline(...)`` on the same checkpoints and photos.

Checkpoints are tiny, seeded and written by transformers (DeiT-like config: 3 heads; the
facebook/deit-* preprocessor file, crop 32). Both tasks, every framework, paths and model objects:
the results must have transformers' nesting, keys and labels, scores within 1e-5 and features
within the small-config bound of docs/NUMERICS.md (1e-5).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conversion.pipeline import (
    ImageClassificationPipeline,
    ImageFeatureExtractionPipeline,
    check_device,
    framework_of_model,
    pipeline,
    resolve_framework,
)
from vit_core.image_processing import DeiTImageProcessor
from vit_core.tolerances import TOLERANCES

IMAGES_DIR = pathlib.Path(__file__).parent / "fixtures" / "images"
PHOTOS = [str(IMAGES_DIR / n) for n in ("chelsea.png", "coffee.png", "astronaut.png", "camera.png", "rocket.jpg")]
SCORE_ATOL = 1e-5
FEATURE_ATOL = TOLERANCES["small"]
FRAMEWORKS = ["torch", "tf", "flax"]
CONFIG = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48, image_size=32,
              patch_size=8, layer_norm_eps=1e-12)
DEIT_FILE = {"feature_extractor_type": "DeiTFeatureExtractor", "size": 36, "crop_size": 32, "do_center_crop": True,
             "do_resize": True, "do_normalize": True, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
             "image_std": [0.229, 0.224, 0.225]}
LABELS = ["tabby", "tiger cat", "espresso", "astronaut", "camera", "rocket", "space shuttle"]


@pytest.fixture(scope="module")
def transformers() -> Any:
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def _seed(model: Any, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, transformers) -> dict[str, pathlib.Path]:
    """classification (DeiT layout), base with a pooler, base without one (DINO layout)."""
    root = tmp_path_factory.mktemp("pipeline")
    labels = dict(id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    models = {
        "classification": transformers.ViTForImageClassification(transformers.ViTConfig(**CONFIG, **labels)),
        "multilabel": transformers.ViTForImageClassification(
            transformers.ViTConfig(**CONFIG, **labels, problem_type="multi_label_classification")),
        "base": transformers.ViTModel(transformers.ViTConfig(**CONFIG)),
        "dino": transformers.ViTModel(transformers.ViTConfig(**CONFIG), add_pooling_layer=False),
    }
    paths = {}
    for seed, (name, model) in enumerate(models.items()):
        _seed(model, seed)
        model.eval().save_pretrained(root / name)
        (root / name / "preprocessor_config.json").write_text(json.dumps(DEIT_FILE))
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def their_pipelines(transformers, checkpoints) -> dict[str, Any]:
    return {
        "classification": transformers.pipeline("image-classification", model=str(checkpoints["classification"])),
        "multilabel": transformers.pipeline("image-classification", model=str(checkpoints["multilabel"])),
        "base": transformers.pipeline("image-feature-extraction", model=str(checkpoints["base"])),
        "cls-features": transformers.pipeline("image-feature-extraction", model=str(checkpoints["classification"])),
    }


def assert_same_predictions(ours: Any, theirs: Any) -> None:
    """Same nesting, keys in the same order, same labels in the same order, scores within 1e-5."""
    assert type(ours) is type(theirs) is list and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(b, list):
            assert_same_predictions(a, b)
            continue
        assert isinstance(a, dict) and list(a) == list(b) == ["label", "score"]
        assert a["label"] == b["label"] and type(a["score"]) is float
        assert abs(a["score"] - b["score"]) <= SCORE_ATOL, (a, b)


def assert_same_features(ours: Any, theirs: Any) -> None:
    """Nested lists of floats: the same nesting, values within the small-config bound."""
    assert type(ours) is type(theirs) is list
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert a.shape == b.shape and a.size > 0
    assert float(np.abs(a - b).max()) <= FEATURE_ATOL
    assert isinstance(np.asarray(ours, dtype=object).flat[0], float)


# ------------------------------------------------------------------------------------- image-classification
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_classification_matches_transformers(checkpoints, their_pipelines, framework: str) -> None:
    theirs = their_pipelines["classification"]
    ours = pipeline("image-classification", model=checkpoints["classification"], framework=framework)
    assert isinstance(ours, ImageClassificationPipeline) and isinstance(ours.image_processor, DeiTImageProcessor)
    single = ours(PHOTOS[0])
    assert len(single) == 5  # transformers' default top_k
    assert_same_predictions(single, theirs(PHOTOS[0]))
    assert_same_predictions(ours(PHOTOS), theirs(PHOTOS))  # a list: one list per image
    assert_same_predictions(ours(PHOTOS[:2], top_k=100), theirs(PHOTOS[:2], top_k=100))  # clamped to 7 labels
    assert len(ours(PHOTOS[1], top_k=100)) == 7
    assert_same_predictions(ours(PHOTOS[3], top_k=2), theirs(PHOTOS[3], top_k=2))
    assert ours(images=PHOTOS[3], top_k=2) == ours(PHOTOS[3], top_k=2)  # transformers' keyword (its own needs inputs)
    with Image.open(PHOTOS[4]) as image:
        pil = image.copy()
    assert_same_predictions(ours(pil), theirs(pil))
    assert_same_predictions(ours([pil, PHOTOS[2]]), theirs([pil, PHOTOS[2]]))


@pytest.mark.parametrize("function", ["sigmoid", "none", "softmax"])
def test_function_to_apply_and_multilabel(checkpoints, their_pipelines, function: str) -> None:
    theirs = their_pipelines["classification"]
    ours = pipeline("image-classification", model=checkpoints["classification"], function_to_apply=function, top_k=7)
    assert_same_predictions(ours(PHOTOS[:3]), theirs(PHOTOS[:3], function_to_apply=function, top_k=7))
    default = pipeline("image-classification", model=checkpoints["classification"])
    assert_same_predictions(default(PHOTOS[2], function_to_apply=function),
                            theirs(PHOTOS[2], function_to_apply=function))
    # multi-label checkpoints: sigmoid by default, as transformers
    multilabel = pipeline("image-classification", model=checkpoints["multilabel"], framework="flax")
    expected = their_pipelines["multilabel"](PHOTOS[:2])
    assert_same_predictions(multilabel(PHOTOS[:2]), expected)
    assert sum(p["score"] for p in expected[0]) > 1.0  # not a softmax


@pytest.mark.parametrize("framework", ["pt", "jax", "tf"])
def test_aliases_batch_size_and_devices(checkpoints, their_pipelines, framework: str) -> None:
    import torch

    expected = their_pipelines["classification"](PHOTOS, batch_size=2)
    for device in (None, "cpu", -1, torch.device("cpu")):
        ours = pipeline("image-classification", model=str(checkpoints["classification"]), framework=framework,
                        device=device, batch_size=2)
        assert ours.framework == resolve_framework(framework)
        assert_same_predictions(ours(PHOTOS), expected)
    batched = pipeline("image-classification", model=checkpoints["classification"], framework=framework, batch_size=4)
    assert_same_predictions(batched(PHOTOS), expected)  # 5 images: a batch of 4 and one of 1


def test_transformers_tf_pipeline_agrees(transformers, checkpoints) -> None:
    pytest.importorskip("tf_keras")
    model = transformers.TFViTForImageClassification.from_pretrained(checkpoints["classification"], from_pt=True)
    processor = transformers.AutoImageProcessor.from_pretrained(checkpoints["classification"])
    theirs = transformers.pipeline("image-classification", model=model, image_processor=processor, framework="tf")
    ours = pipeline("image-classification", model=checkpoints["classification"], framework="tf")
    assert_same_predictions(ours(PHOTOS, top_k=3), theirs(PHOTOS, top_k=3))


def test_exif_orientation_and_modes_load_as_transformers(tmp_path, checkpoints, their_pipelines) -> None:
    """Paths and PIL images go through EXIF orientation and convert("RGB"), as transformers' load_image."""
    with Image.open(PHOTOS[4]) as image:  # rocket.jpg, 427 x 640: a rotation changes the crop
        rgb = image.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = tmp_path / "rotated.jpg"
    rgb.save(rotated, exif=exif, quality=95)
    gray = tmp_path / "gray.png"
    rgb.convert("L").save(gray)
    theirs = their_pipelines["base"]
    ours = pipeline("image-feature-extraction", model=checkpoints["base"])
    for path in (rotated, gray):
        assert_same_features(ours(str(path)), theirs(str(path)))
    with Image.open(rotated) as image:
        assert_same_features(ours(image), theirs(image))
        upright = np.asarray(ours(np.asarray(image.convert("RGB"))))  # an array: no EXIF transpose
    assert float(np.abs(np.asarray(ours(str(rotated))) - upright).max()) > 1e-2


# ------------------------------------------------------------------------------------- model objects
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_vitx_model_objects(checkpoints, their_pipelines, framework: str) -> None:
    directory = checkpoints["classification"]
    if framework == "torch":
        import vit_torch

        model = vit_torch.ViTForImageClassification.from_pretrained(directory)
        base = vit_torch.ViTModel.from_pretrained(checkpoints["base"])
    elif framework == "tf":
        vit_tf = pytest.importorskip("vit_tf")
        model = vit_tf.TFViTForImageClassification.from_pretrained(directory)
        base = vit_tf.TFViTModel.from_pretrained(checkpoints["base"])
    else:
        vit_flax = pytest.importorskip("vit_flax")
        model = vit_flax.FlaxViTForImageClassification.from_pretrained(directory)
        base = vit_flax.FlaxViTModel.from_pretrained(checkpoints["base"])
    assert framework_of_model(model) == framework
    processor = DeiTImageProcessor.from_pretrained(directory)
    for image_processor in (processor, directory, str(directory)):
        ours = pipeline("image-classification", model=model, image_processor=image_processor)
        assert ours.framework == framework
        assert_same_predictions(ours(PHOTOS[:3], top_k=3), their_pipelines["classification"](PHOTOS[:3], top_k=3))
    features = pipeline("image-feature-extraction", model=base, image_processor=directory, framework=framework)
    assert_same_features(features(PHOTOS[:2]), their_pipelines["base"](PHOTOS[:2]))
    other = "flax" if framework != "flax" else "pt"
    with pytest.raises(ValueError, match=f"framework={other!r} but the model is a {framework} model"):
        pipeline("image-classification", model=model, image_processor=processor, framework=other)
    with pytest.raises(ValueError, match="needs a \\*ForImageClassification model"):
        pipeline("image-classification", model=base, image_processor=processor)
    with pytest.warns(UserWarning, match="no image_processor was given with the model object"):
        default = pipeline("image-classification", model=model)
    assert default.image_processor.size == {"height": 32, "width": 32}


def test_feature_extraction_on_a_classifier_object_is_its_first_output(transformers, checkpoints) -> None:
    """transformers' feature-extraction pipeline given a classifier object returns outputs[0]: the logits."""
    import vit_torch

    processor = transformers.AutoImageProcessor.from_pretrained(checkpoints["classification"])
    their_model = transformers.ViTForImageClassification.from_pretrained(checkpoints["classification"])
    theirs = transformers.pipeline("image-feature-extraction", model=their_model, image_processor=processor)
    ours = pipeline("image-feature-extraction", image_processor=checkpoints["classification"],
                    model=vit_torch.ViTForImageClassification.from_pretrained(checkpoints["classification"]))
    expected = theirs(PHOTOS[0])
    assert np.asarray(expected).shape == (1, 7)
    assert_same_features(ours(PHOTOS[0]), expected)


# ------------------------------------------------------------------------------------- image-feature-extraction
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_feature_extraction_matches_transformers(checkpoints, their_pipelines, framework: str) -> None:
    theirs = their_pipelines["base"]
    ours = pipeline("image-feature-extraction", model=checkpoints["base"], framework=framework)
    assert isinstance(ours, ImageFeatureExtractionPipeline)
    single = ours(PHOTOS[0])
    assert np.asarray(single).shape == (1, 17, 24)  # (1, tokens, hidden) nested lists, as transformers
    assert_same_features(single, theirs(PHOTOS[0]))
    batch = ours(PHOTOS)
    assert len(batch) == 5 and np.asarray(batch[0]).shape == (1, 17, 24)
    expected = theirs(PHOTOS)
    for a, b in zip(batch, expected):
        assert_same_features(a, b)
    batched = pipeline("image-feature-extraction", model=checkpoints["base"], framework=framework, batch_size=2)
    their_batched = theirs(PHOTOS, batch_size=2)  # still (1, tokens, hidden) per image
    assert np.asarray(their_batched[4]).shape == (1, 17, 24)
    for a, b in zip(batched(PHOTOS), their_batched, strict=True):
        assert_same_features(a, b)
    pooled = ours(PHOTOS[:2], pool=True)
    assert np.asarray(pooled[0]).shape == (1, 24)
    for a, b in zip(pooled, theirs(PHOTOS[:2], pool=True)):
        assert_same_features(a, b)
    pooling = pipeline("image-feature-extraction", model=checkpoints["base"], framework=framework, pool=True,
                       batch_size=3)
    assert_same_features(pooling(PHOTOS[1]), theirs(PHOTOS[1], pool=True))
    # a classification checkpoint gives its encoder's features (transformers loads it into ViTModel)
    from_classifier = pipeline("image-feature-extraction", model=checkpoints["classification"], framework=framework)
    assert_same_features(from_classifier(PHOTOS[2]), their_pipelines["cls-features"](PHOTOS[2]))
    # processor options per call, as transformers' image_processor_kwargs
    uncropped = ours(PHOTOS[3], image_processor_kwargs={"do_center_crop": False, "size": {"height": 32, "width": 32}})
    assert_same_features(uncropped, theirs(PHOTOS[3], image_processor_kwargs={
        "do_center_crop": False, "size": {"height": 32, "width": 32}}))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_feature_extraction_return_tensors_and_no_pooler(checkpoints, their_pipelines, framework: str) -> None:
    ours = pipeline("image-feature-extraction", model=checkpoints["base"], framework=framework, return_tensors=True)
    tensor = ours(PHOTOS[0])
    module = type(tensor).__module__
    assert module.startswith({"torch": "torch", "tf": "tensorflow", "flax": "jax"}[framework]), module
    assert tuple(tensor.shape) == (1, 17, 24)
    expected = their_pipelines["base"](PHOTOS[0], return_tensors=True).numpy()
    assert float(np.abs(np.asarray(tensor) - expected).max()) <= FEATURE_ATOL
    dino = pipeline("image-feature-extraction", model=checkpoints["dino"], framework=framework)
    assert np.asarray(dino(PHOTOS[1])).shape == (1, 17, 24)
    with pytest.raises(ValueError, match="No pooled output was returned"):
        dino(PHOTOS[1], pool=True)


# ------------------------------------------------------------------------------------- hub and errors
def test_hub_id_with_the_download_replaced(monkeypatch, checkpoints, their_pipelines, tmp_path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import EntryNotFoundError

    remote = checkpoints["classification"]  # the repo's files
    snapshot = tmp_path / "snapshot"  # the local cache: a file appears there once downloaded
    snapshot.mkdir()
    requested = []

    def fake_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        requested.append((repo_id, filename, kwargs.get("revision")))
        if not (remote / filename).is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        shutil.copyfile(remote / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ours = pipeline("image-classification", model="facebook/deit-tiny-patch16-224", framework="torch",
                    revision="v1.0")
    assert ("facebook/deit-tiny-patch16-224", "config.json", "v1.0") in requested
    assert ("facebook/deit-tiny-patch16-224", "preprocessor_config.json", "v1.0") in requested
    assert isinstance(ours.image_processor, DeiTImageProcessor)
    assert_same_predictions(ours(PHOTOS[:2]), their_pipelines["classification"](PHOTOS[:2]))


def test_errors(checkpoints) -> None:
    directory = checkpoints["classification"]
    for device in ("cuda", 0, "cuda:0", "mps"):
        with pytest.raises(ValueError, match=f"device={device!r} is not supported: vitx pipelines run on the CPU"):
            pipeline("image-classification", model=directory, device=device)
    import torch

    with pytest.raises(ValueError, match="device=device\\(type='meta'\\)"):
        check_device(torch.device("meta"))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        pipeline("image-classification", model=directory, batch_size=0)
    with pytest.raises(ValueError, match="top_k must be a positive int, got -1"):
        pipeline("image-classification", model=directory, top_k=-1)
    with pytest.raises(ValueError, match="framework must be one of torch, tf, flax"):
        pipeline("image-classification", model=directory, framework="mxnet")
    with pytest.raises(ValueError, match="unsupported pipeline task 'depth-estimation'"):
        pipeline("depth-estimation", model=directory)
    with pytest.raises(ValueError, match="not an image-classification checkpoint"):
        pipeline("image-classification", model=checkpoints["dino"])
    with pytest.raises(ValueError, match="model must be a checkpoint path, a hub id or a vitx model"):
        pipeline("image-classification", model=object())
    with pytest.raises(ValueError, match="pipeline needs a task"):
        pipeline(None, model=directory)
    with pytest.warns(UserWarning, match="no fast DeiT image processor"):
        assert isinstance(pipeline("image-classification", model=directory, use_fast=True).image_processor,
                          DeiTImageProcessor)
    with pytest.raises(ValueError, match="needs model="):
        pipeline("image-feature-extraction")
    with pytest.raises(ValueError, match="pool, return_tensors and image_processor_kwargs are options of"):
        pipeline("image-classification", model=directory, pool=True)
    with pytest.raises(ValueError, match="top_k and function_to_apply are options of image-classification"):
        pipeline("image-feature-extraction", model=directory, top_k=3)
    with pytest.raises(ValueError, match="function_to_apply must be one of"):
        pipeline("image-classification", model=directory, function_to_apply="relu")
    classify = pipeline("image-classification", model=directory)
    with pytest.raises(ValueError, match="do not download images"):
        classify("https://example.com/cat.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        classify("/no/such/image.png")
    with pytest.raises(ValueError, match="without an inputs argument"):
        classify()
    assert classify([]) == []
