"""Reading and formatting helpers shared by ``bench/report*.py``.

``load`` turns pytest-benchmark JSON into one dict per benchmark (name, median and min
seconds, ``extra_info`` merged in); ``fmt`` prints a number with thousands separators or
``-`` when missing.

Example::

    rows = load(Path("bench/results/kernel.json"))
    print(fmt(rows[0]["timesteps_per_s"]))     # "138,599"
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["fmt", "load", "machine", "other_table", "ratios"]


def load(path: Path) -> list[dict]:
    """pytest-benchmark JSON -> one dict per benchmark: name, stats, extra_info merged."""
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        row = {"name": b["name"], "median_s": b["stats"]["median"], "min_s": b["stats"]["min"]}
        row.update(b.get("extra_info", {}))
        rows.append(row)
    return rows


def machine(path: Path) -> str:
    """The CPU, its logical count and the Python version a pytest-benchmark file records."""
    info = json.loads(path.read_text()).get("machine_info", {})
    cpu = info.get("cpu", {})
    return (
        f"{cpu.get('brand_raw', info.get('processor', '?'))}, "
        f"{cpu.get('count', '?')} logical CPUs, Python {info.get('python_version', '?')}"
    )


def fmt(x: float | None, digits: int = 0) -> str:
    """``x`` with thousands separators and ``digits`` decimals; ``-`` if None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def ratios(values: list[float] | None) -> str:
    """Per-round ratios as ``0.91, 0.88, 0.95`` (empty when missing)."""
    return ", ".join(f"{v:.2f}" for v in values or [])


def other_table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| benchmark | median s | extra_info |", "|---|---|---|"]
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("name", "median_s", "min_s")}
        text = ", ".join(
            f"{k}={v:,.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
        )
        lines.append(f"| {r['name']} | {r['median_s']:.4g} | {text} |")
    return "\n".join(lines)
