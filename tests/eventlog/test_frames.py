"""The frame splitter (`_frames` and its twin `_frames_py`) and the parser hook around it
(`natswire._FramesFirst`): whatever way the bytes arrive, every message reaches the same
place, in the same order, as with nats-py's parser alone."""

import asyncio
import importlib.machinery

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol.parser import Parser

from dispatcher.eventlog import _frames, _frames_py, natswire

DIVERTED = 7


@pytest.fixture(params=["compiled", "python"])
def split(request):
    return (_frames if request.param == "compiled" else _frames_py).split_frames


def hmsg(sid, subject=b"_INBOX.x", reply=b"$JS.ACK.S.c.1.5.5.1.0", header=b"NATS/1.0\r\n\r\n",
         payload=b"{}"):
    line = b"HMSG %s %d %s%d %d\r\n" % (subject, sid, reply + b" " if reply else b"",
                                         len(header), len(header) + len(payload))
    return line + header + payload + b"\r\n"


FRAMES = st.one_of(
    st.builds(hmsg, st.just(DIVERTED), payload=st.binary(max_size=40),
              reply=st.sampled_from([b"", b"r.1", b"$JS.ACK.S.c.1.9.9.1.0"])),
    st.builds(hmsg, st.just(3)),  # a subscription nats-py dispatches itself
    st.just(b"MSG _INBOX.y 7 5\r\nhello\r\n"),
    st.just(b"PING\r\n"), st.just(b"+OK\r\n"),
    st.just(b"HMSG _INBOX.x 7  12 14\r\nNATS/1.0\r\n\r\n{}\r\n"),  # two spaces
    st.just(b"HMSG _INBOX.x\t7 12 14\r\nNATS/1.0\r\n\r\n{}\r\n"),  # a tab
    st.just(b"HMSG _INBOX.x\t 7 12 14\r\nNATS/1.0\r\n\r\n{}\r\n"),  # a tab by a space
    st.just(b"HMSG a.b\n 7 \x0cr.1 12 14\r\nNATS/1.0\r\n\r\n{}\r\n"),
)


def calls(split, data):
    seen = []
    used = split(data, {DIVERTED: lambda *args: seen.append(args)}, seen.append)
    return used, seen


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(FRAMES, max_size=8), cut=st.integers(0, 2000),
       flip=st.tuples(st.integers(0, 2000), st.integers(0, 255)))
def test_compiled_splitter_matches_the_reference(frames, cut, flip):
    data = bytearray(b"".join(frames))
    if data and flip[0] % 2:
        data[flip[0] % len(data)] = flip[1]
    data = bytes(data[:cut % (len(data) + 1)]) if cut % 3 == 0 else bytes(data)
    assert calls(_frames.split_frames, data) == calls(_frames_py.split_frames, data)


def test_whole_frames_of_a_diverted_sid_are_split_off(split):
    data = hmsg(DIVERTED, payload=b"a") + hmsg(DIVERTED, reply=b"", payload=b"b") + hmsg(3)
    used, seen = calls(split, data)
    assert used == len(data) - len(hmsg(3))  # stops at another sid's frame
    assert seen == [(b"_INBOX.x", b"$JS.ACK.S.c.1.5.5.1.0", b"NATS/1.0\r\n\r\n", b"a"),
                    (b"_INBOX.x", b"", b"NATS/1.0\r\n\r\n", b"b")]
    whole = hmsg(DIVERTED)
    assert calls(split, whole[:-1]) == (0, [])  # not whole: left to the parser
    assert calls(split, whole.replace(b"{}\r\n", b"{}xx")) == (0, [])  # no CRLF after it


def test_a_handler_that_raises_loses_its_message_only(split):
    def handler(subject, reply, block, payload):
        if payload == b"bad":
            raise IndexError("no")
        seen.append(payload)

    seen, dropped = [], []
    data = b"".join(hmsg(DIVERTED, payload=p) for p in (b"a", b"bad", b"c"))
    assert split(data, {DIVERTED: handler}, dropped.append) == len(data)
    assert seen == [b"a", b"c"] and [repr(e) for e in dropped] == ["IndexError('no')"]


def test_splitter_is_compiled():
    assert isinstance(_frames.__loader__, importlib.machinery.ExtensionFileLoader)


class _Connection:
    """What nats-py's parser calls on its connection: here, a record of the calls."""

    def __init__(self):
        self.seen = []

    async def _process_msg(self, sid, subject, reply, data, headers):
        self.seen.append(("msg", sid, subject, reply, headers, data))

    async def _process_ping(self):
        self.seen.append(("ping",))

    async def _process_pong(self):
        self.seen.append(("pong",))


def delivered(stream: bytes, chunks: list[int], hooked: bool) -> list:
    """Feed `stream` to nats-py's parser in chunks of these sizes, with the hooks of
    `natswire` or without: every message and ping, in the order they were delivered."""
    nc = _Connection()
    nc._ps = Parser(nc)
    if hooked:
        routes = natswire._routes(nc)
        routes[DIVERTED] = lambda subject, reply, headers, data: nc.seen.append(
            ("msg", DIVERTED, subject, reply, headers, data))

    async def feed():
        at = 0
        for size in [*chunks, len(stream)]:
            await nc._ps.parse(stream[at:at + size])
            at += size
            if at >= len(stream):
                break

    asyncio.run(feed())
    return nc.seen


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.one_of(
    st.builds(hmsg, st.just(DIVERTED), payload=st.binary(max_size=300)),
    st.builds(hmsg, st.just(3)), st.just(b"PING\r\n"), st.just(b"PONG\r\n"),
    st.just(b"HMSG _INBOX.x 7  12 14\r\nNATS/1.0\r\n\r\n{}\r\n"),
), max_size=30), chunks=st.lists(st.integers(1, 700), max_size=40))
def test_messages_arrive_as_without_the_hook_however_the_bytes_are_cut(frames, chunks):
    stream = b"".join(frames)
    assert delivered(stream, chunks, hooked=True) == delivered(stream, chunks, hooked=False)
