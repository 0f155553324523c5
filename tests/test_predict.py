"""``vitx predict`` (issue #12): one row per input in a stable order, error rows, jsonl and parquet,
embeddings, shards, resume (after a SIGKILL too), bad arguments, three frameworks, Ray Data."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from conversion.cli import main
from conversion.frameworks import FRAMEWORKS, unavailable
from conversion.predict import PredictOptions, iter_inputs, predict, read_rows
from vit_core import ViTConfig

from .cases import seeded_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "fixtures" / "images"
AVAILABLE = [f for f in FRAMEWORKS if unavailable(f) is None]
LABELS = ["cat", "dog", "owl", "fox", "elk"]
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)))

pytestmark = pytest.mark.skipif("torch" not in AVAILABLE, reason="needs torch")


def _save(directory: pathlib.Path, task: str, **overrides: Any) -> pathlib.Path:
    from vit_core.checkpoint.files import save_state_dict
    from vit_core.image_processing import ViTImageProcessor

    config = ViTConfig(**{**CONFIG, **overrides})
    config.save_pretrained(directory)
    save_state_dict(seeded_state(config, task, seed=3), directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.45, 0.5]).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return _save(tmp_path_factory.mktemp("predict") / "tiny-vit", "classification")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """photos/: the fixture photos, b/ with a nested folder, an unreadable .png, a text file (not walked)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    for photo in sorted(PHOTOS.glob("*.*g")):
        shutil.copy(photo, root / photo.name)
    (root / "b" / "deep").mkdir(parents=True)
    with Image.open(PHOTOS / "chelsea.png") as im:
        im.convert("RGB").resize((50, 40)).save(root / "b" / "deep" / "small.jpg", quality=80)
        im.convert("L").save(root / "b" / "gray.png")
    (root / "b" / "broken.png").write_bytes(b"not a png at all")
    (root / "b" / "notes.txt").write_text("not an input\n")
    return root


def expected_order(root: pathlib.Path) -> list[str]:
    return [str(root / n) for n in ("astronaut.png", "b/broken.png", "b/deep/small.jpg", "b/gray.png", "camera.png",
                                    "chelsea.png", "coffee.png", "rocket.jpg")]


def run(checkpoint: pathlib.Path, inputs: list[Any], output: pathlib.Path, **options: Any) -> Any:
    options.setdefault("workers", 0)
    options.setdefault("progress", False)
    return predict(PredictOptions(str(checkpoint), [str(i) for i in inputs], str(output), **options))


def test_rows_match_the_pipeline_in_a_stable_order(checkpoint: pathlib.Path, images: pathlib.Path,
                                                   tmp_path: pathlib.Path) -> None:
    from conversion.pipeline import pipeline

    out = tmp_path / "rows.jsonl"
    result = run(checkpoint, [images], out, batch_size=3, top_k=3, workers=2)
    rows = read_rows(out)
    assert [row["path"] for row in rows] == expected_order(images)  # folders recursive, sorted per folder, .txt not walked
    assert (result.written, result.errors, result.skipped) == (8, 1, 0)
    broken = rows[1]
    assert set(broken) == {"path", "error"} and "broken.png" in broken["error"] and "not an image" in broken["error"]

    good = [row for row in rows if "error" not in row]
    classify = pipeline("image-classification", model=str(checkpoint), top_k=3)
    for row, theirs in zip(good, classify([row["path"] for row in good])):
        assert set(row) == {"path", "label", "score", "top_k"}
        assert [label for label, _ in row["top_k"]] == [p["label"] for p in theirs]
        np.testing.assert_allclose([s for _, s in row["top_k"]], [p["score"] for p in theirs], rtol=0, atol=1e-6)
        assert (row["label"], row["score"]) == tuple(row["top_k"][0])
        assert abs(sum(score for _, score in row["top_k"])) <= 1.0 and row["score"] >= row["top_k"][-1][1]
    # the same rows from the main process alone and from another batch size
    again = tmp_path / "again.jsonl"
    run(checkpoint, [images], again, batch_size=8, top_k=3, workers=0)
    for a, b in zip(rows, read_rows(again)):
        assert a.keys() == b.keys() and a["path"] == b["path"] and a.get("label") == b.get("label")
        if "score" in a:
            np.testing.assert_allclose([s for _, s in a["top_k"]], [s for _, s in b["top_k"]], rtol=0, atol=1e-6)


def test_embeddings_and_parquet(checkpoint: pathlib.Path, images: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from conversion.pipeline import pipeline

    jsonl, parquet = tmp_path / "e.jsonl", tmp_path / "e.parquet"
    run(checkpoint, [images], jsonl, batch_size=4, embeddings=True, top_k=2)
    rows = read_rows(jsonl)
    good = [row for row in rows if "error" not in row]
    features = pipeline("image-feature-extraction", model=str(checkpoint))([row["path"] for row in good])
    for row, feature in zip(good, features):
        assert len(row["embedding"]) == 32
        np.testing.assert_allclose(row["embedding"], feature[0][0], rtol=0, atol=1e-5)  # final-layernormed CLS

    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    run(checkpoint, [images], parquet, batch_size=4, embeddings=True, top_k=2)
    assert not (tmp_path / "e.parquet.partial.jsonl").exists() and not list(tmp_path.glob(".e.parquet*"))
    table = pq.read_table(parquet)
    assert table.num_rows == 8 and table.schema.field("embedding").type.value_type == "float"
    assert read_rows(parquet) == rows  # the same rows, float32 embeddings stored exactly


def test_text_file_input_and_missing_listed_file(checkpoint: pathlib.Path, images: pathlib.Path,
                                                 tmp_path: pathlib.Path) -> None:
    listing = images / "b" / "list.txt"  # relative paths are relative to the list's folder
    listing.write_text(f"# a comment\n\ngray.png\n{images / 'rocket.jpg'}\nmissing.jpg\ndeep\n")
    try:
        assert list(iter_inputs([str(listing)])) == [str(images / "b" / "gray.png"), str(images / "rocket.jpg"),
                                                      str(images / "b" / "missing.jpg"),
                                                      str(images / "b" / "deep" / "small.jpg")]
        out = tmp_path / "list.jsonl"
        run(checkpoint, [listing, images / "camera.png"], out, batch_size=2)
        rows = read_rows(out)
    finally:
        listing.unlink()
    assert [pathlib.Path(r["path"]).name for r in rows] == ["gray.png", "rocket.jpg", "missing.jpg", "small.jpg",
                                                            "camera.png"]
    assert "does not exist" in rows[2]["error"] and all("label" in r for i, r in enumerate(rows) if i != 2)


def test_shards_partition_the_inputs(checkpoint: pathlib.Path, images: pathlib.Path, tmp_path: pathlib.Path) -> None:
    full = expected_order(images)
    seen = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        assert main(["-q", "predict", str(checkpoint), str(images), "--output", str(out), "--shard", f"{i}/3",
                     "--workers", "0"]) == 0
        paths = [row["path"] for row in read_rows(out)]
        assert paths == full[i::3]
        seen += paths
    assert sorted(seen) == sorted(full)


def test_resume_cuts_a_partial_line_and_adds_no_duplicates(checkpoint: pathlib.Path, images: pathlib.Path,
                                                           tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    whole = tmp_path / "whole.jsonl"
    run(checkpoint, [images], whole, batch_size=2)
    lines = whole.read_bytes().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    out.write_bytes(b"".join(lines[:5]) + lines[5][:25])  # five rows and a line a kill cut short
    assert main(["predict", str(checkpoint), str(images), "--output", str(out), "--workers", "0"]) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    result = run(checkpoint, [images], out, batch_size=2, resume=True)
    assert (result.skipped, result.written) == (4, 4)  # the batch of rows 5-6 is redone whole
    assert out.read_bytes() == whole.read_bytes()
    again = run(checkpoint, [images], out, batch_size=2, resume=True)  # complete: nothing to do
    assert (again.skipped, again.written) == (8, 0) and out.read_bytes() == whole.read_bytes()
    # another input set or shard than the file was written for is refused
    assert main(["-q", "predict", str(checkpoint), str(images / "rocket.jpg"), "--output", str(out), "--resume"]) == 2
    assert "written for other inputs" in capsys.readouterr().err

    pytest.importorskip("pyarrow")
    parquet = tmp_path / "resumed.parquet"  # parquet resumes from its jsonl journal
    (tmp_path / "resumed.parquet.partial.jsonl").write_bytes(b"".join(lines[:6]) + b'{"path": "x')
    result = run(checkpoint, [images], parquet, batch_size=2, resume=True)
    assert (result.skipped, result.written) == (6, 2) and read_rows(parquet) == read_rows(whole)
    assert run(checkpoint, [images], parquet, resume=True).written == 0
    assert main(["-q", "predict", str(checkpoint), str(images), "--output", str(parquet), "--workers", "0"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--top-k", "-1"], "--top-k must be a positive integer"),
    (["--workers", "-2"], "--workers must be an integer >= 0"),
    (["--output", "rows.csv"], "expected a .jsonl or .parquet"),
    (["--shard", "3/3"], "0 <= I < N"),
    (["--shard", "1-3"], "expected I/N"),
    (["--framework", "caffe"], "invalid choice"),
    (["MISSING"], "does not exist"),
])
def test_bad_arguments_exit_2(args: list[str], message: str, checkpoint: pathlib.Path, images: pathlib.Path,
                              tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    inputs = [str(images)] + ([str(tmp_path / "nope.png")] if args == ["MISSING"] else [])
    args = [str(tmp_path / a) if a.endswith(".csv") else a for a in args if a != "MISSING"]
    argv = ["predict", str(checkpoint), *inputs, "--output", str(tmp_path / "o.jsonl"), "--workers", "0", *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_checkpoint_without_a_head(tmp_path: pathlib.Path, images: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    from conversion.pipeline import pipeline

    base = _save(tmp_path / "base", "base", num_labels=2, id2label=None)
    out = tmp_path / "base.jsonl"
    assert main(["predict", str(base), str(images / "rocket.jpg"), "--output", str(out), "--workers", "0"]) == 2
    assert "no classifier head" in capsys.readouterr().err and not out.exists()
    run(base, [images / "rocket.jpg", images / "b" / "broken.png"], out, embeddings=True)
    rows = read_rows(out)
    assert set(rows[0]) == {"path", "embedding"} and set(rows[1]) == {"path", "error"}
    feature = pipeline("image-feature-extraction", model=str(base))(str(images / "rocket.jpg"))
    np.testing.assert_allclose(rows[0]["embedding"], feature[0][0], rtol=0, atol=1e-5)


@pytest.mark.skipif(len(AVAILABLE) < 3, reason="needs torch, tf and flax")
def test_three_frameworks_give_the_same_labels(checkpoint: pathlib.Path, images: pathlib.Path,
                                               tmp_path: pathlib.Path) -> None:
    results = {}
    for framework in FRAMEWORKS:
        out = tmp_path / f"{framework}.jsonl"
        run(checkpoint, [images], out, framework=framework, batch_size=4, top_k=5, embeddings=True)
        results[framework] = read_rows(out)
    torch_rows = results["torch"]
    for framework in ("tf", "flax"):
        for a, b in zip(torch_rows, results[framework], strict=True):
            assert a["path"] == b["path"] and a.get("label") == b.get("label") and a.get("error") == b.get("error")
            if "top_k" in a:
                assert [label for label, _ in a["top_k"]] == [label for label, _ in b["top_k"]]
                np.testing.assert_allclose([s for _, s in a["top_k"]], [s for _, s in b["top_k"]], rtol=0, atol=1e-5)
                np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=0, atol=1e-4)


def assert_same_rows(rows: list[dict], expected: list[dict], atol: float) -> None:
    """The same paths, keys, labels and errors in the same order; scores and embeddings to ``atol``."""
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    for a, b in zip(rows, expected):
        assert a.keys() == b.keys() and a.get("label") == b.get("label") and a.get("error") == b.get("error"), a["path"]
        if "top_k" in a:
            assert [label for label, _ in a["top_k"]] == [label for label, _ in b["top_k"]]
            np.testing.assert_allclose([s for _, s in a["top_k"]], [s for _, s in b["top_k"]], rtol=0, atol=atol)
        if "embedding" in a:
            np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=0, atol=atol * 10)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_killed_run_resumes_to_the_uninterrupted_rows(checkpoint: pathlib.Path, images: pathlib.Path,
                                                      tmp_path: pathlib.Path) -> None:
    """SIGKILL after the first rows are on disk, then --resume: every input exactly once, the same rows.
    The inputs come through a FIFO list, so the run is provably mid-way (waiting for more paths) when killed."""
    paths = [str(p) for p in sorted(images.rglob("*")) if p.is_file() and p.suffix != ".txt"] * 4  # 32 rows
    listing = tmp_path / "all.txt"
    listing.write_text("".join(p + "\n" for p in paths))
    whole = tmp_path / "whole.jsonl"
    run(checkpoint, [listing], whole, batch_size=2)

    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "conversion.cli", "-q", "predict", str(checkpoint), str(fifo), "--output", str(out),
               "--batch-size", "2", "--workers", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait (bounded) for predict to open the list for reading
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # ENXIO: no reader yet
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "predict did not open its input list in 120 s"
                time.sleep(0.05)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w") as f:
            f.write("".join(p + "\n" for p in paths[:12]))
            f.flush()
            while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "no rows on disk after 120 s"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # predict and its decoding worker, mid-run
            proc.wait(timeout=30)
    except BrokenPipeError:  # pragma: no cover - the process died early: the asserts below say why
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    kept = out.read_bytes().count(b"\n")
    assert 2 <= kept < len(paths)

    done = subprocess.run([sys.executable, "-m", "conversion.cli", "-q", "predict", str(checkpoint), str(listing),
                           "--output", str(out), "--batch-size", "2", "--workers", "1", "--resume"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out)
    assert [row["path"] for row in rows] == paths  # every input exactly once, in order
    assert rows == read_rows(whole)


RAY_SCRIPT = """
import json, sys
import ray
from conversion.predict import PredictOptions, predict
checkpoint, images, tmp = sys.argv[1:4]
common = dict(batch_size=3, embeddings=True, ray=True, workers=2, progress=False)
# 1. vitx predict --ray on its own: ray.init() starts a local instance (127.0.0.1, no dashboard), shut down after
first = predict(PredictOptions(checkpoint, [images], tmp + "/self.jsonl", **common))
assert not ray.is_initialized()
# 2. on a cluster the caller started (the CI instance: 2 CPUs), left running
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
         configure_logging=False)
second = predict(PredictOptions(checkpoint, [images], tmp + "/ray.jsonl", **common))
assert ray.is_initialized()
ray.shutdown()
print("RESULT " + json.dumps([first.written, first.errors, second.written, second.errors]))
"""


def test_ray_rows_equal_the_single_process_rows(checkpoint: pathlib.Path, images: pathlib.Path,
                                                tmp_path: pathlib.Path) -> None:
    """--ray on a local instance it starts itself and on one started with ray.init(num_cpus=2), in a
    subprocess bounded in time (its process group, Ray's processes included, is killed on a timeout)."""
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    local = tmp_path / "local.jsonl"
    run(checkpoint, [images], local, batch_size=3, embeddings=True)
    proc = subprocess.Popen([sys.executable, "-c", RAY_SCRIPT, str(checkpoint), str(images), str(tmp_path)], cwd=ROOT,
                            env={**_env(), "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert json.loads(line[len("RESULT "):]) == [8, 1, 8, 1]
    expected = read_rows(local)
    for name in ("self.jsonl", "ray.jsonl"):
        assert_same_rows(read_rows(tmp_path / name), expected, atol=1e-6)  # a 1-CPU actor's torch: last-ulp sums


def test_multi_label_scores_are_sigmoids_as_the_pipeline(tmp_path: pathlib.Path, images: pathlib.Path) -> None:
    from conversion.pipeline import pipeline

    multi = _save(tmp_path / "multi", "classification", problem_type="multi_label_classification")
    out = tmp_path / "multi.jsonl"
    photos = [images / "rocket.jpg", images / "camera.png"]
    run(multi, photos, out, top_k=5)
    theirs = pipeline("image-classification", model=str(multi), top_k=5)([str(p) for p in photos])
    for row, expected in zip(read_rows(out), theirs):
        assert [label for label, _ in row["top_k"]] == [p["label"] for p in expected]
        np.testing.assert_allclose([s for _, s in row["top_k"]], [p["score"] for p in expected], rtol=0, atol=1e-6)
        assert sum(s for _, s in row["top_k"]) > 1.0  # five sigmoids, not a softmax


def test_folder_walk_survives_symlink_loops_and_unlistable_folders(tmp_path: pathlib.Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink back up the tree is not walked twice (no endless recursion); a symlinked data folder
    outside the tree is followed once; a folder that cannot be listed becomes an input of its own
    (an error row), not a crash; the order stays sorted per folder."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    for path in (root / "a" / "x.jpg", root / "b.png", outside / "y.jpg"):
        path.write_bytes(b"not decoded here")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "c-data").symlink_to(outside, target_is_directory=True)
    (root / "d-again").symlink_to(outside, target_is_directory=True)
    walked = list(iter_inputs([str(root)]))
    assert walked == [str(root / "a" / "x.jpg"), str(root / "b.png"), str(root / "c-data" / "y.jpg")]
    locked = root / "e-locked"
    locked.mkdir()
    scandir = os.scandir

    def refusing(path: Any) -> Any:  # chmod 0 does not stop root: refuse the listing here instead
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    assert list(iter_inputs([str(root)])) == walked + [str(locked)]
