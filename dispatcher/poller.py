"""The poller: every interval, ask every node for its status over NATS, all at once, and
turn what it learns into events (health changes, load reports, overload).

It also watches its own NATS link. nats-py can keep saying `connected` while its read
loop is dead (a late PONG for a timed-out `flush(timeout=...)` kills it: nats.py#624), so
every cycle publishes one message to the poller's own inbox beside the status requests:
a cycle without that echo proves nothing about the nodes. After `LINK_MISSES` such
cycles in a row the link is declared lost and whoever owns it replaces it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from nats.nuid import NUID

from dispatcher.config import BalanceConfig, PollConfig
from dispatcher.domain import decisions
from dispatcher.domain.health import Failure, HealthTracker, NodeStatus, parse_status
from dispatcher.journal import Journal
from imnode.tasks import cancel_and_wait

log = logging.getLogger("imdispatch.poller")

ECHO = "$echo"
"""The last token of the poller's message to itself (`$` is never in a node id)."""

LINK_MISSES = 2
"""Cycles in a row that prove nothing before the NATS link is declared lost."""


def nats_inbox() -> str:
    return f"_INBOX.imdispatch.{NUID().next().decode()}"


class Poller:
    def __init__(self, nc: Any, journal: Journal, poll: PollConfig, balance: BalanceConfig,
                 after_cycle: Callable[[], None] | None = None,
                 link_lost: Callable[[], None] | None = None) -> None:
        self.nc = nc  # None while the owner has no connection to give it
        self.journal = journal
        self.poll = poll
        self.balance = balance
        self.health = HealthTracker(poll.rise, poll.fall)
        self.cycles = 0
        self.last_cycle: float | None = None  # monotonic time the last full cycle ended
        self.last_duration = 0.0
        self.failures: dict[str, int] = {}  # poll failures by cause, since start
        self.figures: dict[str, int] = {}  # the last cycle's connections, per node that answered
        self.asked_at: float | None = None  # monotonic time the last cycle sampled the picks
        self.after_cycle = after_cycle
        self.link_lost = link_lost
        self.link_misses = 0  # cycles in a row that proved nothing on a "connected" link
        self.link_fault: str | None = None  # why the link is not trusted, until a good cycle
        self._fresh_link = True  # no good cycle on this link yet: its evidence is believed
        self._inbox = nats_inbox()
        self._round = 0
        self._subscription: Any = None
        self._collect: tuple[str, dict[str, Any], set[str], asyncio.Event] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def attach(self, nc: Any) -> None:
        """Poll over `nc` from the next cycle on (a new connection replacing a lost one)."""
        self.nc, self._subscription = nc, None
        self.link_misses, self._fresh_link = 0, True

    def detach(self) -> None:
        """Stop using the current connection (it is being replaced): cycles conclude
        nothing until `attach`."""
        self.nc, self._subscription = None, None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad cycle must not end polling
                log.exception("poll cycle failed")
            await asyncio.sleep(max(0.0, self.poll.interval - (time.monotonic() - started)))

    async def cycle(self) -> bool:
        """Poll every node once and record what changed; False if the cycle proves
        nothing: NATS unavailable (an unreachable broker says nothing about the nodes), or
        the link delivering nothing (see `_doubt`)."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            return False
        started = time.monotonic()
        state = self.journal.state
        asked = dict(state.nodes)
        self.health.retain(asked)
        node_ids = list(asked)
        state.selector.sample()  # picks from now on stay pending after these answers
        self.asked_at = time.monotonic()
        answers = await self._ask_all(nc, node_ids)
        if answers is None or nc is not self.nc or not nc.is_connected:
            return False  # lost NATS during the cycle: its failures prove nothing
        replies, echoed = answers
        results = [self._verdict(node_id, replies.get(node_id)) for node_id in node_ids]
        doubt = self._doubt(echoed, [asked[node_id] for node_id in node_ids], results)
        if doubt is not None:
            self._missed(doubt)
            return False
        self.link_misses, self.link_fault = 0, None
        self._fresh_link = self._fresh_link and all(
            isinstance(result, Failure) and result.cause == "timeout" for result in results)
        verdicts = []
        for node_id, result in zip(node_ids, results, strict=True):
            record = state.nodes.get(node_id)
            if record is not asked[node_id]:
                continue  # removed (or removed and added again) meanwhile
            if isinstance(result, Failure):
                self.failures[result.cause] = self.failures.get(result.cause, 0) + 1
            change = self.health.observe(node_id, result, record.health, record.health_cause)
            verdicts.append((node_id, result, change))
        self.figures = {node_id: result.connections
                        for node_id, result in zip(node_ids, results, strict=True)
                        if isinstance(result, NodeStatus)}
        if verdicts and self.journal.failure is None:
            # A failed log refuses every change (the dispatcher is not ready then, and
            # says why); the cycle still counts, so the loads follow the fresh figures.
            await self.journal.commit(partial(self._decide, asked, verdicts))
        self.cycles += 1
        self.last_cycle = time.monotonic()
        self.last_duration = self.last_cycle - started
        if self.after_cycle is not None:
            self.after_cycle()
        return True

    def _decide(self, asked: dict[str, Any], verdicts: list[tuple[str, Any, str | None]],
                state: Any) -> list[Any]:
        """The events of a cycle's verdicts, decided on `state` (again, if another writer
        of a shared log wrote first: the health streaks are counted once, in `cycle`)."""
        events: list[Any] = []
        for node_id, result, change in verdicts:
            if state.nodes.get(node_id) is not asked[node_id]:
                continue  # removed (or removed and added again) meanwhile
            if change == "down":
                events += decisions.mark_down(state, node_id, result.cause, result.detail)
            elif change == "up":
                events += decisions.mark_up(state, node_id)
            if isinstance(result, NodeStatus):
                events += decisions.observe_load(state, node_id, result.connections,
                                                 result.capacity,
                                                 load_step=self.balance.load_step)
        return events

    def _doubt(self, echoed: bool, records: list[Any],
               results: list[NodeStatus | Failure]) -> str | None:
        """Why this cycle's evidence is about the dispatcher's own link rather than the
        nodes, or None. Without the echo the link delivered nothing. When every node
        timed out at once, the link is suspected first too (one broken path is likelier
        than every node frozen), unless the link is new since and still sees only
        timeouts, or the nodes are all down already (nothing to doubt)."""
        if not echoed:
            return (f"NATS link delivers nothing: the poller's own message did not come back "
                    f"within {self.poll.timeout:g} s")
        everyone_timed_out = len(results) > 1 and all(
            isinstance(result, Failure) and result.cause == "timeout" for result in results)
        if (everyone_timed_out and not self._fresh_link
                and any(record.health != "down" for record in records)):
            return (f"every node timed out at once ({len(results)}): the dispatcher's NATS "
                    "link is suspected before the nodes")
        return None

    def _missed(self, doubt: str) -> None:
        self.link_misses += 1
        log.warning("poll cycle proves nothing (%d in a row): %s", self.link_misses, doubt)
        if self.link_misses == LINK_MISSES:
            self.link_fault = f"{doubt}; replacing the NATS connection"
            if self.link_lost is not None:
                self.link_lost()

    async def _ask_all(self, nc: Any, node_ids: list[str]
                       ) -> tuple[dict[str, Any], bool] | None:
        """Ask every node at once: one publish each with a reply subject on this poller's
        inbox, then one to the inbox itself, then collect until every node answered and
        the echo came back, or the timeout passed (a scatter: cheaper than a request and
        a future per node). A node nobody subscribes for gets the server's "no
        responders" status at once. (No `flush(timeout=...)`: its timeout leaves a
        cancelled future for the next PONG, which kills nats-py's read loop.) The
        replies by node id and whether the echo came back; None if NATS failed
        meanwhile."""
        self._round += 1
        prefix = f"{self._inbox}.{self._round}."
        replies: dict[str, Any] = {}
        complete = asyncio.Event()
        self._collect = (prefix, replies, {*node_ids, ECHO}, complete)
        try:
            if self._subscription is None:
                self._subscription = await nc.subscribe(f"{self._inbox}.*.*",
                                                        cb=self._on_reply)
            for node_id in node_ids:
                await nc.publish(f"imnode.{node_id}.status", b"", reply=prefix + node_id)
            await nc.publish(prefix + ECHO, b"")  # after the requests: it comes back last
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: a stop's cancel
                async with asyncio.timeout(self.poll.timeout):  # is never lost (wait_for
                    await complete.wait()  # in 3.11 drops it when both land at once)
        except Exception as exc:  # connection closed, reconnecting, ...: not the nodes
            log.debug("status requests failed: %r", exc)
            return None
        finally:
            self._collect = None
        return replies, replies.pop(ECHO, None) is not None

    async def _on_reply(self, msg: Any) -> None:
        collect = self._collect
        if collect is None or not msg.subject.startswith(collect[0]):
            return  # a late reply to an earlier cycle
        prefix, replies, wanted, complete = collect
        key = msg.subject[len(prefix):]
        if key not in wanted or key in replies:
            return  # for no node asked, or a second reply: junk, it completes nothing
        replies[key] = msg
        if len(replies) == len(wanted):
            complete.set()

    def _verdict(self, node_id: str, msg: Any) -> NodeStatus | Failure:
        if msg is None:
            return Failure("timeout", f"no status reply within {self.poll.timeout:g} s")
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            return Failure("no_responders", f"nobody answers imnode.{node_id}.status")
        return parse_status(node_id, msg.data)
