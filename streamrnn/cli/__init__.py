"""The ``streamrnn`` command (:mod:`streamrnn.cli.main`, a table of subcommands) and one
module per subcommand, each with ``add_arguments(parser)`` and ``run(args)``: the processes
:mod:`~streamrnn.cli.worker`, :mod:`~streamrnn.cli.router` and :mod:`~streamrnn.cli.trainer`
(each also runnable as ``python -m streamrnn.cli.<role>``; :mod:`~streamrnn.cli.lifecycle`
holds what they share: signals, the ready line, waiting), and :mod:`~streamrnn.cli.publish`,
:mod:`~streamrnn.cli.demo` and :mod:`~streamrnn.cli.bench`. :mod:`~streamrnn.cli.process`
starts a worker or router subprocess and waits for its ready line (demo, tests, bench)."""

__all__: list[str] = []
