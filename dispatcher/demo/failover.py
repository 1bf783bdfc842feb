"""The scripted moments of `imdispatch demo --replicas N`: the replica that leads is
SIGKILLed and comes back, then the nats-server that leads the stream is SIGKILLed and
comes back. Each moment starts a watch that says what followed and when, from what an
operator can see too: the replicas' /readyz (`role`, `member`, `last_poll_age_s`), their
get-tcp-ip answers, an admin write, and JetStream's stream info."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import nats
from nats.errors import Error as NatsError

from dispatcher.demo.moments import Moment, admin
from dispatcher.demo.replicas import STREAM, ClusterStack

Say = Callable[[str], None]
WATCH_LIMIT = 30.0  # seconds a watch waits before it says what did not happen
FRESH = 1.0  # last_poll_age_s at most this (2 poll intervals): a poll cycle just ended
ASK_EVERY = 1.0  # seconds between two get-tcp-ip probes of a replica. Each probe is a
# real pick; at 4 a second every replica answered 503 after 12-23 probes while the stream
# had no leader (the probes' picks filling the demo's small nodes, most likely)
WRITE_EVERY = 0.25  # seconds between two tries of the admin write, or two stream probes
WRITE_TIMEOUT = 2.0  # one admin write during the stream's election


def _get(url: str, timeout: float = 1.0) -> tuple[int, Any] | None:
    """(status, JSON body) of a GET, None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return None


async def readiness(stack: ClusterStack) -> list[dict[str, Any] | None]:
    """Every replica's /readyz body (503 ones too), None for one that does not answer."""

    async def one(url: str | None) -> dict[str, Any] | None:
        got = await asyncio.to_thread(_get, f"{url}/readyz") if url else None
        return got[1] if got is not None and isinstance(got[1], dict) else None

    return list(await asyncio.gather(*(one(r.url if r.running else None)
                                       for r in stack.replicas)))


async def stream_leader(stack: ClusterStack) -> str | None:
    """The server name JetStream gives as the stream's leader (asked of each running
    server in turn), None if no server says."""

    async def quiet(_exc: Exception) -> None:  # a refused probe is an answer here
        pass

    for server in stack.nats.servers:
        if not server.running:
            continue
        try:
            nc = await nats.connect(server.url, connect_timeout=1, allow_reconnect=False,
                                    max_reconnect_attempts=0, error_cb=quiet)
        except (OSError, NatsError):
            continue
        try:
            info = await nc.jetstream(timeout=1).stream_info(STREAM)
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
        except (TimeoutError, NatsError):
            pass
        finally:
            await nc.close()
    return None


def script(stack: ClusterStack, say: Say) -> list[Moment]:
    """The moments in order (the demo plays them in a loop). Each act does its deed
    before the demo reads the admin API again, and returns the task that watches what
    follows; the next moment waits for it."""
    killed: dict[str, int] = {}  # what the last kill took down, for its restart
    heavy = next(iter(stack.nodes.values()))

    async def kill_leader(_stack: Any) -> asyncio.Task | None:
        ready = await readiness(stack)
        leading = [i for i, r in enumerate(ready) if r and r.get("role") == "leader"]
        if not leading:
            say("no replica says it leads right now: nothing killed")
            return None
        index = leading[0]
        member, replica = ready[index]["member"], stack.replicas[index]
        stack.kill_replica(index)
        killed["replica"], started = index, time.monotonic()
        say(f"{replica.name} led (member {member}): SIGKILLed")
        return asyncio.create_task(_takeover(stack, member, started, say))

    async def restart_replica(_stack: Any) -> asyncio.Task | None:
        index = killed.pop("replica", None)
        if index is None:
            say("no replica was killed: nothing to restart")
            return None
        stack.start_replica(index)  # on the loop's (main) thread, like every spawn
        return asyncio.create_task(_rejoin(stack, index, time.monotonic(), say))

    async def kill_stream_leader(_stack: Any) -> asyncio.Task | None:
        name = await stream_leader(stack)
        if name is None:
            say(f"no server says it leads stream {STREAM}: nothing killed")
            return None
        index = stack.nats.index_of(name)
        stack.nats.kill(index)
        killed["server"], started = index, time.monotonic()
        say(f"nats-server {name} ({stack.nats.urls[index]}) led stream {STREAM}: SIGKILLed")
        return asyncio.create_task(
            _stream_failover(stack, name, heavy.id, heavy.weight * 2, started, say))

    async def restart_server(_stack: Any) -> asyncio.Task | None:
        index = killed.pop("server", None)
        if index is None:
            say("no nats-server was killed: nothing to restart")
            return None
        stack.nats.servers[index].launch()  # same ports, same store: the same member
        return asyncio.create_task(
            _server_back(stack, index, heavy.id, heavy.weight, time.monotonic(), say))

    return [
        Moment("kill the replica that leads (SIGKILL): another takes the lease and polls",
               kill_leader),
        Moment("restart the killed replica: same config, it rejoins as a follower",
               restart_replica),
        Moment(f"kill the nats-server that leads stream {STREAM} (SIGKILL), and make an "
               f"admin change meanwhile (weight of {heavy.id} {heavy.weight} -> "
               f"{heavy.weight * 2})", kill_stream_leader),
        Moment(f"restart the killed nats-server: it rejoins the cluster; weight of {heavy.id} "
               f"back to {heavy.weight}", restart_server),
    ]


async def _takeover(stack: ClusterStack, old: str, killed_at: float, say: Say) -> None:
    """Until a replica other than `old` says it leads and has polled since the kill."""
    named = False
    while time.monotonic() - killed_at < WATCH_LIMIT:
        for replica, ready in zip(stack.replicas, await readiness(stack), strict=True):
            if not ready or ready.get("role") != "leader" or ready.get("member") == old:
                continue
            now = time.monotonic()
            if not named:
                named = True
                say(f"{replica.name} (member {ready['member']}) leads "
                    f"{now - killed_at:.1f} s after the kill")
            age = ready.get("last_poll_age_s")
            if age is not None and age <= FRESH and now - age > killed_at:
                say(f"{replica.name}'s first poll cycle as leader ended "
                    f"{now - age - killed_at:.1f} s after the kill "
                    f"(its readyz: last_poll_age_s {age:.2f})")
                return
        await asyncio.sleep(0.1)
    say(f"no other replica led and polled within {WATCH_LIMIT:.0f} s of the kill")


async def _rejoin(stack: ClusterStack, index: int, started: float, say: Say) -> None:
    replica = stack.replicas[index]
    while time.monotonic() - started < WATCH_LIMIT:
        ready = (await readiness(stack))[index]
        if ready and ready.get("ready"):
            replica.serving = True
            others = [r.get("state_seq") for i, r in enumerate(await readiness(stack))
                      if i != index and r]
            say(f"{replica.name} rejoined: ready {time.monotonic() - started:.1f} s after its "
                f"restart, {ready.get('role')} at state_seq {ready.get('state_seq')} "
                f"(the others at {', '.join(map(str, others))})")
            return
        if not replica.running:
            say(f"{replica.name} exited after its restart: see replica-{replica.name}.log")
            return
        await asyncio.sleep(0.1)
    say(f"{replica.name} was not ready {WATCH_LIMIT:.0f} s after its restart")


async def _stream_failover(stack: ClusterStack, old: str, node_id: str, weight: int,
                           killed_at: float, say: Say) -> None:
    """While the stream elects a new leader: every replica's get-tcp-ip answers, an admin
    write tried until it is stored, and the stream's next leader."""
    answers: dict[str, Counter[str]] = {r.name: Counter() for r in stack.replicas}
    done = asyncio.Event()

    async def probe(index: int) -> None:
        replica = stack.replicas[index]
        while not done.is_set():
            if replica.running:
                got = await asyncio.to_thread(_get, f"{replica.url}/get-tcp-ip?uid=probe")
                answers[replica.name][_status(got)] += 1
            await asyncio.sleep(ASK_EVERY)

    async def next_leader() -> None:
        while not done.is_set():
            name = await stream_leader(stack)
            if name is not None and name != old:
                say(f"stream {STREAM} led by {name} {time.monotonic() - killed_at:.1f} s "
                    "after the kill")
                return
            await asyncio.sleep(WRITE_EVERY)

    probes = [asyncio.create_task(probe(i)) for i in range(len(stack.replicas))]
    leader = asyncio.create_task(next_leader())
    try:
        tries: Counter[str] = Counter()  # the write's answers, as an operator would see them
        while time.monotonic() - killed_at < WATCH_LIMIT:
            try:
                got: tuple[int, Any] | None = await admin(
                    stack, "PUT", f"/admin/nodes/{node_id}",
                    {"weight": weight, "reason": "demo script: a write while the stream "
                     "elects a leader"}, WRITE_TIMEOUT)
            except (OSError, ValueError):
                got = None
            tries[_status(got)] += 1
            if got is not None and got[0] == 200:
                say(f"writes resume: the admin change was stored "
                    f"{time.monotonic() - killed_at:.1f} s after the kill (tries: "
                    f"{_counted(tries)})")
                break
            await asyncio.sleep(WRITE_EVERY)
        else:
            say(f"no write was stored within {WATCH_LIMIT:.0f} s of the kill")
        await asyncio.sleep(1.0)  # answers a little after the writes resumed too
    finally:
        done.set()
        await asyncio.gather(*probes, leader, return_exceptions=True)
    say("get-tcp-ip meanwhile: " + "; ".join(f"{name} {_counted(seen)}"
                                             for name, seen in answers.items()))


def _status(got: tuple[int, Any] | None) -> str:
    """`200`, `503 (why)` or `no answer`: an answer as the probe shows it."""
    if got is None:
        return "no answer"
    status, body = got
    why = body.get("error") if status != 200 and isinstance(body, dict) else None
    return f"{status} ({why})" if why else str(status)


def _counted(seen: Counter[str]) -> str:
    """`12 x 200, 1 x no answer`: answers by status."""
    return ", ".join(f"{count} x {status}" for status, count in sorted(seen.items()))


async def _server_back(stack: ClusterStack, index: int, node_id: str, weight: int,
                       started: float, say: Say) -> None:
    name = stack.nats.server_name(index)
    try:
        await asyncio.to_thread(stack.nats.wait_ready, WATCH_LIMIT, [index])
    except RuntimeError as exc:
        say(f"nats-server {name} did not rejoin: {str(exc).splitlines()[0]}")
        return
    say(f"nats-server {name} is back in the cluster {time.monotonic() - started:.1f} s "
        "after its restart")
    status, _ = await admin(stack, "PUT", f"/admin/nodes/{node_id}",
                            {"weight": weight, "reason": "demo script"})
    if status != 200:
        say(f"the weight of {node_id} could not be set back (HTTP {status})")
