"""ViTConfig refuses values that would run but compute nonsense, naming the field; real
transformers config.json files (extra keys, string label keys, ImageNet's repeated names) still load."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from vit_core import ViTConfig
from vit_core.config import INITIALIZER_RANGE_MAX, LAYER_NORM_EPS_MAX

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8)

# (fields, the field the message must name, a fragment of the reason)
BAD_VALUES: list[tuple[dict[str, Any], str, str]] = [
    (dict(layer_norm_eps=float("inf")), "layer_norm_eps", "finite"),
    (dict(layer_norm_eps=1e300), "layer_norm_eps", "finite"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps", "finite"),
    (dict(layer_norm_eps=LAYER_NORM_EPS_MAX * 2), "layer_norm_eps", "finite"),
    (dict(layer_norm_eps=-1e-6), "layer_norm_eps", "finite"),
    (dict(layer_norm_eps=True), "layer_norm_eps", "finite"),
    (dict(layer_norm_eps="1e-12"), "layer_norm_eps", "finite"),
    (dict(initializer_range=float("nan")), "initializer_range", "finite"),
    (dict(initializer_range=float("inf")), "initializer_range", "finite"),
    (dict(initializer_range=-0.02), "initializer_range", "finite"),
    (dict(initializer_range=INITIALIZER_RANGE_MAX + 1), "initializer_range", "finite"),
    (dict(qkv_bias="false"), "qkv_bias", "boolean"),
    (dict(qkv_bias="true"), "qkv_bias", "boolean"),
    (dict(qkv_bias=0), "qkv_bias", "boolean"),
    (dict(qkv_bias=None), "qkv_bias", "boolean"),
    (dict(return_dict="false"), "return_dict", "boolean"),
    (dict(output_attentions=1), "output_attentions", "boolean"),
    (dict(output_hidden_states="yes"), "output_hidden_states", "boolean"),
    (dict(hidden_dropout_prob=float("nan")), "hidden_dropout_prob", "probability"),
    (dict(id2label={-1: "a", 0: "b", 1: "c"}), "id2label", "0..2"),
    (dict(id2label={0: "a", 1: "b", 5: "c"}), "id2label", "0..2"),
    (dict(id2label={"-1": "a", "0": "b", "1": "c"}), "id2label", "0..2"),
    (dict(id2label={"0": "a", "one": "b"}), "id2label", "int class index"),
    (dict(id2label={0: "a", 1.5: "b"}), "id2label", "int class index"),
    (dict(id2label={0: "a", True: "b"}), "id2label", "int class index"),
    (dict(id2label={0: "a", "00": "b"}), "id2label", "twice"),  # both keys are class 0
    (dict(id2label=["a", "b"]), "id2label", "mapping"),
    (dict(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 5}), "label2id", "[0, 3)"),
    (dict(num_labels=2, label2id={"a": 0, "b": -1}), "label2id", "[0, 2)"),
    (dict(num_labels=2, label2id={"a": 0, "b": "x"}), "label2id", "int class index"),
    (dict(num_labels="3"), "num_labels", "non-negative int"),
    (dict(num_labels=True), "num_labels", "non-negative int"),
    (dict(hidden_act=["gelu"]), "hidden_act", "not supported"),
]


@pytest.mark.parametrize("fields,field,reason", BAD_VALUES, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD_VALUES)])
def test_bad_value_is_a_value_error_naming_the_field(fields: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValueError, match=rf"ViTConfig\.{field}\b") as info:
        ViTConfig(**TINY, **fields)
    assert f"ViTConfig.{field}" in str(info.value) and reason in str(info.value), str(info.value)


@pytest.mark.parametrize("fields,field,reason", BAD_VALUES[:19], ids=[f for _, f, _ in BAD_VALUES[:19]])
def test_bad_value_in_config_json_names_the_file_and_field(tmp_path: pathlib.Path, fields: dict[str, Any],
                                                           field: str, reason: str) -> None:
    """The same values read from a config.json (json writes inf / nan as Infinity / NaN, as they arrive)."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **fields, "model_type": "vit"}))
    with pytest.raises(ValueError, match=rf"config\.json: ViTConfig\.{field}\b"):
        ViTConfig.from_pretrained(tmp_path)


def test_values_changed_after_construction_are_checked_by_validate() -> None:
    config = ViTConfig(**TINY)
    config.layer_norm_eps = float("inf")
    with pytest.raises(ValueError, match="layer_norm_eps"):
        config.validate()
    config = ViTConfig(**TINY)
    config.qkv_bias = "false"
    with pytest.raises(ValueError, match="qkv_bias"):
        config.validate()
    config = ViTConfig(**TINY, num_labels=3)
    config.id2label = {0: "a", 1: "b", 5: "c"}
    with pytest.raises(ValueError, match="id2label"):
        config.validate()
    with pytest.raises(ValueError, match="num_labels"):
        config.num_labels = -1


def test_output_flags_from_the_config_are_booleans_only() -> None:
    from vit_core.options import flag

    config = ViTConfig(**TINY, output_attentions=True)
    assert flag(None, config, "output_attentions", False) is True
    assert flag(False, config, "output_attentions", False) is False
    config.extra["return_dict"] = "false"  # edited after validation: still not read as True
    with pytest.raises(ValueError, match="return_dict"):
        flag(None, config, "return_dict", True)


def test_good_values_and_edges_are_accepted() -> None:
    for eps in (1e-12, 1e-6, 1e-5, LAYER_NORM_EPS_MAX):
        assert ViTConfig(**TINY, layer_norm_eps=eps).layer_norm_eps == eps
    for std in (0, 0.0, 0.02, INITIALIZER_RANGE_MAX):
        assert ViTConfig(**TINY, initializer_range=std).initializer_range == std
    assert ViTConfig(**TINY, qkv_bias=False).qkv_bias is False
    config = ViTConfig(**TINY, id2label={"1": "dog", "0": "cat"})  # string keys, any order (JSON)
    assert config.id2label == {1: "dog", 0: "cat"} and config.label2id == {"dog": 1, "cat": 0}
    # ImageNet's id2label repeats names (134 and 517 are both "crane"): label2id keeps the last
    names = {i: f"class{i}" for i in range(6)} | {4: "crane", 1: "crane"}
    config = ViTConfig(**TINY, id2label={str(k): v for k, v in names.items()},
                       label2id={v: k for k, v in names.items()})
    assert config.num_labels == 6 and config.label2id["crane"] == 4
    assert ViTConfig(**TINY, num_labels=0).id2label == {}


def test_transformers_config_round_trips(tmp_path: pathlib.Path) -> None:
    """A config.json as transformers 4.x writes it (every PretrainedConfig key, the full dict, not
    just the diff) loads, keeps its extra keys, and reads back into transformers unchanged."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.ViTConfig(**TINY, layer_norm_eps=1e-6, qkv_bias=False, hidden_act="gelu_new",
                                    id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2},
                                    problem_type="single_label_classification", architectures=["ViTForImageClassification"])
    full = theirs.to_dict()
    assert "return_dict" in full and "output_attentions" in full and "transformers_version" in full
    (tmp_path / "config.json").write_text(json.dumps(full))
    ours = ViTConfig.from_pretrained(tmp_path)
    assert ours.qkv_bias is False and ours.layer_norm_eps == 1e-6 and ours.hidden_act == "gelu_new"
    assert ours.id2label == {0: "cat", 1: "dog", 2: "bird"} and ours.label2id == {"cat": 0, "dog": 1, "bird": 2}
    assert ours.extra["architectures"] == ["ViTForImageClassification"] and ours.extra["return_dict"] is True
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    back = transformers.ViTConfig.from_pretrained(out)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "layer_norm_eps", "initializer_range", "qkv_bias", "image_size", "patch_size", "encoder_stride",
                "id2label", "label2id", "problem_type", "architectures", "return_dict"):
        assert getattr(back, key) == getattr(theirs, key), key
    assert ViTConfig.from_pretrained(out) == ours  # and into vitx again, bit for bit
