"""vit_flax against the float64 reference, transformers 4.57.6 (PyTorch and Flax), vit_torch, vit_tf
and itself.

Every case of tests/cases.py runs on the fused path, the eager path and the eager path forced by
output_attentions; every output, hidden state, attention map and loss is compared at the
NUMERICS.md bound. Then the framework features: the compiled call (no retrace), functional use
(jit / grad / vmap, an optax step), pytree outputs, dropout keys, dtypes, jax.export, errors,
init, weight round trips and the layer primitives.
"""

from __future__ import annotations

import functools
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

import vit_flax  # noqa: E402
from vit_core.activations import ACTIVATIONS as NP_ACTIVATIONS  # noqa: E402
from vit_core.checkpoint_io import CheckpointError  # noqa: E402
from vit_core.reference import forward as reference_forward  # noqa: E402
from vit_core.reference import patch_embed as np_patch_embed  # noqa: E402
from vit_core.reference import pixel_shuffle as np_pixel_shuffle  # noqa: E402
from vit_core.resample import resample_position_embeddings  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_core.weights import parameter_count, weight_table  # noqa: E402
from vit_flax import (  # noqa: E402
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
    ViTConfig,
    canonical_state,
    load_canonical_state,
)
from vit_flax import layers  # noqa: E402
from vit_flax import modeling  # noqa: E402
from vit_flax.weights import flax_path  # noqa: E402

from .cases import CASES, TINY, Case, assert_close, forward_options, make_inputs, make_state, max_diffs  # noqa: E402
from .test_core import transformers_supports  # noqa: E402

SMALL = TOLERANCES["small"]
FUSED_EAGER_F32 = TOLERANCES["fused_vs_eager_float32"]
FUSED_EAGER_BF16 = TOLERANCES["fused_vs_eager_bfloat16"]
BF16_LOGITS = TOLERANCES["bfloat16_vs_float32_logits"]
BASE_REAL = TOLERANCES["base_real_images"]

MODEL_CLASSES = {"base": FlaxViTModel, "classification": FlaxViTForImageClassification,
                 "mim": FlaxViTForMaskedImageModeling}
REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _pin_precision() -> Any:
    """NUMERICS.md: float32 matmuls at full precision (conftest sets the environment default too)."""
    with jax.default_matmul_precision("highest"):
        yield


# ------------------------------------------------------------------------------ helpers
def build(case: Case, state: dict[str, np.ndarray] | None = None, **kwargs: Any) -> modeling.FlaxViTPreTrainedModel:
    """The case's vit_flax model with the case's seeded canonical weights."""
    model = MODEL_CLASSES[case.task](case.vit_config, **case.table_kwargs, **kwargs)
    load_canonical_state(model, make_state(case) if state is None else state)
    return model


def as_numpy(output: Any) -> dict[str, Any]:
    """Model output -> dict of float64 numpy arrays (lists of them for hidden states / attentions)."""
    result: dict[str, Any] = {}
    for key, value in output.items():
        if isinstance(value, (tuple, list)):
            result[key] = [np.asarray(v, dtype=np.float64) for v in value]
        else:
            result[key] = np.asarray(value, dtype=np.float64)
    return result


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> dict[str, Any]:
    case = next(c for c in CASES if c.name == name)
    inputs = make_inputs(case)
    extra = {k: v for k, v in inputs.items() if k != "pixel_values"}
    return reference_forward(make_state(case), case.vit_config, inputs["pixel_values"], case.task,
                             interpolate_pos_encoding=case.interpolate_pos_encoding,
                             add_pooling_layer=case.add_pooling_layer, **extra)


def reference(case: Case) -> dict[str, Any]:
    """The float64 reference outputs of a case (computed once per case)."""
    return _reference(case.name)


def without(expected: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in expected.items() if k not in keys}


# Two ways through attention on every case: the fused path (attentions not asked; a head mask
# still forces eager) and the eager path forced by output_attentions=True (the only one that
# returns attention maps). attn_implementation="eager" is the same eager code: it is checked on a
# subset (test_eager_implementation_matches_reference) to keep compile time down.
PATHS = {
    "fused": ({"attn_implementation": "fused"}, {"output_attentions": False}),
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
    """Same weights, same inputs: jax.nn.dot_product_attention and the written-out attention agree
    to 1e-5 on every output, hidden state and loss (the eager run is the one that returned the
    attention maps; both executables are cached from test_case_matches_reference)."""
    model = build(case)
    fused = as_numpy(model(**make_inputs(case), **{**forward_options(case), "output_attentions": False}))
    eager = without(as_numpy(model(**make_inputs(case), **forward_options(case))), "attentions")
    assert_close(max_diffs(fused, eager, what=case.name), FUSED_EAGER_F32, what=f"{case.name}: fused vs eager")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("tiny", "interp-up", "cls-multi-label", "mim-masked")],
                         ids=lambda c: c.name)
def test_eager_implementation_matches_reference(case: Case) -> None:
    """attn_implementation="eager" without attention maps: the reference, and the fused path, at 1e-5."""
    model = build(case, attn_implementation="eager")
    options = {**forward_options(case), "output_attentions": False}
    out = model(**make_inputs(case), **options)
    assert out.attentions is None
    assert_close(max_diffs(without(reference(case), "attentions"), as_numpy(out), what=case.name), SMALL,
                 what=f"{case.name}/eager vs reference")


JIT_SUBSET = [c for c in CASES if c.name in ("head-mask-2d", "cls-single-label")]


@pytest.mark.parametrize("case", JIT_SUBSET, ids=lambda c: c.name)
def test_jitted_matches_not_jitted(case: Case) -> None:
    """model(...) (compiled) against the same forward run op by op under jax.disable_jit()."""
    model = build(case)
    inputs = make_inputs(case)
    compiled = as_numpy(model(**inputs, **forward_options(case)))
    with jax.disable_jit():
        eager_ops = model.forward(**{k: jnp.asarray(v) for k, v in inputs.items()}, **forward_options(case))
    assert_close(max_diffs(compiled, eager_ops, what=case.name), SMALL, what=f"{case.name}: jit vs no jit")


def test_fused_path_really_runs_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path calls jax.nn.dot_product_attention; output_attentions or a head mask switch to eager."""
    calls = {"fused": 0, "eager": 0}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(modeling, "fused_attention", counting("fused", layers.fused_attention))
    monkeypatch.setattr(modeling, "eager_attention", counting("eager", layers.eager_attention))
    case = CASES[0]
    n = case.vit_config.num_hidden_layers
    x = make_inputs(case)["pixel_values"]
    model = build(case)
    # forward (not the compiled call: a cached executable would not run Python again)
    with jax.disable_jit():
        model.forward(x)
        assert calls == {"fused": n, "eager": 0}
        model.forward(x, output_attentions=True)
        assert calls == {"fused": n, "eager": n}
        model.forward(x, head_mask=jnp.ones(case.vit_config.num_attention_heads))
        assert calls == {"fused": n, "eager": 2 * n}
        model.set_attn_implementation("eager")
        model.forward(x)
        assert calls == {"fused": n, "eager": 3 * n}


# ------------------------------------------------------------------------------ vs transformers
def transformers_torch_model(case: Case, state: dict[str, np.ndarray]) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(**case.vit_config.to_dict())
    config._attn_implementation = "eager"
    if case.task == "base":
        model = transformers.ViTModel(config, add_pooling_layer=case.add_pooling_layer,
                                      use_mask_token=case.use_mask_token)
    elif case.task == "classification":
        model = transformers.ViTForImageClassification(config)
    else:
        model = transformers.ViTForMaskedImageModeling(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()


TRANSFORMERS_CASES = [c for c in CASES if transformers_supports(c)]


@pytest.mark.parametrize("case", TRANSFORMERS_CASES, ids=lambda c: c.name)
def test_case_matches_transformers_pytorch(case: Case) -> None:
    """Every output, hidden state, attention map and loss against transformers' PyTorch ViT (eager)."""
    torch = pytest.importorskip("torch")
    state = make_state(case)
    inputs = make_inputs(case)
    theirs = transformers_torch_model(case, state)
    with torch.no_grad():
        out = theirs(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **forward_options(case))
    expected = {k: [t.numpy() for t in v] if isinstance(v, tuple) else v.numpy() for k, v in out.items()}
    got = build(case, state)(**inputs, **forward_options(case))
    assert_close(max_diffs(expected, got, what=case.name), SMALL, what=f"{case.name} vs transformers PyTorch")


def transformers_flax_supports(case: Case) -> bool:
    """transformers' FlaxViT has no interpolation, head mask, mask token, MIM head or loss."""
    return (transformers_supports(case) and case.task in ("base", "classification") and case.head_mask is None
            and not case.bool_masked_pos and not case.use_mask_token and case.image_hw is None
            and case.labels is None and case.vit_config.hidden_act != "gelu_fast")


FLAX_CASES = [c for c in CASES if transformers_flax_supports(c)]


def transformers_flax_model(case: Case) -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(**case.vit_config.to_dict())
    # _do_init=False: no random init (the params are ours); params_shape_tree still describes them
    if case.task == "base":
        return transformers.FlaxViTModel(config, add_pooling_layer=case.add_pooling_layer, _do_init=False)
    return transformers.FlaxViTForImageClassification(config, _do_init=False)


@pytest.mark.parametrize("case", FLAX_CASES, ids=lambda c: c.name)
def test_case_matches_transformers_flax(case: Case) -> None:
    """Our nnx state has exactly the tree of transformers' FlaxViT params (same paths and shapes),
    and with the same values every output, hidden state and attention map agrees to 1e-5."""
    from flax.traverse_util import flatten_dict

    ours = build(case)
    theirs = transformers_flax_model(case)
    params = ours.params
    expected_tree = {k: v.shape for k, v in flatten_dict(theirs.params_shape_tree).items()}
    assert {k: v.shape for k, v in flatten_dict(params).items()} == expected_tree
    inputs = make_inputs(case)
    out = theirs(inputs["pixel_values"], params=params, output_hidden_states=True, output_attentions=True)
    expected = {k: [np.asarray(t) for t in v] if isinstance(v, tuple) else np.asarray(v) for k, v in out.items()}
    got = as_numpy(ours(inputs["pixel_values"], output_hidden_states=True, output_attentions=True,
                        interpolate_pos_encoding=case.interpolate_pos_encoding))
    got.pop("loss", None)
    assert_close(max_diffs(expected, got, what=case.name), SMALL, what=f"{case.name} vs transformers Flax")


# ------------------------------------------------------------------------------ vs vit_torch and vit_tf
def _other_framework_output(framework: str, case: Case, state: dict[str, np.ndarray],
                            inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    if framework == "torch":
        torch = pytest.importorskip("torch")
        vit_torch = pytest.importorskip("vit_torch")
        classes = {"base": vit_torch.ViTModel, "classification": vit_torch.ViTForImageClassification,
                   "mim": vit_torch.ViTForMaskedImageModeling}
        model = classes[case.task](case.vit_config, **case.table_kwargs)
        vit_torch.load_canonical_state(model, state)
        with torch.no_grad():
            out = model.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()}, **forward_options(case))
        return {k: [t.numpy() for t in v] if isinstance(v, tuple) else v.numpy() for k, v in out.items()}
    vit_tf = pytest.importorskip("vit_tf")
    classes = {"base": vit_tf.TFViTModel, "classification": vit_tf.TFViTForImageClassification,
               "mim": vit_tf.TFViTForMaskedImageModeling}
    model = classes[case.task](case.vit_config, **case.table_kwargs)
    vit_tf.load_canonical_state(model, state)
    out = model(**inputs, **forward_options(case), training=False)
    return {k: [np.asarray(t) for t in v] if isinstance(v, tuple) else np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("framework", ["torch", "tf"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_matches_other_frameworks(case: Case, framework: str) -> None:
    """Same canonical weights and inputs in vit_torch / vit_tf: every output agrees to 1e-5."""
    state = make_state(case)
    inputs = make_inputs(case)
    expected = _other_framework_output(framework, case, state, inputs)
    got = build(case, state)(**inputs, **forward_options(case))
    assert_close(max_diffs(expected, got, what=case.name), SMALL, what=f"{case.name}: vit_flax vs vit_{framework}")


# ------------------------------------------------------------------------------ compiled call
def test_second_call_does_not_retrace(monkeypatch: pytest.MonkeyPatch) -> None:
    """model(...) traces forward once per (shapes, options); a second model of the same
    architecture shares the compilation; a new shape, option or config value retraces."""
    traces = {"n": 0}
    original = FlaxViTForImageClassification.forward

    def counting_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        traces["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlaxViTForImageClassification, "forward", counting_forward)
    config = ViTConfig(**TINY, hidden_dropout_prob=0.125)  # a config no other test compiles
    model = FlaxViTForImageClassification(config)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    first = model(x).logits
    assert traces["n"] == 1
    second = model(x).logits
    assert traces["n"] == 1, "the second call with the same shapes retraced"
    assert np.array_equal(np.asarray(first), np.asarray(second))
    FlaxViTForImageClassification(ViTConfig(**TINY, hidden_dropout_prob=0.125), seed=1)(x)
    assert traces["n"] == 1, "a second model of the same architecture retraced"
    model(x[:1])
    assert traces["n"] == 2
    model(x, output_hidden_states=True)
    assert traces["n"] == 3
    model(x, output_hidden_states=True)
    assert traces["n"] == 3
    labels = np.array([1, 0])
    loss_ce = model(x, labels=labels).loss
    assert traces["n"] == 4
    model.config.problem_type = "regression"  # read at trace time: must retrace, not reuse
    with pytest.raises(ValueError, match="broadcasting"):
        model(x, labels=labels)  # regression against (batch,) labels with 5 logits does not broadcast
    model.config.problem_type = None
    assert np.array_equal(np.asarray(model(x, labels=labels).loss), np.asarray(loss_ce))


def test_functional_jit_grad_vmap() -> None:
    """graphdef, state = nnx.split(model); nnx.merge(graphdef, state).forward is a pure function
    usable under jax.jit, jax.grad and jax.vmap."""
    case = next(c for c in CASES if c.name == "cls-single-label")
    model = build(case)
    inputs = make_inputs(case)
    x, y = jnp.asarray(inputs["pixel_values"]), jnp.asarray(inputs["labels"])
    graphdef, state = nnx.split(model)

    def loss_fn(state: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state).forward(x, labels=y).loss

    loss_jit = jax.jit(loss_fn)
    loss = loss_jit(state, x, y)
    assert abs(float(loss) - reference(case)["loss"]) <= SMALL
    grads = jax.jit(jax.grad(loss_fn))(state, x, y)
    leaves = jax.tree_util.tree_leaves(grads)
    assert len(leaves) == len(weight_table(case.vit_config, "classification"))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert float(jnp.abs(grads["classifier"]["kernel"][...]).max()) > 0
    # finite difference on one weight agrees with the gradient
    eps = 1e-2
    bias = np.asarray(state["classifier"]["bias"][...])
    bumped = jax.tree_util.tree_map(lambda a: a, state)
    bumped["classifier"]["bias"].set_value(jnp.asarray(bias + np.eye(len(bias), dtype=np.float32)[0] * eps))
    numeric = (float(loss_jit(bumped, x, y)) - float(loss)) / eps
    assert abs(numeric - float(grads["classifier"]["bias"][...][0])) < 1e-2

    def logits_fn(state: nnx.State, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state).forward(x).logits

    stacked = jnp.stack([x, x[::-1]])  # (2, batch, C, H, W): vmap over the leading axis
    vmapped = jax.vmap(logits_fn, in_axes=(None, 0))(state, stacked)
    assert vmapped.shape == (2, *reference(case)["logits"].shape)
    np.testing.assert_allclose(np.asarray(vmapped[0]), reference(case)["logits"], atol=SMALL, rtol=0)
    np.testing.assert_allclose(np.asarray(vmapped[1]), reference(case)["logits"][::-1], atol=SMALL, rtol=0)


def test_optax_adamw_step_reduces_the_loss() -> None:
    optax = pytest.importorskip("optax")
    config = ViTConfig(**TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = FlaxViTForImageClassification(config, seed=0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    y = jnp.asarray(np.array([0, 1, 2, 3]))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params: nnx.State, opt_state: Any, key: jax.Array) -> tuple[nnx.State, Any, jax.Array]:
        def loss_fn(p: nnx.State) -> jax.Array:
            return nnx.merge(graphdef, p).forward(x, labels=y, train=True, dropout_rng=key).loss
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = float(model(x, labels=y).loss)
    for step in range(3):
        params, opt_state, _ = train_step(params, opt_state, jax.random.key(step))
    nnx.update(model, params)
    after = float(model(x, labels=y).loss)
    assert after < before, f"loss {before:.4f} -> {after:.4f}"


def test_transformers_flax_params_idiom() -> None:
    """model.params, model(x, params=...) under jax.grad and model.params = ..., as with
    transformers' Flax classes (same tree: layer indices are strings)."""
    case = next(c for c in CASES if c.name == "cls-single-label")
    model = build(case)
    inputs = make_inputs(case)
    x, y = inputs["pixel_values"], inputs["labels"]
    params = model.params
    assert params["vit"]["encoder"]["layer"]["1"]["intermediate"]["dense"]["kernel"].shape == (32, 37)
    loss, grads = jax.value_and_grad(lambda p: model(x, labels=y, params=p).loss)(params)
    assert abs(float(loss) - reference(case)["loss"]) <= SMALL
    stepped = jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads)
    assert float(model(x, labels=y, params=stepped).loss) < float(loss)
    model.params = stepped
    assert np.array_equal(np.asarray(model.classifier.kernel[...]), np.asarray(stepped["classifier"]["kernel"]))
    assert float(model(x, labels=y).loss) == float(model(x, labels=y, params=stepped).loss)
    broken = {**stepped, "classifier": {"kernel": stepped["classifier"]["kernel"][:, :2]}}
    with pytest.raises(ValueError, match=r"missing classifier/bias \(5,\).*classifier/kernel: given \(32, 2\) vs model \(32, 5\)"):
        model(x, params=broken)


def test_outputs_are_pytrees_and_tuples() -> None:
    case = next(c for c in CASES if c.name == "cls-single-label")
    model = build(case)
    inputs = make_inputs(case)
    out = model(**inputs, output_hidden_states=True)
    leaves = jax.tree_util.tree_leaves(out)
    assert len(leaves) == 2 + case.vit_config.num_hidden_layers + 1  # loss, logits, hidden states
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, out)
    assert type(doubled) is type(out) and np.allclose(doubled.logits, 2 * np.asarray(out.logits))
    assert out[0] is out.loss and out["logits"] is out.logits and "attentions" not in out
    as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert np.array_equal(np.asarray(as_tuple[1]), np.asarray(out.logits))


def test_config_output_flags_are_defaults() -> None:
    config = ViTConfig(**TINY, output_hidden_states=True, return_dict=False)
    model = FlaxViTModel(config)
    out = model(np.zeros((1, 3, 32, 32), np.float32))
    assert isinstance(out, tuple) and len(out) == 3  # last, pooler, hidden states
    assert isinstance(model(np.zeros((1, 3, 32, 32), np.float32), output_hidden_states=False, return_dict=True),
                      vit_flax.modeling.BaseModelOutputWithPooling)


# ------------------------------------------------------------------------------ dropout
def test_train_applies_dropout_with_an_explicit_key() -> None:
    config = ViTConfig(**TINY, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = FlaxViTForImageClassification(config)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    evaluated = np.asarray(model(x).logits)
    assert np.array_equal(evaluated, np.asarray(model(x, dropout_rng=jax.random.key(0)).logits)), \
        "a key without train=True must not apply dropout"
    a = np.asarray(model(x, train=True, dropout_rng=jax.random.key(0)).logits)
    b = np.asarray(model(x, train=True, dropout_rng=jax.random.key(0)).logits)
    c = np.asarray(model(x, train=True, dropout_rng=jax.random.key(1)).logits)
    d = np.asarray(model(x, train=True, rngs=nnx.Rngs(dropout=0)).logits)
    assert np.array_equal(a, b) and not np.allclose(a, c) and not np.allclose(a, evaluated)
    assert np.isfinite(d).all() and not np.allclose(d, evaluated)
    # attention dropout alone changes the outputs (it takes the eager path: the fused one has none)
    attn_only = FlaxViTForImageClassification(ViTConfig(**TINY, attention_probs_dropout_prob=0.5))
    assert not np.allclose(np.asarray(attn_only(x, train=True, dropout_rng=jax.random.key(0)).logits),
                           np.asarray(attn_only(x).logits))
    with pytest.raises(ValueError, match="train=True needs a dropout key"):
        model(x, train=True)
    with pytest.raises(ValueError, match="either dropout_rng= or rngs="):
        model(x, train=True, dropout_rng=jax.random.key(0), rngs=nnx.Rngs(dropout=0))


# ------------------------------------------------------------------------------ reduced precision
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("tiny", "interp-up", "mim-masked")],
                         ids=lambda c: c.name)
def test_fused_matches_eager_bfloat16(case: Case) -> None:
    """bfloat16 fused vs eager at the 1e-2 bound of NUMERICS.md, on a fresh seeded init
    (checkpoint scale). As in test_torch: hidden states and losses absolute, final-layernormed
    outputs relative to their magnitude (one bfloat16 step at |x| ~ 3 is 0.0156)."""
    init = MODEL_CLASSES[case.task](case.vit_config, **case.table_kwargs, seed=0)
    state = canonical_state(init)
    fused = build(case, state, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attn_implementation="fused")
    eager = build(case, state, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attn_implementation="eager")
    options = {**forward_options(case), "output_attentions": False}
    fused_out = fused(**make_inputs(case), **options)
    eager_out = eager(**make_inputs(case), **options)
    main = next(k for k in ("last_hidden_state", "logits", "reconstruction") if k in fused_out)
    assert fused_out[main].dtype == eager_out[main].dtype == jnp.bfloat16
    a, b = as_numpy(fused_out), as_numpy(eager_out)
    diffs = max_diffs(a, b, what=case.name)
    for key, diff in diffs.items():
        name = key.split("[")[0]
        scale = 1.0 if name in ("hidden_states", "loss") else max(1.0, float(np.abs(a[name]).max()))
        assert diff <= FUSED_EAGER_BF16 * scale, f"{case.name}: bf16 fused vs eager {key} differs by {diff:.3e} (all: {diffs})"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_runs_and_stays_close(dtype: str) -> None:
    """bf16 / fp16 compute (and parameters) keep the float32 logits within the NUMERICS.md
    bf16-vs-fp32 bound with the same top class; eager attention maps are softmaxed in float32
    (rows sum to 1); LayerNorm statistics in float32."""
    config = ViTConfig(**TINY)
    full = FlaxViTForImageClassification(config, seed=0)
    half = FlaxViTForImageClassification(config, dtype=dtype, param_dtype=dtype, _do_init=False)
    load_canonical_state(half, canonical_state(full))
    assert all(p.dtype == jnp.dtype(dtype) for p in jax.tree_util.tree_leaves(nnx.state(half, nnx.Param)))
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    expected = np.asarray(full(x).logits)
    out = half(x, output_attentions=True)
    assert out.logits.dtype == jnp.dtype(dtype)
    got = np.asarray(out.logits, dtype=np.float32)
    assert np.abs(got - expected).max() <= BF16_LOGITS
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
    row_sums = np.asarray(out.attentions[0], dtype=np.float32).sum(-1)
    np.testing.assert_allclose(row_sums, 1.0, atol=2e-2)
    # compute dtype alone (float32 storage): the transformers Flax ``dtype=`` meaning
    mixed = FlaxViTForImageClassification(config, dtype=dtype, _do_init=False)
    load_canonical_state(mixed, canonical_state(full))
    assert mixed.classifier.kernel[...].dtype == jnp.float32 and mixed(x).logits.dtype == jnp.dtype(dtype)


# ------------------------------------------------------------------------------ jax.export
def test_export_classifier_round_trip_with_symbolic_batch() -> None:
    case = next(c for c in CASES if c.name == "cls")
    model = build(case)
    blob = vit_flax.export_classifier(model)
    assert isinstance(blob, bytes) and len(blob) > 1000
    call = vit_flax.load_exported_classifier(blob)
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        exported = np.asarray(call(x))
        direct = np.asarray(model(x).logits)
        assert exported.shape == (batch, case.vit_config.num_labels)
        assert np.abs(exported - direct).max() <= 1e-6, f"batch {batch}"
    # another image size exports the interpolating forward
    call_40 = vit_flax.load_exported_classifier(vit_flax.export_classifier(model, 40))
    x = rng.standard_normal((2, 3, 40, 40)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(call_40(x)), np.asarray(model(x, interpolate_pos_encoding=True).logits),
                               atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="FlaxViTForImageClassification"):
        vit_flax.export_classifier(FlaxViTModel(case.vit_config))


# ------------------------------------------------------------------------------ errors
def _x(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


BAD_INPUTS = [
    ("rank-3", "base", lambda: _x((3, 32, 32)), {}, "rank 4"),
    ("channels-last", "base", lambda: _x((1, 32, 32, 3)), {}, "3 channels in dimension 1|channels"),
    ("uint8", "base", lambda: _x((1, 3, 32, 32), np.uint8), {}, "floating-point"),
    ("wrong-size", "base", lambda: _x((1, 3, 48, 48)), {}, r"Input image size \(48\*48\) doesn't match model \(32\*32\)"),
    ("too-small", "base", lambda: _x((1, 3, 4, 4)), {"interpolate_pos_encoding": True}, "smaller than one"),
    ("head-mask-shape", "base", lambda: _x((1, 3, 32, 32)), {"head_mask": np.ones((3,), np.float32)}, "head_mask must have shape"),
    ("head-mask-2d-shape", "classification", lambda: _x((1, 3, 32, 32)), {"head_mask": np.ones((3, 4), np.float32)}, "head_mask must have shape"),
    ("masked-pos-shape", "mim", lambda: _x((2, 3, 32, 32)), {"bool_masked_pos": np.ones((2, 5), bool)}, "bool_masked_pos must have shape"),
    ("masked-pos-no-token", "base", lambda: _x((1, 3, 32, 32)), {"bool_masked_pos": np.ones((1, 16), bool)}, "use_mask_token=True"),
]


@pytest.mark.parametrize("name,task,make_x,kwargs,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name: str, task: str, make_x: Any, kwargs: dict[str, Any], message: str) -> None:
    model = MODEL_CLASSES[task](ViTConfig(**TINY))
    with pytest.raises(ValueError, match=message):
        model(make_x(), **kwargs)


def test_mim_requires_patch_size_equal_encoder_stride() -> None:
    model = FlaxViTForMaskedImageModeling(ViTConfig(**{**TINY, "encoder_stride": 4}))
    x = _x((1, 3, 32, 32))
    assert model(x).reconstruction.shape == (1, 3, 16, 16)  # no mask: transformers' behaviour, no check
    with pytest.raises(ValueError, match="`patch_size` must be equal to `encoder_stride`"):
        model(x, bool_masked_pos=np.ones((1, 16), bool))


def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match="attn_implementation"):
        FlaxViTModel(ViTConfig(**TINY), attn_implementation="flash")
    with pytest.raises(ValueError, match="unsupported dtype"):
        FlaxViTModel(ViTConfig(**TINY), dtype=jnp.float64)
    with pytest.raises(TypeError, match="ViTConfig"):
        FlaxViTModel({"hidden_size": 32})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("tiny", "no-pooler", "mask-token", "qkv-bias-off",
                                                                   "non-square-patch", "cls", "mim")],
                         ids=lambda c: c.name)
def test_parameters_are_the_canonical_table(case: Case) -> None:
    """One parameter per table entry, at the declared path (canonical name, Flax leaf), in Flax's layout."""
    model = build(case)
    table = weight_table(case.vit_config, case.task, **case.table_kwargs)
    params = {tuple(str(p) for p in path): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(params) == {flax_path(spec) for spec in table}
    for spec in table:
        shape = params[flax_path(spec)].shape
        if spec.kind == "linear":
            assert shape == spec.shape[::-1], spec.name
        elif spec.kind == "conv":
            assert shape == (spec.shape[2], spec.shape[3], spec.shape[1], spec.shape[0]), spec.name
        else:
            assert shape == spec.shape, spec.name
    assert model.num_parameters() == parameter_count(case.vit_config, case.task, **case.table_kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mask-token", "cls", "mim", "qkv-bias-off")],
                         ids=lambda c: c.name)
def test_canonical_state_round_trip_is_bitwise(case: Case, dtype: str) -> None:
    state = {k: v.astype(dtype) if dtype != "bfloat16" else np.asarray(jnp.asarray(v, jnp.bfloat16))
             for k, v in make_state(case).items()}
    model = MODEL_CLASSES[case.task](case.vit_config, **case.table_kwargs, param_dtype=dtype, _do_init=False)
    load_canonical_state(model, state)
    back = canonical_state(model)
    assert list(back) == [spec.name for spec in model.canonical_table()]
    for name, value in state.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert back[name].tobytes() == value.tobytes(), name


def test_strict_loading_reports_every_bad_key() -> None:
    case = CASES[0]
    state = make_state(case)
    del state["encoder.layer.0.attention.attention.query.weight"]
    state["encoder.layer.9.output.dense.bias"] = np.zeros(32, np.float32)
    state["layernorm.weight"] = np.zeros(31, np.float32)
    model = FlaxViTModel(case.vit_config)
    with pytest.raises(CheckpointError) as info:
        load_canonical_state(model, state)
    message = str(info.value)
    assert "encoder.layer.0.attention.attention.query.weight (32, 32)" in message
    assert "encoder.layer.9.output.dense.bias (32,)" in message
    assert "layernorm.weight: given (31,) vs model (32,)" in message


def test_random_init_follows_the_table() -> None:
    """trunc_normal: std = initializer_range cut at +-2 std; zeros; ones. Seeded: seed= and rngs= agree."""
    config = ViTConfig(**{**TINY, "initializer_range": 0.05})
    model = FlaxViTForMaskedImageModeling(config, seed=3)
    state = canonical_state(model)
    for spec in weight_table(config, "mim"):
        value = state[spec.name].astype(np.float64)
        if spec.init == "zeros":
            assert not value.any(), spec.name
        elif spec.init == "ones":
            assert (value == 1).all(), spec.name
        else:
            assert np.abs(value).max() <= 2 * 0.05 + 1e-7, spec.name
            if value.size >= 1000:
                # a normal cut at +-2 std has std 0.8796 * std
                assert abs(value.std() / (0.05 * 0.8796) - 1) < 0.1, (spec.name, value.std())
    again = canonical_state(FlaxViTForMaskedImageModeling(config, rngs=nnx.Rngs(params=3)))
    other = canonical_state(FlaxViTForMaskedImageModeling(config, seed=4))
    assert all(np.array_equal(state[k], again[k]) for k in state)
    assert not np.array_equal(state["vit.embeddings.cls_token"], other["vit.embeddings.cls_token"])


def test_parameter_counts_match_formats_md() -> None:
    config = ViTConfig.from_variant("Ti/16", num_labels=1000)
    assert FlaxViTModel(config, add_pooling_layer=False, _do_init=False).num_parameters() == 5_524_416
    assert FlaxViTModel(config, _do_init=False).num_parameters() == 5_561_472
    assert FlaxViTForImageClassification(config, _do_init=False).num_parameters() == 5_717_416


def test_labels_problem_types_and_num_labels_zero() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = FlaxViTForImageClassification(ViTConfig(**{**TINY, "num_labels": 0}))
    out = model(x)
    base = model.vit(x)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(base.last_hidden_state[:, 0]))
    assert not any(s.name.startswith("classifier") for s in model.canonical_table())


# ------------------------------------------------------------------------------ primitives
@pytest.mark.parametrize("name", sorted(NP_ACTIVATIONS))
def test_activation_matches_numpy_reference(name: str) -> None:
    x = np.linspace(-6, 6, 2001)
    got = np.asarray(layers.ACTIVATIONS[name](jnp.asarray(x, jnp.float32)), dtype=np.float64)
    expected = NP_ACTIVATIONS[name](x.astype(np.float32).astype(np.float64))
    assert np.abs(got - expected).max() <= 2e-6, name  # float32 rounding of values up to 6


def test_exact_gelu_is_not_the_tanh_default() -> None:
    x = jnp.linspace(-4, 4, 801)
    assert float(jnp.abs(layers.ACTIVATIONS["gelu"](x) - jax.nn.gelu(x)).max()) > 1e-4


def test_layer_norm_two_pass_matches_reference() -> None:
    """Inputs with a common offset of 10: the two-pass variance stays within 1e-5 of the reference,
    where flax.nnx.LayerNorm's E[x^2] - E[x]^2 (the reason it is not used) is off by ~7e-5."""
    from vit_core.reference import layer_norm as np_layer_norm

    rng = np.random.default_rng(0)
    x = (10.0 + rng.standard_normal((4, 7, 64))).astype(np.float32)
    weight, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    expected = np_layer_norm(x.astype(np.float64), weight, bias, 1e-12)
    ours = layers.LayerNorm(64, 1e-12)
    flax_norm = nnx.LayerNorm(64, epsilon=1e-12, rngs=nnx.Rngs(0))
    for norm in (ours, flax_norm):
        norm.scale.set_value(jnp.asarray(weight))
        norm.bias.set_value(jnp.asarray(bias))
    assert np.abs(np.asarray(ours(jnp.asarray(x))) - expected).max() <= SMALL
    assert np.abs(np.asarray(flax_norm(jnp.asarray(x))) - expected).max() > SMALL


@pytest.mark.parametrize("grid,out", [((4, 4), (7, 7)), ((7, 7), (4, 4)), ((3, 5), (6, 2)), ((4, 6), (5, 3)), ((14, 14), (24, 24))])
def test_position_resampling_matches_reference(grid: tuple[int, int], out: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, 1 + grid[0] * grid[1], 16)).astype(np.float32)
    expected = resample_position_embeddings(table, grid, out)[:, 1:]
    got = np.asarray(layers.resample_position_grid(jnp.asarray(table[:, 1:]), grid, out))
    assert np.abs(got - expected).max() <= 1e-6


def test_patch_embedding_matches_reference_and_lax_conv() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 36, 44)).astype(np.float32)  # not a multiple of the patch: remainder dropped
    conv = layers.patch_projection(3, 16, (8, 4), dtype=jnp.float32, param_dtype=jnp.float32)
    kernel = (rng.standard_normal((8, 4, 3, 16)) / np.sqrt(8 * 4 * 3)).astype(np.float32)  # unit-scale outputs
    bias = rng.standard_normal(16).astype(np.float32)
    conv.kernel.set_value(jnp.asarray(kernel))
    conv.bias.set_value(jnp.asarray(bias))
    ours = np.asarray(conv(jnp.asarray(x)))  # (batch, hidden, gh, gw)
    lax_conv = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(kernel), (8, 4), "VALID",
                                            dimension_numbers=("NCHW", "HWIO", "NCHW")) + bias[None, :, None, None]
    assert np.abs(ours - np.asarray(lax_conv)).max() <= SMALL
    expected = np_patch_embed(x.astype(np.float64), kernel.transpose(3, 2, 0, 1).astype(np.float64), bias)
    assert np.abs(ours.reshape(2, 16, -1).transpose(0, 2, 1) - expected).max() <= SMALL


def test_pixel_shuffle_matches_reference() -> None:
    x = np.arange(2 * 12 * 3 * 4, dtype=np.float32).reshape(2, 12, 3, 4)
    assert np.array_equal(np.asarray(layers.pixel_shuffle(jnp.asarray(x), 2)), np_pixel_shuffle(x, 2))


def test_attention_primitives_agree() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 3, 8)).astype(np.float32)) for _ in range(3))
    context, probs = layers.eager_attention(q, k, v, 8**-0.5, None, 0.0, None)
    assert np.abs(np.asarray(context) - np.asarray(layers.fused_attention(q, k, v, 8**-0.5))).max() <= 1e-6
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------ isolation
def test_import_vit_flax_imports_no_other_framework() -> None:
    code = ("import sys, vit_flax; "
            "print([m for m in ('torch', 'tensorflow', 'keras', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("blocked", ["jax", "flax"])
def test_missing_jax_or_flax_names_the_extra(blocked: str) -> None:
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "try:\n    import vit_flax\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "pip install vitx[flax]" in out
