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
