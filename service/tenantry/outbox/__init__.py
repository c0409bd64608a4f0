"""The outbox: the append-only event log every other component follows."""
