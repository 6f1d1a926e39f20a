"""The trainer's loss curve: loss vs optimizer step, raw and smoothed, as a PNG.

``streamrnn trainer --loss-png`` redraws it from
:meth:`~streamrnn.training.online.OnlineTrainer.loss_history` as training goes. Matplotlib
is imported only when a curve is drawn (with the ``Agg`` backend: no display needed).

Example::

    write_loss_curve([(1, 0.9), (2, 0.7), (3, 0.6)], "out/loss.png")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from streamrnn.atomic import atomic_write

__all__ = ["write_loss_curve"]


def write_loss_curve(history: list[tuple[int, float]], path: str | os.PathLike,
                     title: str = "streamrnn trainer") -> Path:
    """Plot loss vs optimizer step (raw and smoothed) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history:
        steps = np.array([s for s, _ in history])
        loss = np.array([v for _, v in history], dtype=float)
        ax.plot(steps, loss, lw=0.8, alpha=0.45, label="loss")
        if len(loss) >= 10:
            k = max(len(loss) // 20, 5)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k}")
        if np.all(loss[np.isfinite(loss)] > 0):
            ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path
