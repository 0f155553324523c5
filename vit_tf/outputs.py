"""vit_core's output dataclasses, made nestable by TensorFlow.

``tf.function`` (and so XLA and SavedModel tracing) only returns tensors and structures that
``tf.nest`` understands. These subclasses add TensorFlow's custom-nest protocol
(``__tf_flatten__`` / ``__tf_unflatten__``) to vit_core's classes, so a model called inside
``tf.function`` returns the same output object as in eager mode. They are instances of the vit_core
classes (``isinstance(out, vit_core.BaseModelOutputWithPooling)`` holds) and carry transformers'
TF names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput


class _TFNestable:
    """tf.nest flattens the dataclass fields in declaration order (None fields stay None)."""

    def __tf_flatten__(self) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        names = tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return names, tuple(getattr(self, name) for name in names)

    @classmethod
    def __tf_unflatten__(cls, metadata: tuple[str, ...], components: tuple[Any, ...]) -> Any:
        return cls(**dict(zip(metadata, components)))


@dataclasses.dataclass
class TFBaseModelOutputWithPooling(_TFNestable, BaseModelOutputWithPooling):
    """TFViTModel output: last_hidden_state (batch, tokens, hidden), pooler_output (batch, pooler size),
    hidden_states (layers + 1) and attentions (layers, each (batch, heads, tokens, tokens))."""


@dataclasses.dataclass
class TFImageClassifierOutput(_TFNestable, ImageClassifierOutput):
    """TFViTForImageClassification output: loss (scalar, with labels), logits (batch, num_labels)."""


@dataclasses.dataclass
class TFMaskedImageModelingOutput(_TFNestable, MaskedImageModelingOutput):
    """TFViTForMaskedImageModeling output: loss (with bool_masked_pos), reconstruction (batch, channels, height, width)."""
