"""The closed set of events that change routing decisions.

Every event has the envelope `type`, `seq` (its position in the log, from 1), `time` (Unix
seconds, when it was recorded), `actor` (who caused it: "poller", "config", "admin" or
"admin:<token name>") and an optional `reason`; then its own fields.

Events are values: never mutated once created. orjson serialises them as they are, in
field order; `from_dict` rebuilds one from its stored form. Replay rebuilds a million of
them, so they are plain (not frozen, not slotted) dataclasses whose attribute dict can be
the decoded JSON object itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from dispatcher.domain.errors import MalformedEvent, UnknownEventType

HEALTH_CAUSES = ("timeout", "no_responders", "bad_reply", "identity_mismatch", "draining")
"""Why a node was marked down: its status request timed out, nobody is subscribed to its
subject (the process is gone), the reply was malformed or out of range, the reply came
from another node, or the node says it is draining."""


@dataclass(kw_only=True)
class Event:
    type: str = ""  # each subclass sets its own, so stored events name their class
    seq: int = 0  # 0 until the log assigns it
    time: float = 0.0
    actor: str = "dispatcher"
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored form as a dict (orjson serialises the event itself faster)."""
        return asdict(self)

    @property
    def node_id(self) -> str | None:
        return getattr(self, "node", None)


@dataclass(kw_only=True)
class NodeAdded(Event):
    type: str = "node_added"
    node: str
    ip: str
    port: int
    weight: int


@dataclass(kw_only=True)
class NodeRemoved(Event):
    type: str = "node_removed"
    node: str


@dataclass(kw_only=True)
class NodeAddressChanged(Event):
    type: str = "node_address_changed"
    node: str
    ip: str
    port: int


@dataclass(kw_only=True)
class NodeWeightSet(Event):
    type: str = "node_weight_set"
    node: str
    weight: int


@dataclass(kw_only=True)
class NodeDrained(Event):
    type: str = "node_drained"
    node: str


@dataclass(kw_only=True)
class NodeUndrained(Event):
    type: str = "node_undrained"
    node: str


@dataclass(kw_only=True)
class NodeUp(Event):
    type: str = "node_up"
    node: str


@dataclass(kw_only=True)
class NodeDown(Event):
    type: str = "node_down"
    node: str
    cause: str  # one of HEALTH_CAUSES
    detail: str = ""


@dataclass(kw_only=True)
class LoadReported(Event):
    """A pulled load figure that moved enough to change routing (see `decisions`)."""

    type: str = "load_reported"
    node: str
    connections: int
    capacity: int


@dataclass(kw_only=True)
class NodeOverloaded(Event):
    """Reported connections / capacity reached the high watermark."""

    type: str = "node_overloaded"
    node: str
    connections: int
    capacity: int
    high_watermark: float


@dataclass(kw_only=True)
class NodeRecovered(Event):
    """Reported connections / capacity fell below the low watermark."""

    type: str = "node_recovered"
    node: str
    connections: int
    capacity: int
    low_watermark: float


@dataclass(kw_only=True)
class ConfigReloaded(Event):
    """The configuration in force from now on; later config changes are diffed against it.

    `config` is the normalised configuration (plain data); its `balance` table sets the
    watermarks. Node changes it implies are separate events recorded just before it.
    """

    type: str = "config_reloaded"
    source: str
    config: dict[str, Any]


@dataclass(kw_only=True)
class PollingPaused(Event):
    """The dispatcher lost NATS: no node is judged until it is back (none is marked down
    for it), and clients get the last known state."""

    type: str = "polling_paused"


@dataclass(kw_only=True)
class PollingResumed(Event):
    type: str = "polling_resumed"


@dataclass(kw_only=True)
class LeaderElected(Event):
    """Cluster mode: from here on `leader` (a replica's worker) polls and records what it
    sees. The stream's expected last sequence makes this the fence: a deposed leader's
    next append was decided on a state before this event, so the stream refuses it, and
    once it has read this event it decides nothing as leader."""

    type: str = "leader_elected"
    leader: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__dataclass_fields__["type"].default: cls
    for cls in (
        NodeAdded, NodeRemoved, NodeAddressChanged, NodeWeightSet, NodeDrained,
        NodeUndrained, NodeUp, NodeDown, LoadReported, NodeOverloaded, NodeRecovered,
        ConfigReloaded, PollingPaused, PollingResumed, LeaderElected,
    )
}


_FIELD_ORDER = {cls: tuple(f.name for f in fields(cls)) for cls in EVENT_TYPES.values()}
_new = object.__new__


def from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from its stored form.

    Fields are taken as stored: the log's checksums and hash chain vouch for them, and
    checking every value again would slow replay for nothing (the fold still refuses an
    event that does not fit the state).
    """
    try:
        cls = EVENT_TYPES[data["type"]]
        if tuple(data) == _FIELD_ORDER[cls]:  # as we wrote it: adopt the dict, no copy
            event = _new(cls)
            event.__dict__ = data
            return event
        return cls(**data)  # checks names: a missing or unknown field is a TypeError
    except KeyError:
        kind = data.get("type") if isinstance(data, dict) else None
        raise UnknownEventType(
            f"unknown event type {kind!r} at seq {_seq_of(data)}: written by a newer imdispatch?"
        ) from None
    except TypeError as exc:
        raise MalformedEvent(f"event at seq {_seq_of(data)}: {exc}") from None


def _seq_of(data: Any) -> Any:
    return data.get("seq") if isinstance(data, dict) else None
