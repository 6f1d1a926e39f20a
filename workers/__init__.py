"""Thin runnable entry points, one per process (``python -m workers.worker`` etc.); the code
lives in :mod:`streamrnn.cli`. This folder is not installed as a package."""
