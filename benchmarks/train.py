"""The training benchmark (issue #11): images/s of one optimizer step, vitx against each ecosystem.

    python -m benchmarks.train [--quick] [--models S/16,B/16] [--dtypes float32,bfloat16]
                               [--batch 32] [--only vitx-*,hf4-*] [--checkpointing-dtypes float32]
                               [--threads N] [--out PATH]

One optimizer step is forward + backward + AdamW on a batch (default 32) at 224, the entries of
``benchmarks/train_entries.py``; "bfloat16" is each framework's mixed precision (autocast,
``mixed_bfloat16``, a bfloat16 computation dtype with float32 params). Every cell is a fresh child
process (``benchmarks.worker train``), warmed up by two steps (the first compiles or traces), then
timed over at least ``--min-runs`` steps; the first step's loss is checked against the float64
reference loss of the batch (a mis-loaded model or a wrong loss shows up). With gradient
checkpointing the same cells run again for the entries whose library has it
(``--checkpointing-dtypes``), for the peak-RSS comparison.

Writes ``benchmarks/results/train-<time>.json`` and ``.md`` (and ``latest-train.*``) after every
cell and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import platform
import sys
from typing import Any

from .common import RESULTS_DIR, cpu_name, load_average
from .run import _git_commit, _selected, _split, run_child, wait_for_quiet
from .train_entries import TRAIN_ENTRIES, TrainEntry

RATIO_TARGET = 1.2        # issue #11: best vitx >= 1.2x the fastest peer of its framework
LOSS_BOUND = {"float32": 1e-4, "bfloat16": 3e-2}  # first-step loss vs the float64 reference, relative
CHILD_TIMEOUT_S = 1800


def _log(message: str) -> None:
    print(f"[train-bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, batch 4, float32, 2 steps")
    parser.add_argument("--models", type=_split, default=None, help="comma list: S/16,B/16")
    parser.add_argument("--dtypes", type=_split, default=None, help="comma list: float32,bfloat16")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 32)")
    parser.add_argument("--only", type=_split, default=None, help="entry names or globs: vitx-*,hf4-torch-*")
    parser.add_argument("--checkpointing-dtypes", type=_split, default=None,
                        help="dtypes whose cells run again with gradient checkpointing (default float32; "
                             "'none' for none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-runs", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed steps per cell")
    parser.add_argument("--max-foreign-load", type=float, default=0.3,
                        help="cores other processes may use: wait for quiet before a cell, measure it again "
                             "when they used more meanwhile (0 disables)")
    parser.add_argument("--quiet-timeout", type=float, default=120.0)
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train-<time>.json)")
    args = parser.parse_args(argv)

    quick = args.quick
    if quick:
        args.max_foreign_load = 0.0
    models = args.models or (["tiny"] if quick else ["S/16", "B/16"])
    dtypes = args.dtypes or (["float32"] if quick else ["float32", "bfloat16"])
    batch = args.batch or (4 if quick else 32)
    ckpt_dtypes = args.checkpointing_dtypes or ["float32"]
    ckpt_dtypes = [] if ckpt_dtypes == ["none"] else ckpt_dtypes
    min_runs = args.min_runs or (2 if quick else 3)
    min_time = args.min_time if args.min_time is not None else (0.0 if quick else 10.0)
    max_time = 1.0 if quick else max(60.0, min_time)
    entries = [e for e in TRAIN_ENTRIES.values() if _selected(e.name, args.only)]

    from .fixtures import ensure_train_fixtures

    for model in models:
        _log(f"fixtures for {model}: {ensure_train_fixtures(model, batch)}")
    from vit_core import cpu

    features = cpu.cpu_features()
    started = _dt.datetime.now()
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "git_commit": _git_commit(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_average_at_start": load_average(),
                    # the host kind (vit_core.cpu): CPU model, vector flags, ISA level
                    "cpu_features": features.summary(), "host": features.describe()},
        "settings": {"quick": quick, "models": models, "dtypes": dtypes, "batch": batch, "threads": args.threads,
                     "checkpointing_dtypes": ckpt_dtypes, "min_runs": min_runs, "min_time_s": min_time,
                     "max_time_s": max_time, "entries": [e.name for e in entries]},
        "cells": [],
    }
    cells = [(m, d, e, False) for m in models for d in dtypes for e in entries]
    cells += [(m, d, e, True) for m in models for d in dtypes if d in ckpt_dtypes for e in entries if e.checkpointing]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = started.strftime("train-%Y%m%d-%H%M%S") + ("-quick" if quick else "")
    json_path = pathlib.Path(args.out or RESULTS_DIR / f"{stem}.json")
    markdown = ""
    for i, (model, dtype, entry, checkpointing) in enumerate(cells, 1):
        tag = " (gradient checkpointing)" if checkpointing else ""
        _log(f"[{i}/{len(cells)}] {entry.name} {model} {dtype} batch {batch}{tag}")
        result = _measure(entry, model, dtype, batch, checkpointing, args, min_runs, min_time, max_time)
        report["cells"].append(result)
        markdown = _write(report, json_path, default_out=args.out is None)
    if not cells:
        markdown = _write(report, json_path, default_out=args.out is None)
    print(markdown)
    _log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


def _measure(entry: TrainEntry, model: str, dtype: str, batch: int, checkpointing: bool, args: argparse.Namespace,
             min_runs: int, min_time: float, max_time: float) -> dict[str, Any]:
    attempts: list[dict[str, Any]] = []
    for _ in range(1 + args.retries):
        quiet = wait_for_quiet(args.max_foreign_load, args.quiet_timeout) if args.max_foreign_load else None
        result = run_child(entry.venv, "benchmarks.worker", [
            "train", "--entry", entry.name, "--model", model, "--dtype", dtype, "--batch", str(batch),
            "--threads", str(args.threads), "--min-runs", str(min_runs), "--min-time", str(min_time),
            "--max-time", str(max_time), *(["--checkpointing"] if checkpointing else [])],
            args.threads, CHILD_TIMEOUT_S)
        result["foreign_load_before_cores"] = quiet
        attempts.append(result)
        foreign = result.get("foreign_load_cores")
        if "error" in result or not args.max_foreign_load or foreign is None or foreign < args.max_foreign_load:
            break
        _log(f"    other processes used {foreign:.2f} cores meanwhile: measuring again")
    result = min(attempts, key=lambda r: (r.get("foreign_load_cores") or 0.0))
    result.update({"entry": entry.name, "framework": entry.framework, "vitx": entry.vitx, "model": model,
                   "dtype": dtype, "batch": batch, "checkpointing": checkpointing, "attempts": len(attempts)})
    if "error" in result:
        _log(f"    {'unsupported' if result.get('unsupported') else 'error'}: {result['error'][:300]}")
    else:
        _log(f"    {result['images_per_s']:.2f} img/s, first loss rel diff {result['first_loss_rel_diff']:.1e}, "
             f"peak RSS {result['peak_rss_mb']:.0f} MiB")
    return result


# ------------------------------------------------------------------------------------ evaluation
def evaluate(report: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the best vitx entry to the fastest peer per (framework, model, dtype), the cells
    under target, the peak-RSS pairs, and the errors (failed cells, losses off the reference)."""
    plain = [c for c in report["cells"] if not c.get("checkpointing") and "error" not in c]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in plain:
        groups.setdefault((c["framework"], c["model"], c["dtype"]), []).append(c)
    ratios = []
    for (fw, model, dtype), group in sorted(groups.items()):
        vitx = [c for c in group if c["vitx"]]
        peers = [c for c in group if not c["vitx"]]
        if not vitx or not peers:
            continue
        best, peer = max(vitx, key=lambda c: c["images_per_s"]), max(peers, key=lambda c: c["images_per_s"])
        ratio = best["images_per_s"] / peer["images_per_s"]
        ratios.append({"framework": fw, "model": model, "dtype": dtype, "vitx_entry": best["entry"],
                       "vitx_images_per_s": best["images_per_s"], "peer_entry": peer["entry"],
                       "peer_images_per_s": peer["images_per_s"], "ratio": ratio, "target": RATIO_TARGET,
                       "met": ratio >= RATIO_TARGET})
    memory = []
    by_key = {(c["entry"], c["model"], c["dtype"], bool(c.get("checkpointing"))): c
              for c in report["cells"] if "error" not in c}
    for (name, model, dtype, ckpt), with_ in sorted(by_key.items()):
        without = by_key.get((name, model, dtype, False))
        if ckpt and without is not None:
            memory.append({"entry": name, "model": model, "dtype": dtype,
                           "peak_rss_mb": without["peak_rss_mb"], "checkpointing_peak_rss_mb": with_["peak_rss_mb"],
                           "images_per_s": without["images_per_s"],
                           "checkpointing_images_per_s": with_["images_per_s"]})
    errors = [f"{c['entry']} {c['model']} {c['dtype']}{' ckpt' if c.get('checkpointing') else ''}: {c['error'][:300]}"
              for c in report["cells"] if "error" in c and not c.get("unsupported")]
    for c in report["cells"]:
        if "error" not in c and c["first_loss_rel_diff"] > LOSS_BOUND.get(c["dtype"], 1e-4):
            errors.append(f"{c['entry']} {c['model']} {c['dtype']}: first-step loss {c['first_loss']:.6f} vs "
                          f"float64 reference {c['reference_loss']:.6f}")
    return {"ratios": ratios, "below_target": [r for r in ratios if not r["met"]], "memory": memory,
            "errors": errors}


def render(report: dict[str, Any]) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [f"# Training speed: one optimizer step (forward + backward + AdamW), batch {settings['batch']}"
             + (f", on {machine['host']}" if machine.get("host") else ""), "",
             f"{machine['cpu'] or '?'}, {machine['cores']} cores, {settings['threads']} threads; "
             f"started {report['started']}, vitx at {report.get('git_commit')}; "
             f"load average {machine['load_average_at_start'][0]:.2f} -> "
             f"{machine.get('load_average_at_end', [float('nan')])[0]:.2f}.", "",
             "| model | dtype | framework | entry | img/s | s/step | 1st loss vs f64 | peak RSS MiB |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    order = {name: i for i, name in enumerate(TRAIN_ENTRIES)}
    plain = [c for c in report["cells"] if not c.get("checkpointing")]
    for c in sorted(plain, key=lambda c: (c["model"], c["dtype"], c["framework"], order.get(c["entry"], 99))):
        name = f"**{c['entry']}**" if c["vitx"] else c["entry"]
        if "error" in c:
            what = "not supported" if c.get("unsupported") else f"error: {c['error'][:80]}"
            lines.append(f"| {c['model']} | {c['dtype']} | {c['framework']} | {name} | {what} | | | |")
            continue
        lines.append(f"| {c['model']} | {c['dtype']} | {c['framework']} | {name} | {c['images_per_s']:.2f} | "
                     f"{c['median_s']:.2f} | {c['first_loss_rel_diff']:.1e} | {c['peak_rss_mb']:.0f} |")
    lines += ["", f"Best vitx / fastest peer (target {RATIO_TARGET}x):", "",
              "| framework | model | dtype | best vitx | img/s | fastest peer | img/s | ratio | met |",
              "|---|---|---|---|---:|---|---:|---:|---|"]
    for r in report["ratios"]:
        lines.append(f"| {r['framework']} | {r['model']} | {r['dtype']} | {r['vitx_entry']} | "
                     f"{r['vitx_images_per_s']:.2f} | {r['peer_entry']} | {r['peer_images_per_s']:.2f} | "
                     f"{r['ratio']:.2f}x | {'yes' if r['met'] else 'no'} |")
    if report["memory"]:
        lines += ["", "Gradient checkpointing: peak RSS of the process (weights, AdamW state, activations):", "",
                  "| entry | model | dtype | peak RSS MiB | with checkpointing | img/s | with checkpointing |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for m in report["memory"]:
            lines.append(f"| {m['entry']} | {m['model']} | {m['dtype']} | {m['peak_rss_mb']:.0f} | "
                         f"{m['checkpointing_peak_rss_mb']:.0f} | {m['images_per_s']:.2f} | "
                         f"{m['checkpointing_images_per_s']:.2f} |")
    if report["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], json_path: pathlib.Path, default_out: bool) -> str:
    from vit_core.config import write_text_atomic

    report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    report["machine"]["load_average_at_end"] = load_average()
    report.update(evaluate(report))
    markdown = render(report)
    outputs = [(json_path, json.dumps(report, indent=1)), (json_path.with_suffix(".md"), markdown)]
    if default_out:
        outputs += [(RESULTS_DIR / "latest-train.json", outputs[0][1]), (RESULTS_DIR / "latest-train.md", markdown)]
    for path, text in outputs:
        write_text_atomic(path, text)
    return markdown


if __name__ == "__main__":
    sys.exit(main())
