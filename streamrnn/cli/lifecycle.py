"""What every long-running process of the ``streamrnn`` command does around its service:
stop it on SIGTERM/SIGINT, log the ready line tests and scripts wait for, wait for it to
stop, and parse its own command line when run as ``python -m streamrnn.cli.<role>``.

Example::

    service = Router(config)                       # anything with stop() and join(timeout)
    stop_on_signals(service, log, "stopping")
    endpoint, _ = service.start()
    log_ready(log, READY_MARKER, endpoint, "workers=tcp://127.0.0.1:5556")
    wait(service)                                  # returns once it stopped
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

from streamrnn.logs import quiet_frameworks

__all__ = ["Service", "log_ready", "main", "stop_on_signals", "wait"]


class Service(Protocol):
    """A thing that runs on threads of its own until asked to stop."""

    def stop(self) -> None:
        """Ask it to stop (returns at once)."""

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True once it has stopped."""


def stop_on_signals(service: Service, log: logging.Logger, doing: str) -> None:
    """On SIGTERM or SIGINT, log ``received SIGTERM: <doing>`` and stop ``service``."""

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: %s", signal.Signals(signum).name, doing)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def log_ready(log: logging.Logger, marker: str, endpoint: str, details: str) -> None:
    """The ready line: ``<marker><endpoint> <details>`` (its marker is what
    :mod:`streamrnn.cli.process` waits for)."""
    log.info("%s%s %s", marker, endpoint, details)


def wait(service: Service, tick: Callable[[], None] | None = None,
         every_s: float = 0.2) -> None:
    """Wait until ``service`` stopped, calling ``tick`` every ``every_s`` seconds (short joins
    keep the signal handlers responsive)."""
    while not service.join(timeout=every_s):
        if tick is not None:
            tick()


def main(argv: Sequence[str] | None, role: str, description: str,
         add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
         run: Callable[[argparse.Namespace], int]) -> int:
    """``python -m streamrnn.cli.<role>``: parse ``argv`` and run; returns the exit status."""
    quiet_frameworks()  # before anything imports TensorFlow ($STREAMRNN_FRAMEWORK_LOGS=1: not)
    parser = add_arguments(argparse.ArgumentParser(
        prog=f"python -m streamrnn.cli.{role}", description=description))
    return run(parser.parse_args(argv))
