"""The router process: ``python -m streamrnn.cli.router --bind tcp://127.0.0.1:5555
--workers-bind tcp://127.0.0.1:5556``; the same entry point backs ``streamrnn router``.

Clients connect to ``--bind`` as to a worker; workers start with ``--register
<workers endpoint>`` (and a shared ``--checkpoint-dir`` for failover). Logs a ready line
with both bound endpoints; SIGTERM/SIGINT stops it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from streamrnn.logs import add_logging_arguments, configure_logging
from streamrnn.metrics import add_metrics_argument, metrics_url

log = logging.getLogger("streamrnn.router")

READY_MARKER = "streamrnn router ready on "


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--bind", default="tcp://127.0.0.1:5555",
                        help="client endpoint (same protocol as a worker); port 0: any")
    parser.add_argument("--workers-bind", default="tcp://127.0.0.1:5556",
                        help="endpoint workers register and heartbeat to (--register)")
    parser.add_argument("--dead-after-s", type=float, default=1.0,
                        help="declare a worker dead after this long without a heartbeat")
    parser.add_argument("--busy-retry-after-ms", type=int, default=20,
                        help="retry hint in BUSY answers (streams moving to a survivor)")
    parser.add_argument("--curve-secret-key", default=None, metavar="FILE",
                        help="CURVE on the client endpoint: this server key (.key_secret)")
    parser.add_argument("--curve-allow", default=None, metavar="DIR_OR_FILE",
                        help="CURVE: client public keys (.key files) that may connect")
    add_metrics_argument(parser)
    add_logging_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    from streamrnn.cluster.router import Router, RouterConfig

    router = Router(RouterConfig(
        bind=args.bind, workers_bind=args.workers_bind, dead_after_s=args.dead_after_s,
        busy_retry_after_ms=args.busy_retry_after_ms, curve_secret_key=args.curve_secret_key,
        curve_allow=args.curve_allow))

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        router.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    endpoint, workers_endpoint = router.start()
    metrics = ""
    if args.metrics_port is not None:
        from streamrnn.metrics import RouterMetrics

        port = RouterMetrics(router.stats).serve(args.metrics_port)
        metrics = f" metrics={metrics_url(port)}"
    log.info("%s%s workers=%s%s", READY_MARKER, endpoint, workers_endpoint, metrics)
    while not router.join(timeout=0.2):
        pass
    log.info("router stopped cleanly")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m streamrnn.cli.router", description="streamrnn router"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
