"""What a user sees when a process starts (issue 16, items 5 and 9): a forged checkpoint is
refused with exit 2 (or moved aside with --ignore-bad-checkpoint), and no TensorFlow, absl or
CUDA start-up noise reaches stderr unless STREAMRNN_FRAMEWORK_LOGS=1 asks for it."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import streamrnn
from streamrnn.cli.process import WorkerProcess
from tests.helpers.durable_helpers import FAST, saved_model

REPO = Path(__file__).resolve().parents[2]

#: lines TensorFlow, absl and CUDA print at start-up on a machine like the test box
NOISE = re.compile(r"cuInit|cuda_dnn|cudart_stub|Could not find cuda drivers|oneDNN custom "
                   r"operations|absl::InitializeLog|TF_ENABLE_ONEDNN_OPTS|This TensorFlow "
                   r"binary is optimized|^[IWE]\d{4} \d\d:\d\d:", re.MULTILINE)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return saved_model(tmp_path_factory)[1]


def _forge_streams_list(path: Path) -> None:
    """A checkpoint whose SHA-256 is right and whose ``streams`` is a list."""
    body = msgpack.packb({"model": "m", "layout": [], "weights_version": 0, "created": 0.0,
                          "streams": [1, 2], "extra": {}}, use_bin_type=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<8sIQ32s", b"SRNNCKPT", 1, len(body),
                                 hashlib.sha256(body).digest()) + body)


def test_forged_checkpoint_exit_2_or_start_empty_without_framework_noise(
        model_path, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # the processes' own default
    monkeypatch.delenv("STREAMRNN_FRAMEWORK_LOGS", raising=False)
    ckpt_dir = tmp_path / "ck"
    _forge_streams_list(ckpt_dir / "worker.ckpt")
    args = (*FAST, "--no-warmup", "--checkpoint-dir", str(ckpt_dir))
    with pytest.raises(RuntimeError, match=r"refusing to start: .*'streams' must be a map") \
            as info:
        WorkerProcess.start(model_path, 2, *args, ready_timeout=120)
    assert "exit 2" in str(info.value) and "Traceback" not in str(info.value)
    with WorkerProcess.start(model_path, 2, *args, "--ignore-bad-checkpoint") as worker:
        with streamrnn.Client(worker.endpoint) as client:
            assert client.open("anything")["next_seq"] == 0
        log = worker.log()
    assert "ignoring bad checkpoint" in log and "Traceback" not in log
    assert list(ckpt_dir.glob("worker.ckpt.bad-*"))
    assert not NOISE.search(log), NOISE.findall(log)


def _framework_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("TF_CPP_MIN_LOG_LEVEL", "STREAMRNN_FRAMEWORK_LOGS")}
    return {**base, "PYTHONPATH": str(REPO), **env}


@pytest.mark.parametrize(("env", "level"), [({}, "3"), ({"TF_CPP_MIN_LOG_LEVEL": "1"}, "1"),
                                            ({"STREAMRNN_FRAMEWORK_LOGS": "1"}, "None")])
def test_framework_log_level_default_user_value_and_env_switch(env, level):
    """Quiet by default (level 3), a value the user set is kept, and
    STREAMRNN_FRAMEWORK_LOGS=1 leaves TensorFlow's own default (0: every line)."""
    code = ("from streamrnn.logs import quiet_frameworks; import os; quiet_frameworks(); "
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))")
    out = subprocess.run([sys.executable, "-c", code], env=_framework_env(**env), cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == level


def test_process_entry_point_quiets_the_frameworks_first():
    """``python -m streamrnn.cli.<role>`` sets the level before the role's own code runs."""
    code = ("import os; from streamrnn.cli import lifecycle; "
            "lifecycle.main([], 'x', 'x', lambda p: p, "
            "lambda a: print(os.environ.get('TF_CPP_MIN_LOG_LEVEL')) or 0)")
    out = subprocess.run([sys.executable, "-c", code], env=_framework_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "3"


def test_curve_routers_without_a_curve_key_exit_2_before_loading(tmp_path, capfd, monkeypatch):
    from streamrnn.cli import worker as worker_cli

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    assert worker_cli.main(["--model", str(tmp_path / "absent.keras"), "--curve-routers",
                            str(tmp_path)]) == 2
    assert "--curve-routers needs --curve-secret-key" in capfd.readouterr().err
