"""The vitx benchmark harness (issue #6): vitx against its peers, per framework, side by side.

    python -m benchmarks.run [--quick] [--models S/16,B/16] [--batches 1,8,32]
                             [--dtypes float32,bfloat16] [--only vitx-torch-*,hf5-*]
                             [--skip-gemm] [--skip-cold] [--threads N] [--out PATH]

Every measurement is a fresh child process (``benchmarks.worker`` / ``benchmarks.gemm``), run one
at a time, with the thread pools of torch / TF / XLA (and OpenMP, MKL) set to ``--threads``
(default: the machine's cores). Each timed cell warms up (the first call compiles or traces), then
takes the median of at least ``--min-runs`` calls and ``--min-time`` seconds. Peers run on the
same checkpoint and the same input images (benchmarks/fixtures.py); every cell's logits for image
0 are checked against the float64 numpy reference, so a wrong or mis-loaded model shows up.

Writes ``benchmarks/results/bench-<time>.json`` and ``.md`` (and ``latest.json`` / ``latest.md``)
and prints the markdown. The machine's load average is recorded before and after every child:
timings taken while other work runs on the same cores are noisy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

from .common import (
    RESULTS_DIR,
    children_cpu_seconds,
    cpu_busy_seconds,
    cpu_name,
    foreign_load,
    load_average,
    model_flops,
    parse_emitted,
    thread_env,
)
from .entries import ENTRIES
from .report import evaluate, render_markdown
from .worker import COLD

DEFAULT_MODELS = ["S/16", "B/16"]
DEFAULT_BATCHES = [1, 8, 32]
DEFAULT_DTYPES = ["float32", "bfloat16"]
CHILD_TIMEOUT_S = 1800
LATENCY_MIN_RUNS = 20  # timed calls at batch 1 at least (the latency p50 / p90 cells)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _python_for(venv: str) -> tuple[str, dict[str, str]]:
    """The interpreter and base environment of a venv ("main" runs this interpreter)."""
    env = dict(os.environ)
    if venv == "main":
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH", "")]))
        return sys.executable, env
    from .peers import ensure_peers_venv, peers_env

    return str(ensure_peers_venv()), peers_env(env)


def run_child(venv: str, module: str, args: list[str], threads: int, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process; return its emitted result (or an error)."""
    try:
        python, env = _python_for(venv)
    except Exception as exc:  # the peers venv could not be created (offline machine...)
        return {"error": f"{venv} venv unavailable: {exc}"[:2000]}
    env.update(thread_env(threads))
    command = [python, "-m", module, *args]
    busy0, own0 = cpu_busy_seconds(), children_cpu_seconds()
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - started
    busy1, own1 = cpu_busy_seconds(), children_cpu_seconds()
    # cores used by other processes while the child ran: machine busy time minus the child's own
    foreign = None if busy0 is None or busy1 is None else max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall)
    result = parse_emitted(done.stdout)
    if result is None:
        tail = (done.stderr or done.stdout)[-1500:]
        return {"error": f"child exited {done.returncode} without a result: {tail}", "process_wall_s": wall}
    if "error" in result:
        result["stderr_tail"] = done.stderr[-1500:]
    result["process_wall_s"] = wall
    result["foreign_load_cores"] = foreign
    return result


def wait_for_quiet(max_foreign: float, timeout_s: float) -> float | None:
    """Wait (up to ``timeout_s``) until other processes use less than ``max_foreign`` cores; return
    the last reading. The machine's cores are shared: timings under foreign load are not comparable."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = foreign_load(1.0)
        if load is None or load < max_foreign or time.monotonic() >= deadline:
            return load
        time.sleep(4.0)


def _git_commit() -> str | None:
    """HEAD of the repository (+ "-dirty" with uncommitted changes): what the vitx numbers ran."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _host_of(report: dict[str, Any]) -> tuple[str, str] | None:
    """(CPU model, ISA level) a report was measured on; None for reports older than the CPU record."""
    features = report.get("machine", {}).get("cpu_features")
    return None if not features else (features.get("model", ""), features.get("isa", ""))


def _merge(report: dict[str, Any], earlier: dict[str, Any], keep_faster: bool = False) -> None:
    """Fill ``report`` with what ``earlier`` measured and this run did not (same cell = same entry,
    model, dtype, batch); settings become the union, so the table shows every cell.

    ``keep_faster``: a cell measured in both keeps the faster of the two results (more passes of
    the same cells, the same rule as --passes: vitx and peers alike), every pass's images/s kept
    in ``pass_images_per_s``; otherwise this run's result replaces the earlier one."""
    def key(c: dict[str, Any]) -> tuple:
        return (c.get("entry"), c.get("model"), c.get("dtype"), c.get("batch"))

    if keep_faster:
        earlier_cells = {key(c): c for c in earlier.get("speed", [])}
        report["speed"] = [_fastest([earlier_cells[key(c)], c]) if key(c) in earlier_cells else c
                           for c in report["speed"]]
    measured = {key(c) for c in report["speed"]}
    report["speed"] = [c for c in earlier.get("speed", []) if key(c) not in measured] + report["speed"]
    cold = {key(c) for c in report["cold"]}
    report["cold"] = [c for c in earlier.get("cold", []) if key(c) not in cold] + report["cold"]
    for fw, result in earlier.get("gemm", {}).items():
        report["gemm"].setdefault(fw, result)
    settings, old = report["settings"], earlier.get("settings", {})
    for name in ("models", "batches", "dtypes", "entries", "cold_entries"):
        settings[name] = list(dict.fromkeys(old.get(name, []) + settings[name]))
    for model in settings["models"]:
        report["model_gflops_per_image"][model] = model_flops(model) / 1e9
    report["merged_from"] = {"started": earlier.get("started"), "git_commit": earlier.get("git_commit")}


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, batch 1, float32, few runs, small GEMMs")
    parser.add_argument("--models", type=_split, default=None, help="comma list: S/16,B/16")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in _split(s)], default=None)
    parser.add_argument("--dtypes", type=_split, default=None, help="comma list: float32,bfloat16")
    parser.add_argument("--only", type=_split, default=None,
                        help="entry names or globs (also filters cold-start entries): vitx-torch-*,hf5-*")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-runs", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per cell")
    parser.add_argument("--max-foreign-load", type=float, default=0.3,
                        help="cores other processes may use: wait for quiet before a cell, and measure a cell "
                             "again when they used more meanwhile (0 disables)")
    parser.add_argument("--quiet-timeout", type=float, default=120.0, help="seconds to wait for quiet per cell")
    parser.add_argument("--retries", type=int, default=2, help="extra attempts of a cell disturbed by other processes")
    parser.add_argument("--passes", type=int, default=1,
                        help="measure every cell this many times in fresh processes, pass after pass, and keep "
                             "each cell's fastest (2 on a shared machine: some processes land on a slow state)")
    parser.add_argument("--merge", default=None,
                        help="an earlier report JSON: its cells, GEMM and cold-start rows are kept where this run "
                             "measures nothing in their place (re-measure some cells of a full run)")
    parser.add_argument("--keep-faster", action="store_true",
                        help="with --merge: a cell measured in both runs keeps the faster result (further passes)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench-<time>.json)")
    args = parser.parse_args(argv)

    quick = args.quick
    if quick:  # a smoke test times nothing that matters: never wait for a quiet machine
        args.max_foreign_load = 0.0
    models = args.models or (["tiny"] if quick else DEFAULT_MODELS)
    batches = args.batches or ([1] if quick else DEFAULT_BATCHES)
    dtypes = args.dtypes or (["float32"] if quick else DEFAULT_DTYPES)
    min_runs = args.min_runs or (3 if quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.05 if quick else 3.0)
    max_time = 1.0 if quick else max(20.0, min_time)
    entries = [e for e in ENTRIES.values() if _selected(e.name, args.only)]
    cold_entries = [name for name in COLD if _selected(name, args.only)] if not args.skip_cold else []
    frameworks = sorted({e.framework for e in entries} | {COLD[n][0] for n in cold_entries})

    from .fixtures import ensure_fixtures

    for model in models:
        _log(f"fixtures for {model}: {ensure_fixtures(model)}")

    from vit_core import cpu

    features = cpu.cpu_features()
    earlier = json.loads(pathlib.Path(args.merge).read_text()) if args.merge else None
    if earlier is not None and _host_of(earlier) not in (None, (features.model, features.isa)):
        parser.error(f"--merge {args.merge} was measured on {earlier['machine'].get('host')}, this is "
                     f"{features.describe()}: one report per host kind")
    started = _dt.datetime.now()
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_average_at_start": load_average(),
                    # the CPU model and ISA summary (vit_core.cpu): results of different host kinds never mix
                    "cpu_features": features.summary(), "host": features.describe(),
                    "plans": {fw: {d: cpu.select_paths(features, fw, d).as_dict() for d in dtypes if d in cpu.DTYPES}
                              for fw in cpu.FRAMEWORKS}},
        "settings": {"quick": quick, "models": models, "batches": batches, "dtypes": dtypes,
                     "threads": args.threads, "passes": args.passes, "min_runs": min_runs, "min_time_s": min_time,
                     "max_time_s": max_time, "max_foreign_load": args.max_foreign_load, "entries": [e.name for e in entries], "cold_entries": cold_entries},
        "model_gflops_per_image": {m: model_flops(m) / 1e9 for m in models},
        "gemm": {}, "speed": [], "cold": [],
    }

    if not args.skip_gemm:
        # the engines (ONNX Runtime, OpenVINO) run their own kernels: no framework GEMM rate to measure
        gemm_frameworks = sorted({{"flax": "xla"}.get(f, f) for f in frameworks} - {"engine"})
        for fw in gemm_frameworks:
            _log(f"GEMM throughput: {fw}")
            extra = ["--quick"] if quick else []
            attempts = []
            for _ in range(1 + args.retries):
                if args.max_foreign_load:
                    wait_for_quiet(args.max_foreign_load, args.quiet_timeout)
                attempts.append(run_child("main", "benchmarks.gemm", [fw, "--threads", str(args.threads), *extra],
                                          args.threads, CHILD_TIMEOUT_S))
                foreign = attempts[-1].get("foreign_load_cores")
                if not args.max_foreign_load or foreign is None or foreign < args.max_foreign_load:
                    break
            report["gemm"][fw] = min(attempts, key=lambda r: (r.get("foreign_load_cores") or 0.0))

    for model in models if cold_entries else []:
        for name in cold_entries:
            framework, venv, vitx, _ = COLD[name]
            _log(f"cold start: {name} {model}")
            result = run_child(venv, "benchmarks.worker", ["cold", "--entry", name, "--model", model,
                                                           "--threads", str(args.threads)], args.threads, CHILD_TIMEOUT_S)
            result.update({"entry": name, "framework": framework, "vitx": vitx, "model": model,
                           "cpu": {"model": features.model, "isa": features.isa}})
            report["cold"].append(result)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = started.strftime("bench-%Y%m%d-%H%M%S") + ("-quick" if quick else "")
    json_path = args.out or str(RESULTS_DIR / f"{stem}.json")
    md_path = os.path.splitext(json_path)[0] + ".md"
    cells = [(m, d, b, e) for m in models for d in dtypes for b in batches for e in entries] if not args.skip_speed else []
    measured: dict[tuple, list[dict[str, Any]]] = {}
    markdown = ""
    for speed_pass in range(1, max(1, args.passes) + 1):
        for i, (model, dtype, batch, entry) in enumerate(cells, 1):
            _log(f"[pass {speed_pass}/{args.passes}] [{i}/{len(cells)}] {entry.name} {model} {dtype} batch {batch}")
            # batch 1 is the serving latency cell: enough calls for a p90
            runs = min_runs if quick or batch != 1 else max(min_runs, LATENCY_MIN_RUNS)
            result = _measure_cell(entry, model, dtype, batch, args, runs, min_time, max_time)
            result["cpu"] = {"model": features.model, "isa": features.isa}
            measured.setdefault((entry.name, model, dtype, batch), []).append(result)
            # written after every cell (a long run stopped midway keeps what it measured): each
            # measured cell's fastest pass so far
            report["speed"] = [_fastest(measured[(e.name, m, d, b)]) for m, d, b, e in cells
                               if (e.name, m, d, b) in measured]
            markdown = _write_report(report, args, json_path, md_path, earlier)
    if not cells:
        markdown = _write_report(report, args, json_path, md_path, earlier)
    print(markdown)
    _log(f"wrote {json_path} and {md_path}")
    return 0


def _measure_cell(entry: Any, model: str, dtype: str, batch: int, args: argparse.Namespace, min_runs: int,
                  min_time: float, max_time: float) -> dict[str, Any]:
    """One cell in a fresh process, measured again (up to ``--retries``) while other processes
    used more than ``--max-foreign-load`` cores; the least disturbed attempt."""
    attempts: list[dict[str, Any]] = []
    for _ in range(1 + args.retries):
        quiet = wait_for_quiet(args.max_foreign_load, args.quiet_timeout) if args.max_foreign_load else None
        result = run_child(entry.venv, "benchmarks.worker", [
            "speed", "--entry", entry.name, "--model", model, "--dtype", dtype, "--batch", str(batch),
            "--threads", str(args.threads), "--min-runs", str(min_runs), "--min-time", str(min_time),
            "--max-time", str(max_time)], args.threads, CHILD_TIMEOUT_S)
        result["foreign_load_before_cores"] = quiet
        attempts.append(result)
        foreign = result.get("foreign_load_cores")
        if "error" in result or not args.max_foreign_load or foreign is None or foreign < args.max_foreign_load:
            break
        _log(f"    other processes used {foreign:.2f} cores meanwhile: measuring again")
    result = min(attempts, key=lambda r: (r.get("foreign_load_cores") or 0.0))
    result["attempts"] = len(attempts)
    result.update({"entry": entry.name, "framework": entry.framework, "vitx": entry.vitx,
                   "model": model, "dtype": dtype, "batch": batch})
    if "error" in result:
        _log(f"    error: {result['error'][:300]}")
    else:
        _log(f"    {result['images_per_s']:.2f} img/s, logits diff {result['logits_max_abs_diff']:.1e}, "
             f"foreign load {result.get('foreign_load_cores') or 0:.2f} cores")
    return result


def _fastest(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's result over ``--passes`` fresh processes: the fastest pass without an error (the
    same rule for vitx and peers: a process that landed on a slow state of the shared machine is
    not the library's speed), with every pass's images/s kept in ``pass_images_per_s``."""
    good = [r for r in passes if "error" not in r]
    best = dict(max(good, key=lambda r: r["images_per_s"]) if good else passes[0])
    # a result that is itself the best of earlier passes (--merge --keep-faster) brings their list
    best["pass_images_per_s"] = [x for r in passes for x in r.get("pass_images_per_s", [r.get("images_per_s")])]
    return best


def _write_report(report: dict[str, Any], args: argparse.Namespace, json_path: str, md_path: str,
                  earlier: dict[str, Any] | None) -> str:
    """Evaluate, render and write the JSON + markdown (and latest.* for a default --out); the
    markdown. ``earlier``: the --merge report, merged into ``report`` first."""
    if earlier is not None:
        _merge(report, earlier, keep_faster=args.keep_faster)
    report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    report["machine"]["load_average_at_end"] = load_average()
    report.update(evaluate(report))
    markdown = render_markdown(report)
    from vit_core.config import write_text_atomic

    for path, text in ((json_path, json.dumps(report, indent=1)), (md_path, markdown)):
        write_text_atomic(pathlib.Path(path), text)
    if args.out is None:
        for name, text in (("latest.json", json.dumps(report, indent=1)), ("latest.md", markdown)):
            write_text_atomic(RESULTS_DIR / name, text)
    return markdown

if __name__ == "__main__":
    sys.exit(main())
