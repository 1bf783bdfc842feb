"""The demo's clients: reference imnode clients that ask get-tcp-ip, connect, heartbeat
and chat, their number growing to the target over the ramp. They keep the figures the
live view shows: where the dispatcher sent them lately, refusals, messages. Given several
dispatcher replicas, each question goes to the next one in turn, as behind DNS or an L4
balancer; a replica that does not answer costs the client one retry."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter, deque
from collections.abc import Sequence

from imnode.client import CONNECT_ERRORS, Address, ClientError, ImClient, dispatcher_locator
from imnode.tasks import cancel_and_wait

CHAT_INTERVAL = 0.2  # one message from a random client to another this often


class Population:
    def __init__(self, url: str | Sequence[str], target: int, ramp: float,
                 node_of: dict[Address, str]) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        self.target, self.ramp = target, ramp
        self._turn = itertools.count()
        self.node_of = node_of  # (ip, port) -> node id, to name where a client was sent
        self.clients: list[ImClient] = []
        self.assignments: deque[tuple[float, str]] = deque()
        self.answers: deque[tuple[float, str]] = deque()  # (when, which dispatcher URL)
        self.refusals: deque[float] = deque()
        self.sent = self.delivered = self.failed = 0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._grow()), loop.create_task(self._chat())]

    @property
    def connected(self) -> int:
        return sum(client.connected.is_set() for client in self.clients)

    def shares(self, window: float = 10.0) -> Counter[str]:
        """Where the dispatcher sent clients in the last `window` seconds."""
        self._forget(window)
        return Counter(node for _, node in self.assignments)

    def answered(self, window: float = 10.0) -> Counter[str]:
        """get-tcp-ip answers (any status) each dispatcher URL gave in `window` seconds."""
        self._forget(window)
        return Counter(url for _, url in self.answers)

    def refused(self, window: float = 10.0) -> int:
        self._forget(window)
        return len(self.refusals)

    def _forget(self, window: float) -> None:
        horizon = time.monotonic() - window
        while self.assignments and self.assignments[0][0] < horizon:
            self.assignments.popleft()
        while self.refusals and self.refusals[0] < horizon:
            self.refusals.popleft()
        while self.answers and self.answers[0][0] < horizon:
            self.answers.popleft()

    def _locator(self, uid: str):
        asks = {url: dispatcher_locator(url, uid) for url in self.urls}

        async def locate(exclude: Sequence[str]) -> Address:
            url = self.urls[next(self._turn) % len(self.urls)]
            try:
                address = await asks[url](exclude)
            except ClientError as exc:
                self.answers.append((time.monotonic(), url))
                if exc.code == "http_503":
                    self.refusals.append(time.monotonic())
                raise
            self.answers.append((time.monotonic(), url))
            self.assignments.append((time.monotonic(), self.node_of.get(address, "?")))
            return address

        return locate

    async def _grow(self) -> None:
        start = time.monotonic()
        while len(self.clients) < self.target:
            due = int(self.target * min(1.0, (time.monotonic() - start) / self.ramp)) or 1
            while len(self.clients) < min(due, self.target):
                uid = f"user{len(self.clients) + 1}"
                client = ImClient(uid, locate=self._locator(uid), reconnect_attempts=1000)
                self.clients.append(client)
                self._tasks.append(asyncio.get_running_loop().create_task(
                    self._first_connect(client)))
            await asyncio.sleep(0.1)

    @staticmethod
    async def _first_connect(client: ImClient) -> None:
        """Connect, as a phone would: on a refusal wait what the dispatcher said."""
        while True:
            try:
                await client.connect()
                return
            except CONNECT_ERRORS as exc:
                wait = max(getattr(exc, "retry_after", 0.0), 0.5)
                await asyncio.sleep(wait * random.uniform(1, 1.5))

    async def _chat(self) -> None:
        while True:
            await asyncio.sleep(CHAT_INTERVAL)
            online = [c for c in self.clients if c.connected.is_set()]
            for client in online:
                while not client.messages.empty():
                    client.messages.get_nowait()
                    self.delivered += 1
            if len(online) < 2:
                continue
            sender, receiver = random.sample(online, 2)
            self.sent += 1
            try:
                await sender.send(receiver.uid, {"text": f"hi from {sender.uid}"}, timeout=2)
            except (ClientError, ConnectionError, TimeoutError):
                self.failed += 1

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        with contextlib.suppress(Exception):
            await asyncio.gather(*(client.close() for client in self.clients),
                                 return_exceptions=True)
