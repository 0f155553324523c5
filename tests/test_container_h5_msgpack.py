"""vit_core.checkpoint.h5 and vit_core.checkpoint.msgpack: round trips, the formats' oracles
(flax.serialization for msgpack, Keras' layout spelled out for h5), and hostile files.

Every hostile file is built here, with numpy + h5py / msgpack, and must end in a CheckpointError
that names the file, before any data is read; fuzzing and the peak-memory check of the bombs run
in subprocesses (HDF5's C library could crash; a crash fails the test, it does not kill pytest).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys
import time
from collections.abc import Callable

import h5py
import msgpack as msgpack_lib
import numpy as np
import pytest

from vit_core.checkpoint import h5
from vit_core.checkpoint import msgpack as mp
from vit_core.checkpoint.errors import CheckpointError
from vit_core.checkpoint.lazy import Lazy, lazify

REPO = pathlib.Path(__file__).resolve().parents[1]
SECRET = b"TOP-SECRET-4f1d9c0e!"  # the bytes of the "local file" a hostile h5 tries to pull in
FUZZ_SECONDS = 7.0
FUZZ_MIN_INPUTS = 100
BOMB_RSS_LIMIT = 100 * 2**20


def assert_refused(path: pathlib.Path, read: Callable[[pathlib.Path], object], *needles: str) -> CheckpointError:
    """``read(path)`` raises a CheckpointError naming the file (and each needle), never echoing SECRET."""
    with pytest.raises(CheckpointError) as info:
        read(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    assert SECRET.decode() not in message
    return info.value


# =============================================================================================
# msgpack
# =============================================================================================


def _record(shape: object, dtype: object, data: bytes, code: int = mp.EXT_NDARRAY) -> msgpack_lib.ExtType:
    """A flax array record built by hand (any shape / dtype / byte count, valid or not)."""
    return msgpack_lib.ExtType(code, msgpack_lib.packb((shape, dtype, data), use_bin_type=True))


def _pack(tree: object) -> bytes:
    return msgpack_lib.packb(tree, use_bin_type=True)


def _mp_file(tmp_path: pathlib.Path, content: bytes | object, name: str = "flax_model.msgpack") -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else _pack(content))
    return path


def _mixed_tree() -> dict:
    """Every dtype flax writes for a ViT, plus 0-d and empty arrays and msgpack's size boundaries
    (fixext16 record, bin8 / bin16 / bin32 data, uint8 / uint16 shapes)."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {"params": {
        "vit": {"embeddings": {"cls_token": rng.standard_normal((1, 1, 8)).astype(np.float32),
                               "patch": {"kernel": rng.standard_normal((2, 2, 3, 8)).astype(np.float32)}},
                "ln": {"scale": rng.standard_normal(8).astype(ml_dtypes.bfloat16),
                       "bias": rng.standard_normal(8).astype(np.float16)}},
        "head": {"kernel": rng.standard_normal((300, 2)).astype(np.float64), "bias": np.zeros(0, np.float32)},
        "misc": {"fixext16": np.arange(5, dtype=np.uint8), "flags": np.array([True, False]),
                 "step": np.array(7, dtype=np.int64), "wide": np.arange(70000, dtype=np.int8),
                 "i16": np.arange(-3, 3, dtype=np.int16).reshape(2, 3)},
    }}


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        value = np.asarray(value)
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


def test_msgpack_write_is_flax_to_bytes(tmp_path: pathlib.Path) -> None:
    """write() of the flattened tree == flax.serialization.to_bytes of the tree, byte for byte; progress counts bytes."""
    serialization = pytest.importorskip("flax.serialization")
    tree = _mixed_tree()
    flat = _flatten(tree)
    seen: list[int] = []
    mp.write(tmp_path / "out.msgpack", lazify(flat), progress=seen.append)
    assert (tmp_path / "out.msgpack").read_bytes() == serialization.to_bytes(tree)
    assert seen == [a.nbytes for a in flat.values()]


def test_msgpack_write_native_order_and_views(tmp_path: pathlib.Path) -> None:
    """Big-endian and non-contiguous inputs are written as flax writes their native, contiguous copies."""
    serialization = pytest.importorskip("flax.serialization")
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"a/big": base.astype(">f4"), "a/t": base.T}
    mp.write(tmp_path / "out.msgpack", lazify(state))
    expected = serialization.to_bytes({"a": {"big": base, "t": np.ascontiguousarray(base.T)}})
    assert (tmp_path / "out.msgpack").read_bytes() == expected


def test_msgpack_chunked_arrays_write_and_read_lazily(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays over MAX_CHUNK_SIZE are chunked byte-identically to flax, and read back as one lazy tensor."""
    serialization = pytest.importorskip("flax.serialization")
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 16)
    monkeypatch.setattr(mp, "MAX_CHUNK_SIZE", 16)
    tree = {"params": {"k": np.arange(30, dtype=np.float32).reshape(5, 6), "small": np.arange(4, dtype=np.float32),
                       "odd": np.arange(7, dtype=np.int8)}}
    path = tmp_path / "flax_model.msgpack"
    mp.write(path, lazify(_flatten(tree)))
    assert path.read_bytes() == serialization.to_bytes(tree)
    state = mp.read_lazy(path)
    assert state["params/k"].shape == (5, 6) and state["params/k"].dtype == np.float32
    _assert_same(mp.read(path), _flatten(tree))


def test_msgpack_reads_flax_files(tmp_path: pathlib.Path) -> None:
    """flax's own files: arrays memory-mapped, keys as stored (params level kept), numpy scalars (ext 3) as 0-d."""
    serialization = pytest.importorskip("flax.serialization")
    tree = _mixed_tree()
    tree["params"]["misc"]["scalar"] = np.float32(2.5)  # flax writes numpy scalars as ext type 3
    path = _mp_file(tmp_path, serialization.to_bytes(tree))
    state = mp.read_lazy(path)
    assert isinstance(state["params/vit/embeddings/cls_token"].load(), np.memmap)
    assert state["params/misc/scalar"].shape == ()
    want = _flatten(serialization.msgpack_restore(path.read_bytes()))
    _assert_same(mp.read(path), {k: np.asarray(v) for k, v in want.items()})
    assert path.name in state["params/head/kernel"].source


def test_msgpack_sniff() -> None:
    assert mp.sniff(b"\x81\xa1a") and mp.sniff(b"\x80") and mp.sniff(b"\xde\x00\x01") and mp.sniff(b"\xdf")
    assert not mp.sniff(b"") and not mp.sniff(b"\x91") and not mp.sniff(b"{")
    assert mp.sniff(h5.SIGNATURE)  # 0x89 is a fixmap: callers try HDF5 first


@pytest.mark.parametrize("dtype", ["O", "|O", "object", "V8", "S4", "U2", "<U1", "M8", "m8[s]", "f4,i4", "(2,)f4",
                                   "float32 ", "", "x" * 200, 7, None, b"\xff\xfe"])
def test_msgpack_non_numeric_record_dtypes_refused(tmp_path: pathlib.Path, dtype: object) -> None:
    """Every record's dtype is checked when the file is parsed (an "O" record once segfaulted downstream)."""
    path = _mp_file(tmp_path, {"params": {"w": _record([2], dtype, b"\x00" * 16)}})
    error = assert_refused(path, mp.read_lazy, "params/w")
    assert "x" * 60 not in str(error)  # a long name from the file is not echoed


@pytest.mark.parametrize("shape,nbytes", [([2, 3], 20), ([2, 3], 28), ([2**40], 8), ([], 0), ([-1], 4)])
def test_msgpack_byte_count_must_match(tmp_path: pathlib.Path, shape: list, nbytes: int) -> None:
    path = _mp_file(tmp_path, {"w": _record(shape, "float32", b"\x00" * nbytes)})
    assert_refused(path, mp.read_lazy, "'w'")


HEADER_BOMBS: dict[str, bytes] = {
    "map-2**32": b"\x81\xa1a\xdf\xff\xff\xff\xff",
    "top-map-2**32": b"\xdf\xff\xff\xff\xff\xa1a",
    "array-2**32": b"\x81\xa1a\xdd\xff\xff\xff\xff",
    "key-str-2**32": b"\x81\xdb\xff\xff\xff\xff",
    "ext-2**32": b"\x81\xa1a\xc9\xff\xff\xff\xff\x01",
    "bin-2**32-in-record": b"\x81\xa1a\xc7\x0c\x01\x93\x91\x04\xa2u1\xc6\xff\xff\xff\xff",
    "shape-2**32-dims": b"\x81\xa1a\xc7\x0a\x01\x93\xdd\xff\xff\xff\xff\xa2u1",
    "fixmap-past-end": b"\x8f\xa1a",
}


@pytest.mark.parametrize("case", list(HEADER_BOMBS))
def test_msgpack_header_bombs_refused(tmp_path: pathlib.Path, case: str) -> None:
    """Counts and lengths that exceed the bytes left are refused before anything is allocated."""
    assert_refused(_mp_file(tmp_path, HEADER_BOMBS[case]), mp.read_lazy, "claims")


def _chunked(shape: dict, chunks: dict, **extra: object) -> dict:
    return {mp.CHUNKED_FLAG: True, "shape": shape, "chunks": chunks, **extra}


_C4 = _record([4], "float32", b"\x00" * 16)
CHUNK_CASES: dict[str, dict] = {
    "total-too-small": _chunked({"0": 10}, {"0": _C4}),
    "shape-claims-2**40": _chunked({"0": 2**20, "1": 2**20}, {"0": _C4, "1": _C4}),
    "2-d-chunk": _chunked({"0": 4}, {"0": _record([2, 2], "float32", b"\x00" * 16)}),
    "mixed-dtypes": _chunked({"0": 8}, {"0": _C4, "1": _record([4], "int32", b"\x00" * 16)}),
    "no-chunks": _chunked({"0": 0}, {}),
    "chunks-misnumbered": _chunked({"0": 8}, {"0": _C4, "2": _C4}),
    "shape-misnumbered": _chunked({"1": 4}, {"0": _C4}),
    "shape-not-int": _chunked({"0": True}, {"0": _C4}),
    "shape-negative": _chunked({"0": -4}, {"0": _C4}),
    "extra-key": _chunked({"0": 4}, {"0": _C4}, other=1),
    "flag-false": {mp.CHUNKED_FLAG: False, "shape": {"0": 4}, "chunks": {"0": _C4}},
    "flag-is-1": {mp.CHUNKED_FLAG: 1, "shape": {"0": 4}, "chunks": {"0": _C4}},
    "chunks-is-record": _chunked({"0": 4}, _C4),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_msgpack_inconsistent_chunked_arrays_refused(tmp_path: pathlib.Path, case: str) -> None:
    assert_refused(_mp_file(tmp_path, {"params": {"w": CHUNK_CASES[case]}}), mp.read_lazy, "params/w", "chunked")


@pytest.mark.parametrize("case", ["maps", "arrays", "arrays-in-shape", "maps-in-chunked-shape"])
def test_msgpack_deep_nesting_refused_without_recursion_error(tmp_path: pathlib.Path, case: str) -> None:
    depth = 100_000
    content = {
        "maps": b"\x81\xa1a" * depth + b"\x80",
        "arrays": b"\x81\xa1a" + b"\x91" * depth + b"\x90",
        "arrays-in-shape": b"\x81\xa1a\xc9" + (depth + 9).to_bytes(4, "big") + b"\x01\x93" + b"\x91" * depth
                           + b"\x90\xa2u1\xc4\x00",
        "maps-in-chunked-shape": b"\x81\xa1w\x83\xb9__msgpack_chunked_array__\xc3\xa5shape" + b"\x81\xa10" * depth
                                 + b"\x04",
    }[case]
    assert_refused(_mp_file(tmp_path, content), mp.read_lazy)


@pytest.mark.parametrize("case,needle", [
    ("trailing", "trailing bytes"), ("empty", "empty"), ("top-array", "not a msgpack map"),
    ("complex", "complex"), ("unknown-ext", "extension type 9"), ("int-leaf", "plain msgpack value"),
    ("str-leaf", "str"), ("float-leaf", "float"), ("duplicate-key", "twice"), ("slash-collision", "twice"),
    ("scalar-with-shape", "scalar"), ("non-utf8-key", "UnicodeDecodeError"), ("int-key", "map key"),
    ("stray-bytes-in-record", "stray"), ("record-not-triple", "not (shape, dtype, bytes)"),
])
def test_msgpack_malformed_files_refused(tmp_path: pathlib.Path, case: str, needle: str) -> None:
    good = _pack({"w": _record([1], "float32", b"\x00" * 4)})
    content = {
        "trailing": good + b"\x00",
        "empty": b"",
        "top-array": _pack([1, 2]),
        "complex": _pack({"w": msgpack_lib.ExtType(mp.EXT_NATIVE_COMPLEX, _pack((1.0, 2.0)))}),
        "unknown-ext": _pack({"w": msgpack_lib.ExtType(9, b"abc")}),
        "int-leaf": _pack({"w": 3}),
        "str-leaf": _pack({"w": "SECRET"}),
        "float-leaf": _pack({"w": 1.5}),
        "duplicate-key": b"\x82\xa1w" + _pack(_record([1], "float32", b"\x00" * 4)) * 1
                         + b"\xa1w" + _pack(_record([1], "float32", b"\x00" * 4)),
        "slash-collision": _pack({"a/b": _record([1], "u1", b"\x00"), "a": {"b": _record([1], "u1", b"\x00")}}),
        "scalar-with-shape": _pack({"w": _record([1], "float32", b"\x00" * 4, code=mp.EXT_NPSCALAR)}),
        "non-utf8-key": b"\x81\xa2\xff\xfe" + _pack(_record([1], "u1", b"\x00")),
        "int-key": b"\x81\x01" + _pack(_record([1], "u1", b"\x00")),
        "stray-bytes-in-record": _pack({"w": msgpack_lib.ExtType(1, _pack(([1], "u1", b"\x00")) + b"\x00")}),
        "record-not-triple": _pack({"w": msgpack_lib.ExtType(1, _pack(([1], "u1")))}),
    }[case]
    assert_refused(_mp_file(tmp_path, content), mp.read_lazy, needle)


def test_msgpack_messages_cut_long_keys(tmp_path: pathlib.Path) -> None:
    key = "k" * 5000
    error = assert_refused(_mp_file(tmp_path, {key: 1}), mp.read_lazy)
    assert "k" * 200 not in str(error) and len(str(error)) < 400


def test_msgpack_writer_refuses_bad_trees(tmp_path: pathlib.Path) -> None:
    one = np.zeros(1, np.float32)
    for state in ({"a": one, "a/b": one}, {"a/b": one, "a": one}, {"a//b": one}, {"": one},
                  {"/".join(["x"] * (mp.MAX_DEPTH + 1)): one}):
        with pytest.raises(CheckpointError):
            mp.write(tmp_path / "bad.msgpack", lazify(state))
    strings = Lazy((2,), np.dtype("U3"), lambda: np.array(["a", "b"]), "s")
    with pytest.raises(CheckpointError, match="not a numeric"):
        mp.write(tmp_path / "bad.msgpack", {"s": strings})


def test_msgpack_load_after_file_shrinks_is_a_checkpoint_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "flax_model.msgpack"
    mp.write(path, lazify({"w": np.arange(1000, dtype=np.float32)}))
    state = mp.read_lazy(path)
    path.write_bytes(path.read_bytes()[:100])
    assert_refused(path, lambda p: state["w"].materialize())


# =============================================================================================
# h5
# =============================================================================================

WEIGHTS = {
    "tf_vi_t_model/vit/embeddings/cls_token:0": np.arange(8, dtype=np.float32).reshape(1, 1, 8),
    "tf_vi_t_model/vit/encoder/layer_._0/attention/attention/query/kernel:0": np.eye(8, dtype=np.float32),
    "tf_vi_t_model/vit/layernorm/gamma:0": np.ones(8, np.float16),
    "tf_vi_t_model/classifier/kernel:0": np.arange(16, dtype=np.float64).reshape(8, 2),
    "tf_vi_t_model/classifier/count:0": np.array(3, dtype=np.int64),
    "tf_vi_t_model/classifier/mask:0": np.array([True, False]),
}


def _h5_file(tmp_path: pathlib.Path, name: str = "tf_model.h5", state: dict | None = None) -> pathlib.Path:
    path = tmp_path / name
    h5.write(path, lazify(WEIGHTS if state is None else state))
    return path


def test_h5_write_is_keras_layout(tmp_path: pathlib.Path) -> None:
    """The attributes, their types and the dataset paths of Keras' / transformers' h5 weights format."""
    seen: list[int] = []
    path = tmp_path / "tf_model.h5"
    h5.write(path, lazify(WEIGHTS), progress=seen.append)
    assert seen == [a.nbytes for a in WEIGHTS.values()]
    with h5py.File(path, "r") as f:
        assert f.attrs["backend"] == "tensorflow" and f.attrs["keras_version"] == h5.KERAS_VERSION
        assert f.attrs["layer_names"].dtype.kind == "S" and list(f.attrs["layer_names"]) == [b"vit", b"classifier"]
        assert list(f["classifier"].attrs["weight_names"]) == [k.encode() for k in WEIGHTS if "/classifier/" in k]
        for key, value in WEIGHTS.items():
            dataset = f[key.split("/")[1]][key]
            assert dataset.dtype == value.dtype and np.array_equal(dataset[()], value)
            assert dataset.compression is None and dataset.chunks is None  # plain contiguous, as Keras
    state = h5.read_lazy(path)
    assert list(state) == list(WEIGHTS)
    _assert_same(h5.read(path), WEIGHTS)


def test_h5_read_is_lazy_and_reopens_the_file(tmp_path: pathlib.Path) -> None:
    path = _h5_file(tmp_path)
    state = h5.read_lazy(path)
    key = "tf_vi_t_model/classifier/kernel:0"
    assert state[key].shape == (8, 2) and state[key].dtype == np.float64
    moved = path.rename(tmp_path / "elsewhere.h5")
    assert_refused(path, lambda p: state[key].materialize())
    moved.rename(path)
    assert np.array_equal(state[key].materialize(), WEIGHTS[key])


def test_h5_attribute_lists_split_below_the_header_limit(tmp_path: pathlib.Path) -> None:
    """Above 64 KiB a name list is written (and read back) as name0, name1, ... each within Keras' limit."""
    state = {f"m/layer/{'x' * 400}_{i}:0": np.full(1, i, np.int32) for i in range(200)}
    state.update({f"m/l{i:04d}_{'y' * 600}/w:0": np.zeros(1, np.int8) for i in range(120)})
    path = _h5_file(tmp_path, state=state)
    with h5py.File(path, "r") as f:
        for obj, name in ((f, "layer_names"), (f["layer"], "weight_names")):
            assert name not in obj.attrs and f"{name}0" in obj.attrs and f"{name}1" in obj.attrs
            assert all(obj.attrs[k].nbytes <= h5.HEADER_LIMIT for k in obj.attrs if k.startswith(name))
    _assert_same(h5.read(path), state)


def test_h5_sharded_tf_layout(tmp_path: pathlib.Path) -> None:
    """transformers' sharded TF files: layer_names entries are datasets, returned under those names."""
    path = tmp_path / "tf_model-00001-of-00002.h5"
    names = ["vit/embeddings/cls_token:0", "vit/encoder/layer_._0/output/dense/bias:0"]
    with h5py.File(path, "w") as f:
        for i, name in enumerate(names):
            f.create_dataset(name, data=np.full(3, i, np.float32))
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
    _assert_same(h5.read(path), {n: np.full(3, i, np.float32) for i, n in enumerate(names)})


def test_h5_sniff_and_user_block(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f.create_dataset("m/l/w:0", data=np.ones(2, np.float32))
        f.attrs["layer_names"] = np.array([b"m/l/w:0"])
    with open(path, "rb") as f:
        head = f.read(16)
        assert h5.sniff(head, f) and f.tell() == 16
    assert list(h5.read(path)) == ["m/l/w:0"]
    other = _mp_file(tmp_path, {"a": 1})
    with open(other, "rb") as f:
        assert not h5.sniff(f.read(16), f)
    with open(_h5_file(tmp_path), "rb") as f:
        assert h5.sniff(f.read(16), f)


def _secret_raw(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "passwd"
    path.write_bytes(SECRET * 8)
    return path


def _secret_h5(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "secret.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.frombuffer(SECRET * 8, np.uint8))
    return path


WEIGHT = "m/layer/w:0"


def _keras_with(tmp_path: pathlib.Path, plant: Callable[[h5py.File, h5py.Group, pathlib.Path], None],
                weight: str = WEIGHT) -> pathlib.Path:
    """A Keras-layout file with one good weight and one weight planted by ``plant(file, layer group, tmp)``."""
    path = tmp_path / "tf_model.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"layer"])
        group = f.create_group("layer")
        group.create_dataset("g/layer/good:0", data=np.ones(4, np.float32))
        plant(f, group, tmp_path)
        group.attrs["weight_names"] = np.array([b"g/layer/good:0", weight.encode()])
    return path


DISCLOSURES: dict[str, Callable[[h5py.File, h5py.Group, pathlib.Path], None]] = {
    "external-storage": lambda f, g, d: g.create_dataset(
        WEIGHT, shape=(len(SECRET) * 8,), dtype="u1", external=[(str(_secret_raw(d)), 0, h5py.h5f.UNLIMITED)]),
    "virtual-dataset": lambda f, g, d: g.create_virtual_dataset(WEIGHT, _secret_layout(d)),
    "external-link": lambda f, g, d: g.__setitem__(WEIGHT, h5py.ExternalLink(str(_secret_h5(d)), "/data")),
    "external-link-midway": lambda f, g, d: g.__setitem__("m", h5py.ExternalLink(str(_secret_tree(d)), "/m")),
    "soft-link-out-of-group": lambda f, g, d: (f.create_dataset("loot", data=np.frombuffer(SECRET, np.uint8)),
                                               g.__setitem__(WEIGHT, h5py.SoftLink("/loot"))),
    "soft-link-to-external-link": lambda f, g, d: (f.__setitem__("ext", h5py.ExternalLink(str(_secret_h5(d)), "/data")),
                                                   g.__setitem__(WEIGHT, h5py.SoftLink("/ext"))),
}


def _secret_layout(tmp_path: pathlib.Path) -> h5py.VirtualLayout:
    layout = h5py.VirtualLayout(shape=(len(SECRET) * 8,), dtype="u1")
    layout[:] = h5py.VirtualSource(str(_secret_h5(tmp_path)), "data", shape=(len(SECRET) * 8,))
    return layout


def _secret_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "secret-tree.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(WEIGHT, data=np.frombuffer(SECRET * 8, np.uint8))
    return path


@pytest.mark.parametrize("case", list(DISCLOSURES))
def test_h5_local_file_disclosure_refused(tmp_path: pathlib.Path, case: str) -> None:
    """External storage, virtual datasets, external and soft links: refused (naming file and weight)
    before any data is read; plain h5py would have read the secret."""
    path = _keras_with(tmp_path, DISCLOSURES[case])
    with h5py.File(path, "r") as f:  # the file is really hostile: h5py follows it to the secret
        assert SECRET in f["layer"][WEIGHT][()].tobytes()
    assert_refused(path, h5.read_lazy, repr(WEIGHT))
    assert_refused(path, h5.read)


@pytest.mark.parametrize("weight", ["/layer/good:0", "m/./good:0", "m//good:0", ""])
def test_h5_names_leaving_the_group_refused(tmp_path: pathlib.Path, weight: str) -> None:
    path = _keras_with(tmp_path, lambda f, g, d: None, weight=weight)
    assert_refused(path, h5.read_lazy, "relative path")


def test_h5_disclosure_refused_at_load_time_too(tmp_path: pathlib.Path) -> None:
    """A file swapped after read_lazy is checked again when a tensor is loaded."""
    path = _h5_file(tmp_path, state={WEIGHT: np.zeros(len(SECRET) * 8, np.uint8)})
    state = h5.read_lazy(path)
    path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"layer"])
        group = f.create_group("layer")
        DISCLOSURES["external-link"](f, group, tmp_path)
        group.attrs["weight_names"] = np.array([WEIGHT.encode()])
    assert_refused(path, lambda p: state[WEIGHT].materialize(), "external link")


def _h5_bomb_gzip(path: pathlib.Path) -> None:
    """256 MiB of zeros, gzip-compressed into about 1 MiB."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"m/l/w:0"])
        dataset = f.create_dataset("m/l/w:0", shape=(2**26,), dtype="f4", chunks=(2**21,), compression="gzip")
        zeros = np.zeros(2**21, np.float32)
        for i in range(32):
            dataset[i * 2**21: (i + 1) * 2**21] = zeros


def _h5_bomb_chunks(path: pathlib.Path) -> None:
    """1 GiB of never-written chunks (reads would return the fill value)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"m/l/w:0"])
        f.create_dataset("m/l/w:0", shape=(2**28,), dtype="f4", chunks=(2**20,), fillvalue=1.0)


def _h5_bomb_aliases(path: pathlib.Path) -> None:
    """One real 64 KiB dataset hard-linked under 400 names: 25 MiB claimed by a tiny file."""
    with h5py.File(path, "w") as f:
        f.create_dataset("m/l/w:0", data=np.zeros(2**14, np.float32))
        for i in range(1, 400):
            f[f"m/l/w{i}:0"] = f["m/l/w:0"]
        f.attrs["layer_names"] = np.array([b"m/l/w:0"] + [f"m/l/w{i}:0".encode() for i in range(1, 400)])


H5_BOMBS: dict[str, Callable[[pathlib.Path], None]] = {
    "gzip-256MiB": _h5_bomb_gzip, "unwritten-chunks-1GiB": _h5_bomb_chunks, "hard-link-aliases": _h5_bomb_aliases}


@pytest.fixture(scope="module")
def bomb_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Every bomb of both formats, built once: {case: path} (h5 cases end in .h5)."""
    folder = tmp_path_factory.mktemp("bombs")
    files: dict[str, pathlib.Path] = {}
    for case, build in H5_BOMBS.items():
        files[case] = folder / f"{case}.h5"
        build(files[case])
    for case, content in HEADER_BOMBS.items():
        files[case] = _mp_file(folder, content, f"{case}.msgpack")
    for case in ("total-too-small", "shape-claims-2**40"):
        files[f"chunked-{case}"] = _mp_file(folder, {"w": CHUNK_CASES[case]}, f"chunked-{case}.msgpack")
    files["shape-2**40"] = _mp_file(folder, {"w": _record([2**40], "float32", b"\x00" * 8)}, "shape-2**40.msgpack")
    return files


@pytest.mark.parametrize("case", list(H5_BOMBS))
def test_h5_bombs_refused(bomb_files: dict[str, pathlib.Path], case: str) -> None:
    assert_refused(bomb_files[case], h5.read_lazy, "claim")


_BOMB_WORKER = """
import json, os, resource, sys
import numpy as np
from vit_core.checkpoint import h5, msgpack
from vit_core.checkpoint.errors import CheckpointError
# Linux keeps a process's peak RSS across exec, so this process reports pytest's peak; a forked
# child starts from this small process's own peak instead, and measures there.
pid = os.fork()
if pid:
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
files = json.loads(sys.argv[1])
h5.read(sys.argv[2]); msgpack.read(sys.argv[3])  # warm up: lazily imported parts of h5py count in the baseline
before = peak()
results = {}
for case, path in files.items():
    try:
        (h5 if path.endswith(".h5") else msgpack).read(path)
        results[case] = "loaded"
    except CheckpointError as e:
        results[case] = "refused" if path in str(e) else "unnamed: " + str(e)[:200]
after = peak()
np.ones(150 * 2**20, np.uint8)  # control: the measure does see a 150 MiB allocation
control = peak() - after
print(json.dumps({"results": results, "growth_kib": after - before, "before_kib": before, "control_kib": control}))
sys.stdout.flush()
os._exit(0)
"""


def test_bombs_peak_memory(bomb_files: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    """All bombs of both formats refused in a fresh process whose peak RSS grows by < 100 MB."""
    valid_h5 = _h5_file(tmp_path)
    valid_mp = tmp_path / "flax_model.msgpack"
    mp.write(valid_mp, lazify({"w": np.ones(4, np.float32)}))
    files = {case: str(path) for case, path in bomb_files.items()}
    run = subprocess.run([sys.executable, "-c", _BOMB_WORKER, json.dumps(files), str(valid_h5), str(valid_mp)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"bombs: {len(files)} refused, peak RSS {report['before_kib']} KiB before, "
          f"growth {report['growth_kib']} KiB (control allocation of 150 MiB: "
          f"{report['control_kib'] / 1024:.1f} MiB)")
    assert report["results"] == {case: "refused" for case in files}
    assert report["growth_kib"] * 1024 < BOMB_RSS_LIMIT
    assert report["control_kib"] * 1024 > BOMB_RSS_LIMIT


H5_DTYPE_CASES: dict[str, Callable[[h5py.Group], object]] = {
    "fixed-string": lambda g: g.create_dataset(WEIGHT, data=np.array([b"ab", b"cd"])),
    "vlen-string": lambda g: g.create_dataset(WEIGHT, data=["ab", "cd"], dtype=h5py.string_dtype()),
    "compound": lambda g: g.create_dataset(WEIGHT, data=np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])),
    "object-reference": lambda g: g.create_dataset(WEIGHT, data=[g.ref], dtype=h5py.ref_dtype),
    "vlen-float": lambda g: g.create_dataset(WEIGHT, shape=(2,), dtype=h5py.vlen_dtype(np.float32)),
    "opaque": lambda g: g.create_dataset(WEIGHT, data=np.zeros(2, dtype="V2")),
    "array-type": lambda g: g.create_dataset(WEIGHT, shape=(2,), dtype=np.dtype(("f4", (3,)))),
    "empty-dataspace": lambda g: g.create_dataset(WEIGHT, data=h5py.Empty("f4")),
    "plugin-filter": lambda g: _plugin_filtered(g),
    "named-datatype": lambda g: g.__setitem__(WEIGHT, np.dtype("f4")),
}


def _plugin_filtered(group: h5py.Group) -> None:
    """A dataset whose pipeline names filter 32015 (an optional, unregistered one): HDF5 would look for a plugin."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((4,))
    dcpl.set_filter(32015, h5py.h5z.FLAG_OPTIONAL)
    group.create_dataset(WEIGHT, shape=(8,), dtype="f4", dcpl=dcpl)[...] = 1.0


@pytest.mark.parametrize("case", list(H5_DTYPE_CASES))
def test_h5_non_tensor_datasets_refused(tmp_path: pathlib.Path, case: str) -> None:
    path = _keras_with(tmp_path, lambda f, g, d: H5_DTYPE_CASES[case](g))
    assert_refused(path, h5.read_lazy, repr(WEIGHT))


def _attrs_case(case: str) -> Callable[[h5py.File, h5py.Group, pathlib.Path], None]:
    def plant(f: h5py.File, g: h5py.Group, d: pathlib.Path) -> None:
        if case == "non-utf8-layer":
            f.attrs["layer_names"] = np.array([b"lay\xffer"])
        elif case == "missing-layer":
            f.attrs["layer_names"] = np.array([b"layer", b"gone"])
        elif case == "layer-names-not-strings":
            f.attrs["layer_names"] = np.arange(3)
        elif case == "layer-is-named-datatype":
            f["dt"] = np.dtype("f4")
            f.attrs["layer_names"] = np.array([b"dt"])
        elif case == "weight-through-dataset":
            f.attrs["layer_names"] = np.array([b"layer/m/layer/good:0/x"])
    return plant


@pytest.mark.parametrize("case,needle", [
    ("non-utf8-layer", "UnicodeDecodeError"), ("missing-layer", "missing"), ("layer-names-not-strings", "list of names"),
    ("layer-is-named-datatype", "neither"), ("weight-through-dataset", "through a dataset"),
])
def test_h5_bad_layer_lists_refused(tmp_path: pathlib.Path, case: str, needle: str) -> None:
    path = tmp_path / "tf_model.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("layer")
        group.create_dataset("m/layer/good:0", data=np.ones(4, np.float32))
        group.attrs["weight_names"] = np.array([b"m/layer/good:0"])
        _attrs_case(case)(f, group, tmp_path)
    assert_refused(path, h5.read_lazy, needle)


def test_h5_other_malformed_files_refused(tmp_path: pathlib.Path) -> None:
    good = _h5_file(tmp_path, "good.h5")
    data = good.read_bytes()
    cases = {"no-layer-names": None, "non-utf8-weight": None, "listed-twice": None, "weight-missing": None,
             "truncated": data[: len(data) // 2], "signature-only": data[:8], "garbage": h5.SIGNATURE + b"\x00" * 4000,
             "empty": b""}
    for case, content in cases.items():
        path = tmp_path / f"{case}.h5"
        if content is not None:
            path.write_bytes(content)
        else:
            with h5py.File(path, "w") as f:
                group = f.create_group("layer")
                group.create_dataset("m/layer/a:0", data=np.ones(2, np.float32))
                if case != "no-layer-names":
                    f.attrs["layer_names"] = np.array([b"layer"])
                group.attrs["weight_names"] = np.array({
                    "no-layer-names": [b"m/layer/a:0"], "non-utf8-weight": [b"m/layer/\xff:0"],
                    "listed-twice": [b"m/layer/a:0", b"m/layer/a:0"], "weight-missing": [b"m/layer/b:0"]}[case])
        assert_refused(path, h5.read_lazy)


def test_h5_writer_refuses_what_it_cannot_write(tmp_path: pathlib.Path) -> None:
    import ml_dtypes

    one = np.zeros(1, np.float32)
    for state in ({"m/w:0": one}, {"m//w:0": one}, {"m/l/a": one, "m/l/a/b": one}, {"m/l/./a": one},
                  {"m/l/w:0": np.zeros(1, ml_dtypes.bfloat16)}):
        with pytest.raises(CheckpointError) as info:
            h5.write(tmp_path / "bad.h5", lazify(state))
        assert "bad.h5" in str(info.value)
        assert not (tmp_path / "bad.h5").exists()  # refused before the file is created


# =============================================================================================
# fuzzing (subprocesses: a crash of a C library fails the test, it does not kill pytest)
# =============================================================================================


def _valid_fuzz_source(kind: str, path: pathlib.Path) -> None:
    """A small valid file whose bytes are mostly structure (tiny tensors)."""
    state = {f"m/layer{i % 3}/w{i}:0": np.arange(i + 1, dtype=["f4", "f2", "i8", "u1"][i % 4]) for i in range(8)}
    if kind == "h5":
        h5.write(path, lazify(state))
        return
    tree = {"params": {"a": {"kernel": _record([2, 2], "float32", b"\x01" * 16), "s": _record([], "int8", b"\x02",
                                                                                            mp.EXT_NPSCALAR)},
                       "big": _chunked({"0": 3, "1": 2}, {"0": _record([4], "float16", b"\x03" * 8),
                                                          "1": _record([2], "float16", b"\x04" * 4)}),
                       **{f"w{i}": _record([i], "uint8", bytes(range(i))) for i in range(6)}}}
    path.write_bytes(_pack(tree))


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Truncation, bit flips in the first 2 KiB (headers), random byte flips, or both."""
    out = bytearray(data)
    how = rng.randrange(4)
    if how in (1, 3):
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(min(len(out), 2048))] ^= 1 << rng.randrange(8)
    if how in (2, 3):
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    if how in (0, 3):
        del out[rng.randrange(len(out)):]
    return bytes(out)


def _fuzz_main(kind: str, folder: str, seconds: float, min_inputs: int, seed: int) -> None:
    """Worker: mutate a valid file until the time is up (and at least ``min_inputs`` were tried); print counts."""
    module = {"h5": h5, "msgpack": mp}[kind]
    source = pathlib.Path(folder) / f"valid.{kind}"
    _valid_fuzz_source(kind, source)
    original = source.read_bytes()
    module.read(source)
    target = pathlib.Path(folder) / ("tf_model.h5" if kind == "h5" else "flax_model.msgpack")
    rng = random.Random(seed)
    counts = {"tried": 0, "clear": 0, "loads": 0, "other": 0}
    others: list[str] = []
    slowest = 0.0
    start = time.monotonic()
    while counts["tried"] < min_inputs or time.monotonic() - start < seconds:
        target.write_bytes(_mutate(original, rng))
        counts["tried"] += 1
        began = time.monotonic()
        try:
            module.read(target)
            counts["loads"] += 1
        except CheckpointError as e:
            counts["clear" if str(target) in str(e) else "other"] += 1
        except BaseException as e:  # noqa: BLE001 - any other class is what this test looks for
            counts["other"] += 1
            others.append(f"input {counts['tried']}: {type(e).__name__}: {str(e)[:200]}")
        slowest = max(slowest, time.monotonic() - began)
    print(json.dumps({**counts, "others": others[:10], "slowest_s": round(slowest, 3)}))


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory: pytest.TempPathFactory):
    """Both formats' fuzzers, started together (they run side by side), as {kind: Popen}."""
    runs = {}
    for seed, kind in enumerate(("h5", "msgpack")):
        folder = tmp_path_factory.mktemp(f"fuzz-{kind}")
        code = (f"from tests.test_container_h5_msgpack import _fuzz_main; "
                f"_fuzz_main({kind!r}, {str(folder)!r}, {FUZZ_SECONDS}, {FUZZ_MIN_INPUTS}, {seed})")
        runs[kind] = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.communicate()


@pytest.mark.parametrize("kind", ["h5", "msgpack"])
def test_fuzz(fuzz_runs: dict[str, subprocess.Popen], kind: str) -> None:
    """Mutated files end in a CheckpointError naming the file or a load: no other exception, hang or crash."""
    try:
        out, err = fuzz_runs[kind].communicate(timeout=FUZZ_SECONDS * 4 + 60)
    except subprocess.TimeoutExpired:
        fuzz_runs[kind].kill()
        pytest.fail(f"{kind} fuzzer hung (the input is left in the fuzz folder)")
    assert fuzz_runs[kind].returncode == 0, f"{kind} fuzzer died with code {fuzz_runs[kind].returncode}: {err[-2000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    print(f"fuzz {kind}: {report}")
    assert report["other"] == 0, report["others"]
    assert report["tried"] >= FUZZ_MIN_INPUTS and report["tried"] == report["clear"] + report["loads"]
    assert report["clear"] > 0
