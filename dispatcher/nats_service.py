"""The dispatcher's NATS side that every worker has: a connection made from the [nats]
table, and on it an instance of the `imdispatch` micro service (`imdispatch.pick`,
`imdispatch.nodes`). Endpoints are queue subscriptions, so with several workers each
request is answered once, by any of them, and picks go on when one worker dies. The
leader's poller shares the leader's connection; a follower's connection carries only the
service (followers never poll)."""

from __future__ import annotations

import asyncio
import logging
import os
from importlib.metadata import version
from typing import Any

import nats
import orjson

from dispatcher import config as cfg
from dispatcher.query import QueryError, from_json
from dispatcher.serving import Serving
from imnode.micro import Request, Service, ServiceError, close_link
from imnode.natsauth import connect_options
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imdispatch")
NAME = "imdispatch"
DESCRIPTION = "Dispatcher for IM long-connection servers: picks one server per new client"
READY_CHECK = 0.05  # seconds between a new follower's looks at whether it is ready
PING_INTERVAL = 5.0  # a follower's link with no PONG for 3 of these is replaced by nats-py


def nats_options(config: cfg.NatsConfig) -> dict[str, Any]:
    """nats-py connect() options from the [nats] table (credentials are never logged)."""
    return {"servers": list(config.servers), **connect_options(
        user=config.user, password=config.password, token=config.token, creds=config.creds,
        nkey_seed=config.nkey_seed, tls_ca=config.tls_ca, tls_cert=config.tls_cert,
        tls_key=config.tls_key)}


async def connect(config: cfg.NatsConfig, **callbacks: Any) -> Any:
    """A connection that reconnects forever, tried every second until a server answers
    (`callbacks`: nats-py's error_cb, disconnected_cb, reconnected_cb)."""
    while True:
        try:
            return await nats.connect(
                name=f"imdispatch {os.getpid()}", max_reconnect_attempts=-1,
                reconnect_time_wait=1, connect_timeout=2, **callbacks,
                **nats_options(config))
        except Exception as exc:
            log.warning("NATS unreachable (%s); serving the last known state", exc)
            await asyncio.sleep(1.0)


async def serve(nc: Any, serving: Serving) -> Service:
    """Start this worker's instance of the `imdispatch` service on `nc`."""
    service = Service(nc, NAME, version("imdispatch"), DESCRIPTION)
    await service.add_endpoint("pick", "imdispatch.pick", lambda r: pick(serving, r))
    await service.add_endpoint("nodes", "imdispatch.nodes", lambda r: nodes(serving, r))
    await service.start()
    return service


async def pick(serving: Serving, request: Request) -> bytes:
    """`imdispatch.pick`: the get-tcp-ip answer for a JSON body with its parameters; a
    refusal is error 503 whose data is the HTTP 503's JSON (`retry_after` included)."""
    try:
        wanted = from_json(orjson.loads(request.data) if request.data else {})
    except (QueryError, orjson.JSONDecodeError) as exc:
        raise ServiceError(400, str(exc), orjson.dumps({"error": str(exc)})) from None
    chosen = serving.choose(wanted)
    if not chosen:
        refusal = serving.refusal(wanted)
        serving.stats.refused(refusal.reason, "nats")
        raise ServiceError(503, refusal.message, refusal.body())
    serving.stats.assigned(chosen[0].id, "nats")
    return serving.answer(chosen, wanted.count > 1)


async def nodes(serving: Serving, request: Request) -> bytes:
    """`imdispatch.nodes`: the node list of `GET /admin/nodes`, read-only."""
    return orjson.dumps(serving.state.node_views())


class ServiceLink:
    """A follower's own connection, for its service instance only, which joins once the
    follower is first ready (the other instances answer meanwhile). Kept up by nats-py
    (which resubscribes after a reconnect); closed on purpose without a warning."""

    def __init__(self, serving: Serving, config: cfg.NatsConfig) -> None:
        self.serving, self.config = serving, config
        self.nc: Any = None
        self.service: Service | None = None
        self.closing = False  # a close of ours: its disconnect is no news
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # no poller checks this link (the leader's checks its own): nats-py's pings do
        self.nc = await connect(self.config, error_cb=self._error,
                                disconnected_cb=self._disconnected,
                                reconnected_cb=self._reconnected,
                                ping_interval=PING_INTERVAL, max_outstanding_pings=3)
        while not self.serving.readiness()[0]:  # a worker just started (one replacing a
            await asyncio.sleep(READY_CHECK)  # dead one, say) would refuse picks meanwhile
        self.service = await serve(self.nc, self.serving)
        log.info("NATS connected; micro service %s instance %s", NAME, self.service.id)

    async def _error(self, exc: Exception) -> None:
        if not self.closing:
            log.warning("NATS: %s", exc or type(exc).__name__)

    async def _disconnected(self) -> None:
        if not self.closing:
            log.warning("NATS disconnected: this worker answers no picks over NATS until "
                        "it reconnects; get-tcp-ip serves on")

    async def _reconnected(self) -> None:
        log.info("NATS reconnected: this worker answers picks over NATS again")

    async def close(self) -> None:
        self.closing = True
        await cancel_and_wait(self._task)
        if self.nc is not None:
            await close_link(self.nc, self.service)
