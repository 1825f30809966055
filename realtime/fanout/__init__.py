"""The messenger's outbound fan-out, node-local: the hub (`hub`), the per-connection outbox
(`outbox`), presence (`presence`), the per-user frame limit (`limits`), the recent-frames cache
(`recent`) and the Redis client options they share (`redis_clients`).

Each process keeps its own sockets indexed by room and by user and writes each event to them
once; with REDIS_URL every process receives every event once through one Redis pub/sub channel.
Presence is per room and counts a user once however many sockets they have: this process's
memory without Redis, global with it. See each module for its contract.
"""

from realtime.fanout.hub import DELIVERIES, EVENTS, Connection, FanoutHub, hub
from realtime.fanout.outbox import SLOW_CLIENTS, Outbox, Send, dumps, dumps_with_encoded
from realtime.fanout.presence import (
    OnlineUser,
    PresenceUnavailable,
    member_key,
    member_parse,
    presence_snapshot_frame,
)

__all__ = [
    "DELIVERIES",
    "EVENTS",
    "SLOW_CLIENTS",
    "Connection",
    "FanoutHub",
    "OnlineUser",
    "Outbox",
    "PresenceUnavailable",
    "Send",
    "dumps",
    "dumps_with_encoded",
    "hub",
    "member_key",
    "member_parse",
    "presence_snapshot_frame",
]
