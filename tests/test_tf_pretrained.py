"""vit_tf checkpoints: from_pretrained / save_pretrained across every file kind, transformers (PyTorch
and TF) as the oracle writer and reader, SavedModel export, and ViT-B/16 on real photos.

Every loaded model is checked by its outputs (docs/NUMERICS.md bound 1e-5 against another framework;
bitwise against itself), never only by "it loaded".
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import vit_tf  # noqa: E402
from vit_core import checkpoint as ckpt  # noqa: E402
from vit_core.checkpoint import CheckpointError  # noqa: E402
from vit_core.reference import backbone as reference_backbone  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_tf import (  # noqa: E402
    TFViTForImageClassification,
    TFViTForMaskedImageModeling,
    TFViTModel,
    ViTConfig,
    canonical_state,
    load_canonical_state,
)

from .cases import Case, make_inputs, make_state  # noqa: E402
from .backends import import_blocker  # noqa: E402

SMALL = TOLERANCES["small"]
BASE_REAL = TOLERANCES["base_real_images"]
FIXTURE_IMAGES = pathlib.Path(__file__).parent / "fixtures" / "images"

tf.config.experimental.enable_tensor_float_32_execution(False)

CLS = Case("cls", task="classification")
MIM = Case("mim-masked", task="mim", bool_masked_pos=True)
BASE = Case("tiny")
MAIN_OUTPUT = {"base": "last_hidden_state", "classification": "logits", "mim": "reconstruction"}
TF_CLASSES = {"base": TFViTModel, "classification": TFViTForImageClassification, "mim": TFViTForMaskedImageModeling}
PT_CLASS_NAMES = {"base": "ViTModel", "classification": "ViTForImageClassification",
                  "mim": "ViTForMaskedImageModeling"}


def tf_model(case: Case, **kwargs: Any) -> vit_tf.TFViTPreTrainedModel:
    model = TF_CLASSES[case.task](case.vit_config, seed=0, **kwargs)
    load_canonical_state(model, make_state(case))
    return model


def run(model: Any, case: Case) -> np.ndarray:
    """The case's main output of a vit_tf model as float64 numpy."""
    return np.asarray(tf.cast(model(**make_inputs(case))[MAIN_OUTPUT[case.task]], tf.float64))


def transformers_pt(case: Case, state: dict[str, np.ndarray] | None = None) -> Any:
    """transformers' PyTorch model of the case with the case's weights (eval)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = getattr(transformers, PT_CLASS_NAMES[case.task])(transformers.ViTConfig(**case.vit_config.to_dict()))
    state = make_state(case) if state is None else state
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()


def run_pt(model: Any, case: Case) -> np.ndarray:
    torch = pytest.importorskip("torch")
    inputs = {k: torch.from_numpy(v) for k, v in make_inputs(case).items()}
    with torch.no_grad():
        return model(**inputs)[MAIN_OUTPUT[case.task]].double().numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------ save_pretrained
@pytest.mark.parametrize("case", [BASE, CLS, MIM], ids=lambda c: c.task)
def test_save_pretrained_writes_the_canonical_files_and_round_trips(case: Case, tmp_path: pathlib.Path) -> None:
    """config.json + model.safetensors with the canonical PyTorch names and layouts; loading it back
    gives the same weights (bitwise) and the same outputs (bitwise)."""
    from safetensors import safe_open

    model = tf_model(case)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == [PT_CLASS_NAMES[case.task]]
    assert config["torch_dtype"] == "float32"
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        saved = {k: f.get_tensor(k) for k in f.keys()}
    state = make_state(case)
    assert set(saved) == set(state)
    assert all(np.array_equal(saved[k], state[k]) for k in state)
    back = TF_CLASSES[case.task].from_pretrained(tmp_path)
    assert all(np.array_equal(v, state[k]) for k, v in canonical_state(back).items())
    assert np.array_equal(run(back, case), run(model, case))


@pytest.mark.parametrize("case", [BASE, CLS, MIM], ids=lambda c: c.task)
def test_saved_directory_loads_in_transformers_pytorch(case: Case, tmp_path: pathlib.Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    model = tf_model(case)
    model.save_pretrained(tmp_path)
    theirs = getattr(transformers, PT_CLASS_NAMES[case.task]).from_pretrained(tmp_path).eval()
    diff = max_diff(run_pt(theirs, case), run(model, case))
    assert diff < SMALL, f"{case.task}: transformers PT on vit_tf's files differs by {diff:.2e}"


@pytest.mark.parametrize("case", [BASE, CLS, MIM], ids=lambda c: c.task)
def test_saved_directory_loads_in_vit_torch(case: Case, tmp_path: pathlib.Path) -> None:
    pytest.importorskip("torch")
    vit_torch = pytest.importorskip("vit_torch")
    model = tf_model(case)
    model.save_pretrained(tmp_path)
    theirs = getattr(vit_torch, PT_CLASS_NAMES[case.task]).from_pretrained(tmp_path)
    diff = max_diff(run_pt(theirs, case), run(model, case))
    assert diff < SMALL, f"{case.task}: vit_torch on vit_tf's files differs by {diff:.2e}"


def test_sharded_save_round_trips(tmp_path: pathlib.Path) -> None:
    model = tf_model(CLS)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert np.array_equal(run(TFViTForImageClassification.from_pretrained(tmp_path), CLS), run(model, CLS))


# ------------------------------------------------------------------------------ reading transformers' files
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("case", [BASE, CLS, MIM], ids=lambda c: c.task)
def test_transformers_pytorch_checkpoint_loads(case: Case, safe: bool, tmp_path: pathlib.Path) -> None:
    theirs = transformers_pt(case)
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    ours = TF_CLASSES[case.task].from_pretrained(tmp_path)
    diff = max_diff(run(ours, case), run_pt(theirs, case))
    assert diff < SMALL, f"{case.task}: differs from transformers PT by {diff:.2e}"


def test_pytorch_bin_loads_without_torch(tmp_path: pathlib.Path) -> None:
    """pytorch_model.bin goes through vit_core's restricted numpy reader: torch stays unimported
    (and cannot be imported) in the loading process."""
    transformers_pt(CLS).save_pretrained(tmp_path, safe_serialization=False)
    np.save(tmp_path / "x.npy", make_inputs(CLS)["pixel_values"])
    code = (
        import_blocker("torch") +
        "import numpy as np, vit_tf\n"
        f"m = vit_tf.TFViTForImageClassification.from_pretrained({str(tmp_path)!r})\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, m(np.load({str(tmp_path / 'x.npy')!r})).logits.numpy())\n"
        "print('torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=pathlib.Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert max_diff(np.load(tmp_path / "logits.npy"), run(tf_model(CLS), CLS)) < SMALL


@pytest.mark.parametrize("safe", [False, True], ids=["tf_model.h5", "tf-safetensors"])
def test_transformers_tf_checkpoint_loads(safe: bool, tmp_path: pathlib.Path) -> None:
    """A tf_model.h5 (and TF-flavoured safetensors) written by transformers 4.57.6's
    TFViTForImageClassification: same logits as that TF model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    pytest.importorskip("tf_keras")
    transformers_pt(CLS).save_pretrained(tmp_path / "pt")
    theirs = transformers.TFViTForImageClassification.from_pretrained(tmp_path / "pt", from_pt=True)
    theirs.save_pretrained(tmp_path / "tf", safe_serialization=safe)
    assert (tmp_path / "tf" / ("model.safetensors" if safe else "tf_model.h5")).exists()
    ours = TFViTForImageClassification.from_pretrained(tmp_path / "tf")
    expected = theirs(pixel_values=make_inputs(CLS)["pixel_values"], training=False).logits.numpy()
    diff = max_diff(run(ours, CLS), expected)
    assert diff < SMALL, f"differs from transformers TF by {diff:.2e}"


def test_transformers_flax_checkpoints_load(tmp_path: pathlib.Path) -> None:
    """flax_model.msgpack and Flax-flavoured safetensors written by transformers 4.57.6's
    FlaxViTForImageClassification: the same weights, bit for bit."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    pytest.importorskip("flax")
    transformers_pt(CLS).save_pretrained(tmp_path / "pt")
    theirs = transformers.FlaxViTForImageClassification.from_pretrained(tmp_path / "pt", from_pt=True)
    theirs.save_pretrained(tmp_path / "msgpack")
    theirs.save_pretrained(tmp_path / "safetensors", safe_serialization=True)
    assert (tmp_path / "msgpack" / "flax_model.msgpack").exists()
    state = make_state(CLS)
    for kind in ("msgpack", "safetensors"):
        ours = TFViTForImageClassification.from_pretrained(tmp_path / kind)
        assert all(np.array_equal(v, state[k]) for k, v in canonical_state(ours).items()), kind


@pytest.mark.parametrize("kind", ["flax_model.msgpack", "new-names-safetensors", "tf_model.h5-written-here"])
def test_other_file_kinds_load(kind: str, tmp_path: pathlib.Path) -> None:
    """Flax msgpack, transformers 5.9+ key names, and an h5 written by vit_core: identical weights."""
    state = make_state(CLS)
    CLS.vit_config.save_pretrained(tmp_path)
    if kind == "flax_model.msgpack":
        ckpt.write_flax_msgpack(state, tmp_path / kind)
    elif kind == "new-names-safetensors":
        from safetensors.numpy import save_file

        save_file(ckpt.to_new_names(state), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    else:
        ckpt.write_tf_h5(state, tmp_path / "tf_model.h5")
    ours = TFViTForImageClassification.from_pretrained(tmp_path)
    assert all(np.array_equal(v, state[k]) for k, v in canonical_state(ours).items())


# ------------------------------------------------------------------------------ fitting checkpoints to models
def test_base_checkpoint_into_classifier_and_back(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """As transformers: a backbone checkpoint gives a classifier with a fresh (warned) head; a
    classifier checkpoint gives a backbone without its head."""
    base = tf_model(BASE)
    base.save_pretrained(tmp_path / "base")
    with caplog.at_level(logging.WARNING, logger="vitx"):
        cls = TFViTForImageClassification.from_pretrained(tmp_path / "base", seed=1)
    assert "classifier.weight" in caplog.text
    cls_state, base_state = canonical_state(cls), canonical_state(base)
    assert np.array_equal(cls_state["vit.encoder.layer.1.output.dense.weight"],
                          base_state["encoder.layer.1.output.dense.weight"])
    assert not cls_state["classifier.bias"].any() and cls_state["classifier.weight"].std() > 0
    tf_model(CLS).save_pretrained(tmp_path / "cls")
    back = TFViTModel.from_pretrained(tmp_path / "cls", add_pooling_layer=False)
    expected = np.asarray(tf_model(CLS).vit(make_inputs(CLS)["pixel_values"]).last_hidden_state)
    assert np.array_equal(np.asarray(back(make_inputs(CLS)["pixel_values"]).last_hidden_state), expected)


def test_num_labels_override_needs_ignore_mismatched_sizes(tmp_path: pathlib.Path) -> None:
    tf_model(CLS).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"classifier\.weight: file \(5, 32\) vs model \(10, 32\)"):
        TFViTForImageClassification.from_pretrained(tmp_path, num_labels=10)
    model = TFViTForImageClassification.from_pretrained(tmp_path, num_labels=10, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 10 and model(make_inputs(CLS)["pixel_values"]).logits.shape == (3, 10)
    assert np.array_equal(canonical_state(model)["vit.layernorm.weight"], make_state(CLS)["vit.layernorm.weight"])


def test_missing_checkpoint_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises((CheckpointError, FileNotFoundError), match="nowhere"):
        TFViTModel.from_pretrained(tmp_path / "nowhere", local_files_only=True)


def test_from_pt_and_config_arguments(tmp_path: pathlib.Path) -> None:
    """transformers' ``from_pt=True`` is accepted (the kind is read from the files); ``config=``
    replaces config.json."""
    tf_model(CLS).save_pretrained(tmp_path)
    model = TFViTForImageClassification.from_pretrained(tmp_path, from_pt=True, config=CLS.vit_config)
    assert np.array_equal(run(model, CLS), run(tf_model(CLS), CLS))


# ------------------------------------------------------------------------------ reduced precision
def test_bfloat16_from_pretrained_and_save(tmp_path: pathlib.Path) -> None:
    tf_model(CLS).save_pretrained(tmp_path / "f32")
    model = TFViTForImageClassification.from_pretrained(tmp_path / "f32", dtype="bfloat16")
    assert {v.dtype for v in model.trainable_weights} == {"bfloat16"}
    assert max_diff(run(model, CLS), run(tf_model(CLS), CLS)) < TOLERANCES["bfloat16_vs_float32_logits"]
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = TFViTForImageClassification.from_pretrained(tmp_path / "bf16", dtype="auto")  # config.json says bfloat16
    a, b = canonical_state(model), canonical_state(again)
    assert all(a[k].dtype.name == "bfloat16" and np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


# ------------------------------------------------------------------------------ SavedModel
@pytest.mark.parametrize("case", [CLS, BASE, MIM], ids=lambda c: c.task)
def test_export_saved_model_round_trip(case: Case, tmp_path: pathlib.Path) -> None:
    """A SavedModel with a dynamic batch: reloaded with tf.saved_model.load, batch 1 and 3 give the
    eager model's outputs."""
    model = tf_model(case)
    model.export_saved_model(tmp_path / "saved")
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    signature = loaded.signatures["serving_default"]
    x = make_inputs(case)["pixel_values"]
    eager = model(x)
    for batch in (1, 3):
        out = loaded.serve(tf.constant(x[:batch]))
        for key, value in out.items():
            assert max_diff(value.numpy(), eager[key].numpy()[:batch]) < SMALL, (key, batch)
        by_signature = signature(pixel_values=tf.constant(x[:batch]))
        assert set(by_signature) == set(out)
        assert np.array_equal(by_signature[MAIN_OUTPUT[case.task]].numpy(), out[MAIN_OUTPUT[case.task]].numpy())
    if case.task == "base":
        assert set(out) == {"last_hidden_state", "pooler_output"}


# ------------------------------------------------------------------------------ ViT-B/16 on real photos
@pytest.mark.slow
def test_vit_base_on_real_photos_matches_reference_and_transformers() -> None:
    """Seeded ViT-B/16 at 224 on two bundled photos: logits and last_hidden_state vs the float64
    reference (first photo) and transformers' PyTorch ViT within the docs/NUMERICS.md real-image bound
    (1e-4); the fused and eager attention paths within 1e-5."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from vit_core import ViTImageProcessor

    images = [Image.open(FIXTURE_IMAGES / name) for name in ("chelsea.png", "rocket.jpg")]
    pixel_values = ViTImageProcessor()(images, return_tensors="np")["pixel_values"]
    config = ViTConfig.from_variant("B/16", num_labels=1000)
    model = TFViTForImageClassification(config, seed=0)
    last = model.vit(pixel_values).last_hidden_state  # what model(pixel_values) computes, then its classifier
    got_last, got_logits = last.numpy(), model.classifier(last[:, 0]).numpy()
    state = canonical_state(model)
    # the float64 reference is slow on CPU (~10 s an image): the first photo only
    ref = reference_backbone(state, config, pixel_values[:1].astype(np.float64), prefix="vit.")["last_hidden_state"]
    ref_logits = ref[:, 0] @ state["classifier.weight"].T.astype(np.float64) + state["classifier.bias"]
    for name, got, expected in (("logits", got_logits[:1], ref_logits), ("last_hidden_state", got_last[:1], ref)):
        diff = max_diff(got, expected)
        assert diff <= BASE_REAL, f"{name} differs from the float64 reference by {diff:.3e}"
        print(f"ViT-B/16 vs float64 reference: {name} {diff:.2e}")
    with torch.device("meta"):
        theirs = transformers.ViTForImageClassification(transformers.ViTConfig(**config.to_dict()))
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
    with torch.no_grad():
        their_last = theirs.eval().vit(torch.from_numpy(pixel_values)).last_hidden_state
        their_logits = theirs.classifier(their_last[:, 0]).numpy()
    for name, got, expected in (("logits", got_logits, their_logits), ("last_hidden_state", got_last, their_last.numpy())):
        diff = max_diff(got, expected)
        assert diff <= BASE_REAL, f"{name} differs from transformers PT by {diff:.3e}"
        print(f"ViT-B/16 vs transformers PT: {name} {diff:.2e}")
    eager = model(pixel_values, output_attentions=True).logits.numpy()
    diff = max_diff(eager, got_logits)
    assert diff <= TOLERANCES["fused_vs_eager_float32"], f"fused vs eager logits {diff:.3e}"
    print(f"ViT-B/16 fused vs eager: logits {diff:.2e}")
