"""The dispatcher's domain: events, the routing state they fold into, and the decisions
that turn observations into events. Pure and synchronous: no I/O, no clock, no asyncio."""
