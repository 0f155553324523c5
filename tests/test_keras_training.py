"""Keras training of vit_tf the way transformers-TF users train: compile / fit / evaluate / predict
in both styles ((pixel_values, labels) with a compiled loss; labels in the input dict with the
model's own loss), mixed-precision global policies, the .keras round trip, a new head from
from_pretrained, and gradient checkpointing. Tiny configs (tests/cases.py TINY), a few steps."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.cases import TINY
from vit_core import ViTConfig
from vit_tf import TFViTForImageClassification

BATCH, SAMPLES, EPOCHS = 8, 16, 2


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SAMPLES, 3, 32, 32)).astype("float32")
    y = rng.integers(0, TINY["num_labels"], SAMPLES).astype("int64")
    return x, y


def tiny_model(**overrides) -> TFViTForImageClassification:
    return TFViTForImageClassification(ViTConfig(**{**TINY, **overrides}), seed=0)


def compile_with_loss(model: TFViTForImageClassification) -> None:
    model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])


def test_fit_evaluate_predict_with_compiled_loss():
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model = tiny_model()
    compile_with_loss(model)
    loss_before, accuracy_before = model.evaluate(ds, verbose=0)
    direct = model(x).logits.numpy()
    # the compiled loss on the logits equals the model's own cross-entropy
    assert loss_before == pytest.approx(float(model(x, labels=y).loss), abs=1e-5)
    history = model.fit(ds, epochs=EPOCHS, verbose=0).history
    assert set(history) == {"loss", "accuracy"} and len(history["loss"]) == EPOCHS
    loss_after, _ = model.evaluate(ds, verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    assert 0.0 <= accuracy_before <= 1.0

    predicted = model.predict(ds, verbose=0)
    assert isinstance(predicted.logits, np.ndarray) and predicted.logits.shape == (SAMPLES, TINY["num_labels"])
    np.testing.assert_allclose(predicted["logits"], model(x).logits.numpy(), atol=1e-5, rtol=0)
    from_array = model.predict(x, batch_size=5, verbose=0)  # an array with a partial last batch
    np.testing.assert_allclose(from_array.logits, predicted.logits, atol=1e-5, rtol=0)
    assert predicted.loss is None
    assert not np.allclose(direct, predicted.logits)  # the weights did change


def test_labels_in_dict_and_the_models_own_loss():
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices({"pixel_values": x, "labels": y}).batch(BATCH)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), metrics=["accuracy"])  # no loss: outputs.loss
    loss_before, _ = model.evaluate(ds, verbose=0)
    assert loss_before == pytest.approx(float(model(x, labels=y).loss), abs=1e-5)
    history = model.fit(ds, epochs=EPOCHS, verbose=0).history
    loss_after, _ = model.evaluate(ds, verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    predicted = model.predict(ds, verbose=0)  # labels in the dict are ignored by predict
    np.testing.assert_allclose(predicted.logits, model(x).logits.numpy(), atol=1e-5, rtol=0)



def test_tuple_dataset_without_compiled_loss_passes_labels():
    x, y = data()
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    with pytest.raises(ValueError, match="without a loss"):
        model.fit(x, batch_size=BATCH, epochs=1, verbose=0)


@pytest.mark.parametrize("policy, compute", [("mixed_bfloat16", tf.bfloat16), ("mixed_float16", tf.float16)])
def test_mixed_precision_global_policy(policy, compute):
    keras.mixed_precision.set_global_policy(policy)
    x, y = data()
    model = tiny_model()
    assert model.compute_dtype == compute.name
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    out = model(x, labels=y)
    assert out.logits.dtype == compute and out.loss.dtype == tf.float32
    compile_with_loss(model)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    loss_before, _ = model.evaluate(ds, verbose=0)
    history = model.fit(ds, epochs=EPOCHS, verbose=0).history
    loss_after, _ = model.evaluate(ds, verbose=0)
    assert np.all(np.isfinite(history["loss"]))
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert model.predict(x, verbose=0).logits.dtype == compute.name


def test_keras_save_load_round_trip(tmp_path):
    x, y = data()
    model = tiny_model()
    compile_with_loss(model)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded) is TFViTForImageClassification and reloaded.config == model.config
    np.testing.assert_array_equal(reloaded(x).logits.numpy(), model(x).logits.numpy())
    for a, b in zip(model.weights, reloaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the compiled state comes back: training continues
    reloaded.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


def test_from_pretrained_new_head(tmp_path):
    x, _ = data()
    source = tiny_model()
    source.save_pretrained(tmp_path)
    id2label = {0: "cat", 1: "dog", 2: "bird"}
    model = TFViTForImageClassification.from_pretrained(tmp_path, num_labels=3, id2label=id2label,
                                                        ignore_mismatched_sizes=True, seed=1)
    assert model.config.num_labels == 3 and model.classifier.weight.shape == (TINY["hidden_size"], 3)
    assert {int(k): v for k, v in model.config.id2label.items()} == id2label
    np.testing.assert_array_equal(model.vit.embeddings.position_embeddings.numpy(),
                                  source.vit.embeddings.position_embeddings.numpy())
    np.testing.assert_allclose(model.vit(x).last_hidden_state.numpy(), source.vit(x).last_hidden_state.numpy(),
                               atol=1e-6)
    assert model(x).logits.shape == (SAMPLES, 3)
    y = np.arange(SAMPLES) % 3
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]


def test_gradient_checkpointing_gradients_equal():
    x, y = data()
    model = tiny_model()
    assert not model.is_gradient_checkpointing

    def gradients():
        with tf.GradientTape() as tape:
            loss = model(x[:4], labels=y[:4], training=True).loss
        return loss, tape.gradient(loss, model.trainable_variables)

    loss_plain, plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.vit.encoder.gradient_checkpointing
    loss_ckpt, checkpointed = gradients()
    assert float(loss_plain) == pytest.approx(float(loss_ckpt), abs=1e-6)
    assert len(plain) == len(checkpointed) == len(model.trainable_variables)
    for variable, a, b in zip(model.trainable_variables, plain, checkpointed):
        assert b is not None, variable.path
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0, err_msg=variable.path)
    # fit runs through tf.recompute_grad inside tf.function too
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_gradient_checkpointing_with_dropout_draws_the_same_masks():
    """The recomputation restarts the dropout streams: same gradients and the same stream states after."""
    x, y = data()
    model = tiny_model(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    generators = [layer.seed_generator for layer in model._flatten_layers()
                  if isinstance(layer, keras.layers.Dropout)]
    assert generators

    def gradients():
        start = [g.state.numpy() for g in generators]
        with tf.GradientTape() as tape:
            loss = model(x[:4], labels=y[:4], training=True).loss
        grads = tape.gradient(loss, model.trainable_variables)
        end = [g.state.numpy() for g in generators]
        for generator, state in zip(generators, start):
            generator.state.assign(state)
        return grads, end

    plain, plain_end = gradients()
    model.gradient_checkpointing_enable()
    checkpointed, checkpointed_end = gradients()
    for variable, a, b in zip(model.trainable_variables, plain, checkpointed):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0, err_msg=variable.path)
    for a, b in zip(plain_end, checkpointed_end):
        np.testing.assert_array_equal(a, b)
