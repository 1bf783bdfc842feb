"""Stopping background tasks, the one way both programs do it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

AGAIN = 0.5  # seconds between cancellations of a task that has not ended yet


async def cancel_and_wait(*tasks: asyncio.Task | None) -> None:
    """Cancel the tasks given (None ones are skipped) and wait until they have ended,
    whatever they ended with: a stop must not fail on what a background task raised.

    A task can swallow a cancellation without meaning to: in Python 3.11,
    `asyncio.wait_for` returns the result instead of raising when its future completes
    as the cancellation arrives. Such a task is cancelled again until it ends; waiting
    on it once left a worker's stop (and the worker, holding the port and the event
    log's lock) hanging forever."""
    running = {task for task in tasks if task is not None}
    while running:
        for task in running:
            task.cancel()
        ended, running = await asyncio.wait(running, timeout=AGAIN)
        for task in ended:  # retrieved, so that asyncio does not log them as never seen
            if not task.cancelled():
                task.exception()


async def within(coroutine: Coroutine[Any, Any, Any], seconds: float) -> bool:
    """Run `coroutine` for `seconds` at most (then cancel it until it ends); False if it
    did not end in time. What it raises is ignored: a stop goes on."""
    task = asyncio.get_running_loop().create_task(coroutine)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    await cancel_and_wait(task)  # a no-op when done; retrieves what it raised
    return bool(done)
