"""Realtime writes, by topic: the live-event hub's publishing side (`events`), WebSocket tickets
(`tickets`), rooms and memberships (`rooms`) and messages (`messages`). Other apps and the doors
import the names below from `realtime.services`.

Other apps call `publish(topic, payload)` inside or outside a transaction; delivery happens after
commit and is at-most-once (a notification, never the only copy of a fact). Messenger frames go
out through the fan-out hub after commit too; the database is the copy clients `sync` from.
Errors raised are `common.exceptions` (`ApplicationError`) subclasses with a stable `code`.
"""

from realtime.services.events import apublish, publish, topic_register
from realtime.services.messages import (
    HistoryPage,
    membership_read_mark,
    message_moderate_delete,
    message_send,
    room_history,
    room_message_send,
    room_read_mark,
)
from realtime.services.rooms import (
    direct_get_or_create,
    membership_add,
    membership_remove,
    room_create,
    room_default,
    room_resolve,
)
from realtime.services.tickets import ticket_consume, ticket_issue, tickets_purge
from realtime.topics import TopicAccess

__all__ = [
    "HistoryPage",
    "TopicAccess",
    "apublish",
    "direct_get_or_create",
    "membership_add",
    "membership_read_mark",
    "membership_remove",
    "message_moderate_delete",
    "message_send",
    "publish",
    "room_create",
    "room_default",
    "room_history",
    "room_message_send",
    "room_read_mark",
    "room_resolve",
    "ticket_consume",
    "ticket_issue",
    "tickets_purge",
    "topic_register",
]
