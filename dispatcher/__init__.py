"""The dispatcher: get-tcp-ip over HTTP, status pulled over NATS, event-sourced state."""
