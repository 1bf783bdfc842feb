"""The demo's scripted moments: a node killed and brought back, a node drained, a weight
changed. Each is what an operator (or a crash) would do, through the same interfaces:
a signal to the process, or the admin API with the demo's token."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dispatcher.demo.stack import Stack


async def admin(stack: Stack, method: str, path: str, body: Any = None,
                timeout: float = 5.0) -> tuple[int, Any]:
    """One admin API call (in a thread: urllib blocks)."""

    def call() -> tuple[int, Any]:
        request = urllib.request.Request(
            stack.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {stack.token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    return await asyncio.to_thread(call)


@dataclass(frozen=True)
class Moment:
    """What the script does next; `act` may return a task that watches what follows (the
    next moment waits for it)."""

    what: str
    act: Callable[[Stack], Awaitable[asyncio.Task | None]]


def script(stack: Stack) -> list[Moment]:
    """The moments in order; the demo plays them in a loop."""
    ids = list(stack.nodes)
    victim = ids[1] if len(ids) > 1 else ids[0]
    drained, heavy = ids[-1], ids[0]
    weight = stack.nodes[heavy].weight

    async def kill(stack: Stack) -> None:
        stack.kill_node(victim)

    async def restart(stack: Stack) -> None:  # in the loop's (main) thread: see Stack.start
        stack.start_node(victim)

    def update(node_id: str, **change: Any) -> Callable[[Stack], Awaitable[None]]:
        async def act(stack: Stack) -> None:
            await admin(stack, "PUT", f"/admin/nodes/{node_id}",
                        {**change, "reason": "demo script"})
        return act

    return [
        Moment(f"kill {victim} (SIGKILL): it goes down, its clients move to the others", kill),
        Moment(f"restart {victim}: it comes back through slow start", restart),
        Moment(f"drain {drained} (admin API): it gets no new clients",
               update(drained, draining=True)),
        Moment(f"undrain {drained} (admin API)", update(drained, draining=False)),
        Moment(f"weight of {heavy} {weight} -> {weight * 2} (admin API)",
               update(heavy, weight=weight * 2)),
        Moment(f"weight of {heavy} back to {weight} (admin API)", update(heavy, weight=weight)),
    ]
