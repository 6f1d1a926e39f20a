"""Logging set-up shared by the worker, router and trainer processes.

``--log-format json`` writes one JSON object per line (python-json-logger), with the
timestamp, level, logger name and message, ready for a log pipeline; ``text`` (the default)
is for people.

:func:`quiet_frameworks` (called first by every ``streamrnn`` command) keeps TensorFlow's,
absl's and Keras' start-up noise out of stderr ("failed call to cuInit", "Could not find
cuda drivers", oneDNN notices, absl's "All log messages before absl::InitializeLog()"):
``TF_CPP_MIN_LOG_LEVEL=3`` unless the user set it, the ``absl`` and ``tensorflow`` loggers
at ERROR, the frameworks' Python warnings ignored, and the framework C++ log lines printed
while ``tensorflow``/``keras`` are imported dropped (any other line printed then still goes
to stderr). ``STREAMRNN_FRAMEWORK_LOGS=1`` leaves all of it as the frameworks have it.

Example::

    quiet_frameworks()          # before anything imports TensorFlow
    configure_logging("INFO", "json")
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

__all__ = [
    "FRAMEWORK_LOGS_ENV",
    "TEXT_FORMAT",
    "add_logging_arguments",
    "configure_logging",
    "framework_logs_wanted",
    "quiet_frameworks",
]

#: set to 1 to see TensorFlow's, absl's and Keras' own log lines and warnings
FRAMEWORK_LOGS_ENV = "STREAMRNN_FRAMEWORK_LOGS"
_NOISY_MODULES = ("tensorflow", "keras", "onnxruntime")
_NOISE = re.compile(
    r"(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"  # absl C++ INFO/WARNING/ERROR
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] "  # TensorFlow's own C++ format
    r"|To enable the following instructions: .* rebuild TensorFlow)")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text for people, json for one structured record per line")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json"), replacing other handlers."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def framework_logs_wanted() -> bool:
    """True when ``$STREAMRNN_FRAMEWORK_LOGS`` asks for the frameworks' own logs."""
    return os.environ.get(FRAMEWORK_LOGS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_frameworks() -> bool:
    """Silence TensorFlow/absl/Keras start-up noise in this process and the processes it
    starts (call it before TensorFlow is imported). Returns False, changing nothing, when
    ``$STREAMRNN_FRAMEWORK_LOGS`` is set; a ``TF_CPP_MIN_LOG_LEVEL`` the user set is kept."""
    if framework_logs_wanted():
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("absl", "tensorflow", "keras"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("tensorflow", "keras", "absl", "google.protobuf"):
        warnings.filterwarnings("ignore", module=rf"{re.escape(name)}(\.|$)")
    if not any(isinstance(f, _QuietImports) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImports())
    return True


_depth = 0  # nested quiet imports (keras imports tensorflow): the outermost one filters


@contextmanager
def _filtered_stderr() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file inside, then write back every line of it
    that is not framework log noise."""
    global _depth
    _depth += 1
    try:
        if _depth > 1:
            yield
            return
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                kept = [line for line in tmp.read().decode("utf-8", "replace")
                        .splitlines(keepends=True) if not _NOISE.match(line)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
    finally:
        _depth -= 1


class _QuietLoader(importlib.abc.Loader):
    """Runs the wrapped loader's ``exec_module`` inside :func:`_filtered_stderr`."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _filtered_stderr():
            self.loader.exec_module(module)
        module.__loader__ = self.loader  # the module keeps its own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader

    def __getattr__(self, name: str) -> object:
        return getattr(self.loader, name)


class _QuietImports(importlib.abc.MetaPathFinder):
    """Finds the noisy frameworks' top-level packages and quiets their first import."""

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in _NOISY_MODULES or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec
