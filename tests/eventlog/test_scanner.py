"""The compiled record scanner and its pure-Python twin agree on every input."""

import importlib.machinery

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.eventlog import _scan, _scan_py, records

PAYLOADS = st.lists(st.binary(max_size=300), min_size=0, max_size=25)


def build(payloads, first_seq=1, prev=records.GENESIS_HASH):
    data, hashes = bytearray(), [prev]
    for seq, payload in enumerate(payloads, start=first_seq):
        framed, digest = records.encode(seq, hashes[-1], payload)
        data += framed
        hashes.append(digest)
    return data, hashes


def both(data, offset, seq, prev, limit):
    compiled = _scan.scan_batch(bytes(data), offset, seq, prev, limit)
    pure = _scan_py.scan_batch(bytes(data), offset, seq, prev, limit)
    assert compiled == pure
    return pure


@settings(max_examples=300, deadline=None)
@given(
    payloads=PAYLOADS,
    damage=st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 10**5),
    limit=st.integers(1, 30),
    start_seq=st.sampled_from([1, 2, 7]),
    prev_ok=st.booleans(),
)
def test_compiled_scanner_matches_the_reference(payloads, damage, cut, limit, start_seq, prev_ok):
    data, hashes = build(payloads)
    for position, value in damage:
        if data:
            data[position % len(data)] = value
    if data and cut % 3 == 0:
        del data[cut % len(data):]
    prev = hashes[0] if prev_ok else b"\x01" * 32
    offset, seq = 0, start_seq
    while True:  # scan batch after batch, as the segment reader does
        batch, offset, seq, prev, why = both(data, offset, seq, prev, limit)
        if why != records.SCANNED or not batch:
            break


@given(payloads=PAYLOADS)
def test_intact_records_come_back_whole(payloads):
    data, hashes = build(payloads)
    got, offset, seq, prev, why = both(data, 0, 1, hashes[0], 10**6)
    assert [r.payload for r in got] == payloads
    assert [r.hash for r in got] == hashes[1:]
    assert (offset, seq, prev, why) == (len(data), len(payloads) + 1, hashes[-1], records.SCANNED)


def test_stop_reasons():
    data, hashes = build([b"a", b"b", b"c"])
    assert both(data, 0, 2, hashes[0], 9)[4] == records.WRONG_SEQ
    assert both(data, 0, 1, b"\x00" * 31 + b"\x01", 9)[4] == records.BROKEN_CHAIN
    assert both(data[:-1], 0, 1, hashes[0], 9)[4] == records.DAMAGED
    first, offset, *_ = both(data, 0, 1, hashes[0], 2)
    assert len(first) == 2 and offset < len(data)


def test_bad_arguments_are_refused_alike():
    data, hashes = build([b"a"])
    for scan in (_scan.scan_batch, _scan_py.scan_batch):
        for offset, prev in ((-1, hashes[0]), (0, b"short")):
            try:
                scan(bytes(data), offset, 1, prev, 9)
            except ValueError as exc:
                assert "offset must be >= 0" in str(exc)
            else:
                raise AssertionError(f"{scan.__module__} accepted {offset}, {prev!r}")
    try:
        _scan.scan_batch(None, 0, 1, hashes[0], 9)
    except TypeError:
        pass
    else:
        raise AssertionError("None accepted as data")


def test_oversized_length_is_damage():
    data, hashes = build([b"a"])
    data[4:8] = (records.MAX_PAYLOAD + 1).to_bytes(4, "big")
    data += bytes(records.MAX_PAYLOAD + 100)  # long enough that only the limit can stop it
    assert both(data, 0, 1, hashes[0], 9)[4] == records.DAMAGED


def test_scanner_is_compiled():
    assert isinstance(_scan.__loader__, importlib.machinery.ExtensionFileLoader)


# -- records as a JetStream push consumer delivers them -------------------------------

def message(seq, prev, payload, delivered, *, block=None, reply=None):
    """(ack reply, header block, data), as the writer writes a record and JetStream
    delivers it."""
    if block is None:
        block = (b"NATS/1.0" + records.FORMAT_LINE + records.PREV_LINE + prev.hex().encode()
                 + b"\r\nNats-Msg-Id: S:%d:ab\r\n\r\n" % seq)
    if reply is None:
        reply = b"$JS.ACK.S.c.1.%d.%d.1764460000000000000.0" % (seq, delivered)
    return reply, block, payload


def messages_of(payloads, first_seq=1, prev=records.GENESIS_HASH):
    out, hashes = [], [prev]
    for n, payload in enumerate(payloads):
        seq = first_seq + n
        out.append(message(seq, hashes[-1], payload, n + 1))
        hashes.append(records.record_hash(seq, hashes[-1], payload))
    return out, hashes


def scan_both(messages, start, last, seq, prev, delivered=1):
    results = []
    for module in (_scan, _scan_py):
        scanner = module.MessageScanner(seq, prev)
        scanner.delivered = delivered
        out = []
        stop = scanner.scan(messages, start, last, out)
        results.append((stop, out, scanner.delivered, scanner.seq, scanner.prev))
    assert results[0] == results[1]
    return results[1]


MUTATIONS = st.sampled_from([
    None, "reply-domain", "reply-short", "reply-letters", "skip-delivery", "skip-seq",
    "no-block", "no-format", "other-format", "upper-hex", "bad-hex", "short-hex",
    "other-prev", "no-data",
])


def mutate(messages, index, how):
    reply, block, data = messages[index]
    if how == "reply-domain":  # $JS.ACK.<domain>.<account>.<stream>...: 12 tokens
        tokens = reply.split(b".")
        reply = b".".join([*tokens[:2], b"hub", b"ACC", *tokens[2:], b"tok"])
    elif how == "reply-short":
        reply = b"$JS.ACK.S.c.1"
    elif how == "reply-letters":
        reply = reply.replace(b".1.", b".x.", 1)
    elif how == "skip-delivery":
        tokens = reply.split(b".")
        tokens[6] = b"%d" % (int(tokens[6]) + 1)
        reply = b".".join(tokens)
    elif how == "skip-seq":
        tokens = reply.split(b".")
        tokens[5] = b"%d" % (int(tokens[5]) + 3)
        reply = b".".join(tokens)
    elif how == "no-block":
        block = None
    elif how == "no-format":
        block = block.replace(records.FORMAT_LINE, b"\r\n")
    elif how == "other-format":
        block = block.replace(records.FORMAT_LINE, b"\r\nImd-Format: 2\r\n")
    elif how == "upper-hex":
        at = block.index(records.PREV_LINE) + len(records.PREV_LINE)
        block = block[:at] + block[at:at + 64].upper() + block[at + 64:]
    elif how == "bad-hex":
        at = block.index(records.PREV_LINE) + len(records.PREV_LINE)
        block = block[:at] + b"g" + block[at + 1:]
    elif how == "short-hex":
        at = block.index(records.PREV_LINE) + len(records.PREV_LINE)
        block = block[:at + 62] + block[at + 64:]
    elif how == "other-prev":
        at = block.index(records.PREV_LINE) + len(records.PREV_LINE)
        block = block[:at] + b"0" * 64 + block[at + 64:]
    elif how == "no-data":
        data = None
    messages[index] = (reply, block, data)


@settings(max_examples=300, deadline=None)
@given(payloads=st.lists(st.binary(max_size=200), max_size=12), where=st.integers(0, 11),
       how=MUTATIONS, start=st.integers(0, 3), last=st.integers(0, 15),
       checked=st.booleans())
def test_compiled_message_scanner_matches_the_reference(payloads, where, how, start, last,
                                                        checked):
    messages, hashes = messages_of(payloads)
    if messages and how:
        mutate(messages, where % len(messages), how)
    start = min(start, len(messages))
    scan_both(messages, start, last, start + 1, hashes[start] if checked else None,
              delivered=start + 1)


@given(payloads=st.lists(st.binary(max_size=200), max_size=12))
def test_intact_messages_come_back_as_their_records(payloads):
    messages, hashes = messages_of(payloads, first_seq=5, prev=b"\x07" * 32)
    (index, why, found), out, delivered, seq, prev = scan_both(
        messages, 0, 10**9, 5, b"\x07" * 32)
    assert (index, why, found) == (len(payloads), records.SCANNED, 0)
    assert [(r.seq, r.payload, r.hash) for r in out] == [
        (5 + n, p, h) for n, (p, h) in enumerate(zip(payloads, hashes[1:], strict=True))]
    assert (delivered, seq, prev) == (len(payloads) + 1, 5 + len(payloads), hashes[-1])


def test_message_stop_reasons():
    messages, hashes = messages_of([b"a", b"b", b"c"])
    assert scan_both(messages, 0, 2, 1, hashes[0])[0] == (2, records.SCANNED, 0)  # `last`
    assert scan_both(messages, 0, 9, 2, None)[0] == (0, records.WRONG_SEQ, 1)
    assert scan_both(messages, 0, 9, 1, b"\x01" * 32)[0] == (0, records.BROKEN_CHAIN, 1)
    assert scan_both(messages, 0, 9, 1, None, delivered=2)[0] == (0, records.LOST, 0)
    mutate(messages, 1, "other-format")
    assert scan_both(messages, 0, 9, 1, None)[0] == (1, records.UNUSUAL, 2)
