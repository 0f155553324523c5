"""transformers 4.x's FlaxAuto classes for ViT: ``FlaxAutoModel``, ``FlaxAutoModelForImageClassification``,
``FlaxAutoModelForMaskedImageModeling`` (and vit_core's ``AutoConfig``).

Only model_type "vit" exists here; vit_core.auto reads the checkpoint's model_type and refuses any
other with a message naming it.
"""

from __future__ import annotations

from vit_core.auto import AutoConfig, BaseAutoModel

from .modeling import FlaxViTForImageClassification, FlaxViTForMaskedImageModeling, FlaxViTModel


class FlaxAutoModel(BaseAutoModel):
    """``FlaxAutoModel.from_pretrained(path)`` / ``.from_config(config)``: a FlaxViTModel."""

    _model_class = FlaxViTModel


class FlaxAutoModelForImageClassification(BaseAutoModel):
    """``FlaxAutoModelForImageClassification.from_pretrained(path)`` / ``.from_config(config)``: a FlaxViTForImageClassification."""

    _model_class = FlaxViTForImageClassification


class FlaxAutoModelForMaskedImageModeling(BaseAutoModel):
    """``FlaxAutoModelForMaskedImageModeling.from_pretrained(path)`` / ``.from_config(config)``: a FlaxViTForMaskedImageModeling."""

    _model_class = FlaxViTForMaskedImageModeling


__all__ = ["AutoConfig", "FlaxAutoModel", "FlaxAutoModelForImageClassification", "FlaxAutoModelForMaskedImageModeling"]
