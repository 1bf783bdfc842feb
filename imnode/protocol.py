"""The imnode wire protocol: length-prefixed JSON frames.

Each frame is a 4-byte big-endian length, then that many bytes of a UTF-8 JSON object
with a `type` field. Frames over 64 KiB are refused.

Client -> server: `hello {uid}` (first frame, answered by `welcome {node_id}`), `ping`
(answered by `pong`), `msg {to, body, id}` (answered by `ack {id}`, or `error {code,
message, id}` when the recipient cannot be reached). Server -> client: `msg {from, body,
id}`, `goaway {reconnect_after_ms}` when the node drains (or the uid logged in again
elsewhere), `error {code, message}` before closing on bad input.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

MAX_FRAME = 64 * 1024
LENGTH_BYTES = 4

UID = re.compile(r"[A-Za-z0-9_@:+=-]{1,128}\Z")
"""User ids become NATS subject tokens for cross-node delivery: no dots, spaces or wildcards."""

MSG_ID_MAX = 128


class ProtocolError(Exception):
    """Bad input from a peer: answered with `error {code, message}`, then the connection
    is closed (unless `fatal` is false, for errors about one request only)."""

    def __init__(self, code: str, message: str, *, fatal: bool = True) -> None:
        super().__init__(message)
        self.code, self.message, self.fatal = code, message, fatal


def encode(frame: dict[str, Any]) -> bytes:
    try:
        payload = orjson.dumps(frame)
    except orjson.JSONEncodeError as exc:  # e.g. nested deeper than orjson writes
        raise ProtocolError("bad_body", f"cannot be forwarded: {exc}") from None
    if len(payload) > MAX_FRAME:
        raise ProtocolError("frame_too_large", f"frame of {len(payload)} bytes is over {MAX_FRAME}")
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


class FrameReader:
    """Splits a byte stream into decoded frames; keeps an incomplete frame for later."""

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return the complete frames. Raises `ProtocolError`."""
        buffer = self._buffer
        buffer += data
        frames = []
        start = 0
        while len(buffer) - start >= LENGTH_BYTES:
            length = int.from_bytes(buffer[start:start + LENGTH_BYTES], "big")
            if length > self.max_frame:
                raise ProtocolError(
                    "frame_too_large",
                    f"frame of {length} bytes is over the {self.max_frame} limit",
                )
            stop = start + LENGTH_BYTES + length
            if len(buffer) < stop:
                break
            frames.append(decode(bytes(buffer[start + LENGTH_BYTES:stop])))
            start = stop
        if start:
            del buffer[:start]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete."""
        return len(self._buffer)


def decode(payload: bytes) -> dict[str, Any]:
    try:
        frame = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolError("bad_frame", "a frame must be a JSON object with a string `type`")
    return frame


def require_uid(value: Any) -> str:
    if not isinstance(value, str) or not UID.match(value):
        raise ProtocolError(
            "bad_uid", "uid must be 1-128 characters from letters, digits and _@:+=-"
        )
    return value


def require_msg_id(frame: dict[str, Any]) -> str | int:
    msg_id = frame.get("id")
    if isinstance(msg_id, bool) or not isinstance(msg_id, (str, int)) or (
        isinstance(msg_id, str) and len(msg_id) > MSG_ID_MAX
    ):
        raise ProtocolError("bad_msg", f"msg needs an `id` (string up to {MSG_ID_MAX} "
                            "characters, or integer)")
    return msg_id
