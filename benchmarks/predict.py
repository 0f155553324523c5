"""Batch-inference throughput: ``vitx predict`` end to end (decode + preprocess + ViT) on JPEG files
against transformers' ``pipeline("image-classification", batch_size=...)`` and a timm DataLoader
loop; image processors' images/s; ``vitx predict``'s peak RSS at growing input counts.

Run it on a quiet machine (timing under load is meaningless):

    python -m benchmarks.predict                       # ViT-S/16, 2,000 JPEGs, batch 32, 4 workers
    python -m benchmarks.predict --images 2000 --batch-size 32 --workers 4 --threads 16
    python -m benchmarks.predict --only vitx,pipeline   # skip timm (no peers venv needed)
    python -m benchmarks.predict --only processors      # ViTImageProcessor(Fast) images/s only
    python -m benchmarks.predict --rss 1000,10000 --only ""   # peak RSS of vitx predict only (tiny model)
    python -m benchmarks.predict --quick                # smoke test: tiny model, 24 JPEGs, no timing value

Entries (the same seeded checkpoint, benchmarks/fixtures.py, and the same files):

- ``vitx``: ``conversion.predict.predict`` with --workers W decoding processes, --batch-size B,
  torch; wall time of the whole call after a warm-up run on other files.
- ``pipeline``: transformers 4.57's ``pipeline("image-classification", model=DIR,
  image_processor=ViTImageProcessor(), batch_size=B)`` over the list of paths (torch, CPU).
- ``timm``: timm's VisionTransformer with the same weights, a plain ``torch.utils.data.DataLoader``
  (W workers, PIL decode + resize + numpy normalise, no torchvision) and a ``model(x)`` loop, in
  benchmarks/.venv-peers (benchmarks/peers.py creates it).
- ``processors``: vitx's ``ViTImageProcessor`` / ``ViTImageProcessorFast`` and transformers'
  ``ViTImageProcessor`` (and ``ViTImageProcessorFast`` where torchvision is importable; this
  project never installs it) on the same decoded photos, batches of B, images/s.

Checks: vitx's labels must equal the pipeline's on every file (a mismatch is allowed only at a tie,
top-2 scores within 1e-4, and is counted); timm's agreement with vitx is reported. The JPEGs are
generated once from the committed photos (seeded random crops, sizes and qualities) in
benchmarks/results/cache/predict-jpegs-N/. The report (JSON) goes to --out and is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from .common import CACHE_DIR, TIMM_NAMES, emit, parse_emitted, thread_env, timm_kwargs

REPO = pathlib.Path(__file__).resolve().parents[1]
PHOTO_DIRS = (REPO / "tests" / "fixtures" / "images", REPO / "conversion" / "samples")
ENTRIES = ("vitx", "pipeline", "timm", "processors")
_JPEG_VERSION = 1
TIE = 1e-4


# --------------------------------------------------------------------------------------------- fixtures
def photos() -> list[pathlib.Path]:
    return sorted(p for d in PHOTO_DIRS for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def ensure_jpegs(count: int, *, small: bool = False, root: pathlib.Path | None = None) -> pathlib.Path:
    """``count`` JPEG files made from the committed photos: seeded random crops (30-100% of each side),
    sizes (160-640 px, or 24-96 with ``small``) and qualities (60-95), in a cache folder, once."""
    from PIL import Image

    root = root or CACHE_DIR / f"predict-jpegs-{count}{'-small' if small else ''}"
    stamp = root / "jpegs.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == _JPEG_VERSION:
        return root
    root.mkdir(parents=True, exist_ok=True)
    sources = []
    for path in photos():
        with Image.open(path) as im:
            sources.append(im.convert("RGB"))
    rng = np.random.default_rng(12)
    lo, hi = (24, 96) if small else (160, 640)
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.3, 1.0)), int(h * rng.uniform(0.3, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(lo, hi + 1))
        scale = side / max(cw, ch)
        size = (max(8, int(cw * scale)), max(8, int(ch * scale)))
        crop = image.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
        folder = root / f"{i // 1000:03d}"
        folder.mkdir(exist_ok=True)
        crop.save(folder / f"{i:06d}.jpg", quality=int(rng.integers(60, 96)))
    stamp.write_text(json.dumps({"version": _JPEG_VERSION, "count": count}))
    return root


def jpeg_paths(root: pathlib.Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.jpg"))


def ensure_checkpoint(model: str) -> pathlib.Path:
    """The benchmark model's seeded checkpoint (benchmarks/fixtures.py) with a preprocessor_config.json
    (ViTImageProcessor at the model's size: bilinear, mean = std = 0.5), linked into its own folder."""
    from vit_core.image_processing import ViTImageProcessor

    from .common import MODEL_SPECS
    from .fixtures import ensure_fixtures

    source = ensure_fixtures(model)
    directory = CACHE_DIR / f"predict-{source.name}"
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "timm.safetensors"):
        link = directory / name
        if link.is_symlink() and link.resolve() != (source / name).resolve():
            link.unlink()  # dangling or stale (the cache was written from another checkout)
        if not link.exists():
            link.symlink_to(source / name)
    size = MODEL_SPECS[model]["image_size"]
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------- entries
def _label_index(label: str, label2id: dict[str, int]) -> int:
    return int(label2id[label]) if label in label2id else int(label.rsplit("_", 1)[-1])


def entry_vitx(args: argparse.Namespace, checkpoint: pathlib.Path, paths: list[str], warm: list[str]) -> dict:
    from conversion.predict import PredictOptions, predict, read_rows

    with tempfile.TemporaryDirectory() as tmp:
        predict(PredictOptions(str(checkpoint), warm, f"{tmp}/warm.jsonl", batch_size=args.batch_size,
                               workers=args.workers, progress=False))
        listing = pathlib.Path(tmp, "inputs.txt")
        listing.write_text("".join(p + "\n" for p in paths))
        start = time.perf_counter()
        predict(PredictOptions(str(checkpoint), [str(listing)], f"{tmp}/rows.jsonl", batch_size=args.batch_size,
                               workers=args.workers, top_k=2, progress=False))
        seconds = time.perf_counter() - start
        rows = read_rows(f"{tmp}/rows.jsonl")
    config = json.loads((checkpoint / "config.json").read_text())
    label2id = {v: int(k) for k, v in config.get("id2label", {}).items()}
    return {"seconds": seconds, "images_per_s": len(paths) / seconds,
            "labels": [_label_index(r["label"], label2id) if "label" in r else -1 for r in rows],
            "top2": [[s for _, s in r["top_k"]] if "top_k" in r else [0.0, 0.0] for r in rows],
            "errors": sum("error" in r for r in rows)}


def entry_pipeline(args: argparse.Namespace, checkpoint: pathlib.Path, paths: list[str], warm: list[str]) -> dict:
    import torch
    from transformers import ViTImageProcessor, pipeline

    torch.set_num_threads(args.threads)
    size = json.loads((checkpoint / "config.json").read_text())["image_size"]
    classify = pipeline("image-classification", model=str(checkpoint), framework="pt", device=-1,
                        image_processor=ViTImageProcessor(size={"height": size, "width": size}),
                        batch_size=args.batch_size)
    classify(warm, top_k=2)
    start = time.perf_counter()
    results = classify(paths, top_k=2)
    seconds = time.perf_counter() - start
    label2id = {v: int(k) for k, v in classify.model.config.id2label.items()}
    return {"seconds": seconds, "images_per_s": len(paths) / seconds,
            "labels": [_label_index(r[0]["label"], label2id) for r in results],
            "top2": [[p["score"] for p in r] for r in results]}


def entry_timm(args: argparse.Namespace, checkpoint: pathlib.Path, paths: list[str], warm: list[str]) -> dict:
    """Runs in benchmarks/.venv-peers: timm + torch + PIL + numpy, no vit_core."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    size = json.loads((checkpoint / "config.json").read_text())["image_size"]
    model = timm.create_model(TIMM_NAMES[args.model], pretrained=False, num_classes=1000, **timm_kwargs(args.model))
    model.load_state_dict(load_file(str(checkpoint / "timm.safetensors")))
    model.eval()

    class Files(torch.utils.data.Dataset):
        def __init__(self, files: list[str]) -> None:
            self.files = files

        def __len__(self) -> int:
            return len(self.files)

        def __getitem__(self, i: int) -> torch.Tensor:
            with Image.open(self.files[i]) as im:
                image = im.convert("RGB").resize((size, size), Image.BILINEAR)
            x = (np.asarray(image, dtype=np.float32) * (1 / 255.0) - 0.5) / 0.5
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def run(files: list[str]) -> tuple[list[int], list[list[float]]]:
        loader = torch.utils.data.DataLoader(Files(files), batch_size=args.batch_size, num_workers=args.workers,
                                             shuffle=False, persistent_workers=False)
        labels, top2 = [], []
        with torch.inference_mode():
            for x in loader:
                probs = model(x).softmax(-1)
                values, indices = probs.topk(2, dim=-1)
                labels += indices[:, 0].tolist()
                top2 += values.tolist()
        return labels, top2

    run(warm)
    start = time.perf_counter()
    labels, top2 = run(paths)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": len(paths) / seconds, "labels": labels, "top2": top2}


def entry_processors(args: argparse.Namespace, checkpoint: pathlib.Path, paths: list[str], warm: list[str]) -> dict:
    """images/s of each processor on the same decoded photos (batches of --batch-size), and the
    largest |difference| of its pixel values from transformers' slow processor."""
    import transformers
    from PIL import Image

    from vit_core.image_processing import ViTImageProcessor
    from vit_core.image_processing_fast import ViTImageProcessorFast

    size = json.loads((checkpoint / "config.json").read_text())["image_size"]
    kwargs = {"size": {"height": size, "width": size}}
    images = []
    for path in paths[: max(args.batch_size, min(len(paths), 512))]:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    candidates: dict[str, Any] = {"vitx-slow": lambda: ViTImageProcessor(**kwargs),
                                  "vitx-fast": lambda: ViTImageProcessorFast(**kwargs),
                                  "transformers-slow": lambda: transformers.ViTImageProcessor(**kwargs),
                                  "transformers-fast": lambda: transformers.ViTImageProcessorFast(**kwargs)}
    baseline = np.asarray(transformers.ViTImageProcessor(**kwargs)(images[: args.batch_size],
                                                                    return_tensors="np")["pixel_values"])
    out: dict[str, Any] = {}
    for name, make in candidates.items():
        try:
            processor = make()
            tensors = "pt" if name == "transformers-fast" else "np"
            first = np.asarray(processor(images[: args.batch_size], return_tensors=tensors)["pixel_values"])
        except Exception as e:  # noqa: BLE001 - e.g. transformers' fast processor without torchvision
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        start = time.perf_counter()
        for i in range(0, len(images), args.batch_size):
            processor(images[i:i + args.batch_size], return_tensors=tensors)
        seconds = time.perf_counter() - start
        out[name] = {"images_per_s": len(images) / seconds, "images": len(images),
                     "max_abs_diff_vs_transformers_slow": float(np.abs(first - baseline).max())}
    return out


ENTRY_FUNCTIONS = {"vitx": entry_vitx, "pipeline": entry_pipeline, "timm": entry_timm, "processors": entry_processors}


# --------------------------------------------------------------------------------------------- peak RSS
_RSS_PROBE = """
import json, os, threading, time
from conversion.predict import PredictOptions, predict

def status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration):
        return 0.0

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""

def children(pid):
    # a child still showing this process's command line is a fork before its exec: its pages are ours
    out, own = [], cmdline(pid)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split() if cmdline(int(c)) not in (own, b"")]
        except OSError:
            pass
    return out

peak = {"worker": 0.0, "total": 0.0}
stop = threading.Event()

def sample():
    me = os.getpid()
    while not stop.is_set():
        workers = [status(c, "VmRSS") for c in children(me)]
        peak["worker"] = max([peak["worker"], *workers])
        peak["total"] = max(peak["total"], status(me, "VmRSS") + sum(workers))
        time.sleep(0.05)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
r = predict(PredictOptions(CHECKPOINT, [ROOT], OUTPUT, batch_size=BATCH, workers=WORKERS, progress=False))
stop.set()
thread.join()
print("BENCH_RESULT " + json.dumps({"rows": r.written, "seconds": r.seconds,
      "main_peak_rss_mib": status(os.getpid(), "VmHWM"), "worker_peak_rss_mib": peak["worker"],
      "total_peak_rss_mib": peak["total"]}))
"""


def measure_rss(count: int, workers: int, batch_size: int, timeout: float, threads: int = 1) -> dict:
    """Peak RSS of ``vitx predict`` over ``count`` small JPEGs with a tiny model, in a fresh process:
    the main process's VmHWM, the largest decoding worker's and the whole tree's sampled VmRSS (every
    50 ms, after each worker's exec; ru_maxrss would charge a spawned worker with its parent's RSS at
    the fork before its exec).
    ``threads`` torch threads: memory, not speed, is measured."""
    root = ensure_jpegs(count, small=True)
    checkpoint = ensure_checkpoint("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        code = (f"CHECKPOINT, ROOT, OUTPUT = {str(checkpoint)!r}, {str(root)!r}, {tmp + '/rows.jsonl'!r}\n"
                f"BATCH, WORKERS = {batch_size}, {workers}\n" + _RSS_PROBE)
        env = {**os.environ, **thread_env(threads), "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    result = parse_emitted(done.stdout)
    if done.returncode != 0 or result is None:
        raise RuntimeError(f"vitx predict on {count} images failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"images": count, "workers": workers, "batch_size": batch_size, **result}


# --------------------------------------------------------------------------------------------- harness
def _run_entry(name: str, args: argparse.Namespace, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.predict", "--entry", name, "--model", args.model,
               "--images", str(args.images), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--threads", str(args.threads)]
    # transformers' pipeline: torch only (without USE_TF=0 it imports TensorFlow too, tens of seconds)
    env = {**os.environ, **thread_env(args.threads), "PYTHONPATH": str(REPO), "USE_TF": "0", "USE_FLAX": "0",
           "USE_TORCH": "1"}
    if name == "timm":
        from .peers import ensure_peers_venv, peers_env

        command[0] = str(ensure_peers_venv())
        env = {**peers_env(env), **thread_env(args.threads)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    result = parse_emitted(done.stdout)
    if done.returncode != 0 or result is None:
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return result


def _agreement(reference: dict, other: dict) -> dict:
    """How many labels agree; a disagreement where either side's top-2 scores are within TIE is a tie."""
    a, b = reference["labels"], other["labels"]
    same = sum(x == y for x, y in zip(a, b))
    ties = sum(x != y and min(abs(p[0] - p[1]), abs(q[0] - q[1])) <= TIE
               for x, y, p, q in zip(a, b, reference["top2"], other["top2"]))
    return {"images": len(a), "same_label": same, "ties": ties, "mismatches": len(a) - same - ties,
            "same_length": len(a) == len(b)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="S/16", choices=["S/16", "B/16", "tiny"], help="benchmark model (default: S/16)")
    parser.add_argument("--images", type=int, default=2000, help="JPEG files (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward call, every entry (default: 32)")
    parser.add_argument("--workers", type=int, default=4, help="decoding processes of vitx and the timm DataLoader (default: 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--only", default=",".join(ENTRIES), help=f"comma list of entries (default: {','.join(ENTRIES)})")
    parser.add_argument("--rss", default="", metavar="N,N", help="also measure vitx predict's peak RSS at these input counts")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per entry process (default: 3600)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 24 JPEGs, batch 4, 1 worker")
    parser.add_argument("--out", default=None, help="report JSON (default: benchmarks/results/predict-<time>.json)")
    parser.add_argument("--entry", choices=ENTRIES, help=argparse.SUPPRESS)  # a child process runs one entry
    return parser


def _machine() -> dict[str, Any]:
    """The CPU model and ISA summary (vit_core.cpu), as benchmarks.run records them."""
    from vit_core import cpu

    features = cpu.cpu_features()
    return {"cpu": features.model, "host": features.describe(), "cpu_features": features.summary()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.model, args.images, args.batch_size, args.workers, args.threads = "tiny", 24, 4, 1, 1
    root = CACHE_DIR / f"predict-jpegs-{args.images}"
    checkpoint = CACHE_DIR / f"predict-{args.model.replace('/', '')}"
    if args.entry:  # child: files and checkpoint prepared by the parent
        paths = jpeg_paths(root)
        warm = jpeg_paths(CACHE_DIR / "predict-jpegs-warm")
        result = ENTRY_FUNCTIONS[args.entry](args, checkpoint, paths, warm)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        emit(result)
        return 0
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(ENTRIES))
    if unknown:
        raise SystemExit(f"unknown entries {unknown}; choose from {', '.join(ENTRIES)}")
    if only:
        ensure_jpegs(args.images, root=root)
        ensure_jpegs(2 * args.batch_size, root=CACHE_DIR / "predict-jpegs-warm")
        ensure_checkpoint(args.model)
    report: dict[str, Any] = {"model": args.model, "images": args.images, "batch_size": args.batch_size,
                              "workers": args.workers, "threads": args.threads, "cpus": os.cpu_count(),
                              "machine": _machine(),
                              "load_average_at_start": list(os.getloadavg()), "entries": {}}
    for name in only:
        print(f"[predict-bench] {name} ...", file=sys.stderr, flush=True)
        report["entries"][name] = _run_entry(name, args, args.timeout)
    entries = report["entries"]
    checks: dict[str, Any] = {}
    if "vitx" in entries and "error" not in entries["vitx"]:
        for other in ("pipeline", "timm"):
            if other in entries and "error" not in entries[other]:
                checks[f"labels_vitx_vs_{other}"] = _agreement(entries["vitx"], entries[other])
                checks[f"speedup_vs_{other}"] = entries["vitx"]["images_per_s"] / entries[other]["images_per_s"]
    report["checks"] = checks
    report["rss"] = [measure_rss(int(n), workers=2, batch_size=32, timeout=args.timeout)
                     for n in args.rss.split(",") if n.strip()]
    for entry in entries.values():
        entry.pop("labels", None)
        entry.pop("top2", None)
    out = pathlib.Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"predict-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    failed = [name for name, entry in entries.items() if "error" in entry]
    pipeline_check = checks.get("labels_vitx_vs_pipeline")
    if pipeline_check and (pipeline_check["mismatches"] or not pipeline_check["same_length"]):
        print(f"[predict-bench] vitx and the pipeline disagree on {pipeline_check['mismatches']} labels",
              file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
