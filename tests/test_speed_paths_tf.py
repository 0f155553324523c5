"""The vit_tf inference fast paths of issue #6 really run, and keep parity (docs/NUMERICS.md bounds).

vit_tf: a large inference batch of static size runs through the encoder as sub-batches (eager,
tf.function and XLA alike); tests/test_models.py runs the whole case table (tf backend) through the fused path
against the float64 reference. Here: that sub-batching is taken only when it should be, and
equals the whole-batch path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from tests.cases import CASES, make_state  # noqa: E402
from vit_core.reference import forward as reference_forward  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_tf import TFViTModel, load_canonical_state  # noqa: E402
from vit_tf import layers as tf_layers  # noqa: E402
from vit_tf import modeling as tf_modeling  # noqa: E402

TINY_CASE = next(c for c in CASES if c.name == "tiny")


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_large_batch_runs_in_sub_batches_with_identical_results(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    state = make_state(TINY_CASE)
    model = TFViTModel(TINY_CASE.vit_config)
    load_canonical_state(model, state)
    tokens = TINY_CASE.vit_config.num_patches + 1
    monkeypatch.setattr(tf_layers, "INFERENCE_CHUNK_ROWS", 2 * tokens)  # 2 images per sub-batch
    x = tf.constant(np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32))
    calls = []
    real_layer_call = tf_modeling.ViTLayer.call

    def spy(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(hidden_states.shape[0])
        return real_layer_call(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(tf_modeling.ViTLayer, "call", spy)
    run = {"eager": lambda f: f, "function": tf.function, "xla": lambda f: tf.function(f, jit_compile=True)}[mode]
    split = run(lambda x: model(x).last_hidden_state)(x).numpy()
    assert calls == [2, 2, 2, 2, 1, 1], calls  # 2 layers x sub-batches of 2, 2, 1
    calls.clear()
    whole = run(lambda x: model(x, output_hidden_states=True).last_hidden_state)(x).numpy()
    assert calls == [5, 5], calls  # per-layer outputs asked: one batch
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
