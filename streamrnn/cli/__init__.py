"""The ``streamrnn`` command (:mod:`streamrnn.cli.main`) and one module per process it starts:
:mod:`~streamrnn.cli.worker`, :mod:`~streamrnn.cli.router`, :mod:`~streamrnn.cli.trainer`
(each also runnable as ``python -m streamrnn.cli.<role>``), the demo
(:mod:`~streamrnn.cli.demo`) and :mod:`~streamrnn.cli.process`, which starts a worker or
router subprocess and waits for its ready line (demo, tests, bench)."""
