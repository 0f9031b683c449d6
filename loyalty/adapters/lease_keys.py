"""Every lease key of a job that is not a shard, in one place.

The keys share ShardLeases' lock namespace with the shards (0 .. shard_count - 1), so
they sit far above any shard number, and each job has a key of its own: two jobs on one
key exclude each other for as long as either runs (the webhook runner held retention's
key, so on PostgreSQL retention never ran beside it). ``tests/integration/test_leases.py``
holds each key and takes every other one."""

from __future__ import annotations

from typing import Final

PROJECTION_LEASE: Final = 1_000_001
FORGET_LEASE: Final = 1_000_002
RETENTION_LEASE: Final = 1_000_003
RELAY_LEASE: Final = 1_000_004
WEBHOOK_LEASE: Final = 1_000_005
EXPIRY_LEASE: Final = 1_000_019

JOB_LEASES: Final = {
    "projection": PROJECTION_LEASE,
    "forget": FORGET_LEASE,
    "retention": RETENTION_LEASE,
    "relay": RELAY_LEASE,
    "webhooks": WEBHOOK_LEASE,
    "expiry": EXPIRY_LEASE,
}
