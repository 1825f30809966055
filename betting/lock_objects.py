"""Row locks of the betting app, always taken in the same order: the event's gate (PostgreSQL),
the event row, then the global change-sequence row.

An event has two lock modes. Writers of the event (odds, finish, cancel) take it exclusively
(`FOR UPDATE`); a placement takes it shared (`FOR SHARE`, PostgreSQL). Shared locks do not
conflict with each other, so bets on one hot event run concurrently, while a writer waits for
the placements in flight and a placement waits for a writer in flight, then reads the row as the
writer committed it. (`FOR KEY SHARE` would not do: it does not conflict with the
`FOR NO KEY UPDATE` of a plain UPDATE.)

Row locks alone would let a writer starve: PostgreSQL admits a new share locker while an
exclusive one waits, so under a steady stream of placements a finish waits for a moment with
none in flight. So each side first takes the event's gate, a transaction-scoped advisory lock
in the same mode: the lock manager queues requests in order, so placements arriving after a
waiting writer wait behind it, and the writer gets in as soon as the placements before it end.
Advisory keys are 64-bit hashes of the event id; a collision only makes two events share a gate.
SQLite has neither (its writers exclude each other already).
"""

from django.db import connection

from betting.models import ChangeSequence, Event

#: Placement's shared hold on one event, as a query for a CTE (PostgreSQL only; Django has no
#: FOR SHARE). Parameter `event_id`; yields the `state`, `deadline` and `coefficient` the lock
#: protects, as the last writer committed them. The one-time filter takes the gate (shared)
#: before the scan, hence before the row lock.
EVENT_FOR_SHARE_SQL = (
    "SELECT state, deadline, coefficient FROM betting_event WHERE id = %(event_id)s AND"
    " (SELECT pg_advisory_xact_lock_shared(hashtextextended('betting.event:' || %(event_id)s, 0)))"
    " IS NOT NULL FOR SHARE"
)


def event_for_update(*, event_id: str) -> Event | None:
    """The event row locked exclusively until commit (writers of the event), its gate first:
    it waits for every placement holding the event, and none proceeds until it commits.
    None when there is no such event. Call inside a transaction."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('betting.event:' || %s, 0))",
                [event_id],
            )
    return Event.objects.select_for_update().filter(pk=event_id).first()


#: PostgreSQL notification channel on which every committed change announces its sequence
#: (payload: the sequence as decimal text). NOTIFY is delivered at commit, in commit order, to
#: the listeners of the same database; each line-provider copy listens to learn at once of
#: changes made elsewhere (`grpc.feed.ChangeFeed`). The change log stays the source of truth.
CHANGES_CHANNEL = "betting_changes"

#: The sequence row (`ChangeSequence`, created by the first change) bumped, locked to commit,
#: and the NOTIFY queued, in one round trip.
_SEQUENCE_NEXT_PG = (
    "INSERT INTO betting_changesequence (id, value) VALUES (1, 1)"
    " ON CONFLICT (id) DO UPDATE SET value = betting_changesequence.value + 1"
    " RETURNING value, pg_notify(%s, value::text)"
)


def change_sequence_next() -> int:
    """Take the next global sequence number; the row lock is held until commit, so numbers
    commit in order and without gaps. On PostgreSQL the same statement queues a NOTIFY on
    `CHANGES_CHANNEL` with the number, sent only if and when the transaction commits."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_SEQUENCE_NEXT_PG, [CHANGES_CHANNEL])
            row = cursor.fetchone()
        assert row is not None
        return int(row[0])
    counter, _ = ChangeSequence.objects.select_for_update().get_or_create(id=1)
    counter.value += 1
    counter.save(update_fields=["value"])
    return counter.value
