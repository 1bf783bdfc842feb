"""Fill IM nodes through get-tcp-ip with real clients, as phones do, and say what happened.

    python -m tests.filler URL SECONDS [CONCURRENCY] [COUNT]

Several keep-alive HTTP connections ask `GET /get-tcp-ip` (reconnecting now and then so the
requests spread over the dispatcher's workers); every answer is followed at once by a real
imnode client connection (hello, welcome) to the node it names, held open until the end. It
stops after SECONDS, or once the dispatcher has refused for a whole second (every node full),
and prints one JSON line: per node the clients it holds and the most assignments it got in
any one-second window, plus the counts of 200s and 503s. Used by the tests and benchmarks of
the shared watermark and assignment cap. Loopback only: the URL must be on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import orjson

from imnode import protocol

RECONNECT_EVERY = 20  # requests per HTTP connection, so the kernel spreads them over workers


async def _ask(host: str, port: int, path: str, answers: list, refusals: list,
               stop: asyncio.Event, count: int, most: int | None) -> None:
    reader = writer = None
    asked = 0
    while not stop.is_set():
        if writer is None or asked % RECONNECT_EVERY == 0:
            if writer is not None:
                writer.close()
            reader, writer = await asyncio.open_connection(host, port)
        asked += 1
        writer.write(f"GET {path}?uid=fill{id(writer)}-{asked}&count={count} HTTP/1.1\r\n"
                     f"Host: {host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = orjson.loads(await reader.readexactly(length))
        if status == 200:
            answers.append((time.monotonic(), body))
            if most is not None and len(answers) >= most:
                stop.set()
        else:
            refusals.append(time.monotonic())
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _hold(body: dict, held: Counter, sockets: list, run: str) -> None:
    reader, writer = await asyncio.open_connection(body["ip"], body["port"])
    writer.write(protocol.encode({"type": "hello", "uid": f"filler-{run}-{len(sockets)}"}))
    sockets.append(writer)
    head = await reader.readexactly(4)
    frame = orjson.loads(await reader.readexactly(int.from_bytes(head, "big")))
    if frame.get("type") == "welcome":
        held[body["node"]] += 1


async def fill(url: str, seconds: float, concurrency: int = 8, count: int = 1,
               keep: list | None = None, most: int | None = None) -> dict:
    """Fill for at most `seconds` (see the module docstring), and with at most about
    `most` clients if given. The clients are closed at the end, unless `keep` is given:
    then their sockets go there, for a later fill."""
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", "load goes to loopback only"
    answers: list = []
    refusals: list = []
    stop = asyncio.Event()
    askers = [asyncio.create_task(_ask(parts.hostname, parts.port, "/get-tcp-ip", answers,
                                       refusals, stop, count, most))
              for _ in range(concurrency)]
    held: Counter = Counter()
    sockets: list = []
    holders = []
    run = os.urandom(4).hex()  # uids of their own: a later fill must not log these out
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < seconds:
        await asyncio.sleep(0.02)
        for _, body in answers[seen:]:
            holders.append(asyncio.create_task(_hold(body, held, sockets, run)))
        seen = len(answers)
        last_answer = answers[-1][0] if answers else started
        if refusals and time.monotonic() - last_answer > 1.0 and refusals[-1] > last_answer:
            break  # refused for a whole second: every node is full
        if stop.is_set():
            break
    stop.set()
    await asyncio.gather(*askers, return_exceptions=True)
    for _, body in answers[seen:]:
        holders.append(asyncio.create_task(_hold(body, held, sockets, run)))
    await asyncio.gather(*holders, return_exceptions=True)
    per_second: dict[str, list[float]] = defaultdict(list)
    for moment, body in answers:
        per_second[body["node"]].append(moment)
    peak = {node: _busiest_second(moments) for node, moments in per_second.items()}
    if keep is None:
        for writer in sockets:
            writer.close()
    else:
        keep.extend(sockets)
    return {"held": dict(held), "peak_per_second": peak, "answered": len(answers),
            "refused": len(refusals), "seconds": round(time.monotonic() - started, 3)}


def _busiest_second(moments: list[float]) -> int:
    """The most moments within any one-second window."""
    most, first = 0, 0
    for last, moment in enumerate(moments):
        while moment - moments[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


if __name__ == "__main__":
    url, seconds, *rest = sys.argv[1:]
    print(orjson.dumps(asyncio.run(fill(url, float(seconds), *map(int, rest)))).decode())
