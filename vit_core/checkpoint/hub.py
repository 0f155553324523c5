"""Hub resolution: a local path or a hub id ("org/name") -> a local path, through huggingface_hub's cache."""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import Iterable

from . import index
from .errors import CheckpointError, CheckpointNotFoundError, PathLike
from .files import WEIGHT_FILES

logger = logging.getLogger("vitx.checkpoint")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_pretrained(
    path_or_id: PathLike,
    *,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    filenames: Iterable[str] = ("config.json",) + WEIGHT_FILES,
    force_download: bool = False,
) -> pathlib.Path:
    """Turn a local path or a hub id into a local path.

    A local directory or file is returned as is. Anything else must be a hub id ("org/name"): each
    of ``filenames`` is fetched with ``huggingface_hub.hf_hub_download`` into its usual cache
    (honouring ``HF_HUB_OFFLINE``, ``revision``, ``cache_dir``, ``token``, ``local_files_only``)
    and the snapshot directory is returned. Names that are not weight files (``config.json``) are
    fetched when the repo has them; of the names in ``WEIGHT_FILES`` only the first one the repo
    has is fetched (with its shards when it is an ``.index.json``), so a repo holding weights in
    four formats costs one download. Files the repo lacks are skipped.

    Raises CheckpointNotFoundError naming the id and the files looked for when none was found (or
    when weight files were asked for and none exists), CheckpointError for an unknown repo or revision.
    """
    path = pathlib.Path(path_or_id).expanduser()
    if path.exists():
        return path
    repo_id = os.fspath(path_or_id)
    if not _HUB_ID.match(repo_id) or repo_id.startswith((".", "~")):
        raise CheckpointNotFoundError(f"{repo_id}: no such file or directory (and not a hub id like 'org/name')")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # hf_hub_download reads HF_HUB_OFFLINE once, when huggingface_hub is imported; re-read it.
    offline = local_files_only or _env_offline()
    names = list(filenames)
    weight_names = [n for n in names if n in WEIGHT_FILES]
    other_names = [n for n in names if n not in WEIGHT_FILES]

    def where() -> str:
        return repo_id + (f" (revision {revision})" if revision else "") + (" [offline: cache only]" if offline else "")

    def fetch(filename: str) -> pathlib.Path | None:
        nonlocal offline
        try:
            return pathlib.Path(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline,
                **({"force_download": True} if force_download and not offline else {}),
            ))
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError in huggingface_hub 0.x)
            if not offline:
                # Online, this means the hub could not be reached (after huggingface_hub's retries):
                # look at the cache only for the remaining candidates instead of retrying each one.
                logger.warning("%s: the hub cannot be reached; using only files already in the cache", repo_id)
                offline = True
            return None
        except EntryNotFoundError:  # the repo has no such file
            return None
        except RevisionNotFoundError as e:
            raise CheckpointError(f"{repo_id}: revision {revision!r} not found on the hub ({e})") from e
        except RepositoryNotFoundError as e:
            raise CheckpointNotFoundError(
                f"{repo_id}: repository not found on the hub (or gated/private: pass token=...) ({e})"
            ) from e

    found: list[pathlib.Path] = [p for p in map(fetch, other_names) if p is not None]
    weights_found = False
    for name in weight_names:
        file = fetch(name)
        if file is None:
            continue
        found.append(file)
        if name.endswith(".index.json"):
            for shard in index.shards(file):
                if fetch(shard) is None:
                    raise CheckpointNotFoundError(f"{where()}: {name} lists shard {shard!r}, which is not available")
        weights_found = True
        break
    if not found or (weight_names and not weights_found):
        looked = ", ".join(weight_names or other_names)
        raise CheckpointNotFoundError(f"{where()}: none of {looked} could be found in the hub repo or its cache")
    return found[0].parent
