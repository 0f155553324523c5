"""The output classes vit_torch's models return: vit_core's dataclasses, as they are.

PyTorch needs nothing added to them: eager mode and autograd pass any Python object through, and
torch.compile (dynamo) traces the construction of a dataclass and returns the same object. The
fields hold torch tensors. vit_tf/outputs.py and vit_flax/outputs.py are the same module for their
frameworks (TensorFlow's nest protocol, JAX pytree registration).
"""

from __future__ import annotations

from vit_core.outputs import OUTPUT_CLASSES, BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput

__all__ = ["OUTPUT_CLASSES", "BaseModelOutputWithPooling", "ImageClassifierOutput", "MaskedImageModelingOutput"]
