"""Quiet TensorFlow start-up: no C++ notices on stderr when TensorFlow is imported.

TensorFlow's C++ runtime prints INFO lines while its shared libraries load ("oneDNN custom
operations are on ...", "This TensorFlow binary is optimized ...", absl's "All log messages
before absl::InitializeLog() ..."). ``TF_CPP_MIN_LOG_LEVEL=2`` hides the later ones, but the
oneDNN notice of TensorFlow 2.21 is printed before that variable is read, so no setting hides it.

When the user has not set ``TF_CPP_MIN_LOG_LEVEL`` themselves, :func:`quiet_tensorflow_import`
sets it to "2" (errors only) and, around the import of TensorFlow, reads what the C++ side writes
to file descriptor 2: INFO and WARNING log lines (the ones level 2 hides) are dropped, everything
else (errors, Python warnings, tracebacks) is written to stderr afterwards unchanged. A user who
set the variable gets TensorFlow's own behaviour: their level wins. Nothing here imports TensorFlow
unless asked to.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "2"
# A C++ log line of severity INFO or WARNING (absl / glog format: I0000 00:00:1796298350.475962  5145 port.cc:153] ...),
# the absl banner printed before logging is initialised, and the second line of cpu_feature_guard's notice.
_DROPPED = (
    re.compile(r"^[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\s\]]+:\d+\] "),
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$"),
)

# True once this module set TF_CPP_MIN_LOG_LEVEL (so a later check still knows the user did not).
_we_set_level = False
_filtering = False


def user_chose_log_level() -> bool:
    """Whether the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves (then their level wins)."""
    return LOG_LEVEL_VARIABLE in os.environ and not _we_set_level


def default_log_level() -> bool:
    """Set ``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it; return whether the start-up lines are to
    be filtered (the user did not choose a level)."""
    global _we_set_level
    if user_chose_log_level():
        return False
    if LOG_LEVEL_VARIABLE not in os.environ:
        os.environ[LOG_LEVEL_VARIABLE] = QUIET_LEVEL
        _we_set_level = True
    return True


def drop_startup_lines(text: str) -> str:
    """``text`` without TensorFlow's INFO / WARNING start-up log lines (other lines kept, in order).

    Args:
        text: what was written to stderr while TensorFlow loaded.
    """
    kept = [line for line in text.splitlines(keepends=True)
            if not any(pattern.match(line.rstrip("\r\n")) for pattern in _DROPPED)]
    return "".join(kept)


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Inside the block, file descriptor 2 goes to a temporary file; afterwards its contents, less
    the start-up lines (:func:`drop_startup_lines`), are written to the real stderr. Re-entrant (an
    inner block passes through); where fd 2 cannot be duplicated, nothing is filtered."""
    global _filtering
    if _filtering:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    capture = tempfile.TemporaryFile()
    _filtering = True
    try:
        os.dup2(capture.fileno(), 2)
        yield
    finally:
        _filtering = False
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        kept = drop_startup_lines(capture.read().decode("utf-8", errors="replace"))
        capture.close()
        if kept:
            os.write(2, kept.encode("utf-8"))


def quiet_tensorflow_import() -> contextlib.AbstractContextManager[None]:
    """The context in which to import TensorFlow: filtered (see module docstring) unless the user
    chose ``TF_CPP_MIN_LOG_LEVEL``, or TensorFlow is imported already (nothing left to hide)."""
    if "tensorflow" in sys.modules or not default_log_level():
        return contextlib.nullcontext()
    return filtered_native_stderr()


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` inside :func:`quiet_tensorflow_import`."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        for finder in [f for f in sys.meta_path if isinstance(f, _QuietTensorFlowFinder)]:
            sys.meta_path.remove(finder)  # one import only
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        # (tensorflow is in sys.modules already while it executes: filter without that check)
        with filtered_native_stderr() if default_log_level() else contextlib.nullcontext():
            self._loader.exec_module(module)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """A one-shot import hook: the first ``import tensorflow`` (by any module) runs quietly. A mere
    look-up (``importlib.util.find_spec("tensorflow")``) gets the wrapped spec and keeps the hook."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow" or self._busy:
            return None
        self._busy = True  # the look-up below walks sys.meta_path again: pass this finder by
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def install_quiet_tensorflow_hook() -> None:
    """Make the process's first ``import tensorflow`` quiet, whoever imports it (the vitx command
    line installs this at start-up: its commands import TensorFlow through vit_tf, transformers or
    directly). Does nothing when TensorFlow is imported already or the user chose a log level."""
    if "tensorflow" in sys.modules or user_chose_log_level():
        return
    default_log_level()
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
