"""vit_tf: the ViT family on TensorFlow with Keras 3, drop-in for transformers 4.x's TF ViT classes.

``from vit_tf import ViTConfig, TFViTModel, TFViTForImageClassification, TFViTForMaskedImageModeling``.
Importing it imports tensorflow and keras (and numpy), never torch or jax.
"""

from __future__ import annotations

import sys


def _import_tensorflow() -> None:
    """Import TensorFlow without letting it import jax.

    TensorFlow's TFLite utilities run ``from jax import jit`` at import time
    (tensorflow/lite/python/util.py), which loads all of jax whenever it happens to be installed.
    vit_tf promises never to import jax, so jax is hidden during that one import (TFLite then only
    lacks its experimental jax converter in this process); jax stays importable afterwards.
    """
    if "tensorflow" in sys.modules or "jax" in sys.modules:
        import tensorflow  # noqa: F401
        return
    sys.modules["jax"] = None  # type: ignore[assignment]  # makes `import jax` raise ImportError
    try:
        import tensorflow  # noqa: F401
    finally:
        if sys.modules.get("jax", 0) is None:
            del sys.modules["jax"]


from vit_core.quiet import quiet_tensorflow_import

try:
    # TF_CPP_MIN_LOG_LEVEL defaults to "2" (set before TensorFlow is first imported, unless the user
    # set it: theirs wins), and the C++ start-up notices that no level hides are dropped.
    with quiet_tensorflow_import():
        _import_tensorflow()
        import keras

    if not keras.__version__.startswith("3."):  # pragma: no cover - depends on the environment
        raise ImportError(f"vit_tf needs Keras 3, found keras {keras.__version__}")
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"vit_tf needs TensorFlow with Keras 3 ({e}): pip install vitx[tf]") from e

from vit_core import AutoConfig, ViTConfig
from vit_core.image_processing import AutoImageProcessor, DeiTImageProcessor, ViTImageProcessor

from .auto import TFAutoModel, TFAutoModelForImageClassification, TFAutoModelForMaskedImageModeling
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
    "AutoConfig",
    "AutoImageProcessor",
    "ViTImageProcessor",
    "DeiTImageProcessor",
    "TFAutoModel",
    "TFAutoModelForImageClassification",
    "TFAutoModelForMaskedImageModeling",
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
