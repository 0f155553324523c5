"""Sharded checkpoints: an ``*.index.json`` whose ``weight_map`` names the shard of every weight.

Shard names come from the file and are treated as hostile: only plain file names or relative
paths inside the checkpoint directory are accepted (no absolute paths, ``..``, backslashes, NUL,
drive letters, or symlinks that leave the directory), and an index may not list itself or another
index as a shard.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

from .errors import CheckpointError, reading

MAX_INDEX_BYTES = 64 * 2**20


def sniff(head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


def load(path: pathlib.Path) -> dict[str, str]:
    """The index's weight map (weight name -> shard file name), every shard name checked."""
    with reading(path, "index file"):
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{path}: index file over {MAX_INDEX_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
        try:
            index = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt index file: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:
            raise CheckpointError(f"{path}: corrupt index file: nested too deeply") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: not a sharded-checkpoint index (no 'weight_map' of weight name -> file name)")
    for shard in set(weight_map.values()):
        check_shard_name(path, shard)
    return weight_map


def check_shard_name(index: pathlib.Path, shard: str) -> None:
    parts = pathlib.PurePosixPath(shard).parts
    bad = (not shard or shard.startswith(("/", "~")) or "\\" in shard or "\x00" in shard or ".." in parts
           or (len(shard) > 1 and shard[1] == ":") or shard.endswith(".index.json") or any(p == "." for p in parts))
    if bad:
        raise CheckpointError(f"{index}: refusing shard path {shard[:120]!r}: shards must be files inside the "
                              "checkpoint directory")


def shards(path: pathlib.Path) -> list[str]:
    """Shard file names listed by an index, in first-use order."""
    return list(dict.fromkeys(load(path).values()))


def shard_path(index: pathlib.Path, shard: str) -> pathlib.Path:
    """The shard's path, which must exist and (after symlinks) stay inside the index's directory
    or be a file of the hub cache's blob store (hub snapshots are symlinks into ``../../blobs``)."""
    candidate = index.parent / shard
    if not candidate.is_file():
        raise CheckpointError(f"{index}: shard {shard!r} is missing")
    real = pathlib.Path(os.path.realpath(candidate))
    home = pathlib.Path(os.path.realpath(index.parent))
    inside = home in real.parents
    hub_blob = real.parent.name == "blobs" and index.parent.parent.name == "snapshots"
    if not (inside or hub_blob):
        raise CheckpointError(f"{index}: shard {shard!r} is a link that leaves the checkpoint directory")
    return candidate


def check_complete(path: pathlib.Path, listed: Mapping[str, str], found: set[str]) -> None:
    missing = sorted(set(listed) - found)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weights listed in the index are in no shard: "
                              f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
