"""Canonical weights <-> Flax NNX parameters, random init by the table, from/save_pretrained.

The canonical weight table (vit_core.weights) names every parameter with its transformers 4.x
PyTorch name and layout. In this framework the attribute path of each parameter is that name
with one declared rule for the leaf (``LEAF_NAMES``: a Linear or Conv ``weight`` is Flax's
``kernel``, a LayerNorm ``weight`` is ``scale``; docs/FORMATS.md section 4, transformers' Flax
names), and the layout changes by kind only (``LAYOUTS``): Linear kernels are (in, out), Conv
kernels (kh, kw, in, out). So ``nnx.state(model)`` has the tree of a transformers
flax_model.msgpack.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_core import pretrained as core_pretrained
from vit_core.checkpoint.fit import check_state_fits_table
from vit_core.config import ViTConfig
from vit_core.weights import KINDS, WeightSpec, weight_table

from .layers import init_array

if TYPE_CHECKING:  # pragma: no cover
    from .modeling import FlaxViTPreTrainedModel


def _same_layout(array: np.ndarray) -> np.ndarray:
    return array


def _transpose_linear(array: np.ndarray) -> np.ndarray:
    return array.T  # (out, in) <-> (in, out)


def _conv_to_flax(array: np.ndarray) -> np.ndarray:
    return array.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)


def _conv_from_flax(array: np.ndarray) -> np.ndarray:
    return array.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)


# kind -> (canonical -> Flax layout, Flax -> canonical layout).
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    kind: (_same_layout, _same_layout) for kind in KINDS
}
LAYOUTS["linear"] = (_transpose_linear, _transpose_linear)
LAYOUTS["conv"] = (_conv_to_flax, _conv_from_flax)

# kind -> Flax's name of the canonical leaf "weight" (the one renaming rule).
LEAF_NAMES: dict[str, str] = {"linear": "kernel", "conv": "kernel", "norm": "scale"}


def flax_path(spec: WeightSpec) -> tuple[str, ...]:
    """The attribute path of a canonical weight: ``vit.encoder.layer.0.attention.attention.query.weight``
    -> ``("vit", "encoder", "layer", "0", "attention", "attention", "query", "kernel")``."""
    parts = spec.name.split(".")
    if parts[-1] == "weight" and spec.kind in LEAF_NAMES:
        parts[-1] = LEAF_NAMES[spec.kind]
    return tuple(parts)


def flax_shape(spec: WeightSpec) -> tuple[int, ...]:
    """The parameter shape of a canonical weight in Flax's layout."""
    to_flax, _ = LAYOUTS[spec.kind]
    return tuple(to_flax(np.broadcast_to(np.zeros((), np.bool_), spec.shape)).shape)  # a view: no copy


def _variable(model: nnx.Module, path: tuple[str, ...]) -> nnx.Variable:
    node: Any = model
    for part in path:  # nnx.List keeps its items as attributes "0", "1", ...
        node = getattr(node, part)
    if not isinstance(node, nnx.Variable):
        raise RuntimeError(f"{'.'.join(path)} is a {type(node).__name__}, not a parameter")
    return node


def _model_param_paths(model: nnx.Module) -> set[tuple[str, ...]]:
    return {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _check_same_names(have: set[str], want: set[str], have_name: str, want_name: str) -> None:
    if have != want:
        raise RuntimeError(f"{have_name} and {want_name} differ: only in {have_name}: {sorted(have - want)}; "
                           f"only in {want_name}: {sorted(want - have)}")


# ------------------------------------------------------------------------------ init
def init_weights(model: nnx.Module, table: list[WeightSpec], initializer_range: float, key: jax.Array,
                 only: Iterable[str] | None = None) -> None:
    """Initialise every parameter as its table entry says (transformers' ViT ``_init_weights``).

    "trunc_normal": normal with std = initializer_range, cut at +-2 std; "zeros"; "ones". Values
    are drawn in float32 in the canonical shape from ``fold_in(key, i)`` for the i-th table entry
    (so a seed gives the same canonical state whatever the layout), then laid out and cast to the
    parameter's dtype. ``only`` restricts it to some names (heads a checkpoint lacks). Raises if
    the model has a parameter the table does not know (or the reverse).
    """
    _check_same_names({".".join(p) for p in _model_param_paths(model)},
                      {".".join(flax_path(spec)) for spec in table}, "model parameters", "weight table")
    chosen = None if only is None else set(only)
    for index, spec in enumerate(table):
        if chosen is not None and spec.name not in chosen:
            continue
        variable = _variable(model, flax_path(spec))
        if tuple(variable.shape) != flax_shape(spec):
            raise RuntimeError(f"{spec.name}: parameter shape {tuple(variable.shape)} does not fit table shape {spec.shape}")
        value = init_array(spec.init, jax.random.fold_in(key, index), spec.shape, float(initializer_range))
        to_flax, _ = LAYOUTS[spec.kind]
        variable.set_value(to_flax(value).astype(variable.dtype))


# ------------------------------------------------------------------------------ load / export
def load_canonical_state(
    model: FlaxViTPreTrainedModel,
    state: Mapping[str, np.ndarray],
    *,
    allow_missing: Iterable[str] = (),
    source: str = "state dict",
) -> None:
    """Copy a canonical state (name -> numpy array, canonical layout) into ``model``, strictly.

    Every table entry must be present (except names in ``allow_missing``, which keep their current
    values), with the table's shape; no other key may appear. All missing, unexpected and mis-shaped
    keys are collected and raised together in one CheckpointError (a ValueError) naming each with
    its shapes. Values are laid out for Flax and cast to the parameter's dtype.
    """
    table = model.canonical_table()
    specs = {spec.name: spec for spec in table}
    check_state_fits_table(state, specs.values(), allow_missing=allow_missing, source=source,
                           model_name=type(model).__name__)
    for name, spec in specs.items():
        if name not in state:
            continue
        to_flax, _ = LAYOUTS[spec.kind]
        variable = _variable(model, flax_path(spec))
        variable.set_value(jnp.asarray(to_flax(np.asarray(state[name])), dtype=variable.dtype))


def canonical_state(model: FlaxViTPreTrainedModel) -> dict[str, np.ndarray]:
    """The model's parameters as canonical numpy arrays, in table order, with their own dtype.

    ``canonical_state(load_canonical_state(m, s))`` returns ``s`` bit for bit (same dtype;
    bfloat16 as ml_dtypes.bfloat16).
    """
    state: dict[str, np.ndarray] = {}
    for spec in model.canonical_table():
        _, from_flax = LAYOUTS[spec.kind]
        state[spec.name] = np.ascontiguousarray(from_flax(np.asarray(_variable(model, flax_path(spec))[...])))
    return state


# ------------------------------------------------------------------------------ from / save pretrained
def load_pretrained_model(
    cls: type[FlaxViTPreTrainedModel],
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_kwargs: dict[str, bool],
    config: Any,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
    ignore_mismatched_sizes: bool,
    attn_implementation: str | None,
    dtype: Any,
    param_dtype: Any,
    seed: int,
    config_overrides: dict[str, Any],
    force_download: bool = False,
    use_safetensors: bool | None = None,
) -> FlaxViTPreTrainedModel:
    """``cls.from_pretrained``: read with vit_core.pretrained, build ``cls`` without its random init,
    initialise only what the checkpoint lacks (heads; mismatched heads with ignore_mismatched_sizes),
    copy the weights in (cast to ``param_dtype``).

    ``config_overrides`` are from_pretrained's other keywords: config fields, or options without
    effect (``trust_remote_code``); anything else is a TypeError, as in transformers' Flax classes.
    ``output_loading_info=True`` returns (model, transformers' loading-info dict).
    """
    config_overrides = dict(config_overrides)
    with_info = core_pretrained.pop_output_loading_info(config_overrides)
    task = cls.task

    def table_fn(cfg: ViTConfig) -> list[WeightSpec]:
        return weight_table(cfg, task, **model_kwargs)

    config, state, report = core_pretrained.load_pretrained(
        pretrained_model_name_or_path, task, table_fn, config=config, revision=revision, cache_dir=cache_dir,
        token=token, local_files_only=local_files_only, force_download=force_download,
        use_safetensors=use_safetensors, ignore_mismatched_sizes=ignore_mismatched_sizes,
        config_overrides=config_overrides, owner=f"{cls.__name__}.from_pretrained",
        no_effect=core_pretrained.NO_EFFECT_OPTIONS,
    )
    model = cls(config, **model_kwargs, dtype=jnp.float32 if dtype is None else dtype,
                param_dtype=jnp.float32 if param_dtype is None else param_dtype,
                attn_implementation=attn_implementation, _do_init=False)
    keep_init = list(report.missing) + [name for name, _, _ in report.mismatched]
    if keep_init:
        init_weights(model, model.canonical_table(), config.initializer_range, nnx.Rngs(params=seed).params(),
                     only=keep_init)
    load_canonical_state(model, state, allow_missing=keep_init, source=str(pretrained_model_name_or_path))
    return (model, core_pretrained.loading_info(report)) if with_info else model


def save_pretrained_model(
    model: FlaxViTPreTrainedModel, save_directory: str | os.PathLike, *, max_shard_size: int | str | None = None,
    safe_serialization: bool = True,
) -> pathlib.Path:
    """Write config.json (with ``architectures`` as transformers' Flax classes write it: the PyTorch
    class name, and ``torch_dtype``) and model.safetensors in canonical names, sharded above
    ``max_shard_size``; ``safe_serialization=False``: flax_model.msgpack instead (Flax paths and layouts)."""
    config = ViTConfig.from_dict(model.config.to_dict())
    config.extra["architectures"] = [type(model).__name__.removeprefix("Flax")]
    config.extra["torch_dtype"] = jnp.dtype(model.param_dtype).name
    return core_pretrained.save_pretrained(
        config, canonical_state(model), save_directory, max_shard_size=max_shard_size,
        weights_format="safetensors" if safe_serialization else core_pretrained.LEGACY_WEIGHTS["flax"][1],
    )


# The hub upload and the torch_dtype spelling are the same in every framework: vit_core.pretrained's.
dtype_alias = core_pretrained.dtype_alias
push_saved = core_pretrained.push_saved
push_to_hub = core_pretrained.push_to_hub
