"""The router process: ``python -m streamrnn.cli.router --bind tcp://127.0.0.1:5555
--store redis://127.0.0.1:6379/0``; the same entry point backs ``streamrnn router``.

Clients connect to ``--bind`` as to a worker; workers start with the same ``--store`` and
publish their endpoints there (the router listens for nothing else). Run several routers on
one store for failover. Logs a ready line with the bound endpoint; SIGTERM/SIGINT stops it
(exit 0); a routing thread that dies makes the process exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from streamrnn.cli import lifecycle
from streamrnn.cli.lifecycle import log_ready, stop_on_signals, wait
from streamrnn.logs import add_logging_arguments, configure_logging
from streamrnn.metrics import add_metrics_argument, metrics_url

__all__ = ["READY_MARKER", "add_arguments", "main", "run"]

log = logging.getLogger("streamrnn.router")

READY_MARKER = "streamrnn router ready on "


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The router's command-line options (shared with ``streamrnn router``); their defaults
    are :class:`~streamrnn.cluster.router.RouterConfig`'s."""
    from streamrnn.cluster.router import RouterConfig

    defaults = RouterConfig()
    parser.add_argument("--bind", default=defaults.bind,
                        help="client endpoint (same protocol as a worker); port 0: any")
    parser.add_argument("--store", default=defaults.store, metavar="URL",
                        help="required: the Redis the workers hold their leases in "
                             "(redis://host:port/0, rediss://, redis+sentinel://, ...)")
    parser.add_argument("--busy-retry-after-ms", type=int, default=defaults.busy_retry_after_ms,
                        help="retry hint in BUSY answers (streams moving to a survivor)")
    parser.add_argument("--curve-secret-key", default=defaults.curve_secret_key, metavar="FILE",
                        help="CURVE on the client endpoint: this server key (.key_secret)")
    parser.add_argument("--curve-allow", default=defaults.curve_allow, metavar="DIR_OR_FILE",
                        help="CURVE: client public keys (.key files) that may connect")
    parser.add_argument("--curve-client-key", default=defaults.curve_client_key, metavar="FILE",
                        help="CURVE toward the workers: this router's key pair (.key_secret); "
                             "each worker's --curve-routers must list its public key (then "
                             "the workers trust the client keys it vouches for)")
    add_metrics_argument(parser)
    add_logging_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Route until SIGTERM/SIGINT; returns the exit status."""
    configure_logging(args.log_level, args.log_format)
    if not args.store:
        log.error("the router needs --store redis://host:port/0 (the Redis its workers "
                  "hold their leases in)")
        return 2
    from streamrnn.cluster.router import Router, RouterConfig

    router = Router(RouterConfig(
        bind=args.bind, store=args.store, busy_retry_after_ms=args.busy_retry_after_ms,
        curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow,
        curve_client_key=args.curve_client_key))
    stop_on_signals(router, log, "stopping")
    endpoint = router.start()
    metrics = ""
    if args.metrics_port is not None:
        from streamrnn.metrics import RouterMetrics

        port = RouterMetrics(router.stats).serve(args.metrics_port)
        metrics = f" metrics={metrics_url(port)}"
    log_ready(log, READY_MARKER, endpoint, f"workers={len(router.holders.live)}{metrics}")
    wait(router)
    if router.failed is not None:
        log.error("router stopped: its routing thread failed (%s)", router.failed)
        return 1
    log.info("router stopped cleanly")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamrnn.cli.router``; returns the exit status."""
    return lifecycle.main(argv, "router", "streamrnn router", add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
