"""vmcontrol writes: registration and tokens, operator actions, the batched agent events the
TCP server applies (enroll, authorize, inventory, logout, disconnect, last seen) and the TCP
servers' leases (who owns live sessions; reaping the sessions of a server that died)."""

import asyncio
import hashlib
import hmac
import secrets
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from asgiref.sync import async_to_sync, sync_to_async
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import InMemoryChannelLayer, channel_layers, get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, OuterRef, Q
from django.db.models.functions import Now
from django.utils import timezone

from common.exceptions import Conflict, NotAuthenticated, NotFound, UpstreamTimeout
from realtime.services import TopicAccess, publish, topic_register
from vmcontrol import selectors
from vmcontrol.limits import FailureLimiter
from vmcontrol.models import (
    AgentSession,
    AuditEvent,
    Command,
    CommandStatus,
    Disk,
    ServerLease,
    SessionEndReason,
    VirtualMachine,
    VmStatus,
)
from vmcontrol.protocol import Disk as WireDisk
from vmcontrol.protocol import Inventory, ProtocolError, inventory_parse

logger = structlog.get_logger(__name__)

VMS_TOPIC = "vmcontrol.vms"
TOKEN_BYTES = 32
TOKEN_PREFIX = "vmc_"  # noqa: S105 - a public marker, not a secret
"""Marks a vmcontrol token (secret scanners can recognise it) and keeps it from starting with
`-`, which command lines would read as an option."""

Actor = AbstractBaseUser | AnonymousUser | None


class VmNotAuthorized(Conflict):
    code = "not_authorized"
    default_message = "The VM is not authorized (no agent session holds it)."


class AuthFailed(NotAuthenticated):
    code = "auth_failed"
    default_message = "Unknown VM or wrong, revoked or rotated token."


class AgentTimeout(UpstreamTimeout):
    code = "agent_timeout"
    default_message = "The agent did not acknowledge in time."


class CommandFailed(Conflict):
    code = "command_failed"
    default_message = "The agent refused the command."


def topics_register() -> None:
    topic_register(VMS_TOPIC, access=TopicAccess.STAFF)


def vm_group(vm_id: int) -> str:
    return f"vmcontrol.vm.{vm_id}"


# --- tokens -------------------------------------------------------------------------------


def token_hash(raw: str) -> str:
    # sha256 suffices: the token is 32 random bytes, so there is nothing to brute-force.
    return hashlib.sha256(raw.encode()).hexdigest()


def token_generate() -> tuple[str, str]:
    """A new raw token (shown once): `vmc_` and 32 random bytes in URL-safe base64, and the
    hash that is stored."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    return raw, token_hash(raw)


_NO_HASH = "0" * 64
"""Stands in for a missing hash so a refusal does the same work as a comparison."""


def token_matches(raw: str, stored_hash: str) -> bool:
    """Constant time: the raw token's sha256 hex digest is compared with `hmac.compare_digest`
    against the stored one, or against a stand-in of the same length when there is none (an
    unknown VM is passed as "", a revoked one has ""), so every refusal does the same work.
    An empty `stored_hash` never matches."""
    matched = hmac.compare_digest(token_hash(raw), stored_hash or _NO_HASH)
    return matched and bool(stored_hash)


def secret_matches(given: str, expected: str) -> bool:
    """Constant time whatever the lengths: both secrets' sha256 digests (32 bytes each) are
    compared with `hmac.compare_digest`. An empty `expected` (enrollment off) never matches."""
    matched = hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )
    return matched and bool(expected)


# --- helpers --------------------------------------------------------------------------------


def _actor_id(actor: Actor) -> int | None:
    return actor.pk if actor is not None and actor.is_authenticated else None


def _audit(*, actor: Actor, vm_id: int | None, action: str, **details: Any) -> None:
    AuditEvent.objects.create(
        actor_id=_actor_id(actor), vm_id=vm_id, action=action, details=details
    )


def _status_event(vm: VirtualMachine) -> dict[str, Any]:
    return {"vm_id": vm.pk, "status": vm.status, "name": vm.name}


def _layer_send_now(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    assert layer is not None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        async_to_sync(layer.group_send)(group, message)
    else:  # pragma: no cover - services are called from sync code
        raise RuntimeError("call from sync code")


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


def _vm_for_update(vm_id: int) -> VirtualMachine:
    try:
        return VirtualMachine.objects.select_for_update().get(pk=vm_id)
    except VirtualMachine.DoesNotExist:
        raise NotFound(f"VM {vm_id} does not exist.", code="vm_not_found") from None


def _disks_replace(vm_ids_inventories: dict[int, Inventory]) -> None:
    """Make each VM's disks equal to its inventory, matching by name so existing disks keep
    their server-assigned ids; three set-based statements for the whole batch."""
    if not vm_ids_inventories:
        return
    existing: dict[tuple[int, str], Disk] = {
        (d.vm_id, d.name): d for d in Disk.objects.filter(vm_id__in=vm_ids_inventories.keys())
    }
    wanted: set[tuple[int, str]] = set()
    to_create: list[Disk] = []
    to_update: list[Disk] = []
    for vm_id, inventory in vm_ids_inventories.items():
        for disk in inventory.disks:
            key = (vm_id, disk.name)
            wanted.add(key)
            current = existing.get(key)
            if current is None:
                to_create.append(Disk(vm_id=vm_id, name=disk.name, size_gb=disk.size_gb))
            elif current.size_gb != disk.size_gb:
                current.size_gb = disk.size_gb
                to_update.append(current)
    stale = [d.pk for key, d in existing.items() if key not in wanted]
    if stale:
        Disk.objects.filter(pk__in=stale).delete()
    if to_update:
        Disk.objects.bulk_update(to_update, ["size_gb"])
    if to_create:
        Disk.objects.bulk_create(to_create)


# --- operator actions -----------------------------------------------------------------------


@transaction.atomic
def vm_register(
    *,
    name: str,
    cpu_cores: int = 1,
    ram_mb: int = 512,
    disks: Sequence[WireDisk] = (),
    actor: Actor = None,
) -> tuple[VirtualMachine, str]:
    """Add a VM; returns it and its raw token, which is never retrievable again."""
    raw, hashed = token_generate()
    vm = VirtualMachine.objects.create(
        name=name,
        cpu_cores=cpu_cores,
        ram_mb=ram_mb,
        token_hash=hashed,
        registered_by_id=_actor_id(actor),
    )
    _disks_replace({vm.pk: Inventory(cpu_cores=cpu_cores, ram_mb=ram_mb, disks=tuple(disks))})
    _audit(actor=actor, vm_id=vm.pk, action="vm.registered", name=name)
    return vm, raw


def vm_enroll(*, secret: str, name: str, inventory: Inventory) -> tuple[VirtualMachine, str]:
    """Agent self-registration with the shared enrollment secret (disabled when unset)."""
    if not secret_matches(secret, settings.VMCONTROL_ENROLL_SECRET):
        raise AuthFailed("Enrollment refused.", code="enroll_failed")
    vm, raw = vm_register(
        name=name, cpu_cores=inventory.cpu_cores, ram_mb=inventory.ram_mb, disks=inventory.disks
    )
    AuditEvent.objects.create(vm_id=vm.pk, action="vm.enrolled", details={"name": name})
    return vm, raw


def _live_authorized(vm: VirtualMachine) -> bool:
    """Authorized by a session whose server is alive (a killed server's VMs are offline)."""
    return (
        vm.status == VmStatus.AUTHORIZED
        and selectors.vm_live_status(vm_id=vm.pk) == VmStatus.AUTHORIZED
    )


def _kick(vm_id: int, reason: str) -> None:
    transaction.on_commit(
        lambda: _layer_send_now(vm_group(vm_id), {"type": "vm.logout", "reason": reason})
    )


@transaction.atomic
def vm_token_rotate(*, vm_id: int, actor: Actor = None) -> str:
    """Issue a new token; the old one stops working and a live session must authorize again."""
    vm = _vm_for_update(vm_id)
    raw, vm.token_hash = token_generate()
    was_authorized = _live_authorized(vm)
    if was_authorized:
        vm.status = VmStatus.CONNECTED
    vm.save(update_fields=["token_hash", "status", "updated_at"])
    _audit(actor=actor, vm_id=vm.pk, action="vm.token_rotated")
    if was_authorized:
        publish(VMS_TOPIC, _status_event(vm))
    _kick(vm.pk, "token_rotated")
    return raw


@transaction.atomic
def vm_token_revoke(*, vm_id: int, actor: Actor = None) -> VirtualMachine:
    """Revoke the token: no agent can authorize as this VM until a rotate."""
    vm = _vm_for_update(vm_id)
    vm.token_hash = ""
    was_authorized = _live_authorized(vm)
    if was_authorized:
        vm.status = VmStatus.CONNECTED
    vm.save(update_fields=["token_hash", "status", "updated_at"])
    _audit(actor=actor, vm_id=vm.pk, action="vm.token_revoked")
    if was_authorized:
        publish(VMS_TOPIC, _status_event(vm))
    _kick(vm.pk, "token_revoked")
    return vm


@transaction.atomic
def vm_logout(*, vm_id: int, actor: Actor = None) -> VirtualMachine:
    """Log an authorized VM out: it stays connected and must authorize again. 409 otherwise
    (also when the server holding its session is gone: `selectors.vm_live_status`)."""
    vm = _vm_for_update(vm_id)
    if not _live_authorized(vm):
        raise VmNotAuthorized()
    vm.status = VmStatus.CONNECTED
    vm.save(update_fields=["status", "updated_at"])
    _audit(actor=actor, vm_id=vm.pk, action="vm.logged_out")
    publish(VMS_TOPIC, _status_event(vm))
    _kick(vm.pk, "operator")
    return vm


def _command_create(*, vm_id: int, name: str, args: dict[str, Any], actor: Actor) -> Command:
    with transaction.atomic():
        vm = _vm_for_update(vm_id)
        if not _live_authorized(vm):
            raise VmNotAuthorized()
        command = Command.objects.create(
            vm=vm, name=name, args=args, created_by_id=_actor_id(actor)
        )
        _audit(actor=actor, vm_id=vm_id, action=f"command.{name}", command_id=str(command.pk))
    return command


def _command_mark_sent(command_id: uuid.UUID) -> None:
    Command.objects.filter(pk=command_id, status=CommandStatus.QUEUED).update(
        status=CommandStatus.SENT, sent_at=timezone.now()
    )


def _command_time_out(command_id: uuid.UUID) -> Command:
    """Claim the timeout with a conditional update; an answer that won the race is kept."""
    Command.objects.filter(
        pk=command_id, status__in=[CommandStatus.QUEUED, CommandStatus.SENT]
    ).update(status=CommandStatus.TIMED_OUT, finished_at=timezone.now())
    return Command.objects.get(pk=command_id)


_reply_layers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = (
    weakref.WeakKeyDictionary()
)


def _reply_layer() -> Any:
    """The layer to wait for an agent's answer on. A cross-process layer (Redis) gets one
    instance per event loop: channels_redis lets only one loop receive on an instance, and the
    console or a test may wait on another loop than the TCP server's consumers."""
    layer = get_channel_layer()
    assert layer is not None
    if isinstance(layer, InMemoryChannelLayer):
        return layer
    loop = asyncio.get_running_loop()
    own = _reply_layers.get(loop)
    if own is None:
        own = _reply_layers[loop] = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    return own


async def _command_push_and_wait(command: Command, wait: float) -> dict[str, Any] | None:
    layer = _reply_layer()
    reply_to = await layer.new_channel("vmcontrol.reply.")
    await layer.group_send(
        vm_group(command.vm_id),
        {
            "type": "vm.command",
            "command_id": str(command.pk),
            "name": command.name,
            "args": command.args,
            "reply_to": reply_to,
        },
    )
    # `sent` is bookkeeping: written while the agent works, off the round trip.
    marking = asyncio.create_task(
        sync_to_async(_command_mark_sent, thread_sensitive=False)(command.pk)
    )
    try:
        return dict(await asyncio.wait_for(layer.receive(reply_to), wait))
    except TimeoutError:
        return None
    finally:
        await marking


def command_run(
    *,
    vm_id: int,
    name: str,
    args: dict[str, Any],
    actor: Actor = None,
    timeout: float | None = None,
) -> Command:
    """Send a command to the VM's agent through the channel layer (group `vmcontrol.vm.<id>`)
    and wait for its outcome. 409 if the VM is not authorized, 504 when the agent does not
    answer within `timeout` (VMCONTROL_COMMAND_TIMEOUT); the command row records either."""
    command = _command_create(vm_id=vm_id, name=name, args=args, actor=actor)
    wait = settings.VMCONTROL_COMMAND_TIMEOUT if timeout is None else timeout
    reply = async_to_sync(_command_push_and_wait)(command, wait)
    if reply is None:
        command = _command_time_out(command.pk)
    else:
        command.status = reply["status"]
        command.error = reply.get("error")
    if command.status == CommandStatus.TIMED_OUT:
        raise AgentTimeout(details={"command_id": str(command.pk)})
    if command.status != CommandStatus.SUCCEEDED:
        error = command.error or {}
        if error.get("code") == "not_authorized":
            raise VmNotAuthorized(details={"command_id": str(command.pk)})
        raise CommandFailed(
            str(error.get("message") or CommandFailed.default_message),
            details={"command_id": str(command.pk), "error": error},
        )
    return command


def vm_update_specs(
    *,
    vm_id: int,
    cpu_cores: int | None = None,
    ram_mb: int | None = None,
    disks: Sequence[WireDisk] | None = None,
    actor: Actor = None,
    timeout: float | None = None,
) -> Command:
    """Push `update_specs` to the agent; the database changes only when the agent acknowledges
    (see `command_complete`). Unchanged fields are sent as they are now."""
    try:
        vm = VirtualMachine.objects.prefetch_related("disks").get(pk=vm_id)
    except VirtualMachine.DoesNotExist:
        raise NotFound(f"VM {vm_id} does not exist.", code="vm_not_found") from None
    target = Inventory(
        cpu_cores=vm.cpu_cores if cpu_cores is None else cpu_cores,
        ram_mb=vm.ram_mb if ram_mb is None else ram_mb,
        disks=tuple(WireDisk(name=d.name, size_gb=d.size_gb) for d in vm.disks.all())
        if disks is None
        else tuple(disks),
    )
    return command_run(
        vm_id=vm_id, name="update_specs", args=target.as_dict(), actor=actor, timeout=timeout
    )


@transaction.atomic
def command_complete(
    *,
    command_id: str,
    vm_id: int | None,
    ok: bool,
    data: dict[str, Any] | None,
    error: dict[str, Any] | None,
    name: str = "",
    args: dict[str, Any] | None = None,
    sent_at: datetime | None = None,
) -> str:
    """Record an agent's answer once: a conditional update from an open status, so a late
    answer after a timeout (or a duplicate) changes nothing. `sent_at` is when the connection
    wrote the command to the agent (None if it never did); it is stored with the answer, since
    a fast agent can answer before the operator's side has marked the command `sent`. An
    acknowledged `update_specs` writes the specs it carried (`args`, as sent). Returns the
    command's final status."""
    commands = Command.objects.filter(pk=command_id)
    if vm_id is not None:
        commands = commands.filter(vm_id=vm_id)
    final = CommandStatus.SUCCEEDED if ok else CommandStatus.FAILED
    answer: dict[str, Any] = {
        "status": final,
        "result": data,
        "error": error,
        "finished_at": timezone.now(),
    }
    if sent_at is not None:
        answer["sent_at"] = sent_at
    claimed = commands.filter(status__in=[CommandStatus.QUEUED, CommandStatus.SENT]).update(
        **answer
    )
    if not claimed:
        status = commands.values_list("status", flat=True).first()
        return str(status or "unknown")
    if ok and name == "update_specs" and vm_id is not None:
        try:
            inventory = inventory_parse(args, field="args")
        except ProtocolError:  # pragma: no cover - args were built from a valid Inventory
            return str(final)
        VirtualMachine.objects.filter(pk=vm_id).update(
            cpu_cores=inventory.cpu_cores, ram_mb=inventory.ram_mb, updated_at=timezone.now()
        )
        _disks_replace({vm_id: inventory})
        AuditEvent.objects.create(
            vm_id=vm_id, action="vm.specs_updated", details=inventory.as_dict()
        )
    return str(final)


# --- agent events (applied in batches by the TCP server) ------------------------------------


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
    ok: bool = True
    vm_id: int | None = None
    token: str = ""
    error: str = ""
    retry_after: float = 0.0
    """seconds, with error `rate_limited`: the peer is locked out and was not checked"""


RATE_LIMITED = "rate_limited"
PHASES = ("enroll", "auth", "inventory", "deauth", "end")


def agent_events_apply(
    *,
    server_name: str,
    events: Sequence[AgentEvent],
    limiter: FailureLimiter | None = None,
) -> tuple[list[AgentEventResult], list[dict[str, Any]]]:
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
    the strict side.) Returns one result per event and the status changes to publish.
    """
    results = [AgentEventResult() for _ in events]
    changes: dict[int, dict[str, Any]] = {}
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
            event = events[i]
            if event.vm_id is None:
                continue
            updated = VirtualMachine.objects.filter(
                pk=event.vm_id, current_session_id=event.session_id, status=VmStatus.AUTHORIZED
            ).update(status=VmStatus.CONNECTED)
            if updated:
                changes[event.vm_id or 0] = {"vm_id": event.vm_id, "status": VmStatus.CONNECTED}
        if by_kind["end"]:
            _apply_ends(events, by_kind["end"], changes)
    return results, list(changes.values())


AgentEventOutcome = AgentEventResult | Exception


def agent_events_apply_isolated(
    *,
    server_name: str,
    events: Sequence[AgentEvent],
    limiter: FailureLimiter | None = None,
) -> tuple[list[AgentEventOutcome], list[dict[str, Any]]]:
    """Apply a batch like `agent_events_apply`, so that a poison event hurts only itself.

    The batch is tried in one transaction; if that fails, every event is applied again alone,
    in queue order (which keeps each session's order), each in its own transaction. Returns one
    outcome per event (its result, or the exception that event raised alone) and the status
    changes of everything that was applied, so every auth and end of a failed batch is still
    applied and answered."""
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
    merged: dict[int, dict[str, Any]] = {}
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
    vms = list(VirtualMachine.objects.filter(pk__in=inventories.keys()))
    for vm in vms:
        vm.cpu_cores = inventories[vm.pk].cpu_cores
        vm.ram_mb = inventories[vm.pk].ram_mb
    _bulk_set(VirtualMachine, vms, ["cpu_cores", "ram_mb"])
    _disks_replace({vm.pk: inventories[vm.pk] for vm in vms})


def _apply_auths(
    server_name: str,
    events: Sequence[AgentEvent],
    indexes: list[int],
    results: list[AgentEventResult],
    changes: dict[int, dict[str, Any]],
    limiter: FailureLimiter | None,
) -> None:
    """Verify tokens (constant time, limited per peer) and make the session the VM's
    authorized one: its row is written (or updated, after a logout) and the reported inventory
    replaces the stored facts."""
    vms = {
        vm.pk: vm for vm in VirtualMachine.objects.filter(pk__in={events[i].vm_id for i in indexes})
    }
    accepted: dict[int, AgentEvent] = {}
    for i in indexes:
        event = events[i]
        refused = _locked_out(event, limiter)
        if refused is not None:
            results[i] = refused
            continue
        vm = vms.get(event.vm_id or 0)
        if not token_matches(event.token, vm.token_hash if vm is not None else ""):
            _charge(event, limiter)
            results[i] = AgentEventResult(ok=False, error=AuthFailed.code)
            continue
        assert vm is not None
        # The last of two auths for one VM in a batch wins; the earlier gets replaced.
        accepted[vm.pk] = event
        results[i] = AgentEventResult(vm_id=vm.pk)
    if not accepted:
        return
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
    _disks_replace(inventories)
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


def _apply_ends(
    events: Sequence[AgentEvent], indexes: list[int], changes: dict[int, dict[str, Any]]
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
    """Write heartbeats collected in memory: one UPDATE per distinct second, not per ping.

    A statement that fails is retried VM by VM, so one VM's row the database refuses does not
    cost the others their last-seen time; the VMs that still fail are logged and skipped."""
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


def _sessions_close(open_ids: list[uuid.UUID], reason: str) -> tuple[int, list[int]]:
    """End the given open sessions with `reason` and take the VMs they held offline; returns
    how many were closed and the ids of those VMs."""
    if not open_ids:
        return 0, []
    closed = AgentSession.objects.filter(pk__in=open_ids, ended_at__isnull=True).update(
        ended_at=timezone.now(), end_reason=reason
    )
    stale = Q(current_session_id__in=open_ids) & ~Q(status=VmStatus.OFFLINE)
    vm_ids = list(VirtualMachine.objects.filter(stale).values_list("pk", flat=True))
    VirtualMachine.objects.filter(pk__in=vm_ids, current_session_id__in=open_ids).update(
        status=VmStatus.OFFLINE, current_session_id=None
    )
    return closed, vm_ids


@transaction.atomic
def server_sessions_recover(*, server_name: str) -> tuple[int, list[dict[str, Any]]]:
    """At server start: close sessions a killed predecessor left open and take its VMs
    offline. Returns how many sessions were closed and the status changes."""
    open_ids = list(
        AgentSession.objects.filter(server_name=server_name, ended_at__isnull=True).values_list(
            "pk", flat=True
        )
    )
    closed, vm_ids = _sessions_close(open_ids, SessionEndReason.SERVER_CRASHED)
    if not closed:
        return 0, []
    AuditEvent.objects.create(
        action="server.sessions_recovered", details={"server": server_name, "sessions": closed}
    )
    return closed, [{"vm_id": vm_id, "status": VmStatus.OFFLINE} for vm_id in vm_ids]


# --- server leases (who owns live sessions) --------------------------------------------------


def _lease_expiry(ttl: float) -> ExpressionWrapper:
    # The database's clock on both sides (here and in selectors), so hosts' clocks never matter.
    return ExpressionWrapper(Now() + timedelta(seconds=ttl), output_field=DateTimeField())


@transaction.atomic
def server_lease_acquire(*, server_name: str, ttl: float, host: str = "", pid: int = 0) -> None:
    """Claim the lease `server_name` for `ttl` seconds (taking over a predecessor's row).
    Called at server start, after `server_sessions_recover` and before accepting agents."""
    now = timezone.now()
    ServerLease.objects.bulk_create(
        [
            ServerLease(
                name=server_name,
                host=host[:255],
                pid=pid,
                started_at=now,
                renewed_at=now,
                expires_at=now,
            )
        ],
        ignore_conflicts=True,
    )
    ServerLease.objects.filter(name=server_name).update(
        host=host[:255], pid=pid, started_at=Now(), renewed_at=Now(), expires_at=_lease_expiry(ttl)
    )


def server_lease_renew(*, server_name: str, ttl: float) -> bool:
    """Extend the lease by `ttl` seconds from now. False when the row is gone: another process
    reaped it after it expired (this server stalled or lost the database for longer than
    `ttl`), so the sessions it holds were closed and the caller must drop them."""
    return bool(
        ServerLease.objects.filter(name=server_name).update(
            renewed_at=Now(), expires_at=_lease_expiry(ttl)
        )
    )


def server_lease_release(*, server_name: str) -> None:
    """Clean stop: the server ended every session, its lease goes. A lease under which
    sessions are still open (their end could not be written, or another process runs under
    the same name) stays, to expire and be reaped."""
    still_open = AgentSession.objects.filter(server_name=OuterRef("name"), ended_at__isnull=True)
    ServerLease.objects.filter(name=server_name).exclude(Exists(still_open)).delete()


@transaction.atomic
def server_leases_reap(
    *, keep: str = "", publish_changes: bool = False
) -> tuple[int, list[dict[str, Any]]]:
    """Close the open sessions of every server whose lease expired (killed, frozen or cut off
    from the database) or that holds no lease at all, take their VMs offline and delete the
    expired leases. `keep` is the caller's own server name, never reaped. Safe to run from
    many processes at once (expired leases are claimed with SKIP LOCKED). Returns how many
    sessions were closed and the status changes (published after commit when
    `publish_changes`)."""
    dead = list(
        ServerLease.objects.select_for_update(skip_locked=True)
        .filter(expires_at__lte=Now())
        .exclude(name=keep)
        .values_list("name", flat=True)
    )
    orphaned = ~Q(server_name__in=ServerLease.objects.values("name"))
    open_sessions = (
        AgentSession.objects.filter(ended_at__isnull=True)
        .filter(Q(server_name__in=dead) | orphaned)
        .exclude(server_name=keep)
    )
    servers = sorted(set(open_sessions.values_list("server_name", flat=True)))
    open_ids = list(open_sessions.values_list("pk", flat=True))
    if dead:
        ServerLease.objects.filter(name__in=dead, expires_at__lte=Now()).delete()
    closed, vm_ids = _sessions_close(open_ids, SessionEndReason.SERVER_LOST)
    if not closed:
        return 0, []
    AuditEvent.objects.create(
        action="server.sessions_reaped", details={"servers": servers, "sessions": closed}
    )
    logger.warning("vmcontrol_sessions_reaped", servers=servers, sessions=closed, vms=len(vm_ids))
    changes = [{"vm_id": vm_id, "status": VmStatus.OFFLINE} for vm_id in vm_ids]
    if publish_changes:
        transaction.on_commit(lambda: status_changes_publish(changes))
    return closed, changes


def status_changes_publish(changes: Iterable[dict[str, Any]]) -> None:
    for change in changes:
        publish(VMS_TOPIC, change)
