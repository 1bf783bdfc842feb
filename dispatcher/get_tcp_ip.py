"""What `GET /get-tcp-ip` answers: one road for Sanic's route and the fast path.

Both hand it the raw query string and the client's address and frame what it returns
their own way, so the two cannot drift apart in the rate limit, the query rules, the
choice, the refusal or the figures they count.
"""

from __future__ import annotations

import logging
from math import ceil
from time import monotonic, perf_counter

import orjson

from dispatcher import pacing
from dispatcher.query import DEFAULT, QueryError, from_query_string
from dispatcher.serving import Serving
from dispatcher.stats import WorkerStats

log = logging.getLogger("imdispatch.http")
ROUTE = "/get-tcp-ip"
INTERNAL_ERROR = orjson.dumps({"error": "internal error"})

Answer = tuple[int, bytes, int]
"""(status, JSON body, Retry-After seconds or 0 for none)."""


class GetTcpIp:
    """The answers of one worker: `holder[0]` is its runtime (a follower becomes the
    leader in place), `stats` its figures, `rate_limit` get-tcp-ip requests a second per
    client address (0: off, per worker)."""

    def __init__(self, holder: list[Serving], stats: WorkerStats, rate_limit: float) -> None:
        self.holder = holder
        self.stats = stats
        self.per_address = pacing.AddressLimit(rate_limit) if rate_limit > 0 else None

    def answer(self, query: str, address: str) -> Answer:
        """The answer to one request with this raw query string ("" for none), from
        `address` (read only with the rate limit on); counted in the worker's figures."""
        started = perf_counter()
        stats = self.stats
        if self.per_address is not None:
            wait = self.per_address.allow(address, monotonic())
            if wait:
                stats.request(ROUTE, 429)
                seconds = max(1, ceil(wait))
                return 429, orjson.dumps({"error": "too many requests from this address",
                                          "retry_after": seconds}), seconds
        try:
            pick = from_query_string(query) if query else DEFAULT
        except QueryError as exc:
            stats.request(ROUTE, 400)
            return 400, orjson.dumps({"error": str(exc)}), 0
        runtime = self.holder[0]
        chosen = runtime.choose(pick)
        if not chosen:
            refusal = runtime.refusal(pick)
            stats.picked(None, perf_counter() - started, refusal.reason)
            return 503, refusal.body(), refusal.retry_after
        body = runtime.answer(chosen, pick.count > 1)
        stats.picked(chosen[0].id, perf_counter() - started)
        return 200, body, 0

    def failed(self) -> Answer:
        """The answer when `answer` raised (a bug): logged with its traceback and counted,
        as Sanic's error handler does for the route."""
        log.exception("unexpected error in GET %s", ROUTE)
        self.stats.request(ROUTE, 500)
        return 500, INTERNAL_ERROR, 0
