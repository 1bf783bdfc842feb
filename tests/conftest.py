"""Fixtures shared across the suite."""

import pytest

from tests.nats_server import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """One real nats-server with JetStream, on a free loopback port, for the whole run."""
    with NatsServer(tmp_path_factory.mktemp("nats") / "js") as running:
        yield running
