"""conversion in the three frameworks: converted checkpoints reproduce their source implementation,
the parity report measures and names differences, the image-classification pipeline."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from conversion import assert_parity, compare, convert, pipeline
from conversion.compare import sample_images
from vit_core.checkpoint import materialize
from conversion.frameworks import FRAMEWORKS, run_framework, unavailable

from .cases import assert_close
from .test_conversion import NPZ, SOURCES, Source

AVAILABLE = [f for f in FRAMEWORKS if unavailable(f) is None]
BOUND = 1e-5
RUN_SOURCES = [s for s in SOURCES if s.name in ("timm", "timm-no-embed-class", "jax", "jax-in21k", "big_vision")]


@pytest.mark.parametrize("framework", AVAILABLE)
@pytest.mark.parametrize("source", RUN_SOURCES, ids=lambda s: s.name)
def test_framework_reproduces_the_source_implementation(source: Source, framework: str,
                                                        tmp_path: pathlib.Path) -> None:
    """timm's forward (timm files; timm's own npz loader for JAX / big_vision) vs vitx's model in each
    framework, loaded from the converted checkpoint: every hidden state and the logits at 1e-5."""
    converted = convert(source.resolve(tmp_path), tmp_path / "converted", to="safetensors")
    from conversion import open_checkpoint

    loaded = open_checkpoint(converted.path)
    oracle = np.load(source.outputs)
    run = run_framework(framework, materialize(loaded.state), loaded.task, oracle["pixel_values"],
                        hidden_states=True, config=loaded.config)
    expected = {f"hidden_states[{i}]": oracle[f"{source.oracle}/hidden_states_{i}"] for i in range(3)}
    expected["logits" if source.task == "classification" else "last_hidden_state"] = (
        oracle[f"{source.oracle}/logits" if source.task == "classification" else f"{source.oracle}/last_hidden_state"])
    diffs = {k: float(np.max(np.abs(run.outputs[k] - v))) for k, v in expected.items()}
    assert_close(diffs, BOUND, what=f"{source.name} in {framework}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return convert(NPZ / "jax.npz", tmp_path_factory.mktemp("tiny") / "tiny", to="safetensors").path


def test_compare_all_frameworks_and_reference(tiny: pathlib.Path) -> None:
    report = compare(tiny, frameworks=tuple(AVAILABLE) + ("reference",), layers=True)
    assert report.ok, report.to_table()
    assert report.frameworks == AVAILABLE + ["reference"] and report.atol == 1e-5
    n = len(report.frameworks)
    assert len({r.pair for r in report.results}) == n * (n - 1) // 2
    outputs = {r.output for r in report.results}
    assert outputs == {"logits"} | {f"hidden_states[{i}]" for i in range(3)}
    assert all(v is None for v in report.first_diverging.values())
    assert all(0 <= r.max_abs_diff <= 1e-5 for r in report.results)
    assert len(set(map(tuple, report.top1.values()))) == 1  # same top-1 labels everywhere
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["model"] == "ViTForImageClassification" and data["source_format"] == "transformers"
    assert {"pair", "a", "b", "output", "max_abs_diff", "atol", "ok"} <= set(data["results"][0])
    table = report.to_table()
    assert "| logits |" in table and "**PASS**" in table


def test_compare_catches_a_corrupted_weight_and_names_the_layer(tiny: pathlib.Path) -> None:
    framework = AVAILABLE[-1] if AVAILABLE else "reference"
    others = [f for f in AVAILABLE if f != framework] + ["reference"]
    report = compare(tiny, frameworks=others + [framework], layers=True,
                     perturb={framework: "vit.encoder.layer.1.output.dense.bias=0.01"})
    assert not report.ok
    bad = [r for r in report.results if not r.ok]
    assert bad and all(framework in (r.a, r.b) for r in bad)
    # layer 1's output is hidden_states[2]; hidden_states[0..1] still agree
    for pair, layer in report.first_diverging.items():
        assert (layer is not None and layer.startswith("hidden_states[2]")) == (framework in pair), (pair, layer)
    assert "FAIL" in report.to_table()


def test_assert_parity_helper(tiny: pathlib.Path) -> None:
    report = assert_parity(tiny, frameworks=tuple(AVAILABLE[:1]) + ("reference",))
    assert report.ok
    with pytest.raises(AssertionError, match="FAIL"):
        assert_parity(tiny, atol=1e-30, frameworks=("reference",) + tuple(AVAILABLE[:1]))
    with pytest.raises(AssertionError, match="parity needs 2 frameworks"):
        assert_parity(tiny, frameworks=("reference",))


def test_compare_rejects_unknown_framework_and_perturb_key(tiny: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unknown framework"):
        compare(tiny, frameworks=("torch", "mxnet"))
    with pytest.raises(ValueError, match="not a weight"):
        compare(tiny, frameworks=("reference",), perturb={"reference": "no.such.key"})


@pytest.mark.parametrize("framework", AVAILABLE)
def test_pipeline_image_classification(tiny: pathlib.Path, framework: str) -> None:
    classify = pipeline("image-classification", model=tiny, framework=framework, top_k=3)
    photos = sample_images()
    single = classify(photos[0])
    assert isinstance(single, list) and len(single) == 3 and set(single[0]) == {"label", "score"}
    scores = [p["score"] for p in single]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-9
    batch = classify([str(p) for p in photos], top_k=5)
    assert len(batch) == len(photos) and all(len(b) == 5 for b in batch)
    assert abs(sum(p["score"] for p in batch[0]) - 1.0) < 1e-6  # 5 labels: the whole distribution
    with Image.open(photos[0]) as im:
        as_pil = classify(im.convert("RGB"))
        as_array = classify(np.asarray(im.convert("RGB")))
    for a, b in zip(as_pil, single):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-6
    assert [p["label"] for p in as_array] == [p["label"] for p in single]
    reference = pipeline("image-classification", model=tiny, framework=AVAILABLE[0], top_k=3)(photos[0])
    assert [p["label"] for p in reference] == [p["label"] for p in single]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(reference, single)) < 1e-5


def test_pipeline_errors(tiny: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unsupported pipeline task"):
        pipeline("object-detection", model=tiny)
    with pytest.raises(ValueError, match="framework must be one of"):
        pipeline("image-classification", model=tiny, framework="mxnet")
    if AVAILABLE:
        with pytest.raises(ValueError, match="not an image-classification checkpoint"):
            pipeline("image-classification", model=NPZ / "jax_in21k.npz", framework=AVAILABLE[0])
        classify = pipeline("image-classification", model=tiny, framework=AVAILABLE[0])
        with pytest.raises(FileNotFoundError, match="does not exist"):
            classify("/no/such/image.png")
