"""Hostile files and faults against the checkpoint layer and the CLI (numpy-only where possible).

Each test builds the hostile file or injects the fault itself. Container-specific payloads
(pickles, HDF5 links, msgpack records) live in tests/test_container_*.py; this file covers the
safetensors and index checks, staging (kills at every rename, concurrent writers, ``--force``),
save_pretrained atomicity, write failures, file modes and the CLI's exit codes.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vit_core import ViTConfig
from vit_core.checkpoint import CheckpointError, read_state_dict, staging
from vit_core.checkpoint import safetensors as st
from vit_core.pretrained import load_pretrained, save_pretrained
from vit_core.weights import weight_table

from .cases import TINY, seeded_state

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ViTConfig(**dict(TINY, num_labels=3))


def checkpoint(directory: pathlib.Path, seed: int = 0, labels: tuple[str, ...] = ("a", "b", "c")) -> pathlib.Path:
    config = ViTConfig.from_dict(CONFIG.to_dict(), id2label=dict(enumerate(labels)))
    save_pretrained(config, seeded_state(config, "classification", seed=seed), directory)
    return directory


def vitx(*args: str, cwd: pathlib.Path | None = None, **kwargs) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "conversion.cli", "--quiet", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120, **kwargs)


def load(path: pathlib.Path) -> dict[str, np.ndarray]:
    return read_state_dict(path)


# --------------------------------------------------------------------------------------------
# safetensors (item 5) and indexes (item 9, hostile shard paths)
# --------------------------------------------------------------------------------------------


def _safetensors_bytes(header: dict, data: bytes, header_size_delta: int = 0) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob) + header_size_delta) + blob + data


def _entry(begin: int, end: int, shape: list[int]) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


SAFETENSORS_CASES = {
    "header-one-byte-short": (lambda: _safetensors_bytes({"a": _entry(0, 16, [4])}, bytes(16), -1), "bytes after"),
    "trailing-bytes": (lambda: _safetensors_bytes({"a": _entry(0, 16, [4])}, bytes(17)), "bytes after the last"),
    "overlap": (lambda: _safetensors_bytes({"a": _entry(0, 16, [4]), "b": _entry(8, 24, [4])}, bytes(24)), "overlaps"),
    "aliased": (lambda: _safetensors_bytes({"a": _entry(0, 16, [4]), "b": _entry(0, 16, [4])}, bytes(16)), "overlaps"),
    "gap": (lambda: _safetensors_bytes({"a": _entry(8, 24, [4])}, bytes(24)), "gap"),
    "metadata-list": (lambda: _safetensors_bytes({"__metadata__": ["x"], "a": _entry(0, 16, [4])}, bytes(16)),
                      "__metadata__"),
    "metadata-int-values": (lambda: _safetensors_bytes({"__metadata__": {"format": 1}, "a": _entry(0, 16, [4])},
                                                       bytes(16)), "__metadata__"),
    "shape-float": (lambda: _safetensors_bytes({"a": _entry(0, 16, [4.0])}, bytes(16)), "shape"),
    "shape-bool": (lambda: _safetensors_bytes({"a": _entry(0, 4, [True])}, bytes(4)), "shape"),
    "dtype-object": (lambda: _safetensors_bytes({"a": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)),
                     "dtype"),
    "nested-header": (lambda: _nested_header(), "nested too deeply|not a JSON object|entry"),
    "huge-shape": (lambda: _safetensors_bytes({"a": _entry(0, 16, [2**40, 2**40])}, bytes(16)), "does not fit"),
}


def _nested_header() -> bytes:
    blob = b"[" * 200_000 + b"]" * 200_000
    return struct.pack("<Q", len(blob)) + blob


@pytest.mark.parametrize("name", sorted(SAFETENSORS_CASES))
def test_safetensors_header_is_checked_like_the_safetensors_library(tmp_path: pathlib.Path, name: str) -> None:
    make, message = SAFETENSORS_CASES[name]
    path = tmp_path / "model.safetensors"
    path.write_bytes(make())
    with pytest.raises(CheckpointError, match=message) as info:
        st.read_lazy(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        read_state_dict(path)  # the public path refuses it too
    safetensors = pytest.importorskip("safetensors.numpy")
    if name not in ("metadata-int-values", "shape-bool", "huge-shape", "nested-header"):
        with pytest.raises(Exception):  # the reference library agrees the file is invalid
            safetensors.load_file(str(path))


def test_valid_safetensors_still_match_the_library(tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import load_file, save_file

    state = seeded_state(CONFIG, "classification")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours, metadata = st.read(tmp_path / "model.safetensors")
    theirs = load_file(str(tmp_path / "model.safetensors"))
    assert metadata == {"format": "pt"} and list(ours) == sorted(theirs) or set(ours) == set(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


HOSTILE_SHARDS = ["/etc/passwd", "../outside.safetensors", "a/../../x.safetensors", "..\\x.safetensors",
                  "C:x.safetensors", "~/x.safetensors", "", ".", "./", "x\x00.safetensors", "model.safetensors.index.json",
                  "sub/./x.safetensors", "..", "/", "//server/share", "a/b/../../../etc"]


@pytest.mark.parametrize("shard", HOSTILE_SHARDS)
def test_hostile_shard_paths_are_refused(tmp_path: pathlib.Path, shard: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(CheckpointError, match="shard"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("weight_map", [{"a": 1}, ["a"], {"a": None}, "x"])
def test_index_weight_map_of_wrong_types(tmp_path: pathlib.Path, weight_map: object) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        read_state_dict(tmp_path)


def test_shard_symlink_leaving_the_directory_is_refused_and_never_echoed(tmp_path: pathlib.Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:*:TOPSECRET-CONTENT")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model-00001-of-00001.safetensors").symlink_to(secret)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(ckpt)
    assert "TOPSECRET" not in str(info.value) and "root:" not in str(info.value)
    (ckpt / "model.safetensors").symlink_to(secret)  # a weights file that is a link to a non-checkpoint
    with pytest.raises(CheckpointError) as info:
        read_state_dict(ckpt / "model.safetensors")
    assert "TOPSECRET" not in str(info.value) and "root:" not in str(info.value)


# --------------------------------------------------------------------------------------------
# config against checkpoint (item 4)
# --------------------------------------------------------------------------------------------


def test_config_with_ten_million_layers_is_refused_before_building_a_table(tmp_path: pathlib.Path) -> None:
    checkpoint(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_hidden_layers"] = 10_000_000
    (tmp_path / "config.json").write_text(json.dumps(data))
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="num_hidden_layers=10000000.*2 encoder layers") as info:
        load_pretrained(tmp_path, "classification", lambda c: weight_table(c, "classification"))
    assert time.perf_counter() - start < 5
    assert len(str(info.value)) < 1000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_fit_errors_list_at_most_twenty_keys_and_a_count(tmp_path: pathlib.Path) -> None:
    from vit_core.checkpoint import check_state_fits_table

    state = {f"junk.{i}": np.zeros(1) for i in range(100_000)}
    with pytest.raises(CheckpointError) as info:
        check_state_fits_table(state, weight_table(CONFIG, "classification"), source="x")
    text = str(info.value)
    assert "unexpected (100000" in text and "... and 99980 more" in text and len(text) < 10_000


# --------------------------------------------------------------------------------------------
# staging: kills at every step, concurrent writers, --force (items 6, 7, 8, 14)
# --------------------------------------------------------------------------------------------

_KILLER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from vit_core.checkpoint import staging
    target = int(sys.argv[1])
    calls = [0]
    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == target:
                os._exit(137)  # as kill -9: no cleanup, no finally
            return fn(*args, **kwargs)
        return wrapper
    for name in ("rename", "replace", "link", "unlink", "rmdir", "fsync", "chmod", "mkdir", "open"):
        setattr(os, name, counted(getattr(os, name)))
    staging._renameat2 = counted(staging._renameat2)
    sys.argv = sys.argv[:1] + sys.argv[2:]
    {body}
""")


def _run_killed(step: int, body: str, *args: str) -> int:
    code = _KILLER.format(repo=str(REPO), body=body)
    return subprocess.run([sys.executable, "-c", code, str(step), *args], capture_output=True, timeout=120).returncode


def _state_of(path: pathlib.Path) -> str | None:
    """"old" / "new" by the labels in config.json and the weights (which must agree), None if unreadable."""
    try:
        labels = json.loads((path / "config.json").read_text())["id2label"]["0"]
        weights = load(path)["classifier.bias"]
    except (OSError, ValueError, KeyError):
        return None
    seed = {"old": 0, "new": 1}[labels]
    assert np.array_equal(weights, seeded_state(CONFIG, "classification", seed=seed)["classifier.bias"]), \
        "weights and config come from different versions"
    return labels


def test_save_pretrained_killed_at_every_step_leaves_old_or_new(tmp_path: pathlib.Path) -> None:
    body = textwrap.dedent("""
        from vit_core import ViTConfig
        from vit_core.pretrained import save_pretrained
        from tests.cases import TINY, seeded_state
        config = ViTConfig(**dict(TINY, num_labels=3), id2label={0: "new", 1: "b", 2: "c"})
        save_pretrained(config, seeded_state(config, "classification", seed=1), sys.argv[1])
    """)
    outcomes = []
    for step in range(1, 40):
        target = tmp_path / f"run{step}"
        checkpoint(target, seed=0, labels=("old", "b", "c"))
        (target / "README.md").write_text("mine")
        code = _run_killed(step, body, str(target))
        state = _state_of(target)
        assert state in ("old", "new"), f"kill at step {step} left {sorted(os.listdir(target))}"
        assert (target / "README.md").read_text() == "mine"  # other files are carried over
        outcomes.append(state)
        if code == 0:
            break
    assert outcomes[-1] == "new" and "old" in outcomes, outcomes
    print(f"save_pretrained kill injection: {len(outcomes)} trials, {len(outcomes)} intact")


def test_convert_force_killed_at_every_step_leaves_old_or_new(tmp_path: pathlib.Path) -> None:
    new_src = checkpoint(tmp_path / "src", seed=1, labels=("new", "b", "c"))
    body = "from conversion import convert\nconvert(sys.argv[1], sys.argv[2], to='safetensors', force=True)"
    outcomes = []
    for step in range(1, 40):
        dst = tmp_path / f"dst{step}"
        checkpoint(dst, seed=0, labels=("old", "b", "c"))
        code = _run_killed(step, body, str(new_src), str(dst))
        state = _state_of(dst)
        assert state in ("old", "new"), f"kill at step {step}: destination holds {sorted(os.listdir(dst)) if dst.exists() else 'nothing'}"
        outcomes.append(state)
        if code == 0:
            break
    assert outcomes[-1] == "new" and "old" in outcomes
    print(f"convert --force kill injection: {len(outcomes)} trials, {len(outcomes)} intact")


def test_concurrent_writers_without_force_exactly_one_wins(tmp_path: pathlib.Path) -> None:
    src = checkpoint(tmp_path / "src")
    wins = 0
    for trial in range(3):
        dst = tmp_path / f"dst{trial}"
        procs = [subprocess.Popen([sys.executable, "-m", "conversion.cli", "--quiet", "convert", str(src), str(dst)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO))) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        loser = next(err for code, err in results if code == 2)
        assert "already exists" in loser and "Traceback" not in loser
        assert load(dst)
        wins += 1
    assert wins == 3


def test_staged_dir_race_is_decided_by_rename_noreplace(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "dst"
    first = staging.staged_dir(target)
    second = staging.staged_dir(target)
    with first as a:
        (a / "x").write_text("first")
        second_dir = second.__enter__()
        (second_dir / "x").write_text("second")
    with pytest.raises(FileExistsError, match="already exists"):
        second.__exit__(None, None, None)
    assert (target / "x").read_text() == "first" and not second_dir.exists()


def test_force_refuses_a_destination_with_other_files_and_says_which(tmp_path: pathlib.Path) -> None:
    src = checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    checkpoint(dst, seed=3)
    (dst / "notes.txt").write_text("keep me")
    (dst / "runs").mkdir()
    result = vitx("convert", str(src), str(dst), "--force")
    assert result.returncode == 2 and "notes.txt" in result.stderr and "runs/" in result.stderr
    assert "Traceback" not in result.stderr and (dst / "notes.txt").read_text() == "keep me"
    result = vitx("convert", str(src), str(dst), "--force-all")
    assert result.returncode == 0, result.stderr
    assert not (dst / "notes.txt").exists() and np.array_equal(load(dst)["classifier.bias"], load(src)["classifier.bias"])


def test_destination_dot_and_parent_are_refused(tmp_path: pathlib.Path) -> None:
    src = checkpoint(tmp_path / "src")
    for dst in (".", ".."):
        result = vitx("convert", str(src), dst, "--force", cwd=tmp_path / "src")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert load(src)


# --------------------------------------------------------------------------------------------
# write failures and modes (items 9, 13)
# --------------------------------------------------------------------------------------------


def test_file_too_large_is_a_clear_error_naming_the_destination(tmp_path: pathlib.Path) -> None:
    src = checkpoint(tmp_path / "src")
    for to in ("safetensors", "pytorch", "tf", "flax"):
        dst = tmp_path / f"out-{to}"

        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run([sys.executable, "-m", "conversion.cli", "--quiet", "convert", str(src), str(dst),
                                 "--to", to], capture_output=True, text=True, env=env, preexec_fn=limit, timeout=120)
        assert result.returncode == 2, (to, result.stderr)
        assert str(dst) in result.stderr and "Traceback" not in result.stderr, (to, result.stderr)
        assert "File too large" in result.stderr or "too large" in result.stderr.lower(), (to, result.stderr)
        assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{to}")]


def test_disk_full_during_save_pretrained_names_the_directory(tmp_path: pathlib.Path, monkeypatch) -> None:
    target = checkpoint(tmp_path / "ckpt", labels=("old", "b", "c"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real = st.write

    def full(path, state, metadata=None, progress=None):
        real(path, state, metadata, progress)
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(st, "write", full)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        checkpoint(target, seed=1, labels=("new", "b", "c"))
    assert str(target) in str(info.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]


def test_outputs_get_the_umask_mode(tmp_path: pathlib.Path) -> None:
    from vit_core import ViTImageProcessor

    old = os.umask(0o022)
    try:
        target = checkpoint(tmp_path / "ckpt")
        ViTImageProcessor().save_pretrained(target)
        result = vitx("convert", str(target), str(tmp_path / "tf"), "--to", "tf")
        assert result.returncode == 0, result.stderr
    finally:
        os.umask(old)
    for path in [*target.iterdir(), *(tmp_path / "tf").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (target.stat().st_mode & 0o777) == 0o755 and ((tmp_path / "tf").stat().st_mode & 0o777) == 0o755


def test_decompression_bomb_image_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    from PIL import Image

    target = checkpoint(tmp_path / "ckpt")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 400 megapixels, a few KiB on disk
    result = vitx("classify", str(target), str(bomb), "--framework", "torch")
    assert result.returncode == 2 and "bomb.png" in result.stderr and "Traceback" not in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------
# item 15: a qkv_bias=False checkpoint converts to TF and back
# --------------------------------------------------------------------------------------------


def test_qkv_bias_false_converts_to_tf_and_back(tmp_path: pathlib.Path) -> None:
    config = ViTConfig(**dict(TINY, num_labels=3, qkv_bias=False))
    state = seeded_state(config, "classification")
    save_pretrained(config, state, tmp_path / "src")
    result = vitx("convert", str(tmp_path / "src"), str(tmp_path / "tf"), "--to", "tf")
    assert result.returncode == 0, result.stderr
    back = vitx("convert", str(tmp_path / "tf"), str(tmp_path / "back"))
    assert back.returncode == 0, back.stderr
    again = load(tmp_path / "back")
    assert set(again) == set(state) and all(np.array_equal(again[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------------
# items 1 and 2 end to end: every command refuses the file cleanly and leaves nothing behind
# --------------------------------------------------------------------------------------------


def _object_dtype_msgpack(directory: pathlib.Path) -> pathlib.Path:
    import msgpack

    checkpoint(directory)
    record = msgpack.ExtType(1, msgpack.packb(((1, 1, 32), "O", bytes(8 * 32)), use_bin_type=True))
    tree = {"vit": {"embeddings": {"cls_token": record}}, "classifier": {"bias": record}}
    (directory / "model.safetensors").unlink()
    (directory / "flax_model.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))
    return directory


def _external_link_h5(directory: pathlib.Path, secret: pathlib.Path) -> pathlib.Path:
    import h5py

    checkpoint(directory)
    (directory / "model.safetensors").unlink()
    with h5py.File(secret.with_suffix(".h5"), "w") as f:
        f["data"] = np.frombuffer(secret.read_bytes().ljust(128, b"\0")[:128], dtype=np.float32)
    with h5py.File(directory / "tf_model.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"vit"])
        group = f.create_group("vit")
        name = "tf_vi_t_model/vit/embeddings/cls_token:0"
        group.attrs["weight_names"] = np.array([name.encode()])
        group[name] = h5py.ExternalLink(str(secret.with_suffix(".h5")), "data")
    return directory


@pytest.mark.parametrize("hostile", ["msgpack-object-dtype", "h5-external-link"])
def test_every_command_refuses_hostile_weights_cleanly(tmp_path: pathlib.Path, hostile: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-PASSWORD-" * 8)
    source = (_object_dtype_msgpack(tmp_path / "src") if hostile.startswith("msgpack")
              else _external_link_h5(tmp_path / "src", secret))
    photo = REPO / "tests" / "fixtures" / "images" / "chelsea.png"
    for args in (["convert", str(source), str(tmp_path / "out-tf"), "--to", "tf"],
                 ["convert", str(source), str(tmp_path / "out-flax"), "--to", "flax"],
                 ["parity", str(source), "--frameworks", "reference"], ["info", str(source)],
                 ["classify", str(source), str(photo)]):
        result = vitx(*args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr and str(source) in result.stderr, (args, result.stderr)
        assert "SECRET" not in result.stderr + result.stdout
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted(["src", "secret.txt", "secret.h5"] if hostile.startswith("h5") else ["src", "secret.txt"])


# --------------------------------------------------------------------------------------------
# fuzz: the public read path over safetensors, npz, sharded indexes (the other containers have
# their own fuzz tests in tests/test_container_*.py)
# --------------------------------------------------------------------------------------------


def _fuzz(seed_files: list[pathlib.Path], tmp_path: pathlib.Path, budget_s: float, seed: int) -> dict[str, int]:
    import random

    rng = random.Random(seed)
    counts = {"tried": 0, "clear": 0, "loads": 0}
    originals = {p: p.read_bytes() for p in seed_files}
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        target = rng.choice(seed_files)
        data = bytearray(originals[target])
        how = rng.randrange(4)
        if how == 0:
            data = data[: rng.randrange(len(data))]
        elif how == 1:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(min(len(data), 512))
                data[i] ^= 1 << rng.randrange(8)
        elif how == 2:
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data += bytes(rng.randrange(1, 64))
        target.write_bytes(bytes(data))
        try:
            state = read_state_dict(target.parent if target.name.endswith(".index.json") else target)
            assert all(isinstance(v, np.ndarray) for v in state.values())
            counts["loads"] += 1
        except CheckpointError as e:
            assert str(target.parent) in str(e), str(e)
            counts["clear"] += 1
        finally:
            target.write_bytes(originals[target])
        counts["tried"] += 1
    return counts


def test_fuzz_safetensors_npz_and_index_readers(tmp_path: pathlib.Path) -> None:
    from vit_core.checkpoint import npz, save_state_dict
    from vit_core.checkpoint.lazy import lazify

    state = seeded_state(CONFIG, "classification")
    single = save_state_dict(state, tmp_path / "single")[0]
    sharded = save_state_dict(state, tmp_path / "sharded", max_shard_size=20_000)
    npz.write(tmp_path / "w.npz", lazify({k.replace(".", "/"): v for k, v in list(state.items())[:6]}))
    files = [single, sharded[-1], sharded[0], tmp_path / "w.npz"]

    def read_npz_too(path):  # npz is read by conversion; through the container here
        return npz.read(path)

    counts = _fuzz(files[:3], tmp_path, budget_s=6.0, seed=1234)
    assert counts["tried"] >= 100 and counts["clear"] + counts["loads"] == counts["tried"], counts
    npz_counts = {"tried": 0, "clear": 0, "loads": 0}
    import random

    rng = random.Random(99)
    original = files[3].read_bytes()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        files[3].write_bytes(bytes(data))
        try:
            read_npz_too(files[3])
            npz_counts["loads"] += 1
        except CheckpointError as e:
            assert str(files[3]) in str(e)
            npz_counts["clear"] += 1
        npz_counts["tried"] += 1
    assert npz_counts["tried"] >= 100, npz_counts
    print(f"fuzz safetensors/index: {counts}; npz: {npz_counts}")
