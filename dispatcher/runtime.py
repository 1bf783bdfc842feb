"""One dispatcher process: its configuration, event log, NATS connection and poller, and
the picks the HTTP app and the NATS endpoints serve from the routing state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import nats
import orjson

from dispatcher import admin, pacing
from dispatcher import config as cfg
from dispatcher.domain import decisions
from dispatcher.eventlog.filelog import FileLog
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.journal import Journal
from dispatcher.poller import Poller
from dispatcher.query import PickRequest, QueryError, from_json
from imnode.micro import Service, ServiceError

log = logging.getLogger("imdispatch")
DESCRIPTION = "Dispatcher for IM long-connection servers: picks one server per new client"


@dataclass(frozen=True, slots=True)
class Choice:
    node: str
    ip: str
    port: int

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "ip": self.ip, "port": self.port}


def nats_options(config: cfg.NatsConfig) -> dict[str, Any]:
    """nats-py connect() options from the [nats] table (credentials are never logged)."""
    options: dict[str, Any] = {"servers": list(config.servers)}
    if config.user is not None:
        options["user"], options["password"] = config.user, config.password
    if config.token is not None:
        options["token"] = config.token
    if config.creds is not None:
        options["user_credentials"] = config.creds
    if config.nkey_seed is not None:
        options["nkeys_seed"] = config.nkey_seed
    if config.tls_ca or config.tls_cert:
        context = ssl.create_default_context(cafile=config.tls_ca)
        if config.tls_cert:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        options["tls"] = context
    return options


class Runtime:
    def __init__(self, config: cfg.Config, config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        path = Path(config.eventlog.path)
        self.journal = Journal(
            FileLog(path, fsync=config.eventlog.fsync,
                    segment_bytes=config.eventlog.segment_bytes),
            SnapshotStore(path / "snapshots"),
            snapshot_every=config.eventlog.snapshot_every,
        )
        self.nc: Any = None
        self.poller: Poller | None = None
        self.service: Service | None = None
        self.limiter = pacing.AssignmentLimiter()
        self._ramping: set[str] = set()
        self._pacing: asyncio.Task | None = None
        self.opened_at: float | None = None
        self._connecting: asyncio.Task | None = None

    @property
    def state(self):
        return self.journal.state

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the state from the log, apply the config file, then reach NATS in the
        background: until it answers, clients get the last known state."""
        report = await self.journal.open()
        for line in report.describe():
            log.info("event log: %s", line)
        await self._apply_config(self.config)
        self.opened_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_task(self._connect())
        self._pacing = loop.create_task(self._slow_start())

    async def _connect(self) -> None:
        while True:
            try:
                self.nc = await nats.connect(
                    name="imdispatch", max_reconnect_attempts=-1, reconnect_time_wait=1,
                    connect_timeout=2, error_cb=self._nats_error,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                    **nats_options(self.config.nats),
                )
                break
            except Exception as exc:
                log.warning("NATS unreachable (%s); serving the last known state", exc)
                await asyncio.sleep(1.0)
        self.poller = Poller(self.nc, self.journal, self.config.poll, self.config.balance,
                             after_cycle=self.update_ramps)
        self.poller.start()
        self.service = Service(self.nc, "imdispatch", version("imdispatch"), DESCRIPTION)
        await self.service.add_endpoint("pick", "imdispatch.pick", self._pick_endpoint)
        await self.service.add_endpoint("nodes", "imdispatch.nodes", self._nodes_endpoint)
        await self.service.start()
        log.info("NATS connected; polling %d nodes; micro service imdispatch %s",
                 len(self.state.nodes), self.service.id)

    async def _pick_endpoint(self, request: Any) -> bytes:
        """`imdispatch.pick`: the get-tcp-ip answer for a JSON body with its parameters."""
        try:
            pick = from_json(orjson.loads(request.data) if request.data else {})
        except (QueryError, orjson.JSONDecodeError) as exc:
            raise ServiceError(400, str(exc)) from None
        chosen = self.choose(pick)
        if not chosen:
            raise ServiceError(503, "no IM node can take a client now")
        answer = chosen[0].as_dict()
        if pick.count > 1:
            answer["backups"] = [choice.as_dict() for choice in chosen[1:]]
        return orjson.dumps(answer)

    async def _nodes_endpoint(self, request: Any) -> bytes:
        """`imdispatch.nodes`: the node list of `GET /admin/nodes`, read-only."""
        return orjson.dumps(self.state.node_views())

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def _disconnected(self) -> None:
        log.warning("NATS disconnected: no polling; serving the last known state")

    async def _reconnected(self) -> None:
        log.info("NATS reconnected: polling resumes")

    async def admin(self, op: str, args: dict[str, Any], actor: str) -> tuple[int, Any]:
        """Run an admin command (this runtime writes the event log)."""
        return await admin.execute(self, op, args, actor)

    async def reload(self) -> list[str]:
        """Apply the config file again (SIGHUP, POST /admin/reload); the changes it
        makes, as event types."""
        if self.config_path is None:
            raise cfg.ConfigError("no config file to reload")
        config = cfg.load(self.config_path)
        events = await self._apply_config(config)
        self.config = config
        if self.poller is not None:
            self.poller.poll, self.poller.balance = config.poll, config.balance
        return [event.type for event in events]

    async def _apply_config(self, config: cfg.Config) -> list:
        events = decisions.reconcile_config(self.state, config.recorded(), config.source)
        if events:
            await self.journal.record(events)
        return events

    async def stop(self) -> None:
        for task in (self._connecting, self._pacing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.poller is not None:
            await self.poller.stop()
        if self.service is not None:
            with contextlib.suppress(Exception):
                await self.service.stop()
        await self.journal.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    # -- serving ----------------------------------------------------------------------

    def choose(self, request: PickRequest) -> list[Choice]:
        """The node for one new client, then distinct backups; [] when none can take one.

        Nodes that used up their assignments for this second are skipped (pacing)."""
        selector, nodes, limiter = self.state.selector, self.state.nodes, self.limiter
        now = time.monotonic()
        configured = self.config.balance.assign_rate
        if limiter.blocked:
            limiter.refill({n: pacing.assign_rate(nodes[n], configured)
                            for n in limiter.blocked if n in nodes}, now)
        excluded = [*request.exclude, *limiter.blocked]
        chosen: list[Choice] = []
        while len(chosen) < request.count:
            node_id = selector.pick(excluded)
            if node_id is None:
                break
            record = nodes[node_id]
            chosen.append(Choice(node_id, record.ip, record.port))
            limiter.took(node_id, pacing.assign_rate(record, configured), now)
            excluded.append(node_id)
        return chosen

    def update_ramps(self) -> None:
        """Give nodes that came up recently their growing share (slow start). Run after
        every poll cycle, so a node that just came up starts small at once, and four
        times a second, so its share grows smoothly."""
        now = time.time()
        slow_start = self.config.balance.slow_start
        for node_id, record in self.state.nodes.items():
            ramp = pacing.slow_start_ramp(record, now, slow_start)
            if ramp < pacing.RAMP_FULL or node_id in self._ramping:
                self.state.selector.set_ramp(node_id, ramp)
                if ramp < pacing.RAMP_FULL:
                    self._ramping.add(node_id)
                else:
                    self._ramping.discard(node_id)
        self._ramping &= set(self.state.nodes)

    async def _slow_start(self) -> None:
        while True:
            self.update_ramps()
            await asyncio.sleep(0.25)

    def retry_after(self) -> int:
        """Seconds a refused client should wait, with jitter so they do not return at once."""
        base = self.config.http.retry_after
        return random.randint(base, 2 * base)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once the state is in hand (a poll cycle done, or a replayed state with
        nodes) and not older than `stale_after`."""
        now = time.monotonic()
        poller = self.poller
        last = poller.last_cycle if poller is not None else None
        age = None if last is None else now - last
        stale_after = self.config.poll.stale_after
        failure = self.journal.failure
        details = {
            "nats_connected": bool(self.nc is not None and self.nc.is_connected),
            "state_seq": self.state.seq,
            "nodes": len(self.state.nodes),
            "last_poll_age_s": None if age is None else round(age, 3),
            "stale_after_s": stale_after,
            "event_log": "failed" if failure is not None else "ok",
        }
        if failure is not None:
            return False, {**details, "reason": f"event log failed: {failure}"}
        if age is None:
            known = any(record.health != "unknown" for record in self.state.nodes.values())
            if known and self.opened_at is not None and now - self.opened_at < stale_after:
                return True, {**details, "reason": "replayed state, first poll pending"}
            return False, {**details, "reason": "no poll cycle yet"}
        if age > stale_after:
            return False, {**details, "reason": f"state is {age:.1f} s old"}
        return True, details
