"""A quick proof that this installation's core is the compiled one and behaves as specified.

Run by `imdispatch selfcheck`: it needs no network, no NATS and no configuration, so it is
the first thing to run on a new machine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import core_ext
from core_ext import _fastpath, _fastpath_py, _selector, reference

NGINX_EXAMPLE = {"a": 5, "b": 1, "c": 1}
NGINX_SEQUENCE = ["a", "a", "b", "a", "c", "a", "a"]
REQUESTS = (  # the fast path's reading: (request, whether it may answer it itself)
    (b"GET /get-tcp-ip?uid=u1 HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET /get-tcp-ip HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"GET /get-tcp-ip HTTP/1.1\r\nContent-Length: 0\r\n\r\n", False),
    (b"POST /admin/nodes HTTP/1.1\r\n\r\n", False),
)


def _differential(steps: int, seed: int) -> str | None:
    """Drive both implementations with the same random operations; describe the first mismatch."""
    rng = random.Random(seed)
    fast, slow = _selector.Selector(0.9, 0.8), reference.Selector(0.9, 0.8)
    ids = [f"n{i}" for i in range(12)]
    for step in range(steps):
        nid = rng.choice(ids)
        op = rng.choice(
            ["add", "remove", "set_weight", "set_up", "set_draining", "report", "pick", "pick"]
        )
        args: tuple = ()
        if op == "add" or op == "set_weight":
            args = (nid, rng.randint(0, 10))
        elif op == "remove":
            args = (nid,)
        elif op in ("set_up", "set_draining"):
            args = (nid, rng.random() < 0.5)
        elif op == "pick" and rng.random() < 0.3:
            args = (rng.sample(ids, 2),)
        elif op == "report":
            capacity = rng.randint(1, 100)
            args = (nid, rng.randint(0, capacity), capacity)
        outcomes = []
        for selector in (fast, slow):
            try:
                outcomes.append(("ok", getattr(selector, op)(*args)))
            except (KeyError, ValueError) as exc:
                outcomes.append((type(exc).__name__, str(exc)))
        if outcomes[0] != outcomes[1] or fast.state() != slow.state():
            return f"step {step}: {op}{args}: compiled {outcomes[0]!r}, reference {outcomes[1]!r}"
    return None


def _pick_seconds(cls: type, nodes: int, picks: int) -> float:
    selector = cls()
    for i in range(nodes):
        selector.add(f"n{i}", 1 + i % 7)
    pick = selector.pick
    start = time.perf_counter()
    for _ in range(picks):
        pick()
    return (time.perf_counter() - start) / picks


def run(say: Callable[[str], None] = print) -> bool:
    """Print what was checked; True when everything passed."""
    ok = core_ext.IMPLEMENTATION == "compiled"
    say(f"core_ext implementation: {core_ext.IMPLEMENTATION} ({core_ext.Selector.__module__})"
        + ("" if ok else ": the compiled core is NOT in use (IMDISPATCH_PURE_PYTHON is set)"))
    for cls in (_selector.Selector, reference.Selector):
        selector = cls()
        for nid, weight in NGINX_EXAMPLE.items():
            selector.add(nid, weight)
        sequence = [selector.pick() for _ in NGINX_SEQUENCE]
        good = sequence == NGINX_SEQUENCE
        ok &= good
        say(f"{cls.__module__}: weights {NGINX_EXAMPLE} -> {' '.join(sequence)} "
            f"{'(nginx order)' if good else f'(EXPECTED {NGINX_SEQUENCE})'}")
    mismatch = _differential(steps=5000, seed=2026)
    ok &= mismatch is None
    say("differential check, 5000 random operations: "
        + ("compiled == reference" if mismatch is None else f"MISMATCH at {mismatch}"))
    compiled = _pick_seconds(_selector.Selector, 64, 20000)
    pure = _pick_seconds(reference.Selector, 64, 20000)
    say(f"pick() at 64 nodes: compiled {compiled * 1e9:.0f} ns, reference {pure * 1e9:.0f} ns "
        f"({pure / compiled:.0f}x)")
    read = [(_fastpath.scan(bytearray(data), 0, 16384),
             _fastpath_py.scan(bytearray(data), 0, 16384), fast) for data, fast in REQUESTS]
    good = all(ours == twin and (ours != _fastpath.NOT_FAST) is fast
               for ours, twin, fast in read)
    ok &= good
    say(f"get-tcp-ip fast path ({_fastpath.__name__}): {len(REQUESTS)} request heads read "
        + ("as its twin reads them" if good else "DIFFERENTLY from its twin or the rules"))
    say("selfcheck " + ("passed" if ok else "FAILED"))
    return ok
