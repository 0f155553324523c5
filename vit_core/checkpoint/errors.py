"""The one error family of the checkpoint layer, and the guard that turns every low-level failure
of a container parser into it.

Every message names the file (or hub id) and the key, field or byte offset at fault; it never
echoes the file's contents (a hostile file may point at /etc/shadow).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Iterator

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or fitted to a model.

    The message always names the file (or hub id) and the key or problem.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No weights (or no requested file) at a path or hub id; also an ``OSError``, as in transformers."""


# What a parser may raise on a truncated, corrupt or hostile file. MemoryError and RecursionError
# are here on purpose: a size field or a nesting depth from the file must never escape as one.
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, struct.error,
    zipfile.BadZipFile, zipfile.LargeZipFile, pickle.UnpicklingError, RecursionError, OverflowError,
    MemoryError, UnicodeError, RuntimeError, NotImplementedError, LookupError, zlib.error,
    SyntaxError, tokenize.TokenError,  # numpy's .npy header is a Python literal
)


@contextlib.contextmanager
def reading(path: PathLike, what: str) -> Iterator[None]:
    """Turn any parse failure inside the block into a CheckpointError naming ``path`` and ``what``.

    CheckpointErrors raised inside pass through unchanged (they already name the problem); a
    message that does not yet name the file gets it prefixed.
    """
    where = os.fspath(path)
    try:
        yield
    except CheckpointError as e:
        if where in str(e):
            raise
        raise type(e)(f"{where}: {e}") from e
    except _PARSE_ERRORS as e:
        detail = str(e) if not isinstance(e, (MemoryError, RecursionError)) else type(e).__doc__ or ""
        raise CheckpointError(f"{where}: cannot read {what} (truncated, corrupt or hostile): "
                              f"{type(e).__name__}: {_short(detail)}") from None


def writing(path: PathLike) -> contextlib.AbstractContextManager[None]:
    """Turn OSErrors of a writer (disk full, file too large, read-only) into CheckpointError naming ``path``."""
    return _writing(os.fspath(path))


@contextlib.contextmanager
def _writing(where: str) -> Iterator[None]:
    try:
        yield
    except (CheckpointError, FileExistsError):  # FileExistsError: the destination exists, as the caller says
        raise
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise CheckpointError(f"{where}: cannot write: {reason}") from None
    except RuntimeError as e:  # h5py reports some HDF5 write failures as RuntimeError
        raise CheckpointError(f"{where}: cannot write ({_free_space_hint(where)}): {_short(str(e))}") from None


def _free_space_hint(where: str) -> str:
    try:
        stat = os.statvfs(pathlib.Path(where).parent)
    except OSError:
        return "the disk may be full or read-only"
    return f"{stat.f_bavail * stat.f_frsize} bytes free on its file system"


def _short(text: str, limit: int = 200) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
