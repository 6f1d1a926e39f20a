"""docker/compose.yaml starts every streamrnn process with options the CLI accepts (the
images are not built here, so this is what keeps the file honest)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamrnn.cli.main import build_parser

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"
ROLES = ("router", "worker", "trainer")


def compose_commands() -> dict[str, list[str]]:
    """streamrnn service name -> its ``command:`` list (the file's flow-style lists)."""
    text = COMPOSE.read_text()
    commands: dict[str, list[str]] = {}
    for match in re.finditer(r"^  ([\w-]+):.*?\n(?=  \S|\Z)", text, re.S | re.M):
        block = re.search(r"command: \[(.*?)\]", match.group(0), re.S)
        if block:
            items = [item.strip().strip('"') for item in block.group(1).split(",")]
            commands[match.group(1)] = [item for item in items if item]
    return {name: argv for name, argv in commands.items() if argv[0] in ROLES}


def test_compose_has_redis_two_routers_workers_and_a_trainer():
    roles = [cmd[0] for cmd in compose_commands().values()]
    assert roles.count("worker") >= 2 and roles.count("trainer") == 1
    # the second router repeats the first's command (a YAML merge of its anchor)
    assert roles.count("router") == 1 and "router-b:\n    <<: *router" in COMPOSE.read_text()
    assert "command: [redis-server" in COMPOSE.read_text()


@pytest.mark.parametrize("service", sorted(compose_commands()))
def test_every_compose_command_parses(service):
    argv = compose_commands()[service]
    args = build_parser().parse_args(argv)  # SystemExit on an unknown option
    assert args.store == "redis://redis:6379/0", service
