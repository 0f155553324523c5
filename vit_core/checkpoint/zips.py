"""What the two zip-based containers (torch's zip format and npz) share about zip members."""

from __future__ import annotations

import pathlib
import struct
import zipfile
from typing import BinaryIO

from .errors import CheckpointError

DEFLATE_MAX_RATIO = 1032  # the most one compressed byte can expand to under deflate


def data_offset(path: pathlib.Path, raw: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's bytes: after its local header, whose extra field (torch's
    alignment padding, for one) may differ from the central directory's."""
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip local header for {info.filename[:80]!r}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len
