"""from_pretrained / save_pretrained logic shared by the three frameworks.

A framework only turns the canonical numpy state returned here into its parameters (by kind, see
each framework's weights.py), and hands its parameters back as canonical numpy arrays to save.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .checkpoint import files, staging
from .checkpoint.errors import CheckpointNotFoundError
from .checkpoint.fit import LoadReport, check_config_fits, drop_unused_qkv_bias, match_state_to_model
from .checkpoint.hub import resolve_pretrained
from .checkpoint.lazy import materialize
from .config import CONFIG_NAME, ViTConfig, as_vit_config
from .weights import FOREIGN_HEAD_PATTERNS, HEAD_KEYS, Task, WeightSpec

logger = logging.getLogger("vitx")


# transformers' from_pretrained options that every framework accepts and that change nothing here
# (the container is read from the file's bytes, no remote code is ever run). They never reach the
# config. PyTorch also accepts ``low_cpu_mem_usage`` (loading is lazy and one tensor at a time
# anyway) and a CPU ``device_map``; TF and Flax raise TypeError for those two, as transformers'
# TF and Flax classes do.
NO_EFFECT_OPTIONS: frozenset[str] = frozenset({"trust_remote_code", "from_tf", "from_flax", "from_pt",
                                               "_from_auto", "_from_pipeline"})
TORCH_NO_EFFECT_OPTIONS: frozenset[str] = NO_EFFECT_OPTIONS | {"low_cpu_mem_usage"}
SAFETENSORS_FILES: tuple[str, ...] = ("model.safetensors", "model.safetensors.index.json")
# Weight files of every format (and their shards) that a save replaces: a stale one of another
# format left beside the new weights would be read instead of them (WEIGHT_FILES order).
_WEIGHT_FILE_PATTERNS: tuple[str, ...] = tuple(files.WEIGHT_FILES) + (
    "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin", "tf_model-*-of-*.h5", "flax_model-*-of-*.msgpack",
)
# safe_serialization=False file of each framework (transformers 4.x names).
LEGACY_WEIGHTS: dict[str, tuple[str, str]] = {
    "torch": ("pytorch_model.bin", "pytorch"), "tf": ("tf_model.h5", "tf"), "flax": ("flax_model.msgpack", "flax"),
}


def split_kwargs(
    kwargs: Mapping[str, Any], config: ViTConfig, owner: str, no_effect: Iterable[str] = NO_EFFECT_OPTIONS,
) -> dict[str, Any]:
    """The config overrides among ``from_pretrained``'s extra keyword arguments.

    transformers 4.x sets every keyword the config has as an attribute (``hasattr(config, key)``)
    and passes the rest to the model's ``__init__``, which raises TypeError. Here a keyword is a
    config field when :meth:`ViTConfig.is_field` says so; options in ``no_effect`` are dropped.

    Args:
        kwargs: the keyword arguments ``from_pretrained`` did not name.
        config: the checkpoint's config (its own keys count as fields).
        owner: the method, named in the error (e.g. "ViTModel.from_pretrained").
        no_effect: accepted options that change nothing.

    Raises:
        TypeError: naming the first argument that is neither a config field nor an option.
    """
    skip = set(no_effect)
    unknown = [key for key in kwargs if key not in skip and not config.is_field(key)]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r} (neither a ViTConfig "
                        "field nor a from_pretrained option)")
    return {key: value for key, value in kwargs.items() if key not in skip}


def loading_info(report: LoadReport) -> dict[str, list[Any]]:
    """transformers' ``output_loading_info=True`` dict of a load: ``missing_keys``, ``unexpected_keys``,
    ``mismatched_keys`` (sorted key names, as transformers 4.57 gives them) and ``error_msgs`` (empty).

    Args:
        report: what :func:`load_pretrained` returned about the fit.
    """
    return {"missing_keys": sorted(report.missing), "unexpected_keys": sorted(report.unexpected),
            "mismatched_keys": sorted(name for name, _, _ in report.mismatched), "error_msgs": []}


def pop_output_loading_info(kwargs: dict[str, Any]) -> bool:
    """Remove transformers' ``output_loading_info`` from ``from_pretrained``'s keywords; return its value.

    Args:
        kwargs: the keywords not named by ``from_pretrained`` (changed in place).
    """
    value = kwargs.pop("output_loading_info", False)
    if not isinstance(value, bool):
        raise TypeError(f"output_loading_info must be True or False, got {value!r}")
    return value


def weight_file_names(use_safetensors: bool | None) -> tuple[str, ...]:
    """The weight files ``from_pretrained`` may read: all (None), only safetensors (True), none of them (False)."""
    if use_safetensors is None:
        return files.WEIGHT_FILES
    if not isinstance(use_safetensors, bool):
        raise TypeError(f"use_safetensors must be True, False or None, got {use_safetensors!r}")
    if use_safetensors:
        return SAFETENSORS_FILES
    return tuple(name for name in files.WEIGHT_FILES if name not in SAFETENSORS_FILES)


def _weights_path(location: pathlib.Path, use_safetensors: bool | None) -> pathlib.Path:
    """The weights file to read at ``location`` (a directory or a file) under ``use_safetensors``."""
    if use_safetensors is None:
        return location
    names = weight_file_names(use_safetensors)
    wanted = "safetensors" if use_safetensors else "weights other than safetensors"
    if location.is_dir():
        for name in names:
            if (location / name).is_file():
                return location / name
        raise CheckpointNotFoundError(f"{location}: use_safetensors={use_safetensors} but no {wanted} file found; "
                                      f"looked for {', '.join(names)}")
    kind = files.detect_kind(location)
    is_safe = kind == "safetensors" or (kind == "index" and location.name.endswith(".safetensors.index.json"))
    if is_safe != use_safetensors:
        raise CheckpointNotFoundError(f"{location}: use_safetensors={use_safetensors} but this file is "
                                      f"{'' if is_safe else 'not '}safetensors")
    return location


def load_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    task: Task,
    table_fn: Any,
    *,
    config: Any = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    use_safetensors: bool | None = None,
    ignore_mismatched_sizes: bool = False,
    config_overrides: dict[str, Any] | None = None,
    owner: str = "from_pretrained",
    no_effect: Iterable[str] = NO_EFFECT_OPTIONS,
) -> tuple[ViTConfig, dict[str, np.ndarray], LoadReport]:
    """Resolve a directory, file or hub id; read its config and weights; fit them to the model.

    ``table_fn(config) -> list[WeightSpec]`` gives the model's canonical table once the config is
    known (so ``num_labels=...`` overrides shape the head). Returns (config, state, report): the
    state holds only keys of the table with matching shapes; keys the model must initialise itself
    (heads absent from the checkpoint, mismatched heads with ignore_mismatched_sizes) are in
    ``report.missing`` / ``report.mismatched``.

    ``config`` is a vitx or a transformers ViTConfig (read instead of the checkpoint's
    config.json). ``config_overrides`` are the caller's other keywords: config fields override the
    config (see :func:`split_kwargs`), options in ``no_effect`` are dropped, anything else raises
    TypeError naming it (``owner`` is the method named). ``use_safetensors``: True reads only
    model.safetensors (or its index), False never reads it, None (default) reads the first weights
    file found. ``force_download`` re-downloads hub files.
    """
    names = weight_file_names(use_safetensors)
    location = resolve_pretrained(
        pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
        local_files_only=local_files_only, force_download=force_download, filenames=(CONFIG_NAME,) + names,
    )
    directory = location if location.is_dir() else location.parent
    if config is None:
        base = ViTConfig.from_json_file(directory / CONFIG_NAME)
    else:
        base = as_vit_config(config)
    overrides = split_kwargs(config_overrides or {}, base, owner, no_effect)
    if config is None and overrides:
        config = ViTConfig.from_json_file(directory / CONFIG_NAME, **overrides)
    elif overrides:
        config = ViTConfig.from_dict(base.to_dict(), **overrides)
    else:
        config = base
    weights = _weights_path(location, use_safetensors)
    lazy = files.read_lazy_state(weights)
    check_config_fits(lazy, config, str(location))  # before a table is built from the config
    state = drop_unused_qkv_bias(lazy, config.qkv_bias)
    table: list[WeightSpec] = table_fn(config)
    expected = {spec.name: spec.shape for spec in table}
    state, report = match_state_to_model(
        state, expected, prefix="vit", allowed_missing=HEAD_KEYS[task],
        allowed_unexpected_patterns=FOREIGN_HEAD_PATTERNS, ignore_mismatched_sizes=ignore_mismatched_sizes,
        source=str(location),
    )
    with files.reading(location, "checkpoint"):
        return config, materialize(state), report


def is_weights_file(name: str) -> bool:
    """A weights file (or shard, or index) of any format transformers writes."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _WEIGHT_FILE_PATTERNS)


def saved_files(directory: str | os.PathLike) -> list[str]:
    """The files a ``save_pretrained`` into ``directory`` wrote: config.json and the weight files."""
    directory = pathlib.Path(directory)
    return sorted(p.name for p in directory.iterdir() if p.is_file() and (p.name == CONFIG_NAME or is_weights_file(p.name)))


def save_pretrained(
    config: ViTConfig,
    state: dict[str, np.ndarray],
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    weights_format: str = "safetensors",
) -> pathlib.Path:
    """Write config.json + model.safetensors (canonical names, PyTorch layouts) as one atomic step.

    ``weights_format`` "pytorch", "tf" or "flax" writes ``pytorch_model.bin`` / ``tf_model.h5`` /
    ``flax_model.msgpack`` instead (transformers' ``safe_serialization=False`` files, in the names
    and layouts transformers 4.57 loads; one file: ``max_shard_size`` smaller than the weights is
    an error there). Weight files of other formats or layouts in the directory are removed.

    Everything is written into a staging directory beside ``save_directory`` and swapped in at
    once (``staging.staged_dir``): a reader, or a crash at any moment, sees the complete old
    checkpoint or the complete new one, never new weights with an old config. Other files of an
    existing directory (a README, training checkpoints) are carried over; weight files of the other
    layout (a single file vs shards) are not. Where the directory cannot be swapped (it is the
    working directory or a mount point) each file is replaced atomically on its own, weights first.
    Write failures (disk full, read-only) raise CheckpointError naming the directory.
    """
    directory = pathlib.Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
    size = _parse_size(max_shard_size)
    legacy = _legacy_file(weights_format, state, size)
    if directory.is_dir() and not staging.swappable(directory):
        return _save_file_by_file(config, state, directory, size, legacy)

    def keep(name: str) -> bool:  # what the new version carries over from the old
        return name != CONFIG_NAME and not is_weights_file(name)

    with staging.staged_dir(directory, force=True, replace_anything=True, keep=keep) as temp:
        with files.writing(directory):
            if legacy is None:
                files.write_shards(temp, state, max_shard_size=size)
            else:
                files.write_weights(temp / legacy[0], state, legacy[1])
            (temp / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
    return directory


def _legacy_file(weights_format: str, state: Mapping[str, Any], max_shard_size: int | None) -> tuple[str, str] | None:
    """(file name, flavour) of a non-safetensors ``weights_format``; None for safetensors."""
    if weights_format == "safetensors":
        return None
    legacy = {flavour: (name, flavour) for name, flavour in LEGACY_WEIGHTS.values()}.get(weights_format)
    if legacy is None:
        raise ValueError(f"weights_format {weights_format!r}: expected 'safetensors', 'pytorch', 'tf' or 'flax'")
    total = sum(int(np.asarray(v).nbytes) for v in state.values())
    if max_shard_size is not None and total > max_shard_size:
        raise ValueError(f"max_shard_size={max_shard_size} bytes is smaller than the weights ({total} bytes): "
                         f"vitx shards safetensors only; save {legacy[0]} without max_shard_size, or use "
                         "safe_serialization=True")
    return legacy


def _save_file_by_file(config: ViTConfig, state: dict[str, np.ndarray], directory: pathlib.Path,
                       max_shard_size: int | None, legacy: tuple[str, str] | None = None) -> pathlib.Path:
    """The fallback of :func:`save_pretrained` for a directory that cannot be swapped: each file
    replaced atomically, weights first, then the config; then stale weight files of other formats go."""
    if legacy is None:
        written = [p.name for p in files.save_state_dict(state, directory, max_shard_size=max_shard_size)]
    else:
        files.save_weights_file(state, directory / legacy[0], legacy[1])
        written = [legacy[0]]
    staging.write_text(directory / CONFIG_NAME, config.to_json_string())
    for stale in directory.iterdir():
        if stale.name not in written and is_weights_file(stale.name):
            stale.unlink(missing_ok=True)
    return directory


# ------------------------------------------------------------------------------------- hub upload
HUB_KEYWORDS: tuple[str, ...] = ("repo_id", "commit_message", "private", "token", "revision", "create_pr",
                                 "commit_description")


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    allow_patterns: list[str] | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    default_message: str = "Upload model",
) -> Any:
    """Upload ``folder`` (only ``allow_patterns`` when given) to the hub repo ``repo_id``, creating
    the repo (and the branch ``revision``) when absent, through ``huggingface_hub.HfApi``.

    Args:
        folder: the local directory to upload.
        repo_id: "org/name" or "name" (the token's user namespace).
        allow_patterns: file names (or globs) to upload; None: everything in ``folder``.
        commit_message: the commit message (default ``default_message``).
        private: create the repo private (only when it does not exist yet).
        token: the hub token (None: huggingface_hub's stored login).
        revision: the branch to commit to (created from main when absent).
        create_pr: open a pull request instead of committing to the branch.
        commit_description: the commit's (or pull request's) description.
        default_message: the commit message when none is given ("Upload model", "Upload config").

    Returns:
        huggingface_hub's CommitInfo of the upload.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"push_to_hub needs a repo_id like 'org/name', got {repo_id!r}")
    from huggingface_hub import HfApi

    api = HfApi(token=token if isinstance(token, str) else None)
    url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    repo_id = getattr(url, "repo_id", None) or repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    return api.upload_folder(
        repo_id=repo_id, folder_path=os.fspath(folder), allow_patterns=allow_patterns,
        commit_message=commit_message or default_message, commit_description=commit_description,
        revision=revision, create_pr=create_pr, token=token,
    )


def push_to_hub(
    save: Callable[[pathlib.Path], Any],
    repo_id: str,
    *,
    use_temp_dir: bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    default_message: str = "Upload model",
) -> Any:
    """transformers' ``push_to_hub``: ``save(directory)`` into a temporary directory, upload it.

    An object's ``push_to_hub`` method is one line: ``return push_to_hub(lambda d:
    self.save_pretrained(d, ...), repo_id, ...)`` (models, configs, image processors).

    Args:
        save: writes the files to upload into the directory it is given.
        repo_id: "org/name" or "name".
        use_temp_dir: accepted for transformers' signature (a temporary directory is always used).
        commit_message: the commit message (default ``default_message``).
        private: create the repo private (only when it does not exist yet).
        token: the hub token.
        revision: the branch to commit to.
        create_pr: open a pull request instead.
        commit_description: the commit's description.
        default_message: the commit message when none is given.

    Returns:
        huggingface_hub's CommitInfo of the upload.
    """
    del use_temp_dir  # always a temporary directory: nothing is left behind in the working directory
    with tempfile.TemporaryDirectory(prefix="vitx-push-") as tmp:
        save(pathlib.Path(tmp))
        return upload_folder(tmp, repo_id, commit_message=commit_message, private=private, token=token,
                             revision=revision, create_pr=create_pr, commit_description=commit_description,
                             default_message=default_message)


def push_saved(
    save_directory: str | os.PathLike,
    push: bool,
    hub_kwargs: Mapping[str, Any],
    written: Iterable[str] | None = None,
    *,
    owner: str = "save_pretrained",
    default_message: str = "Upload model",
) -> Any:
    """``save_pretrained(dir, push_to_hub=True, repo_id=..., ...)``'s upload: the ``written`` files of
    ``save_directory`` go to ``repo_id`` (default: the directory's name, as transformers).

    Args:
        save_directory: the directory just written.
        push: the ``push_to_hub`` argument; False: nothing is uploaded and ``hub_kwargs`` must be empty.
        hub_kwargs: the other keywords ``save_pretrained`` received (of :data:`HUB_KEYWORDS`).
        written: the names of the files the save wrote (None: :func:`saved_files` of the directory).
        owner: the method, named in a TypeError for an unknown keyword.
        default_message: the commit message when none is given.

    Returns:
        huggingface_hub's CommitInfo, or None when nothing was pushed.
    """
    unknown = [key for key in hub_kwargs if key not in HUB_KEYWORDS]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    if not push:
        extra = [key for key in hub_kwargs if key != "token"]
        if extra:
            raise TypeError(f"{owner}(): {extra[0]!r} is a push_to_hub option; pass push_to_hub=True too")
        return None
    options = dict(hub_kwargs)
    repo_id = options.pop("repo_id", None) or pathlib.Path(save_directory).resolve().name
    names = saved_files(save_directory) if written is None else sorted(written)
    return upload_folder(save_directory, repo_id, allow_patterns=names,
                         default_message=default_message, **options)


def _parse_size(size: int | str | None) -> int | None:
    """'5GB', '200MB', 10_000 -> bytes (transformers' max_shard_size spelling)."""
    if size is None or isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or a number of bytes")


def dtype_alias(torch_dtype: Any, dtype: Any, owner: str = "from_pretrained") -> Any:
    """TF / Flax ``from_pretrained``: transformers' ``torch_dtype=`` read as ``dtype=``.

    Args:
        torch_dtype: the value of ``torch_dtype`` (None when not given).
        dtype: the value of ``dtype`` (None when not given).
        owner: the method, named in the error.

    Raises:
        ValueError: when both are given with different values.
    """
    if torch_dtype is None:
        return dtype
    if dtype is not None and str(dtype) != str(torch_dtype):
        raise ValueError(f"{owner}(): torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree; pass only dtype")
    return torch_dtype
