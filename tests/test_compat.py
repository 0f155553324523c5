"""The transformers 4.x habits that must work after changing only the import line (issue 16).

from_pretrained's keywords (config fields, loader options, TypeError for anything else), labels
kept by an unchanged num_labels, Auto classes, a transformers ViTConfig as ``config=``,
safe_serialization=False files, push_to_hub (network calls replaced) and quiet TensorFlow
imports, in every framework; transformers 4.57.6 is the oracle wherever the behaviour is its.
docs/transformers-compat.md describes each.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from vit_core import AutoConfig, ViTConfig
from vit_core import pretrained as core_pretrained
from vit_core.config import PRETRAINED_CONFIG_DEFAULTS, PRETRAINED_CONFIG_FIELDS
from vit_core.quiet import drop_startup_lines
from vit_core.weights import HEAD_KEYS

from .cases import TINY, seeded_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "fixtures" / "images"
LABELS = {0: "cat", 1: "dog", 2: "owl"}
FRAMEWORKS = ("torch", "tf", "flax")
PREFIX = {"torch": "", "tf": "TF", "flax": "Flax"}
TASKS = {"base": "ViTModel", "classification": "ViTForImageClassification", "mim": "ViTForMaskedImageModeling"}
AUTO = {"base": "AutoModel", "classification": "AutoModelForImageClassification",
        "mim": "AutoModelForMaskedImageModeling"}
# Options of the loader that never reach config.json (and the config-field spellings of some).
LOADER_KEYS = ("use_safetensors", "low_cpu_mem_usage", "device_map", "revision", "cache_dir", "local_files_only",
               "token", "force_download", "trust_remote_code", "torch_dtype", "from_pt")


# ----------------------------------------------------------------------------------- helpers
def package(framework: str) -> Any:
    pytest.importorskip({"torch": "torch", "tf": "tensorflow", "flax": "flax"}[framework])
    return importlib.import_module(f"vit_{framework}")


def model_class(framework: str, task: str) -> Any:
    return getattr(package(framework), PREFIX[framework] + TASKS[task])


def auto_class(framework: str, task: str) -> Any:
    return getattr(package(framework), PREFIX[framework] + AUTO[task])


def state_of(framework: str, model: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in package(framework).canonical_state(model).items()}


def assert_same_state(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key


def tiny_config(**fields: Any) -> ViTConfig:
    return ViTConfig(**{**TINY, "num_labels": 3, "id2label": LABELS, **fields})


@pytest.fixture(scope="module")
def transformers() -> Any:
    module = pytest.importorskip("transformers")
    module.logging.set_verbosity_error()
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """A classification checkpoint with three named labels (config.json + model.safetensors, written
    without any framework) and its canonical state."""
    config = tiny_config()
    state = seeded_state(config, "classification", seed=3)
    directory = tmp_path_factory.mktemp("compat") / "tiny-labels"
    core_pretrained.save_pretrained(config, state, directory)
    return directory, state


# ----------------------------------------------------------------------------------- 1. keywords
def test_pretrained_config_fields_are_transformers(transformers: Any) -> None:
    """The PretrainedConfig attributes a keyword may set are exactly transformers 4.57's, with its defaults."""
    theirs = transformers.PretrainedConfig().to_dict()
    bookkeeping = {"_name_or_path", "dtype", "model_type", "transformers_version"}
    own = {"id2label", "label2id", "problem_type"}  # ViTConfig's own fields here
    assert set(theirs) - bookkeeping - own == PRETRAINED_CONFIG_FIELDS
    assert {k: theirs[k] for k in PRETRAINED_CONFIG_FIELDS} == PRETRAINED_CONFIG_DEFAULTS


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_misspelled_keyword_raises_type_error_naming_it(framework: str, checkpoint: Any, transformers: Any) -> None:
    directory, _ = checkpoint
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_lables'"):
        model_class(framework, "classification").from_pretrained(directory, num_lables=3)
    theirs = getattr(transformers, PREFIX[framework] + TASKS["classification"])
    with pytest.raises(TypeError, match="num_lables"):  # what transformers does for the same call
        theirs.from_pretrained(directory, num_lables=3)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_config_field_keywords_override_the_config(framework: str, checkpoint: Any, transformers: Any) -> None:
    directory, _ = checkpoint
    ours = model_class(framework, "classification").from_pretrained(
        directory, output_attentions=True, layer_norm_eps=1e-6, problem_type="multi_label_classification")
    theirs = transformers.ViTForImageClassification.from_pretrained(
        directory, output_attentions=True, layer_norm_eps=1e-6, problem_type="multi_label_classification").config
    assert ours.config.extra["output_attentions"] is True is theirs.output_attentions
    assert ours.config.layer_norm_eps == 1e-6 == theirs.layer_norm_eps
    assert ours.config.problem_type == "multi_label_classification" == theirs.problem_type


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_loader_options_never_reach_config_json(framework: str, checkpoint: Any, tmp_path: pathlib.Path) -> None:
    directory, state = checkpoint
    cls = model_class(framework, "classification")
    options: dict[str, Any] = dict(revision=None, cache_dir=str(tmp_path / "cache"), local_files_only=True, token=None,
                                   force_download=False, trust_remote_code=True, use_safetensors=True, from_pt=True)
    if framework == "torch":
        import torch

        options.update(low_cpu_mem_usage=True, device_map="cpu", torch_dtype=torch.float32)
    else:
        options.update(torch_dtype="float32")
    model = cls.from_pretrained(directory, **options)
    assert_same_state(state_of(framework, model), state)  # no effect on the values
    assert not set(LOADER_KEYS) & set(model.config.to_dict()), sorted(set(LOADER_KEYS) & set(model.config.to_dict()))
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # only the model's own dtype is written, as transformers writes it
    assert set(LOADER_KEYS) & set(written) == {"torch_dtype"} and written["torch_dtype"] == "float32"
    assert written["id2label"] == {str(k): v for k, v in LABELS.items()}


def test_device_map_in_pytorch(checkpoint: Any, transformers: Any) -> None:
    torch = pytest.importorskip("torch")
    directory, _ = checkpoint
    cls = model_class("torch", "classification")
    for accepted in (None, "cpu", torch.device("cpu"), {"": "cpu"}):
        assert cls.from_pretrained(directory, device_map=accepted).device == torch.device("cpu")
        assert transformers.ViTForImageClassification.from_pretrained(directory, device_map=accepted).device.type == "cpu"
    for refused in ("cuda", "auto", 0, {"": "cuda:0"}, "meta"):
        with pytest.raises(ValueError, match=r"device_map=.*CPU only"):
            cls.from_pretrained(directory, device_map=refused)


@pytest.mark.parametrize("framework", ["tf", "flax"])
@pytest.mark.parametrize("option", [{"device_map": "cpu"}, {"low_cpu_mem_usage": True}])
def test_torch_only_options_in_tf_and_flax_raise_type_error(framework: str, option: dict[str, Any], checkpoint: Any,
                                                            transformers: Any) -> None:
    """transformers' TF and Flax classes raise TypeError for device_map / low_cpu_mem_usage: so do these."""
    directory, _ = checkpoint
    name = next(iter(option))
    with pytest.raises(TypeError, match=name):
        model_class(framework, "classification").from_pretrained(directory, **option)
    with pytest.raises(TypeError, match=name):
        getattr(transformers, PREFIX[framework] + TASKS["classification"]).from_pretrained(directory, **option)


@pytest.fixture(scope="module")
def two_formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Directories with model.safetensors and pytorch_model.bin holding different values, and each alone."""
    config = tiny_config()
    safe = seeded_state(config, "classification", seed=5)
    legacy = {k: v + np.float32(1.0) for k, v in safe.items()}
    root = tmp_path_factory.mktemp("formats")
    both, only_bin, only_safe = root / "both", root / "only-bin", root / "only-safe"
    core_pretrained.save_pretrained(config, legacy, only_bin, weights_format="pytorch")
    core_pretrained.save_pretrained(config, safe, only_safe)
    shutil.copytree(only_safe, both)
    shutil.copy(only_bin / "pytorch_model.bin", both / "pytorch_model.bin")
    return {"both": both, "only_bin": only_bin, "only_safe": only_safe, "safe": safe, "legacy": legacy}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_use_safetensors(framework: str, two_formats: dict[str, Any], transformers: Any) -> None:
    cls = model_class(framework, "classification")
    both = two_formats["both"]
    assert_same_state(state_of(framework, cls.from_pretrained(both, use_safetensors=True)), two_formats["safe"])
    assert_same_state(state_of(framework, cls.from_pretrained(both, use_safetensors=False)), two_formats["legacy"])
    assert_same_state(state_of(framework, cls.from_pretrained(both)), two_formats["safe"])
    with pytest.raises(OSError, match=r"use_safetensors=True.*model\.safetensors"):
        cls.from_pretrained(two_formats["only_bin"], use_safetensors=True)
    with pytest.raises(OSError, match=r"use_safetensors=False"):
        cls.from_pretrained(two_formats["only_safe"], use_safetensors=False)
    with pytest.raises(OSError, match=r"use_safetensors=False.*is safetensors"):
        cls.from_pretrained(two_formats["only_safe"] / "model.safetensors", use_safetensors=False)
    # transformers PyTorch reads the same files for the same options
    pt = transformers.ViTForImageClassification
    weight = "vit.embeddings.cls_token"
    for option, expected in ((True, "safe"), (False, "legacy")):
        theirs = pt.from_pretrained(both, use_safetensors=option).state_dict()[weight].numpy()
        assert np.array_equal(theirs, two_formats[expected][weight])
    with pytest.raises(OSError):
        pt.from_pretrained(two_formats["only_bin"], use_safetensors=True)
    with pytest.raises(OSError):
        pt.from_pretrained(two_formats["only_safe"], use_safetensors=False)


def test_hub_options_reach_hf_hub_download(two_formats: dict[str, Any], tmp_path: pathlib.Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """revision / token / cache_dir / force_download go to huggingface_hub (replaced here: nothing is
    downloaded); use_safetensors=False never asks for model.safetensors, True asks for nothing else."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[tuple[str, dict[str, Any]]] = []
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def download(repo_id: str, filename: str, **kwargs: Any) -> str:
        assert repo_id == "org/two-formats"
        calls.append((filename, kwargs))
        source = two_formats["both"] / filename
        if not source.is_file():
            raise EntryNotFoundError(f"404 {filename}")
        shutil.copy(source, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    options = dict(revision="v2", token="hf_secret", cache_dir=str(tmp_path / "cache"))
    cls = model_class("torch", "classification")
    model = cls.from_pretrained("org/two-formats", use_safetensors=False, force_download=True, **options)
    assert_same_state(state_of("torch", model), two_formats["legacy"])
    assert [name for name, _ in calls] == ["config.json", "pytorch_model.bin"]
    assert all(kw["force_download"] is True and kw["revision"] == "v2" and kw["token"] == "hf_secret"
               and kw["cache_dir"] == options["cache_dir"] for _, kw in calls)
    calls.clear()
    shutil.rmtree(snapshot)
    snapshot.mkdir()
    model = cls.from_pretrained("org/two-formats", use_safetensors=True, **options)
    assert_same_state(state_of("torch", model), two_formats["safe"])
    assert [name for name, _ in calls] == ["config.json", "model.safetensors"]
    assert not any("force_download" in kw for _, kw in calls)  # not asked for: huggingface_hub's default


def test_unknown_use_safetensors_value_is_a_type_error(checkpoint: Any) -> None:
    with pytest.raises(TypeError, match="use_safetensors must be True, False or None"):
        core_pretrained.weight_file_names("yes")


@pytest.mark.parametrize("framework", ["tf", "flax"])
def test_torch_dtype_is_dtype_in_tf_and_flax(framework: str, checkpoint: Any) -> None:
    directory, _ = checkpoint
    cls = model_class(framework, "classification")
    model = cls.from_pretrained(directory, torch_dtype="bfloat16")
    assert "bfloat16" in str(model.dtype if framework == "flax" else model.compute_dtype)
    with pytest.raises(ValueError, match="torch_dtype='bfloat16' and dtype='float16' disagree"):
        cls.from_pretrained(directory, torch_dtype="bfloat16", dtype="float16")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_output_loading_info_as_transformers(framework: str, checkpoint: Any, transformers: Any) -> None:
    directory, _ = checkpoint
    cls = model_class(framework, "classification")
    model, info = cls.from_pretrained(directory, num_labels=4, ignore_mismatched_sizes=True, output_loading_info=True)
    assert type(model) is cls and model.config.num_labels == 4
    _, theirs = transformers.ViTForImageClassification.from_pretrained(
        directory, num_labels=4, ignore_mismatched_sizes=True, output_loading_info=True)
    assert sorted(info) == sorted(theirs) == ["error_msgs", "mismatched_keys", "missing_keys", "unexpected_keys"]
    assert info == theirs == {"missing_keys": [], "unexpected_keys": [], "error_msgs": [],
                              "mismatched_keys": ["classifier.bias", "classifier.weight"]}
    _, mim_info = model_class(framework, "mim").from_pretrained(directory, output_loading_info=True)
    _, their_mim = transformers.ViTForMaskedImageModeling.from_pretrained(directory, output_loading_info=True)
    assert mim_info == their_mim
    assert mim_info["missing_keys"] == ["decoder.0.bias", "decoder.0.weight", "vit.embeddings.mask_token"]


# ----------------------------------------------------------------------------------- 2. labels
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_num_labels_keeps_names_when_unchanged(framework: str, checkpoint: Any, transformers: Any) -> None:
    directory, state = checkpoint
    cls = model_class(framework, "classification")
    same = cls.from_pretrained(directory, num_labels=3)
    theirs_same = transformers.ViTForImageClassification.from_pretrained(directory, num_labels=3).config
    assert same.config.id2label == LABELS == theirs_same.id2label
    assert same.config.label2id == {v: k for k, v in LABELS.items()} == theirs_same.label2id
    assert_same_state(state_of(framework, same), state)
    other = cls.from_pretrained(directory, num_labels=4, ignore_mismatched_sizes=True)
    theirs_other = transformers.ViTForImageClassification.from_pretrained(
        directory, num_labels=4, ignore_mismatched_sizes=True).config
    assert other.config.id2label == {i: f"LABEL_{i}" for i in range(4)} == theirs_other.id2label
    assert other.config.label2id == theirs_other.label2id


def test_config_num_labels_as_transformers(checkpoint: Any, transformers: Any) -> None:
    directory, _ = checkpoint
    for n in (3, 4):
        ours, theirs = ViTConfig.from_pretrained(directory, num_labels=n), transformers.ViTConfig.from_pretrained(
            directory, num_labels=n)
        assert (ours.id2label, ours.label2id) == (theirs.id2label, theirs.label2id)
    ours, theirs = ViTConfig.from_pretrained(directory), transformers.ViTConfig.from_pretrained(directory)
    ours.num_labels = theirs.num_labels = 3  # the setter: same count keeps the names
    assert ours.id2label == theirs.id2label == LABELS
    ours.num_labels = theirs.num_labels = 2
    assert ours.id2label == theirs.id2label == {0: "LABEL_0", 1: "LABEL_1"}


def test_config_from_pretrained_keywords_as_transformers(checkpoint: Any, transformers: Any) -> None:
    directory, _ = checkpoint
    ours, unused = ViTConfig.from_pretrained(directory, output_hidden_states=True, foo=3, return_unused_kwargs=True)
    theirs, their_unused = transformers.ViTConfig.from_pretrained(directory, output_hidden_states=True, foo=3,
                                                                   return_unused_kwargs=True)
    assert unused == their_unused == {"foo": 3}
    assert ours.extra["output_hidden_states"] is True is theirs.output_hidden_states
    assert "foo" not in ours.to_dict() and not hasattr(theirs, "foo")


# ----------------------------------------------------------------------------------- 4. Auto classes
@pytest.fixture(scope="module")
def foreign_checkpoints(tmp_path_factory: pytest.TempPathFactory, checkpoint: Any) -> dict[str, pathlib.Path]:
    directory, _ = checkpoint
    root = tmp_path_factory.mktemp("foreign")
    out = {}
    for model_type in ("deit", "bert"):
        target = root / model_type
        shutil.copytree(directory, target)
        config = json.loads((target / "config.json").read_text())
        config["model_type"] = model_type
        (target / "config.json").write_text(json.dumps(config))
        out[model_type] = target
    return out


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("task", list(TASKS))
def test_auto_model_classes(framework: str, task: str, checkpoint: Any, transformers: Any) -> None:
    directory, _ = checkpoint
    auto = auto_class(framework, task)
    cls = model_class(framework, task)
    loaded = auto.from_pretrained(directory, output_hidden_states=True)
    assert type(loaded) is cls and loaded.config.extra["output_hidden_states"] is True
    # the same weights as the class's own from_pretrained (less the heads the checkpoint lacks: random init)
    fresh_heads = set(HEAD_KEYS[task])
    via_class = {k: v for k, v in state_of(framework, cls.from_pretrained(directory)).items() if k not in fresh_heads}
    assert_same_state({k: v for k, v in state_of(framework, loaded).items() if k not in fresh_heads}, via_class)
    # transformers' Auto class picks the class of the same name for this checkpoint; it has no ViT masked
    # image modeling Auto class in TF (no mapping) and Flax (no class): vitx adds those two
    theirs = getattr(transformers, PREFIX[framework] + AUTO[task], None)
    mapping = getattr(theirs, "_model_mapping", {})
    if (framework, task) in (("tf", "mim"), ("flax", "mim")):
        assert theirs is None or transformers.ViTConfig not in mapping
    else:
        assert PREFIX[framework] + TASKS[task] == mapping[transformers.ViTConfig].__name__
    fresh = auto.from_config(tiny_config())
    assert type(fresh) is cls and fresh.config.id2label == LABELS
    from_theirs = auto.from_config(transformers.ViTConfig(**{**TINY, "num_labels": 3}))
    assert type(from_theirs) is cls and from_theirs.config.hidden_size == TINY["hidden_size"]
    with pytest.raises(OSError, match="from_pretrained"):
        auto()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_auto_classes_refuse_other_model_types(framework: str, foreign_checkpoints: dict[str, pathlib.Path],
                                               transformers: Any) -> None:
    auto = auto_class(framework, "classification")
    for call in (lambda: auto.from_pretrained(foreign_checkpoints["deit"]),
                 lambda: model_class(framework, "classification").from_pretrained(foreign_checkpoints["deit"]),
                 lambda: auto.from_config(transformers.DeiTConfig(**TINY))):
        with pytest.raises(ValueError, match=r"distilled DeiT.*DeiTForImageClassificationWithTeacher.*"
                                             r"non-distilled DeiT checkpoints \(model_type 'vit'"):
            call()
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        auto.from_pretrained(foreign_checkpoints["bert"])
    with pytest.raises(ValueError, match="model_type 'bert'"):
        auto.from_config(transformers.BertConfig())


def test_auto_config(checkpoint: Any, foreign_checkpoints: dict[str, pathlib.Path], transformers: Any) -> None:
    directory, _ = checkpoint
    assert AutoConfig.from_pretrained(directory) == ViTConfig.from_pretrained(directory)
    assert AutoConfig.from_pretrained(directory / "config.json", num_labels=3).id2label == LABELS
    theirs = transformers.AutoConfig.from_pretrained(directory)
    assert type(theirs).__name__ == "ViTConfig" and theirs.id2label == AutoConfig.from_pretrained(directory).id2label
    assert AutoConfig.for_model("vit", hidden_size=64, num_attention_heads=4).hidden_size == 64
    with pytest.raises(ValueError, match="distilled DeiT"):
        AutoConfig.from_pretrained(foreign_checkpoints["deit"])
    with pytest.raises(ValueError, match="model_type 'bert'"):
        AutoConfig.for_model("bert")
    with pytest.raises(OSError):
        AutoConfig()
    for package_name, names in (("vit_torch", ["AutoConfig", "AutoModel", "AutoModelForImageClassification",
                                               "AutoModelForMaskedImageModeling"]),
                                ("vit_tf", ["AutoConfig", "TFAutoModel", "TFAutoModelForImageClassification",
                                            "TFAutoModelForMaskedImageModeling"]),
                                ("vit_flax", ["AutoConfig", "FlaxAutoModel", "FlaxAutoModelForImageClassification",
                                              "FlaxAutoModelForMaskedImageModeling"])):
        module = importlib.import_module(package_name)
        assert all(name in module.__all__ and hasattr(module, name) for name in names), package_name


# ----------------------------------------------------------------------------------- 5. transformers config
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_transformers_config_is_accepted(framework: str, checkpoint: Any, transformers: Any) -> None:
    directory, state = checkpoint
    theirs = transformers.ViTConfig.from_pretrained(directory)
    model = model_class(framework, "classification").from_pretrained(directory, config=theirs)
    assert isinstance(model.config, ViTConfig)
    assert model.config.id2label == LABELS and model.config.patch_hw == (TINY["patch_size"],) * 2
    assert_same_state(state_of(framework, model), state)
    vitx_config = ViTConfig.from_pretrained(directory)
    assert model.config.pooler_size == vitx_config.pooler_size  # transformers writes pooler_output_size=hidden_size
    expected, got = vitx_config.to_dict(), model.config.to_dict()
    assert sorted(got) == sorted(expected)
    assert {k: got[k] for k in expected if k != "pooler_output_size"} == \
        {k: v for k, v in expected.items() if k != "pooler_output_size"}


@pytest.mark.parametrize("return_dict,torchscript", [(True, False), (False, False), (True, True), (False, True)])
def test_use_return_dict_as_transformers(return_dict: bool, torchscript: bool, transformers: Any) -> None:
    ours = ViTConfig(return_dict=return_dict, torchscript=torchscript)
    theirs = transformers.ViTConfig(return_dict=return_dict, torchscript=torchscript)
    assert ours.use_return_dict is theirs.use_return_dict is (return_dict and not torchscript)
    assert ViTConfig().use_return_dict is True


# ----------------------------------------------------------------------------------- 6. safe_serialization=False
def test_pytorch_model_bin_loads_in_transformers_and_vitx(checkpoint: Any, tmp_path: pathlib.Path,
                                                          transformers: Any) -> None:
    torch = pytest.importorskip("torch")
    directory, state = checkpoint
    ours = model_class("torch", "classification").from_pretrained(directory)
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    # torch's own hardened reader: tensors only, nothing else pickled
    loaded = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert sorted(loaded) == sorted(state)
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path)
    assert_same_state({k: v.numpy() for k, v in theirs.state_dict().items()}, state)
    assert theirs.config.id2label == LABELS
    assert_same_state(state_of("torch", model_class("torch", "classification").from_pretrained(tmp_path)), state)
    # a later save in another format replaces the stale weights file instead of leaving it beside the new one
    halved = model_class("torch", "classification").from_pretrained(directory)
    with torch.no_grad():
        for p in halved.parameters():
            p.mul_(0.5)
    halved.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    halved.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert_same_state(state_of("torch", model_class("torch", "classification").from_pretrained(tmp_path)),
                      {k: v * np.float32(0.5) for k, v in state.items()})


def test_pytorch_model_bin_refuses_shards(checkpoint: Any, tmp_path: pathlib.Path) -> None:
    directory, _ = checkpoint
    model = model_class("torch", "classification").from_pretrained(directory)
    with pytest.raises(ValueError, match="shards safetensors only"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False, max_shard_size="10KB")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("framework,filename", [("tf", "tf_model.h5"), ("flax", "flax_model.msgpack")])
def test_legacy_files_of_tf_and_flax_load_in_transformers(framework: str, filename: str, checkpoint: Any,
                                                          tmp_path: pathlib.Path, transformers: Any) -> None:
    """safe_serialization=False writes transformers' TF / Flax file (its default in those classes)."""
    directory, state = checkpoint
    model = model_class(framework, "classification").from_pretrained(directory)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", filename])
    assert_same_state(state_of(framework, model_class(framework, "classification").from_pretrained(tmp_path)), state)
    theirs = getattr(transformers, PREFIX[framework] + TASKS["classification"]).from_pretrained(tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ours_logits = np.asarray(model(x).logits)
    their_logits = np.asarray(theirs(x).logits)
    np.testing.assert_allclose(their_logits, ours_logits, rtol=1e-5, atol=1e-5)
    assert theirs.config.id2label == LABELS


# ----------------------------------------------------------------------------------- 7. push_to_hub
class FakeHub:
    """HfApi.create_repo / create_branch / upload_folder replaced: records the calls and copies what
    would be uploaded into a local "remote" directory. Nothing leaves the machine."""

    def __init__(self, remote: pathlib.Path) -> None:
        self.remote = remote
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub

        hub = self

        def create_repo(self: Any, repo_id: str, **kwargs: Any) -> Any:
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self: Any, repo_id: str, **kwargs: Any) -> None:
            hub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self: Any, **kwargs: Any) -> str:
            hub.calls.append(("upload_folder", dict(kwargs)))
            folder = pathlib.Path(kwargs["folder_path"])
            patterns = kwargs.get("allow_patterns")
            hub.remote.mkdir(parents=True, exist_ok=True)
            for file in folder.iterdir():
                if patterns is None or file.name in patterns:
                    shutil.copy(file, hub.remote / file.name)
            return "commit-info"

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a network call was not replaced")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", refuse)
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", refuse)

    def call(self, name: str) -> dict[str, Any]:
        matching = [kwargs for called, kwargs in self.calls if called == name]
        assert len(matching) == 1, self.calls
        return matching[0]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_push_to_hub(framework: str, checkpoint: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, state = checkpoint
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    model = model_class(framework, "classification").from_pretrained(directory)
    result = model.push_to_hub("me/tiny-vit", commit_message="first", private=True, token="hf_test", revision="dev")
    assert result == "commit-info"
    assert hub.call("create_repo") == {"repo_id": "me/tiny-vit", "private": True, "exist_ok": True, "token": "hf_test"}
    assert hub.call("create_branch")["branch"] == "dev"
    upload = hub.call("upload_folder")
    assert upload["repo_id"] == "me/tiny-vit" and upload["commit_message"] == "first"
    assert upload["revision"] == "dev" and upload["token"] == "hf_test" and upload["create_pr"] is False
    assert sorted(p.name for p in hub.remote.iterdir()) == ["config.json", "model.safetensors"]
    assert not pathlib.Path(upload["folder_path"]).exists()  # the temporary directory is gone
    assert_same_state(state_of(framework, model_class(framework, "classification").from_pretrained(hub.remote)), state)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_save_pretrained_push_to_hub(framework: str, checkpoint: Any, tmp_path: pathlib.Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    directory, state = checkpoint
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    model = model_class(framework, "classification").from_pretrained(directory)
    out = tmp_path / "my-model"
    out.mkdir()
    (out / "notes.txt").write_text("kept locally, not uploaded")
    model.save_pretrained(out, push_to_hub=True)  # repo_id defaults to the directory's name
    upload = hub.call("upload_folder")
    assert upload["repo_id"] == "my-model" and upload["commit_message"] == "Upload model"
    assert upload["allow_patterns"] == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in hub.remote.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "notes.txt").is_file()
    assert_same_state(state_of(framework, model_class(framework, "classification").from_pretrained(hub.remote)), state)
    with pytest.raises(TypeError, match="'repo_id' is a push_to_hub option"):
        model.save_pretrained(tmp_path / "other", repo_id="me/x")
    with pytest.raises(TypeError, match="unexpected keyword argument 'comit_message'"):
        model.save_pretrained(tmp_path / "other", push_to_hub=True, comit_message="typo")


def test_config_push_to_hub(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    config = tiny_config()
    assert config.push_to_hub("me/cfg", create_pr=True) == "commit-info"
    upload = hub.call("upload_folder")
    assert upload["commit_message"] == "Upload config" and upload["create_pr"] is True
    assert not [c for c, _ in hub.calls if c == "create_branch"]
    assert sorted(p.name for p in hub.remote.iterdir()) == ["config.json"]
    assert ViTConfig.from_pretrained(hub.remote) == config
    hub.calls.clear()
    config.save_pretrained(tmp_path / "cfg-dir", push_to_hub=True, repo_id="me/cfg2", commit_message="c")
    assert hub.call("upload_folder")["repo_id"] == "me/cfg2" and hub.call("upload_folder")["allow_patterns"] == ["config.json"]


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_image_processor_push_to_hub(kind: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vit_core import AutoImageProcessor, DeiTImageProcessor, ViTImageProcessor

    hub = FakeHub(tmp_path / "remote")
    hub.install(monkeypatch)
    processor = (ViTImageProcessor(size={"height": 48, "width": 40}) if kind == "vit"
                 else DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}))
    assert processor.push_to_hub("me/proc", revision="dev") == "commit-info"
    upload = hub.call("upload_folder")
    assert upload["commit_message"] == "Upload image processor" and upload["revision"] == "dev"
    assert sorted(p.name for p in hub.remote.iterdir()) == ["preprocessor_config.json"]
    reloaded = AutoImageProcessor.from_pretrained(hub.remote)
    assert type(reloaded) is type(processor) and reloaded.to_dict() == processor.to_dict()
    hub.calls.clear()
    out = tmp_path / "proc-dir"
    processor.save_pretrained(out, push_to_hub=True, commit_message="p")
    upload = hub.call("upload_folder")
    assert (upload["repo_id"], upload["commit_message"]) == ("proc-dir", "p")
    assert upload["allow_patterns"] == ["preprocessor_config.json"]
    with pytest.raises(TypeError, match="'private' is a push_to_hub option"):
        processor.save_pretrained(tmp_path / "other", private=True)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_framework_packages_export_the_processors(framework: str) -> None:
    import vit_core

    package = importlib.import_module(f"vit_{framework}")
    for name in ("AutoConfig", "AutoImageProcessor", "ViTImageProcessor", "DeiTImageProcessor"):
        assert name in package.__all__ and getattr(package, name) is getattr(vit_core, name)


# ----------------------------------------------------------------------------------- 3. quiet TensorFlow
STARTUP_MARKERS = ("oneDNN custom operations", "cpu_feature_guard", "absl::InitializeLog")


def run_python(args: list[str], level: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_drop_startup_lines_keeps_everything_else() -> None:
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1796298350.475962    5145 port.cc:153] oneDNN custom operations are on.\n"
            "W0000 00:00:1796298350.528170    5145 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
            "E0000 00:00:1796298350.6    5145 cuda_dnn.cc:8] Unable to register cuDNN factory\n"
            "Traceback (most recent call last):\n")
    assert drop_startup_lines(text) == ("E0000 00:00:1796298350.6    5145 cuda_dnn.cc:8] Unable to register cuDNN factory\n"
                                        "Traceback (most recent call last):\n")


def test_import_vit_tf_is_quiet_unless_the_user_sets_the_level() -> None:
    pytest.importorskip("tensorflow")
    quiet = run_python(["-c", "import os, vit_tf; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"], None)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == "2"  # set before tensorflow was imported
    assert not [m for m in STARTUP_MARKERS if m in quiet.stderr], quiet.stderr
    loud = run_python(["-c", "import os, vit_tf; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"], "0")
    assert loud.returncode == 0 and loud.stdout.strip() == "0"  # theirs wins
    # TF logs cpu_feature_guard on every x86 CPU; "oneDNN custom operations are on" only where it
    # turns its oneDNN ops on by default (AVX-512 hosts here; not the AVX2 AMD EPYC)
    assert "cpu_feature_guard" in loud.stderr and "absl::InitializeLog" in loud.stderr, loud.stderr


@pytest.mark.parametrize("quiet_flag", [[], ["-q"]])
def test_cli_tf_commands_are_quiet(quiet_flag: list[str], checkpoint: Any) -> None:
    pytest.importorskip("tensorflow")
    directory, _ = checkpoint
    image = str(IMAGES / "astronaut.png")
    classify = run_python(["-m", "conversion.cli", *quiet_flag, "classify", str(directory), image, "--framework", "tf",
                           "--json"], None)
    assert classify.returncode == 0, classify.stderr
    assert json.loads(classify.stdout)[image][0]["label"] in LABELS.values()
    parity = run_python(["-m", "conversion.cli", *quiet_flag, "parity", str(directory), "--frameworks", "tf",
                         "reference", "--json"], None)
    assert parity.returncode == 0, parity.stderr
    for done in (classify, parity):
        assert not [m for m in STARTUP_MARKERS if m in done.stderr], done.stderr
