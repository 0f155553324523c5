"""The tolerance table of docs/NUMERICS.md, in one place: tests and the parity report read it here.

Max |diff| bounds in float32 on CPU. Never loosen one to make a test pass: find the term that differs.
"""

from __future__ import annotations

TOLERANCES: dict[str, float] = {
    # every output incl. each hidden state and attention map, small configs, any two frameworks
    "small": 1e-5,
    # logits and last_hidden_state of ViT-B/16 at 224 on real images, any two frameworks
    "base_real_images": 1e-4,
    # fused attention against the eager path
    "fused_vs_eager_float32": 1e-5,
    "fused_vs_eager_bfloat16": 1e-2,
    # ViTImageProcessor against transformers' slow processor on real photos
    "image_processor": 1e-6,
    # ViTImageProcessorFast (torch, batched) against the slow processor: max and mean |diff|
    "fast_image_processor_max": 0.1,
    "fast_image_processor_mean": 5e-3,
    # an exported model (ONNX Runtime, OpenVINO, SavedModel, jax.export) against its source framework:
    # float32, and bfloat16 / float16 against the source in the same dtype (the graph runtime fuses and
    # orders the reduced-precision ops its own way: the bound of reduced-precision logits)
    "export_float32": 1e-4,
    "export_reduced_precision": 1e-1,
    # bfloat16 logits against float32 on real photos (same top-1 class too)
    "bfloat16_vs_float32_logits": 1e-1,
}
