"""`imdispatch demo`: a whole cluster on this machine, a growing client population, a
live view, and scripted moments (a node killed and restarted, a drain, a weight change)
so a viewer sees failover, slow start and the event log at work. With `--replicas N`,
N dispatcher replicas on a NATS cluster, and moments that kill the leader replica and
the stream's leading nats-server (`failover`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import termios
import time
import tty
from collections import Counter
from http.client import HTTPException
from pathlib import Path
from typing import Any

from dispatcher.demo import failover, screen
from dispatcher.demo.moments import Moment, admin, script
from dispatcher.demo.nats_server import NatsServerMissing
from dispatcher.demo.population import Population
from dispatcher.demo.replicas import LEASE, NATS_SERVERS, STREAM, ClusterStack
from dispatcher.demo.stack import DemoError, Interrupted, Stack, plan_nodes

STATUS_EVERY = 5.0  # seconds between two plain status prints (not on a terminal)
MAX_REPLICAS = 5


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.clients < 0:
        print("imdispatch demo: --nodes must be at least 1 and --clients not negative",
              file=sys.stderr)
        return 2
    if not 0 < args.http_port < 65536:  # 0 too: the demo must know where it listens
        print(f"imdispatch demo: --http-port must be 1 to 65535, not {args.http_port}",
              file=sys.stderr)
        return 2
    problem = _replicas_problem(args)
    if problem:
        print(f"imdispatch demo: {problem}", file=sys.stderr)
        return 2
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imdispatch-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_demo(args, workdir))
    except BrokenPipeError:  # `imdispatch demo | head`: stopped cleanly all the same
        return 0
    finally:
        if keep:
            _say(f"logs, config and the event log are in {workdir}")
        else:  # said, since the hints pointed there (`audit --log`)
            shutil.rmtree(workdir, ignore_errors=True)
            _say(f"removed {workdir} (logs, config, event log): --workdir PATH keeps them")


def _replicas_problem(args: argparse.Namespace) -> str | None:
    if not 1 <= args.replicas <= MAX_REPLICAS:
        return f"--replicas must be 1 to {MAX_REPLICAS}, not {args.replicas}"
    if args.replicas > 1 and args.http_port + args.replicas - 1 > 65535:
        return (f"--replicas {args.replicas} listen on --http-port and the next ports: "
                f"{args.http_port} is too high")
    if args.replicas > 1 and args.nats_port is not None:
        return "--nats-port is the single nats-server's: with --replicas the cluster's " \
               "servers take free ports"
    return None


class Keys:
    """Single keys from a terminal (n: next moment now, q: quit), if stdin is one."""

    def __init__(self, stop: asyncio.Event, now: asyncio.Event) -> None:
        self.stop, self.now = stop, now
        self.saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        if sys.stdin.isatty():
            self.saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin)
            asyncio.get_running_loop().add_reader(sys.stdin, self._read)
        return self

    def _read(self) -> None:
        key = os.read(sys.stdin.fileno(), 1).decode(errors="replace")  # unbuffered
        if not key:  # end of input: stop listening
            asyncio.get_running_loop().remove_reader(sys.stdin)
            return
        if key == "q":
            self.stop.set()
        elif key == "n":
            self.now.set()

    def __exit__(self, *exc_info: object) -> None:
        if self.saved is not None:
            asyncio.get_running_loop().remove_reader(sys.stdin)
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self.saved)


async def _demo(args: argparse.Namespace, workdir: Path) -> int:
    loop = asyncio.get_running_loop()
    stop, moment_now = asyncio.Event(), asyncio.Event()
    nodes = plan_nodes(args.nodes, args.clients, args.node_base_port)
    stack = (ClusterStack(workdir, nodes, args.http_port, args.token, args.replicas)
             if args.replicas > 1 else
             Stack(workdir, nodes, args.http_port, args.nats_port, args.token))

    def interrupt() -> None:
        stop.set()
        stack.stopping.set()  # start-up, in its thread, gives up at its next check

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    population: Population | None = None
    try:
        print(f"starting a {NATS_SERVERS}-server NATS cluster, {len(nodes)} imnodes and "
              f"{args.replicas} dispatcher replicas (logs in {workdir}) ..."
              if isinstance(stack, ClusterStack) else
              f"starting nats-server, {len(nodes)} imnodes and the dispatcher "
              f"(logs in {workdir}) ...", flush=True)
        try:
            await stack.start()
        except Interrupted:
            return 0
        except (DemoError, NatsServerMissing) as exc:  # said first, before the clean-up
            print(f"imdispatch demo: {exc}", file=sys.stderr, flush=True)
            return 2
        cluster = isinstance(stack, ClusterStack)
        tips = screen.hints(stack.url, stack.nats.urls[0] if cluster else stack.nats.url,
                            args.token, str(stack.events_path), nodes[0].id,
                            imdispatch=_imdispatch_command(),
                            nats_installed=shutil.which("nats") is not None,
                            stream=STREAM if cluster else None)
        print(_where(stack, args.token) + "\nnodes: " + ", ".join(
                  f"{n.id} 127.0.0.1:{n.port} weight {n.weight} capacity {n.capacity}"
                  for n in nodes) + "\ntry:\n" + "\n".join(tips), flush=True)
        population = Population(stack.urls if cluster else stack.url, args.clients,
                                args.ramp, {("127.0.0.1", n.port): n.id for n in nodes})
        population.start()
        with Keys(stop, moment_now):
            await _watch(args, stack, population, stop, moment_now, tips)
    finally:  # whatever happened, and even if nobody reads our output any more
        _say("stopping: clients, replicas, imnodes, NATS cluster ..."
             if isinstance(stack, ClusterStack) else
             "stopping: clients, dispatcher, imnodes, nats-server ...")
        if population is not None:
            await population.close()
        await asyncio.to_thread(stack.stop)
        _say("stopped: nothing of the demo is left running")
    return 0


def _where(stack: Stack, token: str) -> str:
    """Where the dispatcher (or each replica) and NATS listen."""
    if not isinstance(stack, ClusterStack):
        return (f"dispatcher: {stack.url}  (admin token: {token})\n"
                f"nats-server: {stack.nats.url}")
    return ("replicas: " + ", ".join(f"{r.name} {r.url}" for r in stack.replicas)
            + f"  (admin token: {token}; each answers get-tcp-ip and the admin API)\n"
            f"nats cluster: {', '.join(stack.nats.urls)}  (stream {STREAM}, "
            f"{NATS_SERVERS} replicas; lease {LEASE:g} s)")


def _imdispatch_command() -> str:
    """`imdispatch` as a shell here can run it: the script beside this Python (what
    `make demo` runs is not on PATH), relative to the working directory when under it."""
    script = Path(sys.executable).parent / "imdispatch"
    if not script.is_file():
        return f"{sys.executable} -m dispatcher"
    with contextlib.suppress(ValueError):
        relative = script.relative_to(Path.cwd())
        return str(relative) if relative.parent != Path(".") else f"./{relative}"  # not PATH
    return str(script)


def _say(text: str) -> None:
    """Print, unless stdout is gone (a closed pipe must not stop the clean-up)."""
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


async def _watch(args: argparse.Namespace, stack: Stack, population: Population,
                 stop: asyncio.Event, moment_now: asyncio.Event, tips: list[str]) -> None:
    """Redraw every second; play the next moment when its time comes (and what the last
    one started has been watched to its end)."""
    terminal = sys.stdout.isatty()
    cluster = stack if isinstance(stack, ClusterStack) else None
    notes: list[str] = []

    def say(text: str) -> None:  # what the script saw: on the screen, or printed at once
        notes.append(f"{time.strftime('%H:%M:%S')} {text}")
        if not terminal:
            print(f"-- {text}", flush=True)

    moments: list[Moment] = [] if args.moment_every <= 0 else (
        failover.script(cluster, say) if cluster else script(stack))
    started = time.monotonic()
    next_moment, played, last_seq, last_status = started + args.moment_every, 0, 0, 0.0
    events: list[dict[str, Any]] = []
    follow: asyncio.Task | None = None
    try:
        while not stop.is_set():
            now = time.monotonic()
            if args.duration and now - started >= args.duration:
                break
            if follow is not None and follow.done():
                if not follow.cancelled() and follow.exception() is not None:
                    say(f"the script's watch failed: {follow.exception()!r}")
                follow, next_moment = None, now + args.moment_every
            if moments and follow is None and (now >= next_moment or moment_now.is_set()):
                moment_now.clear()
                moment = moments[played % len(moments)]
                print(f"== moment {played + 1}: {moment.what}", flush=True)
                follow = await moment.act(stack)
                played, next_moment = played + 1, time.monotonic() + args.moment_every
            try:
                nodes_status, nodes = await admin(stack, "GET", "/admin/nodes")
                events_status, fresh = await admin(
                    stack, "GET", f"/admin/events?after={last_seq}&limit=1000")
                if nodes_status != 200 or events_status != 200:
                    raise ValueError(f"admin API answered {nodes_status}/{events_status}")
            except (OSError, ValueError, HTTPException) as exc:
                print(f"the dispatcher does not answer as it should: {exc}", flush=True)
                nodes, fresh = [], []
            if fresh:
                last_seq = fresh[-1]["seq"]
            fresh = screen.visible(fresh)
            events = (events + fresh)[-50:]
            head = screen.summary(now - started, population.connected, population.target,
                                  population.refused(), population.sent,
                                  population.delivered, population.failed)
            table = screen.node_table(nodes, population.shares())
            replicas: list[str] = []
            if cluster is not None:
                answered = population.answered()
                replicas = screen.replica_table(
                    [(r.name, r.port, ready) for r, ready in
                     zip(cluster.replicas, await failover.readiness(cluster), strict=True)],
                    Counter({r.name: answered[r.url] for r in cluster.replicas}))
            if follow is not None:
                upcoming = f"watching what follows: {moments[(played - 1) % len(moments)].what}"
            else:
                upcoming = (f"next moment in {max(0, next_moment - now):.0f} s: "
                            f"{moments[played % len(moments)].what}" if moments else "")
            if terminal:
                sys.stdout.write(screen.screen(head, table, events, upcoming, tips, replicas,
                                               notes))
                sys.stdout.flush()
            else:
                for event in fresh:
                    print(f"event {screen.event_line(event)}")
                if now - last_status >= STATUS_EVERY:
                    print("\n".join([head, *table, *replicas]), flush=True)
                    last_status = now
                sys.stdout.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        if follow is not None:
            follow.cancel()
            with contextlib.suppress(BaseException):
                await follow
