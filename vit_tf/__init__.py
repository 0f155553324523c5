"""vit_tf: the ViT family on TensorFlow with Keras 3, drop-in for transformers 4.x's TF ViT classes.

``from vit_tf import ViTConfig, TFViTModel, TFViTForImageClassification, TFViTForMaskedImageModeling``.
Importing it imports tensorflow and keras (and numpy), never torch or jax.
"""

from __future__ import annotations

try:
    import tensorflow  # noqa: F401
    import keras

    if not keras.__version__.startswith("3."):  # pragma: no cover - depends on the environment
        raise ImportError(f"vit_tf needs Keras 3, found keras {keras.__version__}")
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"vit_tf needs TensorFlow with Keras 3 ({e}): pip install vitx[tf]") from e

from vit_core import ViTConfig

from .modeling import (
    TFViTForImageClassification,
    TFViTForMaskedImageModeling,
    TFViTModel,
    TFViTPreTrainedModel,
    ViTEmbeddings,
    ViTLayer,
    ViTPatchEmbeddings,
)
from .outputs import TFBaseModelOutputWithPooling, TFImageClassifierOutput, TFMaskedImageModelingOutput
from .weights import canonical_state, load_canonical_state

__all__ = [
    "ViTConfig",
    "TFViTModel",
    "TFViTForImageClassification",
    "TFViTForMaskedImageModeling",
    "TFViTPreTrainedModel",
    "ViTEmbeddings",
    "ViTPatchEmbeddings",
    "ViTLayer",
    "TFBaseModelOutputWithPooling",
    "TFImageClassifierOutput",
    "TFMaskedImageModelingOutput",
    "canonical_state",
    "load_canonical_state",
]
