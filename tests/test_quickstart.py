"""The README's quick start and CI agree: `.ci/run` runs the README's test command exactly,
and the quick start is the two documented commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quick start has no bash block"
    return [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines()
            if line.strip()]


def test_the_quick_start_is_two_commands():
    demo, tests = quick_start_commands()
    assert demo.endswith("streamrnn demo")
    assert tests.endswith("pytest")


def test_ci_runs_the_readme_test_command_exactly():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == quick_start_commands()[1]
