"""NATS micro services (ADR-32) for both programs: `imnode` and `imdispatch`.

ADR-32 is what makes `nats micro ls|info|stats` and `nats req` work: every instance answers
`$SRV.PING|INFO|STATS` (plain, `.<name>`, `.<name>.<id>`), its endpoints are queue
subscriptions in group `q`, and error replies carry `Nats-Service-Error` and
`Nats-Service-Error-Code`.

Why our own small implementation instead of nats-py's `nats.micro` (checked in 2.16):
the part that library adds over a plain subscription is the stats bookkeeping, and that is
the part that is broken:
- an error sent with `Request.respond_error()` is not counted (only a raised exception is);
- `Service.reset()` only resets `started`, never the counters;
- its private `Endpoint._reset()` sets `average_processing_time` to a `timedelta`, so the
  next `$SRV.STATS` fails to serialise and gets no reply at all;
- error codes are strings (a header value must be `str`), handlers reply themselves.
A wrapper would have to rewrite six private attributes of its endpoints and adapt both the
handler and the error type, leaving the library only nine subscriptions and three JSON
objects. Those are written here on the public client API (`subscribe`, `publish`), so the
behaviour is ours to test and does not shift with nats-py's internals.

Reconnects need nothing here: nats-py replays every live subscription on reconnect, so
the service comes back with the same id and its counters intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, ConnectionDrainingError
from nats.errors import Error as NatsError
from nats.nuid import NUID

from imnode.tasks import within

__all__ = [
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "QUEUE_GROUP",
    "Handler",
    "Request",
    "Service",
    "ServiceError",
    "error_headers",
]

log = logging.getLogger(__name__)

PREFIX = "$SRV"
QUEUE_GROUP = "q"
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
VERBS = ("PING", "INFO", "STATS")

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# The official semver.org regex, the one the jsm.go schemas use.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


class ServiceError(Exception):
    """Raise from a handler to send an ADR-32 error reply (counted as an error in stats).

    `code` is an int because ADR-32 wants `Nats-Service-Error-Code` always parseable as a
    number; `description` goes to `Nats-Service-Error` and may be shown to users.
    """

    def __init__(self, code: int, description: str, data: bytes = b"") -> None:
        super().__init__(code, description)
        self.code = int(code)
        self.description = description
        self.data = data

    def __str__(self) -> str:
        return f"{self.code}:{self.description}"  # the form Go's micro uses for last_error


@dataclass(frozen=True, slots=True)
class Request:
    """What a handler sees. Not the raw `Msg`: the framework sends the one reply."""

    subject: str
    data: bytes
    headers: Mapping[str, str]


Handler = Callable[[Request], Awaitable[bytes]]
"""`async def handler(request) -> bytes`; raise `ServiceError` for an error reply."""


def error_headers(code: int, description: str) -> dict[str, str]:
    """The two ADR-32 error headers (for callers building a reply outside a handler)."""
    return {ERROR_HEADER: description, ERROR_CODE_HEADER: str(int(code))}


def _strings(metadata: Mapping[str, str] | None, what: str) -> dict[str, str]:
    """A private copy (ADR-32: metadata is immutable once set), checked: `nats` needs strings."""
    copied = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in copied.items()):
        raise ValueError(f"{what} metadata must map str to str: {copied!r}")
    return copied


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Endpoint:
    """One endpoint: its queue subscription and the counters `$SRV.STATS` reports."""

    def __init__(
        self, nc: Client, name: str, subject: str, handler: Handler, metadata: dict[str, str]
    ) -> None:
        self.nc = nc
        self.name = name
        self.subject = subject
        self.handler = handler
        self.metadata = metadata
        self.subscription: Subscription | None = None
        self.reset()

    def reset(self) -> None:
        self.num_requests = 0
        self.num_errors = 0
        self.last_error = ""
        self.processing_time = 0  # ns

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": QUEUE_GROUP,
            "metadata": self.metadata,
        }

    def stats(self) -> dict[str, Any]:
        requests = self.num_requests
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": QUEUE_GROUP,
            "num_requests": requests,
            "num_errors": self.num_errors,
            "last_error": self.last_error,
            "processing_time": self.processing_time,
            # ADR-32: truncated to a whole number, 0 without requests.
            "average_processing_time": self.processing_time // requests if requests else 0,
        }

    async def subscribe(self) -> None:
        self.subscription = await self.nc.subscribe(
            self.subject, queue=QUEUE_GROUP, cb=self._handle
        )

    async def _handle(self, msg: Msg) -> None:
        # nats-py awaits this per message, so one endpoint's requests run one at a time.
        started = time.perf_counter_ns()
        self.num_requests += 1
        headers: dict[str, str] | None = None
        try:
            try:
                data = await self.handler(Request(msg.subject, msg.data, msg.headers or {}))
                if not isinstance(data, bytes):
                    raise TypeError(f"handler returned {type(data).__name__}, not bytes")
            except ServiceError as error:
                data, headers = error.data, error_headers(error.code, error.description)
                self._failed(str(error))
            except Exception as error:
                log.exception("endpoint %s (%s) failed", self.name, self.subject)
                data, headers = b"", error_headers(500, repr(error))
                self._failed(f"500:{error!r}")
            if msg.reply:
                await self.nc.publish(msg.reply, data, headers=headers)
        finally:
            self.processing_time += time.perf_counter_ns() - started

    def _failed(self, error: str) -> None:
        self.num_errors += 1
        self.last_error = error


class Service:
    """One instance of an ADR-32 service on a connection (several may share a connection).

    Endpoints added before `start()` subscribe on start; added after, at once (ADR-32
    allows both). Handlers of one endpoint run one at a time, in arrival order.
    """

    def __init__(
        self,
        nc: Client,
        name: str,
        version: str,
        description: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"service name must match [A-Za-z0-9_-]+: {name!r}")
        if not _SEMVER.match(version):
            raise ValueError(f"service version must be semver (e.g. 1.2.3): {version!r}")
        if not isinstance(description, str):
            raise ValueError("service description must be a string")
        self.nc = nc
        self.name = name
        self.version = version
        self.description = description
        self.metadata = _strings(metadata, "service")
        self.id: str = NUID().next().decode()
        self.started = datetime.now(UTC)
        self._endpoints: list[_Endpoint] = []
        self._control: list[Subscription] = []
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    async def add_endpoint(
        self,
        name: str,
        subject: str,
        handler: Handler,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"endpoint name must match [A-Za-z0-9_-]+: {name!r}")
        if not subject or " " in subject or subject.startswith(PREFIX + "."):
            raise ValueError(f"bad endpoint subject: {subject!r}")
        endpoint = _Endpoint(self.nc, name, subject, handler, _strings(metadata, "endpoint"))
        self._endpoints.append(endpoint)
        if self._running:
            await endpoint.subscribe()
            await _flush(self.nc)

    async def start(self) -> None:
        """Subscribe endpoints, then the `$SRV` subjects: once discoverable, it answers.

        Returns after a flush, so the server has the subscriptions when this returns.
        """
        if self._running:
            return
        self._running = True
        self.started = datetime.now(UTC)
        for endpoint in self._endpoints:
            await endpoint.subscribe()
        for verb in VERBS:
            reply = self._control_handler(verb)
            for subject in (
                f"{PREFIX}.{verb}",
                f"{PREFIX}.{verb}.{self.name}",
                f"{PREFIX}.{verb}.{self.name}.{self.id}",
            ):
                self._control.append(await self.nc.subscribe(subject, cb=reply))
        await _flush(self.nc)

    async def stop(self) -> None:
        """Drain every subscription (ADR-32): requests already received are answered.

        Do not await this from one of the service's own handlers: draining waits for
        that handler to return. Schedule it as a task instead. Cancelling it returns at
        once; the drains (each a flush) go on in the background, see `_flush`.
        """
        if not self._running:
            return
        self._running = False
        subscriptions = [e.subscription for e in self._endpoints if e.subscription]
        subscriptions += self._control
        self._control = []
        for endpoint in self._endpoints:
            endpoint.subscription = None
        await asyncio.gather(*(_drain(s) for s in subscriptions))

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def ping(self) -> dict[str, Any]:
        return {
            "type": "io.nats.micro.v1.ping_response",
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
        }

    def info(self) -> dict[str, Any]:
        return {
            **self.ping(),
            "type": "io.nats.micro.v1.info_response",
            "description": self.description,
            "endpoints": [e.info() for e in self._endpoints],
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.ping(),
            "type": "io.nats.micro.v1.stats_response",
            "started": _rfc3339(self.started),
            "endpoints": [e.stats() for e in self._endpoints],
        }

    def reset(self) -> None:
        """Zero every endpoint's counters and restart `started` (as Go's micro does)."""
        self.started = datetime.now(UTC)
        for endpoint in self._endpoints:
            endpoint.reset()

    def _control_handler(self, verb: str) -> Callable[[Msg], Awaitable[None]]:
        build = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}[verb]

        async def reply(msg: Msg) -> None:
            if msg.reply:
                await self.nc.publish(msg.reply, json.dumps(build()).encode())

        return reply


DRAIN_WITHIN = 2.0  # seconds a stop gives NATS to drain before it closes the link
CLOSE_WITHIN = 1.0  # and then to close


async def close_link(nc: Client, service: Service | None) -> None:
    """Stop `service` (it answers the requests it already has) and drain `nc`, but for
    `DRAIN_WITHIN` at most, then close: nats-py waits up to 10 s per flush and 30 s per
    drain for a server that does not answer, and a stop must not wait that long. The one
    way both programs let go of their NATS link."""

    async def drain() -> None:
        if service is not None:
            with contextlib.suppress(Exception):
                await service.stop()
        await nc.drain()

    if not await within(drain(), DRAIN_WITHIN):
        log.warning("NATS did not drain within %g s; closing the connection", DRAIN_WITHIN)
    if not await within(nc.close(), CLOSE_WITHIN):
        log.warning("NATS did not close within %g s; leaving it", CLOSE_WITHIN)


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # seen, so that asyncio does not log it as never retrieved


async def _flush(nc: Client) -> None:
    """`nc.flush()` that a cancellation of the caller does not cancel (nor time out).

    nats-py (2.16) queues each flush's future for the PONG answering its PING. A flush
    cancelled (or timed out) before that PONG leaves a cancelled future in the queue:
    the PONG then raises InvalidStateError in the client's read loop, which ends, and
    every later flush waits its full 10 s for a PONG nobody reads. A stop that cancelled
    the NATS link while `start()` waited here made the drain after it take 10 s. Here
    the flush runs on in its own task and takes its PONG; the caller leaves at once.
    """
    await _shielded(nc.flush())


async def _shielded(coroutine: Awaitable[None]) -> None:
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(_retrieved)
    await asyncio.shield(task)


async def _drain(subscription: Subscription) -> None:
    try:
        await _shielded(subscription.drain())  # it flushes: see `_flush`
    except (ConnectionClosedError, ConnectionDrainingError):
        pass  # the connection is going away and takes its subscriptions with it
    except NatsError as error:  # e.g. no PONG while reconnecting: the UNSUB is queued anyway
        log.warning("draining %s: %r", subscription.subject, error)
