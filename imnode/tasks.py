"""Stopping background tasks, the one way both programs do it."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(*tasks: asyncio.Task | None) -> None:
    """Cancel the tasks given (None ones are skipped) and wait until they have ended,
    whatever they ended with: a stop must not fail on what a background task raised."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
