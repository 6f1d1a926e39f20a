"""Logging set-up shared by the worker, router and trainer processes.

``--log-format json`` writes one JSON object per line (python-json-logger), with the
timestamp, level, logger name and message, ready for a log pipeline; ``text`` (the default)
is for people.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = [
    "TEXT_FORMAT",
    "add_logging_arguments",
    "configure_logging",
]

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
