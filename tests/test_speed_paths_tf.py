"""The vit_tf inference fast paths of issues #6 / #14 really run, and keep parity (docs/NUMERICS.md bounds).

vit_tf: a large inference batch of static size runs through the encoder as sub-batches (eager,
tf.function and XLA alike); tests/test_models.py runs the whole case table (tf backend) through the fused path
against the float64 reference. Here: that sub-batching is taken only when it should be, and
equals the whole-batch path; and bfloat16 under XLA on bf16 hardware runs bf16 x bf16 -> float32
dots (rounded once), elsewhere bf16 matmuls, with gradients either way.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tests.backends import BACKENDS_BY_NAME  # noqa: E402
from tests.cases import CASES, force_cpu_level, make_inputs, make_state, reference  # noqa: E402
from vit_core.reference import forward as reference_forward  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_tf import TFViTModel, load_canonical_state  # noqa: E402
from vit_tf import layers as tf_layers  # noqa: E402
from vit_tf import modeling as tf_modeling  # noqa: E402

TINY_CASE = next(c for c in CASES if c.name == "tiny")
CLS_CASE = next(c for c in CASES if c.name == "cls")
# how a forward runs: a plain call, tf.function, XLA
RUN_MODES = {"eager": lambda f: f, "function": tf.function, "xla": lambda f: tf.function(f, jit_compile=True)}


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_large_batch_runs_in_sub_batches_with_identical_results(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    state = make_state(TINY_CASE)
    model = TFViTModel(TINY_CASE.vit_config)
    load_canonical_state(model, state)
    tokens = TINY_CASE.vit_config.num_patches + 1
    monkeypatch.setattr(tf_layers, "INFERENCE_CHUNK_ROWS", 2 * tokens)  # 2 images per sub-batch
    x = tf.constant(np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32))
    calls = []
    real_layer_call = tf_modeling.ViTLayer.call

    def spy(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(hidden_states.shape[0])
        return real_layer_call(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(tf_modeling.ViTLayer, "call", spy)
    run = RUN_MODES[mode]
    split = run(lambda x: model(x).last_hidden_state)(x).numpy()
    if mode == "eager":
        assert calls == [2, 2] * 5 + [1, 1], calls  # 2 layers x sub-batches of 2 (two pairs, one more), then 1
    else:
        # traced once: the while loop's body (2 layers on each sub-batch of 2 of a pair), then the sub-batch
        # of 2 and the 1 left after the pairs: the graph does not grow with the batch
        assert calls == [2, 2] * 3 + [1, 1], calls
    calls.clear()
    whole = run(lambda x: model(x, output_hidden_states=True).last_hidden_state)(x).numpy()
    assert calls == [11, 11], calls  # per-layer outputs asked: one batch
    # the same per-image computation; oneDNN / XLA may block GEMMs of other row counts differently
    assert np.abs(split - whole).max() <= TOLERANCES["small"]
    expected = reference_forward(state, TINY_CASE.vit_config, x.numpy())["last_hidden_state"]
    assert np.abs(split.astype(np.float64) - expected).max() <= TOLERANCES["small"]


def test_dynamic_batch_and_training_run_whole() -> None:
    hidden = tf.zeros((8, 200, 8))
    assert tf_layers.splits_batch(hidden, None, False, False, False)
    assert not tf_layers.splits_batch(hidden, None, False, False, True)  # training
    assert not tf_layers.splits_batch(hidden, tf.ones((1, 2, 1, 1)), False, False, False)
    assert not tf_layers.splits_batch(tf.zeros((1, 2000, 8)), None, False, False, False)
    # bfloat16 runs whole (TF's bf16 matmul is faster on more rows)
    assert not tf_layers.splits_batch(tf.zeros((8, 200, 8), tf.bfloat16), None, False, False, False)

    @tf.function(input_signature=[tf.TensorSpec((None, 200, 8))])
    def traced(h: tf.Tensor) -> tf.Tensor:
        assert not tf_layers.splits_batch(h, None, False, False, False)  # batch unknown at trace
        return h

    traced(hidden)


def _hlo_dots(fn: Any, *args: Any) -> list[tuple[str, str]]:
    """(result dtype, operand dtype) of every dot in the XLA HLO of ``fn`` under jit_compile."""
    hlo = tf.function(fn, jit_compile=True).experimental_get_compiler_ir(*args)(stage="hlo")
    return re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? dot\((\w+)\[", hlo)


@pytest.mark.parametrize("level, result", [("avx512_bf16", "f32"), ("amx", "f32"), ("avx2", "bf16")])
def test_bfloat16_dots_under_xla_follow_the_plan(monkeypatch: pytest.MonkeyPatch, level: str, result: str) -> None:
    """On bf16 hardware every bfloat16 dot XLA compiles (q, k, v, scores, context, output, two MLP
    per layer, the classifier; fused and eager attention) takes bf16 operands and gives a float32
    result, rounded once after the bias; on emulated bf16 (avx2) they stay bf16-result dots.
    Logits within the bf16 bound in eager, tf.function and XLA alike."""
    force_cpu_level(monkeypatch, level)
    model = BACKENDS_BY_NAME["tf"].build(CLS_CASE, dtype="bfloat16")
    x = tf.constant(make_inputs(CLS_CASE)["pixel_values"])
    expected = reference(CLS_CASE)["logits"]
    for output_attentions in (False, True):  # the fused and the eager attention
        def forward(x: tf.Tensor) -> tf.Tensor:
            return model(x, output_attentions=output_attentions).logits

        dots = _hlo_dots(forward, x)
        assert len(dots) == 8 * CLS_CASE.vit_config.num_hidden_layers + 1, dots
        assert set(dots) == {(result, "bf16")}, dots
        for mode, run in RUN_MODES.items():
            logits = run(forward)(x)
            assert logits.dtype == tf.bfloat16
            diff = np.abs(logits.numpy().astype(np.float64) - expected).max()
            assert diff <= TOLERANCES["bfloat16_vs_float32_logits"], (mode, output_attentions, diff)


def test_only_xla_traces_see_the_xla_context() -> None:
    seen = []

    def probe() -> tf.Tensor:
        seen.append(tf_layers.compiling_for_xla())
        return tf.constant(0)

    probe()
    tf.function(probe)()
    tf.function(probe, jit_compile=True)()
    assert seen == [False, False, True]


@pytest.mark.parametrize("shapes, transpose_b", [(((6, 16), (16, 8)), False), (((2, 3, 5, 16), (2, 3, 7, 16)), True)])
def test_float32_result_matmul_keeps_the_float32_sum_and_has_the_bf16_gradient(shapes: Any, transpose_b: bool) -> None:
    """tf_layers.matmul with a float32 result, as Dense (2-D) and the attention scores (rank 4,
    transposed) call it: the bf16 operands' exact products summed in float32, no bf16 rounding
    of the result; its gradient equals the bf16 matmul's."""
    rng = np.random.default_rng(2)
    a, b = (tf.constant(rng.standard_normal(shape), tf.bfloat16) for shape in shapes)
    exact = np.asarray(a.numpy(), np.float64) @ np.swapaxes(np.asarray(b.numpy(), np.float64), -1, -2) \
        if transpose_b else np.asarray(a.numpy(), np.float64) @ np.asarray(b.numpy(), np.float64)
    upstream = tf.constant(rng.integers(-3, 4, exact.shape), tf.float32)  # exact in bf16 too

    @tf.function(jit_compile=True)
    def both(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, ...]:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([a, b])
            wide = tf_layers.matmul(a, b, transpose_b=transpose_b, result_dtype=tf.float32)
            narrow = tf.linalg.matmul(a, b, transpose_b=transpose_b)
        return (wide, *tape.gradient(wide, [a, b], output_gradients=upstream),
                *tape.gradient(narrow, [a, b], output_gradients=tf.cast(upstream, tf.bfloat16)))

    wide, grad_a, grad_b, ref_a, ref_b = both(a, b)
    assert wide.dtype == tf.float32
    np.testing.assert_allclose(wide.numpy(), exact, rtol=1e-6, atol=1e-5)
    assert not np.array_equal(wide.numpy(), tf.cast(tf.cast(wide, tf.bfloat16), tf.float32).numpy())
    assert grad_a.dtype == tf.bfloat16 and grad_b.dtype == tf.bfloat16
    np.testing.assert_array_equal(grad_a.numpy(), ref_a.numpy())
    np.testing.assert_array_equal(grad_b.numpy(), ref_b.numpy())


def test_bfloat16_dense_under_xla_rounds_the_float32_sum_once(monkeypatch: pytest.MonkeyPatch) -> None:
    force_cpu_level(monkeypatch, "avx512_bf16")
    rng = np.random.default_rng(2)
    dense = tf_layers.Dense(16, 8, dtype="bfloat16", name="dense")
    dense.weight.assign(tf.constant(rng.standard_normal((16, 8)), tf.bfloat16))
    dense.bias.assign(tf.constant(rng.standard_normal(8), tf.bfloat16))
    x = tf.constant(rng.standard_normal((2, 3, 16)), tf.bfloat16)
    exact = np.asarray(x.numpy(), np.float64) @ np.asarray(dense.weight.numpy(), np.float64) \
        + np.asarray(dense.bias.numpy(), np.float64)
    got = tf.function(dense, jit_compile=True)(x)
    assert got.dtype == tf.bfloat16 and got.shape == (2, 3, 8)
    # one rounding of a float32 sum: within one bfloat16 half-step (2^-8 relative) plus float32 noise
    np.testing.assert_allclose(got.numpy().astype(np.float64), exact, rtol=2**-8 + 1e-6, atol=1e-6)


def test_bfloat16_training_step_under_xla_matches_the_bf16_result_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients through the float32-result dots (custom gradient) have the weights' shapes and
    agree with those of the bf16-result path (the avx2 plan) to bf16 rounding."""
    model = BACKENDS_BY_NAME["tf"].build(CLS_CASE, dtype="bfloat16")
    x = tf.constant(make_inputs(CLS_CASE)["pixel_values"])
    labels = tf.range(x.shape[0]) % CLS_CASE.vit_config.num_labels

    def grads() -> list[np.ndarray]:
        @tf.function(jit_compile=True)
        def step(x: tf.Tensor) -> list[tf.Tensor]:
            with tf.GradientTape() as tape:
                logits = tf.cast(model(x, training=True).logits, tf.float32)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
            return tape.gradient(loss, model.trainable_variables)

        return [g.numpy().astype(np.float64) for g in step(x)]

    force_cpu_level(monkeypatch, "avx512_bf16")
    wide = grads()
    force_cpu_level(monkeypatch, "avx2")
    narrow = grads()
    # the key bias's gradient is zero in exact arithmetic (softmax is shift-invariant): rounding
    # noise on both paths, measured against the largest gradient
    scale = max(float(np.linalg.norm(h)) for h in narrow)
    for variable, g, h in zip(model.trainable_variables, wide, narrow, strict=True):
        assert g.shape == tuple(variable.shape), variable.path
        gap = float(np.linalg.norm(g - h))
        assert gap <= 0.05 * float(np.linalg.norm(h)) + 1e-3 * scale, (variable.path, gap, float(np.linalg.norm(h)))


def test_bfloat16_sub_batches_only_with_float32_result_dots_under_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden = tf.zeros((8, 200, 8), tf.bfloat16)
    seen = []

    def probe(h: tf.Tensor) -> tf.Tensor:
        seen.append(tf_layers.splits_batch(h, None, False, False, False))
        return h

    for level in ("avx512_bf16", "avx2"):
        force_cpu_level(monkeypatch, level)
        probe(hidden)
        tf.function(probe)(hidden)
        tf.function(probe, jit_compile=True)(hidden)
    assert seen == [False, False, True, False, False, False]
