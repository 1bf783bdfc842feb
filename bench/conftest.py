"""Prints the measured figures and targets, and fails the run when a target is missed;
with `--bench-figures PATH`, also writes them as JSON for `python -m bench.report`."""

from pathlib import Path

import orjson
import pytest

from bench import targets
from tests.nats_server import NatsServer


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    """A nats-server with JetStream on a free loopback port, for one module's scenarios."""
    with NatsServer(tmp_path_factory.mktemp("nats") / "js") as server:
        yield server.url


def pytest_addoption(parser):
    parser.addoption("--bench-figures", metavar="PATH", default=None,
                     help="write every figure, target and skip of this run to PATH (JSON)")
    parser.addoption("--soak-minutes", type=float, default=0.0, metavar="N",
                     help="run the soak scenario for N minutes (default: skip it)")


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
            report.longrepr)
        targets.SKIPPED.append((report.nodeid, reason.removeprefix("Skipped: ")))


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
    path = session.config.getoption("--bench-figures")
    if path:
        Path(path).write_bytes(orjson.dumps(targets.as_json(), option=orjson.OPT_INDENT_2))
