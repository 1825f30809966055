"""Prometheus metrics of docbot (exported by /metrics and by run_docbot's metrics port)."""

from prometheus_client import Counter

UPDATES = Counter(
    "docbot_updates_total",
    "Telegram updates seen by the bot middleware (rate() gives updates per second), by outcome",
    ["mode", "outcome"],
)
QUEUE_SENT = Counter(
    "docbot_queue_messages_sent_total", "Messages docbot sent to the task queue", ["task"]
)
QUEUE_CONSUMED = Counter(
    "docbot_queue_messages_consumed_total",
    "Messages docbot workers consumed from the task queue, by outcome",
    ["task", "outcome"],
)
