"""The bounded hostile fuzz (bench/fuzz_hostile.py) at 10,000 messages per target.

A real worker process, and a router over a real redis-server with a worker behind it, each
get 10,000 hostile messages from three attacker identities while a Client owning six
streams pushes them: every reply is the one docs/protocol.md requires, nothing crashes, the
RSS stays flat and the honest streams equal one offline call. Slow (minutes): run with
``pytest -m slow tests/serving/test_fuzz_hostile.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 10_000
RSS_GROWTH_MIB = 64.0


@pytest.mark.slow
def test_ten_thousand_hostile_messages_to_a_worker_and_a_router(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuzz_hostile.py"), "--messages", str(MESSAGES),
         "--target", "both", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    for target in ("worker", "router"):
        s = summary[target]
        assert s["messages_sent"] >= MESSAGES
        assert s["crashes"] == 0 and not s["dead_processes"], s
        assert s.get("violations", 0) == 0, s["examples"]
        assert s.get("replies_missing", 0) == 0, s["examples"]
        assert s["replies_as_required"] == s["replies_required"]
        assert s["honest"]["max_abs_diff"] <= 1e-5 and not s["honest"].get("mismatches")
        assert s["honest"]["streams_verified"] > 0
        assert not [k for k in s["honest"] if "error_" in k], s["honest"]  # never disturbed
        for name, rss in s["rss_mib"].items():
            assert rss["growth"] <= RSS_GROWTH_MIB, (target, name, rss)
        assert all(status == 0 for status in s["exit_status"].values()), s["exit_status"]
    assert result.returncode == 0
