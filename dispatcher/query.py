"""The parameters of a pick: `GET /get-tcp-ip?uid=&exclude=&count=` and the JSON body of
the `imdispatch.pick` NATS endpoint, checked alike."""

from __future__ import annotations

import re
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

from dispatcher.config import NODE_ID

UID = re.compile(r"[\x21-\x7e]{1,128}\Z")  # printable ASCII without spaces
MAX_EXCLUDE = 64
MAX_COUNT = 5


class QueryError(ValueError):
    """A bad parameter: answered with 400 and this message."""


class PickRequest(NamedTuple):
    """What choosing needs. The `uid` is checked but not kept: the choice does not
    depend on who asks, and most requests then share `DEFAULT` instead of a new object."""

    exclude: tuple[str, ...] = ()
    count: int = 1


DEFAULT = PickRequest()
PARAMETERS = frozenset(("uid", "exclude", "count"))


def from_query_string(query: str) -> PickRequest:
    """From a raw query string (`uid=u1&exclude=n1,n2&count=2`); unknown parameters are
    ignored, so a client may send more than we read.

    Split here rather than by the framework: this is the hot path, and the usual parser
    costs more than the whole pick. Percent-decoding is done only where there is any.
    """
    if not query:
        return DEFAULT
    values: dict[str, str] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if "%" in pair or "+" in pair:
            name, value = unquote_plus(name), unquote_plus(value)
        if name in values and name in PARAMETERS:
            raise QueryError(f"`{name}` must be given once")
        values[name] = value
    exclude = values.get("exclude")
    count = values.get("count")
    if count is not None and not (count.isascii() and count.isdigit() and len(count) <= 2):
        raise QueryError(f"`count` must be an integer from 1 to {MAX_COUNT}")
    return _checked(
        values.get("uid"),
        [part for part in exclude.split(",") if part] if exclude else [],
        1 if count is None else int(count),
    )


def from_json(body: Any) -> PickRequest:
    """From a JSON object {"uid": str, "exclude": [str] or "a,b", "count": int}."""
    if not isinstance(body, dict):
        raise QueryError("the request must be a JSON object")
    exclude = body.get("exclude", [])
    if isinstance(exclude, str):
        exclude = [part for part in exclude.split(",") if part]
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise QueryError("`exclude` must be a list of node ids")
    count = body.get("count", 1)
    if type(count) is not int:
        raise QueryError(f"`count` must be an integer from 1 to {MAX_COUNT}")
    uid = body.get("uid")
    if uid is not None and not isinstance(uid, str):
        raise QueryError("`uid` must be a string")
    return _checked(uid, exclude, count)


def _checked(uid: str | None, exclude: list[str], count: int) -> PickRequest:
    if uid is not None and not UID.match(uid):
        raise QueryError("`uid` must be 1-128 printable characters without spaces")
    if not exclude and count == 1:
        return DEFAULT
    if len(exclude) > MAX_EXCLUDE:
        raise QueryError(f"`exclude` lists more than {MAX_EXCLUDE} nodes")
    for node_id in exclude:
        if not NODE_ID.match(node_id):
            raise QueryError(f"`exclude` must be node ids, got {node_id[:70]!r}")
    if not 1 <= count <= MAX_COUNT:
        raise QueryError(f"`count` must be an integer from 1 to {MAX_COUNT}, got {count}")
    return PickRequest(tuple(exclude), count)
