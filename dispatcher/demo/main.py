"""`imdispatch demo`: a whole cluster on this machine, a growing client population, a
live view, and scripted moments (a node killed and restarted, a drain, a weight change)
so a viewer sees failover, slow start and the event log at work."""

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
from http.client import HTTPException
from pathlib import Path
from typing import Any

from dispatcher.demo import screen
from dispatcher.demo.moments import Moment, admin, script
from dispatcher.demo.nats_server import NatsServerMissing
from dispatcher.demo.population import Population
from dispatcher.demo.stack import DemoError, Interrupted, Stack, plan_nodes

STATUS_EVERY = 5.0  # seconds between two plain status prints (not on a terminal)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.clients < 0:
        print("imdispatch demo: --nodes must be at least 1 and --clients not negative",
              file=sys.stderr)
        return 2
    if not 0 < args.http_port < 65536:  # 0 too: the demo must know where it listens
        print(f"imdispatch demo: --http-port must be 1 to 65535, not {args.http_port}",
              file=sys.stderr)
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
    stack = Stack(workdir, nodes, args.http_port, args.nats_port, args.token)

    def interrupt() -> None:
        stop.set()
        stack.stopping.set()  # start-up, in its thread, gives up at its next check

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    population: Population | None = None
    try:
        print(f"starting nats-server, {len(nodes)} imnodes and the dispatcher "
              f"(logs in {workdir}) ...", flush=True)
        try:
            await stack.start()
        except Interrupted:
            return 0
        except (DemoError, NatsServerMissing) as exc:  # said first, before the clean-up
            print(f"imdispatch demo: {exc}", file=sys.stderr, flush=True)
            return 2
        tips = screen.hints(stack.url, stack.nats.url, args.token, str(stack.events_path),
                            nodes[0].id, imdispatch=_imdispatch_command(),
                            nats_installed=shutil.which("nats") is not None)
        print(f"dispatcher: {stack.url}  (admin token: {args.token})\n"
              f"nats-server: {stack.nats.url}\nnodes: " + ", ".join(
                  f"{n.id} 127.0.0.1:{n.port} weight {n.weight} capacity {n.capacity}"
                  for n in nodes) + "\ntry:\n" + "\n".join(tips), flush=True)
        population = Population(stack.url, args.clients, args.ramp,
                                {("127.0.0.1", n.port): n.id for n in nodes})
        population.start()
        with Keys(stop, moment_now):
            await _watch(args, stack, population, stop, moment_now, tips)
    finally:  # whatever happened, and even if nobody reads our output any more
        _say("stopping: clients, dispatcher, imnodes, nats-server ...")
        if population is not None:
            await population.close()
        await asyncio.to_thread(stack.stop)
        _say("stopped: nothing of the demo is left running")
    return 0


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
    """Redraw every second; play the next moment when its time comes."""
    terminal = sys.stdout.isatty()
    moments: list[Moment] = script(stack) if args.moment_every > 0 else []
    started = time.monotonic()
    next_moment, played, last_seq, last_status = started + args.moment_every, 0, 0, 0.0
    events: list[dict[str, Any]] = []
    while not stop.is_set():
        now = time.monotonic()
        if args.duration and now - started >= args.duration:
            break
        if moments and (now >= next_moment or moment_now.is_set()):
            moment_now.clear()
            moment = moments[played % len(moments)]
            print(f"== moment {played + 1}: {moment.what}", flush=True)
            await moment.act(stack)
            played, next_moment = played + 1, time.monotonic() + args.moment_every
        try:
            nodes_status, nodes = await admin(stack, "GET", "/admin/nodes")
            events_status, fresh = await admin(stack, "GET",
                                               f"/admin/events?after={last_seq}&limit=1000")
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
                              population.refused(), population.sent, population.delivered,
                              population.failed)
        table = screen.node_table(nodes, population.shares())
        upcoming = (f"next moment in {max(0, next_moment - now):.0f} s: "
                    f"{moments[played % len(moments)].what}" if moments else "")
        if terminal:
            sys.stdout.write(screen.screen(head, table, events, upcoming, tips))
            sys.stdout.flush()
        else:
            for event in fresh:
                print(f"event {screen.event_line(event)}")
            if now - last_status >= STATUS_EVERY:
                print("\n".join([head, *table]), flush=True)
                last_status = now
            sys.stdout.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
