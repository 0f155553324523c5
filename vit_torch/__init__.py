"""vit_torch: the ViT family in PyTorch, drop-in for transformers 4.x's ViT classes.

``from vit_torch import ViTConfig, ViTModel, ViTForImageClassification, ViTForMaskedImageModeling``.
Importing it imports torch (and numpy), never tensorflow or jax.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("vit_torch needs PyTorch, which is not installed: pip install vitx[torch]") from e

from vit_core import AutoConfig, ViTConfig
from vit_core.image_processing import AutoImageProcessor, DeiTImageProcessor, ViTImageProcessor

from .auto import AutoModel, AutoModelForImageClassification, AutoModelForMaskedImageModeling
from .modeling import (
    ViTEmbeddings,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTLayer,
    ViTModel,
    ViTPatchEmbeddings,
    ViTPreTrainedModel,
)
from .training import SaveConfigCallback
from .weights import canonical_state, load_canonical_state

__all__ = [
    "ViTConfig",
    "AutoConfig",
    "AutoImageProcessor",
    "ViTImageProcessor",
    "DeiTImageProcessor",
    "AutoModel",
    "AutoModelForImageClassification",
    "AutoModelForMaskedImageModeling",
    "ViTModel",
    "ViTForImageClassification",
    "ViTForMaskedImageModeling",
    "ViTPreTrainedModel",
    "ViTEmbeddings",
    "ViTPatchEmbeddings",
    "ViTLayer",
    "SaveConfigCallback",
    "canonical_state",
    "load_canonical_state",
]
