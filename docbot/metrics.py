"""Prometheus metrics of docbot (exported by /metrics and by run_docbot's metrics port), and
the users in an active dialog (`dialogs_active`, the operator console's gauge)."""

import time

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

#: A user counts as in an active dialog this long after their last served update.
DIALOG_ACTIVE_SECONDS = 300.0
_PRUNE_EVERY = 60.0
_dialogs_seen: dict[int, float] = {}
_dialogs_pruned_at = [0.0]


def dialog_seen(user_id: int) -> None:
    """Note that this process served `user_id` now (the bot's middleware, each served update).
    Memory only, no lock (one dict store; entries older than DIALOG_ACTIVE_SECONDS are pruned
    at most once a minute, from a copy)."""
    now = time.monotonic()
    _dialogs_seen[user_id] = now
    if now - _dialogs_pruned_at[0] >= _PRUNE_EVERY:
        _dialogs_pruned_at[0] = now
        cutoff = now - DIALOG_ACTIVE_SECONDS
        for user, seen in list(_dialogs_seen.items()):
            if seen < cutoff and _dialogs_seen.get(user) == seen:
                _dialogs_seen.pop(user, None)


def dialogs_active() -> int:
    """Distinct users this process served in the last DIALOG_ACTIVE_SECONDS: the console's
    `docbot.dialogs` gauge (summed over the live processes; a user whose updates two web
    workers served counts in both). Cheap and thread-safe: it reads a copy."""
    cutoff = time.monotonic() - DIALOG_ACTIVE_SECONDS
    return sum(1 for seen in list(_dialogs_seen.values()) if seen >= cutoff)
