"""What only vit_flax has: the compiled call (no retrace), functional use (nnx.split / merge
under jax.jit, jax.grad and jax.vmap, an optax step), transformers Flax's params idiom and tree,
pytree outputs, explicit dropout keys, the dtype / param_dtype split, jax.export, and the
lax / flax.nnx primitives it does not use.

Everything every framework shares (the case table on the jitted fused, eager and attention
paths and op by op under jax.disable_jit against the reference, vit_torch, vit_tf and
transformers PT / TF / Flax; fused vs eager; weights, init, errors, outputs, dropout,
primitives, packaging) is in tests/test_models.py, crossed with tests/backends.py's BACKENDS.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import vit_flax  # noqa: E402
from vit_core.reference import patch_embed as np_patch_embed  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_core.weights import weight_table  # noqa: E402
from vit_flax import (  # noqa: E402
    FlaxViTForImageClassification,
    FlaxViTModel,
    ViTConfig,
    canonical_state,
    load_canonical_state,
)
from vit_flax import layers  # noqa: E402

from .backends import BACKENDS_BY_NAME, transformers_flax_supports  # noqa: E402
from .cases import CASES, TINY, Case, make_inputs, reference  # noqa: E402

SMALL = TOLERANCES["small"]
BF16_LOGITS = TOLERANCES["bfloat16_vs_float32_logits"]
BACKEND = BACKENDS_BY_NAME["flax"]
CASES_BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(autouse=True)
def _pin_precision() -> Any:
    """docs/NUMERICS.md: float32 matmuls at full precision (conftest sets the environment default too)."""
    with jax.default_matmul_precision("highest"):
        yield


def build(case: Case, state: dict[str, np.ndarray] | None = None, **kwargs: Any) -> Any:
    """The case's vit_flax model with the case's seeded canonical weights."""
    return BACKEND.build(case, state, **kwargs)


# ------------------------------------------------------------------------------ transformers Flax's tree
@pytest.mark.parametrize("case", [c for c in CASES if transformers_flax_supports(c)], ids=lambda c: c.name)
def test_params_tree_is_transformers_flax(case: Case) -> None:
    """Our nnx state has exactly the tree of transformers' FlaxViT params (same paths and shapes);
    the outputs with the same values are compared in tests/test_models.py."""
    transformers = pytest.importorskip("transformers")
    from flax.traverse_util import flatten_dict

    config = transformers.ViTConfig(**case.vit_config.to_dict())
    if case.task == "base":
        theirs = transformers.FlaxViTModel(config, add_pooling_layer=case.add_pooling_layer, _do_init=False)
    else:
        theirs = transformers.FlaxViTForImageClassification(config, _do_init=False)
    expected_tree = {k: v.shape for k, v in flatten_dict(theirs.params_shape_tree).items()}
    ours = BACKEND.new_model(case.vit_config, case.task, init=False, **case.table_kwargs)
    assert {k: v.shape for k, v in flatten_dict(ours.params).items()} == expected_tree


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


# ------------------------------------------------------------------------------ dropout keys
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
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compute_dtype_alone_keeps_float32_parameters(dtype: str) -> None:
    """dtype= without param_dtype= (transformers Flax's meaning): float32 storage, computation and
    outputs in the dtype, logits close to float32."""
    config = ViTConfig(**TINY)
    full = FlaxViTForImageClassification(config, seed=0)
    mixed = FlaxViTForImageClassification(config, dtype=dtype, _do_init=False)
    load_canonical_state(mixed, canonical_state(full))
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    out = mixed(x).logits
    assert mixed.classifier.kernel[...].dtype == jnp.float32 and out.dtype == jnp.dtype(dtype)
    assert np.abs(np.asarray(out, np.float32) - np.asarray(full(x).logits)).max() <= BF16_LOGITS


def test_rngs_and_seed_give_the_same_init() -> None:
    config = ViTConfig(**{**TINY, "initializer_range": 0.05})
    state = canonical_state(vit_flax.FlaxViTForMaskedImageModeling(config, seed=3))
    again = canonical_state(vit_flax.FlaxViTForMaskedImageModeling(config, rngs=nnx.Rngs(params=3)))
    assert all(np.array_equal(state[k], again[k]) for k in state)


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


# ------------------------------------------------------------------------------ weights
def test_parameter_counts_match_formats_md() -> None:
    config = ViTConfig.from_variant("Ti/16", num_labels=1000)
    assert FlaxViTModel(config, add_pooling_layer=False, _do_init=False).num_parameters() == 5_524_416
    assert FlaxViTModel(config, _do_init=False).num_parameters() == 5_561_472
    assert FlaxViTForImageClassification(config, _do_init=False).num_parameters() == 5_717_416


# ------------------------------------------------------------------------------ primitives (Flax only)
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
