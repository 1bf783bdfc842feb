"""The node's own load figures: CPU share of this process and event loop lag.

Sampled by one background task, so answering a status request costs nothing but reading
two numbers.
"""

from __future__ import annotations

import asyncio
import time

from imnode.tasks import cancel_and_wait


class LoadMonitor:
    """CPU share over the last `interval`, and the event loop's worst lag in it.

    The loop is probed every `probe` seconds (how late the wake-up came is what every
    client waited at that moment); the figure is the worst probe of the interval, so a
    stall shows up however briefly it lasted.
    """

    def __init__(self, interval: float = 1.0, probe: float = 0.05) -> None:
        self.interval = interval
        self.probe = probe
        self.cpu = 0.0  # this process's CPU seconds per wall second (1.0 = one core busy)
        self.loop_lag_ms = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        wall, cpu = time.monotonic(), time.process_time()
        worst = 0.0
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.probe)
            now = time.monotonic()
            worst = max(worst, now - before - self.probe)
            if now - wall >= self.interval:
                now_cpu = time.process_time()
                self.cpu = (now_cpu - cpu) / (now - wall)
                self.loop_lag_ms = worst * 1000
                wall, cpu, worst = now, now_cpu, 0.0

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
