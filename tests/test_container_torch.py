"""vit_core.checkpoint.torch_zip: torch's zip and legacy formats read without torch or running
anything, the hostile files it refuses (each built here), and the torch-free zip writer."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pathlib
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vit_core.checkpoint import dtypes
from vit_core.checkpoint import torch_pickle as tp
from vit_core.checkpoint import torch_zip as tz
from vit_core.checkpoint.errors import CheckpointError
from vit_core.checkpoint.lazy import lazify, lazy_from_array

FORMATS = ["zip", "legacy"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# A tiny pickle assembler and the two containers, for hand-made (hostile) files
# --------------------------------------------------------------------------------------------

P2 = b"\x80\x02"


def g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def i(n: int) -> bytes:
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def tup(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def pid(fmt: str, key: str = "0", numel: int = 4, storage: bytes | None = None) -> bytes:
    """A storage record: 5 fields in the zip format, 6 (no view) in the legacy one."""
    fields = [s("storage"), storage or g("torch", "FloatStorage"), s(key), s("cpu"), i(numel)]
    return tup(*fields, *([b"N"] if fmt == "legacy" else [])) + b"Q"


def tensor(storage: bytes, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    return call(g("torch._utils", "_rebuild_tensor_v2"), storage, i(offset), tup(*map(i, size)),
                tup(*map(i, stride)), b"\x89", call(g("collections", "OrderedDict")))


def state(*items: tuple[str, bytes]) -> bytes:
    return P2 + b"}(" + b"".join(s(k) + v for k, v in items) + b"u."


def container(fmt: str, path: pathlib.Path, obj: bytes, storages: dict[str, tuple[int, bytes]] | None = None,
              *, header: bytes | None = None, byteorder: bytes | None = None,
              compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
    """``obj`` (a pickle) with its storages (key -> (numel, bytes)) in torch's zip or legacy layout."""
    storages = {} if storages is None else storages
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", compression=compression) as z:
            z.writestr("archive/data.pkl", obj)
            if byteorder is not None:
                z.writestr("archive/byteorder", byteorder)
            for key, (_, data) in storages.items():
                z.writestr(f"archive/data/{key}", data)
            z.writestr("archive/version", "3\n")
        return path
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = header if header is not None else (pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
                                              + pickle.dumps(sys_info, 2))
    tail = b"".join(struct.pack("<q", numel) + data for numel, data in storages.values())
    path.write_bytes(head + obj + pickle.dumps(list(storages), 2) + tail)
    return path


def floats(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def refused(path: pathlib.Path, *fragments: str) -> str:
    """The CheckpointError message of reading ``path``; it names the file and each fragment."""
    with pytest.raises(CheckpointError) as error:
        tz.read(path)
    message = str(error.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------------------------
# Detection and what real torch files read back as
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head,kind", [
    (b"PK\x03\x04rest", "torch"), (b"PK\x05\x06", "torch"), (b"\x80\x02\x8a\x0a", "torch_legacy"),
    (b"\x80\x05\x95", "torch_legacy"), (b"\x80\x01", None), (b"\x80\x06", None), (b"\x80", None), (b"", None),
    (b"\x89HDF\r\n", None), (b"PK\x07\x08", None),
])
def test_sniff(head: bytes, kind: str | None) -> None:
    assert tz.sniff(head) == kind


def _vit_like_state(torch: Any) -> "collections.OrderedDict[str, Any]":
    """A module state dict (so it carries ``_metadata``, set by BUILD) with ViT-shaped weights and
    every layout the reader must rebuild: views, offsets, shared storages, every common dtype."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 48)
    sd = layer.state_dict()
    qkv = sd["weight"]
    base = torch.randn(6, 5)
    sd.update({
        "vit.embeddings.cls_token": torch.randn(1, 1, 16),
        "vit.embeddings.position_embeddings": torch.randn(1, 5, 16).half(),
        "vit.encoder.layer.0.attention.attention.query.weight": qkv[:16],  # offset views of one storage
        "vit.encoder.layer.0.attention.attention.key.weight": qkv[16:32],
        "vit.encoder.layer.0.attention.attention.value.weight": qkv[32:],
        "vit.encoder.layer.0.output.dense.weight": base.t(),  # non-contiguous
        "vit.encoder.layer.0.output.dense.bias": base[:, 1],  # strided column
        "vit.layernorm.weight": torch.randn(16).to(torch.bfloat16),
        "vit.embeddings.position_ids": torch.arange(5).expand((1, -1)),  # int64, stride 0 on a size-1 dim
        "classifier.weight": torch.nn.Parameter(torch.randn(3, 16)),
        "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False]),
    })
    assert hasattr(sd, "_metadata")
    return sd


def _assert_same(got: dict[str, np.ndarray], reference: dict[str, Any], torch: Any) -> None:
    assert list(got) == list(reference)
    for key, value in reference.items():
        value = value.detach()
        if value.dtype == torch.bfloat16:
            assert got[key].dtype.name == "bfloat16"
            assert np.array_equal(got[key].view(np.uint16), value.view(torch.int16).numpy().view(np.uint16))
        else:
            assert got[key].dtype == value.numpy().dtype and np.array_equal(got[key], value.numpy()), key


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_files_read_back_bitwise(tmp_path: pathlib.Path, fmt: str) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "pytorch_model.bin"
    torch.save(_vit_like_state(torch), path, _use_new_zipfile_serialization=fmt == "zip")
    assert tz.sniff(path.read_bytes()[:8]) == ("torch" if fmt == "zip" else "torch_legacy")
    lazy = tz.read_lazy(path)
    reference = torch.load(path, weights_only=True)
    for key, value in reference.items():  # shapes and dtypes are known before any data is read
        assert lazy[key].shape == tuple(value.shape) and lazy[key].dtype.isnative
    view = lazy["vit.embeddings.cls_token"].load()
    assert not view.flags.writeable and not view.flags.owndata  # a view of the mapped file, not a copy
    _assert_same(tz.read(path), reference, torch)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoints_are_unwrapped(tmp_path: pathlib.Path, fmt: str, wrapper: str) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "ckpt.pt"
    sd = {"w": torch.arange(4.0), "b": torch.ones(2, dtype=torch.int32)}
    torch.save({wrapper: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path, _use_new_zipfile_serialization=fmt == "zip")
    got = tz.read(path)
    assert list(got) == ["w", "b"] and np.array_equal(got["w"], np.arange(4.0, dtype=np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_without_ml_dtypes_is_float32_exactly(tmp_path: pathlib.Path, fmt: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.bin"
    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    torch.save({"b": bf16, "bt": bf16.t()}, path, _use_new_zipfile_serialization=fmt == "zip")
    monkeypatch.setattr(dtypes, "bfloat16", lambda: None)
    lazy = tz.read_lazy(path)
    assert lazy["b"].dtype == np.float32
    got = tz.read(path)
    assert got["b"].dtype == np.float32 and np.array_equal(got["b"], bf16.float().numpy())
    assert np.array_equal(got["bt"], bf16.t().float().numpy())


def test_big_endian_zip_reads_native(tmp_path: pathlib.Path) -> None:
    values = (np.arange(6) / 7).astype(">f4")
    bits = np.array([0x3F80, 0xC000], dtype=">u2")  # bfloat16 1.0, -2.0
    obj = state(("w", tensor(pid("zip", "0", 6), (2, 3), (1, 2))),
                ("b", tensor(pid("zip", "1", 2, g("torch", "BFloat16Storage")), (2,), (1,))))
    path = container("zip", tmp_path / "be.bin", obj, {"0": (6, values.tobytes()), "1": (2, bits.tobytes())},
                     byteorder=b"big")
    got = tz.read(path)
    assert got["w"].dtype.isnative and np.array_equal(got["w"], values.astype("=f4").reshape(3, 2).T)
    assert np.array_equal(got["b"].astype(np.float32), [1.0, -2.0])


def test_deflated_members_read_and_bad_crc_is_refused(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    stored = tmp_path / "stored.bin"
    torch.save({"w": torch.randn(8, 8), "i": torch.arange(3)}, stored)
    deflated = tmp_path / "deflated.bin"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert all(np.array_equal(a, b) for a, b in zip(tz.read(stored).values(), tz.read(deflated).values()))
    with zipfile.ZipFile(stored) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/0")))
    data = bytearray(stored.read_bytes())
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
    data[local + 30 + name_len + extra_len] ^= 0xFF
    stored.write_bytes(bytes(data))
    tz.read_lazy(stored)  # the lazy reader touches no storage bytes
    refused(stored, "CRC")


# --------------------------------------------------------------------------------------------
# Code in the pickle: refused in both formats, never run
# --------------------------------------------------------------------------------------------


class _RunsCode:
    """A pickle payload that runs ``func(arg)`` when unpickled by a plain unpickler."""

    def __init__(self, func: Any, arg: Any) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return (self.func, (self.arg,))


def _payloads(marker: pathlib.Path) -> dict[str, Callable[[str], bytes]]:
    """Hostile object pickles by kind (each would create ``marker``), given the format."""
    touch = f"touch {marker}"
    create = f"open({str(marker)!r}, 'w').close()"
    getattr_chain = (P2 + g("builtins", "getattr") + b"(" + g("builtins", "__import__") + b"(" + s("os") + b"tR"
                     + s("system") + b"tR(" + s(touch) + b"tR.")
    return {
        "os.system-GLOBAL": lambda fmt: pickle.dumps(_RunsCode(os.system, touch), protocol=2),
        "os.system-STACK_GLOBAL": lambda fmt: pickle.dumps(_RunsCode(os.system, touch), protocol=4),
        "builtins.eval": lambda fmt: pickle.dumps(_RunsCode(eval, create), protocol=2),
        "builtins.exec": lambda fmt: pickle.dumps(_RunsCode(exec, create), protocol=4),
        "getattr-chain": lambda fmt: getattr_chain,
        "reduce-class": lambda fmt: pickle.dumps(_RunsCode(pathlib.Path.touch, pathlib.Path(marker)), protocol=4),
        "inside-state-dict": lambda fmt: state(("w", tensor(pid(fmt), (4,), (1,))),
                                               ("x", pickle.dumps(_RunsCode(os.system, touch), 2)[2:-1])),
        "nested-INST": lambda fmt: b"(dp0\nVw\np1\n(V" + touch.encode() + b"\nios\nsystem\np2\ns.",
        "nested-OBJ": lambda fmt: P2 + b"}" + s("w") + b"(" + g("os", "system") + s(touch) + b"os.",
        "REDUCE-on-a-str": lambda fmt: P2 + s("os.system") + tup(s(touch)) + b"R.",
    }


PAYLOADS = list(_payloads(pathlib.Path("x")))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_code_in_the_pickle_is_refused_not_run(tmp_path: pathlib.Path, fmt: str, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind](fmt)
    path = container(fmt, tmp_path / "pytorch_model.bin", payload, {"0": (4, floats(1, 2, 3, 4))})
    refused(path, "refused")
    assert not marker.exists()
    if fmt == "legacy":  # also as the very first pickle, where the magic number belongs
        path = container(fmt, tmp_path / "first.bin", b"", header=payload)
        refused(path, "refused" if tz.sniff(payload) else "not a torch checkpoint")
        assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_code_saved_by_torch_is_refused_not_run(tmp_path: pathlib.Path, fmt: str) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "payload": _RunsCode(os.system, f"touch {marker}")}, path,
               _use_new_zipfile_serialization=fmt == "zip")
    refused(path, f"{os.system.__module__}.system", "refused")
    assert not marker.exists()


def _build_onto(target: bytes, state_: bytes) -> bytes:
    """A state dict with one good tensor, then BUILD of ``state_`` onto ``target``."""
    return P2 + b"}(" + s("x") + target + state_ + b"bu."


def _attrs(**values: bytes) -> bytes:
    return b"}(" + b"".join(s(k) + v for k, v in values.items()) + b"u"


BUILD_TARGETS = {
    "rebuild-function-slots": (g("torch._utils", "_rebuild_tensor_v2"),
                               tup(b"N", _attrs(__defaults__=tup(b"\x88", s("pwned"), b"N"), __qualname__=s("pwned")))),
    "rebuild-function-dict": (g("torch._utils", "_rebuild_parameter"), _attrs(__defaults__=tup(b"\x88"))),
    "storage-type": (g("torch", "FloatStorage"), _attrs(code=s("<f8"))),
    "storage-type-slots": (g("torch", "FloatStorage"), tup(b"N", _attrs(code=s("<f8")))),
    "OrderedDict-class": (g("collections", "OrderedDict"), tup(b"N", _attrs(pwned=b"\x88"))),
    "Tensor-stand-in": (g("torch", "Tensor"), tup(b"N", _attrs(pwned=b"\x88"))),
    "device-function": (g("torch", "device"), tup(b"N", _attrs(__qualname__=s("pwned")))),
    "plain-dict": (b"}", _attrs(pwned=b"\x88")),
    "own-dict-dunder": (call(g("collections", "OrderedDict")), _attrs(__class__=s("pwned"))),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(BUILD_TARGETS))
def test_build_cannot_touch_vitx_objects(tmp_path: pathlib.Path, fmt: str, kind: str) -> None:
    helpers = [tp._rebuild_tensor_v2, tp._rebuild_parameter, tp._torch_device]
    before = [(f.__defaults__, f.__qualname__) for f in helpers]
    target, attrs = BUILD_TARGETS[kind]
    path = container(fmt, tmp_path / "m.bin", _build_onto(target, attrs))
    refused(path, "BUILD")
    assert [(f.__defaults__, f.__qualname__) for f in helpers] == before
    assert vars(tp._STORAGE_TYPES["FloatStorage"]) == {"name": "FloatStorage", "code": "<f4", "bf16": False}
    assert not hasattr(tp._TensorType, "pwned") and not hasattr(collections.OrderedDict, "pwned")


@pytest.mark.parametrize("fmt", FORMATS)
def test_build_onto_its_own_state_dict_keeps_working(tmp_path: pathlib.Path, fmt: str) -> None:
    obj = (P2 + call(g("collections", "OrderedDict")) + _attrs(_metadata=_attrs(**{"": _attrs(version=i(1))}))
           + b"b(" + s("w") + tensor(pid(fmt), (2, 2), (2, 1)) + b"u.")
    path = container(fmt, tmp_path / "m.bin", obj, {"0": (4, floats(1, 2, 3, 4))})
    assert np.array_equal(tz.read(path)["w"], [[1, 2], [3, 4]])


# --------------------------------------------------------------------------------------------
# Records that do not fit their storage, and other malformed records: refused, naming the file
# --------------------------------------------------------------------------------------------

BAD_RECORDS: dict[str, tuple[Callable[[str], bytes], str]] = {
    "overlapping-view": (lambda fmt: tensor(pid(fmt), (2, 2), (1, 1)), "overlaps itself"),
    "expanded-dim": (lambda fmt: tensor(pid(fmt), (4,), (0,)), "overlaps itself"),
    "more-elements-than-storage": (lambda fmt: tensor(pid(fmt), (5,), (1,)), "claims 5 elements"),
    "past-the-end": (lambda fmt: tensor(pid(fmt), (4,), (1,), offset=1), "past the end"),
    "negative-stride": (lambda fmt: tensor(pid(fmt), (2,), (-1,), offset=3), "invalid tensor record"),
    "negative-offset": (lambda fmt: tensor(pid(fmt), (2,), (1,), offset=-1), "invalid tensor record"),
    "size-stride-mismatch": (lambda fmt: tensor(pid(fmt), (2, 2), (1,)), "invalid tensor record"),
    "str-size": (lambda fmt: call(g("torch._utils", "_rebuild_tensor_v2"), pid(fmt), i(0), tup(s("4")), tup(i(1))),
                 "invalid size"),
    "str-not-a-storage": (lambda fmt: call(g("torch._utils", "_rebuild_tensor_v2"), s("0"), i(0), tup(i(1)),
                                           tup(i(1))), "tensor record refers to str, not a storage"),
    "str-storage-type": (lambda fmt: tensor(pid(fmt, storage=s("FloatStorage")), (4,), (1,)), "not a storage type"),
    "short-persistent-id": (lambda fmt: call(g("torch._utils", "_rebuild_tensor_v2"), tup(s("storage")) + b"Q",
                                             i(0), tup(i(1)), tup(i(1))), "unsupported persistent record"),
    "parameter-of-a-str": (lambda fmt: call(g("torch._utils", "_rebuild_parameter"), s("w"), b"\x89"),
                           "parameter record holds a str"),
    "int-entry": (lambda fmt: i(3), "entry 'w' is a int, not a tensor"),
    "storage-key-recorded-twice": (lambda fmt: tup(tensor(pid(fmt), (4,), (1,)), tensor(pid(fmt, numel=2), (2,), (1,))),
                                   "recorded twice"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_records_are_refused(tmp_path: pathlib.Path, fmt: str, kind: str) -> None:
    record, expected = BAD_RECORDS[kind]
    obj = state(("w", record(fmt)))
    storages = {"0": (4, floats(1, 2, 3, 4))} if b"FloatStorage" in obj else {}  # legacy: data needs a record
    path = container(fmt, tmp_path / "m.bin", obj, storages)
    refused(path, expected)


def test_missing_and_unrecorded_storages(tmp_path: pathlib.Path) -> None:
    good = state(("w", tensor(pid("zip"), (4,), (1,))))
    refused(container("zip", tmp_path / "a.bin", good), "missing from the archive")
    good = state(("w", tensor(pid("legacy"), (4,), (1,))))
    refused(container("legacy", tmp_path / "b.bin", good), "without data")
    refused(container("legacy", tmp_path / "c.bin", good, {"0": (4, floats(1, 2, 3, 4)), "9": (1, floats(1))}),
            "no record")
    short = container("legacy", tmp_path / "d.bin", good, {"0": (4, floats(1, 2, 3, 4))})
    short.write_bytes(short.read_bytes()[:-1])
    refused(short, "truncated")
    lying = container("legacy", tmp_path / "e.bin", good, {"0": (3, floats(1, 2, 3, 4))})
    refused(lying, "holds 3 elements, its record claims 4")
    not_torch = tmp_path / "f.bin"
    not_torch.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    refused(not_torch, "magic number")


# --------------------------------------------------------------------------------------------
# Memory bombs: refused before anything is allocated
# --------------------------------------------------------------------------------------------


def _patch_declared_size(path: pathlib.Path, member: str, size: int) -> None:
    """Make ``member`` declare ``size`` uncompressed bytes in its local header and the central directory."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
        start = z.start_dir
    struct.pack_into("<I", data, info.header_offset + 22, size)
    at = start
    while data[at:at + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[at + 28:at + 34])
        if data[at + 46:at + 46 + n].decode() == member:
            struct.pack_into("<I", data, at + 24, size)
        at += 46 + n + m + k
    path.write_bytes(bytes(data))


def _bombs(d: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """Small files that would each make a naive reader allocate gigabytes; by name: (file, refusal)."""
    one = {"0": (1, floats(1))}
    bombs = {}
    for fmt in FORMATS:
        stride_bomb = state(("w", tensor(pid(fmt, numel=1), (46_000, 46_000), (0, 0))))
        bombs[f"{fmt}-strides-0-0"] = (container(fmt, d / f"{fmt}-strides.bin", stride_bomb, one), "claims")
        numel = 40 * 10**9  # 160 GB of float32
        huge = state(("w", tensor(pid(fmt, numel=numel), (numel,), (1,))))
        storages = {"0": (numel, floats(1))}
        bombs[f"{fmt}-numel-160GB"] = (container(fmt, d / f"{fmt}-numel.bin", huge, storages), "claims")
    legacy_bytes8 = P2 + b"\x8e" + struct.pack("<Q", 2**40) + b"tiny."  # BINBYTES8 claiming a terabyte
    bombs["legacy-BINBYTES8-1TB"] = (container("legacy", d / "bytes8.bin", legacy_bytes8), "refused")
    zip_bytes8 = d / "zip-bytes8.bin"
    container("zip", zip_bytes8, legacy_bytes8)
    bombs["zip-BINBYTES8-1TB"] = (zip_bytes8, "cannot read")
    pkl = container("zip", d / "pkl-bomb.bin", state(("w", tensor(pid("zip"), (4,), (1,)))),
                    {"0": (4, floats(1, 2, 3, 4))}, compression=zipfile.ZIP_DEFLATED)
    _patch_declared_size(pkl, "archive/data.pkl", 0xFFFF0000)
    bombs["zip-deflated-data.pkl-4GB"] = (pkl, "more than the")
    numel = 2**30 - 1
    storage = container("zip", d / "storage-bomb.bin", state(("w", tensor(pid("zip", numel=numel), (numel,), (1,)))),
                        {"0": (numel, bytes(4096))}, compression=zipfile.ZIP_DEFLATED)
    _patch_declared_size(storage, "archive/data/0", numel * 4)
    bombs["zip-deflated-storage-4GB"] = (storage, "zip bomb")
    return bombs


def test_memory_bombs_are_refused(tmp_path: pathlib.Path) -> None:
    for name, (path, expected) in _bombs(tmp_path).items():
        message = refused(path, expected)
        assert len(message) < 600, name


def test_memory_bombs_peak_memory_stays_small(tmp_path: pathlib.Path) -> None:
    """In a fresh interpreter (this one's high-water mark would hide growth): the peak resident size
    (VmHWM) above the resident size before, while every bomb is read; a 64 MiB allocation shows
    the meter works."""
    paths = [str(path) for path, _ in _bombs(tmp_path).values()]
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from vit_core.checkpoint import torch_zip
        from vit_core.checkpoint.errors import CheckpointError

        def status_kib(field):  # this process's own memory (ru_maxrss would carry the parent's peak)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

        def reset_peak():  # the high-water mark back to the resident size (Linux >= 4.0), if allowed
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            return status_kib("VmRSS")

        before = reset_peak()
        refused = 0
        for path in sys.argv[1:]:
            try:
                torch_zip.read(path)
            except CheckpointError:
                refused += 1
        growth = status_kib("VmHWM") - before
        before = reset_peak()
        control = np.ones(2**23)  # 64 MiB, touched: shows the meter sees an allocation of that size
        print(refused, growth, status_kib("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=True).stdout.split()
    refused_count, growth_kib, control_kib = map(int, out)
    print(f"\nbombs refused: {refused_count}/{len(paths)}; peak RSS growth {growth_kib} KiB "
          f"(a 64 MiB control allocation: {control_kib} KiB)")
    assert refused_count == len(paths)
    assert growth_kib < 100 * 1024
    assert control_kib > 48 * 1024


# --------------------------------------------------------------------------------------------
# Deep nesting: a CheckpointError naming the file, never a RecursionError or a crash
# --------------------------------------------------------------------------------------------

DEPTH = 100_000
NESTED: dict[str, tuple[Callable[[str], bytes], str]] = {
    "lists": (lambda fmt: P2 + b"]" * DEPTH + b"a" * (DEPTH - 1) + b".", "holds a list"),
    "dicts": (lambda fmt: P2 + (b"}" + s("k")) * DEPTH + b"}" + b"s" * DEPTH + b".", "entry 'k' is a dict"),
    "model-wrappers": (lambda fmt: P2 + (b"}" + s("model")) * DEPTH + b"}" + b"s" * DEPTH + b".",
                       "entry 'model' is a dict"),
    "tuples": (lambda fmt: P2 + b")" + b"\x85" * DEPTH + b".", "holds a tuple"),
    "marks": (lambda fmt: P2 + b"(" * DEPTH + b"l" * DEPTH + b".", "holds a list"),
    "tuple-as-key": (lambda fmt: P2 + b"}" + b")" + b"\x85" * DEPTH + s("v") + b"s.", "tuple as a dict key"),
    "tuple-as-storage": (lambda fmt: state(("w", call(g("torch._utils", "_rebuild_tensor_v2"),
                                                      b")" + b"\x85" * DEPTH + b"Q", i(0), tup(i(1)), tup(i(1))))),
                         "unsupported persistent record"),
    "lists-in-a-value": (lambda fmt: state(("w", b"]" * DEPTH + b"a" * (DEPTH - 1))), "entry 'w' is a list"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(NESTED))
def test_deep_nesting_is_a_checkpoint_error(tmp_path: pathlib.Path, fmt: str, kind: str) -> None:
    build, expected = NESTED[kind]
    message = refused(container(fmt, tmp_path / "deep.bin", build(fmt)), expected)
    assert len(message) < 400  # no echo of the file's contents


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _writer_state() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((4, 3)).astype(np.float32), "h": rng.standard_normal(5).astype(np.float16),
        "b": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16), "i": np.arange(6, dtype=np.int64).reshape(2, 3),
        "m": np.array([True, False]), "empty": np.zeros((0, 3), np.float32), "s": np.array(2.5, np.float64),
        "u8": np.arange(300, dtype=np.int64).astype(np.uint8),
    }


# sha256 of what the writer produces for _writer_state(), checked equal to the old
# conversion.io.write_torch_zip (commit cb3e996): pins those bytes once the old module is gone.
WRITER_SHA256 = "e046f5ec02dcd8155d80ecb7274945d564ac4d1c8b7fdfac4405d796cb063958"


def test_writer_bytes_match_the_old_writer(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "new.bin"
    tz.write(path, lazify(_writer_state()))
    try:
        from conversion.io import write_torch_zip
    except ImportError:  # the old module is gone: the pinned digest still holds the bytes
        write_torch_zip = None
    if write_torch_zip is not None:
        old = tmp_path / "old.bin"
        write_torch_zip(old, lazify(_writer_state()))
        assert path.read_bytes() == old.read_bytes()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WRITER_SHA256
    with zipfile.ZipFile(path) as z:  # every record 64-byte aligned
        for info in z.infolist():
            raw = path.read_bytes()
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_torch_reads_what_the_writer_writes(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    state = _writer_state()
    state["big_endian_f32"] = (np.arange(5) / 3).astype(">f4")
    state["big_endian_i64"] = np.arange(-3, 3, dtype=">i8")
    state["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T
    path = tmp_path / "pytorch_model.bin"
    progress: list[int] = []
    tz.write(path, lazify(state), progress=progress.append)
    assert progress == [value.nbytes for value in state.values()]
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert list(loaded) == list(state)
        for key, value in state.items():
            if key == "b":
                assert loaded[key].dtype == torch.bfloat16
                assert np.array_equal(loaded[key].view(torch.int16).numpy().view(np.uint16), value.view(np.uint16))
            else:
                assert np.array_equal(loaded[key].numpy(), value) and loaded[key].shape == value.shape, key
    again = tz.read(path)
    assert all(np.array_equal(again[k].reshape(-1).view(np.uint8), dtypes.native(v).reshape(-1).view(np.uint8))
               for k, v in state.items())


def test_writer_refusals_name_the_problem(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointError, match="no torch storage type"):
        tz.write(tmp_path / "u16.bin", {"x": lazy_from_array(np.zeros(2, np.uint16))})
    assert not (tmp_path / "u16.bin").exists()
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(CheckpointError) as error:
        tz.write(tmp_path / "a_directory", lazify({"x": np.zeros(2, np.float32)}))
    assert str(tmp_path / "a_directory") in str(error.value)


# --------------------------------------------------------------------------------------------
# Fuzz: every mutation of a valid file loads or ends in a CheckpointError naming the file
# --------------------------------------------------------------------------------------------


class _Hang(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def _pickle_span(data: bytes) -> tuple[int, int]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo("archive/data.pkl")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def _mutations(data: bytes, rng: random.Random, span: tuple[int, int]) -> Callable[[], bytes]:
    def mutate() -> bytes:
        out = bytearray(data)
        kind = rng.randrange(3)
        if kind == 0:
            return bytes(out[:rng.randrange(len(out))])
        if kind == 1:
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(min(len(out), 4096))
                out[at] ^= 1 << rng.randrange(8)
            return bytes(out)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(*span)] = rng.randrange(256)
        return bytes(out)
    return mutate


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_mutations_load_or_fail_cleanly(tmp_path: pathlib.Path, fmt: str) -> None:
    state = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "a.bias": np.arange(3, dtype=np.int64),
             "b": np.ones((2, 2), np.float16)}
    source = tmp_path / "source.bin"
    if fmt == "zip":
        tz.write(source, lazify(state))
        data = source.read_bytes()
        span = _pickle_span(data)
    else:
        obj, storages = _legacy_pickle(state)
        data = container("legacy", source, obj, storages).read_bytes()
        span = (0, len(data) - sum(v.nbytes + 8 for v in state.values()))
    mutate = _mutations(data, random.Random(20240611 + len(fmt)), span)
    path = tmp_path / "mutant.bin"
    counts = {"tried": 0, "errors": 0, "loads": 0}
    other: list[str] = []
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    deadline = time.monotonic() + 10
    try:
        while counts["tried"] < 300 and time.monotonic() < deadline:
            path.write_bytes(mutate())
            counts["tried"] += 1
            signal.setitimer(signal.ITIMER_REAL, 5)
            try:
                tz.read(path)
                counts["loads"] += 1
            except CheckpointError as e:
                if str(path) in str(e):
                    counts["errors"] += 1
                else:
                    other.append(f"unnamed: {e}")
            except _Hang:
                other.append("hang")
            except Exception as e:  # noqa: BLE001 - the point of the test
                other.append(f"{type(e).__name__}: {e}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"\nfuzz {fmt}: {counts}, other {len(other)}")
    assert counts["tried"] >= 100
    assert other == []


def _legacy_pickle(arrays: dict[str, np.ndarray]) -> tuple[bytes, dict[str, tuple[int, bytes]]]:
    """A legacy-format object pickle for ``arrays`` (one contiguous storage per tensor) and its storages."""
    names = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage",
             np.dtype(np.float16): "HalfStorage"}
    items, storages = [], {}
    for index, (key, value) in enumerate(arrays.items()):
        strides = tuple(int(np.prod(value.shape[k + 1:])) for k in range(value.ndim))
        storage = pid("legacy", str(index), value.size, g("torch", names[value.dtype]))
        items.append((key, tensor(storage, value.shape, strides)))
        storages[str(index)] = (value.size, value.astype(value.dtype.newbyteorder("<")).tobytes())
    return state(*items), storages
