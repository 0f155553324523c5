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

import os
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from vit_core import training as core_training
from vit_core.config import ViTConfig
from vit_core.training import decays, nonempty, part_bounds

from .modeling import TFViTForImageClassification
from .weights import LAYOUTS, canonical_state, get_variable, load_canonical_state, seed_dropout

__all__ = ["AdamW", "Parallel", "TrainStep", "model_for_training", "parallel"]

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


class Parallel:
    """Data parallelism through ``tf.distribute``: ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG``
    names the workers (one process each), else ``MirroredStrategy`` over the local devices (the GPUs,
    or the logical CPU devices when there are several). Collectives give up after ``timeout``
    seconds. Variables are mirrored (one copy per replica); gradients are summed over the replicas.

    The same attributes in every framework's ``Parallel``: ``rank`` and ``processes`` (this process
    among all), ``parts`` (the model replicas a global batch is split into), ``first_part`` and
    ``local_parts`` (the parts this process feeds: its replicas).
    """

    def __init__(self, *, timeout: float = 600.0) -> None:
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        if os.environ.get("TF_CONFIG"):
            self.strategy: tf.distribute.Strategy = tf.distribute.MultiWorkerMirroredStrategy(
                communication_options=options)
            resolver = self.strategy.cluster_resolver
            self.rank = int(resolver.task_id)
            self.processes = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1
        else:
            self.strategy = tf.distribute.MirroredStrategy(devices=_local_devices(),
                                                           cross_device_ops=tf.distribute.ReductionToOneDevice())
            self.rank, self.processes = 0, 1
        self.local_parts = len(self.strategy.extended.worker_devices)
        self.parts = int(self.strategy.num_replicas_in_sync)
        self.first_part = self.rank * self.local_parts

    def describe(self) -> str:
        return f"tf.distribute.{type(self.strategy).__name__}, {self.local_parts} replica(s) per process"

    def sum(self, values: Any) -> np.ndarray:
        """``values`` (a float64 array) summed over every process."""
        values = np.asarray(values, np.float64)
        if self.processes == 1:
            return values
        local_parts = self.local_parts

        def one(v: tf.Tensor) -> tf.Tensor:  # counted once per process: by its first replica
            ctx = tf.distribute.get_replica_context()
            return tf.where(ctx.replica_id_in_sync_group % local_parts == 0, v, tf.zeros_like(v))

        per_replica = self.strategy.run(one, args=(tf.constant(values),))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()

    def close(self) -> None:
        return None


def _local_devices() -> list[str]:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def parallel(*, fsdp: bool = False, timeout: float = 600.0, **unused: Any) -> Parallel | None:
    """The :class:`Parallel` of this run: with ``TF_CONFIG`` set, or more than one local device; else None."""
    if fsdp:
        raise ValueError("--fsdp: TensorFlow runs mirrored variables only (MirroredStrategy, "
                         "MultiWorkerMirroredStrategy); use --framework torch or flax to shard parameters")
    if os.environ.get("TF_CONFIG") or len(_local_devices()) > 1:
        return Parallel(timeout=timeout)
    return None


class TrainStep:
    """AdamW steps of ``model`` (a TFViTForImageClassification) on numpy batches.

    ``dtype="bfloat16"`` expects a model built under the ``mixed_bfloat16`` policy (float32
    variables, bfloat16 computation; see :func:`model_for_training`). The loss is the model's own (``labels=``),
    the step one ``tf.function``.

    With ``parallel`` (a :class:`Parallel`; the model built in its strategy's scope, see
    :func:`model_for_training`) the step is ``strategy.run`` of a replica step: each replica gets
    its part of the process's rows, weighs its mean loss by its share of the global batch's
    ``count`` rows, and the optimizer sums the gradients over the replicas.
    """

    def __init__(self, model: keras.Model, adamw: core_training.AdamW, *, dtype: str = "float32",
                 parallel: Parallel | None = None) -> None:
        if dtype not in _POLICIES:
            raise ValueError(f"dtype must be one of {', '.join(_POLICIES)}, got {dtype!r}")
        self.model = model
        self.parallel = parallel
        self._specs = model.canonical_table()
        self._variables = [(spec, get_variable(model, spec.name)) for spec in self._specs]
        scope = parallel.strategy.scope() if parallel is not None else _nothing()
        with scope:
            self.optimizer = AdamW(learning_rate=adamw.lr, beta_1=adamw.beta1, beta_2=adamw.beta2,
                                   epsilon=adamw.eps, weight_decay=adamw.weight_decay)
            self.optimizer.exclude_from_weight_decay(var_list=[v for spec, v in self._variables if not decays(spec)])
            self.optimizer.build([v for _, v in self._variables])
        self._step = tf.function(self._train_step, reduce_retracing=True)
        if parallel is not None:
            self._distributed_step = tf.function(self._run_replicas, reduce_retracing=True)
        self._forward = tf.function(lambda x: model(x, training=False).logits, reduce_retracing=True)

    def _train_step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        variables = [v for _, v in self._variables]
        with tf.GradientTape() as tape:
            loss = tf.cast(self.model(x, labels=y, training=True).loss, tf.float32)
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    def _replica_step(self, x: tf.Tensor, y: tf.Tensor, share: tf.Tensor) -> tf.Tensor:
        variables = [v for _, v in self._variables]
        with tf.GradientTape() as tape:
            loss = tf.cast(self.model(x, labels=y, training=True).loss, tf.float32) * share
        self.optimizer.apply(tape.gradient(loss, variables), variables)  # Keras sums over the replicas
        return loss

    def _run_replicas(self, x: Any, y: Any, share: Any) -> tf.Tensor:
        strategy = self.parallel.strategy
        per_replica = strategy.run(self._replica_step, args=(x, y, share))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _per_replica(self, pixel_values: np.ndarray, labels: np.ndarray, count: int) -> tuple[Any, Any, Any]:
        # this process's rows split into its replicas' parts (an empty part: a placeholder row of weight 0)
        parallel = self.parallel
        bounds = part_bounds(count, parallel.parts)[parallel.first_part:parallel.first_part + parallel.local_parts + 1]
        bounds = bounds - bounds[0]
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            x, y, rows = nonempty(pixel_values[lo:hi], labels[lo:hi])
            parts.append((np.ascontiguousarray(x, np.float32), np.asarray(y, np.int64), np.float32(rows / count)))

        def value(i: int) -> Any:
            return lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group - parallel.first_part][i])

        strategy = parallel.strategy
        return tuple(strategy.experimental_distribute_values_from_function(value(i)) for i in range(3))

    def step(self, pixel_values: np.ndarray, labels: np.ndarray, lr: float, seed: int, *,
             count: int | None = None) -> float:
        """One optimizer step on a batch at learning rate ``lr``; dropout drawn from ``seed``. The batch loss.

        Under ``parallel``: ``pixel_values``/``labels`` are this process's rows (perhaps none) of a global
        batch of ``count`` rows; the loss and the gradients are those of the global batch's mean loss."""
        self.optimizer.learning_rate = lr
        seed_dropout(self.model, seed)
        if self.parallel is not None:
            count = len(labels) if count is None else count
            if count < 1:
                raise ValueError("an optimizer step needs at least one image in its (global) batch")
            return float(self._distributed_step(*self._per_replica(pixel_values, labels, count)))
        loss = self._step(tf.convert_to_tensor(np.ascontiguousarray(pixel_values, np.float32)),
                          tf.convert_to_tensor(np.asarray(labels, np.int64)))
        return float(loss)

    def logits(self, pixel_values: np.ndarray, *, count: int | None = None) -> np.ndarray:
        """Inference-mode logits (float32 numpy) of a batch (under ``parallel``: this process's rows,
        computed on this process with the mirrored weights)."""
        if not len(pixel_values):
            return np.zeros((0, self.model.config.num_labels), np.float32)
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


def model_for_training(config: ViTConfig, state: Mapping[str, np.ndarray], *, dtype: str = "float32",
                       parallel: Parallel | None = None) -> keras.Model:
    """A TFViTForImageClassification holding the canonical ``state``, built under the Keras policy that
    trains in ``dtype`` ("bfloat16": ``mixed_bfloat16``, float32 variables); with ``parallel`` in its
    strategy's scope (mirrored variables)."""
    if dtype not in _POLICIES:
        raise ValueError(f"dtype must be one of {', '.join(_POLICIES)}, got {dtype!r}")
    with parallel.strategy.scope() if parallel is not None else _nothing():
        model = TFViTForImageClassification(config, dtype=_POLICIES[dtype])
        load_canonical_state(model, state, source="fine-tuning state")
    return model


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
