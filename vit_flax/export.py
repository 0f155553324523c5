"""Serialised StableHLO of the classifier forward (jax.export), with a symbolic batch dimension.

    blob = export_classifier(model)                 # bytes; weights baked in as constants
    logits = load_exported_classifier(blob)(pixel_values)   # any batch size, same logits

The recipe underneath is plain jax.export: close over the model's state, ``jax.jit`` the forward,
export it for ``ShapeDtypeStruct((b, C, H, W))`` with ``b = jax.export.symbolic_shape("b")``, and
``serialize()``. The blob runs wherever a compatible jaxlib runs, without vitx or flax.
:func:`export_forward` does the same for any vit_flax model and a chosen set of outputs, returned
as a dict (``vitx export --format jax`` writes it as ``model.jax``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .modeling import FlaxViTForImageClassification


def export_classifier(
    model: FlaxViTForImageClassification,
    image_size: int | tuple[int, int] | None = None,
    *,
    platforms: tuple[str, ...] | None = None,
) -> bytes:
    """Export ``pixel_values (b, channels, height, width) float32 -> logits (b, num_labels)``.

    ``image_size`` (default: the config's) fixes height and width; another size than the
    config's exports the ``interpolate_pos_encoding=True`` forward. ``platforms`` (e.g.
    ``("cpu", "cuda")``) defaults to the current backend. The batch dimension is symbolic.
    """
    if not isinstance(model, FlaxViTForImageClassification):
        raise TypeError(f"export_classifier needs a FlaxViTForImageClassification, got {type(model).__name__}")
    config = model.config
    if image_size is None:
        height, width = config.image_hw
    elif isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    interpolate = (height, width) != config.image_hw
    graphdef, state = nnx.split(model)

    def logits_fn(pixel_values: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state).forward(pixel_values, interpolate_pos_encoding=interpolate).logits

    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, config.num_channels, height, width), jnp.float32)
    exported = jax.export.export(jax.jit(logits_fn), platforms=platforms)(spec)
    return bytes(exported.serialize())


def load_exported_classifier(blob: bytes) -> Callable[[jax.Array], jax.Array]:
    """The function serialised by :func:`export_classifier`: pixel_values (b, C, H, W) -> logits (b, K)."""
    return jax.export.deserialize(bytearray(blob)).call


def export_forward(
    model: Any,
    names: Sequence[str],
    image_size: int | tuple[int, int] | None = None,
    *,
    platforms: tuple[str, ...] | None = None,
) -> bytes:
    """Export ``pixel_values (b, channels, height, width) float32 -> {name: output}`` of any vit_flax model.

    ``names``: the outputs to return (e.g. ``["logits"]`` or ``["last_hidden_state", "pooler_output"]``),
    cast to float32. Otherwise as :func:`export_classifier`: weights baked in, symbolic batch. The
    deserialised ``.call(pixel_values)`` returns the dict.
    """
    config = model.config
    height, width = _image_hw(config, image_size)
    interpolate = (height, width) != config.image_hw
    graphdef, state = nnx.split(model)
    names = list(names)

    def forward(pixel_values: jax.Array) -> dict[str, jax.Array]:
        output = nnx.merge(graphdef, state)(pixel_values, interpolate_pos_encoding=interpolate)
        return {name: getattr(output, name).astype(jnp.float32) for name in names}

    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, config.num_channels, height, width), jnp.float32)
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(spec)
    return bytes(exported.serialize())


def _image_hw(config: Any, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if image_size is None:
        return config.image_hw
    if isinstance(image_size, int):
        return image_size, image_size
    return tuple(image_size)  # type: ignore[return-value]
