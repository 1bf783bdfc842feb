"""The get-tcp-ip fast path's byte work in pure Python: the twin of the compiled
`_fastpath` (same results; a differential test checks it).

`scan` says whether the bytes at the front of a connection's buffer are a complete request
that the fast path may answer itself, exactly as Sanic would read it (its HTTP/1 parser in
`sanic.http.http1`): `GET /get-tcp-ip` with at most a query, HTTP/1.0 or 1.1, headers of
plain ASCII, none that brings a body, an expectation or an upgrade, within the header size
limit. Anything else, or anything it is unsure of, is NOT_FAST: Sanic gets the bytes.
`plain_query` spots the queries that mean the default pick without parsing them, and
`frame` writes an answer as Sanic frames it.
"""

from __future__ import annotations

NOT_FAST = -1  # Sanic's to read: not a fast request, or not all of its head here

REQUEST_LINE = b"GET /get-tcp-ip"
VERSIONS = {b"HTTP/1.1\r\n": True, b"HTTP/1.0\r\n": False}  # -> keep-alive by default
REFUSED_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"upgrade", b"expect"))
LINE_BYTES = frozenset(range(0x20, 0x7F)) | {0x09}  # what a header line may hold
QUERY_BYTES = frozenset(range(0x21, 0x7F)) - {ord("#")}  # a fragment is Sanic's
MAX_UID = 128


def scan(buf: bytearray, start: int, max_head: int) -> tuple[int, bool, int, int] | int:
    """(end, keep_alive, query_start, query_end) for a complete fast request at `start`
    (the request is `buf[start:end]`, its query `buf[query_start:query_end]`), else
    NOT_FAST. `max_head`: Sanic's REQUEST_MAX_HEADER_SIZE (a head at or past it is
    Sanic's 413)."""
    data = bytes(buf[start:])
    if not data.startswith(REQUEST_LINE):
        return NOT_FAST
    i = query_start = query_end = len(REQUEST_LINE)
    if data[i:i + 1] == b"?":
        query_start = i = i + 1
        while i < len(data) and data[i] in QUERY_BYTES:
            i += 1
        query_end = i
    if data[i:i + 1] != b" " or data[i + 1:i + 11] not in VERSIONS:
        return NOT_FAST
    keep_alive = VERSIONS[data[i + 1:i + 11]]
    i += 11
    while True:
        if data[i:i + 2] == b"\r\n":
            if i - 2 >= max_head:
                return NOT_FAST
            return start + i + 2, keep_alive, start + query_start, start + query_end
        line_end = data.find(b"\r\n", i)
        line = data[i:line_end]
        if line_end < 0 or not LINE_BYTES.issuperset(line):
            return NOT_FAST
        name, colon, value = line.partition(b":")
        if not colon:
            return NOT_FAST
        name = name.lower()
        if name in REFUSED_HEADERS:
            return NOT_FAST
        if name == b"connection":  # the last one decides, as in Sanic
            keep_alive = value.lstrip(b" \t").lower() == b"keep-alive"
        i = line_end + 2


def plain_query(buf: bytearray, start: int, end: int) -> bool:
    """Whether the query `buf[start:end]` (bytes `scan` let through) means the default
    pick for sure: no escapes, a `uid` once at most and of the allowed length, no
    `exclude` or `count`, other parameters ignored. False: let the query parser decide."""
    query = bytes(buf[start:end])
    if b"%" in query or b"+" in query:
        return False
    uid = False
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"uid":
            if uid or not 1 <= len(value) <= MAX_UID:
                return False
            uid = True
        elif name in (b"exclude", b"count"):
            return False
    return True


def frame(status_line: bytes, retry_after: int, body: bytes, keep_alive: bool) -> bytes:
    """A JSON answer as Sanic writes it: its header order and spelling, `Retry-After`
    first when there is one (0: none)."""
    retry = b"Retry-After: %d\r\n" % retry_after if retry_after else b""
    return b"%b%bcontent-length: %d\r\nconnection: %b\r\ncontent-type: application/json" \
        b"\r\n\r\n%b" % (status_line, retry, len(body),
                         b"keep-alive" if keep_alive else b"close", body)
