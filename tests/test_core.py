"""vit_core: config, weight table, activations, resampling and the float64 reference."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from vit_core import ViTConfig, parameter_count
from vit_core.activations import ACTIVATIONS
from vit_core.reference import forward, pixel_shuffle
from vit_core.resample import bicubic_matrix, resample_position_embeddings
from vit_core.weights import weight_table

from .cases import CASES, TINY, Case, make_inputs, make_state

# docs/FORMATS.md section 8: backbone without pooler / with pooler / with a 1000-class head.
PARAMETER_COUNTS = [
    ("Ti/16", 5_524_416, 5_561_472, 5_717_416),
    ("S/16", 21_665_664, 21_813_504, 22_050_664),
    ("B/16", 85_798_656, 86_389_248, 86_567_656),
    ("B/32", 87_455_232, 88_045_824, 88_224_232),
    ("L/16", 303_301_632, 304_351_232, 304_326_632),
    ("H/14", 630_764_800, 632_404_480, 632_045_800),
]


@pytest.mark.parametrize("variant,no_pool,pool,head", PARAMETER_COUNTS)
def test_parameter_counts(variant: str, no_pool: int, pool: int, head: int) -> None:
    config = ViTConfig.from_variant(variant, num_labels=1000)
    assert parameter_count(config, "base", add_pooling_layer=False) == no_pool
    assert parameter_count(config, "base") == pool
    assert parameter_count(config, "classification") == head


def test_import_vit_core_imports_no_framework() -> None:
    code = ("import sys, vit_core, vit_core.reference, vit_core.pretrained; "
            "print([m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_json_round_trip_with_unknown_keys(tmp_path) -> None:
    config = ViTConfig(hidden_size=64, num_attention_heads=4, image_size=(32, 48), patch_size=8,
                       id2label={0: "cat", 1: "dog"}, my_field=[1, 2])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "vit" and data["my_field"] == [1, 2] and data["id2label"] == {"0": "cat", "1": "dog"}
    back = ViTConfig.from_pretrained(tmp_path)
    assert back == config
    assert back.id2label == {0: "cat", 1: "dog"} and back.label2id == {"cat": 0, "dog": 1}
    assert back.image_hw == (32, 48) and back.grid_hw == (4, 6)


def test_config_read_by_transformers_and_back(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = ViTConfig(**TINY, hidden_act="gelu_new", layer_norm_eps=1e-6, qkv_bias=False)
    ours.save_pretrained(tmp_path / "a")
    theirs = transformers.ViTConfig.from_pretrained(tmp_path / "a")
    for key in ("hidden_size", "num_hidden_layers", "hidden_act", "layer_norm_eps", "qkv_bias", "num_labels", "encoder_stride"):
        assert getattr(theirs, key) == getattr(ours, key), key
    theirs.save_pretrained(tmp_path / "b")
    back = ViTConfig.from_pretrained(tmp_path / "b")
    for key in ("hidden_size", "hidden_act", "layer_norm_eps", "qkv_bias", "num_labels", "id2label"):
        assert getattr(back, key) == getattr(ours, key), key


@pytest.mark.parametrize("fields,message", [
    (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
    (dict(image_size=30, patch_size=8), "image_size"),
    (dict(hidden_act="mish"), "hidden_act"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(patch_size=(8, 8, 8)), "patch_size"),
    (dict(problem_type="ranking"), "problem_type"),
    (dict(num_labels=3, id2label={0: "a"}), "num_labels"),
])
def test_config_errors_name_the_field(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        ViTConfig(**fields)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ('{"hidden_size": "big"}', "hidden_size"),
    ('[1, 2]', "JSON object"),
    ('{"model_type": "bert"}', "model_type"),
])
def test_malformed_config_json(tmp_path, text, message) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        ViTConfig.from_pretrained(tmp_path)
    assert "config.json" in str(info.value) or message in ("model_type",)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_table_matches_transformers(name: str) -> None:
    torch = pytest.importorskip("torch")
    acts = pytest.importorskip("transformers.activations")
    x = np.linspace(-6, 6, 2001)
    expected = acts.ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ACTIVATIONS[name](x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gin,gout", [((4, 4), (7, 7)), ((7, 7), (4, 4)), ((3, 5), (6, 2)), ((14, 14), (24, 24)), ((2, 3), (9, 1))])
def test_bicubic_reference_matches_torch_interpolate(gin, gout) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    table = (0.02 * rng.standard_normal((1, 1 + gin[0] * gin[1], 16))).astype(np.float32)
    ours = resample_position_embeddings(table, gin, gout)
    grid = torch.from_numpy(table[:, 1:]).reshape(1, *gin, 16).permute(0, 3, 1, 2)
    theirs = torch.nn.functional.interpolate(grid, size=gout, mode="bicubic", align_corners=False)
    theirs = theirs.permute(0, 2, 3, 1).reshape(1, -1, 16).numpy()
    assert np.array_equal(ours[:, :1], table[:, :1])
    assert np.abs(ours[:, 1:] - theirs).max() < 1e-7


def test_bicubic_identity_and_rows_sum_to_one() -> None:
    assert np.array_equal(bicubic_matrix(5, 5), np.eye(5))
    for n_in, n_out in [(4, 9), (9, 4), (14, 37)]:
        np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(axis=1), 1.0, atol=1e-12)


def test_pixel_shuffle_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.arange(2 * 12 * 3 * 4, dtype=np.float64).reshape(2, 12, 3, 4)
    expected = torch.nn.functional.pixel_shuffle(torch.from_numpy(x), 2).numpy()
    assert np.array_equal(pixel_shuffle(x, 2), expected)


def _transformers_model(case: Case, state: dict[str, np.ndarray]):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(**case.vit_config.to_dict())
    config._attn_implementation = "eager"
    if case.task == "base":
        model = transformers.ViTModel(config, add_pooling_layer=case.add_pooling_layer, use_mask_token=case.use_mask_token)
    elif case.task == "classification":
        model = transformers.ViTForImageClassification(config)
    else:
        model = transformers.ViTForMaskedImageModeling(config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "mask_token" not in k], (missing, unexpected)
    return model.eval()


# transformers only builds square position grids: non-square interpolation is vitx's own extension.
def transformers_supports(case: Case) -> bool:
    """transformers builds square position grids only, and its MIM head reshapes to a square grid."""
    config = case.vit_config
    (h, w), (ph, pw) = case.image_hw or config.image_hw, config.patch_hw
    return config.grid_hw[0] == config.grid_hw[1] and ph == pw and h // ph == w // pw


TRANSFORMERS_CASES = [c for c in CASES if transformers_supports(c)]


@pytest.mark.parametrize("case", TRANSFORMERS_CASES, ids=lambda c: c.name)
def test_reference_matches_transformers(case: Case) -> None:
    """The float64 reference and transformers' PyTorch ViT (eager) agree at the docs/NUMERICS.md bound."""
    torch = pytest.importorskip("torch")
    from .cases import assert_close, forward_options, max_diffs

    state = make_state(case)
    inputs = make_inputs(case)
    model = _transformers_model(case, state)
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["pixel_values"]), **kwargs, **forward_options(case))
    ref = forward(state, case.vit_config, inputs["pixel_values"], case.task,
                  interpolate_pos_encoding=case.interpolate_pos_encoding, add_pooling_layer=case.add_pooling_layer,
                  **{k: v for k, v in inputs.items() if k != "pixel_values"})
    expected = {k: v for k, v in ref.items()}
    got = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in out.items()}
    if ref.get("loss") is not None:
        got["loss"] = float(out.loss)
    got["hidden_states"] = [h.numpy() for h in out.hidden_states]
    got["attentions"] = [a.numpy() for a in out.attentions]
    assert_close(max_diffs(expected, got, what=case.name), 1e-5, what=case.name)
