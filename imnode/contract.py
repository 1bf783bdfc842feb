"""What a node is, as both programs must agree: imnode checks what it advertises, the
dispatcher checks its config, its admin API and the nodes' NATS status replies, all with
these rules (one home; no copies to drift apart)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
"""Node ids are NATS subject tokens (`imnode.<id>.status`): no dots, spaces or wildcards."""

SHOWN = 64  # characters of a refused value repeated in an error (never 60 kB of it)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # a source only, never a destination
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated (RFC 4291): ::a.b.c.d
EMBEDDING_IPV4 = (ipaddress.ip_network("64:ff9b::/96"),  # NAT64 (RFC 6052)
                  ipaddress.ip_network("::ffff:0:0:0/96"))  # SIIT (RFC 7915)


def _why_not(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a client cannot be sent to `address`, or None if it can."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            # It names an interface of the host that reads it; a phone has other ones.
            return "a scope id names an interface of this host, not one a client has"
        if address.ipv4_mapped is not None:
            return _why_not(address.ipv4_mapped)
        if address in IPV4_COMPATIBLE and not (address.is_loopback or address.is_unspecified):
            return "the deprecated IPv4-compatible form ::a.b.c.d"
        for prefix in EMBEDDING_IPV4:  # judged by the IPv4 address a translator reaches
            if address in prefix:
                return _why_not(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.is_unspecified:
        return "unspecified: it means every interface, not one a client can reach"
    if address.is_multicast:
        return "multicast"
    if address.is_link_local:
        return "link-local: reachable on one link only, not from a phone"
    if isinstance(address, ipaddress.IPv4Address):
        if address in THIS_NETWORK:
            return "in 0.0.0.0/8, a source address, never a destination"
        if address.is_reserved:
            return "broadcast or reserved: in 240.0.0.0/4"
    return None


def node_address(value: Any) -> str:
    """`value` as the address clients are sent to, in its canonical form: an IP address
    (clients get no DNS lookup), unicast and specified, without an IPv6 scope id. Raises
    ValueError saying why not (the caller names the field)."""
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            f"must be an IP address (clients get no DNS lookup), got {_shown(value)}"
        ) from None
    why = _why_not(address)
    if why is not None:
        raise ValueError(
            f"must be a unicast address a client can connect to, got {_shown(value)} ({why})"
        )
    return str(address)


def host_port(host: str, port: int) -> str:
    """How an address and port are written: "10.0.0.1:9001", "[2001:db8::1]:9001"."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
