"""One optimizer step of a vit_flax classifier: vit_core's AdamW rule on ``optax.adamw``.

Mirrors vit_torch/training.py (same class, methods and optimizer-state names). optax.adamw
already places epsilon after the bias correction and adds ``wd * p`` to the update before the
learning rate scales it, which is vit_core.training's rule; biases and LayerNorm scales are
masked out of the decay. The learning rate is set per step through ``optax.inject_hyperparams``,
so the schedule is the recipe's own (float64 on the host) in every framework. The step is one
``jax.jit`` of a pure function of (parameters, optimizer state, batch, learning rate, dropout key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vit_core.config import ViTConfig
from vit_core.training import AdamW

from .modeling import FlaxViTForImageClassification
from .weights import LAYOUTS, canonical_state, flax_path, load_canonical_state

__all__ = ["TrainStep", "model_for_training"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _decays(params: Any) -> Any:
    # vit_core.training.decays on each leaf: weights of rank above one decay (a Flax parameter has
    # the rank of its canonical weight)
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:  # pragma: no cover - jax key types are the three above
            names.append(str(key))
    return tuple(names[:-1] if names and names[-1] == "value" else names)  # a Variable's own leaf


class TrainStep:
    """AdamW steps of ``model`` (a FlaxViTForImageClassification) on numpy batches.

    ``dtype="bfloat16"`` expects a model built with ``dtype=bfloat16, param_dtype=float32`` (see
    :func:`model_for_training`). The loss is the model's own (``labels=``). The model object is
    updated after every step (its parameters are the trained ones).
    """

    def __init__(self, model: nnx.Module, adamw: AdamW, *, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.model = model
        self._graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        self.tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=adamw.lr, b1=adamw.beta1, b2=adamw.beta2, eps=adamw.eps,
            weight_decay=adamw.weight_decay, mask=_decays)
        self.opt_state = self.tx.init(self._params)
        self._steps = 0
        # canonical spec of every parameter leaf, in the pytree's flattening order
        by_path = {flax_path(spec): spec for spec in model.canonical_table()}
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(self._params)
        self._leaf_specs = [by_path[_path_names(path)] for path, _ in leaves]
        graphdef, tx = self._graphdef, self.tx

        def train_step(params: Any, rest: Any, opt_state: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
            def loss_fn(p: Any) -> jax.Array:
                m = nnx.merge(graphdef, p, rest)
                return m.forward(x, labels=y, train=True, dropout_rng=key).loss.astype(jnp.float32)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def logits(params: Any, rest: Any, x: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, params, rest).forward(x).logits.astype(jnp.float32)

        self._step = jax.jit(train_step, donate_argnums=(0, 2))
        self._logits = jax.jit(logits)

    def step(self, pixel_values: np.ndarray, labels: np.ndarray, lr: float, seed: int) -> float:
        """One optimizer step on a batch at learning rate ``lr``; dropout drawn from ``seed``. The batch loss."""
        self.opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        self._params, self.opt_state, loss = self._step(
            self._params, self._rest, self.opt_state, jnp.asarray(pixel_values, jnp.float32),
            jnp.asarray(labels, jnp.int32), jax.random.key(seed))
        self._steps += 1
        nnx.update(self.model, self._params)
        return float(loss)

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """Inference-mode logits (float32 numpy) of a batch."""
        return np.asarray(self._logits(self._params, self._rest, jnp.asarray(pixel_values, jnp.float32)))

    # -------------------------------------------------------------------------- state
    def weights(self) -> dict[str, np.ndarray]:
        """The model's weights, canonical names and layout."""
        return canonical_state(self.model)

    def _adam(self) -> Any:
        return self.opt_state.inner_state[0]  # optax.ScaleByAdamState(count, mu, nu)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's moments (canonical names and layout) and its step count; empty before the first step."""
        adam = self._adam()
        step = int(adam.count)
        if step == 0:
            return {}
        out: dict[str, np.ndarray] = {"step": np.asarray(step, np.int64)}
        for moment, tree in (("exp_avg", adam.mu), ("exp_avg_sq", adam.nu)):
            for spec, leaf in zip(self._leaf_specs, jax.tree_util.tree_leaves(tree)):
                _, from_flax = LAYOUTS[spec.kind]
                out[f"{moment}.{spec.name}"] = np.ascontiguousarray(from_flax(np.asarray(leaf, np.float32)))
        return out

    def load_optimizer_state(self, values: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`optimizer_state` returned."""
        def tree(moment: str) -> Any:
            leaves = [jnp.asarray(LAYOUTS[spec.kind][0](np.asarray(values[f"{moment}.{spec.name}"])), jnp.float32)
                      for spec in self._leaf_specs]
            return self._treedef.unflatten(leaves)

        adam = self._adam()
        step = int(np.asarray(values["step"]))
        # fresh arrays each: the step donates the optimizer state, and one buffer may not be donated twice
        inner = (adam._replace(count=jnp.asarray(step, adam.count.dtype), mu=tree("exp_avg"), nu=tree("exp_avg_sq")),)
        self.opt_state = self.opt_state._replace(count=jnp.asarray(step, self.opt_state.count.dtype),
                                                 inner_state=inner + tuple(self.opt_state.inner_state[1:]))


def model_for_training(config: ViTConfig, state: Mapping[str, np.ndarray], *, dtype: str = "float32") -> nnx.Module:
    """A FlaxViTForImageClassification holding the canonical ``state``: float32 parameters,
    computation in ``dtype``."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    model = FlaxViTForImageClassification(config, dtype=_DTYPES[dtype], param_dtype=jnp.float32)
    load_canonical_state(model, state, source="fine-tuning state")
    return model
