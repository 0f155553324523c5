"""The one way the checkpoint layer puts a file or a directory in place.

Everything is written beside its destination (a temporary file or directory in the same
folder), fsync'd, and then put in place in one step, so that at every instant the destination
holds either the complete old version or the complete new one:

- a new destination appears with ``rename(..., RENAME_NOREPLACE)``: of two writers racing for
  the same path exactly one wins, the other gets ``FileExistsError``;
- an existing directory is replaced with ``rename(..., RENAME_EXCHANGE)`` (Linux renameat2),
  one atomic swap, and the old version is deleted afterwards;
- an existing file is replaced with ``os.replace`` (atomic for files everywhere).

Where renameat2 is missing (not Linux, an old kernel, a file system without it) a directory is
replaced by two renames (old away, new in); the docstring of :func:`staged_dir` says what that
costs. Finished files get the usual ``0666 & ~umask`` mode (mkstemp would leave 0600), folders
``0777 & ~umask``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

from .errors import CheckpointError, writing

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

# Files a checkpoint directory may hold (transformers, vitx and timm names); ``--force`` replaces
# a directory only when everything in it matches, unless told to replace anything.
CHECKPOINT_FILE_PATTERNS: tuple[str, ...] = (
    "config.json", "preprocessor_config.json", "metrics.json", "README.md", "model.npz",
    "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin",
    "tf_model.h5", "tf_model.h5.index.json", "tf_model-*-of-*.h5",
    "flax_model.msgpack", "flax_model.msgpack.index.json", "flax_model-*-of-*.msgpack",
)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _libc_renameat2() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _libc_renameat2()


class _Unsupported(Exception):
    """renameat2 with this flag is not available for this path."""


def _renameat2(source: pathlib.Path, target: pathlib.Path, flags: int) -> None:
    if _RENAMEAT2 is None:
        raise _Unsupported
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        raise _Unsupported
    raise OSError(code, os.strerror(code), os.fspath(target))


def rename_noreplace(source: pathlib.Path, target: pathlib.Path) -> None:
    """Move ``source`` to ``target`` only if ``target`` does not exist (FileExistsError otherwise)."""
    try:
        _renameat2(source, target, _RENAME_NOREPLACE)
        return
    except _Unsupported:
        pass
    except FileExistsError:
        raise FileExistsError(f"{target} already exists (another writer created it first; "
                              "pass force=True / --force to overwrite)") from None
    if source.is_dir():
        # Without renameat2, rename() would silently replace an empty directory: refuse any target.
        if os.path.lexists(target):
            raise FileExistsError(f"{target} already exists (pass force=True / --force to overwrite)")
        os.rename(source, target)
        return
    try:
        os.link(source, target)  # fails if target exists: the file-system's own compare-and-set
    except FileExistsError:
        raise FileExistsError(f"{target} already exists (pass force=True / --force to overwrite)") from None
    os.unlink(source)


def exchange(source: pathlib.Path, target: pathlib.Path) -> bool:
    """Swap ``source`` and ``target`` in one step; False where the system cannot."""
    try:
        _renameat2(source, target, _RENAME_EXCHANGE)
    except _Unsupported:
        return False
    return True


def fsync_path(path: pathlib.Path) -> None:
    """fsync a file, or a directory's entries (where the system allows opening directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: pathlib.Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = pathlib.Path(folder) / name
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(pathlib.Path(folder))


def _check_parent(target: pathlib.Path) -> None:
    if target.name in ("", ".", ".."):
        raise CheckpointError(f"{target}: give a new directory or file name as the destination, not {target.name or '/'!r}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CheckpointError(f"{target}: its parent {target.parent} is a file") from None
    except OSError as e:
        raise CheckpointError(f"{target}: cannot create its folder: {os.strerror(e.errno) if e.errno else e}") from None


@contextlib.contextmanager
def staged_file(target: str | os.PathLike, *, force: bool = True) -> Iterator[pathlib.Path]:
    """A temporary path beside ``target``; when the block succeeds it is fsync'd and put in place.

    ``force=False`` refuses an existing ``target`` (checked first, and again atomically at the
    end, so a concurrent writer cannot be overwritten). On any failure the temporary file is
    removed and ``target`` is untouched; OSErrors become CheckpointError naming ``target``.
    """
    target = pathlib.Path(target)
    if not force and os.path.lexists(target):
        raise FileExistsError(f"{target} already exists (pass force=True / --force to overwrite)")
    if target.is_dir():
        raise FileExistsError(f"{target} is a directory; cannot replace it with a file")
    _check_parent(target)
    with writing(target):
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    temp = pathlib.Path(name)
    try:
        with writing(target):
            os.chmod(temp, 0o666 & ~umask())
        with _naming(temp, target):
            yield temp
        with writing(target):
            fsync_path(temp)
            if force:
                os.replace(temp, target)
            else:
                rename_noreplace(temp, target)
            fsync_path(target.parent)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(temp: pathlib.Path, target: pathlib.Path) -> Iterator[None]:
    """Errors raised while writing into ``temp`` name ``target``, the path the user gave."""
    try:
        yield
    except CheckpointError as e:
        if str(temp) not in str(e):
            raise
        raise type(e)(str(e).replace(str(temp), str(target))) from None


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Write a small text file (config / preprocessor JSON) atomically, replacing it if present."""
    path = pathlib.Path(path)
    with staged_file(path, force=True) as temp:
        with writing(path):
            temp.write_text(text, encoding="utf-8")
    return path


def foreign_entries(directory: pathlib.Path, patterns: Iterable[str] = CHECKPOINT_FILE_PATTERNS) -> list[str]:
    """Entries of ``directory`` that are not checkpoint files (sub-directories included)."""
    patterns = tuple(patterns)
    out = []
    for child in sorted(directory.iterdir()):
        if child.is_dir() and not child.is_symlink():
            out.append(child.name + "/")
        elif not any(fnmatch.fnmatchcase(child.name, p) for p in patterns):
            out.append(child.name)
    return out


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, force: bool = False, replace_anything: bool = False,
               keep: Callable[[str], bool] | None = None) -> Iterator[pathlib.Path]:
    """A temporary directory beside ``target`` that becomes ``target`` in one step when the block succeeds.

    - ``target`` absent: the new directory is renamed in with RENAME_NOREPLACE; a concurrent
      writer that got there first makes this one fail with FileExistsError.
    - ``target`` present: FileExistsError unless ``force``. With ``force`` it must hold only
      checkpoint files (:data:`CHECKPOINT_FILE_PATTERNS`), else FileExistsError lists what would
      be lost, unless ``replace_anything``. Entries for which ``keep(name)`` is true are carried
      into the new version as hard links before the swap, unless the new version has an entry of
      that name (``save_pretrained`` keeps a directory's other files this way). The swap is RENAME_EXCHANGE; the old version is then
      deleted. Without renameat2 the old version is first renamed aside and the new one renamed
      in: a crash between the two leaves the complete old version beside the destination as
      ``.<name>.<random>.old`` (logged nowhere: it is the fallback of systems without renameat2).

    On any failure the temporary directory is removed and ``target`` is as it was.
    """
    target = pathlib.Path(target)
    _refuse_working_directory(target)
    exists = os.path.lexists(target)
    if exists and not force:
        raise FileExistsError(f"{target} already exists (pass force=True / --force to overwrite)")
    if exists and (target.is_symlink() or not target.is_dir()):
        raise FileExistsError(f"{target} exists and is not a directory")
    if exists and not replace_anything:
        foreign = [e for e in foreign_entries(target) if not (keep and keep(e.rstrip("/")))]
        if foreign:
            shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise FileExistsError(f"{target} holds files that are not part of a checkpoint ({shown}); --force would "
                                  "delete them: remove them, choose another destination, or pass --force-all")
    _check_parent(target)
    with writing(target):
        temp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with _naming(temp, target):
            yield temp
        with writing(target):
            if exists and keep:
                _link_kept(target, temp, keep)
            _fsync_tree(temp)
            os.chmod(temp, 0o777 & ~umask())
            if not os.path.lexists(target):
                rename_noreplace(temp, target)
            elif not force:
                raise FileExistsError(f"{target} already exists (another writer created it first)")
            elif exchange(temp, target):
                shutil.rmtree(temp, ignore_errors=True)  # temp now holds the old version
            else:
                _replace_in_two_steps(temp, target)
            fsync_path(target.parent)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def _link_kept(old: pathlib.Path, new: pathlib.Path, keep: Callable[[str], bool]) -> None:
    """Hard-link (recursively) the entries of ``old`` that ``keep`` accepts into ``new``, where
    ``new`` has no entry of that name yet."""
    for child in old.iterdir():
        if os.path.lexists(new / child.name) or not keep(child.name):
            continue
        if child.is_symlink():
            os.symlink(os.readlink(child), new / child.name)
        elif child.is_dir():
            shutil.copytree(child, new / child.name, symlinks=True, copy_function=os.link)
        else:
            os.link(child, new / child.name)


def swappable(target: pathlib.Path) -> bool:
    """Whether ``target`` can be replaced by a directory swap: not the working directory or one
    of its parents (the process would be left inside the deleted old version), not a mount point."""
    try:
        real = pathlib.Path(os.path.realpath(target))
        cwd = pathlib.Path(os.path.realpath(os.getcwd()))
    except OSError:
        return False
    return not (real == cwd or real in cwd.parents or os.path.ismount(real))


def _refuse_working_directory(target: pathlib.Path) -> None:
    if target.name in ("", ".", "..") or (os.path.lexists(target) and not swappable(target)):
        raise CheckpointError(f"{target}: cannot be replaced as a whole (it is the current directory, one of its "
                              "parents or a mount point): give a new directory name as the destination")


def _replace_in_two_steps(temp: pathlib.Path, target: pathlib.Path) -> None:
    backup = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    backup.rmdir()
    os.rename(target, backup)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
