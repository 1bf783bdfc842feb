"""Frame encoding and splitting (pure)."""

import pytest

from imnode import protocol
from imnode.protocol import FrameReader, ProtocolError


def test_frames_split_across_and_within_reads():
    data = b"".join(protocol.encode({"type": "ping", "n": i}) for i in range(5))
    reader = FrameReader()
    got = []
    for i in range(0, len(data), 7):  # 7-byte pieces cut frames and length prefixes
        got += reader.feed(data[i:i + 7])
    assert [frame["n"] for frame in got] == [0, 1, 2, 3, 4]
    assert reader.pending == 0


def test_incomplete_frame_waits():
    frame = protocol.encode({"type": "hello", "uid": "u1"})
    reader = FrameReader()
    assert reader.feed(frame[:-1]) == []
    assert reader.pending == len(frame) - 1
    assert reader.feed(frame[-1:]) == [{"type": "hello", "uid": "u1"}]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ((protocol.MAX_FRAME + 1).to_bytes(4, "big"), "frame_too_large"),
        (b"\x00\x00\x00\x03{x}", "bad_json"),
        (b"\x00\x00\x00\x02[]", "bad_frame"),
        (b"\x00\x00\x00\x0b{\"type\": 5}", "bad_frame"),
    ],
)
def test_bad_frames(data, code):
    with pytest.raises(ProtocolError) as info:
        FrameReader().feed(data)
    assert info.value.code == code


def test_largest_frame_passes_and_larger_is_refused_on_encode():
    body = "x" * (protocol.MAX_FRAME - 40)
    frame = {"type": "msg", "body": body}
    assert FrameReader().feed(protocol.encode(frame)) == [frame]
    with pytest.raises(ProtocolError, match=r"over"):
        protocol.encode({"type": "msg", "body": "x" * protocol.MAX_FRAME})


@pytest.mark.parametrize("uid", ["", "a.b", "a b", "x" * 129, 5, None, "a*", "a>"])
def test_bad_uids(uid):
    with pytest.raises(ProtocolError) as info:
        protocol.require_uid(uid)
    assert info.value.code == "bad_uid"


@pytest.mark.parametrize("uid", ["u1", "alice@example", "+8613800000000", "a_b-c:d=e"])
def test_good_uids(uid):
    assert protocol.require_uid(uid) == uid
