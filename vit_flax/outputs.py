"""The output classes vit_flax's models return: vit_core's dataclasses, registered as JAX pytrees.

Every field of the output dataclasses is pytree data (None fields are empty subtrees), so outputs
pass through jax.jit / grad / vmap as the same objects; the fields hold jax arrays. Registration
runs once, when vit_flax is imported. vit_torch/outputs.py and vit_tf/outputs.py are the same
module for their frameworks.
"""

from __future__ import annotations

import dataclasses

import jax

from vit_core.outputs import OUTPUT_CLASSES, BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput

__all__ = ["OUTPUT_CLASSES", "BaseModelOutputWithPooling", "ImageClassifierOutput", "MaskedImageModelingOutput",
           "register_outputs"]


def register_outputs() -> None:
    """Register each class of OUTPUT_CLASSES with jax.tree_util (a no-op for one already registered)."""
    for cls in OUTPUT_CLASSES:
        try:
            jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                             meta_fields=[])
        except ValueError:  # already registered (a reload of this module)
            pass


register_outputs()
