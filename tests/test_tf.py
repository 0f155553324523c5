"""vit_tf against the float64 reference, vit_torch, transformers 4.57.6 (PyTorch and TF) and itself.

Every case of tests/cases.py runs on the fused path, the eager path and the path forced by
output_attentions; every output, hidden state, attention map and loss is compared at the
NUMERICS.md bound. Then the TensorFlow features: tf.function and XLA, dtypes, dropout and seeds,
errors, weights (layouts, paths, init, strict loading) and the layer primitives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import vit_tf  # noqa: E402
from vit_core.activations import ACTIVATIONS as NP_ACTIVATIONS  # noqa: E402
from vit_core.checkpoint_io import CheckpointError  # noqa: E402
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput  # noqa: E402
from vit_core.reference import forward as reference_forward  # noqa: E402
from vit_core.reference import layer_norm as np_layer_norm  # noqa: E402
from vit_core.reference import patch_embed as np_patch_embed  # noqa: E402
from vit_core.reference import pixel_shuffle as np_pixel_shuffle  # noqa: E402
from vit_core.reference import softmax as np_softmax  # noqa: E402
from vit_core.resample import bicubic_matrix as np_bicubic_matrix  # noqa: E402
from vit_core.resample import resample_position_embeddings  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_core.weights import weight_table  # noqa: E402
from vit_tf import (  # noqa: E402
    TFViTForImageClassification,
    TFViTForMaskedImageModeling,
    TFViTModel,
    ViTConfig,
    canonical_state,
    load_canonical_state,
)
from vit_tf import layers  # noqa: E402
from vit_tf.weights import LAYOUTS, get_variable  # noqa: E402

from .cases import CASES, TINY, Case, assert_close, forward_options, make_inputs, make_state, max_diffs  # noqa: E402
from .test_core import transformers_supports  # noqa: E402

SMALL = TOLERANCES["small"]
FUSED_EAGER_F32 = TOLERANCES["fused_vs_eager_float32"]
FUSED_EAGER_BF16 = TOLERANCES["fused_vs_eager_bfloat16"]

MODEL_CLASSES = {"base": TFViTModel, "classification": TFViTForImageClassification, "mim": TFViTForMaskedImageModeling}
CASES_BY_NAME = {case.name: case for case in CASES}

# NUMERICS.md: no TF32 (it only matters on GPUs; pinned so the bound means the same everywhere).
tf.config.experimental.enable_tensor_float_32_execution(False)


# ------------------------------------------------------------------------------ helpers
def build(case: Case, state: dict[str, np.ndarray] | None = None, **kwargs: Any) -> vit_tf.TFViTPreTrainedModel:
    """The case's vit_tf model with the case's seeded canonical weights."""
    model = MODEL_CLASSES[case.task](case.vit_config, **case.table_kwargs, **kwargs)
    load_canonical_state(model, make_state(case) if state is None else state)
    return model


def as_numpy(output: Any) -> dict[str, Any]:
    """Model output -> dict of float64 numpy arrays (lists of them for hidden states / attentions)."""
    result: dict[str, Any] = {}
    for key, value in output.items():
        if isinstance(value, (tuple, list)):
            result[key] = [np.asarray(tf.cast(v, tf.float64)) for v in value]
        else:
            result[key] = np.asarray(tf.cast(value, tf.float64))
    return result


_REFERENCE: dict[str, dict[str, Any]] = {}


def reference(case: Case) -> dict[str, Any]:
    """The float64 reference outputs of a case (computed once per case name)."""
    if case.name not in _REFERENCE:
        inputs = make_inputs(case)
        extra = {k: v for k, v in inputs.items() if k != "pixel_values"}
        _REFERENCE[case.name] = reference_forward(
            make_state(case), case.vit_config, inputs["pixel_values"], case.task,
            interpolate_pos_encoding=case.interpolate_pos_encoding, add_pooling_layer=case.add_pooling_layer, **extra)
    return _REFERENCE[case.name]


def without(expected: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in expected.items() if k not in keys}


# Three ways through attention: the fused path (attentions not asked; a head mask still forces
# eager), attn_implementation="eager", and the fused model forced onto the eager path by
# output_attentions=True (the only one that returns attention maps).
PATHS = {
    "fused": ({"attn_implementation": "fused"}, {"output_attentions": False}),
    "eager": ({"attn_implementation": "eager"}, {"output_attentions": False}),
    "fused+attentions": ({"attn_implementation": "fused"}, {"output_attentions": True}),
}


# ------------------------------------------------------------------------------ the case table
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_matches_reference(case: Case, path: str) -> None:
    model_kwargs, call_kwargs = PATHS[path]
    model = build(case, **model_kwargs)
    options = {**forward_options(case), **call_kwargs}
    out = model(**make_inputs(case), **options)
    expected = reference(case)
    if not options["output_attentions"]:
        assert out.attentions is None, f"{case.name}/{path}: attentions returned though not asked for"
        expected = without(expected, "attentions")
    diffs = max_diffs(expected, as_numpy(out), what=f"{case.name}/{path}")
    assert_close(diffs, SMALL, what=f"{case.name}/{path} vs reference")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fused_matches_eager(case: Case) -> None:
    """Same weights, same inputs: the fused and the written-out attention agree to 1e-5 in float32."""
    state = make_state(case)
    options = {**forward_options(case), "output_attentions": False}
    fused = build(case, state, attn_implementation="fused")(**make_inputs(case), **options)
    eager = build(case, state, attn_implementation="eager")(**make_inputs(case), **options)
    assert_close(max_diffs(as_numpy(eager), as_numpy(fused), what=case.name), FUSED_EAGER_F32,
                 what=f"{case.name} fused vs eager")


def test_fused_path_skips_the_probabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without attentions or a head mask the fused kernel runs, never the eager one; with either,
    the eager one (so a head mask or output_attentions is never silently ignored)."""
    import vit_tf.modeling as modeling

    calls = {"fused": 0, "eager": 0}

    def counting(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(modeling, "fused_attention", counting("fused", modeling.fused_attention))
    monkeypatch.setattr(modeling, "eager_attention", counting("eager", modeling.eager_attention))
    case = CASES_BY_NAME["tiny"]
    model = build(case)
    x = make_inputs(case)["pixel_values"]
    model(x)
    assert calls == {"fused": 2, "eager": 0}
    model(x, output_attentions=True)
    model(x, head_mask=np.ones(4, np.float32))
    assert calls == {"fused": 2, "eager": 4}


# ------------------------------------------------------------------------------ tf.function and XLA
GRAPH_CASES = ["tiny", "cls-interp-head-mask", "mim-masked", "cls-single-label"]


@pytest.mark.parametrize("name", GRAPH_CASES)
def test_tf_function_and_xla_match_eager(name: str) -> None:
    """eager == tf.function == tf.function(jit_compile=True) on every output, at 1e-5; the output
    object comes back through tf.function intact."""
    case = CASES_BY_NAME[name]
    model = build(case)
    inputs = {k: tf.constant(v) for k, v in make_inputs(case).items()}
    options = forward_options(case)
    expected = as_numpy(model(**inputs, **options))

    def forward(inputs: dict[str, tf.Tensor]) -> Any:
        return model(**inputs, **options)

    for mode, fn in (("tf.function", tf.function(forward)), ("xla", tf.function(forward, jit_compile=True))):
        out = fn(inputs)
        assert type(out).__name__.startswith("TF"), f"{name}/{mode}: got {type(out)}"
        assert_close(max_diffs(expected, as_numpy(out), what=f"{name}/{mode}"), SMALL, what=f"{name} {mode} vs eager")


def test_tf_function_with_dynamic_batch() -> None:
    """A trace with an unknown batch size (as SavedModel serving uses) serves batch 1 and 3."""
    case = CASES_BY_NAME["mask-token"]
    model = build(case)
    spec = [tf.TensorSpec([None, 3, 32, 32], tf.float32), tf.TensorSpec([None, 16], tf.bool)]
    fn = tf.function(lambda x, m: model(x, m).last_hidden_state, input_signature=spec)
    inputs = make_inputs(case)
    for batch in (1, 3):
        got = fn(inputs["pixel_values"][:batch], inputs["bool_masked_pos"][:batch]).numpy()
        want = reference(case)["last_hidden_state"][:batch]
        assert np.abs(got - want).max() < SMALL


# ------------------------------------------------------------------------------ other frameworks
def _torch_outputs(case: Case, model: Any) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    inputs = {k: torch.from_numpy(v) for k, v in make_inputs(case).items()}
    with torch.no_grad():
        out = model(**inputs, **forward_options(case))
    result: dict[str, Any] = {}
    for key, value in out.items():
        if isinstance(value, (tuple, list)):
            result[key] = [v.to(torch.float64).numpy() for v in value]
        else:
            result[key] = value.to(torch.float64).numpy()
    return result


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_matches_vit_torch(case: Case) -> None:
    """vit_tf and vit_torch on the same canonical weights: every output at 1e-5."""
    pytest.importorskip("torch")
    vit_torch = pytest.importorskip("vit_torch")
    classes = {"base": vit_torch.ViTModel, "classification": vit_torch.ViTForImageClassification,
               "mim": vit_torch.ViTForMaskedImageModeling}
    state = make_state(case)
    theirs = classes[case.task](case.vit_config, **case.table_kwargs)
    vit_torch.load_canonical_state(theirs, state)
    expected = _torch_outputs(case, theirs.eval())
    ours = as_numpy(build(case, state)(**make_inputs(case), **forward_options(case)))
    assert_close(max_diffs(expected, ours, what=case.name), SMALL, what=f"{case.name} vs vit_torch")


TRANSFORMERS_CASES = [c for c in CASES if transformers_supports(c)]


@pytest.mark.parametrize("case", TRANSFORMERS_CASES, ids=lambda c: c.name)
def test_case_matches_transformers_pytorch(case: Case) -> None:
    """transformers 4.57.6's PyTorch ViT (eager attention) on the same weights: every output at 1e-5."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(**case.vit_config.to_dict())
    config._attn_implementation = "eager"
    if case.task == "base":
        theirs = transformers.ViTModel(config, add_pooling_layer=case.add_pooling_layer,
                                       use_mask_token=case.use_mask_token)
    elif case.task == "classification":
        theirs = transformers.ViTForImageClassification(config)
    else:
        theirs = transformers.ViTForMaskedImageModeling(config)
    state = make_state(case)
    missing, unexpected = theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "mask_token" not in k]
    expected = _torch_outputs(case, theirs.eval())
    ours = as_numpy(build(case, state)(**make_inputs(case), **forward_options(case)))
    assert_close(max_diffs(expected, ours, what=case.name), SMALL, what=f"{case.name} vs transformers PT")


def transformers_tf_supports(case: Case) -> bool:
    """transformers' TF ViT: TFViTModel (no mask token) and TFViTForImageClassification, no head
    mask (its TF main layer raises NotImplementedError for one), and its position interpolation uses tf.image.resize's bicubic (a different kernel): no interpolate cases.
    Its TF activation table has no "gelu_pytorch_tanh" (the same function as "gelu_new", tested there)."""
    return (transformers_supports(case) and case.task != "mim" and not case.use_mask_token
            and not case.interpolate_pos_encoding and case.head_mask is None
            and case.vit_config.hidden_act != "gelu_pytorch_tanh")


TRANSFORMERS_TF_CASES = [c for c in CASES if transformers_tf_supports(c)]


@pytest.mark.parametrize("case", TRANSFORMERS_TF_CASES, ids=lambda c: c.name)
def test_case_matches_transformers_tf(case: Case, tmp_path: Any) -> None:
    """transformers 4.57.6's TFViTModel / TFViTForImageClassification (tf_keras) loading the same
    weights from a tf_model.h5: every output at 1e-5, and the single-label loss."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tf_keras")
    from vit_core.checkpoint_io import write_tf_h5

    state = make_state(case)
    case.vit_config.save_pretrained(tmp_path)
    write_tf_h5(state, tmp_path / "tf_model.h5")
    if case.task == "base":  # (head masks are not implemented in transformers' TF ViT: not compared)
        theirs = transformers.TFViTModel.from_pretrained(tmp_path, add_pooling_layer=case.add_pooling_layer)
    else:
        theirs = transformers.TFViTForImageClassification.from_pretrained(tmp_path)
    inputs = make_inputs(case)
    labels = inputs.pop("labels", None)
    out = theirs(**inputs, output_hidden_states=True, output_attentions=True, training=False)
    expected = {k: v for k, v in as_numpy(out).items() if k != "loss"}
    ours = as_numpy(build(case, state)(**inputs, **forward_options(case)))
    ours.pop("loss", None)
    assert_close(max_diffs(expected, ours, what=case.name), SMALL, what=f"{case.name} vs transformers TF")
    if case.labels == "int":  # transformers' TF loss is per example: its mean is the PyTorch loss
        theirs_loss = float(np.mean(theirs(**inputs, labels=labels).loss))
        ours_loss = float(build(case, state)(**inputs, labels=labels).loss)
        assert abs(theirs_loss - ours_loss) < SMALL


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("case", [CASES_BY_NAME[n] for n in ("tiny", "cls", "mim-masked", "interp-up")],
                         ids=lambda c: c.name)
def test_fused_matches_eager_bfloat16(case: Case) -> None:
    state = make_state(case)
    options = {**forward_options(case), "output_attentions": False}
    fused = build(case, state, dtype="bfloat16", attn_implementation="fused")(**make_inputs(case), **options)
    eager = build(case, state, dtype="bfloat16", attn_implementation="eager")(**make_inputs(case), **options)
    assert_close(max_diffs(as_numpy(eager), as_numpy(fused), what=case.name), FUSED_EAGER_BF16,
                 what=f"{case.name} bfloat16 fused vs eager")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", tf.bfloat16, np.float16])
def test_reduced_precision_weights_compute_and_stay_close(dtype: Any) -> None:
    """Weights are stored and computed in the dtype; LayerNorm and softmax run in float32 (the
    attention rows still sum to 1 to float32 accuracy before the cast); logits stay close."""
    case = CASES_BY_NAME["cls"]
    model = build(case, dtype=dtype)
    name = tf.as_dtype(dtype).name
    assert {v.dtype for v in model.trainable_weights} == {name}
    out = model(**make_inputs(case), output_attentions=True)
    assert out.logits.dtype == name
    diff = np.abs(as_numpy(out)["logits"] - reference(case)["logits"]).max()
    assert diff < TOLERANCES["bfloat16_vs_float32_logits"], diff
    rows = as_numpy(out)["attentions"][0].sum(-1)
    assert np.abs(rows - 1).max() < 1e-2


def test_layer_norm_runs_in_float32() -> None:
    """bfloat16 inputs: statistics in float32, so the result equals the float32 LayerNorm rounded once."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 64)) * 3 + 5).astype(np.float32)
    norm32 = layers.LayerNorm(64, 1e-6, dtype="float32", name="ln")
    norm16 = layers.LayerNorm(64, 1e-6, dtype="bfloat16", name="ln")
    x16 = tf.cast(x, tf.bfloat16)
    want = tf.cast(norm32(tf.cast(x16, tf.float32)), tf.bfloat16)
    assert np.array_equal(np.asarray(norm16(x16)), np.asarray(want))


def test_dtype_argument_errors() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        TFViTModel(ViTConfig(**TINY), dtype="int8")
    with pytest.raises(ValueError, match="attn_implementation"):
        TFViTModel(ViTConfig(**TINY), attn_implementation="flash")
    with pytest.raises(TypeError, match="ViTConfig"):
        TFViTModel(dict(TINY))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ dropout and seeds
DROPOUT = dict(TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def test_training_applies_dropout_and_inference_is_deterministic() -> None:
    model = TFViTForImageClassification(ViTConfig(**DROPOUT), seed=3)
    x = make_inputs(CASES_BY_NAME["cls"])["pixel_values"]
    a, b = model(x).logits.numpy(), model(x, training=False).logits.numpy()
    assert np.array_equal(a, b)
    t1, t2 = model(x, training=True).logits.numpy(), model(x, training=True).logits.numpy()
    assert np.abs(t1 - a).max() > 1e-3 and np.abs(t1 - t2).max() > 1e-3
    # training=True with attention dropout takes the eager path even without output_attentions
    assert model(x, training=True, output_attentions=True).attentions[0].shape == (3, 4, 17, 17)


def test_training_step_under_xla() -> None:
    """A compiled training step: every weight gets a gradient, dropout draws new masks each step."""
    model = TFViTForImageClassification(ViTConfig(**DROPOUT), seed=0)
    x = make_inputs(CASES_BY_NAME["cls"])["pixel_values"]
    labels = np.array([1, 2, 3])

    @tf.function(jit_compile=True)
    def step(x: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = model(x, labels=labels, training=True).loss
        return loss, tape.gradient(loss, model.trainable_weights)

    (loss1, grads), (loss2, _) = step(x, labels), step(x, labels)
    assert len(grads) == len(model.canonical_table()) and all(g is not None for g in grads)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
    assert float(loss1) != float(loss2)


def test_attention_dropout_alone_changes_outputs() -> None:
    model = TFViTModel(ViTConfig(**dict(TINY, attention_probs_dropout_prob=0.5)), seed=0)
    x = make_inputs(CASES_BY_NAME["tiny"])["pixel_values"]
    assert np.abs(model(x, training=True).last_hidden_state - model(x).last_hidden_state).max() > 1e-3


def test_seed_fixes_weights_and_dropout() -> None:
    """seed= fixes the init (per weight, so the backbone is the same in every task model) and the
    dropout streams; keras.utils.set_random_seed fixes an unseeded model."""
    config = ViTConfig(**DROPOUT)
    x = make_inputs(CASES_BY_NAME["cls"])["pixel_values"]
    a, b = TFViTForImageClassification(config, seed=7), TFViTForImageClassification(config, seed=7)
    c = TFViTForImageClassification(config, seed=8)
    sa, sb, sc = canonical_state(a), canonical_state(b), canonical_state(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["vit.embeddings.cls_token"], sc["vit.embeddings.cls_token"])
    assert np.array_equal(a(x, training=True).logits.numpy(), b(x, training=True).logits.numpy())
    base = canonical_state(TFViTModel(config, seed=7))
    assert np.array_equal(base["encoder.layer.1.output.dense.weight"], sa["vit.encoder.layer.1.output.dense.weight"])

    keras.utils.set_random_seed(11)
    d = canonical_state(TFViTModel(config))
    keras.utils.set_random_seed(11)
    e = canonical_state(TFViTModel(config))
    assert all(np.array_equal(d[k], e[k]) for k in d)


def test_random_init_follows_the_table() -> None:
    """trunc_normal: std = initializer_range, nothing beyond 2 std; zeros; ones (the table's init)."""
    config = ViTConfig(**dict(TINY, hidden_size=64, intermediate_size=256, initializer_range=0.05))
    model = TFViTForMaskedImageModeling(config, seed=0)
    state = canonical_state(model)
    for spec in weight_table(config, "mim"):
        value = state[spec.name]
        if spec.init == "zeros":
            assert not value.any(), spec.name
        elif spec.init == "ones":
            assert (value == 1).all(), spec.name
        else:
            assert np.abs(value).max() <= 2 * 0.05 + 1e-7, spec.name
            if value.size >= 4096:
                # a normal cut at 2 std has std 0.88 * sigma
                assert abs(value.std() / (0.05 * 0.8796) - 1) < 0.1, (spec.name, value.std())


# ------------------------------------------------------------------------------ outputs and labels
def test_return_dict_false_and_output_access() -> None:
    case = CASES_BY_NAME["cls-single-label"]
    model = build(case)
    inputs = make_inputs(case)
    out = model(**inputs, output_hidden_states=True)
    assert isinstance(out, ImageClassifierOutput)
    assert out.keys() == ["loss", "logits", "hidden_states"]
    assert out[1] is out.logits and out["loss"] is out.loss
    as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert np.array_equal(as_tuple[1].numpy(), out.logits.numpy())
    base = build(CASES_BY_NAME["no-pooler"])
    base_out = base(make_inputs(CASES_BY_NAME["no-pooler"])["pixel_values"])
    assert isinstance(base_out, BaseModelOutputWithPooling) and base_out.pooler_output is None
    assert len(base_out.to_tuple()) == 1
    mim_out = build(CASES_BY_NAME["mim"])(make_inputs(CASES_BY_NAME["mim"])["pixel_values"])
    assert isinstance(mim_out, MaskedImageModelingOutput) and mim_out.loss is None
    # positional flags as in transformers (Keras would otherwise refuse non-tensor positionals)
    positional = model(inputs["pixel_values"], None, None, True)
    assert len(positional.attentions) == 2


def test_config_output_flags_are_defaults() -> None:
    config = ViTConfig(**dict(TINY, output_attentions=True, output_hidden_states=True))
    out = TFViTModel(config, seed=0)(make_inputs(CASES_BY_NAME["tiny"])["pixel_values"])
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3


def test_num_labels_zero_and_ignore_index() -> None:
    """num_labels == 0: the classifier is the identity (logits = final CLS features). Cross-entropy
    ignores label -100 as torch does."""
    config = ViTConfig(**dict(TINY, num_labels=0))
    model = TFViTForImageClassification(config, seed=0)
    x = make_inputs(CASES_BY_NAME["cls"])["pixel_values"]
    out = model(x)
    assert out.logits.shape == (3, 32)
    assert not [spec for spec in model.canonical_table() if spec.name.startswith("classifier")]
    case = CASES_BY_NAME["cls-single-label"]
    model = build(case)
    logits = model(x).logits.numpy().astype(np.float64)
    labels = np.array([2, -100, 4])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(log_probs[0, 2] + log_probs[2, 4]) / 2
    assert abs(float(model(x, labels=labels).loss) - want) < SMALL


# ------------------------------------------------------------------------------ errors
def _x(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


BAD_INPUTS = [
    ("rank-3", "base", _x(3, 32, 32), {}, "rank 4"),
    ("nhwc", "base", _x(1, 32, 32, 3), {}, "channels"),
    ("uint8", "base", _x(1, 3, 32, 32, dtype=np.uint8), {}, "floating-point"),
    ("int-list", "base", [[[[1]]]], {}, "rank 4|floating-point"),
    ("wrong-size", "base", _x(1, 3, 48, 48), {}, r"Input image size \(48\*48\) doesn't match model \(32\*32\)"),
    ("smaller-than-a-patch", "base", _x(1, 3, 4, 32), {"interpolate_pos_encoding": True}, "smaller than one"),
    ("head-mask-shape", "base", _x(1, 3, 32, 32), {"head_mask": np.ones((3, 4))}, "head_mask must have shape"),
    ("mask-without-token", "base", _x(1, 3, 32, 32), {"bool_masked_pos": np.zeros((1, 16), bool)}, "mask token"),
    ("mask-shape", "mim", _x(2, 3, 32, 32), {"bool_masked_pos": np.zeros((2, 15), bool)}, "bool_masked_pos must have"),
]


@pytest.mark.parametrize("name,task,x,kwargs,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name: str, task: str, x: Any, kwargs: dict[str, Any], message: str) -> None:
    model = MODEL_CLASSES[task](ViTConfig(**TINY), seed=0)
    with pytest.raises(ValueError, match=message):
        model(x, **kwargs)


def test_mim_requires_patch_size_equal_encoder_stride() -> None:
    model = TFViTForMaskedImageModeling(ViTConfig(**dict(TINY, encoder_stride=4)), seed=0)
    x = _x(1, 3, 32, 32)
    assert model(x).reconstruction.shape == (1, 3, 16, 16)  # no mask: runs, like transformers
    with pytest.raises(ValueError, match="`patch_size` must be equal to `encoder_stride`"):
        model(x, bool_masked_pos=np.zeros((1, 16), bool))


def test_traced_spatial_dims_must_be_static() -> None:
    model = TFViTModel(ViTConfig(**TINY), seed=0)
    fn = tf.function(lambda x: model(x).last_hidden_state, input_signature=[tf.TensorSpec([None, 3, None, None])])
    with pytest.raises(ValueError, match="only the batch dimension may be None"):
        fn.get_concrete_function()


# ------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_weights_are_the_canonical_table(case: Case) -> None:
    """Every canonical name resolves by attribute to a variable in the kind's TF layout whose Keras
    path is "<model name>/" + the canonical name with "/" between attributes
    (``tf_vi_t_model/encoder/layer.0/attention/attention/query/weight``); nothing else is trainable."""
    model = build(case)
    table = model.canonical_table()
    assert [spec.name for spec in table] == [spec.name for spec in weight_table(case.vit_config, case.task,
                                                                                 **case.table_kwargs)]
    paths = set()
    for spec in table:
        variable = get_variable(model, spec.name)
        to_tf, _ = LAYOUTS[spec.kind]
        assert tuple(variable.shape) == to_tf(np.empty(spec.shape)).shape, spec.name
        assert variable.path.startswith(model.name + "/"), variable.path
        assert variable.path.removeprefix(model.name + "/").replace("/", ".") == spec.name, variable.path
        paths.add(variable.path)
    assert {v.path for v in model.trainable_weights} == paths


def test_keras_layer_names_equal_attribute_names() -> None:
    model = build(CASES_BY_NAME["mim"])

    def walk(layer: keras.Layer, where: str) -> int:
        count = 0
        for attr, value in vars(layer).items():
            if attr == "_output":  # held privately, read through the ``output`` property
                assert layer.output is value
                attr = "output"
            children = value if isinstance(value, (list, tuple)) else [value]
            for index, child in enumerate(children):
                if isinstance(child, keras.Layer) and not attr.startswith("_"):
                    expected = f"{attr}.{index}" if isinstance(value, (list, tuple)) else attr
                    assert child.name == expected, f"{where}.{attr}: layer named {child.name!r}"
                    count += 1 + walk(child, f"{where}.{expected}")
        return count

    assert walk(model, "model") > 30


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", ["pooler-size-relu", "cls", "mim", "qkv-bias-off", "non-square-patch"])
def test_canonical_state_round_trip_is_bitwise(name: str, dtype: str) -> None:
    case = CASES_BY_NAME[name]
    state = {k: np.asarray(tf.cast(v, dtype)) for k, v in make_state(case).items()}
    model = build(case, state, dtype=dtype)
    back = canonical_state(model)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key].view(np.uint16 if value.itemsize == 2 else np.uint32),
                              value.view(np.uint16 if value.itemsize == 2 else np.uint32)), key


def test_keras_weights_file_round_trip(tmp_path: Any) -> None:
    """model.save_weights / load_weights (Keras' own .weights.h5) restore every canonical weight."""
    case = CASES_BY_NAME["mim"]
    model = build(case)
    model.save_weights(tmp_path / "model.weights.h5")
    other = TFViTForMaskedImageModeling(case.vit_config, seed=1)
    other.load_weights(tmp_path / "model.weights.h5")
    want, got = canonical_state(model), canonical_state(other)
    assert [k for k in want if not np.array_equal(want[k], got[k])] == []


def test_strict_loading_reports_every_bad_key() -> None:
    case = CASES_BY_NAME["cls"]
    state = make_state(case)
    del state["vit.layernorm.bias"]
    state["vit.extra.weight"] = np.zeros(3, np.float32)
    state["classifier.weight"] = np.zeros((7, 32), np.float32)
    model = TFViTForImageClassification(case.vit_config, seed=0)
    before = canonical_state(model)
    with pytest.raises(CheckpointError) as info:
        load_canonical_state(model, state)
    message = str(info.value)
    assert "vit.layernorm.bias (32,)" in message
    assert "vit.extra.weight (3,)" in message
    assert "classifier.weight: given (7, 32) vs model (5, 32)" in message
    after = canonical_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before), "a failed load must change nothing"


# ------------------------------------------------------------------------------ primitives
@pytest.mark.parametrize("name", sorted(NP_ACTIVATIONS))
def test_activation_matches_numpy_reference(name: str) -> None:
    x = np.linspace(-8, 8, 4001)
    got = layers.get_activation(name)(tf.constant(x, tf.float32)).numpy()
    np.testing.assert_allclose(got, NP_ACTIVATIONS[name](x.astype(np.float32).astype(np.float64)), rtol=0, atol=2e-6)


def test_unknown_activation() -> None:
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        layers.get_activation("mish")


@pytest.mark.parametrize("eps", [1e-12, 1e-6])
def test_layer_norm_matches_reference(eps: float) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 48)) * 4 + 10).astype(np.float32)
    weight, bias = 1 + 0.1 * rng.standard_normal(48), 0.1 * rng.standard_normal(48)
    norm = layers.LayerNorm(48, eps, dtype="float32", name="ln")
    norm.weight.assign(weight.astype(np.float32))
    norm.bias.assign(bias.astype(np.float32))
    want = np_layer_norm(x.astype(np.float64), weight.astype(np.float32), bias.astype(np.float32), eps)
    assert np.abs(norm(x).numpy() - want).max() < 1e-5


@pytest.mark.parametrize("sizes", [(4, 7), (7, 4), (3, 6), (6, 2), (14, 24), (24, 14), (2, 9), (5, 5), (1, 3)])
def test_bicubic_matrix_is_the_numpy_one(sizes: tuple[int, int]) -> None:
    assert np.array_equal(layers.bicubic_matrix(*sizes).numpy(), np_bicubic_matrix(*sizes, dtype=np.float32))


@pytest.mark.parametrize("grid,out", [((4, 4), (7, 7)), ((7, 7), (4, 4)), ((3, 5), (6, 2)), ((4, 6), (5, 3))])
def test_position_resampling_matches_reference(grid: tuple[int, int], out: tuple[int, int]) -> None:
    """Up, down, square and non-square; and not tf.image.resize, whose bicubic differs."""
    rng = np.random.default_rng(0)
    table = (0.5 * rng.standard_normal((1, 1 + grid[0] * grid[1], 16))).astype(np.float32)
    got = layers.resample_position_grid(tf.constant(table[:, 1:]), grid, out).numpy()
    want = resample_position_embeddings(table, grid, out)[:, 1:]
    assert np.abs(got - want).max() < 1e-6
    resized = tf.image.resize(table[:, 1:].reshape(1, *grid, 16), out, method="bicubic").numpy()
    assert np.abs(resized.reshape(got.shape) - want).max() > 1e-3  # the kernel tf.image.resize would give


@pytest.mark.parametrize("patch", [(8, 8), (4, 8)])
def test_patch_embedding_matches_reference(patch: tuple[int, int]) -> None:
    """The HWIO convolution (NCHW input transposed inside) equals the reference's patches @ kernel,
    also with pixels past the last whole patch (dropped)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 35, 37)).astype(np.float32)
    weight = (0.2 * rng.standard_normal((24, 3, *patch))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(24)).astype(np.float32)
    embed = vit_tf.ViTPatchEmbeddings(3, 24, patch, dtype="float32")
    embed.projection.weight.assign(LAYOUTS["conv"][0](weight))
    embed.projection.bias.assign(bias)
    assert np.abs(embed(x).numpy() - np_patch_embed(x.astype(np.float64), weight, bias)).max() < 1e-5


def test_pixel_shuffle_matches_reference() -> None:
    x = np.arange(2 * 12 * 3 * 4, dtype=np.float32).reshape(2, 12, 3, 4)  # NCHW, as the reference takes it
    got = layers.PixelShuffle(2, dtype="float32", name="shuffle")(tf.transpose(x, (0, 2, 3, 1))).numpy()
    assert np.array_equal(got, np_pixel_shuffle(x, 2))


def test_attention_kernels_match_reference() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 9, 8)).astype(np.float32) for _ in range(3))
    mask = np.array([1.0, 0.0, 0.5], np.float32).reshape(1, 3, 1, 1)
    probs = np_softmax(q.astype(np.float64) @ k.transpose(0, 1, 3, 2) / np.sqrt(8)) * mask
    context, got_probs = layers.eager_attention(q, k, v, 8**-0.5, tf.constant(mask), None)
    assert np.abs(got_probs.numpy() - probs).max() < 1e-6
    assert np.abs(context.numpy() - probs @ v).max() < 1e-5
    fused = layers.fused_attention(q, k, v, 8**-0.5).numpy()
    assert np.abs(fused - np_softmax(q.astype(np.float64) @ k.transpose(0, 1, 3, 2) / np.sqrt(8)) @ v).max() < 1e-5


# ------------------------------------------------------------------------------ packaging
def test_import_vit_tf_imports_no_other_framework() -> None:
    code = ("import sys, vit_tf; print(sorted(m for m in ('torch', 'jax', 'jaxlib', 'flax', 'tf_keras', 'transformers') "
            "if sys.modules.get(m) is not None))")
    # transformers' TF classes (imported by other tests) set TF_USE_LEGACY_KERAS=1, which makes
    # TensorFlow itself import tf_keras: the check runs in a clean environment.
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_missing_tensorflow_names_the_extra() -> None:
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "try:\n    import vit_tf\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install vitx[tf]" in out
