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
from vit_core.training import AdamW, part_bounds

from .modeling import FlaxViTForImageClassification
from .weights import LAYOUTS, canonical_state, flax_path, load_canonical_state

__all__ = ["Parallel", "TrainStep", "model_for_training", "parallel"]

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


def _host(a: Any) -> np.ndarray:
    """An array's value on this host (a global array spanning processes: its local copy, replicated)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return np.asarray(a.addressable_data(0))
    return np.asarray(a)


_IGNORE = -100  # the label of padding rows: the loss skips it (torch's ignore_index)


class Parallel:
    """Data parallelism over a ``jax.sharding.Mesh`` of every device (axis ``"data"``): the batch is
    sharded along it, the parameters replicated, or with ``fsdp`` sharded along it too (each
    parameter on its largest axis that the mesh divides; the rest replicated). Across processes
    the mesh spans every process's devices (``jax.distributed.initialize``, CPU collectives through
    gloo, ``timeout`` seconds to meet).

    The same attributes in every framework's ``Parallel``: ``rank`` and ``processes`` (this process
    among all), ``parts`` (the model replicas a global batch is split into: here the devices),
    ``first_part`` and ``local_parts`` (the parts this process feeds: its devices).
    """

    def __init__(self, *, fsdp: bool = False, timeout: float = 600.0, coordinator_address: str | None = None,
                 num_processes: int | None = None, process_id: int | None = None) -> None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.fsdp = fsdp
        self._distributed = coordinator_address is not None
        if self._distributed:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
            # a task is declared dead after heartbeat_timeout_seconds without a heartbeat: never below
            # jax's own default (100 s), since on a machine with fewer cores than busy processes the
            # heartbeats of healthy tasks were seen to lapse for 60 s (both tasks "unhealthy", aborted)
            jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                       initialization_timeout=max(1, int(timeout)),
                                       heartbeat_timeout_seconds=max(100, int(timeout)))
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.mesh = Mesh(np.array(devices), ("data",))
        self.rank, self.processes = jax.process_index(), jax.process_count()
        self.parts = len(devices)
        local = [i for i, d in enumerate(devices) if d.process_index == self.rank]
        self.first_part, self.local_parts = local[0], len(local)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch = NamedSharding(self.mesh, PartitionSpec("data"))

    def describe(self) -> str:
        kind = "parameters sharded (fsdp)" if self.fsdp else "parameters replicated"
        return f"jax mesh of {self.parts} {jax.default_backend()} devices, batch sharded, {kind}"

    def param_sharding(self, shape: tuple[int, ...]) -> Any:
        """Where a parameter of ``shape`` lives: replicated, or with ``fsdp`` split along its largest
        axis of a length the mesh divides."""
        from jax.sharding import NamedSharding, PartitionSpec

        if not self.fsdp:
            return self.replicated
        axes = [a for a in sorted(range(len(shape)), key=lambda a: -shape[a]) if shape[a] % self.parts == 0]
        if not axes:
            return self.replicated
        spec = [None] * len(shape)
        spec[axes[0]] = "data"
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def put(self, tree: Any, shardings: Any = None) -> Any:
        """Host values (the same on every process) placed with ``shardings`` (default: replicated)."""
        if shardings is None:
            return jax.tree.map(lambda a: jax.device_put(np.asarray(a), self.replicated), tree)
        return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), tree, shardings)

    def fetch(self, tree: Any) -> Any:
        """Global arrays as host numpy arrays, whole, on every process."""
        whole = jax.jit(lambda t: t, out_shardings=self.replicated)(tree)
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), whole)

    def global_batch(self, pixel_values: np.ndarray, labels: np.ndarray, count: int) -> tuple[jax.Array, jax.Array]:
        """This process's rows of a global batch of ``count`` rows as the sharded global arrays: each
        device's part padded to the largest part's rows (padding labelled -100: no loss, no gradient)."""
        bounds = part_bounds(count, self.parts)
        rows = int(bounds[1] - bounds[0])
        mine = bounds[self.first_part:self.first_part + self.local_parts + 1] - bounds[self.first_part]
        x_parts, y_parts = [], []
        shape = np.shape(pixel_values)[1:]
        for lo, hi in zip(mine[:-1], mine[1:]):
            pad = rows - int(hi - lo)
            x_parts += [np.asarray(pixel_values[lo:hi], np.float32), np.zeros((pad, *shape), np.float32)]
            y_parts += [np.asarray(labels[lo:hi], np.int32), np.full(pad, _IGNORE, np.int32)]
        x, y = np.concatenate(x_parts), np.concatenate(y_parts)
        global_rows = rows * self.parts
        return (jax.make_array_from_process_local_data(self.batch, x, (global_rows, *shape)),
                jax.make_array_from_process_local_data(self.batch, y, (global_rows,)))

    def local_rows(self, array: jax.Array, count: int) -> np.ndarray:
        """This process's rows of a global array that :meth:`global_batch` laid out (padding dropped)."""
        bounds = part_bounds(count, self.parts)
        rows = int(bounds[1] - bounds[0])
        shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        out = []
        for i, shard in zip(range(self.first_part, self.first_part + self.local_parts), shards):
            out.append(np.asarray(shard.data)[:int(bounds[i + 1] - bounds[i])])
        return np.concatenate(out) if out else np.zeros((0, *array.shape[1:]), array.dtype)

    def sum(self, values: Any) -> np.ndarray:
        """``values`` (a float64 array) summed over every process."""
        values = np.asarray(values, np.float64)
        if self.processes == 1:
            return values
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(values), np.float64).sum(axis=0)

    def close(self) -> None:
        if self._distributed:
            jax.distributed.shutdown()


def parallel(*, fsdp: bool = False, timeout: float = 600.0, coordinator_address: str | None = None,
             num_processes: int | None = None, process_id: int | None = None, **unused: Any) -> Parallel | None:
    """The :class:`Parallel` of this run: across processes with ``coordinator_address`` (jax.distributed),
    over the local devices when there are several (or with ``fsdp``), else None (one device)."""
    if coordinator_address is not None or fsdp or len(jax.devices()) > 1:
        return Parallel(fsdp=fsdp, timeout=timeout, coordinator_address=coordinator_address,
                        num_processes=num_processes, process_id=process_id)
    return None


class TrainStep:
    """AdamW steps of ``model`` (a FlaxViTForImageClassification) on numpy batches.

    ``dtype="bfloat16"`` expects a model built with ``dtype=bfloat16, param_dtype=float32`` (see
    :func:`model_for_training`). The loss is the model's own (``labels=``). The model object is
    updated after every step (its parameters are the trained ones).

    With ``parallel`` (a :class:`Parallel`) the step is one program over the mesh: each process
    passes its rows of the global batch and the global batch's size as ``count``, the loss is the
    global batch's mean, and the parameters (and AdamW's moments) are placed as ``parallel`` says.
    """

    def __init__(self, model: nnx.Module, adamw: AdamW, *, dtype: str = "float32",
                 parallel: Parallel | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.model = model
        self.parallel = parallel
        self._graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        self.tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=adamw.lr, b1=adamw.beta1, b2=adamw.beta2, eps=adamw.eps,
            weight_decay=adamw.weight_decay, mask=_decays)
        self.opt_state = self.tx.init(self._params)
        if parallel is not None:  # parameters and moments placed as parallel says, the rest replicated
            self._param_shardings = jax.tree.map(lambda p: parallel.param_sharding(p.shape), self._params)
            self._params = parallel.put(self._params, self._param_shardings)
            self._rest = parallel.put(self._rest)
            self.opt_state = self._place_opt_state(self.opt_state)
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

        if parallel is None:
            self._step = jax.jit(train_step, donate_argnums=(0, 2))
            self._logits = jax.jit(logits)
        else:
            def seeded_step(params: Any, rest: Any, opt_state: Any, x: jax.Array, y: jax.Array, seed: jax.Array) -> Any:
                return train_step(params, rest, opt_state, x, y, jax.random.key(seed))

            opt_shardings = jax.tree.map(lambda a: a.sharding, self.opt_state)
            self._step = jax.jit(seeded_step, donate_argnums=(0, 2),
                                 out_shardings=(self._param_shardings, opt_shardings, parallel.replicated))
            self._logits = jax.jit(logits, out_shardings=parallel.batch)

    def _place_opt_state(self, opt_state: Any) -> Any:
        # host values (or arrays on one device, or replicated global ones) placed over the mesh
        parallel = self.parallel
        host = jax.tree.map(_host, opt_state)
        placed = parallel.put(host)
        adam = placed.inner_state[0]._replace(mu=parallel.put(host.inner_state[0].mu, self._param_shardings),
                                              nu=parallel.put(host.inner_state[0].nu, self._param_shardings))
        return placed._replace(inner_state=(adam,) + tuple(placed.inner_state[1:]))

    def step(self, pixel_values: np.ndarray, labels: np.ndarray, lr: float, seed: int, *,
             count: int | None = None) -> float:
        """One optimizer step on a batch at learning rate ``lr``; dropout drawn from ``seed``. The batch loss.

        Under ``parallel``: ``pixel_values``/``labels`` are this process's rows (perhaps none) of a global
        batch of ``count`` rows; the loss and the gradients are those of the global batch's mean loss."""
        if self.parallel is None:
            lr_value, key = jnp.asarray(lr, jnp.float32), jax.random.key(seed)
            x, y = jnp.asarray(pixel_values, jnp.float32), jnp.asarray(labels, jnp.int32)
        else:
            count = len(labels) if count is None else count
            if count < 1:
                raise ValueError("an optimizer step needs at least one image in its (global) batch")
            lr_value = jax.device_put(np.asarray(lr, np.float32), self.parallel.replicated)
            key = jax.device_put(np.asarray(seed, np.uint32), self.parallel.replicated)  # the step's key is key(seed)
            x, y = self.parallel.global_batch(pixel_values, labels, count)
        self.opt_state.hyperparams["learning_rate"] = lr_value
        self._params, self.opt_state, loss = self._step(self._params, self._rest, self.opt_state, x, y, key)
        self._steps += 1
        nnx.update(self.model, self._params)
        return float(np.asarray(loss.addressable_data(0)) if self.parallel is not None else loss)

    def logits(self, pixel_values: np.ndarray, *, count: int | None = None) -> np.ndarray:
        """Inference-mode logits (float32 numpy) of a batch (under ``parallel``: this process's rows of a
        global batch of ``count`` rows; every process must call it)."""
        if self.parallel is None:
            return np.asarray(self._logits(self._params, self._rest, jnp.asarray(pixel_values, jnp.float32)))
        count = len(pixel_values) if count is None else count
        x, _ = self.parallel.global_batch(pixel_values, np.zeros(len(pixel_values), np.int32), count)
        return self.parallel.local_rows(self._logits(self._params, self._rest, x), count)

    # -------------------------------------------------------------------------- state
    def weights(self) -> dict[str, np.ndarray]:
        """The model's weights, canonical names and layout (under ``parallel`` every process must call it)."""
        if self.parallel is None:
            return canonical_state(self.model)
        nnx.update(self.model, self.parallel.fetch(self._params))
        try:
            return canonical_state(self.model)
        finally:
            nnx.update(self.model, self._params)

    def _adam(self) -> Any:
        return self.opt_state.inner_state[0]  # optax.ScaleByAdamState(count, mu, nu)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's moments (canonical names and layout) and its step count; empty before the first step."""
        adam = self._adam() if self.parallel is None else self.parallel.fetch(self._adam())
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
        if self.parallel is not None:
            self.opt_state = self._place_opt_state(self.opt_state)


def model_for_training(config: ViTConfig, state: Mapping[str, np.ndarray], *, dtype: str = "float32",
                       parallel: Parallel | None = None) -> nnx.Module:
    """A FlaxViTForImageClassification holding the canonical ``state``: float32 parameters,
    computation in ``dtype`` (``parallel``: placed by :class:`TrainStep`)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    model = FlaxViTForImageClassification(config, dtype=_DTYPES[dtype], param_dtype=jnp.float32)
    load_canonical_state(model, state, source="fine-tuning state")
    return model
