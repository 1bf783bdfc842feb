"""The IM node: a TCP long-connection server that answers status requests over NATS."""
