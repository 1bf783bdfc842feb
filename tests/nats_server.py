"""A real nats-server for tests (the demo's `NatsServer`: loopback only, JetStream on,
restartable in place) and a helper to run a body with a connected client.

Not a conftest: test modules build their own fixtures from `NatsServer`.
"""

from __future__ import annotations

import asyncio

import nats

from dispatcher.demo.nats_server import NatsServer, free_port

__all__ = ["NatsServer", "free_port", "run_with_client"]


def run_with_client(url: str, body, **options):
    """Run `body(nc)` in a fresh event loop with a client connected to `url`."""

    async def main():
        nc = await nats.connect(url, **options)
        try:
            return await body(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


