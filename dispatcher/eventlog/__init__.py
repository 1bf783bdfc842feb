"""Event log backends: the append-only record of every routing state change.

`filelog.FileLog` (segment files on local disk, the embedded default) and
`jetstream.JetStreamLog` (a NATS JetStream stream, for several dispatcher replicas) share
one record format (`records`) and one interface (`base.EventLog`).
"""
