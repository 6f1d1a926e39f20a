"""The GPU sections of the report: the torch executor's cuDNN on / off, and Keras's cuDNN.

* ``bench/gpu_torch.py`` (the torch executor, cuDNN on and off, chunks 16 / 128, all and
  part of the slots busy, no TensorFlow needed) writes JSON with ``--out``; every
  ``gpu_torch*.json`` in ``bench/`` or in the report's folder is rendered by
  :func:`gpu_torch_section`, which says the run has not happened yet when there is none.
* ``bench/gpu_cudnn.py`` (Keras 3's own LSTM layer on its torch backend: ``use_cudnn``
  on / off, which kernel Keras actually ran, the masks cuDNN refuses) wrote
  ``bench/gpu_cudnn_h100.json``: :func:`gpu_cudnn_table`.

Example::

    text = gpu_torch_section([Path("bench/gpu_torch_h200.json")])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from report_format import fmt

__all__ = ["NOT_RUN", "gpu_cudnn_table", "gpu_torch_section", "gpu_torch_table"]

NOT_RUN = (
    "Not run yet: no GPU machine was lent to this task. On a GPU box (torch only, no "
    "TensorFlow needed): `python bench/gpu_torch.py --out bench/gpu_torch_h200.json "
    "--neighbour`, then `streamrnn bench --no-run` renders it here.")


def _gpu_meta(meta: dict) -> str:
    device = meta.get("gpu") or meta.get("device", "?")
    line = (f"Device {device}, torch {meta.get('torch', '?')}, "
            f"cuDNN {meta.get('cudnn_version', '-')}, {meta.get('threads', '?')} CPU threads, "
            f"OMP_WAIT_POLICY {meta.get('omp_wait_policy', '?')}.")
    flags = {k.removesuffix("_flags"): v for k, v in meta.items() if k.endswith("_flags")}
    if flags:
        line += " Step flags: " + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in f.items())
            for name, f in flags.items()) + "."
    if not str(meta.get("device", "")).startswith("cuda"):
        line += " (A CPU dry run of the script: the cuDNN switch does nothing there.)"
    return line


def gpu_torch_table(data: dict) -> str:
    """One row per chunk x busy slots (x beside a busy loop): each variant's median
    timesteps/s, the cuDNN speed-up and the share of the quiet rate kept beside the loop."""
    rows: dict[tuple, dict] = {}
    for r in data["summary"]:
        rows.setdefault((r["chunk"], r["busy"], r["neighbour"]), {})[r["variant"]] = r
    variants = sorted({r["variant"] for r in data["summary"]})
    slots = data.get("meta", {}).get("config", {}).get("slots", "?")
    lines = ["| chunk | busy slots | beside a busy loop | "
             + " | ".join(f"{v} timesteps/s" for v in variants)
             + " | cuDNN speed-up | share of quiet |",
             "|---" * (5 + len(variants)) + "|"]
    for (chunk, busy, beside), by in sorted(rows.items()):
        share = ", ".join(f"{v} {by[v]['share_of_quiet']:.2f}" for v in variants
                          if "share_of_quiet" in by.get(v, {}))
        speedup = by.get("cudnn", {}).get("cudnn_speedup")
        lines.append(
            f"| {chunk} | {busy} of {slots} | {'yes' if beside else 'no'} | "
            + " | ".join(fmt(by[v]["median_timesteps_per_s"]) if v in by else "-"
                         for v in variants)
            + f" | {'-' if speedup is None else f'**{speedup:.2f}x**'} | {share or '-'} |")
    return "\n".join(lines)


def gpu_torch_section(paths: Sequence[Path]) -> str:
    """``## GPU`` with every ``gpu_torch.py`` result in ``paths``, or :data:`NOT_RUN`."""
    out = ["## GPU: the torch executor, cuDNN on / off", "",
           "`bench/gpu_torch.py`: the torch executor itself (gather the busy rows, step, "
           "scatter) with `cudnn=True` and `cudnn=False` on the same weights and inputs, "
           "alternating rounds; max abs differences on ragged random chunks.", ""]
    if not paths:
        return "\n".join(out + [NOT_RUN])
    for path in paths:
        data = json.loads(path.read_text())
        out += [f"### {path.name}", "", _gpu_meta(data.get("meta", {})), "",
                gpu_torch_table(data), ""]
        for pair, diff in data.get("max_abs_diff", {}).items():
            out.append(f"- max abs diff {pair.replace('_vs_', ' vs ')}: outputs "
                       f"{diff['outputs']:.1e}, states {diff['states']:.1e}")
        out.append("")
    return "\n".join(out).rstrip()


def gpu_cudnn_table(path: Path) -> str:
    """``bench/gpu_cudnn.py``'s records: Keras 3's LSTM layer on its torch backend."""
    data = json.loads(path.read_text())
    lines = [
        "### cuDNN vs non-cuDNN (GPU, Keras 3 on its torch backend)", "",
        f"`{data['command']}`", "",
        "| run | case | chunk | cuDNN timesteps/s | non-cuDNN timesteps/s | ratio | "
        "max abs diff | kernels (cuDNN / other) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for run in data["runs"]:
        env = run[0]
        for r in run[1:]:
            if r["case"] == "unmasked":
                lines.append(
                    f"| {env['run']} ({env['device']}) | all slots busy, no mask | {r['chunk']} | "
                    f"{fmt(r['cudnn_timesteps_s'])} | {fmt(r['plain_timesteps_s'])} | "
                    f"{r['ratio']:.1f}x | {r['max_abs_diff_out']:.1e} | "
                    f"{r['kernel_cudnn']} / {r['kernel_plain']} |"
                )
            elif r["case"] == "active-rows":
                lines.append(
                    f"| {env['run']} | {r['active']}/{r['slots']} busy: gather+cuDNN vs masked | "
                    f"{r['chunk']} | {fmt(r['gather_cudnn_timesteps_s'])} | "
                    f"{fmt(r['masked_timesteps_s'])} | {r['ratio']:.1f}x | "
                    f"{r['max_abs_diff_out']:.1e} | {r['kernel_gather']} / {r['kernel_masked']} |"
                )
            elif r["case"] == "mask" and env["run"] == data["runs"][0][0]["run"]:
                what = r.get("error") or f"ran {r['kernel']}, max diff {r['max_abs_diff']:.1e}"
                notes.append(f"- mask *{r['mask']}*, use_cudnn={r['use_cudnn']}: {what}")
    return "\n".join(lines + ["", "Masks (Keras 3.15, torch backend):", *notes])
