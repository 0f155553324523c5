"""vit_flax speed: ViT-B/16 at 224, batch 8, jit-compiled forward on this machine.

    python -m benchmarks.flax_speed [--batch 8] [--iters 10] [--dtype float32] [--attn fused]

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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
