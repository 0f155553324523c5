"""One optimizer step of a vit_tf classifier: vit_core's AdamW rule on a Keras ``AdamW``.

Mirrors vit_torch/training.py (same class, methods and optimizer-state names). Keras' Adam adds
epsilon to ``sqrt(v)`` before the bias correction (``lr * sqrt(1 - b2^t) / (1 - b1^t) * m /
(sqrt(v) + eps)``), torch and optax after it (``lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) +
eps)``): the two differ by a factor ``sqrt(1 - b2^t)`` on epsilon, 0.03 at step 1. :class:`AdamW`
below is Keras' AdamW with epsilon placed as torch does and the bias corrections computed in
float64; weight decay stays Keras' own (``p -= p * wd * lr`` before the update, as torch), with
biases and LayerNorm scales excluded through ``exclude_from_weight_decay``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vit_core import training as core_training
from vit_core.config import ViTConfig
from vit_core.training import decays

from .modeling import TFViTForImageClassification
from .weights import LAYOUTS, canonical_state, get_variable, load_canonical_state, seed_dropout

__all__ = ["AdamW", "TrainStep", "model_for_training"]

_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


@keras.saving.register_keras_serializable(package="vitx")
class AdamW(keras.optimizers.AdamW):
    """Keras AdamW with epsilon after the bias correction (torch.optim.AdamW's and optax's placement)."""

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        step = tf.cast(self.iterations + 1, tf.float64)
        bias_correction1 = 1.0 - tf.pow(tf.constant(self.beta_1, tf.float64), step)
        bias_correction2_sqrt = tf.sqrt(1.0 - tf.pow(tf.constant(self.beta_2, tf.float64), step))
        step_size = tf.cast(tf.cast(learning_rate, tf.float64) / bias_correction1, dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign(m, m + (gradient - m) * (1.0 - self.beta_1))
        self.assign(v, v * self.beta_2 + gradient * gradient * (1.0 - self.beta_2))
        denom = tf.sqrt(v) / tf.cast(bias_correction2_sqrt, dtype) + self.epsilon
        self.assign_sub(variable, m / denom * step_size)


class TrainStep:
    """AdamW steps of ``model`` (a TFViTForImageClassification) on numpy batches.

    ``dtype="bfloat16"`` expects a model built under the ``mixed_bfloat16`` policy (float32
    variables, bfloat16 computation; see :func:`model_for_training`). The loss is the model's own (``labels=``),
    the step one ``tf.function``.
    """

    def __init__(self, model: keras.Model, adamw: core_training.AdamW, *, dtype: str = "float32") -> None:
        if dtype not in _POLICIES:
            raise ValueError(f"dtype must be one of {', '.join(_POLICIES)}, got {dtype!r}")
        self.model = model
        self._specs = model.canonical_table()
        self._variables = [(spec, get_variable(model, spec.name)) for spec in self._specs]
        self.optimizer = AdamW(learning_rate=adamw.lr, beta_1=adamw.beta1, beta_2=adamw.beta2,
                               epsilon=adamw.eps, weight_decay=adamw.weight_decay)
        self.optimizer.exclude_from_weight_decay(var_list=[v for spec, v in self._variables if not decays(spec)])
        self.optimizer.build([v for _, v in self._variables])
        self._step = tf.function(self._train_step, reduce_retracing=True)
        self._forward = tf.function(lambda x: model(x, training=False).logits, reduce_retracing=True)

    def _train_step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        variables = [v for _, v in self._variables]
        with tf.GradientTape() as tape:
            loss = tf.cast(self.model(x, labels=y, training=True).loss, tf.float32)
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    def step(self, pixel_values: np.ndarray, labels: np.ndarray, lr: float, seed: int) -> float:
        """One optimizer step on a batch at learning rate ``lr``; dropout drawn from ``seed``. The batch loss."""
        self.optimizer.learning_rate = lr
        seed_dropout(self.model, seed)
        loss = self._step(tf.convert_to_tensor(np.ascontiguousarray(pixel_values, np.float32)),
                          tf.convert_to_tensor(np.asarray(labels, np.int64)))
        return float(loss)

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """Inference-mode logits (float32 numpy) of a batch."""
        logits = self._forward(tf.convert_to_tensor(np.ascontiguousarray(pixel_values, np.float32)))
        return tf.cast(logits, tf.float32).numpy()

    # -------------------------------------------------------------------------- state
    def weights(self) -> dict[str, np.ndarray]:
        """The model's weights, canonical names and layout."""
        return canonical_state(self.model)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's moments (canonical names and layout) and its step count; empty before the first step."""
        step = int(self.optimizer.iterations.numpy())
        if step == 0:
            return {}
        out: dict[str, np.ndarray] = {"step": np.asarray(step, np.int64)}
        for moment, slots in (("exp_avg", self.optimizer._momentums), ("exp_avg_sq", self.optimizer._velocities)):
            for spec, variable in self._variables:
                _, from_tf = LAYOUTS[spec.kind]
                slot = slots[self.optimizer._get_variable_index(variable)]
                out[f"{moment}.{spec.name}"] = from_tf(np.asarray(slot.numpy())).astype(np.float32)
        return out

    def load_optimizer_state(self, values: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned."""
        self.optimizer.iterations.assign(int(np.asarray(values["step"])))
        for moment, slots in (("exp_avg", self.optimizer._momentums), ("exp_avg_sq", self.optimizer._velocities)):
            for spec, variable in self._variables:
                to_tf, _ = LAYOUTS[spec.kind]
                slots[self.optimizer._get_variable_index(variable)].assign(to_tf(values[f"{moment}.{spec.name}"]))


def model_for_training(config: ViTConfig, state: Mapping[str, np.ndarray], *, dtype: str = "float32") -> keras.Model:
    """A TFViTForImageClassification holding the canonical ``state``, built under the Keras policy that
    trains in ``dtype`` ("bfloat16": ``mixed_bfloat16``, float32 variables)."""
    if dtype not in _POLICIES:
        raise ValueError(f"dtype must be one of {', '.join(_POLICIES)}, got {dtype!r}")
    model = TFViTForImageClassification(config, dtype=_POLICIES[dtype])
    load_canonical_state(model, state, source="fine-tuning state")
    return model
