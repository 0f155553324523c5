"""vitx's checkpoint layer: every weight container read and written with numpy only.

One module per concern:

- containers, each with one lazy reader and one streaming writer: ``safetensors``,
  ``torch_zip`` (torch's zip format and the legacy pre-1.6 pickle, through a restricted
  unpickler), ``h5`` (Keras / transformers TF), ``msgpack`` (flax.serialization), ``npz``;
  ``index`` for sharded checkpoints;
- ``names``: transformers' 5.9+, TF and Flax spellings of the canonical names, declared as rules
  of the reversible rule engine in ``rules`` (which the foreign formats in ``conversion`` use too);
- ``files``: format detection and transformers checkpoint files in canonical names;
- ``staging``: the one way anything is put in place (atomic, never half-written);
- ``fit``: the one strict check of a state against a model; ``hub``: hub ids -> local paths.

Every file is treated as hostile: containers check sizes, offsets, dtypes, nesting and links
before reading data, and every failure is a :class:`CheckpointError` naming the file.
``import vit_core.checkpoint`` imports no deep-learning framework, and h5py / msgpack /
huggingface_hub only when a function needs them.
"""

from .errors import CheckpointError, CheckpointNotFoundError
from .files import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHT_FILES,
    detect_kind,
    find_weights_file,
    read_lazy_state,
    read_raw,
    read_state_dict,
    save_state_dict,
    save_weights_file,
    write_flax_msgpack,
    write_tf_h5,
    write_weights,
)
from .fit import LoadReport, check_config_fits, check_state_fits_table, drop_unused_qkv_bias, match_state_to_model
from .hub import resolve_pretrained
from .lazy import Lazy, LazyState, lazify, lazy_from_array, materialize
from .names import FLAX_RULES, NEW_NAME_RULES, TF_RULES, to_legacy_names, to_new_names
from .staging import staged_dir, staged_file, write_text

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "WEIGHT_FILES", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME",
    "detect_kind", "find_weights_file", "read_raw", "read_lazy_state", "read_state_dict", "write_weights",
    "save_state_dict", "save_weights_file", "write_tf_h5", "write_flax_msgpack",
    "LoadReport", "check_config_fits", "check_state_fits_table", "drop_unused_qkv_bias", "match_state_to_model",
    "resolve_pretrained", "Lazy", "LazyState", "lazify", "lazy_from_array", "materialize",
    "NEW_NAME_RULES", "TF_RULES", "FLAX_RULES", "to_legacy_names", "to_new_names",
    "staged_dir", "staged_file", "write_text",
]
