"""The benchmark harness's quick mode runs end to end for vitx-torch (issue #6): times nothing,
checks that the JSON report carries every field the full run reports."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_the_report(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "vitx-torch-sdpa,vitx-torch", "--threads", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").exists()
    assert "| **vitx-torch-sdpa** |" in done.stdout  # the markdown table is printed

    for key in ("started", "finished", "machine", "settings", "gemm", "speed", "cold", "ceilings",
                "below_target", "errors", "model_gflops_per_image"):
        assert key in report, key
    assert report["errors"] == [], report["errors"]
    assert len(report["machine"]["load_average_at_start"]) == 3
    # the CPU model and ISA summary (vit_core.cpu) and the paths chosen for it, with every result
    from vit_core import cpu

    features = cpu.cpu_features()
    assert report["machine"]["cpu_features"]["isa"] == features.isa in cpu.ISA_LEVELS
    assert report["machine"]["host"] == features.describe() and f"on {features.describe()}" in done.stdout
    assert report["machine"]["plans"]["torch"]["float32"] == cpu.select_paths(features, "torch", "float32").as_dict()
    assert "## Speed paths chosen for this CPU" in done.stdout

    import torch

    rows = report["gemm"]["torch"]["rows"]
    # oneDNN's bfloat16 GEMM exists on AVX-512 / AMX CPUs only (not on an AVX2 host)
    bf16_onednn = {("mkldnn_prepacked", "bfloat16")} if torch.ops.mkldnn._is_mkldnn_bf16_supported() else set()
    assert {(r["method"], r["dtype"]) for r in rows} == {
        ("linear", "float32"), ("linear", "bfloat16"), ("mkldnn_prepacked", "float32")} | bf16_onednn
    assert all(r["gflops"] > 0 for r in rows)
    assert report["ceilings"]["machine_float32_gflops"] > 0

    (cell,) = report["speed"]
    assert (cell["entry"], cell["model"], cell["dtype"], cell["batch"]) == ("vitx-torch-sdpa", "tiny", "float32", 1)
    assert cell["images_per_s"] > 0 and cell["median_s"] > 0 and cell["runs"] >= 3
    assert cell["peak_rss_mb"] > 0 and cell["gflops"] > 0 and 0 < cell["mfu"]
    assert len(cell["load_average_before"]) == 3 and len(cell["load_average_after"]) == 3
    # the harness checks every cell against the float64 reference: a real number, within bounds
    assert cell["logits_max_abs_diff"] <= 1e-5 and cell["top1_matches_reference"] is True
    assert cell["cpu"] == {"model": features.model, "isa": features.isa}
    assert cell["plan"] == cpu.current_plan("torch", "float32").as_dict()
    # batch-1 latency: p50 / p90 of the timed calls, in ms, in the JSON and the table
    latency = cell["latency_ms"]
    times = sorted(t * 1e3 for t in cell["times_s"])
    assert times[0] <= latency["p50"] <= latency["p90"] <= times[-1]
    assert "## Batch-1 latency (ms per call, p50 / p90)" in done.stdout
    assert f"| **vitx-torch-sdpa** | {latency['p50']:.1f} / {latency['p90']:.1f} |" in done.stdout

    (cold,) = report["cold"]
    assert cold["entry"] == "vitx-torch"
    for key in ("import_s", "from_pretrained_s", "first_call_s", "time_to_first_logits_s", "process_wall_s", "peak_rss_mb"):
        assert cold[key] > 0, key
    assert cold["logits_max_abs_diff"] <= 1e-5


def test_peak_rss_is_the_cells_own_not_its_parents() -> None:
    """A cell's process is started by a larger harness: its peak RSS must be its own (Linux's
    ru_maxrss of a fork + exec child reads the parent's peak when that is larger)."""
    code = ("import subprocess, sys\n"
            "block = bytearray(700 * 1024 * 1024)\n"
            "for i in range(0, len(block), 4096): block[i] = 1\n"
            "child = 'from benchmarks.common import peak_rss_mb; print(peak_rss_mb())'\n"
            "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    child = float(done.stdout.split()[-1])
    assert 5 < child < 300, child  # a bare interpreter and numpy-free module: tens of MiB, not the parent's 700+


def test_merge_keeps_the_faster_pass_of_a_cell_measured_twice() -> None:
    from benchmarks.run import _merge

    def cell(entry: str, batch: int, ips: float, **extra):
        return dict(entry=entry, model="B/16", dtype="float32", batch=batch, images_per_s=ips, **extra)

    def settings():
        return {"models": ["B/16"], "batches": [1, 8], "dtypes": ["float32"], "entries": ["a", "b"], "cold_entries": []}

    earlier = {"speed": [cell("a", 1, 10.0, pass_images_per_s=[9.0, 10.0]), cell("b", 1, 5.0), cell("a", 8, 7.0)],
               "cold": [], "gemm": {}, "settings": settings()}
    report = {"speed": [cell("a", 1, 8.0, pass_images_per_s=[8.0]), cell("b", 1, 6.0, pass_images_per_s=[6.0])],
              "cold": [], "gemm": {}, "settings": settings(), "model_gflops_per_image": {}}
    _merge(report, earlier, keep_faster=True)
    got = {(c["entry"], c["batch"]): c for c in report["speed"]}
    assert got[("a", 1)]["images_per_s"] == 10.0 and got[("a", 1)]["pass_images_per_s"] == [9.0, 10.0, 8.0]
    assert got[("b", 1)]["images_per_s"] == 6.0 and got[("b", 1)]["pass_images_per_s"] == [5.0, 6.0]
    assert got[("a", 8)]["images_per_s"] == 7.0  # measured only earlier: kept as it was
    assert len(report["speed"]) == 3

    replaced = {"speed": [cell("a", 1, 8.0)], "cold": [], "gemm": {}, "settings": settings(),
                "model_gflops_per_image": {}}
    _merge(replaced, earlier)  # without keep_faster this run's result replaces the earlier one
    assert {(c["entry"], c["batch"]): c["images_per_s"] for c in replaced["speed"]}[("a", 1)] == 8.0


def test_merge_refuses_a_report_of_another_host_kind(tmp_path: pathlib.Path) -> None:
    """One report (and one RESULTS table) per host kind: --merge of a report measured on another
    CPU is a usage error naming both hosts."""
    from benchmarks.run import _host_of

    earlier = {"machine": {"host": "Intel Xeon, AMX", "cpu_features": {"model": "Intel Xeon", "isa": "amx"}},
               "speed": [], "cold": [], "gemm": {}, "settings": {}}
    assert _host_of(earlier) == ("Intel Xeon", "amx") and _host_of({"machine": {}}) is None
    path = tmp_path / "other.json"
    path.write_text(json.dumps(earlier))
    env = {**__import__("os").environ, "VITX_CPU_FEATURES": "avx2"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--skip-gemm", "--skip-cold",
                           "--skip-speed", "--merge", str(path), "--out", str(tmp_path / "x.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "one report per host kind" in done.stderr and "Intel Xeon, AMX" in done.stderr


def test_gemm_bound_is_the_framework_rate_at_the_models_own_shape() -> None:
    from benchmarks.common import mlp_gemm_shape, model_flops
    from benchmarks.report import gemm_bound

    assert mlp_gemm_shape("B/16", 8) == (1576, 768, 3072) and mlp_gemm_shape("S/16", 1) == (197, 384, 1536)
    gemm = {"xla": {"rows": [
        dict(method="dot", dtype="float32", shape=[1576, 768, 3072], gflops=350.0),
        dict(method="dot", dtype="bfloat16", shape=[1576, 768, 3072], gflops=300.0),
        dict(method="dot_f32_result", dtype="bfloat16", shape=[1576, 768, 3072], gflops=700.0),
        dict(method="dot", dtype="float32", shape=[197, 768, 3072], gflops=320.0)]}}
    cell = dict(framework="flax", model="B/16", dtype="float32", batch=8)
    assert abs(gemm_bound(gemm, cell) - 350e9 / model_flops("B/16")) < 1e-9
    # bfloat16: the best method at that shape
    assert abs(gemm_bound(gemm, dict(cell, dtype="bfloat16")) - 700e9 / model_flops("B/16")) < 1e-9
    assert gemm_bound(gemm, dict(cell, batch=32)) is None  # shape not measured
    assert gemm_bound(gemm, dict(cell, framework="tf")) is None


def test_quick_training_benchmark_writes_the_report(tmp_path: pathlib.Path) -> None:
    """``python -m benchmarks.train --quick`` times a step per entry, checks the first step's loss
    against the float64 reference, pairs peak RSS with and without gradient checkpointing, and
    compares vitx with the fastest peer of its framework."""
    out = tmp_path / "train.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--quick", "--only", "vitx-torch-train,hf4-torch-train",
         "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").exists()
    assert "| **vitx-torch-train** |" in done.stdout
    assert report["machine"]["cpu_features"]["isa"] in ("amx", "avx512_bf16", "avx512", "avx2", "other")
    assert f"on {report['machine']['host']}" in done.stdout
    assert report["errors"] == [], report["errors"]
    cells = {(c["entry"], c["checkpointing"]): c for c in report["cells"]}
    assert set(cells) == {("vitx-torch-train", False), ("hf4-torch-train", False),
                          ("vitx-torch-train", True), ("hf4-torch-train", True)}
    for cell in cells.values():
        assert (cell["model"], cell["dtype"], cell["batch"]) == ("tiny", "float32", 4)
        assert cell["images_per_s"] > 0 and cell["steps"] >= 4 and cell["peak_rss_mb"] > 0
        # same weights, images and labels: the first step's loss is the float64 reference's
        assert cell["first_loss_rel_diff"] <= 1e-5, cell
        assert cell["last_loss"] < cell["first_loss"]  # the steps train
    (ratio,) = report["ratios"]
    assert (ratio["vitx_entry"], ratio["peer_entry"]) == ("vitx-torch-train", "hf4-torch-train")
    assert ratio["ratio"] == cells[("vitx-torch-train", False)]["images_per_s"] / cells[("hf4-torch-train", False)]["images_per_s"]
    assert {m["entry"] for m in report["memory"]} == {"vitx-torch-train", "hf4-torch-train"}


def test_predict_benchmark_quick_mode_checks_labels_against_the_pipeline(tmp_path: pathlib.Path) -> None:
    """benchmarks/predict.py (issue #12): vitx predict and transformers' pipeline on the same generated
    JPEGs with the same labels, the image processors, vitx predict's peak RSS; times nothing meaningful."""
    pytest.importorskip("transformers")
    out = tmp_path / "predict.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.predict", "--quick", "--only", "vitx,pipeline,processors",
                           "--rss", "16", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["model"], report["images"], report["batch_size"]) == ("tiny", 24, 4)
    for name in ("vitx", "pipeline"):
        entry = report["entries"][name]
        assert "error" not in entry, entry
        assert entry["images_per_s"] > 0 and entry["peak_rss_mib"] > 0
    assert report["entries"]["vitx"]["errors"] == 0
    labels = report["checks"]["labels_vitx_vs_pipeline"]
    assert labels["images"] == 24 and labels["same_length"] and labels["mismatches"] == 0
    assert labels["same_label"] + labels["ties"] == 24 and report["checks"]["speedup_vs_pipeline"] > 0

    processors = report["entries"]["processors"]
    for name in ("vitx-slow", "vitx-fast", "transformers-slow"):
        assert processors[name]["images_per_s"] > 0 and processors[name]["images"] == 24, processors[name]
    assert processors["vitx-slow"]["max_abs_diff_vs_transformers_slow"] == 0.0  # the same pixels as transformers
    assert processors["vitx-fast"]["max_abs_diff_vs_transformers_slow"] <= 1 / 127.5 + 1e-6  # one uint8 step at most
    assert "images_per_s" in processors["transformers-fast"] or "error" in processors["transformers-fast"]

    (rss,) = report["rss"]
    assert rss["images"] == rss["rows"] == 16
    assert 0 < rss["worker_peak_rss_mib"] < rss["main_peak_rss_mib"] <= rss["total_peak_rss_mib"]

    helped = subprocess.run([sys.executable, "-m", "benchmarks.predict", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "quiet machine" in helped.stdout and "--images" in helped.stdout
def test_quick_engine_benchmark_rows(tmp_path: pathlib.Path) -> None:
    """The engine peers (issue #13) and vit_torch's native int8 run in quick mode: each float32 row
    within the float32 bound of the float64 reference, each int8 row within the untrained fixture's
    int8 bound (logit cosine >= 0.99), the export baseline row present; a row asked for a
    precision it has not is marked unsupported, not failed."""
    for module in ("onnxruntime", "openvino", "nncf", "onnxscript"):
        pytest.importorskip(module)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--dtypes", "float32,int8", "--skip-gemm", "--skip-cold",
         "--only", "vitx-torch-int8-*,ort-*,ov-fp32,ov-int8-*,hf4-onnx-ort", "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    cells = {(c["entry"], c["dtype"]): c for c in report["speed"]}
    ran = {k for k, c in cells.items() if "error" not in c}
    assert ran == {(e, "float32") for e in ("ort-fp32", "ort-fp32-optimized", "ov-fp32", "hf4-onnx-ort")} | \
        {(e, "int8") for e in ("vitx-torch-int8-dynamic", "vitx-torch-int8-static", "ort-int8-dynamic",
                               "ort-int8-static", "ov-int8-static", "ov-int8-dynamic")}
    assert all(c.get("unsupported") for k, c in cells.items() if k not in ran)
    for (entry, dtype), cell in cells.items():
        if (entry, dtype) not in ran:
            continue
        assert cell["images_per_s"] > 0 and cell["framework"] == ("torch" if entry.startswith("vitx") else "engine")
        if dtype == "float32":
            assert cell["logits_max_abs_diff"] <= 1e-5 and cell["top1_matches_reference"], cell
        else:
            assert cell["logits_cosine"] >= 0.99 and cell["logits_max_abs_diff"] > 1e-5, cell
    assert not [b for b in report["below_target"] if "cosine" in b["target"] or "within" in b["target"]]


def test_predict_checkpoint_replaces_a_dangling_link(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link left by another checkout (its target gone) is replaced, not a FileExistsError."""
    from benchmarks import fixtures, predict

    source = tmp_path / "tiny"
    source.mkdir()
    for name in ("config.json", "model.safetensors", "timm.safetensors"):
        (source / name).write_text(name)
    monkeypatch.setattr(fixtures, "ensure_fixtures", lambda model: source)
    monkeypatch.setattr(predict, "CACHE_DIR", tmp_path / "cache")
    stale = tmp_path / "cache" / "predict-tiny"
    stale.mkdir(parents=True)
    (stale / "config.json").symlink_to(tmp_path / "gone" / "config.json")
    directory = predict.ensure_checkpoint("tiny")
    assert (directory / "config.json").read_text() == "config.json"
    assert (directory / "model.safetensors").resolve() == (source / "model.safetensors").resolve()


def test_kernel_bound_prices_every_product_of_the_forward_pass_on_vitx_sub_batches() -> None:
    from benchmarks.common import model_flops
    from benchmarks.kernel_bound import CHUNK_ROWS, flops, products, sub_batches
    from vit_torch import layers as torch_layers

    assert CHUNK_ROWS == torch_layers.INFERENCE_CHUNK_ROWS
    assert sub_batches(32, 197) == [10, 10, 10, 2] and sub_batches(8, 197) == [8]
    assert sub_batches(32, 197, chunked=False) == [32] and sub_batches(1, 197) == [1]
    for model in ("S/16", "B/16"):
        for batch in (1, 8, 32):
            for chunked in (True, False):
                for fused in (True, False):
                    total = sum(flops(p) * p["count"] for p in products(model, batch, chunked, fused))
                    # the same FLOPs as benchmarks.common.model_flops counts, however the batch is split
                    assert abs(total - batch * model_flops(model)) <= 1e-9 * total, (model, batch, chunked, fused)
    b8 = {p["name"]: p for p in products("B/16", 8)}
    assert b8["q/k/v projection (fused)"]["shape"] == [1576, 768, 2304] and b8["MLP in"]["count"] == 12
    assert b8["attention q.k^T"]["shape"] == [96, 197, 64, 197]
    assert b8["attention probs.v"]["shape"] == [96, 197, 197, 64]
    # batch 32: three sub-batches of 10 images and one of 2, 12 layers each; q, k, v apart: 3 per layer
    qkv = [(p["shape"], p["count"]) for p in products("B/16", 32, fused_qkv=False) if p["name"] == "q/k/v projections"]
    assert qkv == [([1970, 768, 768], 108), ([394, 768, 768], 36)]


def test_quick_kernel_bound_emits_a_bound() -> None:
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_bound", "torch", "--model", "tiny", "--batch",
                           "2", "--quick", "--weights", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.split("BENCH_RESULT ", 1)[1])
    assert result["bound_images_per_s"] > 0 and result["plan"]["framework"] == "torch" and result["host"]
    assert all(r["seconds"] > 0 and r["gflops"] > 0 for r in result["rows"])
    assert abs(result["seconds_per_batch"] - sum(r["seconds"] * r["count"] for r in result["rows"])) < 1e-12
    assert abs(result["bound_images_per_s"] - 2 / result["seconds_per_batch"]) < 1e-9 * result["bound_images_per_s"]
