"""Canonical weights <-> Keras variables, random init by the table, from/save_pretrained.

The canonical weight table (vit_core.weights) names every parameter with its transformers 4.x
PyTorch name and layout. In vit_tf the attribute path of each weight IS that name
(``model.vit.encoder.layer[0].attention.attention.query.weight``), and the layouts are
TensorFlow's: a "linear" weight is stored (in, out) and a "conv" weight HWIO (kh, kw, in, out).
The conversion below depends on the table's ``kind`` only.
"""

from __future__ import annotations

import math
import os
import pathlib
import random
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from vit_core import pretrained as core_pretrained
from vit_core.checkpoint.fit import check_state_fits_table
from vit_core.config import ViTConfig
from vit_core.weights import WeightSpec, weight_table

if TYPE_CHECKING:  # pragma: no cover
    from .modeling import TFViTPreTrainedModel


def _same_layout(array: np.ndarray) -> np.ndarray:
    return array


def _linear_to_tf(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T)  # (out, in) -> (in, out)


def _linear_to_canonical(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T)  # (in, out) -> (out, in)


def _conv_to_tf(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def _conv_to_canonical(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)


# kind -> (canonical -> TF layout, TF -> canonical layout).
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "linear": (_linear_to_tf, _linear_to_canonical),
    "conv": (_conv_to_tf, _conv_to_canonical),
    "norm": (_same_layout, _same_layout),
    "embedding": (_same_layout, _same_layout),
    "bias": (_same_layout, _same_layout),
}


def framework_shape(spec: WeightSpec) -> tuple[int, ...]:
    """The shape a canonical weight has in vit_tf."""
    to_tf, _ = LAYOUTS[spec.kind]
    return tuple(to_tf(np.empty(spec.shape, dtype=np.uint8)).shape)


def get_variable(model: keras.Layer, name: str) -> keras.Variable:
    """The variable at canonical ``name``: attribute names, with list indices for ``layer.{i}`` / ``decoder.{i}``."""
    obj: Any = model
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            raise KeyError(f"{type(model).__name__} has no weight {name!r}")
    if not isinstance(obj, keras.Variable):
        raise KeyError(f"{name!r} is not a weight of {type(model).__name__} (found {type(obj).__name__})")
    return obj


# ------------------------------------------------------------------------------ init
def _weight_seed(seed: int, name: str, prefix: str = "vit.") -> list[int]:
    """A per-weight stateless seed: the model seed and a hash of the name (without the backbone
    prefix, so a seed gives the same backbone in every task model)."""
    return [int(seed), zlib.crc32(name.removeprefix(prefix).encode())]


_TWO_STD_CDF = math.erf(2.0 / math.sqrt(2.0))  # P(|z| < 2) for a standard normal z


def truncated_normal(shape: tuple[int, ...], std: float, seed: list[int]) -> tf.Tensor:
    """Normal(0, std) cut at +-2 std, by the inverse CDF of a uniform draw (as torch's
    ``trunc_normal_``): erfinv of U(-P, P) with P = erf(2 / sqrt 2). About twice as fast on CPU as
    tf.random.stateless_truncated_normal's rejection sampling (86M values for ViT-B/16)."""
    uniform = tf.random.stateless_uniform(shape, seed=seed, minval=-_TWO_STD_CDF, maxval=_TWO_STD_CDF,
                                          dtype=tf.float32)
    return tf.math.erfinv(uniform) * (std * math.sqrt(2.0))


def init_weights(model: keras.Layer, table: Iterable[WeightSpec], initializer_range: float, seed: int) -> None:
    """Initialise every weight in ``table`` as its entry says (transformers' ViT ``_init_weights``).

    "trunc_normal": normal with std = initializer_range cut at +-2 std (:func:`truncated_normal`,
    seeded per weight); "zeros"; "ones". Drawn in float32 and cast to the variable's dtype.
    """
    for spec in table:
        variable = get_variable(model, spec.name)
        shape = framework_shape(spec)
        if tuple(variable.shape) != shape:
            raise RuntimeError(f"{spec.name}: variable shape {tuple(variable.shape)} != table shape {shape} (TF layout)")
        if spec.init == "zeros" or (spec.init == "trunc_normal" and initializer_range == 0):
            value = tf.zeros(shape, tf.float32)
        elif spec.init == "ones":
            value = tf.ones(shape, tf.float32)
        elif spec.init == "trunc_normal":
            value = truncated_normal(shape, float(initializer_range), _weight_seed(seed, spec.name))
        else:
            raise ValueError(f"{spec.name}: unknown init {spec.init!r}")
        variable.assign(tf.cast(value, variable.dtype))


def seed_dropout(model: keras.Layer, seed: int) -> None:
    """Give every dropout layer of ``model`` its own stream derived from ``seed`` (Keras seeds each
    from Python's global ``random`` otherwise), so ``seed=`` also fixes training-mode dropout."""
    streams = random.Random(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        generator = getattr(layer, "seed_generator", None)
        if isinstance(layer, keras.layers.Dropout) and generator is not None:
            generator.state.assign(tf.constant([streams.randrange(2**31), 0], dtype=generator.state.dtype))


# ------------------------------------------------------------------------------ load / export
def load_canonical_state(
    model: TFViTPreTrainedModel,
    state: Mapping[str, np.ndarray],
    *,
    allow_missing: Iterable[str] = (),
    source: str = "state dict",
) -> None:
    """Copy a canonical state (name -> numpy array, canonical layout) into ``model``, strictly.

    Every table entry must be present (except names in ``allow_missing``, which keep their current
    values), with the table's shape; no other key may appear. All missing, unexpected and mis-shaped
    keys are collected and raised together in one CheckpointError (a ValueError) naming each with
    its shapes. Values are cast to the variable's dtype.
    """
    specs = {spec.name: spec for spec in model.canonical_table()}
    check_state_fits_table(state, specs.values(), allow_missing=allow_missing, source=source,
                           model_name=type(model).__name__)
    for name, spec in specs.items():
        if name not in state:
            continue
        to_tf, _ = LAYOUTS[spec.kind]
        variable = get_variable(model, name)
        variable.assign(tf.cast(tf.convert_to_tensor(to_tf(np.asarray(state[name]))), variable.dtype))


def canonical_state(model: TFViTPreTrainedModel) -> dict[str, np.ndarray]:
    """The model's weights as canonical numpy arrays, in table order, with their own dtype
    (bfloat16 as ml_dtypes.bfloat16).

    ``canonical_state(load_canonical_state(m, s))`` returns ``s`` bit for bit (same dtype).
    """
    state: dict[str, np.ndarray] = {}
    for spec in model.canonical_table():
        _, to_canonical = LAYOUTS[spec.kind]
        state[spec.name] = to_canonical(np.asarray(get_variable(model, spec.name).numpy()))
    return state


# ------------------------------------------------------------------------------ from / save pretrained
def load_pretrained_model(
    cls: type[TFViTPreTrainedModel],
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_kwargs: dict[str, bool],
    config: Any,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
    ignore_mismatched_sizes: bool,
    dtype: str | tf.DType | None,
    attn_implementation: str | None,
    seed: int | None,
    config_overrides: dict[str, Any],
    force_download: bool = False,
    use_safetensors: bool | None = None,
) -> TFViTPreTrainedModel:
    """``cls.from_pretrained``: read with vit_core.pretrained, build ``cls`` in ``dtype`` ("auto": the
    checkpoint config's dtype) with random init for what the checkpoint lacks, copy the weights in.

    ``config_overrides`` are from_pretrained's other keywords: config fields, or options without
    effect (``trust_remote_code``); anything else is a TypeError, as in transformers' TF classes.
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
    if dtype == "auto":  # transformers' spelling: the dtype the checkpoint's config.json names
        dtype = _config_dtype(config)
    model = cls(config, attn_implementation=attn_implementation, dtype=dtype, seed=seed, **model_kwargs)
    keep_init = list(report.missing) + [name for name, _, _ in report.mismatched]
    load_canonical_state(model, state, allow_missing=keep_init, source=str(pretrained_model_name_or_path))
    return (model, core_pretrained.loading_info(report)) if with_info else model


def _config_dtype(config: ViTConfig) -> str:
    """config.json's ``dtype`` / ``torch_dtype`` when it is float32, bfloat16 or float16, else float32."""
    for key in ("dtype", "torch_dtype"):
        name = config.extra.get(key)
        if isinstance(name, str) and name.removeprefix("torch.") in ("float32", "bfloat16", "float16"):
            return name.removeprefix("torch.")
    return "float32"


def save_pretrained_model(
    model: TFViTPreTrainedModel, save_directory: str | os.PathLike, *, max_shard_size: int | str | None = None,
    safe_serialization: bool = True,
) -> pathlib.Path:
    """Write config.json (with ``architectures`` naming the PyTorch class, as transformers' TF
    classes write it, and ``torch_dtype``) and model.safetensors in canonical names and layouts;
    ``safe_serialization=False``: tf_model.h5 instead (TF names and layouts)."""
    config = ViTConfig.from_dict(model.config.to_dict())
    config.extra["architectures"] = [type(model).__name__.removeprefix("TF")]
    config.extra["torch_dtype"] = model.compute_dtype
    return core_pretrained.save_pretrained(
        config, canonical_state(model), save_directory, max_shard_size=max_shard_size,
        weights_format="safetensors" if safe_serialization else core_pretrained.LEGACY_WEIGHTS["tf"][1],
    )


# The hub upload and the torch_dtype spelling are the same in every framework: vit_core.pretrained's.
dtype_alias = core_pretrained.dtype_alias
push_saved = core_pretrained.push_saved
push_to_hub = core_pretrained.push_to_hub
