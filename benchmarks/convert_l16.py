"""Conversion time and peak memory for a ViT-L/16 checkpoint (issue #5).

A seeded ViT-L/16 classifier (1000 labels, 304,326,632 float32 parameters, 1.13 GiB) is written
as a canonical transformers directory (config.json + model.safetensors). Then, for each target
format (tf, flax, timm, jax), ``convert(src -> target)`` and ``convert(target -> safetensors)``
each run in a fresh Python process, which reports the seconds spent in ``convert`` and its peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts memory-mapped file pages the
process touched) plus the RSS right before the call (imports). The round trip is checked
bitwise. Usage:

    python -m benchmarks.convert_l16 [--workdir DIR] [--json OUT] [--targets tf flax timm jax]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ("tf", "flax", "timm", "jax")

_MAKE = textwrap.dedent("""
    import json, resource, sys, numpy as np
    from vit_core import ViTConfig
    from vit_core.weights import weight_table
    from vit_core.checkpoint.lazy import Lazy
    from vit_core.checkpoint import safetensors
    from conversion.formats.transformers import save_config
    import pathlib
    out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True)
    config = ViTConfig.from_variant("L/16", num_labels=1000)
    def make(seed, shape, kind):
        def load():
            values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            return values + np.float32(1.0) if kind == "norm" else values
        return load
    state = {s.name: Lazy(s.shape, np.dtype(np.float32), make(i, s.shape, s.kind), s.name)
             for i, s in enumerate(weight_table(config, "classification"))}
    safetensors.write(out / "model.safetensors", state, {"format": "pt"})
    save_config(config, out, set(state))
    print(json.dumps({"parameters": sum(int(np.prod(s.shape)) for s in state.values())}))
""")

_CONVERT = textwrap.dedent("""
    import json, resource, sys, time
    from conversion import convert
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = convert(sys.argv[1], sys.argv[2], to=sys.argv[3])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024, "rss_before_mib": before / 1024,
                      "tensor_mib": result.nbytes / 2**20}))
""")

_CHECK = textwrap.dedent("""
    import sys, numpy as np
    from conversion import open_checkpoint
    a, b = open_checkpoint(sys.argv[1]).state, open_checkpoint(sys.argv[2]).state
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        x, y = a[k].materialize(), b[k].materialize()
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k
    print("bitwise")
""")


def _python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"subprocess failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def run(workdir: pathlib.Path, targets: tuple[str, ...]) -> dict[str, Any]:
    src = workdir / "vit-l16"
    made = json.loads(_python(_MAKE, str(src)))
    size_mib = (src / "model.safetensors").stat().st_size / 2**20
    rows = []
    for target in targets:
        out = workdir / (f"l16.{target}.npz" if target == "jax" else f"l16-{target}")
        back = workdir / f"back-{target}"
        there = json.loads(_python(_CONVERT, str(src), str(out), target))
        again = json.loads(_python(_CONVERT, str(out), str(back), "safetensors"))
        check = _python(_CHECK, str(src), str(back))
        written = sum(p.stat().st_size for p in ([out] if out.is_file() else out.iterdir())) / 2**20
        rows.append({"target": target, "to": there, "back": again, "round_trip": check, "file_mib": written})
        shutil.rmtree(back)
        out.unlink() if out.is_file() else shutil.rmtree(out)
    return {"model": "ViT-L/16, 1000 labels, seeded", "parameters": made["parameters"], "checkpoint_mib": size_mib,
            "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"ViT-L/16 ({result['parameters']:,} parameters, safetensors {result['checkpoint_mib']:.0f} MiB); "
             "each conversion in a fresh process; peak RSS includes memory-mapped pages and ~imports", "",
             "| conversion | seconds | peak RSS (MiB) | RSS before convert (MiB) | round trip |",
             "|---|---:|---:|---:|---|"]
    for row in result["rows"]:
        for direction, name in (("to", f"safetensors -> {row['target']}"), ("back", f"{row['target']} -> safetensors")):
            r = row[direction]
            lines.append(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} | "
                         f"{row['round_trip'] if direction == 'back' else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, help="where to write the ~1.2 GiB files (default: a temp dir)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results as JSON here")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vitx-l16-", dir=args.workdir) as tmp:
        result = run(pathlib.Path(tmp), tuple(args.targets))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
