"""vit_flax checkpoints: save_pretrained / from_pretrained across formats, frameworks and transformers.

One saved directory loads in every framework and in transformers; what transformers 4.57.6
writes (PyTorch safetensors / bin, Flax msgpack / safetensors, TF h5 / safetensors), what
vit_torch and vit_tf write and the 5.9+ names load here. Plus the head rules of from_pretrained
(base <-> task checkpoints, ignore_mismatched_sizes), dtypes, and a seeded ViT-B/16 on real photos.
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

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from vit_core.checkpoint import CheckpointError, to_new_names  # noqa: E402
from vit_core.reference import forward as reference_forward  # noqa: E402
from vit_core.reference import layer_norm as reference_layer_norm  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_core.weights import weight_table  # noqa: E402
from vit_flax import (  # noqa: E402
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
    ViTConfig,
    canonical_state,
    load_canonical_state,
)

from .cases import TINY  # noqa: E402
from .backends import import_blocker  # noqa: E402

SMALL = TOLERANCES["small"]
BASE_REAL = TOLERANCES["base_real_images"]
REPO = pathlib.Path(__file__).parent.parent
FIXTURE_IMAGES = pathlib.Path(__file__).parent / "fixtures" / "images"
TASKS = {"base": FlaxViTModel, "classification": FlaxViTForImageClassification, "mim": FlaxViTForMaskedImageModeling}


@pytest.fixture(autouse=True)
def _pin_precision() -> Any:
    with jax.default_matmul_precision("highest"):
        yield


# ------------------------------------------------------------------------------ helpers
def seeded_state(task: str, seed: int = 0, **config: Any) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """A canonical state with non-trivial norms and biases (a swapped weight/bias cannot pass)."""
    cfg = ViTConfig(**{**TINY, **config})
    rng = np.random.default_rng(seed)
    state = {}
    for spec in weight_table(cfg, task):
        if spec.kind == "norm":
            value = 1.0 + 0.1 * rng.standard_normal(spec.shape)
        elif spec.kind == "bias":
            value = 0.05 * rng.standard_normal(spec.shape)
        else:
            value = 0.1 * rng.standard_normal(spec.shape)
        state[spec.name] = value.astype(np.float32)
    return cfg, state


def seeded_model(task: str, seed: int = 0, **config: Any) -> Any:
    cfg, state = seeded_state(task, seed, **config)
    model = TASKS[task](cfg, _do_init=False)
    load_canonical_state(model, state)
    return model


def pixels(batch: int = 2, seed: int = 1, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def main_output(out: Any) -> np.ndarray:
    for key in ("logits", "reconstruction", "last_hidden_state"):
        if key in out:
            return np.asarray(out[key])
    raise AssertionError(f"no main output in {list(out)}")


def assert_same_state(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(expected), f"{what}: keys differ: {sorted(set(got) ^ set(expected))}"
    for name, value in expected.items():
        assert got[name].shape == value.shape, f"{what}: {name} shape {got[name].shape} != {value.shape}"
        assert np.array_equal(got[name], value), f"{what}: {name} differs by {np.abs(got[name] - value).max():.3e}"


@pytest.fixture(scope="module")
def transformers() -> Any:
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def their_pt_model(transformers: Any, task: str, config: ViTConfig, state: dict[str, np.ndarray]) -> Any:
    import torch

    theirs_config = transformers.ViTConfig(**config.to_dict())
    cls = {"base": transformers.ViTModel, "classification": transformers.ViTForImageClassification,
           "mim": transformers.ViTForMaskedImageModeling}[task]
    model = cls(theirs_config)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    return model.eval()


def their_output(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return main_output({k: v.numpy() for k, v in out.items()})


# ------------------------------------------------------------------------------ our own files
@pytest.mark.parametrize("task", list(TASKS))
def test_directory_round_trip_is_bitwise(tmp_path: pathlib.Path, task: str) -> None:
    """save_pretrained writes config.json + model.safetensors in canonical names and PyTorch layouts;
    from_pretrained gives back the same parameters bit for bit and the same outputs."""
    from safetensors.numpy import load_file

    model = seeded_model(task)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    on_disk = load_file(tmp_path / "model.safetensors")
    assert_same_state(on_disk, canonical_state(model), f"{task} file")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == [type(model).__name__.removeprefix("Flax")]
    back = TASKS[task].from_pretrained(tmp_path)
    assert_same_state(canonical_state(back), canonical_state(model), f"{task} reload")
    x = pixels()
    assert np.array_equal(main_output(back(x)), main_output(model(x)))


def test_save_pretrained_transformers_flax_arguments(tmp_path: pathlib.Path) -> None:
    """save_pretrained(dir, params=...) saves those values (the model keeps its own);
    safe_serialization=False writes flax_model.msgpack, as transformers (tests/test_compat.py)."""
    model = seeded_model("classification")
    halved = jax.tree_util.tree_map(lambda a: a * 0.5, model.params)
    model.save_pretrained(tmp_path, params=halved)
    saved = canonical_state(FlaxViTForImageClassification.from_pretrained(tmp_path))
    own = canonical_state(model)
    assert all(np.array_equal(saved[k], own[k] * np.float32(0.5)) for k in own)
    model.save_pretrained(tmp_path / "msgpack", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "msgpack").iterdir()) == ["config.json", "flax_model.msgpack"]


def test_sharded_save_loads(tmp_path: pathlib.Path) -> None:
    model = seeded_model("classification")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    back = FlaxViTForImageClassification.from_pretrained(tmp_path)
    assert_same_state(canonical_state(back), canonical_state(model), "sharded")


@pytest.mark.parametrize("task", list(TASKS))
def test_saved_directory_loads_in_transformers_pytorch(tmp_path: pathlib.Path, transformers: Any, task: str) -> None:
    """vit_flax save -> transformers' PyTorch from_pretrained (nothing missing) -> the same outputs."""
    model = seeded_model(task)
    model.save_pretrained(tmp_path)
    cls = {"base": transformers.ViTModel, "classification": transformers.ViTForImageClassification,
           "mim": transformers.ViTForMaskedImageModeling}[task]
    theirs, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if "mask_token" not in k]  # ViTModel has no mask token by default
    assert not missing and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = pixels()
    diff = np.abs(their_output(theirs.eval(), x) - main_output(model(x))).max()
    assert diff <= SMALL, f"{task}: transformers PyTorch differs by {diff:.3e}"


# ------------------------------------------------------------------------------ transformers' files
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("task", ["classification", "mim"])
def test_transformers_pytorch_dirs_load(tmp_path: pathlib.Path, transformers: Any, task: str, safe: bool) -> None:
    config, state = seeded_state(task)
    theirs = their_pt_model(transformers, task, config, state)
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    ours = TASKS[task].from_pretrained(tmp_path)
    assert_same_state(canonical_state(ours), state, f"{task} from transformers")
    x = pixels()
    diff = np.abs(their_output(theirs, x) - main_output(ours(x))).max()
    assert diff <= SMALL, f"{task}: differs from transformers PyTorch by {diff:.3e}"


def test_pytorch_bin_loads_without_torch(tmp_path: pathlib.Path, transformers: Any) -> None:
    """pytorch_model.bin is read by vit_core's restricted numpy reader: torch is never imported."""
    config, state = seeded_state("classification")
    their_pt_model(transformers, "classification", config, state).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists()
    code = (import_blocker("torch") +
            "import numpy as np, vit_flax\n"
            f"m = vit_flax.FlaxViTForImageClassification.from_pretrained({str(tmp_path)!r})\n"
            "s = vit_flax.canonical_state(m)\n"
            f"np.savez({str(tmp_path / 'state.npz')!r}, **s)\n"
            "print(sorted(k for k in ('torch', 'tensorflow') if sys.modules.get(k) is not None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    with np.load(tmp_path / "state.npz") as loaded:
        assert_same_state(dict(loaded), state, "bin without torch")


def _nested_params(model: Any) -> dict[str, Any]:
    from flax.traverse_util import unflatten_dict

    return unflatten_dict({tuple(str(p) for p in path): np.asarray(v[...])
                           for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})


@pytest.mark.parametrize("safe", [False, True], ids=["flax_model.msgpack", "flax-safetensors"])
@pytest.mark.parametrize("task", ["base", "classification"])
def test_transformers_flax_files_load(tmp_path: pathlib.Path, transformers: Any, task: str, safe: bool) -> None:
    """flax_model.msgpack (and Flax safetensors) written by transformers 4.57.6's FlaxViT* load bitwise,
    and the loaded model matches transformers' Flax outputs."""
    model = seeded_model(task)
    theirs_config = transformers.ViTConfig(**model.config.to_dict())
    cls = transformers.FlaxViTModel if task == "base" else transformers.FlaxViTForImageClassification
    theirs = cls(theirs_config, _do_init=False)
    params = _nested_params(model)
    theirs.save_pretrained(tmp_path, params=params, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "flax_model.msgpack")).exists()
    back = TASKS[task].from_pretrained(tmp_path)
    assert_same_state(canonical_state(back), canonical_state(model), f"{task} flax {safe}")
    x = pixels()
    expected = main_output({k: np.asarray(v) for k, v in theirs(x, params=params).items()})
    diff = np.abs(expected - main_output(back(x))).max()
    assert diff <= SMALL, f"{task}: differs from transformers Flax by {diff:.3e}"


@pytest.mark.parametrize("safe", [False, True], ids=["tf_model.h5", "tf-safetensors"])
def test_transformers_tf_files_load(tmp_path: pathlib.Path, transformers: Any, safe: bool) -> None:
    """tf_model.h5 / TF safetensors written by transformers 4.57.6's TFViTForImageClassification load bitwise."""
    pytest.importorskip("tensorflow")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers' TF models need tf-keras
    pytest.importorskip("tf_keras")
    config, state = seeded_state("classification")
    their_pt_model(transformers, "classification", config, state).save_pretrained(tmp_path / "pt")
    theirs_tf = transformers.TFViTForImageClassification.from_pretrained(tmp_path / "pt", from_pt=True)
    theirs_tf.save_pretrained(tmp_path / "tf", safe_serialization=safe)
    assert (tmp_path / "tf" / ("model.safetensors" if safe else "tf_model.h5")).exists()
    ours = FlaxViTForImageClassification.from_pretrained(tmp_path / "tf")
    assert_same_state(canonical_state(ours), state, f"tf {safe}")


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_transformers_5_names_load(tmp_path: pathlib.Path, writer: str) -> None:
    """A state_dict in transformers 5.9+ names (layers.N.attention.q_proj, mlp.fc1, ...) loads."""
    config, state = seeded_state("classification")
    renamed = to_new_names(state)
    assert any(".layers.0.attention.q_proj." in k for k in renamed)
    config.save_pretrained(tmp_path)
    if writer == "safetensors":
        from safetensors.numpy import save_file

        save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(v) for k, v in renamed.items()}, tmp_path / "pytorch_model.bin")
    ours = FlaxViTForImageClassification.from_pretrained(tmp_path)
    assert_same_state(canonical_state(ours), state, f"5.x names ({writer})")


# ------------------------------------------------------------------------------ vit_torch and vit_tf files
@pytest.mark.parametrize("framework", ["torch", "tf"])
@pytest.mark.parametrize("task", ["classification", "mim"])
def test_other_frameworks_saves_load(tmp_path: pathlib.Path, framework: str, task: str) -> None:
    """A directory saved by vit_torch / vit_tf loads bitwise here, with the same outputs (1e-5)."""
    config, state = seeded_state(task)
    x = pixels()
    if framework == "torch":
        torch = pytest.importorskip("torch")
        vit_torch = pytest.importorskip("vit_torch")
        cls = {"classification": vit_torch.ViTForImageClassification, "mim": vit_torch.ViTForMaskedImageModeling}[task]
        other = cls(config)
        vit_torch.load_canonical_state(other, state)
        with torch.no_grad():
            expected = main_output({k: v.numpy() for k, v in other.eval()(torch.from_numpy(x)).items()})
    else:
        vit_tf = pytest.importorskip("vit_tf")
        cls = {"classification": vit_tf.TFViTForImageClassification, "mim": vit_tf.TFViTForMaskedImageModeling}[task]
        other = cls(config)
        vit_tf.load_canonical_state(other, state)
        expected = main_output({k: np.asarray(v) for k, v in other(x, training=False).items()})
    other.save_pretrained(tmp_path)
    ours = TASKS[task].from_pretrained(tmp_path)
    assert_same_state(canonical_state(ours), state, f"vit_{framework} {task}")
    diff = np.abs(expected - main_output(ours(x))).max()
    assert diff <= SMALL, f"vit_{framework} {task}: outputs differ by {diff:.3e}"


# ------------------------------------------------------------------------------ heads and options
def test_base_checkpoint_into_task_models(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """A ViTModel checkpoint (with pooler) loads into the task models: backbone copied, heads newly
    initialised from the table (seeded), the pooler dropped; each logged."""
    base = seeded_model("base")
    base.save_pretrained(tmp_path)
    backbone = {f"vit.{k}": v for k, v in canonical_state(base).items() if not k.startswith("pooler.")}
    with caplog.at_level(logging.WARNING):
        cls = FlaxViTForImageClassification.from_pretrained(tmp_path, seed=5)
    state = canonical_state(cls)
    assert_same_state({k: v for k, v in state.items() if k.startswith("vit.")}, backbone, "backbone")
    assert not state["classifier.bias"].any() and 0 < np.abs(state["classifier.weight"]).max() <= 2 * 0.02 + 1e-7
    assert "classifier.weight" in caplog.text and "pooler" in caplog.text
    again = canonical_state(FlaxViTForImageClassification.from_pretrained(tmp_path, seed=5))
    assert np.array_equal(again["classifier.weight"], state["classifier.weight"]), "head init is not seeded"
    mim = canonical_state(FlaxViTForMaskedImageModeling.from_pretrained(tmp_path))
    assert not mim["vit.embeddings.mask_token"].any() and mim["decoder.0.weight"].shape == (8 * 8 * 3, 32, 1, 1)


def test_task_checkpoint_into_base_model(tmp_path: pathlib.Path) -> None:
    model = seeded_model("classification")
    model.save_pretrained(tmp_path)
    base = FlaxViTModel.from_pretrained(tmp_path, add_pooling_layer=False)
    expected = {k.removeprefix("vit."): v for k, v in canonical_state(model).items() if k.startswith("vit.")}
    assert_same_state(canonical_state(base), expected, "base from classifier")
    x = pixels()
    np.testing.assert_array_equal(np.asarray(base(x).last_hidden_state[:, 0]),
                                  np.asarray(model.vit(x).last_hidden_state[:, 0]))
    with_pool = canonical_state(FlaxViTModel.from_pretrained(tmp_path, use_mask_token=True))
    assert "pooler.dense.weight" in with_pool and not with_pool["embeddings.mask_token"].any()


def test_num_labels_override_and_ignore_mismatched_sizes(tmp_path: pathlib.Path) -> None:
    seeded_model("classification").save_pretrained(tmp_path)  # 5 labels
    with pytest.raises(CheckpointError) as info:
        FlaxViTForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert "classifier.weight: file (5, 32) vs model (3, 32)" in str(info.value)
    assert "classifier.bias: file (5,) vs model (3,)" in str(info.value)
    model = FlaxViTForImageClassification.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3 and model(pixels()).logits.shape == (2, 3)


def test_strict_errors_list_every_bad_key(tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    config, state = seeded_state("classification")
    del state["vit.encoder.layer.1.output.dense.weight"]
    state["vit.encoder.layer.0.attention.attention.query.weight"] = np.zeros((32, 31), np.float32)
    state["vit.extra.weight"] = np.zeros(3, np.float32)
    config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        FlaxViTForImageClassification.from_pretrained(tmp_path)
    message = str(info.value)
    for expected in ("vit.encoder.layer.1.output.dense.weight (32, 37)", "vit.extra.weight (3,)",
                     "vit.encoder.layer.0.attention.attention.query.weight: file (32, 31) vs model (32, 32)"):
        assert expected in message, message
    with pytest.raises(FileNotFoundError):
        FlaxViTForImageClassification.from_pretrained(tmp_path / "nothing-here", local_files_only=True)


def test_from_pretrained_dtypes_and_options(tmp_path: pathlib.Path) -> None:
    model = seeded_model("classification")
    model.save_pretrained(tmp_path)
    half = FlaxViTForImageClassification.from_pretrained(tmp_path, dtype="bfloat16", param_dtype=jnp.bfloat16,
                                                         attn_implementation="eager")
    assert half.attn_implementation == "eager"
    assert {p.dtype for p in jax.tree_util.tree_leaves(nnx.state(half, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    x = pixels()
    assert half(x).logits.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(half(x).logits).argmax(-1), np.asarray(model(x).logits).argmax(-1))
    compute_only = FlaxViTForImageClassification.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert compute_only.classifier.kernel[...].dtype == jnp.float32
    half.save_pretrained(tmp_path / "bf16")  # saved in its own dtype, read back bitwise
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = FlaxViTForImageClassification.from_pretrained(tmp_path / "bf16", param_dtype="bfloat16")
    assert_same_state(canonical_state(back), canonical_state(half), "bf16 round trip")
    relabelled = FlaxViTForImageClassification.from_pretrained(tmp_path, id2label={i: f"c{i}" for i in range(5)},
                                                               from_pt=True)  # transformers' spelling, accepted
    assert relabelled.config.id2label[3] == "c3" and "from_pt" not in relabelled.config.to_dict()


# ------------------------------------------------------------------------------ hub ids (offline cache)
def test_hub_id_from_offline_cache_honours_revision(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id resolves through huggingface_hub's cache layout (HF_HUB_OFFLINE), with revision= and cache_dir=."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commits = {"main": "a" * 40, "v2": "b" * 40}
    repo = tmp_path / "hub" / "models--vitx-test--tiny-vit"
    states = {}
    for ref, (seed, labels) in {"main": (8, 5), "v2": (9, 3)}.items():
        model = seeded_model("classification", seed=seed, num_labels=labels)
        model.save_pretrained(repo / "snapshots" / commits[ref])
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commits[ref])
        states[ref] = canonical_state(model)
    main = FlaxViTForImageClassification.from_pretrained("vitx-test/tiny-vit", cache_dir=tmp_path / "hub")
    assert_same_state(canonical_state(main), states["main"], "hub main")
    v2 = FlaxViTForImageClassification.from_pretrained("vitx-test/tiny-vit", cache_dir=tmp_path / "hub", revision="v2")
    assert v2.config.num_labels == 3
    assert_same_state(canonical_state(v2), states["v2"], "hub revision v2")
    with pytest.raises((ValueError, OSError), match="vitx-test/tiny-vit"):
        FlaxViTForImageClassification.from_pretrained("vitx-test/tiny-vit", cache_dir=tmp_path / "hub", revision="v3")


# ------------------------------------------------------------------------------ ViT-B/16 on real photos
@pytest.mark.slow
def test_vit_base_on_real_photos_matches_reference_and_transformers(transformers: Any) -> None:
    """Seeded ViT-B/16 at 224 on two bundled photos: logits and last_hidden_state against the
    float64 reference and transformers' PyTorch ViT, within the docs/NUMERICS.md real-image bound."""
    import torch
    from PIL import Image

    from vit_core import ViTImageProcessor

    images = [FIXTURE_IMAGES / "chelsea.png", FIXTURE_IMAGES / "coffee.png"]
    pixel_values = ViTImageProcessor()([Image.open(p) for p in images], return_tensors="np")["pixel_values"]
    config = ViTConfig.from_variant("B/16", num_labels=1000)
    ours = FlaxViTForImageClassification(config, seed=0)
    state = canonical_state(ours)
    out = ours(pixel_values)
    last = np.asarray(ours.vit(pixel_values).last_hidden_state)
    reference = reference_forward(state, config, pixel_values, "classification")
    # last_hidden_state = the final layernorm of the last hidden state (one float64 forward, not two)
    ref_last = reference_layer_norm(reference["hidden_states"][-1], state["vit.layernorm.weight"].astype(np.float64),
                                    state["vit.layernorm.bias"].astype(np.float64), config.layer_norm_eps)
    theirs = their_pt_model(transformers, "classification", config, state)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(pixel_values))
        their_last = theirs.vit(torch.from_numpy(pixel_values)).last_hidden_state.numpy()
    diffs = {
        "logits vs reference": np.abs(np.asarray(out.logits) - reference["logits"]).max(),
        "last_hidden_state vs reference": np.abs(last - ref_last).max(),
        "logits vs transformers": np.abs(np.asarray(out.logits) - expected.logits.numpy()).max(),
        "last_hidden_state vs transformers": np.abs(last - their_last).max(),
    }
    print("ViT-B/16 on real photos:", {k: f"{v:.2e}" for k, v in diffs.items()})
    for name, diff in diffs.items():
        assert diff <= BASE_REAL, f"{name}: {diff:.3e} > {BASE_REAL}"
