"""Prints the measured figures and targets, and fails the run when a target is missed."""

import pytest

from bench import targets
from tests.nats_server import NatsServer


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    """A nats-server with JetStream on a free loopback port, for one module's scenarios."""
    with NatsServer(tmp_path_factory.mktemp("nats") / "js") as server:
        yield server.url


def pytest_terminal_summary(terminalreporter):
    if not (targets.MEDIANS or targets.FIGURES):
        return
    lines, _ = targets.table()
    terminalreporter.section("imdispatch: figures and targets")
    for line in lines:
        terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and not targets.table()[1]:
        session.exitstatus = 1
