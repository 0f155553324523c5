"""vit_tf speed: ViT-B/16 at 224, batch 8, in eager mode, inside tf.function and with XLA, on this machine.

    python -m benchmarks.tf_speed [--batch 8] [--iters 5] [--modes eager,function,xla]
                                  [--attn fused,eager] [--dtype float32] [--json]
    python -m benchmarks.tf_speed --attention      # the attention formulations alone, ViT-B/16 shapes

Each (mode, attention path) reports the first call (trace + compile + one run) separately from the
steady state: images/second from the median of ``--iters`` calls after two warm-up calls. Weights
are seeded, not trained: speed does not depend on their values. TF32 is off (docs/NUMERICS.md), which
changes nothing on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _time(fn: Callable[[], object], iters: int) -> tuple[float, list[float]]:
    """(first call seconds, steady-state call seconds) with two warm-up calls in between."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def model_speed(args: argparse.Namespace) -> list[dict[str, object]]:
    import numpy as np
    import tensorflow as tf

    from vit_core import ViTConfig
    from vit_tf import TFViTForImageClassification

    tf.config.experimental.enable_tensor_float_32_execution(False)
    config = ViTConfig.from_variant(args.variant, image_size=args.image_size, num_labels=1000)
    start = time.perf_counter()
    model = TFViTForImageClassification(config, seed=0, dtype=args.dtype)
    init_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    pixel_values = tf.constant(rng.standard_normal((args.batch, 3, args.image_size, args.image_size)), tf.float32)

    results = []
    for attn in args.attn.split(","):
        model.attn_implementation = attn
        for mode in args.modes.split(","):
            def forward(x: tf.Tensor) -> tf.Tensor:
                return model(x, training=False).logits

            fn = forward if mode == "eager" else tf.function(forward, jit_compile=(mode == "xla"))
            first, times = _time(lambda: fn(pixel_values).numpy(), args.iters)
            median = float(np.median(times))
            results.append({
                "variant": args.variant, "image_size": args.image_size, "batch": args.batch, "dtype": args.dtype,
                "mode": mode, "attn": attn, "cpu_count": os.cpu_count() or 0,
                "machine": platform.processor() or platform.machine(), "tensorflow": tf.__version__,
                "init_s": round(init_s, 3), "first_call_s": round(first, 3), "median_call_s": round(median, 4),
                "images_per_s": round(args.batch / median, 2), "best_images_per_s": round(args.batch / min(times), 2),
            })
    return results


def attention_speed(args: argparse.Namespace) -> list[dict[str, object]]:
    """The attention block's formulations at ViT-B/16 shapes (``--batch``, 197 tokens, 12 heads),
    in ``--dtype``: vit_tf's fused path (three projections + batched matmuls), the same with one
    projection on the concatenated q/k/v kernels (vit_tf's fused path before issue #6's second
    pass), its eager path, and keras.ops.dot_product_attention."""
    import keras
    import numpy as np
    import tensorflow as tf

    from vit_tf.layers import eager_attention, fused_attention

    tf.config.experimental.enable_tensor_float_32_execution(False)
    batch, tokens, hidden, heads = args.batch, (args.image_size // 16) ** 2 + 1, 768, 12
    head_dim = hidden // heads
    rng = np.random.default_rng(0)
    dtype = tf.as_dtype(args.dtype)
    x = tf.cast(tf.constant(rng.standard_normal((batch, tokens, hidden)), tf.float32), dtype)
    kernels = [tf.cast(tf.constant(rng.standard_normal((hidden, hidden)) / hidden**0.5, tf.float32), dtype)
               for _ in range(3)]
    biases = [tf.cast(tf.constant(rng.standard_normal(hidden) * 0.02, tf.float32), dtype) for _ in range(3)]
    scaling = head_dim**-0.5

    def split_heads(y: tf.Tensor) -> tf.Tensor:  # (batch * tokens, hidden) -> (batch, heads, tokens, head_dim)
        return tf.transpose(tf.reshape(y, (batch, tokens, heads, head_dim)), (0, 2, 1, 3))

    def merge_heads(y: tf.Tensor) -> tf.Tensor:
        return tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (batch, tokens, hidden))

    flat = tf.reshape(x, (-1, hidden))

    def eager_path() -> tf.Tensor:  # three projections + written-out attention with probabilities
        q, k, v = (split_heads(tf.matmul(flat, w) + b) for w, b in zip(kernels, biases))
        return merge_heads(eager_attention(q, k, v, scaling, None, None)[0])

    def fused_path() -> tf.Tensor:  # vit_tf's fused path: three projections + batched matmuls
        q, k, v = (split_heads(tf.matmul(flat, w) + b) for w, b in zip(kernels, biases))
        return merge_heads(fused_attention(q, k, v, scaling))

    def fused_concat_path() -> tf.Tensor:  # one qkv matmul on kernels concatenated per call
        qkv = tf.matmul(flat, tf.concat(kernels, axis=1)) + tf.concat(biases, axis=0)
        qkv = tf.transpose(tf.reshape(qkv, (batch, tokens, 3, heads, head_dim)), (2, 0, 3, 1, 4))
        return merge_heads(fused_attention(qkv[0], qkv[1], qkv[2], scaling))

    def keras_path() -> tf.Tensor:  # one qkv matmul + keras.ops.dot_product_attention (einsum-based on TF)
        qkv = tf.matmul(flat, tf.concat(kernels, axis=1)) + tf.concat(biases, axis=0)
        q, k, v = tf.unstack(tf.reshape(qkv, (batch, tokens, 3, heads, head_dim)), axis=2)
        return tf.reshape(keras.ops.dot_product_attention(q, k, v, scale=scaling), (batch, tokens, hidden))

    reference = tf.cast(eager_path(), tf.float32).numpy()
    results = []
    for name, body in (("eager", eager_path), ("fused", fused_path), ("fused_qkv_concat", fused_concat_path),
                       ("keras_dot_product_attention", keras_path)):
        for mode in args.modes.split(","):
            fn = body if mode == "eager" else tf.function(body, jit_compile=(mode == "xla"))
            out = tf.cast(fn(), tf.float32).numpy()
            _, times = _time(lambda: fn().numpy(), max(args.iters, 20))
            results.append({"formulation": name, "mode": mode, "dtype": args.dtype,
                            "median_ms": round(1e3 * float(np.median(times)), 2),
                            "max_abs_diff_vs_eager": float(np.max(np.abs(out - reference)))})
    return results


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--modes", default="eager,function,xla")
    parser.add_argument("--attn", default="fused", help="comma-separated: fused, eager")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attention", action="store_true", help="time the attention formulations only")
    parser.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    args = parser.parse_args(argv)

    results = attention_speed(args) if args.attention else model_speed(args)
    for result in results:
        if args.json:
            print(json.dumps(result))
        elif args.attention:
            print(f"{result['formulation']:>28} {result['mode']:>9}: {result['median_ms']:8.2f} ms "
                  f"(max |diff| vs eager {result['max_abs_diff_vs_eager']:.1e})")
        else:
            print(f"{result['variant']} batch {result['batch']} {result['dtype']} {result['mode']:>8} "
                  f"attn={result['attn']:<5}: {result['images_per_s']:7.2f} images/s "
                  f"(median {result['median_call_s']:.3f} s, first call {result['first_call_s']:.1f} s)")
    return results


if __name__ == "__main__":
    main()
