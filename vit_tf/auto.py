"""transformers 4.x's TFAuto classes for ViT: ``TFAutoModel``, ``TFAutoModelForImageClassification``,
``TFAutoModelForMaskedImageModeling`` (and vit_core's ``AutoConfig``).

Only model_type "vit" exists here; vit_core.auto reads the checkpoint's model_type and refuses any
other with a message naming it.
"""

from __future__ import annotations

from vit_core.auto import AutoConfig, BaseAutoModel

from .modeling import TFViTForImageClassification, TFViTForMaskedImageModeling, TFViTModel


class TFAutoModel(BaseAutoModel):
    """``TFAutoModel.from_pretrained(path)`` / ``.from_config(config)``: a TFViTModel."""

    _model_class = TFViTModel


class TFAutoModelForImageClassification(BaseAutoModel):
    """``TFAutoModelForImageClassification.from_pretrained(path)`` / ``.from_config(config)``: a TFViTForImageClassification."""

    _model_class = TFViTForImageClassification


class TFAutoModelForMaskedImageModeling(BaseAutoModel):
    """``TFAutoModelForMaskedImageModeling.from_pretrained(path)`` / ``.from_config(config)``: a TFViTForMaskedImageModeling."""

    _model_class = TFViTForMaskedImageModeling


__all__ = ["AutoConfig", "TFAutoModel", "TFAutoModelForImageClassification", "TFAutoModelForMaskedImageModeling"]
