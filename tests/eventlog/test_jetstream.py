"""The JetStream event log against a real nats-server (one per module; a stream per test)."""

import asyncio
import itertools

import nats.errors
import orjson
import pytest
from nats.js import api

from dispatcher.domain import decisions
from dispatcher.eventlog import natswire, records
from dispatcher.eventlog.errors import (
    LogClosed,
    LogCorrupted,
    StaleWriter,
    StreamConfigError,
    UnsupportedFormat,
)
from dispatcher.eventlog.jetstream import JetStreamLog, _Feed
from dispatcher.journal import Journal
from tests.eventlog.helpers import entries, stamped_events
from tests.nats_server import NatsServer, run_with_client

_names = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("nats") / "js") as running:
        yield running


@pytest.fixture
def where():
    """A stream and subject of this test's own, so tests share one server safely."""
    n = next(_names)
    return {"stream": f"TEST_{n}", "subject": f"imdtest.{n}.events"}


@pytest.fixture
def run(server):
    """Run `body(nc)` in a fresh event loop with a client connected to the server."""

    def runner(body, url=None, **options):
        return run_with_client(url or server.url, body, **options)

    return runner


async def write(nc, where, events, batch=7, **options):
    log = JetStreamLog(nc, **where, **options)
    await log.open()
    for i in range(0, len(events), batch):
        await log.append(entries(events[i:i + batch]))
    await log.close()
    return log


async def read_all(nc, where, after=0):
    log = JetStreamLog(nc, **where)
    await log.open()
    try:
        return [record async for batch in log.read(after) for record in batch]
    finally:
        await log.close()

def count_consumers(nc, monkeypatch, consumers: list) -> None:
    """From now on, each consumer a reader asks `nc`'s JetStream for is added to
    `consumers` (the arguments it asked with)."""
    add_consumer = nc.jetstream().add_consumer.__func__

    async def counted(js, *args, **kwargs):
        consumers.append(args)
        return await add_consumer(js, *args, **kwargs)

    monkeypatch.setattr(type(nc.jetstream()), "add_consumer", counted)



async def publish_raw(nc, where, payload, headers):
    return await nc.jetstream().publish(where["subject"], payload, headers=headers)


def record_headers(prev, fmt="1"):
    return {"Imd-Format": fmt, "Imd-Prev-Hash": prev.hex()}


async def build_state(journal):
    """A few nodes and changes of every common kind, recorded through the journal."""
    state = journal.state
    for i, weight in enumerate((5, 1, 3), start=1):
        await journal.record(
            decisions.add_node(state, f"n{i}", f"10.0.0.{i}", 9000 + i, weight, actor="config")
        )
    await journal.record(decisions.mark_up(state, "n1") + decisions.mark_up(state, "n2"))
    await journal.record(decisions.observe_load(state, "n1", 950, 1000))
    await journal.record(decisions.set_weight(state, "n2", 7, actor="admin", reason="bigger"))
    await journal.record(decisions.set_draining(state, "n3", True, actor="admin"))
    await journal.record(decisions.mark_down(state, "n2", "timeout", "no reply in 1 s"))
    await journal.record(decisions.remove_node(state, "n3", actor="admin"))


def test_round_trip_through_the_journal(run, where):
    async def body(nc):
        journal = Journal(JetStreamLog(nc, **where))
        report = await journal.open()
        assert report.recovery.last_seq == 0
        assert any("created JetStream stream" in note for note in report.recovery.notes)
        await build_state(journal)
        written = journal.state.to_dict()
        last = journal.state.seq
        await journal.close()

        again = Journal(JetStreamLog(nc, **where))
        report = await again.open()
        assert (report.recovery.last_seq, report.replayed) == (last, last)
        assert again.state.to_dict() == written
        await again.close()

    run(body)


def test_reopen_continues_seq_and_hash_chain(run, where):
    events = stamped_events(40)

    async def body(nc):
        first = await write(nc, where, events[:25])
        log = JetStreamLog(nc, **where)
        recovery = await log.open()
        assert (recovery.last_seq, log.last_seq, log.last_hash) == (
            25, first.last_seq, first.last_hash,
        )
        await log.append(entries(events[25:]))
        await log.close()
        got = await read_all(nc, where)
        assert [r.seq for r in got] == list(range(1, 41))
        assert [r.payload for r in got] == [orjson.dumps(e) for e in events]
        prev = records.GENESIS_HASH
        for record in got:  # the chain as the file log would compute it
            assert record.prev_hash == prev
            assert record.hash == records.record_hash(record.seq, prev, record.payload)
            prev = record.hash
        assert prev == log.last_hash
        assert [r.seq for r in await read_all(nc, where, after=30)] == list(range(31, 41))
        assert await read_all(nc, where, after=40) == []

    run(body)


def test_stream_config_and_nats_headers(run, where):
    async def body(nc):
        log = await write(nc, where, stamped_events(2))
        js = nc.jetstream()
        config = (await js.stream_info(where["stream"])).config
        assert config.subjects == [where["subject"]]
        assert (config.storage, config.discard, config.retention) == ("file", "new", "limits")
        assert (config.max_msgs, config.max_bytes, config.max_age) == (-1, -1, 0)
        assert config.duplicate_window > 0 and config.deny_delete and config.deny_purge
        assert config.allow_atomic
        # One append, one atomic batch: the first message fences it, the last commits it.
        first, last = [await js.get_msg(where["stream"], seq) for seq in (1, 2)]
        assert first.headers["Imd-Format"] == last.headers["Imd-Format"] == "1"
        assert first.headers["Nats-Expected-Last-Sequence"] == "0"
        assert first.headers["Nats-Expected-Stream"] == where["stream"]
        assert "Nats-Expected-Last-Sequence" not in last.headers  # JetStream refuses it there
        assert first.headers["Nats-Batch-Id"] == last.headers["Nats-Batch-Id"]
        assert (first.headers["Nats-Batch-Sequence"], last.headers["Nats-Batch-Sequence"]) == (
            "1", "2")
        assert last.headers["Nats-Batch-Commit"] == "1"
        assert last.headers["Nats-Msg-Id"] == f"{where['stream']}:2:{log.last_hash.hex()[:32]}"

    run(body)


def test_replicas_are_passed_to_the_stream_config(run, where):
    async def body(nc):
        assert JetStreamLog(nc, **where, replicas=3).stream_config().num_replicas == 3
        with pytest.raises(StreamConfigError, match="3 replicas"):
            await JetStreamLog(nc, **where, replicas=3).open()  # one server: no R3 stream
        await write(nc, where, stamped_events(1), replicas=1)
        info = await nc.jetstream().stream_info(where["stream"])
        assert info.config.num_replicas == 1
        log = JetStreamLog(nc, **where, replicas=3)  # binding: a mismatch is only a note
        recovery = await log.open()
        await log.close()
        assert any("has 1 replicas, not the 3 configured" in n for n in recovery.notes)

    run(body)


def test_stale_writer_cannot_interleave(run, where):
    events = stamped_events(3)

    async def body(nc):
        first, second = JetStreamLog(nc, **where), JetStreamLog(nc, **where)
        await first.open()
        await second.open()
        await first.append(entries(events[:1]))
        other = stamped_events(1, seed=1)  # another event for the same seq
        durable = second.append(entries(other))  # second still believes the log is empty
        assert second.last_seq == 1
        with pytest.raises(StaleWriter, match="another writer appended"):
            await durable
        assert isinstance(second.failure, StaleWriter)
        with pytest.raises(LogClosed):
            second.append(entries(events[1:2]))
        with pytest.raises(LogClosed):
            await second.close()
        await first.append(entries(events[1:2]))  # the first writer is unaffected
        log = JetStreamLog(nc, **where)
        await log.open()
        await log.append(entries(events[2:]))  # an identical record is no conflict: it is the same
        await log.close()
        await first.close()
        info = await nc.jetstream().stream_info(where["stream"])
        assert info.state.messages == 3

    run(body)


def test_a_refused_append_leaves_none_of_its_events(run, where):
    """A stale writer's append of several events is refused whole: none of its events
    follows the other writer's record (one message at a time, the second would have been
    stored after the other writer's first and broken the chain)."""
    ours, theirs = stamped_events(3), stamped_events(1, seed=1)

    async def body(nc):
        first, second = JetStreamLog(nc, **where, shared=True), JetStreamLog(nc, **where)
        await first.open()
        await second.open()  # believes the stream is empty
        await first.append(entries(theirs))
        with pytest.raises(StaleWriter):
            await second.append(entries(ours))
        await first.close()
        assert (await nc.jetstream().stream_info(where["stream"])).state.messages == 1
        assert [r.payload for r in await read_all(nc, where)] == [orjson.dumps(theirs[0])]

    run(body)


def test_queued_appends_are_batched_whole_and_a_large_one_spans_batches(run, where):
    events = stamped_events(3700)
    appends = [events[:400], events[400:800], events[800:1200], events[1200:]]

    async def body(nc):
        log = JetStreamLog(nc, **where)
        await log.open()
        futures = [log.append(entries(part)) for part in appends]  # queued before any is sent
        await asyncio.gather(*futures)
        await log.close()
        js = nc.jetstream()
        batch_of = {}
        for seq in (1, 800, 801, 1200, 1201, 2200, 2201, 3200, 3201, 3700):
            headers = (await js.get_msg(where["stream"], seq)).headers
            batch_of[seq] = (headers["Nats-Batch-Id"], int(headers["Nats-Batch-Sequence"]))
        assert batch_of[1][0] == batch_of[800][0] and batch_of[800][1] == 800  # 2 appends
        assert batch_of[801][0] == batch_of[1200][0] != batch_of[800][0]  # the third
        assert batch_of[1201][1] == 1 and batch_of[2200] == (batch_of[1201][0], 1000)
        assert batch_of[2201][1] == 1 and batch_of[3200][1] == 1000  # the 2500-event one
        assert batch_of[3201][1] == 1 and batch_of[3700] == (batch_of[3201][0], 500)
        assert [r.payload for r in await read_all(nc, where)] == [orjson.dumps(e) for e in events]

    run(body)


def test_an_old_stream_is_allowed_atomic_batches_at_open(run, where):
    async def body(nc):
        js = nc.jetstream()
        await js.add_stream(name=where["stream"], subjects=[where["subject"]])
        log = JetStreamLog(nc, **where)
        recovery = await log.open()
        await log.append(entries(stamped_events(2)))
        await log.close()
        assert any("allowed atomic batch publish" in note for note in recovery.notes)
        assert (await js.stream_info(where["stream"])).config.allow_atomic

    run(body)


def test_a_read_resumes_after_messages_lost_in_transit(run, where, monkeypatch):
    """A gap in the consumer's delivery (messages lost between server and client) makes
    the read start another consumer from the first message missing."""
    events = stamped_events(3000)
    take, dropped, consumers = _Feed.take, [], []

    def lose_two(feed, subject, reply, block, data):
        if natswire.status(block) is None and len(dropped) < 2 and b".1500." in reply:
            dropped.append(reply)  # the message of stream seq 1500 (delivery 1500)
            return
        take(feed, subject, reply, block, data)

    async def body(nc):
        await write(nc, where, events, batch=500)
        monkeypatch.setattr(_Feed, "take", lose_two)
        count_consumers(nc, monkeypatch, consumers)
        got = await read_all(nc, where)
        assert [r.seq for r in got] == list(range(1, 3001))
        assert len(dropped) == 2 and len(consumers) == 3  # one lost each time, resumed

    run(body)


async def publish_frames(url: str, frames: bytes) -> None:
    """Send raw protocol frames from a client of their own (one no library would write)."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
                 + frames + b"PING\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert answer == b"PONG\r\n", answer  # the server took every frame


def hpub(subject: bytes, reply: bytes, block: bytes, payload: bytes = b"") -> bytes:
    """An HPUB frame of a header block and a payload."""
    return b"HPUB %s %s%d %d\r\n%s%s\r\n" % (subject, reply + b" " if reply else b"",
                                              len(block), len(block) + len(payload), block,
                                              payload)


def test_junk_sent_to_a_readers_inbox_loses_nothing_else(run, where, server, monkeypatch):
    """Whoever can publish to the reader's inbox may send it junk: a header block too
    short to hold a status, a flow-control request or heartbeat naming a subject that is
    not UTF-8. The read still gets every record, and the connection (shared, in cluster
    mode, with everything else) still answers: a handler's error raised into nats-py's
    parser would end the connection's reading for good."""
    events = stamped_events(20_000)
    inboxes = []
    start = natswire.RawSubscription.start

    async def noted(subscription):
        inboxes.append(subscription.subject.encode())
        return await start(subscription)

    async def body(nc):
        await write(nc, where, events, batch=1000)
        monkeypatch.setattr(natswire.RawSubscription, "start", noted)
        log = JetStreamLog(nc, **where, retry_for=5.0)
        got, sent = [], False
        async for batch in log.read():
            got.extend(batch)
            if not sent:
                inbox = inboxes[0]
                await publish_frames(server.url, b"".join((
                    b"HPUB %s 3 5\r\nabcde\r\n" % inbox,
                    hpub(inbox, b"\xff\xfe", b"NATS/1.0 100 FlowControl Request\r\n\r\n"),
                    hpub(inbox, b"", b"NATS/1.0 100 Idle Heartbeat\r\n"
                                     b"Nats-Consumer-Stalled: \xff\r\n\r\n"),
                )))
                sent = True
        assert [r.seq for r in got] == list(range(1, 20_001))
        assert (await nc.jetstream().stream_info(where["stream"])).state.messages == 20_000

    run(body)


def test_a_slow_reader_gets_everything_from_one_consumer(run, where, monkeypatch):
    """Flow control: the server stops at its window until the reader answers its request
    (which the reader does once it has room), so a slow reader gets every record from one
    consumer, without a stall."""
    events = stamped_events(50_000)
    consumers = []

    async def body(nc):
        await write(nc, where, events, batch=1000)
        count_consumers(nc, monkeypatch, consumers)
        count = 0
        async for batch in JetStreamLog(nc, **where, timeout=2.0).read():
            count += len(batch)
            await asyncio.sleep(0.03)
        assert count == 50_000 and len(consumers) == 1  # never stalled

    run(body)


def test_journal_behind_another_replica_refuses_changes(run, where):
    async def body(nc):
        one, two = Journal(JetStreamLog(nc, **where)), Journal(JetStreamLog(nc, **where))
        await one.open()
        await two.open()
        await one.record(decisions.add_node(one.state, "n1", "10.0.0.1", 9001, 5, actor="a"))
        with pytest.raises(StaleWriter):
            await two.record(decisions.add_node(two.state, "n2", "10.0.0.2", 9002, 1, actor="b"))
        assert two.failure is not None
        with pytest.raises(LogClosed):
            await two.record(decisions.add_node(two.state, "n3", "10.0.0.3", 9003, 1, actor="b"))
        await one.close()
        three = Journal(JetStreamLog(nc, **where))  # a restarted replica catches up
        await three.open()
        assert list(three.state.nodes) == ["n1"]
        await three.close()

    run(body)


def test_a_retried_publish_is_not_stored_twice(run, where):
    events = stamped_events(5)

    async def body(nc):
        log = JetStreamLog(nc, **where, timeout=0.3)
        dropped = []
        on_ack = log._on_ack

        async def lose_some_acks(msg):  # the server stored 2 and 4; their acks are lost
            seq = log._acked + 1
            if seq in (2, 4) and seq not in dropped:
                dropped.append(seq)
                return
            await on_ack(msg)

        log._on_ack = lose_some_acks
        await log.open()
        for event in events:
            await log.append(entries([event]))
        await log.close()
        assert dropped == [2, 4]
        assert [r.payload for r in await read_all(nc, where)] == [
            orjson.dumps(e) for e in events
        ]
        # JetStream's own dedup: the same Msg-Id again is acknowledged as a duplicate.
        raw = await nc.jetstream().get_msg(where["stream"], 5)
        headers = {k: raw.headers[k] for k in ("Imd-Format", "Imd-Prev-Hash", "Nats-Msg-Id")}
        ack = await publish_raw(nc, where, raw.data, headers)
        assert (ack.seq, ack.duplicate) == (5, True)
        assert (await nc.jetstream().stream_info(where["stream"])).state.messages == 5

    run(body)


def test_a_tampered_message_breaks_the_chain(run, where):
    async def body(nc):
        journal = Journal(JetStreamLog(nc, **where))
        await journal.open()
        await build_state(journal)
        await journal.close()
        last = journal.state.seq
        forged = decisions.set_weight(journal.state, "n1", 10, actor="mallory")[0]
        forged.seq = last + 1
        await publish_raw(nc, where, orjson.dumps(forged), record_headers(b"\x01" * 32))
        with pytest.raises(LogCorrupted, match=f"hash chain breaks at seq {last + 1}") as caught:
            await read_all(nc, where)
        assert (caught.value.segment, caught.value.offset, caught.value.seq) == (
            where["stream"], last + 1, last + 1,
        )
        with pytest.raises(LogCorrupted):
            await Journal(JetStreamLog(nc, **where)).open()

    run(body)


def test_a_record_with_its_headers_in_another_form_is_read(run, where):
    """Another client may write a record's headers its own way (here: a hash in capitals
    after extra blanks). The bulk check does not know that form; the slow one reads it,
    and the chain goes on through it."""
    events = stamped_events(4)

    async def body(nc):
        log = await write(nc, where, events[:2])
        payload = orjson.dumps(events[2])
        await publish_raw(nc, where, payload, {"Imd-Prev-Hash": "  " + log.last_hash.hex().upper(),
                                               "Imd-Format": "1"})
        third = records.record_hash(3, log.last_hash, payload)
        await publish_raw(nc, where, orjson.dumps(events[3]), record_headers(third))
        got = await read_all(nc, where)
        assert [r.seq for r in got] == [1, 2, 3, 4] and got[2].hash == third
        assert got[3].prev_hash == third and got[2].payload == payload

    run(body)


@pytest.mark.parametrize("prev_line, fits", [
    (b"Imd-Prev-Hash: %s", True),  # the block's last line without its CRLF
    (b"Imd-Prev-Hash: %s\xff\r\n\r\n", False),  # bytes that are not UTF-8
])
def test_every_reader_judges_an_odd_header_block_alike(run, where, server, prev_line, fits):
    """A record written by a hand other than ours: `read` (bulk), `open` (the last
    record) and `follow` (nats-py's parsing) accept it or refuse it alike, refusing as
    corruption, never with another exception."""
    events = stamped_events(3)

    async def body(nc):
        log = await write(nc, where, events[:2])
        payload = orjson.dumps(events[2])
        block = b"NATS/1.0\r\nImd-Format: 1\r\n" + prev_line % log.last_hash.hex().encode()
        await publish_frames(server.url, hpub(where["subject"].encode(), b"", block, payload))
        async def followed():
            async for batch in JetStreamLog(nc, **where).follow(2):
                if batch:
                    return batch

        outcomes = []
        for read in (lambda: read_all(nc, where), lambda: JetStreamLog(nc, **where).open(),
                     followed):
            try:
                got = await read()
            except LogCorrupted as exc:
                outcomes.append(f"corrupted at {exc.seq}")
            else:
                outcomes.append("fits")
                if isinstance(got, list) and len(got) == 3:  # what read_all returns
                    assert got[2].hash == records.record_hash(3, log.last_hash, payload)
        assert outcomes == (["fits"] * 3 if fits else ["corrupted at 3"] * 3)

    run(body)


def test_a_foreign_message_is_corruption(run, where):
    async def body(nc):
        await write(nc, where, stamped_events(2))
        await publish_raw(nc, where, b"hello", None)
        with pytest.raises(LogCorrupted, match="message 3 is not an event record"):
            await JetStreamLog(nc, **where).open()

    run(body)


def test_an_unknown_format_is_refused(run, where):
    events = stamped_events(3)

    async def body(nc):
        log = await write(nc, where, events[:2])
        payload = orjson.dumps(events[2])
        await publish_raw(nc, where, payload, record_headers(log.last_hash, fmt="2"))
        with pytest.raises(UnsupportedFormat, match="format '2'"):
            await JetStreamLog(nc, **where).open()  # the last message is read on open
        reader = JetStreamLog(nc, **where)  # not opened: reads to the stream's end
        with pytest.raises(UnsupportedFormat):
            _ = [batch async for batch in reader.read()]

    run(body)


def test_a_missing_message_is_corruption(run, where):
    async def body(nc):
        js = nc.jetstream()  # a stream that allows deletes, made by an operator
        await js.add_stream(name=where["stream"], subjects=[where["subject"]])
        await write(nc, where, stamped_events(5))
        await js.delete_msg(where["stream"], 3)
        with pytest.raises(LogCorrupted, match="first missing: seq 3") as caught:
            await JetStreamLog(nc, **where).open()
        assert caught.value.seq == 3
        with pytest.raises(LogCorrupted, match="message 3 missing") as caught:
            _ = [batch async for batch in JetStreamLog(nc, **where).read()]
        assert (caught.value.offset, caught.value.seq) == (3, 3)

    run(body)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"subjects": ["other.subject"]}, "subjects"),
        ({"max_age": 3600}, "max_age"),
        ({"max_msgs": 100, "discard": api.DiscardPolicy.OLD}, "discard=old"),
        ({"retention": api.RetentionPolicy.WORK_QUEUE}, "retention"),
    ],
)
def test_a_conflicting_stream_is_refused(run, where, config, problem):
    async def body(nc):
        settings = {"name": where["stream"], "subjects": [where["subject"]], **config}
        await nc.jetstream().add_stream(api.StreamConfig(**settings))
        with pytest.raises(StreamConfigError, match=problem):
            await JetStreamLog(nc, **where).open()

    run(body)


def test_close_waits_for_acks_and_keeps_the_connection(run, where):
    events = stamped_events(500)

    async def body(nc):
        log = JetStreamLog(nc, **where)
        await log.open()
        futures = [log.append(entries(events[i:i + 10])) for i in range(0, 500, 10)]
        await log.close()
        assert all(f.done() and f.exception() is None for f in futures)
        assert nc.is_connected
        with pytest.raises(LogClosed):
            log.append(entries(stamped_events(1, start=501)))
        assert len(await read_all(nc, where)) == 500

    run(body)


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "kill-9"])
def test_appends_survive_a_server_restart(run, where, tmp_path, crash):
    """Acks lost with the connection are retried; the stream ends up with every event
    once, in order (expected-sequence checks reject stale resends)."""
    events = stamped_events(1500)
    with NatsServer(tmp_path / "js") as server:

        async def body(nc):
            log = JetStreamLog(nc, **where, timeout=0.5, retry_for=30.0)
            await log.open()
            await log.append(entries(events[:100]))
            futures = [log.append(entries(events[i:i + 5])) for i in range(100, 1500, 5)]
            await asyncio.sleep(0.005)  # some published, some acknowledged, some queued
            await asyncio.to_thread(server.restart, crash=crash)
            await asyncio.gather(*futures)
            await log.close()
            got = await read_all(nc, where)
            assert [r.payload for r in got] == [orjson.dumps(e) for e in events]

        async def quiet(error):  # the disconnect is expected
            pass

        run(body, server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
            error_cb=quiet)


def test_a_read_outlives_a_server_restart(run, where, tmp_path, monkeypatch):
    """The reader's consumer (in memory) dies with its server: the read starts another
    from the next record once JetStream answers again, and delivers every record once."""
    events = stamped_events(60_000)
    consumers = []
    with NatsServer(tmp_path / "js") as server:

        async def body(nc):
            await write(nc, where, events, batch=1000)
            count_consumers(nc, monkeypatch, consumers)
            got, restart = [], None
            async for batch in JetStreamLog(nc, **where, timeout=0.5).read():
                got += [record.seq for record in batch]
                if restart is None:  # the server is away while the read goes on
                    restart = asyncio.create_task(
                        asyncio.to_thread(server.restart, crash=True))
            await restart
            assert got == list(range(1, 60_001))
            assert len(consumers) >= 2  # the first died with the server

        async def quiet(error):  # the disconnect is expected
            pass

        run(body, server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
            error_cb=quiet)


def test_a_read_waits_for_jetstream_to_answer(run, where, monkeypatch):
    """No answer to the reader's consumer request (JetStream restarting, say) is waited
    out and asked again, within `retry_for`."""
    events = stamped_events(50)
    refused = []

    async def body(nc):
        await write(nc, where, events)
        add_consumer = nc.jetstream().add_consumer.__func__

        async def not_yet(js, *args, **kwargs):
            if len(refused) < 2:
                refused.append(args)
                raise nats.errors.TimeoutError
            return await add_consumer(js, *args, **kwargs)

        monkeypatch.setattr(type(nc.jetstream()), "add_consumer", not_yet)
        assert [r.seq for r in await read_all(nc, where)] == list(range(1, 51))
        assert len(refused) == 2

    run(body)
