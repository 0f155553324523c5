"""vit_flax: the ViT family in Flax NNX, drop-in for transformers 4.x's Flax ViT classes.

``from vit_flax import ViTConfig, FlaxViTModel, FlaxViTForImageClassification, FlaxViTForMaskedImageModeling``.
Importing it imports jax and flax (and numpy), never torch or tensorflow. The output classes of
vit_core are registered as JAX pytrees on import (outputs.py), so outputs pass through jax.jit /
grad / vmap.
"""

from __future__ import annotations

try:
    import jax  # noqa: F401
    from flax import nnx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("vit_flax needs JAX and Flax, which are not installed: pip install vitx[flax]") from e

from vit_core import AutoConfig, ViTConfig
from vit_core.image_processing import AutoImageProcessor, DeiTImageProcessor, ViTImageProcessor

from .export import export_classifier, load_exported_classifier
from .auto import FlaxAutoModel, FlaxAutoModelForImageClassification, FlaxAutoModelForMaskedImageModeling
from .modeling import (
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
    FlaxViTPreTrainedModel,
    ViTEmbeddings,
    ViTLayer,
    ViTPatchEmbeddings,
)
from .weights import canonical_state, load_canonical_state

__all__ = [
    "ViTConfig",
    "AutoConfig",
    "AutoImageProcessor",
    "ViTImageProcessor",
    "DeiTImageProcessor",
    "FlaxAutoModel",
    "FlaxAutoModelForImageClassification",
    "FlaxAutoModelForMaskedImageModeling",
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
