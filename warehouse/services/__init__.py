"""Warehouse writes, by topic: the ingest pipeline (`ingest`, one transaction per batch, with
its set-based statements in `ledger_sql`), dead-letter replay (`dead_letters`), the stock
rebuild (`stock`) and the consumer heartbeat (`heartbeat`). Other apps and the doors import the
names below from `warehouse.services`."""

from warehouse.services.dead_letters import dead_letter_replay
from warehouse.services.heartbeat import (
    consumer_heartbeat_beat,
    consumer_heartbeat_clear,
    consumer_heartbeats_prune,
)
from warehouse.services.ingest import (
    STOCK_TOPIC,
    BatchResult,
    Body,
    Problem,
    movements_ingest,
    movements_ingest_isolated,
    movements_parse,
)
from warehouse.services.stock import stock_rebuild

__all__ = [
    "STOCK_TOPIC",
    "BatchResult",
    "Body",
    "Problem",
    "consumer_heartbeat_beat",
    "consumer_heartbeat_clear",
    "consumer_heartbeats_prune",
    "dead_letter_replay",
    "movements_ingest",
    "movements_ingest_isolated",
    "movements_parse",
    "stock_rebuild",
]
