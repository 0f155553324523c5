"""vit_flax: the ViT family in Flax NNX, drop-in for transformers 4.x's Flax ViT classes.

``from vit_flax import ViTConfig, FlaxViTModel, FlaxViTForImageClassification, FlaxViTForMaskedImageModeling``.
Importing it imports jax and flax (and numpy), never torch or tensorflow. The output classes of
vit_core are registered as JAX pytrees here, so outputs pass through jax.jit / grad / vmap.
"""

from __future__ import annotations

try:
    import jax
    from flax import nnx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("vit_flax needs JAX and Flax, which are not installed: pip install vitx[flax]") from e

import dataclasses

from vit_core import ViTConfig
from vit_core.outputs import OUTPUT_CLASSES


def _register_outputs() -> None:
    """Every field of the output dataclasses is pytree data (None fields are empty subtrees)."""
    for cls in OUTPUT_CLASSES:
        try:
            jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                             meta_fields=[])
        except ValueError:  # already registered (a reload of this module)
            pass


_register_outputs()

from .export import export_classifier, load_exported_classifier  # noqa: E402
from .modeling import (  # noqa: E402
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
    FlaxViTPreTrainedModel,
    ViTEmbeddings,
    ViTLayer,
    ViTPatchEmbeddings,
)
from .weights import canonical_state, load_canonical_state  # noqa: E402

__all__ = [
    "ViTConfig",
    "FlaxViTModel",
    "FlaxViTForImageClassification",
    "FlaxViTForMaskedImageModeling",
    "FlaxViTPreTrainedModel",
    "ViTEmbeddings",
    "ViTPatchEmbeddings",
    "ViTLayer",
    "canonical_state",
    "load_canonical_state",
    "export_classifier",
    "load_exported_classifier",
]
