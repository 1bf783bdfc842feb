"""The node's own load figures: CPU share of this process and event loop lag.

Sampled by one background task, so answering a status request costs nothing but reading
two numbers.
"""

from __future__ import annotations

import asyncio
import time


class LoadMonitor:
    """Every `interval` seconds: CPU share since the last sample, and how late the loop
    woke up (the event loop's lag, in milliseconds: what every client waits on)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.cpu = 0.0  # this process's CPU seconds per wall second (1.0 = one core busy)
        self.loop_lag_ms = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        wall, cpu = time.monotonic(), time.process_time()
        while True:
            await asyncio.sleep(self.interval)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            elapsed = now_wall - wall
            self.loop_lag_ms = max(0.0, (elapsed - self.interval) * 1000)
            self.cpu = (now_cpu - cpu) / elapsed if elapsed > 0 else 0.0
            wall, cpu = now_wall, now_cpu

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
