"""The frame splitter in pure Python: the twin of the compiled `_frames` (same results).

nats-py's parser spends about 2.5 us on each message it receives (two regular
expressions, dicts, a coroutine). A bulk read receives tens of thousands of messages in a
row for one subscription, so `natswire` first hands whole `HMSG` frames for such
subscriptions straight to their handlers, here, and gives nats-py's parser whatever this
does not take: the first frame that is anything else, and everything after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_CONTROL_LINE = 4096  # nats-py's limit on a control line, and so ours
_HMSG = b"HMSG "
_OTHER_SPACE = re.compile(rb"[\t\n\x0b\x0c]")  # what nats-py's parser also splits at


def split_frames(data: bytes, handlers: dict[int, Callable],
                 dropped: Callable[[Exception], None]) -> int:
    """Call `handlers[sid](subject, reply, header block, payload)` for each whole `HMSG`
    frame at the front of `data` whose sid has a handler; return the bytes used, up to
    the first thing that is not such a frame (or not whole). A handler that raises loses
    that message only: `dropped(exc)` is told, and the split goes on."""
    used, end = 0, len(data)
    while data.startswith(_HMSG, used):
        line_end = data.find(b"\r", used, used + MAX_CONTROL_LINE)
        if line_end < 0 or data[line_end + 1:line_end + 2] != b"\n":
            break
        line = data[used + 5:line_end]
        args = line.split(b" ")  # subject sid [reply] size total
        if len(args) not in (4, 5) or _OTHER_SPACE.search(line) \
                or not all(map(_number, (args[1], args[-2], args[-1]))):
            break  # what nats-py's parser may read as other fields (or not a frame)
        handler = handlers.get(int(args[1]))
        header_size, total = int(args[-2]), int(args[-1])
        start, stop = line_end + 2, line_end + 2 + total
        if handler is None or not all(args) or header_size > total or stop + 2 > end \
                or data[stop:stop + 2] != b"\r\n":
            break
        try:
            handler(args[0], args[2] if len(args) == 5 else b"",
                    data[start:start + header_size] if header_size else None,
                    data[start + header_size:stop])
        except Exception as exc:
            dropped(exc)
        used = stop + 2
    return used


def _number(token: bytes) -> bool:
    return 0 < len(token) < 10 and token.isdigit()
