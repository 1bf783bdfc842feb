"""Cluster mode (`[eventlog] backend = "jetstream"`): dispatcher replicas on several
machines are one dispatcher. Every worker of every replica is a member that folds the one
JetStream stream (`tail`), writes to it by optimistic appends (`writer`), and competes
for a lease (`lease`) whose holder alone polls the nodes (`member`)."""
