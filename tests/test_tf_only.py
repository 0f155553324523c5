"""What only vit_tf has: XLA (jit_compile) and tf.function with a dynamic batch, the static
spatial-shape rule of a trace, a compiled training step, seed= and keras.utils.set_random_seed,
Keras layer names and model.save_weights / load_weights, TensorFlow dtype spellings, the
training-time eager path, and the bicubic kernel that is not tf.image.resize's.

Everything every framework shares (the case table on the fused, eager and tf.function paths
against the reference, vit_torch, vit_flax and transformers PT / TF / Flax; fused vs eager;
weights, init, errors, outputs, dropout, primitives, packaging) is in tests/test_models.py,
crossed with tests/backends.py's BACKENDS.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from vit_core.resample import resample_position_embeddings  # noqa: E402
from vit_core.tolerances import TOLERANCES  # noqa: E402
from vit_tf import (  # noqa: E402
    TFViTForImageClassification,
    TFViTForMaskedImageModeling,
    TFViTModel,
    ViTConfig,
    canonical_state,
)
from vit_tf import layers  # noqa: E402

from .backends import BACKENDS_BY_NAME  # noqa: E402
from .cases import (  # noqa: E402
    CASES, TINY, Case, assert_close, forward_options, make_inputs, max_diffs, reference,
)

SMALL = TOLERANCES["small"]
BACKEND = BACKENDS_BY_NAME["tf"]
CASES_BY_NAME = {case.name: case for case in CASES}
BACKEND.require()  # docs/NUMERICS.md: no TF32


def build(case: Case, state: dict[str, np.ndarray] | None = None, **kwargs: Any) -> Any:
    """The case's vit_tf model with the case's seeded canonical weights."""
    return BACKEND.build(case, state, **kwargs)


def as_numpy(output: Any) -> dict[str, Any]:
    return BACKEND.outputs_to_numpy(output)


# ------------------------------------------------------------------------------ XLA and tf.function
GRAPH_CASES = ["tiny", "cls-interp-head-mask", "mim-masked", "cls-single-label"]


@pytest.mark.parametrize("name", GRAPH_CASES)
def test_xla_matches_eager(name: str) -> None:
    """tf.function(jit_compile=True) == eager on every output, attention maps and loss included,
    at 1e-5; the output object comes back through XLA intact. (Plain tf.function is a path of
    every case in tests/test_models.py.)"""
    case = CASES_BY_NAME[name]
    model = build(case)
    inputs = {k: tf.constant(v) for k, v in make_inputs(case).items()}
    options = forward_options(case)
    expected = as_numpy(model(**inputs, **options))

    @tf.function(jit_compile=True)
    def forward(inputs: dict[str, tf.Tensor]) -> Any:
        return model(**inputs, **options)

    out = forward(inputs)
    assert type(out).__name__.startswith("TF"), f"{name}/xla: got {type(out)}"
    assert_close(max_diffs(expected, as_numpy(out), what=f"{name}/xla"), SMALL, what=f"{name} xla vs eager")


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


def test_traced_spatial_dims_must_be_static() -> None:
    model = TFViTModel(ViTConfig(**TINY), seed=0)
    fn = tf.function(lambda x: model(x).last_hidden_state, input_signature=[tf.TensorSpec([None, 3, None, None])])
    with pytest.raises(ValueError, match="only the batch dimension may be None"):
        fn.get_concrete_function()


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [tf.bfloat16, np.float16, "tf.float16", "bf16"])
def test_tensorflow_and_numpy_dtype_spellings(dtype: Any) -> None:
    """A tf.DType, a numpy dtype or a string alias all select the storage and compute dtype."""
    model = TFViTForImageClassification(ViTConfig(**TINY), dtype=dtype, seed=0)
    name = {"tf.float16": "float16", "bf16": "bfloat16"}.get(dtype, None) or tf.as_dtype(dtype).name
    assert {v.dtype for v in model.trainable_weights} == {name}
    assert model(make_inputs(CASES_BY_NAME["cls"])["pixel_values"]).logits.dtype == name


# ------------------------------------------------------------------------------ dropout and seeds
DROPOUT = dict(TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def test_training_with_attention_dropout_takes_the_eager_path() -> None:
    """training=True with attention dropout runs the eager kernel (the fused one has no dropout),
    and attention maps come back in training too."""
    model = TFViTForImageClassification(ViTConfig(**DROPOUT), seed=3)
    x = make_inputs(CASES_BY_NAME["cls"])["pixel_values"]
    assert model(x, training=True, output_attentions=True).attentions[0].shape == (3, 4, 17, 17)
    t1, t2 = model(x, training=True).logits.numpy(), model(x, training=True).logits.numpy()
    assert np.abs(t1 - t2).max() > 1e-3, "consecutive training calls must draw new masks"


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


# ------------------------------------------------------------------------------ Keras weights
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


def test_keras_weights_file_round_trip(tmp_path: Any) -> None:
    """model.save_weights / load_weights (Keras' own .weights.h5) restore every canonical weight."""
    case = CASES_BY_NAME["mim"]
    model = build(case)
    model.save_weights(tmp_path / "model.weights.h5")
    other = TFViTForMaskedImageModeling(case.vit_config, seed=1)
    other.load_weights(tmp_path / "model.weights.h5")
    want, got = canonical_state(model), canonical_state(other)
    assert [k for k in want if not np.array_equal(want[k], got[k])] == []


# ------------------------------------------------------------------------------ primitives (TF only)
@pytest.mark.parametrize("grid,out", [((4, 4), (7, 7)), ((7, 7), (4, 4)), ((3, 5), (6, 2)), ((4, 6), (5, 3))])
def test_position_resampling_is_not_tf_image_resize(grid: tuple[int, int], out: tuple[int, int]) -> None:
    """tf.image.resize's bicubic (a = -0.5, with antialiasing) is a different kernel: the model's
    resampling matches the reference, tf.image.resize would not."""
    rng = np.random.default_rng(0)
    table = (0.5 * rng.standard_normal((1, 1 + grid[0] * grid[1], 16))).astype(np.float32)
    want = resample_position_embeddings(table, grid, out)[:, 1:]
    got = layers.resample_position_grid(tf.constant(table[:, 1:]), grid, out).numpy()
    assert np.abs(got - want).max() < 1e-6
    resized = tf.image.resize(table[:, 1:].reshape(1, *grid, 16), out, method="bicubic").numpy()
    assert np.abs(resized.reshape(got.shape) - want).max() > 1e-3
