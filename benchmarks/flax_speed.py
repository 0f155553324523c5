"""vit_flax speed: ViT-B/16 at 224, batch 8, jit-compiled forward on this machine.

    python -m benchmarks.flax_speed [--batch 8] [--iters 10] [--dtype float32] [--attn fused]
    python -m benchmarks.flax_speed --attention [--dtype bfloat16]   # the attention formulations alone

Reports the first call (trace + XLA compile + one run; ``compile_s`` is it less one steady call)
separately from the steady state (images/second over ``--iters`` calls after two warm-up calls;
median and best, since other work on the machine shows up as slow calls). Weights are seeded, not trained:
speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--attn", default="fused", choices=("fused", "eager"))
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--attention", action="store_true",
                        help="time the attention formulations alone at the variant's shapes instead")
    args = parser.parse_args(argv)
    if args.attention:
        return attention_speed(args)

    import jax
    import numpy as np

    from vit_core import ViTConfig
    from vit_flax import FlaxViTForImageClassification

    config = ViTConfig.from_variant(args.variant, image_size=args.image_size, num_labels=1000)
    start = time.perf_counter()
    model = FlaxViTForImageClassification(config, seed=0, dtype=args.dtype, attn_implementation=args.attn)
    jax.block_until_ready(model.classifier.kernel[...])
    init_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    pixel_values = rng.standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    pixel_values = jax.device_put(pixel_values)

    start = time.perf_counter()
    jax.block_until_ready(model(pixel_values).logits)
    first_call_s = time.perf_counter() - start
    for _ in range(2):
        jax.block_until_ready(model(pixel_values).logits)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        jax.block_until_ready(model(pixel_values).logits)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    result: dict[str, float | int | str] = {
        "variant": args.variant, "image_size": args.image_size, "batch": args.batch, "dtype": args.dtype,
        "attn": args.attn, "device": str(jax.devices()[0]), "cpu_count": os.cpu_count() or 0,
        "machine": platform.processor() or platform.machine(),
        "init_s": round(init_s, 3), "first_call_s": round(first_call_s, 3),
        # trace + XLA compile: the first call less one steady-state call
        "compile_s": round(max(first_call_s - median, 0.0), 3),
        "median_call_s": round(median, 4), "images_per_s": round(args.batch / median, 2),
        "best_images_per_s": round(args.batch / min(times), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return result


def attention_speed(args: argparse.Namespace) -> dict[str, float | int | str]:
    """The attention block at the variant's shapes (batch, tokens, heads, head_dim), milliseconds
    per call, best of ``--iters``: vit_flax's fused_attention ((batch, heads) leading, what CPU runs),
    its eager_attention (probabilities too), and jax.nn.dot_product_attention on the
    (batch, tokens, heads, head_dim) layout it takes (what fused_attention used before, and runs
    off CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vit_core import ViTConfig
    from vit_flax.layers import eager_attention, fused_attention

    config = ViTConfig.from_variant(args.variant, image_size=args.image_size)
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    shape = (args.batch, heads, config.num_patches + 1, head_dim)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype=args.dtype) for _ in range(3))
    scaling = head_dim**-0.5
    paths = {
        "fused_attention": lambda q, k, v: fused_attention(q, k, v, scaling),
        "eager_attention": lambda q, k, v: eager_attention(q, k, v, scaling, None, 0.0, None),
        "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=scaling),
    }
    result: dict[str, float | int | str] = {"variant": args.variant, "batch": args.batch, "dtype": args.dtype}
    for name, fn in paths.items():
        compiled = jax.jit(fn)
        jax.block_until_ready(compiled(q, k, v))
        best = float("inf")
        for _ in range(args.iters):
            start = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v))
            best = min(best, time.perf_counter() - start)
        result[f"{name}_ms"] = round(best * 1e3, 3)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>34}: {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
