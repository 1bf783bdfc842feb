"""Binding the JetStream buckets beside a cluster's stream (the lease's KV bucket, the
snapshots' object store): the first member makes them, the others bind them, and two
members making one at the same moment both end up bound to it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import APIError, BucketNotFoundError

STREAM_NAME_IN_USE = 10058


async def bind(get: Callable[[], Awaitable[Any]],
               make: Callable[[], Awaitable[Any]]) -> Any:
    """`get()` the bucket, else `make()` it, else (another member made it meanwhile)
    `get()` it again."""
    try:
        return await get()
    except BucketNotFoundError:
        pass
    try:
        return await make()
    except APIError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    return await get()
