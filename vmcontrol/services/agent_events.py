"""The batched agent events: what agent connections do to the database, applied by the TCP
server's event writer (`sessions.ServerState`) as one transaction per batch, set-based per kind:
enroll, auth, inventory, deauth (logout) and end; and the heartbeats (last-seen times) it
collects in memory and flushes every few seconds."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.utils import timezone

from vmcontrol.limits import FailureLimiter
from vmcontrol.models import AgentSession, VirtualMachine, VmStatus
from vmcontrol.protocol import RATE_LIMITED, Inventory
from vmcontrol.services.tokens import token_matches
from vmcontrol.services.vms import AuthFailed, StatusChange, disks_replace, vm_enroll

logger = structlog.get_logger(__name__)


@dataclass
class AgentEvent:
    """One thing that happened on an agent connection, in the order it happened. Nothing a
    connection does before a successful `auth` or `enroll` becomes an event except the attempt
    itself: an unauthenticated connection writes no row and changes no VM."""

    kind: str
    """enroll | auth | inventory | deauth | end"""
    session_id: uuid.UUID
    vm_id: int | None = None
    peer: str = ""
    """`ip:port` as the socket gave it (stored on the session row)"""
    peer_key: str = ""
    """the failed-attempt limiter's key for the peer (`limits.peer_key`)"""
    started_at: datetime | None = None
    """when the connection was accepted (the session row's start, written at `auth`)"""
    token: str = ""
    secret: str = ""
    name: str = ""
    inventory: Inventory | None = None
    reason: str = ""
    at: datetime = field(default_factory=timezone.now)


@dataclass
class AgentEventResult:
    """What a waiting connection learns about its event: `ok`, and for `enroll` the new VM id
    and raw token, for `auth` the VM id; a refusal has `error` (`auth_failed`,
    `rate_limited`)."""

    ok: bool = True
    vm_id: int | None = None
    token: str = ""
    error: str = ""
    retry_after: float = 0.0
    """seconds, with error `rate_limited`: the peer is locked out and was not checked"""


PHASES = ("enroll", "auth", "inventory", "deauth", "end")


def agent_events_apply(
    *,
    server_name: str,
    events: Sequence[AgentEvent],
    limiter: FailureLimiter | None = None,
) -> tuple[list[AgentEventResult], list[StatusChange]]:
    """Apply a batch of agent events in one transaction, set-based per kind.

    Kinds are applied in lifecycle order (enroll, auth, ..., end): a session's later event is
    only queued after its earlier one, so this keeps each session's order. Status writes are
    conditional on `current_session_id`, so an old connection closing never touches the VM a
    newer connection holds. A successful `auth` writes the session row (accept time, peer).

    `enroll` and `auth` are judged one after another against `limiter` (when given): a peer
    that is locked out gets `rate_limited` without its secret or token being looked at, and
    every refused credential is charged to its peer before the next attempt is judged, so a
    burst of concurrent guesses from many connections cannot outrun the limit. (A batch that
    fails and is applied again event by event charges its failures again: the limit errs on
    the strict side.) Returns one result per event and the status changes to publish (one per
    VM, the last).

    Call from the event writer's single thread: events of one server are applied in queue order
    and never concurrently; rows are not locked, since every write is conditional. Idempotent
    per kind where replayed (an `end` twice, a repeated `auth` of the same session) but not
    for `enroll`, which adds a VM. A refused credential is a result, not an exception; a
    database failure raises (DatabaseError, IntegrityError) and rolls the whole batch back.
    """
    results = [AgentEventResult() for _ in events]
    changes: dict[int, StatusChange] = {}
    by_kind: dict[str, list[int]] = {kind: [] for kind in PHASES}
    for index, event in enumerate(events):
        by_kind[event.kind].append(index)
    with transaction.atomic():
        for i in by_kind["enroll"]:
            results[i] = _apply_enroll(events[i], limiter)
        if by_kind["auth"]:
            _apply_auths(server_name, events, by_kind["auth"], results, changes, limiter)
        if by_kind["inventory"]:
            _disks_and_specs_apply(
                {events[i].vm_id: events[i].inventory for i in by_kind["inventory"]}  # type: ignore[misc]
            )
        for i in by_kind["deauth"]:
            _apply_deauth(events[i], changes)
        if by_kind["end"]:
            _apply_ends(events, by_kind["end"], changes)
    return results, list(changes.values())


AgentEventOutcome = AgentEventResult | Exception


def agent_events_apply_isolated(
    *,
    server_name: str,
    events: Sequence[AgentEvent],
    limiter: FailureLimiter | None = None,
) -> tuple[list[AgentEventOutcome], list[StatusChange]]:
    """Apply a batch like `agent_events_apply`, so that a poison event hurts only itself.

    The batch is tried in one transaction; if that fails, every event is applied again alone,
    in queue order (which keeps each session's order), each in its own transaction. Returns one
    outcome per event (its result, or the exception that event raised alone) and the status
    changes of everything that was applied, so every auth and end of a failed batch is still
    applied and answered. Raises nothing an event raised (each is its outcome)."""
    try:
        results, changes = agent_events_apply(
            server_name=server_name, events=events, limiter=limiter
        )
    except Exception as error:
        if len(events) == 1:
            return [error], []
        logger.warning("vmcontrol_event_batch_split", size=len(events), error=type(error).__name__)
    else:
        return list(results), changes
    outcomes: list[AgentEventOutcome] = []
    merged: dict[int, StatusChange] = {}
    for event in events:
        try:
            (result,), event_changes = agent_events_apply(
                server_name=server_name, events=[event], limiter=limiter
            )
        except Exception as error:
            outcomes.append(error)
            # A connection broken by the failure is replaced rather than failing the rest.
            close_old_connections()
            continue
        outcomes.append(result)
        for change in event_changes:
            merged.pop(change["vm_id"], None)
            merged[change["vm_id"]] = change
    return outcomes, list(merged.values())


def _locked_out(event: AgentEvent, limiter: FailureLimiter | None) -> AgentEventResult | None:
    if limiter is None:
        return None
    wait = limiter.retry_after(event.peer_key)
    if wait <= 0:
        return None
    return AgentEventResult(ok=False, error=RATE_LIMITED, retry_after=wait)


def _charge(event: AgentEvent, limiter: FailureLimiter | None) -> None:
    logger.info(
        "vmcontrol_auth_failed", kind=event.kind, peer=event.peer, vm_id=event.vm_id or None
    )
    if limiter is not None:
        limiter.failed(event.peer_key)


def _apply_enroll(event: AgentEvent, limiter: FailureLimiter | None) -> AgentEventResult:
    refused = _locked_out(event, limiter)
    if refused is not None:
        return refused
    assert event.inventory is not None
    try:
        with transaction.atomic():
            vm, raw = vm_enroll(secret=event.secret, name=event.name, inventory=event.inventory)
    except AuthFailed as error:
        _charge(event, limiter)
        return AgentEventResult(ok=False, error=error.code)
    return AgentEventResult(vm_id=vm.pk, token=raw)


def _disks_and_specs_apply(inventories: dict[int, Inventory]) -> None:
    """The reported CPU, RAM and disks become the stored facts (`inventory` events)."""
    vms = list(VirtualMachine.objects.filter(pk__in=inventories.keys()))
    for vm in vms:
        vm.cpu_cores = inventories[vm.pk].cpu_cores
        vm.ram_mb = inventories[vm.pk].ram_mb
    _bulk_set(VirtualMachine, vms, ["cpu_cores", "ram_mb"])
    disks_replace({vm.pk: inventories[vm.pk] for vm in vms})


def _apply_auths(
    server_name: str,
    events: Sequence[AgentEvent],
    indexes: list[int],
    results: list[AgentEventResult],
    changes: dict[int, StatusChange],
    limiter: FailureLimiter | None,
) -> None:
    """Verify tokens (constant time, limited per peer) and make each accepted session its VM's
    authorized one (`_authorize`)."""
    vms = {
        vm.pk: vm for vm in VirtualMachine.objects.filter(pk__in={events[i].vm_id for i in indexes})
    }
    accepted: dict[int, AgentEvent] = {}
    for i in indexes:
        event = events[i]
        result = results[i] = _judge_auth(event, vms.get(event.vm_id or 0), limiter)
        if result.vm_id is not None:
            # The last of two auths for one VM in a batch wins; the earlier gets replaced.
            accepted[result.vm_id] = event
    if accepted:
        _authorize(server_name, vms, accepted, changes)


def _judge_auth(
    event: AgentEvent, vm: VirtualMachine | None, limiter: FailureLimiter | None
) -> AgentEventResult:
    """`rate_limited` unchecked while the peer is locked out; else the token against the VM's
    hash in constant time (an unknown VM compares against a stand-in), a refusal charged to
    the peer."""
    refused = _locked_out(event, limiter)
    if refused is not None:
        return refused
    matched = token_matches(event.token, vm.token_hash if vm is not None else "")
    if not matched or vm is None:
        _charge(event, limiter)
        return AgentEventResult(ok=False, error=AuthFailed.code)
    return AgentEventResult(vm_id=vm.pk)


def _authorize(
    server_name: str,
    vms: dict[int, VirtualMachine],
    accepted: dict[int, AgentEvent],
    changes: dict[int, StatusChange],
) -> None:
    """Make each accepted session its VM's authorized one: the session row is written (or
    updated, after a logout) and the reported inventory replaces the stored facts."""
    inventories: dict[int, Inventory] = {}
    to_save = []
    for vm_id, event in accepted.items():
        vm = vms[vm_id]
        vm.status = VmStatus.AUTHORIZED
        vm.current_session_id = event.session_id
        vm.authorized_at = event.at
        vm.last_seen_at = event.at
        vm.first_connected_at = vm.first_connected_at or event.at
        if event.inventory is not None:
            vm.cpu_cores = event.inventory.cpu_cores
            vm.ram_mb = event.inventory.ram_mb
            inventories[vm_id] = event.inventory
        to_save.append(vm)
        changes[vm_id] = {"vm_id": vm_id, "status": VmStatus.AUTHORIZED}
    _bulk_set(
        VirtualMachine,
        to_save,
        [
            "status",
            "current_session_id",
            "authorized_at",
            "last_seen_at",
            "first_connected_at",
            "cpu_cores",
            "ram_mb",
        ],
    )
    disks_replace(inventories)
    AgentSession.objects.bulk_create(
        [
            AgentSession(
                id=event.session_id,
                vm_id=vm_id,
                server_name=server_name,
                peer=event.peer[:128],
                started_at=event.started_at or event.at,
                authorized_at=event.at,
            )
            for vm_id, event in accepted.items()
        ],
        update_conflicts=True,
        unique_fields=["id"],
        update_fields=["vm_id", "authorized_at"],
    )


def _apply_deauth(event: AgentEvent, changes: dict[int, StatusChange]) -> None:
    """The session logged out: its VM goes back to `connected` if this session still holds it."""
    if event.vm_id is None:
        return
    updated = VirtualMachine.objects.filter(
        pk=event.vm_id, current_session_id=event.session_id, status=VmStatus.AUTHORIZED
    ).update(status=VmStatus.CONNECTED)
    if updated:
        changes[event.vm_id] = {"vm_id": event.vm_id, "status": VmStatus.CONNECTED}


def _apply_ends(
    events: Sequence[AgentEvent], indexes: list[int], changes: dict[int, StatusChange]
) -> None:
    # Only sessions that authorized have a row (the connection sends `end` for those alone).
    ended = [
        AgentSession(id=e.session_id, ended_at=e.at, end_reason=e.reason)
        for e in (events[i] for i in indexes)
    ]
    _bulk_set(AgentSession, ended, ["ended_at", "end_reason"])
    session_ids = [events[i].session_id for i in indexes]
    dropped = list(
        VirtualMachine.objects.filter(current_session_id__in=session_ids)
        .exclude(status=VmStatus.OFFLINE)
        .values_list("pk", flat=True)
    )
    if dropped:
        VirtualMachine.objects.filter(pk__in=dropped, current_session_id__in=session_ids).update(
            status=VmStatus.OFFLINE, current_session_id=None, last_seen_at=timezone.now()
        )
        for vm_id in dropped:
            changes[vm_id] = {"vm_id": vm_id, "status": VmStatus.OFFLINE}


def last_seen_flush(*, seen: dict[int, datetime]) -> int:
    """Write heartbeats collected in memory (`seen`: VM id → time of its last ping, aware):
    one UPDATE per distinct second, not per ping. Returns how many rows were updated.
    Idempotent (writing the same times again changes nothing).

    A statement that fails is retried VM by VM, so one VM's row the database refuses does not
    cost the others their last-seen time; the VMs that still fail are logged and skipped
    (DatabaseError is not raised; a lost connection is)."""
    by_time: dict[datetime, list[int]] = {}
    for vm_id, at in seen.items():
        by_time.setdefault(at.replace(microsecond=0), []).append(vm_id)
    updated = 0
    failed: list[int] = []
    for at, vm_ids in by_time.items():
        try:
            with transaction.atomic():
                updated += VirtualMachine.objects.filter(pk__in=vm_ids).update(last_seen_at=at)
            continue
        except DatabaseError:
            if len(vm_ids) == 1:
                failed.extend(vm_ids)
                continue
        for vm_id in vm_ids:
            try:
                with transaction.atomic():
                    updated += VirtualMachine.objects.filter(pk=vm_id).update(last_seen_at=at)
            except DatabaseError:
                failed.append(vm_id)
    if failed:
        logger.error("vmcontrol_last_seen_failed", vm_ids=failed[:100], count=len(failed))
    return updated


def _bulk_set(model: Any, objs: Sequence[Any], fields: list[str]) -> None:
    """`bulk_update` for hot batches: on PostgreSQL one `UPDATE ... FROM (VALUES ...)` per
    thousand rows (Django's CASE-per-row form costs milliseconds per row at this size)."""
    if not objs:
        return
    if connection.vendor != "postgresql":
        model.objects.bulk_update(objs, fields, batch_size=500)
        return
    meta = model._meta
    columns = [meta.pk, *(meta.get_field(name) for name in fields)]
    names = ", ".join(f'"{c.column}"' for c in columns)
    sets = ", ".join(f'"{c.column}" = v."{c.column}"' for c in columns[1:])
    row = "(" + ", ".join(f"%s::{c.db_type(connection)}" for c in columns) + ")"
    with connection.cursor() as cursor:
        for start in range(0, len(objs), 1000):
            chunk = objs[start : start + 1000]
            params = [
                c.get_db_prep_value(getattr(obj, c.attname), connection)
                for obj in chunk
                for c in columns
            ]
            # Identifiers come from model metadata; every value is a bound parameter.
            sql = (
                f'UPDATE "{meta.db_table}" AS t SET {sets} FROM (VALUES '  # noqa: S608
                + ", ".join([row] * len(chunk))
                + f') AS v({names}) WHERE t."{meta.pk.column}" = v."{meta.pk.column}"'
            )
            cursor.execute(sql, params)
