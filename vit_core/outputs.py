"""Model outputs, readable by attribute, by key and by index, like transformers' ModelOutput.

The classes are framework-neutral dataclasses: the fields hold whatever array type the framework
returns. Indexing and ``to_tuple`` skip fields that are None, as transformers does, so
``model(x)[0]`` is ``last_hidden_state`` (or ``logits``, or ``loss`` when labels were given).
vit_flax registers each class as a JAX pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any


@dataclasses.dataclass
class ModelOutput:
    """Base of every output: a dataclass with mapping and tuple access over its non-None fields."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no output {key!r}; it has {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default


@dataclasses.dataclass
class BaseModelOutputWithPooling(ModelOutput):
    """``ViTModel`` output. last_hidden_state (batch, tokens, hidden); pooler_output (batch, pooler size);
    hidden_states: num_hidden_layers + 1 tensors (batch, tokens, hidden); attentions: num_hidden_layers
    tensors (batch, heads, tokens, tokens)."""

    last_hidden_state: Any = None
    pooler_output: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None


@dataclasses.dataclass
class ImageClassifierOutput(ModelOutput):
    """``ViTForImageClassification`` output. logits (batch, num_labels); loss a scalar when labels were given."""

    loss: Any = None
    logits: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None


@dataclasses.dataclass
class MaskedImageModelingOutput(ModelOutput):
    """``ViTForMaskedImageModeling`` output. reconstruction (batch, channels, height, width);
    loss: L1 over the masked patches when bool_masked_pos was given."""

    loss: Any = None
    reconstruction: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None


OUTPUT_CLASSES = (BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput)
