"""vit_torch from_pretrained / save_pretrained against transformers 4.57.6's files, every format.

Each test writes real files with transformers (PyTorch, TF through tf-keras, Flax) or with
vit_torch, loads them on the other side and compares weights bit for bit and outputs exactly.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vit_torch import (  # noqa: E402
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
    canonical_state,
    load_canonical_state,
)

from vit_core.tolerances import TOLERANCES  # noqa: E402

from .cases import TINY  # noqa: E402

SMALL = TOLERANCES["small"]

CLASSES = {"base": ViTModel, "classification": ViTForImageClassification, "mim": ViTForMaskedImageModeling}
THEIR_NAMES = {"base": "ViTModel", "classification": "ViTForImageClassification", "mim": "ViTForMaskedImageModeling"}


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


def seeded(task: str, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny vit_torch model with seeded weights (non-zero everywhere, biases included)."""
    torch.manual_seed(seed)
    model = CLASSES[task](ViTConfig(**{**TINY, **config}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def main_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).to_tuple()[0]


def assert_outputs_match(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> None:
    """Same weights, same input: vit_torch vs transformers within the docs/NUMERICS.md bound. (Not
    bitwise: vit_torch's inference Linear runs oneDNN's GEMM, transformers' F.linear runs MKL's;
    the weights themselves are compared bit for bit by assert_same_state.)"""
    x = pixels()
    diff = (main_output(ours, x).double() - main_output(theirs, x).double()).abs().max().item()
    assert diff <= SMALL, f"{what}: outputs differ by {diff:.3e}"


def assert_same_state(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    # transformers registers ViTLayer's sub-modules in another order than the canonical table:
    # the names are the same, the state_dict order is not, so compare as mappings.
    assert set(got) == set(expected), f"{what}: keys differ: {set(got) ^ set(expected)}"
    for key in expected:
        assert got[key].dtype == expected[key].dtype, f"{what}: {key} dtype {got[key].dtype} != {expected[key].dtype}"
        assert got[key].tobytes() == expected[key].tobytes(), f"{what}: {key} differs"


def their_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def their_model(transformers: Any, task: str, source: dict[str, np.ndarray], config: ViTConfig) -> torch.nn.Module:
    """transformers' model of ``task`` holding exactly ``source`` (canonical names are its names)."""
    their_config = transformers.ViTConfig(**config.to_dict())
    model = getattr(transformers, THEIR_NAMES[task])(their_config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in source.items()}, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------ ours -> transformers
@pytest.mark.parametrize("task", list(CLASSES))
def test_save_pretrained_loads_in_transformers(tmp_path: pathlib.Path, transformers: Any, task: str) -> None:
    ours = seeded(task)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == [type(ours).__name__]
    theirs = getattr(transformers, THEIR_NAMES[task]).from_pretrained(tmp_path).eval()
    assert_same_state(their_state(theirs), canonical_state(ours), f"{task}: transformers loading ours")
    assert_outputs_match(ours, theirs, f"{task}: transformers loading ours")


def test_save_pretrained_unsafe_writes_pytorch_model_bin(tmp_path: pathlib.Path) -> None:
    # transformers' safe_serialization=False (tests/test_compat.py loads it in transformers too)
    seeded("base").save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_sharded_save_loads_in_transformers_and_back(tmp_path: pathlib.Path, transformers: Any) -> None:
    ours = seeded("classification")
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in names and len([n for n in names if n.startswith("model-")]) > 1
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert_same_state(their_state(theirs), canonical_state(ours), "sharded")
    back = ViTForImageClassification.from_pretrained(tmp_path)
    assert_same_state(canonical_state(back), canonical_state(ours), "sharded round trip")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_save_keeps_dtype(tmp_path: pathlib.Path, transformers: Any, dtype: str) -> None:
    ours = ViTForImageClassification.from_pretrained(_saved(tmp_path / "src", seeded("classification")), dtype=dtype)
    assert ours.dtype == getattr(torch, dtype)
    ours.save_pretrained(tmp_path / "half")
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == dtype
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "half", torch_dtype=getattr(torch, dtype))
    for key, value in theirs.state_dict().items():
        assert value.dtype == getattr(torch, dtype) and torch.equal(value, ours.state_dict()[key]), key
    auto = ViTForImageClassification.from_pretrained(tmp_path / "half", torch_dtype="auto")
    assert auto.dtype == getattr(torch, dtype)
    assert ViTForImageClassification.from_pretrained(tmp_path / "half").dtype == torch.float32


def _saved(directory: pathlib.Path, model: torch.nn.Module) -> pathlib.Path:
    model.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------ transformers -> ours
PT_FORMATS = {
    "safetensors": ({}, ["config.json", "model.safetensors"]),
    "bin": ({"safe_serialization": False}, ["config.json", "pytorch_model.bin"]),
    "sharded": ({"max_shard_size": "20KB"}, None),
}


@pytest.mark.parametrize("fmt", list(PT_FORMATS))
@pytest.mark.parametrize("task", list(CLASSES))
def test_transformers_saved_dirs_load(tmp_path: pathlib.Path, transformers: Any, task: str, fmt: str) -> None:
    source = canonical_state(seeded(task, seed=2))
    theirs = their_model(transformers, task, source, seeded(task).config)
    save_kwargs, files = PT_FORMATS[fmt]
    theirs.save_pretrained(tmp_path, **save_kwargs)
    if files is not None:
        assert sorted(p.name for p in tmp_path.iterdir()) == files
    else:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = CLASSES[task].from_pretrained(tmp_path)
    assert not ours.training
    assert_same_state(canonical_state(ours), source, f"{task}/{fmt}")
    assert_outputs_match(ours, theirs, f"{task}/{fmt}")


FRAMEWORK_FORMATS = [
    ("TF", "classification", {}, "tf_model.h5"),
    ("TF", "base", {}, "tf_model.h5"),
    ("TF", "classification", {"safe_serialization": True}, "model.safetensors"),
    ("Flax", "classification", {}, "flax_model.msgpack"),
    ("Flax", "base", {}, "flax_model.msgpack"),
    ("Flax", "classification", {"safe_serialization": True}, "model.safetensors"),
]


@pytest.mark.parametrize("prefix,task,save_kwargs,filename", FRAMEWORK_FORMATS,
                         ids=[f"{p}-{t}-{f}" for p, t, _, f in FRAMEWORK_FORMATS])
def test_tf_and_flax_checkpoints_load(tmp_path: pathlib.Path, transformers: Any, prefix: str, task: str,
                                      save_kwargs: dict[str, Any], filename: str) -> None:
    """Files written by transformers' TFViT* (tf-keras) and FlaxViT* classes load with the same weights."""
    ours = seeded(task, seed=3)
    ours.save_pretrained(tmp_path / "pt")
    cls = getattr(transformers, prefix + THEIR_NAMES[task], None)
    if cls is None:
        pytest.skip(f"transformers has no {prefix}{THEIR_NAMES[task]}")
    try:
        other = cls.from_pretrained(tmp_path / "pt", from_pt=True)
    except ImportError as e:  # pragma: no cover - tf-keras / flax missing
        pytest.skip(f"{prefix} classes unavailable: {e}")
    other.save_pretrained(tmp_path / "out", **save_kwargs)
    assert (tmp_path / "out" / filename).is_file()
    loaded = CLASSES[task].from_pretrained(tmp_path / "out")
    state = canonical_state(ours)
    assert_same_state(canonical_state(loaded), state, f"{prefix} {task} {filename}")
    x = pixels()
    assert torch.equal(main_output(loaded, x), main_output(ours, x))


# ------------------------------------------------------------------------------ transformers 5.9+ names
# docs/FORMATS.md section 2, applied in this order (written out here, independent of vit_core's rules).
NEW_NAMES = [
    (r"encoder\.layer\.", "layers."),
    (r"attention\.attention\.query", "attention.q_proj"),
    (r"attention\.attention\.key", "attention.k_proj"),
    (r"attention\.attention\.value", "attention.v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"output\.dense", "mlp.fc2"),
]


def to_new_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in NEW_NAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
@pytest.mark.parametrize("task", ["base", "classification"])
def test_transformers_5_names_load(tmp_path: pathlib.Path, task: str, writer: str) -> None:
    ours = seeded(task, seed=4)
    state = to_new_names({k: v.contiguous() for k, v in ours.state_dict().items()})
    assert "vit.layers.0.attention.q_proj.weight" in state or "layers.0.mlp.fc2.bias" in state
    ours.config.save_pretrained(tmp_path)
    if writer == "safetensors":
        from safetensors.torch import save_file

        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = CLASSES[task].from_pretrained(tmp_path)
    assert_same_state(canonical_state(loaded), canonical_state(ours), f"5.9+ names via {writer}")


# ------------------------------------------------------------------------------ base <-> task
def test_base_checkpoint_into_task_models(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    base = seeded("base", seed=5)
    base.save_pretrained(tmp_path)
    backbone = canonical_state(base)
    for task, new_keys in (("classification", {"classifier.weight", "classifier.bias"}),
                           ("mim", {"decoder.0.weight", "decoder.0.bias", "vit.embeddings.mask_token"})):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model = CLASSES[task].from_pretrained(tmp_path)
        state = canonical_state(model)
        for key, value in backbone.items():
            if not key.startswith("pooler."):
                assert state["vit." + key].tobytes() == value.tobytes(), key
        warned = " ".join(r.getMessage() for r in caplog.records)
        for key in new_keys:
            assert key in warned, f"{task}: no warning about newly initialised {key}: {warned}"
        assert "pooler.dense.weight" in warned  # the base model's pooler is dropped, with a warning
        if task == "classification":
            assert 0 < float(np.abs(state["classifier.weight"]).max()) <= 2 * model.config.initializer_range + 1e-7


def test_task_checkpoint_into_base_model(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture,
                                         transformers: Any) -> None:
    task_model = seeded("classification", seed=6)
    task_model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        base = ViTModel.from_pretrained(tmp_path)
        no_pool = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert no_pool.pooler is None and base.pooler is not None
    source = canonical_state(task_model)
    for key, value in canonical_state(no_pool).items():
        assert source["vit." + key].tobytes() == value.tobytes(), key
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "classifier.weight" in warned and "pooler.dense.weight" in warned
    theirs = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert_outputs_match(no_pool, theirs, "task checkpoint into ViTModel")


# ------------------------------------------------------------------------------ strictness and heads
def test_strict_errors_list_every_bad_key(tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    model = seeded("classification")
    model.config.save_pretrained(tmp_path)
    state = canonical_state(model)
    del state["vit.encoder.layer.1.output.dense.weight"]
    del state["vit.layernorm.bias"]
    state["vit.encoder.layer.0.attention.attention.query.weight"] = np.zeros((32, 16), np.float32)
    state["vit.encoder.layer.7.output.dense.weight"] = np.zeros((32, 37), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        ViTForImageClassification.from_pretrained(tmp_path)
    text = str(info.value)
    for expected in ("vit.encoder.layer.1.output.dense.weight (32, 37)", "vit.layernorm.bias (32,)",
                     "vit.encoder.layer.0.attention.attention.query.weight: file (32, 16) vs model (32, 32)",
                     "vit.encoder.layer.7.output.dense.weight (32, 37)"):
        assert expected in text, (expected, text)


def test_ignore_mismatched_sizes_reinitialises_the_head(tmp_path: pathlib.Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    five = seeded("classification", seed=7)
    five.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True"):
        ViTForImageClassification.from_pretrained(tmp_path, num_labels=10)
    with caplog.at_level(logging.WARNING):
        ten = ViTForImageClassification.from_pretrained(tmp_path, num_labels=10, ignore_mismatched_sizes=True)
    assert ten.config.num_labels == 10 and ten.classifier.weight.shape == (10, 32)
    assert "classifier.weight" in " ".join(r.getMessage() for r in caplog.records)
    assert torch.count_nonzero(ten.classifier.bias) == 0  # re-initialised by the table: zeros
    old, new = canonical_state(five), canonical_state(ten)
    for key in old:
        if not key.startswith("classifier."):
            assert old[key].tobytes() == new[key].tobytes(), key
    with torch.no_grad():
        assert ten(pixels()).logits.shape == (2, 10)


def test_config_overrides_and_options(tmp_path: pathlib.Path) -> None:
    seeded("classification").save_pretrained(tmp_path)
    model = ViTForImageClassification.from_pretrained(tmp_path, hidden_dropout_prob=0.1, attn_implementation="eager")
    assert model.config.hidden_dropout_prob == 0.1 and model.config._attn_implementation == "eager"
    assert model.vit.encoder.layer[0].output.dropout.p == 0.1
    given = ViTConfig.from_pretrained(tmp_path)
    given.id2label = {i: f"class{i}" for i in range(5)}
    model = ViTForImageClassification.from_pretrained(tmp_path, config=given)
    assert model.config.id2label[4] == "class4"
    with pytest.raises(ValueError, match="disagree"):
        ViTForImageClassification.from_pretrained(tmp_path, dtype="bfloat16", torch_dtype="float16")


# ------------------------------------------------------------------------------ unsafe pickles
class _Evil:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pytorch_bin_is_refused_not_run(tmp_path: pathlib.Path, zip_format: bool) -> None:
    model = seeded("classification")
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    state: dict[str, Any] = dict(model.state_dict())
    state["payload"] = _Evil(marker)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError) as info:
        ViTForImageClassification.from_pretrained(tmp_path)
    assert "pytorch_model.bin" in str(info.value) and re.search(r"refused|is not read", str(info.value))
    assert not marker.exists(), "the pickle's payload ran"


# ------------------------------------------------------------------------------ hub ids (offline cache)
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _fake_hub_cache(cache: pathlib.Path, repo_id: str, snapshots: dict[str, pathlib.Path], refs: dict[str, str]) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/<name> -> commit, snapshots/<commit>/files}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, source in snapshots.items():
        target = repo / "snapshots" / commit
        target.mkdir(parents=True)
        for file in source.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir(parents=True)
    for name, commit in refs.items():
        (repo / "refs" / name).write_text(commit)


@pytest.fixture()
def offline_hub(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    first, second = seeded("classification", seed=8), seeded("classification", seed=9, num_labels=3)
    first.save_pretrained(tmp_path / "src_a")
    second.save_pretrained(tmp_path / "src_b")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "vitx-test/tiny-vit", {COMMIT_A: tmp_path / "src_a", COMMIT_B: tmp_path / "src_b"},
                    {"main": COMMIT_A, "v2": COMMIT_B})
    return {"cache": cache, "main": canonical_state(first), "v2": canonical_state(second)}


def test_hub_id_from_offline_cache_honours_revision(offline_hub: dict[str, Any]) -> None:
    cache = offline_hub["cache"]
    main = ViTForImageClassification.from_pretrained("vitx-test/tiny-vit", cache_dir=cache)
    assert_same_state(canonical_state(main), offline_hub["main"], "hub main")
    v2 = ViTForImageClassification.from_pretrained("vitx-test/tiny-vit", cache_dir=cache, revision="v2")
    assert v2.config.num_labels == 3
    assert_same_state(canonical_state(v2), offline_hub["v2"], "hub revision v2")
    by_commit = ViTForImageClassification.from_pretrained("vitx-test/tiny-vit", cache_dir=cache, revision=COMMIT_B)
    assert_same_state(canonical_state(by_commit), offline_hub["v2"], "hub revision by commit")
    with pytest.raises((ValueError, OSError), match="vitx-test/tiny-vit"):
        ViTForImageClassification.from_pretrained("vitx-test/tiny-vit", cache_dir=cache, revision="v3")


def test_hub_id_uses_the_default_cache(offline_hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline_hub["cache"]))
    model = ViTForImageClassification.from_pretrained("vitx-test/tiny-vit", local_files_only=True)
    assert_same_state(canonical_state(model), offline_hub["main"], "hub default cache")
    with pytest.raises((ValueError, OSError), match="other/missing"):
        ViTModel.from_pretrained("other/missing")


# ------------------------------------------------------------------------------ weight round trips
@pytest.mark.parametrize("task", list(CLASSES))
def test_directory_round_trip_is_bitwise(tmp_path: pathlib.Path, task: str) -> None:
    ours = seeded(task, seed=10)
    ours.save_pretrained(tmp_path)
    back = CLASSES[task].from_pretrained(tmp_path)
    assert_same_state(canonical_state(back), canonical_state(ours), f"{task} save/load")
    again = CLASSES[task](ours.config)
    load_canonical_state(again, canonical_state(back))
    assert_same_state(canonical_state(again), canonical_state(ours), f"{task} load_canonical_state")
