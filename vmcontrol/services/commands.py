"""Commands to agents: created and audited here, carried by the agent bus (`vmcontrol.bus`),
answered once (`command_complete`, called by the connection that holds the VM)."""

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from common.db import orm_async
from common.exceptions import Conflict, NotFound, UpstreamTimeout
from vmcontrol import bus, selectors
from vmcontrol.lock_objects import vm_lock
from vmcontrol.models import AuditEvent, Command, CommandStatus, VirtualMachine
from vmcontrol.protocol import Disk as WireDisk
from vmcontrol.protocol import Inventory, ProtocolError, inventory_parse
from vmcontrol.services.vms import (
    Actor,
    VmNotAuthorized,
    actor_id,
    audit_add,
    disks_replace,
    live_authorized,
)


class AgentTimeout(UpstreamTimeout):
    """504: the agent did not answer the command in time (the command row says `timed_out`)."""

    code = "agent_timeout"
    default_message = "The agent did not acknowledge in time."


class CommandFailed(Conflict):
    """409: the agent answered the command with a failure (its error is in `details`)."""

    code = "command_failed"
    default_message = "The agent refused the command."


class CommandNotRetryable(Conflict):
    """409: only a failed or timed-out command can be sent again."""

    code = "command_not_retryable"
    default_message = "Only a failed or timed-out command can be retried."


def _command_create(*, vm_id: int, name: str, args: dict[str, Any], actor: Actor) -> Command:
    with transaction.atomic():
        vm = vm_lock(vm_id)
        if not live_authorized(vm):
            raise VmNotAuthorized()
        command = Command.objects.create(vm=vm, name=name, args=args, created_by_id=actor_id(actor))
        audit_add(actor=actor, vm_id=vm_id, action=f"command.{name}", command_id=str(command.pk))
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


ABANDONED = {
    "code": "abandoned",
    "message": "the process waiting for the agent's answer stopped before the answer came",
}


def commands_expire(*, older_than: float | None = None) -> int:
    """Time out the commands nobody will finish: still `queued` or `sent` more than
    `older_than` seconds after they were created (default VMCONTROL_COMMAND_TIMEOUT_SECONDS +
    VMCONTROL_SERVER_LEASE_TTL_SECONDS, past the deadline of any live waiter). That happens
    when the process waiting for the answer (`command_run`, a web process) died and the agent
    never answered, or answered to a server that died too. They become `timed_out` with error
    `abandoned`, so the operator sees an outcome instead of `sent` forever. One conditional
    UPDATE (an answer or a waiter's own timeout that won the race is kept); idempotent; safe
    from many processes at once. Returns how many were timed out."""
    if older_than is None:
        older_than = (
            settings.VMCONTROL_COMMAND_TIMEOUT_SECONDS + settings.VMCONTROL_SERVER_LEASE_TTL_SECONDS
        )
    now = timezone.now()
    return Command.objects.filter(
        status__in=[CommandStatus.QUEUED, CommandStatus.SENT],
        created_at__lt=now - timedelta(seconds=older_than),
    ).update(status=CommandStatus.TIMED_OUT, finished_at=now, error=ABANDONED)


def command_run(
    *,
    vm_id: int,
    name: str,
    args: dict[str, Any],
    actor: Actor = None,
    timeout: float | None = None,
) -> Command:
    """Send a command to the VM's agent through the agent bus (group `vmcontrol.vm.<id>`) and
    wait for its outcome, blocking the calling thread (sync code only) for up to `timeout`
    seconds (default VMCONTROL_COMMAND_TIMEOUT_SECONDS). The command row and its audit row are
    committed first (the VM row locked meanwhile), then marked `sent`, then the answer or the
    timeout is recorded once (conditional updates: whichever comes first wins). Not
    idempotent: every call is a new command. Returns the succeeded command. Raises NotFound
    (`vm_not_found`), VmNotAuthorized (409: not authorized, or its connection refused it),
    AgentTimeout (504: no answer in time), CommandFailed (409: the agent refused it)."""
    command = _command_create(vm_id=vm_id, name=name, args=args, actor=actor)
    wait = settings.VMCONTROL_COMMAND_TIMEOUT_SECONDS if timeout is None else timeout
    reply = async_to_sync(bus.command_push_and_wait)(
        vm_id=command.vm_id,
        command_id=str(command.pk),
        name=command.name,
        args=command.args,
        wait_seconds=wait,
        # `sent` is bookkeeping: written while the agent works, off the round trip.
        while_waiting=lambda: orm_async(_command_mark_sent)(command.pk),
    )
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


def command_retry(
    *, command_id: uuid.UUID, actor: Actor = None, timeout: float | None = None
) -> Command:
    """Send a failed or timed-out command again: a new command with the same VM, name and
    args through `command_run` (the old row is kept as it is; a `command.retry` audit row
    names it). Blocks like `command_run` and returns the new, succeeded command. Not
    idempotent: every call is a new command. Raises NotFound (`command_not_found`),
    CommandNotRetryable (409) when the command is queued, sent or succeeded, and what
    `command_run` raises (VmNotAuthorized, AgentTimeout, CommandFailed)."""
    old = selectors.command_get(command_id=command_id)
    if old.status not in (CommandStatus.FAILED, CommandStatus.TIMED_OUT):
        raise CommandNotRetryable(details={"command_id": str(old.pk), "status": old.status})
    audit_add(actor=actor, vm_id=old.vm_id, action="command.retry", command_id=str(old.pk))
    return command_run(vm_id=old.vm_id, name=old.name, args=old.args, actor=actor, timeout=timeout)


def vm_update_specs(
    *,
    vm_id: int,
    cpu_cores: int | None = None,
    ram_mb: int | None = None,
    disks: Sequence[WireDisk] | None = None,
    actor: Actor = None,
    timeout: float | None = None,
) -> Command:
    """Push `update_specs` (`ram_mb` in MiB, disk sizes in GB) to the agent with `command_run`;
    the database changes only when the agent acknowledges (see `command_complete`). Unchanged
    fields are sent as they are now. Raises what `command_run` raises."""
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
    answer after a timeout (or a duplicate) changes nothing (idempotent on `command_id`).
    `sent_at` is when the connection wrote the command to the agent (None if it never did);
    it is stored with the answer, since a fast agent can answer before the operator's side has
    marked the command `sent`. An acknowledged `update_specs` writes the specs it carried
    (`args`, as sent) and its disks, with a `vm.specs_updated` audit row, in the same
    transaction. Returns the command's final status (`unknown` for an unknown id). Raises
    nothing of its own."""
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
        disks_replace({vm_id: inventory})
        AuditEvent.objects.create(
            vm_id=vm_id, action="vm.specs_updated", details=inventory.as_dict()
        )
    return str(final)
