"""One dispatcher process: its configuration, event log, NATS connection and poller, and
the picks the HTTP app and the NATS endpoints serve from the routing state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from dispatcher import admin, leader_link, nats_service
from dispatcher import config as cfg
from dispatcher.domain import events as ev
from dispatcher.eventlog.errors import LogLocked, LogMissing
from dispatcher.eventlog.filelog import FileLog
from dispatcher.eventlog.retention import Retention
from dispatcher.eventlog.snapshots import SnapshotStore
from dispatcher.follower import Follower
from dispatcher.journal import Journal
from dispatcher.poller import Poller
from dispatcher.serving import Serving
from dispatcher.stats import WorkerStats
from imnode.micro import Service, close_link
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imdispatch")


class Leader(Serving):
    """The worker that holds the event log: it polls, records events, runs admin
    commands (for the other workers too) and, as every worker does, answers the micro
    service."""

    role = "leader"

    def __init__(self, config: cfg.Config, config_path: str | Path | None = None,
                 stats: WorkerStats | None = None, *, takeover: bool = False) -> None:
        """`takeover`: taking the log over from a dead leader, so it must be there (no
        new, empty log where it vanished)."""
        super().__init__(config, stats)
        self.config_path = Path(config_path) if config_path else None
        path = Path(config.eventlog.path)
        log = FileLog(path, fsync=config.eventlog.fsync,
                      segment_bytes=config.eventlog.segment_bytes, create=not takeover,
                      run_id=os.environ.get(RUN_ID),
                      retention=Retention.of(config.eventlog))
        log.on_sync = self.stats.fsync.observe
        self.stats.appended = lambda: log.appended
        self.journal = Journal(log, SnapshotStore(path / "snapshots",
                                                  config.eventlog.keep_snapshots),
                               snapshot_every=config.eventlog.snapshot_every)
        self.nc: Any = None
        self._status_failed: OSError | None = None  # said once, until it works again
        self.poller: Poller | None = None
        self.service: Service | None = None
        self._connecting: asyncio.Task | None = None
        self._link_lost = asyncio.Event()  # set by the poller: the connection delivers nothing
        self._abandoned_links = 0
        self._closing: set[asyncio.Task] = set()  # abandoned connections being closed
        self._stopping = False  # stop() closes the link: its disconnect is no news
        self.serving_nats = asyncio.Event()  # set once the micro service answers
        self._admin_server: asyncio.AbstractServer | None = None

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
        self._start_pacing()
        self._connecting = asyncio.get_running_loop().create_task(self._connect())
        if self.config.http.workers > 1:  # other workers send their admin commands here
            self._admin_server = await leader_link.serve_admin(self)

    async def _connect(self) -> None:
        """Keep a NATS connection that delivers: open one, put the poller and the
        `imdispatch` micro service on it, and when the poller finds that it delivers
        nothing (nats-py can say `connected` over a dead read loop), leave it for a new
        one. Until one answers, and meanwhile, clients get the last known state."""
        self.poller = Poller(None, self.journal, self.config.poll, self.config.balance,
                             after_cycle=self._after_cycle, link_lost=self._link_lost.set)
        self.poller.start()
        while True:
            nc = await self._open_nats()
            try:
                await self._attach(nc)
            except (nats.errors.Error, OSError) as exc:  # failed at once: another one
                log.warning("NATS: could not serve on the new connection (%r)", exc)
                self._link_lost.set()
            await self._link_lost.wait()
            self._link_lost.clear()
            await self._abandon_link()

    async def _open_nats(self) -> Any:
        """A new connection, tried every second until the server answers."""
        link = self._abandoned_links

        def current_only(handler: Callable[..., Any]) -> Callable[..., Any]:
            async def call(*args: Any) -> None:
                # an abandoned link's goodbyes, or our own close's, are not news
                if link == self._abandoned_links and not self._stopping:
                    await handler(*args)
            return call

        return await nats_service.connect(
            self.config.nats, error_cb=current_only(self._nats_error),
            disconnected_cb=current_only(self._disconnected),
            reconnected_cb=current_only(self._reconnected))

    async def _attach(self, nc: Any) -> None:
        self.nc = nc
        self.poller.attach(nc)
        self.service = await nats_service.serve(nc, self)
        self.serving_nats.set()
        await self._record_polling(ev.PollingResumed(actor="dispatcher",
                                                     reason="new NATS connection"))
        log.info("NATS connected; polling %d nodes; micro service imdispatch %s",
                 len(self.state.nodes), self.service.id)

    async def _abandon_link(self) -> None:
        """Leave the connection that stopped delivering: the poller and the micro service
        let go of it and it is closed in the background (closing can wait on a frozen
        broker); its subscriptions, the service's among them, go with it. Not stopped
        first: draining a subscription waits for a PONG that a dead link never reads."""
        old, self.nc, self.service = self.nc, None, None
        self.serving_nats.clear()
        self._abandoned_links += 1
        reason = self.poller.link_fault or "NATS link delivers nothing"
        self.poller.detach()
        log.warning("%s", reason)
        await self._record_polling(ev.PollingPaused(actor="dispatcher", reason=reason))
        closing = asyncio.get_running_loop().create_task(self._close_quietly(old))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_quietly(nc: Any) -> None:
        with contextlib.suppress(Exception):
            await nc.close()

    def link_fault(self) -> str | None:
        return self.poller.link_fault if self.poller is not None else None

    def _after_cycle(self) -> None:
        self.stats.poll_cycle.observe(self.poller.last_duration)
        self.stats.poll_failures = dict(self.poller.failures)
        self.poll_happened(self.poller.figures)
        try:
            leader_link.write_status(self)
        except OSError as exc:  # the log directory is gone, say: the log fails on it too
            if self._status_failed is None:
                log.warning("cannot write the status for the other workers: %s", exc)
            self._status_failed = exc
        else:
            self._status_failed = None

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def _disconnected(self) -> None:
        log.warning("NATS disconnected: no polling; serving the last known state")
        await self._record_polling(ev.PollingPaused(actor="dispatcher",
                                                    reason="NATS connection lost"))

    async def _reconnected(self) -> None:
        log.info("NATS reconnected: polling resumes")
        await self._record_polling(ev.PollingResumed(actor="dispatcher",
                                                     reason="NATS connection back"))

    async def _record_polling(self, event: Any) -> None:
        """The outage in the log, once per change (it explains why health stood still)."""
        resumed = isinstance(event, ev.PollingResumed)
        with contextlib.suppress(Exception):  # e.g. the journal is closing
            await self.journal.commit(lambda state: [event] if state.polling != resumed else [])

    async def admin(self, op: str, args: dict[str, Any], actor: str) -> tuple[int, Any]:
        """Run an admin command (this runtime writes the event log)."""
        return await admin.execute(self, op, args, actor)

    async def read_events(self, after: int, limit: int) -> list[Any]:
        """`/admin/events`: the stored events after `after` (read in a thread: the log
        is on disk)."""
        return await asyncio.to_thread(admin.read_file_events, self.config.eventlog.path,
                                       after, limit)

    async def reload(self) -> list[str]:
        """Apply the config file again (SIGHUP, POST /admin/reload); the changes it
        makes, as event types. All or nothing: the file is checked whole (by the same
        checks as the selection core's) before anything is recorded."""
        if self.config_path is None:
            raise cfg.ConfigError("no config file to reload")
        config = cfg.load(self.config_path)
        if config.eventlog.path != self.config.eventlog.path:
            raise cfg.ConfigError(f"{config.source}: [eventlog] path cannot change while the "
                                  "dispatcher runs; restart it to use another log")
        for table in ("http", "nats"):
            if getattr(config, table) != getattr(self.config.with_recorded(config.recorded()),
                                                 table):
                log.warning("[%s] changed in %s: takes effect at the next restart",
                            table, config.source)
        events = await self._apply_config(config)
        return [event.type for event in events]

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._connecting, self._pacing, *self._closing)
        if self._admin_server is not None:
            self._admin_server.close()
            leader_link.admin_socket(self.config).unlink(missing_ok=True)
        if self.poller is not None:
            await self.poller.stop()
        try:
            await self.journal.close()  # raises if the log failed: the caller says so
        finally:  # after the journal: a JetStream log writes through this link
            if self.nc is not None:
                await close_link(self.nc, self.service)

    def poll_status(self) -> tuple[float | None, bool]:
        last = self.poller.last_cycle if self.poller is not None else None
        connected = bool(self.nc is not None and self.nc.is_connected)
        return (None if last is None else time.monotonic() - last), connected

    def log_failure(self) -> BaseException | None:
        return self.journal.failure



TAKEOVER_INTERVAL = 1.0
HANDOVER_WAIT = 5.0  # at most this long two service instances in the new leader's process
RUN_ID = "IMDISPATCH_RUN_ID"
"""Environment variable: the id of the `imdispatch serve` a worker belongs to. The leader
records it in the log's lock file; a worker of the same run follows that leader, a process
of any other run refuses to start (two dispatchers must not share a log)."""
LOCK_RECORD_WAIT = 2.0  # how long a lock holder may take to record who it is


async def take_over_when_leader_dies(follower: Follower,
                                     promote: Callable[[Leader], None]) -> None:
    """In a follower worker: try the event log's writer lock every second; it comes free
    only when the leader worker is gone (killed, crashed), and then this worker becomes
    the leader, so polling and the log outlive any one worker. Until then the worker
    serves the state it has; `promote` switches it to the new leader before the follower
    stops. A takeover that fails half-way closes what it opened and is tried again.
    (Rebuilding the state runs on this worker's loop: a big log stalls it meanwhile.)"""
    missing_noted = False
    while True:
        await asyncio.sleep(TAKEOVER_INTERVAL)
        leader = Leader(follower.config, follower.config_path, follower.stats, takeover=True)
        try:
            await leader.start()
        except LogLocked:
            continue
        except LogMissing as exc:  # removed or moved away: its leader (if alive) has failed
            if not missing_noted:
                log.error("not taking over the event log: %s", exc)
                missing_noted = True
            continue
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await leader.stop()  # releases the lock if it got it
            if isinstance(exc, asyncio.CancelledError):  # the worker is stopping
                raise
            log.exception("could not take over as leader; trying again")
            continue
        promote(leader)
        log.warning("worker %d took over as leader: the previous leader is gone",
                    os.getpid())
        try:  # the follower's service instance answers until the leader's does
            await asyncio.wait_for(leader.serving_nats.wait(), HANDOVER_WAIT)
        except TimeoutError:
            pass  # NATS is away: the leader's instance comes with it
        finally:
            await follower.stop()
        return


async def open_runtime(config: cfg.Config, config_path: str | Path | None = None,
                       stats: WorkerStats | None = None) -> Serving:
    """The leader if this process gets the event log's writer lock, a follower if a
    worker of the same `serve` (the same `RUN_ID`) holds it; else `LogLocked` naming the
    holder's pid: another dispatcher has this log."""
    if config.eventlog.clustered:
        from dispatcher.cluster.member import Member

        member = Member(config, config_path, stats)
        await member.start()
        return member
    run_id = os.environ.get(RUN_ID)
    deadline = time.monotonic() + LOCK_RECORD_WAIT
    # A worker started in place of a dead one (its settings come from the log) finds the
    # log there, as a takeover does: a log that vanished is an error, never a new one.
    replacing = config.source == cfg.FROM_LOG
    while True:
        leader = Leader(config, config_path, stats, takeover=replacing)
        try:
            await leader.start()
            return leader
        except LogLocked as exc:
            if run_id is not None and exc.run_id == run_id:
                break
            if time.monotonic() >= deadline:
                raise
            # The holder may have the lock and not yet have written who it is.
            await asyncio.sleep(0.05)
    follower = Follower(config, config_path, stats)
    await follower.start()
    return follower
