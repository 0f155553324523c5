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

    rows = report["gemm"]["torch"]["rows"]
    assert {(r["method"], r["dtype"]) for r in rows} == {
        ("linear", "float32"), ("linear", "bfloat16"), ("mkldnn_prepacked", "float32"), ("mkldnn_prepacked", "bfloat16")}
    assert all(r["gflops"] > 0 for r in rows)
    assert report["ceilings"]["machine_float32_gflops"] > 0

    (cell,) = report["speed"]
    assert (cell["entry"], cell["model"], cell["dtype"], cell["batch"]) == ("vitx-torch-sdpa", "tiny", "float32", 1)
    assert cell["images_per_s"] > 0 and cell["median_s"] > 0 and cell["runs"] >= 3
    assert cell["peak_rss_mb"] > 0 and cell["gflops"] > 0 and 0 < cell["mfu"]
    assert len(cell["load_average_before"]) == 3 and len(cell["load_average_after"]) == 3
    # the harness checks every cell against the float64 reference: a real number, within bounds
    assert cell["logits_max_abs_diff"] <= 1e-5 and cell["top1_matches_reference"] is True

    (cold,) = report["cold"]
    assert cold["entry"] == "vitx-torch"
    for key in ("import_s", "from_pretrained_s", "first_call_s", "time_to_first_logits_s", "process_wall_s", "peak_rss_mb"):
        assert cold[key] > 0, key
    assert cold["logits_max_abs_diff"] <= 1e-5
