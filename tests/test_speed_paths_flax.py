"""The vit_flax inference fast paths of issue #6 really run, and keep parity (docs/NUMERICS.md bounds).

vit_flax on CPU: a large inference batch runs through the encoder as sub-batches (one lax.map),
attention is written with (batch, heads) leading, and bfloat16 dots ask XLA for a float32 result
(XLA's CPU backend then reads the bfloat16 operands with the CPU's bf16 instructions instead of
widening them to float32 on every call). tests/test_models.py runs the whole case table (flax backend) through
these paths against the float64 reference; here: that the paths are taken and equal the plain path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tests.cases import CASES, make_state  # noqa: E402
from vit_core.reference import forward as reference_forward  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_flax import FlaxViTForImageClassification, FlaxViTModel, canonical_state, load_canonical_state  # noqa: E402
from vit_flax import layers as flax_layers  # noqa: E402
from vit_flax import modeling as flax_modeling  # noqa: E402

TINY_CASE = next(c for c in CASES if c.name == "tiny")
CPU = jax.default_backend() == "cpu"


@pytest.fixture(autouse=True)
def _pin_precision() -> Any:
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.skipif(not CPU, reason="sub-batching is a CPU path")
def test_large_batch_runs_in_sub_batches_with_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    state = make_state(TINY_CASE)
    model = FlaxViTModel(TINY_CASE.vit_config, _do_init=False)
    load_canonical_state(model, state)
    tokens = TINY_CASE.vit_config.num_patches + 1
    monkeypatch.setattr(flax_layers, "INFERENCE_CHUNK_ROWS", 2 * tokens)  # 2 images per sub-batch
    x = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)
    traced = []
    real_layer_call = flax_modeling.ViTLayer.__call__

    def spy(self: Any, hidden_states: Any, *args: Any) -> Any:
        traced.append(hidden_states.shape[0])
        return real_layer_call(self, hidden_states, *args)

    monkeypatch.setattr(flax_modeling.ViTLayer, "__call__", spy)
    # a fresh jit per call: the model's own cache does not key on INFERENCE_CHUNK_ROWS
    split = jax.jit(lambda m, x: m.forward(x).last_hidden_state)(model, x)
    # lax.map traces its body once (2 layers on each sub-batch of 2 of a pair), then the sub-batch of 2
    # and the 1 left after the two pairs: what is compiled does not grow with the batch
    assert traced == [2, 2] * 3 + [1, 1], traced
    traced.clear()
    whole = jax.jit(lambda m, x: m.forward(x, output_hidden_states=True).last_hidden_state)(model, x)
    assert traced == [11, 11]  # per-layer outputs asked: one batch
    # each image's computation is the same, but XLA may block dots of other row counts differently
    # (measured 1.1e-6 here): the docs/NUMERICS.md float32 bound, against each other and the reference
    assert np.abs(np.asarray(split) - np.asarray(whole)).max() <= TOLERANCES["small"]
    expected = reference_forward(state, TINY_CASE.vit_config, x)["last_hidden_state"]
    assert np.abs(np.asarray(split, dtype=np.float64) - expected).max() <= TOLERANCES["small"]


@pytest.mark.skipif(not CPU, reason="sub-batching is a CPU path")
def test_symbolic_batch_runs_whole() -> None:
    hidden = jax.ShapeDtypeStruct((jax.export.symbolic_shape("b")[0], 200, 8), jnp.float32)
    assert not flax_layers.splits_batch(hidden, None, False, False, None)
    assert flax_layers.splits_batch(jnp.zeros((8, 200, 8)), None, False, False, None)
    assert not flax_layers.splits_batch(jnp.zeros((8, 200, 8)), None, False, False, jax.random.key(0))


def _dots(jaxpr: Any) -> list[Any]:
    """Every dot_general equation of a jaxpr, nested jaxprs (pjit, lax.map) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dots(sub)
    return found


def test_bfloat16_dots_ask_for_float32_results() -> None:
    """Every bfloat16 x bfloat16 dot of a bfloat16 forward (projections, patch embedding,
    attention, classifier) asks for a float32 result, which is rounded once afterwards."""
    config = TINY_CASE.vit_config
    full = FlaxViTForImageClassification(config, seed=0)
    half = FlaxViTForImageClassification(config, dtype="bfloat16", param_dtype="bfloat16", _do_init=False)
    load_canonical_state(half, canonical_state(full))
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    dots = _dots(jax.make_jaxpr(lambda m, x: m.forward(x).logits)(half, x).jaxpr)
    # per layer: q, k, v, scores, context, output, 2 MLP; + patch embedding + classifier
    assert len(dots) == 8 * config.num_hidden_layers + 2
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn
    logits = half(x).logits
    assert logits.dtype == jnp.bfloat16
    expected = np.asarray(full(x).logits)
    assert np.abs(np.asarray(logits, dtype=np.float32) - expected).max() <= TOLERANCES["bfloat16_vs_float32_logits"]


def test_bfloat16_linear_rounds_the_float32_sum_once() -> None:
    rng = np.random.default_rng(2)
    linear = flax_layers.Linear(16, 8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    linear.kernel[...] = jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)
    linear.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.bfloat16)
    exact = (np.asarray(x, np.float64) @ np.asarray(linear.kernel[...], np.float64)
             + np.asarray(linear.bias[...], np.float64))
    got = linear(x)
    assert got.dtype == jnp.bfloat16
    # one rounding of a float32 sum: within one bfloat16 half-step (2^-8 relative) plus float32 noise
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2**-8 + 1e-6, atol=1e-6)


def test_cpu_fused_attention_equals_eager_context() -> None:
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 9, 8)).astype(np.float32)) for _ in range(3))
    context, _ = flax_layers.eager_attention(q, k, v, 8**-0.5, None, 0.0, None)
    fused = flax_layers.fused_attention(q, k, v, 8**-0.5)
    assert fused.shape == (2, 3, 9, 8)
    assert np.abs(np.asarray(context) - np.asarray(fused)).max() <= 1e-6
