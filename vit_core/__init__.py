"""vit_core: the framework-neutral core of vitx (numpy, Pillow, safetensors only).

Config, image processing, output classes, the canonical weight table, checkpoint I/O and the
float64 numpy reference forward. Importing it imports no deep-learning framework.
"""

from __future__ import annotations

from typing import Any

from .auto import AutoConfig
from .config import VARIANTS, ViTConfig
from .outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
    ModelOutput,
)
from .weights import WeightSpec, parameter_count, weight_table

__version__ = "0.1.0"

_LAZY = {
    "ViTImageProcessor": "image_processing",
    "ViTFeatureExtractor": "image_processing",
    "ViTImageProcessorFast": "image_processing_fast",
    "DeiTImageProcessor": "image_processing",
    "DeiTFeatureExtractor": "image_processing",
    "AutoImageProcessor": "image_processing",
}


def __getattr__(name: str) -> Any:
    # The processors pull in Pillow; loaded on first use so `import vit_core` stays light.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'vit_core' has no attribute {name!r}")


__all__ = [
    "VARIANTS", "ViTConfig", "AutoConfig", "ViTImageProcessor", "ViTImageProcessorFast", "ViTFeatureExtractor",
    "DeiTImageProcessor", "DeiTFeatureExtractor", "AutoImageProcessor",
    "ModelOutput", "BaseModelOutputWithPooling", "ImageClassifierOutput", "MaskedImageModelingOutput",
    "WeightSpec", "weight_table", "parameter_count",
]
