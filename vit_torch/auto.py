"""transformers 4.x's Auto classes for ViT: ``AutoModel``, ``AutoModelForImageClassification``,
``AutoModelForMaskedImageModeling`` (and vit_core's ``AutoConfig``).

Only model_type "vit" exists here; vit_core.auto reads the checkpoint's model_type and refuses any
other with a message naming it.
"""

from __future__ import annotations

from vit_core.auto import AutoConfig, BaseAutoModel

from .modeling import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel


class AutoModel(BaseAutoModel):
    """``AutoModel.from_pretrained(path)`` / ``.from_config(config)``: a ViTModel."""

    _model_class = ViTModel


class AutoModelForImageClassification(BaseAutoModel):
    """``AutoModelForImageClassification.from_pretrained(path)`` / ``.from_config(config)``: a ViTForImageClassification."""

    _model_class = ViTForImageClassification


class AutoModelForMaskedImageModeling(BaseAutoModel):
    """``AutoModelForMaskedImageModeling.from_pretrained(path)`` / ``.from_config(config)``: a ViTForMaskedImageModeling."""

    _model_class = ViTForMaskedImageModeling


__all__ = ["AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoModelForMaskedImageModeling"]
