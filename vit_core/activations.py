"""The hidden_act table: every activation a ViT checkpoint can name, as a float64 numpy reference.

Each framework implements the same table with the same formulas (vit_torch/vit_tf/vit_flax
``activations``) and is tested against these functions.
"""

from __future__ import annotations

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    # math.erf is correctly rounded in float64; vectorised because numpy has no erf.
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * Phi(x), with the error function (transformers "gelu")."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """tanh approximation of GELU ("gelu_new", "gelu_pytorch_tanh"; the original JAX ViT's)."""
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def gelu_fast(x: np.ndarray) -> np.ndarray:
    """transformers "gelu_fast": the tanh form written as x * 0.7978845608 * (1 + 0.044715 x^2)."""
    return 0.5 * x * (1.0 + np.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(1.702 x) (CLIP's)."""
    return x / (1.0 + np.exp(-1.702 * x))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


# name -> numpy reference. The keys are the names transformers accepts in config.hidden_act.
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "quick_gelu": quick_gelu,
    "relu": relu,
    "silu": silu,
    "swish": silu,
    "tanh": tanh,
}
