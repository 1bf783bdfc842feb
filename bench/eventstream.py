"""A realistic event stream for log benchmarks: a cluster's nodes, then mostly polls."""

from dispatcher.domain import events as ev


def cluster_events(count: int, nodes: int = 100, start_time: float = 1.8e9) -> list[ev.Event]:
    """`count` stamped events: nodes added and seen up, then load reports (the bulk of a
    real log), with a node going down and up again now and then."""
    out: list[ev.Event] = []

    def add(event: ev.Event) -> None:
        event.seq, event.time = len(out) + 1, start_time + len(out) * 0.01
        out.append(event)

    for i in range(nodes):
        add(ev.NodeAdded(node=f"node-{i:03d}", ip=f"10.0.{i // 250}.{i % 250 + 1}",
                         port=9000, weight=1 + i % 5, actor="config"))
        add(ev.NodeUp(node=f"node-{i:03d}", actor="poller"))
    i = 0
    while len(out) < count:
        node = f"node-{i % nodes:03d}"
        if i % 997 == 0:
            add(ev.NodeDown(node=node, cause="timeout", detail="no reply within 1.0 s",
                            actor="poller"))
            add(ev.NodeUp(node=node, actor="poller"))
        else:
            add(ev.LoadReported(node=node, connections=(i * 37) % 9000, capacity=10_000,
                                actor="poller"))
        i += 1
    return out[:count]


def weight_changes(count: int, start_time: float = 1.8e9) -> list[ev.Event]:
    """`count` stamped events: a node added, then its weight set back and forth (what the
    JetStream benchmarks recorded through the journal before they used `cluster_events`:
    a light fold, so the log's own cost shows)."""
    out: list[ev.Event] = [ev.NodeAdded(node="n1", ip="10.0.0.1", port=9001, weight=5,
                                        actor="bench")]
    out += [ev.NodeWeightSet(node="n1", weight=1 + i % 2, actor="bench")
            for i in range(count - 1)]
    for seq, event in enumerate(out, 1):
        event.seq, event.time = seq, start_time + seq * 0.01
    return out
